"""Audit: search the hash-chained trail (blocked and masked events included),
show the chain status from ``AuditLog.verify`` (recordings' digests included), and one
client session's statements in order with their decisions and the replay of its
transcript (portal.replay).

It must not write to the trail or change a record; it only reads and verifies.
"""

from __future__ import annotations

from flask import Blueprint, current_app, render_template, request

from keyturn.recording import Recorder
from keyturn.services import Services
from portal import queries
from portal.htmx import page_or_block
from portal.replay import replay_of
from portal.roles import ADMIN, AUDITOR, require

bp = Blueprint("auditview", __name__)
PAGE = 50
ACTIONS = ("allow", "block", "review", "mask")
KINDS = ("statement", "held", "vote", "ticket", "connect", "disconnect", "recording",
         "auth_failed", "login", "token", "export", "account")


def services() -> Services:
    return current_app.extensions["keyturn"]


def recorder() -> Recorder:
    return Recorder(services().config.gateway.recordings)


def audit_filter_from(args: dict[str, str]) -> queries.AuditFilter:
    return queries.AuditFilter(
        user=args.get("user", "").strip(), kind=args.get("kind", "").strip(),
        action=args.get("action", "").strip(), connection=args.get("connection", "").strip(),
        session_id=args.get("session", "").strip(), text=args.get("q", "").strip()[:200],
        since=queries.parse_day(args.get("from", "").strip(), "from"),
        until=queries.parse_day(args.get("to", "").strip(), "to", end=True))


@bp.get("/audit")
@require(AUDITOR, ADMIN)
def index():  # type: ignore[no-untyped-def]
    svc = services()
    args = {k: v for k, v in request.args.items()}
    f = audit_filter_from(args)
    before = args.get("before")
    if before and not before.isdigit():
        raise queries.BadFilter("the page link is damaged; start from the first page")
    rows, nxt = queries.audit_page(svc.store, f, int(before) if before else None, size=PAGE)
    keep = {k: v for k, v in args.items() if k != "before" and v}
    return page_or_block("audit.html", "audit_list", records=rows, next_before=nxt, args=keep,
                         paged=bool(before), actions=ACTIONS, kinds=KINDS,
                         connections=sorted(svc.config.connections),
                         users=sorted(svc.config.users))


@bp.get("/audit/chain")
@require(AUDITOR, ADMIN)
def chain():  # type: ignore[no-untyped-def]
    """The chain check walks every record, so the page loads it separately."""
    return render_template("_chain.html", result=services().audit.verify(recorder()))


@bp.get("/audit/sessions/<session_id>")
@require(AUDITOR, ADMIN)
def session_view(session_id: str):  # type: ignore[no-untyped-def]
    svc = services()
    records = queries.session_records(svc.store, session_id[:64])
    tickets = queries.tickets_by_id(svc.store, {r.ticket_id for r in records if r.ticket_id})
    replay = replay_of(recorder(), session_id[:64], records)
    return render_template("session.html", session_id=session_id, records=records,
                           tickets=tickets, replay=replay)
