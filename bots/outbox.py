"""The persistent outbox: ticket changes become chat deliveries that survive
outages, rate limits and restarts.

``Outbox.pump`` tails ``ticket_events`` (written in the same transaction as
every ticket transition) from a stored cursor and, in ONE transaction, turns
new events into outbox rows and advances the cursor: an event is planned once
or not at all. ``Outbox.deliver_due`` sends rows through each platform's
notifier with retries and exponential backoff, honouring 429 Retry-After.

Ordering: per (platform, ticket) only the oldest unsent row is attempted, so
an update never overtakes the message it updates. Notifiers render the
ticket's CURRENT state at send time, so a decision that arrived while the
create message was still pending ends in the right final message.

Rows are never deleted by delivery and never given up on: a failing row
keeps retrying, capped at ``cap`` seconds between attempts, with its last
error visible (``keyturn bots outbox``).

It must not drop a delivery or send from anything but the store's events.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from bots.models import ChatCursor, OutboxItem
from keyturn.approvals import PENDING
from keyturn.models import Ticket, TicketEvent
from keyturn.store import Store

log = logging.getLogger(__name__)

# Ticket events after which a ticket's chat message shows its final state.
FINAL_EVENTS = frozenset({"decided", "expired", "cancelled", "abandoned", "executed", "failed"})
CURSOR = "ticket_events"
# Events the bots write themselves ("notified"): never a reason to send anything.
OWN_EVENTS = frozenset({"notified", "reminded"})


class RetryLater(Exception):
    """Delivery failed for now. ``after`` overrides the backoff (Retry-After);
    ``platform_wide`` pauses every delivery to that platform (rate limits)."""

    def __init__(self, message: str, *, after: float | None = None,
                 platform_wide: bool = False):
        super().__init__(message)
        self.after = after
        self.platform_wide = platform_wide


@dataclass(frozen=True)
class Planned:
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    dedupe: str | None = None


def ticket_plan(event: TicketEvent, ticket: Ticket, votes: Sequence[Planned]
                ) -> Sequence[Planned]:
    """What every platform delivers for a ticket event: the new ticket posted and its
    requester told; after a vote on an N-of-M ticket, ``votes`` (the platform's own);
    once decided or finished, the post updated and the requester told."""
    kind = event.kind
    if kind == "created":
        return [Planned("post"), Planned("dm", {"what": "created"})]
    if kind.startswith("vote:"):
        return list(votes) if ticket.min_approvals > 1 else []
    if kind == "escalated":  # new approvers: the post shows them, and says so below it
        return [Planned("update"), Planned("escalation", {"to": list(
            (event.detail or {}).get("to") or ())})]
    if kind in FINAL_EVENTS:
        what = (event.detail or {}).get("status") if kind == "decided" else kind
        return [Planned("update"), Planned("dm", {"what": what})]
    return []


def reminders_due(reminders: Sequence[float], pending: Sequence[Ticket], now: float
                  ) -> list[tuple[int, Planned]]:
    """A reminder for each configured time before expiry whose moment has come, once
    (deduplicated per ticket and time), and not for tickets created inside that window
    (they were just announced)."""
    out = []
    for t in pending:
        for before in reminders:
            if t.expires_at - before <= now < t.expires_at and \
                    t.created_at < t.expires_at - before:
                out.append((t.id, Planned("reminder", {"before": before},
                                          dedupe=f"reminder:{t.id}:{int(before)}")))
    return out


class Notifier(Protocol):
    platform: str

    def plan(self, event: TicketEvent, ticket: Ticket) -> Sequence[Planned]:
        """The deliveries one ticket event needs on this platform."""

    def scheduled(self, pending: Sequence[Ticket], now: float) -> Sequence[tuple[int, Planned]]:
        """Time-driven deliveries (reminders) for pending tickets; deduplicated."""

    async def deliver(self, item: OutboxItem) -> str | None:
        """Send one row; return a note when there was nothing to send. Raise
        RetryLater (or anything) to retry."""


class Outbox:
    def __init__(self, store: Store, notifiers: Sequence[Notifier], *, base: float = 1.0,
                 cap: float = 300.0):
        self.store = store
        self.notifiers = {n.platform: n for n in notifiers}
        self.base = base
        self.cap = cap
        self.paused_until: dict[str, float] = {}

    # ---- planning

    def _start_cursor(self, s: Any) -> int:
        """First run: start at the oldest still-pending ticket, so a new
        installation announces what is waiting now, not years of history."""
        first_pending = s.scalar(select(func.min(TicketEvent.id)).join(
            Ticket, Ticket.id == TicketEvent.ticket_id).where(Ticket.status == PENDING))
        if first_pending is not None:
            return int(first_pending) - 1
        return int(s.scalar(select(func.max(TicketEvent.id))) or 0)

    def pump(self, *, batch: int = 500) -> int:
        """Plan outbox rows for new ticket events; returns how many events were read."""
        # Look before taking the write lock: with SQLite it is the store's only one.
        with self.store.session() as s:
            cur = s.get(ChatCursor, CURSOR)
            newest = s.scalar(select(func.max(TicketEvent.id)))
            if cur is not None and (newest is None or newest <= cur.last_event_id):
                return 0
        with self.store.write() as s:
            cur = s.get(ChatCursor, CURSOR)
            if cur is None:
                cur = ChatCursor(name=CURSOR, last_event_id=self._start_cursor(s))
                s.add(cur)
            events = list(s.scalars(select(TicketEvent).where(TicketEvent.id > cur.last_event_id)
                                    .order_by(TicketEvent.id).limit(batch)))
            if not events:
                return 0
            ids = {e.ticket_id for e in events}
            tickets = {t.id: t for t in s.scalars(select(Ticket).where(Ticket.id.in_(ids)))}
            now = time.time()
            for ev in events:
                if ev.kind in OWN_EVENTS:
                    continue
                for platform, notifier in self.notifiers.items():
                    for p in notifier.plan(ev, tickets[ev.ticket_id]):
                        s.add(OutboxItem(platform=platform, ticket_id=ev.ticket_id, kind=p.kind,
                                         payload=p.payload, dedupe=p.dedupe, created_at=now,
                                         attempts=0, next_attempt_at=now))
            cur.last_event_id = events[-1].id
            return len(events)

    def schedule(self, *, now: float | None = None) -> int:
        """Add time-driven rows (reminders); each is added once (dedupe key)."""
        now = time.time() if now is None else now
        with self.store.session() as s:
            pending = list(s.scalars(select(Ticket).where(Ticket.status == PENDING)))
        added = 0
        for platform, notifier in self.notifiers.items():
            for ticket_id, p in notifier.scheduled(pending, now):
                if self.add(platform, ticket_id, p, now=now):
                    added += 1
        return added

    def add(self, platform: str, ticket_id: int, p: Planned, *, now: float | None = None
            ) -> bool:
        now = time.time() if now is None else now
        try:
            with self.store.write() as s:
                if p.dedupe and s.scalar(select(OutboxItem.id).where(
                        OutboxItem.platform == platform, OutboxItem.dedupe == p.dedupe)):
                    return False
                s.add(OutboxItem(platform=platform, ticket_id=ticket_id, kind=p.kind,
                                 payload=p.payload, dedupe=p.dedupe, created_at=now, attempts=0,
                                 next_attempt_at=now))
            return True
        except IntegrityError:
            return False

    # ---- delivery

    def due(self, *, now: float | None = None, limit: int = 2000) -> list[OutboxItem]:
        """The head row of each (platform, ticket) queue, if it is due."""
        now = time.time() if now is None else now
        with self.store.session() as s:
            rows = list(s.scalars(select(OutboxItem).where(OutboxItem.sent_at.is_(None))
                                  .order_by(OutboxItem.id).limit(limit)))
        heads: dict[tuple[str, int], OutboxItem] = {}
        for r in rows:
            heads.setdefault((r.platform, r.ticket_id), r)
        return [r for r in heads.values()
                if r.next_attempt_at <= now and self.paused_until.get(r.platform, 0) <= now
                and r.platform in self.notifiers]

    def backlog(self) -> int:
        with self.store.session() as s:
            return int(s.scalar(select(func.count()).select_from(OutboxItem)
                                .where(OutboxItem.sent_at.is_(None))) or 0)

    def _done(self, item: OutboxItem, note: str | None) -> None:
        with self.store.write() as s:
            s.execute(update(OutboxItem).where(OutboxItem.id == item.id).values(
                sent_at=time.time(), attempts=item.attempts + 1, last_error=note))

    def _failed(self, item: OutboxItem, exc: BaseException) -> float:
        attempts = item.attempts + 1
        after = exc.after if isinstance(exc, RetryLater) and exc.after is not None else \
            min(self.cap, self.base * 2 ** (attempts - 1)) * random.uniform(1.0, 1.2)
        now = time.time()
        if isinstance(exc, RetryLater) and exc.platform_wide:
            self.paused_until[item.platform] = now + after
        with self.store.write() as s:
            s.execute(update(OutboxItem).where(OutboxItem.id == item.id).values(
                attempts=attempts, next_attempt_at=now + after,
                last_error=f"{type(exc).__name__}: {exc}"[:2000]))
        return after

    async def deliver_due(self) -> int:
        """One pass over due rows; returns how many were delivered."""
        items = await asyncio.to_thread(self.due)
        sent = 0
        for item in items:
            if self.paused_until.get(item.platform, 0) > time.time():
                continue
            try:
                note = await self.notifiers[item.platform].deliver(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is retried, none is lost
                after = await asyncio.to_thread(self._failed, item, exc)
                log.warning("%s delivery %d (%s, ticket %d) failed, attempt %d; retry in %.1fs: "
                            "%s", item.platform, item.id, item.kind, item.ticket_id,
                            item.attempts + 1, after, exc)
                continue
            await asyncio.to_thread(self._done, item, note)
            sent += 1
        return sent

    async def run(self, *, interval: float = 0.5, wake: asyncio.Event | None = None) -> None:
        """Plan and deliver until cancelled. Store errors are logged and retried. A
        pass runs when ``wake`` is set (a ticket changed: the change feed says so) and
        at least every ``interval`` (retries, reminders, a feed that is down)."""
        while True:
            try:
                await asyncio.to_thread(self.pump)
                await asyncio.to_thread(self.schedule)
                await self.deliver_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox pass failed; retrying")
            if wake is None:
                await asyncio.sleep(interval)
                continue
            try:
                await asyncio.wait_for(wake.wait(), interval)
            except TimeoutError:
                pass
            wake.clear()
