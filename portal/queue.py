"""The pending queue (approvers, managers) and "my requests" (everyone).

Both update live: the list is an HTMX fragment of its page that the page asks
for again whenever its event stream (portal.live) says a ticket changed, so
tickets created or decided anywhere (gateway, CLI, chat, another browser)
appear and disappear within a second, without a reload.

It must not write anything; decisions are made on the ticket page.
"""

from __future__ import annotations

from flask import Blueprint, current_app, redirect, request, url_for

from keyturn.models import Ticket
from keyturn.services import Services
from portal import queries
from portal.htmx import is_htmx, page_or_block
from portal.roles import ADMIN, APPROVER, AUDITOR, MANAGER, require, viewer

bp = Blueprint("queue", __name__)


def services() -> Services:
    return current_app.extensions["keyturn"]


@bp.get("/")
@require()
def home():  # type: ignore[no-untyped-def]
    v = viewer()
    if v.has(APPROVER, MANAGER, ADMIN):
        return redirect(url_for("queue.pending"))
    if v.has(AUDITOR):
        return redirect(url_for("history.index"))
    return redirect(url_for("queue.mine"))


@bp.get("/queue")
@require(APPROVER, MANAGER, ADMIN)
def pending():  # type: ignore[no-untyped-def]
    svc = services()
    v = viewer()
    a = request.args
    f = queries.QueueFilter(connection=a.get("connection", "").strip(),
                            requester=a.get("requester", "").strip(),
                            rule=a.get("rule", "").strip(),
                            min_age=queries.parse_age(a.get("age", "").strip() or None))
    rows = [t for t in queries.pending(svc.store, f) if v.may_see(t)]
    voted = queries.voted_by(svc.store, v.user, [t.id for t in rows])
    decide = {t.id: t.id not in voted and svc.approvals.can_decide(v.identity, t)
              for t in rows}
    # The filter choices are only drawn on the full page, not on every live refresh.
    rules = [] if is_htmx() else queries.distinct_values(svc.store, Ticket.rule)
    return page_or_block(
        "queue.html", "queue_list", tickets=rows, can_decide=decide, voted=voted, filters=f,
        age=a.get("age", ""), connections=sorted(svc.config.connections),
        rules=rules, requesters=sorted(svc.config.users))


@bp.get("/mine")
@require()
def mine():  # type: ignore[no-untyped-def]
    rows = queries.mine(services().store, viewer().user)
    return page_or_block("mine.html", "mine_list", tickets=rows)
