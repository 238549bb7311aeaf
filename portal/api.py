"""JSON API ``/api/v1``: list, show, approve and reject tickets.

Token-authenticated (``Authorization: Bearer <access token>``). Every action
checks authorization on the server; separation of duties is enforced by
``keyturn.approvals`` and reported with a precise error.

It must not decide anything itself: votes go through ``keyturn.approvals``.
"""

from __future__ import annotations

from functools import wraps
from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from keyturn.approvals import ticket_json
from keyturn.errors import Forbidden, KeyturnError, Unauthorized
from keyturn.services import Services
from portal.roles import ADMIN, AUDITOR, MANAGER, roles_for

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def services() -> Services:
    return current_app.extensions["keyturn"]


def token_required(fn):  # type: ignore[no-untyped-def]
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send Authorization: Bearer <access token>")
        g.identity = services().identities.authenticate_token(token.strip())
        return fn(*args, **kwargs)
    return wrapper


def _visible(ticket: Any) -> bool:
    ident = g.identity
    roles = roles_for(services().config, ident.groups)
    return (ticket.requester == ident.user or bool(set(ident.groups) & set(ticket.approver_groups))
            or bool({AUDITOR, MANAGER, ADMIN} & roles))


@bp.get("/whoami")
@token_required
def whoami():  # type: ignore[no-untyped-def]
    return {"user": g.identity.user, "groups": list(g.identity.groups)}


@bp.get("/tickets")
@token_required
def list_tickets():  # type: ignore[no-untyped-def]
    status = request.args.get("status") or None
    mine = request.args.get("mine") in ("1", "true")
    limit = min(int(request.args.get("limit", 100)), 1000)
    svc = services()
    rows = svc.approvals.find(status=status, requester=g.identity.user if mine else None,
                              limit=limit)
    out = []
    for t in rows:
        if not _visible(t):
            continue
        d = ticket_json(t)
        d["can_decide"] = svc.approvals.can_decide(g.identity, t)
        out.append(d)
    return jsonify({"tickets": out})


@bp.get("/tickets/<int:ticket_id>")
@token_required
def show_ticket(ticket_id: int):  # type: ignore[no-untyped-def]
    svc = services()
    t = svc.approvals.get(ticket_id)
    if not _visible(t):
        raise Forbidden(f"you may not see ticket {ticket_id}")
    d = svc.approvals.detail(ticket_id)
    d["can_decide"] = svc.approvals.can_decide(g.identity, t)
    return jsonify(d)


def _decide(ticket_id: int, vote: str):  # type: ignore[no-untyped-def]
    body = request.get_json(silent=True) or {}
    text = body.get("comment") if vote == "approve" else body.get("reason")
    if vote == "reject" and not (text or "").strip():
        raise KeyturnError("a rejection needs a reason (JSON field 'reason')")
    result = services().approvals.vote(ticket_id, g.identity, vote, text,
                                       via=body.get("via", "api"))
    return jsonify({"ticket": ticket_json(result.ticket), "decided": result.decided,
                    "approvals": result.approvals, "required": result.required})


@bp.post("/tickets/<int:ticket_id>/approve")
@token_required
def approve(ticket_id: int):  # type: ignore[no-untyped-def]
    return _decide(ticket_id, "approve")


@bp.post("/tickets/<int:ticket_id>/reject")
@token_required
def reject(ticket_id: int):  # type: ignore[no-untyped-def]
    return _decide(ticket_id, "reject")
