"""One ticket: everything an approver needs to decide, and the decision itself.

Votes go through ``keyturn.approvals.vote`` (separation of duties, N-of-M and
the race between surfaces are decided there). The page turns its errors into
plain sentences: "you requested this", "already approved by dana a moment
ago", and never loses what the person typed.

It must not decide outside ``keyturn.approvals`` nor show a ticket to whom roles deny
it.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, current_app, make_response, request

from keyturn.approvals import ABANDONED, PENDING
from keyturn.errors import (
    AlreadyDecided,
    AlreadyVoted,
    InvalidTransition,
    NotAnApprover,
    NotFound,
    SelfApproval,
)
from keyturn.models import Ticket
from keyturn.services import Services
from keyturn.wording import outcome
from portal import queries
from portal.htmx import is_htmx, page_or_block, render_block
from portal.live import LIVE_STATUSES
from portal.roles import require, viewer

bp = Blueprint("tickets", __name__)


def services() -> Services:
    return current_app.extensions["keyturn"]


def _visible_ticket(ticket_id: int) -> Ticket:
    try:
        t = services().approvals.get(ticket_id)
    except NotFound:
        abort(404, description=f"There is no ticket {ticket_id}.")
    if not viewer().may_see(t):
        # Same answer shape as a missing ticket would leak existence; say it plainly
        # but reveal nothing about the ticket itself.
        abort(403, description=f"You may not see ticket {ticket_id}.")
    return t


def _context(t: Ticket, **extra: Any) -> dict[str, Any]:
    svc = services()
    detail = svc.approvals.detail(t.id)
    v = viewer()
    voted = t.id in queries.voted_by(svc.store, v.user, [t.id])
    can_decide = (t.status == PENDING and not voted
                  and svc.approvals.can_decide(v.identity, t))
    return {"t": t, "d": detail, "approvals": detail.get("approvals", 0),
            "can_decide": can_decide, "show_form": can_decide, "voted": voted,
            "is_requester": t.requester == v.user, "live": t.status in LIVE_STATUSES,
            # The page has the decision form open (its live updates must keep it).
            "form_open": request.args.get("form") == "1",
            "version": f"{t.status}.{len(detail.get('events', []))}", **extra}


@bp.get("/tickets/<int:ticket_id>")
@require()
def show(ticket_id: int):  # type: ignore[no-untyped-def]
    t = _visible_ticket(ticket_id)
    ctx = _context(t)
    if not is_htmx():
        return page_or_block("ticket.html", "ticket_main", **ctx)
    if request.args.get("v") == ctx["version"]:
        return "", 204  # nothing changed
    # The status, and out of band the timeline (and a form the ticket outlived): never
    # the form a person is typing in (see the ticket_live block).
    resp = make_response(render_block("ticket.html", "ticket_live", oob=True, **ctx))
    resp.headers["Vary"] = "HX-Request"
    return resp


@bp.post("/tickets/<int:ticket_id>/<any(approve, reject):vote>")
@require()
def decide(ticket_id: int, vote: str):  # type: ignore[no-untyped-def]
    t = _visible_ticket(ticket_id)
    text = (request.form.get("comment") if vote == "approve"
            else request.form.get("reason")) or ""
    text = text.strip()[:2000]
    status, message, level = 200, "", "ok"
    if vote == "reject" and not text:
        status, level = 400, "error"
        message = "A rejection needs a reason: the requester sees it in their client."
    else:
        try:
            res = services().approvals.vote(t.id, viewer().identity, vote, text or None,
                                            via="portal")
            t = res.ticket
            if res.decided:
                message = f"Ticket {t.id} {t.status}."
            else:
                message = (f"Your approval is recorded: {res.approvals} of {res.required} "
                           "needed.")
        except SelfApproval:
            status, level = 403, "error"
            message = ("You requested this ticket, so you cannot decide it: separation of "
                       "duties needs someone else to approve or reject it.")
        except NotAnApprover:
            status, level = 403, "error"
            message = ("You are not in an approver group of this ticket "
                       f"({', '.join(t.approver_groups)}), so you cannot decide it.")
        except AlreadyVoted:
            status, level = 409, "error"
            message = "You already voted on this ticket."
        except (AlreadyDecided, InvalidTransition):
            status, level = 409, "error"
            t = services().approvals.get(t.id)
            why = f" (“{t.decision_comment}”)" if t.decision_comment else ""
            if t.status == ABANDONED:
                message = (f"The requester's session ended before this ticket could run, so "
                           f"it was abandoned and nothing ran. Your {vote} was not recorded.")
            else:
                message = (f"This ticket was already decided elsewhere a moment ago: "
                           f"{outcome(t)}{why}. Your {vote} was not recorded.")
    ctx = _context(t, message=message, level=level,
                   draft={"vote": vote, "text": text} if level == "error" else None)
    if is_htmx():
        return render_block("ticket.html", "ticket_main", **ctx), status
    return page_or_block("ticket.html", "ticket_main", **ctx), status
