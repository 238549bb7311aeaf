"""Gateway liveness: each gateway process has an identity and a heartbeat in the
store, and a sweeper ends the tickets that nobody can run any more.

A held statement lives in one gateway process: the client's connection is there.
If that process dies (kill -9, a crash, a lost host), its pending tickets could
be approved but would never run. So every gateway run registers an *instance*
(``GatewayInstance``: its own id, distinct from the configured ``gateway_id``
that every run shares) and beats every ``interval`` seconds. An instance whose
beat is ``approvals.DEAD_AFTER_BEATS`` of its own intervals old, or that stopped, is
dead; the ``Sweeper``, run by every gateway and portal process, abandons the
tickets it held and expires every due ticket, whichever process holds it.

Several sweepers may run at once: every change goes through
``Approvals.finish``, a conditional update, so each ticket moves once.
Times are epoch seconds from each host's clock: hosts must agree to within a
fraction of ``DEAD_AFTER_BEATS * interval`` (NTP does).

This module must not import protocol or web code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid

from sqlalchemy import delete, exists, select, update

from keyturn.approvals import APPROVED, PENDING, Approvals
from keyturn.models import GatewayInstance, Ticket
from keyturn.store import Store

log = logging.getLogger(__name__)

# Seconds between heartbeats (environment KEYTURN_HEARTBEAT_INTERVAL): a dead gateway's
# tickets are abandoned DEAD_AFTER_BEATS intervals (15 s) after its last beat, at most one
# sweep later.
HEARTBEAT_INTERVAL = 5.0
# Seconds between sweeps (environment KEYTURN_SWEEP_INTERVAL): expiry and abandonment.
SWEEP_INTERVAL = 1.0
# Rows of instances dead this long that hold no open ticket are deleted.
FORGET_AFTER = 7 * 86400.0


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r}: must be positive")
    return value


def heartbeat_interval() -> float:
    return _env_seconds("KEYTURN_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL)


def sweep_interval() -> float:
    return _env_seconds("KEYTURN_SWEEP_INTERVAL", SWEEP_INTERVAL)


class Instance:
    """This gateway process's row in ``gateway_instances``."""

    def __init__(self, store: Store, gateway_id: str, *, interval: float | None = None):
        self.store = store
        self.gateway_id = gateway_id
        self.interval = heartbeat_interval() if interval is None else interval
        self.id = uuid.uuid4().hex
        self._failing = False

    def register(self, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.store.write() as s:
            s.add(GatewayInstance(id=self.id, gateway_id=self.gateway_id,
                                  host=socket.gethostname()[:255], pid=os.getpid(),
                                  started_at=now, beat_at=now, beat_interval=self.interval))
        log.info("gateway instance %s (%s) registered; heartbeat every %.3g s",
                 self.id, self.gateway_id, self.interval)

    def beat(self, *, now: float | None = None) -> None:
        """Record that this instance is alive. Store errors are logged once per outage;
        beats missed for ``DEAD_AFTER_BEATS`` intervals abandon this instance's
        tickets (their waiters then get an error, failing closed)."""
        try:
            self._set(beat_at=time.time() if now is None else now)
        except Exception:
            if not self._failing:
                log.exception("gateway heartbeat failed; retrying every %.3g s", self.interval)
            self._failing = True
            return
        if self._failing:
            log.warning("gateway heartbeat recorded again")
        self._failing = False

    def stopped(self, *, now: float | None = None) -> None:
        """A clean stop: the instance is dead at once, so sweepers need not wait."""
        try:
            self._set(stopped_at=time.time() if now is None else now)
        except Exception:
            log.exception("cannot mark gateway instance %s stopped; it is taken for dead "
                          "once its heartbeat is old", self.id)

    def _set(self, **values: float) -> None:
        with self.store.write() as s:
            s.execute(update(GatewayInstance).where(GatewayInstance.id == self.id)
                      .values(**values))

    async def run(self) -> None:
        """Beat until cancelled (the gateway's event loop: a blocked loop stops beating,
        and a gateway that cannot run its sessions should not look alive)."""
        while True:
            await asyncio.sleep(self.interval)
            await asyncio.to_thread(self.beat)


class Sweeper:
    """Expire due tickets, escalate those whose time has come, and abandon dead
    instances' tickets, for every ticket."""

    def __init__(self, approvals: Approvals, *, interval: float | None = None):
        self.approvals = approvals
        self.interval = sweep_interval() if interval is None else interval
        self._failing = False

    def sweep(self, *, now: float | None = None) -> list[tuple[int, str]]:
        """One pass; returns the tickets it moved (id, new status)."""
        now = time.time() if now is None else now
        try:
            moved = [(tid, "expired") for tid in self.approvals.expire_due(now=now)]
            moved += self.approvals.abandon_orphans(now=now)
            self.approvals.escalate_due(now=now)
            self._forget_dead_instances(now)
        except Exception:
            if not self._failing:
                log.exception("ticket sweep failed; retrying every %.3g s", self.interval)
            self._failing = True
            return []
        if self._failing:
            log.warning("ticket sweep works again")
        self._failing = False
        # Waiters in a live gateway hear of the change through the bus, as for any decision.
        for tid, status in moved:
            if status != "expired":
                log.info("ticket %d %s: its gateway instance is gone", tid, status)
        return moved

    def _forget_dead_instances(self, now: float) -> None:
        holds = exists().where(Ticket.instance_id == GatewayInstance.id,
                               Ticket.status.in_((PENDING, APPROVED)))
        with self.approvals.store.session() as s:
            old = list(s.scalars(select(GatewayInstance.id).where(
                GatewayInstance.beat_at < now - FORGET_AFTER, ~holds)))
        if old:
            with self.approvals.store.write() as s:
                s.execute(delete(GatewayInstance).where(GatewayInstance.id.in_(old)))

    async def run(self) -> None:
        """Sweep until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            await asyncio.to_thread(self.sweep)

    def run_until(self, stop: threading.Event) -> None:
        """Sweep in this thread until ``stop`` is set (processes without an event loop)."""
        while not stop.wait(self.interval):
            self.sweep()

