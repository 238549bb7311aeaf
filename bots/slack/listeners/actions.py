"""Approve, Approve with comment, and Reject buttons.

``ack()`` first (Slack allows three seconds), then the vote goes through
``keyturn.approvals``. The message itself is updated by the outbox from the
store, so a click and a portal decision end in the same message. Approve on a
statement too long for the message opens the approve modal with the whole text
instead of voting, whatever the button said when it was drawn.

They must not update the message themselves or vote outside ``keyturn.approvals``.
"""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncApp

from bots.slack.blocks import APPROVE, APPROVE_COMMENT, REJECT, approve_modal, reject_modal
from bots.slack.listeners.deps import SlackDeps
from keyturn.errors import NotFound

log = logging.getLogger(__name__)


def _click(body: dict[str, Any]) -> tuple[str, str | None, int | None]:
    user = body["user"]["id"]
    channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get(
        "channel_id")
    try:
        ticket = int(body["actions"][0]["value"])
    except (KeyError, IndexError, ValueError):
        ticket = None
    return user, channel, ticket


def register(app: AsyncApp, deps: SlackDeps) -> None:
    async def clicked(body: dict[str, Any]) -> tuple[str, str | None, int, Any] | None:
        """Who clicked which ticket's button, or None (after telling them) if malformed."""
        slack_user, channel, ticket = _click(body)
        if ticket is None:
            await deps.tell(channel=channel, user=slack_user, text="That button is malformed.")
            return None
        return slack_user, channel, ticket, await deps.people.keyturn_user(slack_user)

    async def open_approve(body: dict[str, Any], slack_user: str, channel: str | None,
                           ticket: int, user: str | None) -> None:
        refusal = await deps.ctx.precheck_async(platform="slack", platform_user=slack_user,
                                                user=user, ticket_id=ticket, action="approve")
        if refusal:
            await deps.tell(channel=channel, user=slack_user, text=refusal)
            return
        view = await deps.view(ticket)
        await deps.client.views_open(trigger_id=body["trigger_id"],
                                     view=approve_modal(view, channel=channel))

    @app.action(APPROVE)
    async def approve(ack: Any, body: dict[str, Any]) -> None:
        await ack()
        click = await clicked(body)
        if click is None:
            return
        slack_user, channel, ticket, user = click
        try:
            view = await deps.view(ticket)
        except NotFound:
            await deps.tell(channel=channel, user=slack_user, text=f"There is no ticket #{ticket}.")
            return
        if view.truncated:  # never one click for what the message could not show
            await open_approve(body, slack_user, channel, ticket, user)
            return
        out = await deps.ctx.avote(platform="slack", platform_user=slack_user, user=user,
                                   ticket_id=ticket, vote="approve", comment=None)
        await deps.tell(channel=channel, user=slack_user, text=out.message)

    @app.action(APPROVE_COMMENT)
    async def approve_comment(ack: Any, body: dict[str, Any]) -> None:
        await ack()
        click = await clicked(body)
        if click is not None:
            await open_approve(body, *click)

    @app.action(REJECT)
    async def reject(ack: Any, body: dict[str, Any]) -> None:
        await ack()
        click = await clicked(body)
        if click is None:
            return
        slack_user, channel, ticket, user = click
        # Refuse before asking for a reason: nobody should type a reason that cannot count.
        refusal = await deps.ctx.precheck_async(platform="slack", platform_user=slack_user,
                                          user=user, ticket_id=ticket)
        if refusal:
            await deps.tell(channel=channel, user=slack_user, text=refusal)
            return
        await deps.client.views_open(trigger_id=body["trigger_id"],
                                     view=reject_modal(ticket, channel=channel))

