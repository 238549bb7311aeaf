"""Teams deliveries of outbox rows: the ticket card in the approvers'
conversation, its in-place updates, and proactive 1:1 messages to the
requester on every status change.

It must not render from anything but the store, nor drop a delivery Teams refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from bots.context import BotContext
from bots.models import ChatMessage, OutboxItem
from bots.outbox import Planned, reminders_due, ticket_plan
from bots.render import TicketView, escalation_text, fmt_left, requester_note, ticket_view
from bots.settings import TeamsSettings
from bots.teams.cards import attachment, ticket_card
from bots.teams.connector import Connector
from keyturn.models import Ticket, TicketEvent


class TeamsNotifier:
    platform = "teams"

    def __init__(self, ctx: BotContext, settings: TeamsSettings, connector: Connector,
                 people: Any):
        self.ctx = ctx
        self.settings = settings
        self.connector = connector
        self.people = people

    def plan(self, event: TicketEvent, ticket: Ticket) -> Sequence[Planned]:
        return ticket_plan(event, ticket, [Planned("update")])

    def scheduled(self, pending: Sequence[Ticket], now: float
                  ) -> Sequence[tuple[int, Planned]]:
        return reminders_due(self.settings.reminders, pending, now)

    def view(self, ticket_id: int) -> TicketView:
        return ticket_view(self.ctx.services.approvals.detail(ticket_id),
                           portal_url=self.ctx.portal_url, limit=self.settings.statement_chars)

    def card_activity(self, view: TicketView) -> dict[str, Any]:
        return {"type": "message", "summary": f"Ticket #{view.id} {view.status_word}",
                "attachments": [attachment(ticket_card(view))]}

    async def deliver(self, item: OutboxItem) -> str | None:
        view = await asyncio.to_thread(self.view, item.ticket_id)
        ref = await asyncio.to_thread(self._message, item.ticket_id)
        url = self.settings.service_url
        if item.kind == "post":
            conv = self.settings.conversation_for(view.connection)
            if ref is not None:  # a retried post that already went out: keep one card
                await self.connector.update_activity(url, ref.channel, ref.ref,
                                                     self.card_activity(view))
                conv, aid = ref.channel, ref.ref
            else:
                aid = await self.connector.post_activity(url, conv, self.card_activity(view))
                await asyncio.to_thread(self._remember, item.ticket_id, conv, aid)
            await asyncio.to_thread(self.ctx.notified, item.ticket_id, "teams", conv,
                                    activity_id=aid,
                                    channel_name=self.settings.conversation_names.get(conv))
            return None
        if item.kind == "update":
            if ref is None:
                return "no Teams card to update"
            await self.connector.update_activity(url, ref.channel, ref.ref,
                                                 self.card_activity(view))
            return None
        if item.kind == "escalation":
            if ref is None:
                return "no Teams card to reply to"
            if not view.pending:
                return "ticket no longer pending"
            await self.connector.reply_activity(url, ref.channel, ref.ref, {
                "type": "message", "text": escalation_text(view, item.payload.get("to") or ())})
            return None
        if item.kind == "reminder":
            if not view.pending:
                return "ticket no longer pending"
            if ref is None:
                return "no Teams card to remind of"
            left = fmt_left(float(item.payload.get("before", 0)))
            # The card's countdown now, and a reply under it that notifies the channel.
            await self.connector.update_activity(url, ref.channel, ref.ref,
                                                 self.card_activity(view))
            await self.connector.reply_activity(url, ref.channel, ref.ref, {
                "type": "message", "text": (
                    f"Reminder: ticket #{view.id} ({view.classification} on "
                    f"{view.connection} by {view.requester}) expires in about {left} with "
                    f"{view.approvals} of {view.required} approvals.")})
            await asyncio.to_thread(self.ctx.reminded, item.ticket_id, "teams", ref.channel,
                                    left=left,
                                    channel_name=self.settings.conversation_names.get(
                                        ref.channel))
            return None
        if item.kind == "dm":
            address = await self.people.address_of(view.requester)
            if address is None:
                return f"{view.requester} has no Teams account Keyturn knows"
            conv = await self.connector.open_personal(
                address.get("service_url") or url, self.settings.app_id, address["id"],
                address.get("tenant_id") or self.settings.tenant_id)
            await self.connector.post_activity(address.get("service_url") or url, conv, {
                "type": "message", "text": requester_note(str(item.payload.get("what")), view)})
            return None
        return f"unknown delivery kind {item.kind}"

    def _message(self, ticket_id: int) -> ChatMessage | None:
        with self.ctx.services.store.session() as s:
            return s.scalars(select(ChatMessage).where(
                ChatMessage.platform == "teams", ChatMessage.ticket_id == ticket_id,
                ChatMessage.purpose == "ticket")).first()

    def _remember(self, ticket_id: int, conversation: str, activity_id: str) -> None:
        with self.ctx.services.store.write() as s:
            s.add(ChatMessage(platform="teams", ticket_id=ticket_id, purpose="ticket",
                              channel=conversation, ref=activity_id, extra={},
                              created_at=time.time()))
