"""Slack deliveries of outbox rows: the ticket message, its in-place updates,
thread replies per vote, reminders and the requester's DMs.

Each delivery renders the ticket's current state from the store. Slack errors
become retries; HTTP 429 pauses all Slack deliveries for Retry-After.

It must not render from anything but the store, nor drop a delivery Slack refused.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import select

from bots.context import BotContext
from bots.models import ChatMessage, OutboxItem
from bots.outbox import Planned, RetryLater, reminders_due, ticket_plan
from bots.render import TicketView, escalation_text, fmt_left, requester_note, ticket_view
from bots.settings import SlackSettings
from bots.slack.blocks import summary, ticket_blocks
from bots.slack.people import SlackPeople
from keyturn.models import Ticket, TicketEvent

log = logging.getLogger(__name__)
# A channel id (public C…, private G…, DM D…) rather than a name.
_CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{6,}$")


class SlackNotifier:
    platform = "slack"

    def __init__(self, ctx: BotContext, settings: SlackSettings, client: AsyncWebClient,
                 people: SlackPeople):
        self.ctx = ctx
        self.settings = settings
        self.client = client
        self.people = people
        self._names: dict[str, str | None] = {}

    # ---- planning

    def plan(self, event: TicketEvent, ticket: Ticket) -> Sequence[Planned]:
        # A vote on an N-of-M ticket is also answered in the post's thread.
        votes = [Planned("vote_reply", {"approver": event.actor, "vote": event.kind[5:],
                                        "comment": (event.detail or {}).get("comment")}),
                 Planned("update")] if event.kind.startswith("vote:") else []
        return ticket_plan(event, ticket, votes)

    def scheduled(self, pending: Sequence[Ticket], now: float
                  ) -> Sequence[tuple[int, Planned]]:
        return reminders_due(self.settings.reminders, pending, now)

    # ---- delivery

    async def deliver(self, item: OutboxItem) -> str | None:
        detail = await asyncio.to_thread(self.ctx.services.approvals.detail, item.ticket_id)
        view = ticket_view(detail, portal_url=self.ctx.portal_url,
                           limit=self.settings.statement_chars)
        try:
            return await self._send(item, view)
        except SlackApiError as exc:
            resp = exc.response
            if resp.status_code == 429:
                after = float(resp.headers.get("Retry-After", resp.headers.get("retry-after", 1)))
                raise RetryLater(f"rate limited for {after}s", after=after,
                                 platform_wide=True) from exc
            raise RetryLater(f"Slack answered {resp.status_code}: "
                             f"{resp.get('error') if isinstance(resp.data, dict) else ''}"
                             ) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RetryLater(f"Slack unreachable: {exc!r}") from exc

    async def _send(self, item: OutboxItem, view: TicketView) -> str | None:
        ref = await asyncio.to_thread(self._message, item.ticket_id)
        if item.kind == "post":
            channel = self.settings.channel_for(view.connection, self.ctx.policy_of(
                view.connection))
            if ref is not None:  # a retried post that already went out: keep one message
                await self._update(ref, view)
            else:
                resp = await self.client.chat_postMessage(
                    channel=channel, text=summary(view), blocks=await self._blocks(view),
                    unfurl_links=False)
                ref = await asyncio.to_thread(self._remember, item.ticket_id, resp["channel"],
                                              resp["ts"])
            await asyncio.to_thread(self.ctx.notified, item.ticket_id, "slack", channel,
                                    channel_id=ref.channel, ts=ref.ref,
                                    channel_name=await self.channel_name(channel, ref.channel))
            return None
        if item.kind == "update":
            if ref is None:
                return "no Slack message to update"
            await self._update(ref, view)
            return None
        if item.kind == "vote_reply":
            if ref is None:
                return "no Slack message to reply to"
            p = item.payload
            verb = "approved" if p.get("vote") == "approve" else "rejected"
            text = f"{p.get('approver')} {verb} ({view.approvals} of {view.required} approvals)"
            if p.get("comment"):
                text += f": {p['comment']}"
            await self.client.chat_postMessage(channel=ref.channel, thread_ts=ref.ref, text=text)
            return None
        if item.kind == "escalation":
            if ref is None:
                return "no Slack message to reply to"
            if not view.pending:
                return "ticket no longer pending"
            await self.client.chat_postMessage(
                channel=ref.channel, thread_ts=ref.ref, reply_broadcast=True,
                text=escalation_text(view, item.payload.get("to") or ()))
            return None
        if item.kind == "reminder":
            if not view.pending:
                return "ticket no longer pending"
            left = fmt_left(float(item.payload.get("before", 0)))
            text = (f"Reminder: ticket #{view.id} ({view.classification} on {view.connection} "
                    f"by {view.requester}) expires in about {left} with {view.approvals} of "
                    f"{view.required} approvals.")
            if ref is not None:  # in the request's thread, shown in the channel too
                await self.client.chat_postMessage(channel=ref.channel, thread_ts=ref.ref,
                                                   reply_broadcast=True, text=text)
                await self._update(ref, view)   # its countdown, now
                channel, channel_id = ref.channel, ref.channel
            else:
                channel = self.settings.channel_for(view.connection,
                                                    self.ctx.policy_of(view.connection))
                resp = await self.client.chat_postMessage(
                    channel=channel, text=f"{text} <{view.portal_url}|Open the request>")
                channel_id = resp["channel"]
            await asyncio.to_thread(self.ctx.reminded, item.ticket_id, "slack", channel_id,
                                    left=left,
                                    channel_name=await self.channel_name(channel, channel_id))
            return None
        if item.kind == "dm":
            sid = await self.people.slack_id(view.requester)
            if sid is None:
                return f"{view.requester} has no Slack account Keyturn knows"
            await self.client.chat_postMessage(channel=sid, text=requester_note(
                str(item.payload.get("what")), view))
            return None
        return f"unknown delivery kind {item.kind}"

    async def channel_name(self, configured: str, channel_id: str) -> str | None:
        """The channel's name as people know it (``approvals``), for the timeline: the
        configured name when one was given, else asked of Slack once per channel (needs
        ``channels:read``/``groups:read``; without them the timeline just says Slack)."""
        if not _CHANNEL_ID.match(configured):
            return configured.lstrip("#")
        if channel_id not in self._names:
            try:
                resp = await self.client.conversations_info(channel=channel_id)
                self._names[channel_id] = (resp.get("channel") or {}).get("name")
            except (SlackApiError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.info("could not read the name of Slack channel %s: %r", channel_id, exc)
                return None
        return self._names[channel_id]

    async def _blocks(self, view: TicketView) -> list[dict]:
        return ticket_blocks(view, requester_slack=await self.people.slack_id(view.requester))

    async def _update(self, ref: ChatMessage, view: TicketView) -> None:
        await self.client.chat_update(channel=ref.channel, ts=ref.ref, text=summary(view),
                                      blocks=await self._blocks(view))

    def _message(self, ticket_id: int) -> ChatMessage | None:
        with self.ctx.services.store.session() as s:
            return s.scalars(select(ChatMessage).where(
                ChatMessage.platform == "slack", ChatMessage.ticket_id == ticket_id,
                ChatMessage.purpose == "ticket")).first()

    def _remember(self, ticket_id: int, channel: str, ts: str) -> ChatMessage:
        row = ChatMessage(platform="slack", ticket_id=ticket_id, purpose="ticket",
                          channel=channel, ref=ts, extra={}, created_at=time.time())
        with self.ctx.services.store.write() as s:
            s.add(row)
        return row
