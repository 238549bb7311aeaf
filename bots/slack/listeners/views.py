"""The approve and reject modals' submissions. A rejection needs a reason; an
approval counts only for the text its modal showed (the digest it carries); a comment
is optional. A refusal is shown in the modal itself so the approver sees why nothing
happened.

It must not reject without a reason, approve a text other than the one shown, nor
decide outside ``keyturn.approvals``.
"""

from __future__ import annotations

import json
from typing import Any

from slack_bolt.async_app import AsyncApp

from bots.slack.blocks import APPROVE_MODAL, REJECT_MODAL
from bots.slack.listeners.deps import SlackDeps
from keyturn.errors import KeyturnError


def _form(view: dict[str, Any], field: str) -> tuple[dict[str, Any] | None, str]:
    """The modal's private metadata (None when malformed) and what was typed in ``field``."""
    try:
        meta = json.loads(view.get("private_metadata") or "{}")
        meta["ticket"] = int(meta["ticket"])
    except (ValueError, KeyError, TypeError):
        meta = None
    typed = (((view.get("state") or {}).get("values") or {}).get(field) or {}).get(
        field, {}).get("value") or ""
    return meta, typed.strip()


def register(app: AsyncApp, deps: SlackDeps) -> None:
    @app.view(REJECT_MODAL)
    async def submit(ack: Any, body: dict[str, Any], view: dict[str, Any]) -> None:
        slack_user = body["user"]["id"]
        meta, reason = _form(view, "reason")
        if meta is None:
            await ack(response_action="errors", errors={"reason": "This form is malformed."})
            return
        ticket = meta["ticket"]
        if not reason:
            await ack(response_action="errors", errors={"reason": "Give a reason."})
            return
        user = await deps.people.keyturn_user(slack_user)
        out = await deps.ctx.avote(platform="slack", platform_user=slack_user, user=user,
                                   ticket_id=ticket, vote="reject", comment=reason)
        if not out.ok:
            await ack(response_action="errors", errors={"reason": out.message[:150]})
            return
        await ack()
        await deps.tell(channel=meta.get("channel"), user=slack_user, text=out.message)

    @app.view(APPROVE_MODAL)
    async def submit_approval(ack: Any, body: dict[str, Any], view: dict[str, Any]) -> None:
        slack_user = body["user"]["id"]
        meta, comment = _form(view, "comment")
        if meta is None or not isinstance(meta.get("digest"), str):
            await ack(response_action="errors", errors={"comment": "This form is malformed."})
            return
        ticket, shown = meta["ticket"], meta["digest"]
        try:
            now = await deps.view(ticket)
        except KeyturnError as exc:
            await ack(response_action="errors", errors={"comment": exc.message[:150]})
            return
        if now.digest != shown:
            await ack(response_action="errors", errors={
                "comment": "This form showed a different text; open the ticket again."})
            return
        user = await deps.people.keyturn_user(slack_user)
        out = await deps.ctx.avote(platform="slack", platform_user=slack_user, user=user,
                                   ticket_id=ticket, vote="approve",
                                   comment=comment or None)
        if not out.ok:
            await ack(response_action="errors", errors={"comment": out.message[:150]})
            return
        await ack()
        await deps.tell(channel=meta.get("channel"), user=slack_user, text=out.message)
