"""The reject modal's submission: the reason is required, and a refusal is
shown in the modal itself so the approver sees why nothing happened.

It must not decide a ticket without a reason, nor outside ``keyturn.approvals``.
"""

from __future__ import annotations

import json
from typing import Any

from slack_bolt.async_app import AsyncApp

from bots.slack.blocks import REJECT_MODAL
from bots.slack.listeners.deps import SlackDeps


def register(app: AsyncApp, deps: SlackDeps) -> None:
    @app.view(REJECT_MODAL)
    async def submit(ack: Any, body: dict[str, Any], view: dict[str, Any]) -> None:
        slack_user = body["user"]["id"]
        try:
            meta = json.loads(view.get("private_metadata") or "{}")
            ticket = int(meta["ticket"])
        except (ValueError, KeyError, TypeError):
            await ack(response_action="errors", errors={"reason": "This form is malformed."})
            return
        reason = (((view.get("state") or {}).get("values") or {}).get("reason") or {}).get(
            "reason", {}).get("value") or ""
        if not reason.strip():
            await ack(response_action="errors", errors={"reason": "Give a reason."})
            return
        user = await deps.people.keyturn_user(slack_user)
        out = await deps.ctx.avote(platform="slack", platform_user=slack_user, user=user,
                                   ticket_id=ticket, vote="reject", comment=reason.strip())
        if not out.ok:
            await ack(response_action="errors", errors={"reason": out.message[:150]})
            return
        await ack()
        await deps.tell(channel=meta.get("channel"), user=slack_user, text=out.message)
