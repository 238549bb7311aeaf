"""The decision bus: a decision made in any process releases the hold here.

With a PostgreSQL store, decisions are announced with NOTIFY in the same
transaction that records them (``Approvals._announce``) and the gateway
LISTENs; a slow poll backs it up in case a notification is missed while
reconnecting. With SQLite there is no push channel, so the gateway polls the
statuses of the tickets it holds (only those, and only while it holds any).

The watcher also expires due tickets, so a hold never outlives its timeout
even if no other process is running.

It must not decide tickets: it only carries decisions and expiries to the holds.
"""

from __future__ import annotations

import asyncio
import logging

from keyturn.approvals import PENDING, Approvals
from keyturn.store import Store

log = logging.getLogger(__name__)


class DecisionWatcher:
    def __init__(self, approvals: Approvals, store: Store, *, poll_interval: float | None = None,
                 expiry_interval: float = 1.0):
        self.approvals = approvals
        self.store = store
        self.poll_interval = poll_interval or (0.05 if store.is_sqlite else 2.0)
        self.expiry_interval = expiry_interval
        self._waiters: dict[int, list[asyncio.Future[str]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()

    def wait(self, ticket_id: int) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(ticket_id, []).append(fut)
        self._wake.set()
        return fut

    def forget(self, ticket_id: int, fut: asyncio.Future[str]) -> None:
        futs = self._waiters.get(ticket_id)
        if futs and fut in futs:
            futs.remove(fut)
            if not futs:
                del self._waiters[ticket_id]

    def resolve(self, ticket_id: int, status: str) -> None:
        if status == PENDING:
            return
        for fut in self._waiters.pop(ticket_id, []):
            if not fut.done():
                fut.set_result(status)

    def hear_local_decisions(self, loop: asyncio.AbstractEventLoop) -> None:
        """Decisions taken in this process (expiry, cancel) resolve waits at once, from
        whichever thread takes them; the watchers of other gateways in the process keep
        hearing them too."""
        earlier = self.approvals.on_change

        def on_change(ticket_id: int, status: str) -> None:
            earlier(ticket_id, status)
            loop.call_soon_threadsafe(self.resolve, ticket_id, status)

        self.approvals.on_change = on_change

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="bus-poll"))
        self._tasks.append(asyncio.create_task(self._expiry_loop(), name="bus-expiry"))
        if not self.store.is_sqlite:
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="bus-listen"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _poll_loop(self) -> None:
        while True:
            if not self._waiters:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=5)
                except TimeoutError:
                    continue
            ids = list(self._waiters)
            try:
                statuses = await asyncio.to_thread(self.approvals.statuses, ids)
            except Exception:
                log.exception("polling ticket statuses failed")
                await asyncio.sleep(1)
                continue
            for tid, status in statuses.items():
                self.resolve(tid, status)
            await asyncio.sleep(self.poll_interval)

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.expiry_interval)
            if not self._waiters:
                continue
            try:
                for tid in await asyncio.to_thread(self.approvals.expire_due):
                    self.resolve(tid, "expired")
            except Exception:
                log.exception("expiring tickets failed")

    async def _listen_loop(self) -> None:
        import psycopg

        dsn = self.store.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    await conn.execute("LISTEN keyturn_tickets")
                    log.info("listening for decisions on keyturn_tickets")
                    # Anything decided while we were (re)connecting is caught by this poll.
                    statuses = await asyncio.to_thread(self.approvals.statuses,
                                                       list(self._waiters))
                    for tid, status in statuses.items():
                        self.resolve(tid, status)
                    async for note in conn.notifies():
                        ticket, _, status = note.payload.partition(":")
                        if ticket.isdigit():
                            self.resolve(int(ticket), status)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("decision LISTEN connection failed; reconnecting")
                await asyncio.sleep(1)

