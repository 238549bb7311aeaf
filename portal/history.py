"""History: every decided ticket, searchable, keyset-paginated (fast at any depth).

It must not write anything.
"""

from __future__ import annotations

from flask import Blueprint, current_app, request

from keyturn.approvals import DECIDED
from keyturn.services import Services
from portal import queries
from portal.htmx import page_or_block
from portal.roles import ADMIN, AUDITOR, MANAGER, require

bp = Blueprint("history", __name__)
PAGE = 50


def services() -> Services:
    return current_app.extensions["keyturn"]


def history_filter_from(args: dict[str, str]) -> queries.HistoryFilter:
    outcome = args.get("outcome", "").strip()
    if outcome and outcome not in DECIDED:
        raise queries.BadFilter(f"outcome: expected one of {', '.join(sorted(DECIDED))}")
    return queries.HistoryFilter(
        text=args.get("q", "").strip()[:200], requester=args.get("requester", "").strip(),
        approver=args.get("approver", "").strip(),
        connection=args.get("connection", "").strip(), outcome=outcome,
        since=queries.parse_day(args.get("from", "").strip(), "from"),
        until=queries.parse_day(args.get("to", "").strip(), "to", end=True))


@bp.get("/history")
@require(AUDITOR, MANAGER, ADMIN)
def index():  # type: ignore[no-untyped-def]
    svc = services()
    args = {k: v for k, v in request.args.items()}
    f = history_filter_from(args)
    rows, nxt = queries.history_page(svc.store, f, args.get("after") or None, size=PAGE)
    keep = {k: v for k, v in args.items() if k != "after" and v}
    return page_or_block("history.html", "history_list", tickets=rows, next_cursor=nxt,
                         args=keep, paged=bool(args.get("after")),
                         outcomes=sorted(DECIDED), connections=sorted(svc.config.connections),
                         users=sorted(svc.config.users))
