"""Tokens: create, list and revoke your own gateway access tokens.

Only ever the viewer's own tokens: the list is filtered by user and revoking
passes the user to ``Identities.revoke_token``, which answers "no token" for
someone else's id (no way to learn that it exists). A new token is shown
once, in the response to the POST that created it, and never again.

It must not show a token twice nor touch another user's tokens.
"""

from __future__ import annotations

import time

from flask import Blueprint, current_app, render_template, request

from keyturn.config import parse_duration
from keyturn.errors import NotFound
from keyturn.services import Services
from portal.roles import require, viewer

bp = Blueprint("tokens", __name__)
TTLS = {"1d": "1 day", "7d": "7 days", "30d": "30 days", "90d": "90 days"}


def services() -> Services:
    return current_app.extensions["keyturn"]


def _page(status: int = 200, **extra):  # type: ignore[no-untyped-def]
    rows = services().identities.list_tokens(viewer().user)
    return render_template("tokens.html", tokens=rows, now=time.time(), ttls=TTLS,
                           **extra), status


@bp.get("/tokens")
@require()
def index():  # type: ignore[no-untyped-def]
    return _page()


@bp.post("/tokens")
@require()
def create():  # type: ignore[no-untyped-def]
    svc = services()
    description = (request.form.get("description") or "").strip()
    ttl = request.form.get("ttl") or "30d"
    if ttl not in TTLS:
        return _page(400, error="Choose one of the offered lifetimes.", description=description)
    if len(description) > 200:
        return _page(400, error="The description is longer than 200 characters.",
                     description=description)
    issued = svc.identities.create_token(viewer().user, description=description,
                                         ttl=parse_duration(ttl))
    svc.record_audit(kind="token", user=viewer().user, action="create",
                     detail={"token_id": issued.id, "by": "portal"})
    return _page(201, issued=issued)


@bp.post("/tokens/<int:token_id>/revoke")
@require()
def revoke(token_id: int):  # type: ignore[no-untyped-def]
    svc = services()
    try:
        row = svc.identities.revoke_token(token_id, user=viewer().user)
    except NotFound:
        return _page(404, error=f"You have no token {token_id}.")
    svc.record_audit(kind="token", user=viewer().user, action="revoke",
                     detail={"token_id": row.id, "by": "portal"})
    return _page(message=f"Token {row.prefix}… revoked. Clients using it can no longer sign in.")
