"""What the Slack listeners share.

It must not hold state of its own beyond what the listeners share.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from slack_sdk.web.async_client import AsyncWebClient

from bots.context import BotContext
from bots.render import TicketView, ticket_view
from bots.settings import SlackSettings
from bots.slack.people import SlackPeople


@dataclass
class SlackDeps:
    ctx: BotContext
    settings: SlackSettings
    client: AsyncWebClient
    people: SlackPeople

    async def tell(self, *, channel: str | None, user: str, text: str) -> None:
        """An ephemeral note to one person: in the channel of the click when there
        is one, else as a DM."""
        if channel:
            await self.client.chat_postEphemeral(channel=channel, user=user, text=text)
        else:
            await self.client.chat_postMessage(channel=user, text=text)

    async def view(self, ticket: int) -> TicketView:
        """The ticket as Slack shows it now (raises NotFound)."""
        detail = await asyncio.to_thread(self.ctx.services.approvals.detail, ticket)
        return ticket_view(detail, portal_url=self.ctx.portal_url,
                           limit=self.settings.statement_chars)
