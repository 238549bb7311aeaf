"""The ticket change feed: what changed on which ticket, for surfaces that show it live.

Every change to a ticket (created, a vote, decided, executed, expired, a chat
"notified" note) writes a ``ticket_events`` row in the transaction that makes it, so
those rows are the store's change log. ``ChangeFeed`` tails them with ONE reader
thread per process and fans each new batch out to any number of waiting clients
(the portal's Server-Sent Events streams), so a hundred open pages cost one query,
not a hundred.

How the reader learns that there is something to read:

* in this process, ``Approvals.observers`` pokes it right after commit;
* with PostgreSQL it LISTENs on ``keyturn_tickets`` (status changes, the decision
  bus's channel) and ``keyturn_ticket_events`` (votes and notes), with a slow poll as
  a backstop while the LISTEN connection reconnects;
* with SQLite there is no push across processes (a portal started with
  ``keyturn portal`` beside ``keyturn gateway``), so it polls: one indexed range read
  (``id > last``) every ``interval`` (0.1 s), which is cheap enough to keep a held
  ticket's way to an open page well under a second.

PostgreSQL hands out ids before commit, so a transaction may commit a smaller id
after a larger one is read; the reader re-reads a window of recent ids and skips
those it already published. Clients therefore follow the feed's own counter
(``Change.gen``), not event ids.

This module must not know about the web: it publishes (ticket, kind, requester)
and leaves rendering and authorisation to the surface.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import deque
from dataclasses import dataclass

from sqlalchemy import select

from keyturn.models import Ticket, TicketEvent
from keyturn.store import Store

log = logging.getLogger(__name__)

#: PostgreSQL channels whose notifications mean "read the feed now".
CHANNELS = ("keyturn_tickets", "keyturn_ticket_events")
#: Changes kept for clients that are a little behind; one further behind refreshes all.
KEEP = 2000
#: Ids re-read with PostgreSQL (commits out of id order); SQLite commits in order.
PG_WINDOW = 200


@dataclass(frozen=True)
class Change:
    gen: int
    ticket_id: int
    kind: str
    requester: str


class ChangeFeed:
    def __init__(self, store: Store, *, interval: float | None = None):
        self.store = store
        # With LISTEN the poll is only a backstop for a reconnecting listener.
        self.interval = interval or (0.1 if store.is_sqlite else 1.0)
        #: Changes this process published, newest last; ``gen`` counts them.
        self.recent: deque[Change] = deque(maxlen=KEEP)
        self.gen = 0
        # Tokens name a position in THIS process's feed: a client that reconnects to
        # another process (or after a restart) sees a foreign token and refreshes once.
        self.boot = secrets.token_hex(4)
        self._cond = threading.Condition()
        self._poke = threading.Event()
        self._stopping = threading.Event()
        self._last_id = 0
        self._seen: deque[int] = deque(maxlen=4 * PG_WINDOW)
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()

    # ---- lifecycle

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stopping.is_set()

    def start(self) -> None:
        """Start the reader (idempotent; surfaces call it on first use)."""
        with self._start_lock:
            if self._threads or self._stopping.is_set():
                return
            with self.store.session() as s:
                self._last_id = int(s.scalar(select(TicketEvent.id).order_by(
                    TicketEvent.id.desc()).limit(1)) or 0)
            self._threads.append(threading.Thread(target=self._read_loop, daemon=True,
                                                  name="ticket-feed"))
            if not self.store.is_sqlite:
                self._threads.append(threading.Thread(target=self._listen_loop, daemon=True,
                                                      name="ticket-feed-listen"))
            for t in self._threads:
                t.start()

    def stop(self) -> None:
        """Stop reading and wake every waiting client so its stream can end."""
        self._stopping.set()
        self._poke.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(5)

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    def poke(self, _ticket_id: int = 0, _kind: str = "") -> None:
        """Something was just committed in this process: read now (an observer of
        ``Approvals``; it only sets an event, so it never slows or breaks a write)."""
        self._poke.set()

    # ---- clients

    def token(self, gen: int | None = None) -> str:
        return f"{self.boot}.{self.gen if gen is None else gen}"

    def position(self, token: str | None) -> int | None:
        """The ``gen`` a client's token names, or None when it is not this feed's."""
        boot, _, gen = (token or "").partition(".")
        if boot != self.boot or not gen.isdigit() or int(gen) > self.gen:
            return None
        return int(gen)

    def wait(self, after: int, timeout: float) -> list[Change] | None:
        """Changes published after ``after``: [] when the wait timed out (or the feed
        stopped), None when the client is too far behind to be told which (it should
        refresh everything)."""
        with self._cond:
            self._cond.wait_for(lambda: self.gen > after or self._stopping.is_set(), timeout)
            if self.gen <= after:
                return []
            if not self.recent or self.recent[0].gen > after + 1:
                return None
            return [c for c in self.recent if c.gen > after]

    # ---- reading

    def read(self) -> int:
        """Publish what was committed since the last read; the number of changes."""
        start = self._last_id if self.store.is_sqlite else max(self._last_id - PG_WINDOW, 0)
        with self.store.session() as s:
            rows = list(s.execute(
                select(TicketEvent.id, TicketEvent.ticket_id, TicketEvent.kind,
                       Ticket.requester)
                .join(Ticket, Ticket.id == TicketEvent.ticket_id)
                .where(TicketEvent.id > start).order_by(TicketEvent.id).limit(1000)))
        seen = set(self._seen)
        fresh = [r for r in rows if r[0] not in seen]
        if not fresh:
            return 0
        with self._cond:
            for event_id, ticket_id, kind, requester in fresh:
                self.gen += 1
                self.recent.append(Change(self.gen, ticket_id, kind, requester))
                self._seen.append(event_id)
                self._last_id = max(self._last_id, event_id)
            self._cond.notify_all()
        return len(fresh)

    def _read_loop(self) -> None:
        while not self._stopping.is_set():
            self._poke.wait(self.interval)
            self._poke.clear()
            if self._stopping.is_set():
                return
            try:
                self.read()
            except Exception:
                log.exception("reading the ticket change feed failed")
                self._stopping.wait(1)

    def _listen_loop(self) -> None:
        import psycopg

        dsn = self.store.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        while not self._stopping.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    for channel in CHANNELS:
                        conn.execute(f"LISTEN {channel}")
                    self._poke.set()  # whatever happened while (re)connecting
                    while not self._stopping.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self._poke.set()
            except Exception:
                if self._stopping.is_set():
                    return
                log.exception("ticket feed LISTEN connection failed; reconnecting")
                self._stopping.wait(1)
