"""Chat accounts: link the Slack or Teams account you use to your Keyturn user.

The bots hand out a one-time code in a private reply (``/keyturn link`` in
Slack, ``link`` in a Teams 1:1 chat). Entering it here, signed in, proves both
sides: the chat account asked for the code and this portal session is the
Keyturn user. ``bots.links.Links`` does the work (single use, hashed, 10
minutes); this page only ever lists and removes the viewer's own links.
Every attempt is audited like ``keyturn bots claim``: kind "chat", action
"link-claim" or "unlink".

It must not link an account without both proofs.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, render_template, request

from bots.links import Links
from bots.settings import CHAT
from keyturn.errors import KeyturnError, NotFound
from keyturn.services import Services
from portal.htmx import is_htmx, render_block
from portal.roles import require, viewer

bp = Blueprint("chatlinks", __name__)
PLATFORM_NAMES = {"slack": "Slack", "teams": "Teams"}


def services() -> Services:
    return current_app.extensions["keyturn"]


def links() -> Links:
    svc = services()
    return Links(svc.config, svc.store)


def _page(status: int = 200, **extra: Any):  # type: ignore[no-untyped-def]
    ctx = {"links": links().of_user(viewer().user), "platforms": PLATFORM_NAMES,
           "chat": CHAT.of(services().config), **extra}
    if is_htmx():
        return render_block("chat_accounts.html", "chat_main", **ctx), status
    return render_template("chat_accounts.html", **ctx), status


def _audit(action: str, outcome: str, *, reason: str | None = None,
           detail: dict[str, Any] | None = None) -> None:
    services().record_audit(kind="chat", user=viewer().user, action=action, outcome=outcome,
                            reason=reason, client_addr=request.remote_addr or "",
                            detail={"by": "portal", **(detail or {})})


@bp.get("/chat-accounts")
@require()
def index():  # type: ignore[no-untyped-def]
    return _page()


@bp.post("/chat-accounts/claim")
@require()
def claim():  # type: ignore[no-untyped-def]
    code = (request.form.get("code") or "").strip()[:40]
    if not code:
        return _page(400, error="Enter the code the Keyturn bot sent you in chat.")
    try:
        link = links().claim(code, viewer().user)
    except KeyturnError as exc:
        _audit("link-claim", "unauthorized", reason=exc.message)
        return _page(400, code=code, error=(
            f"The code {code} is unknown, already used or expired. Codes last 10 minutes "
            "and work once: ask the bot for a new one."))
    _audit("link-claim", "ok", detail={"platform": link.platform,
                                       "platform_user": link.platform_user})
    name = PLATFORM_NAMES.get(link.platform, link.platform)
    return _page(message=f"Your {name} account {link.platform_user} is now linked to "
                         f"{viewer().user}.")


@bp.post("/chat-accounts/<int:link_id>/unlink")
@require()
def unlink(link_id: int):  # type: ignore[no-untyped-def]
    try:
        row = links().unlink_own(link_id, viewer().user)
    except NotFound:
        _audit("unlink", "refused", reason=f"no own chat account link {link_id}")
        return _page(404, error=f"You have no chat account link {link_id}.")
    _audit("unlink", "ok", detail={"platform": row.platform, "platform_user": row.platform_user})
    name = PLATFORM_NAMES.get(row.platform, row.platform)
    return _page(message=f"Your {name} account {row.platform_user} is no longer linked. "
                         "Chat buttons from it now need a verified e-mail Keyturn knows.")
