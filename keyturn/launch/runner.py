"""Run long-lived surfaces in one process: gateway (asyncio on uvloop) and/or
the portal (a threaded WSGI server).

A gateway process records audit events to its local spool and starts a
lower-priority child, ``keyturn audit ingest --follow``, that moves them into
the store (see auditspool.py). SIGTERM and Ctrl-C stop accepting, cancel
holds cleanly, close the spool and let the ingester drain it before exit, so
nothing is lost; anything the ingester cannot finish stays in the spool and
is ingested at the next start.

Which gateways a process starts comes from the registry: every registered connection
type with a gateway class, a listener and connections in the config
(keyturn.launch.installed.gateways), several protocols side by side on one event loop.

Part of the launcher: it is where the gateways (proxies/), the portal and the bots are
put together with the core's services. It must not be imported by the core or by an
edge, and it must not decide anything about requests: it only starts, watches and
stops what does.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from bots.settings import CHAT
from keyturn.auditspool import PARENT_ENV, AuditSpool
from keyturn.config import Config
from keyturn.launch.installed import gateways
from keyturn.liveness import Instance, Sweeper
from keyturn.services import Services, build_services

log = logging.getLogger(__name__)
INGEST_DRAIN_TIMEOUT = 600


def start_portal(services: Services) -> tuple[threading.Thread, Callable[[], None]]:
    from werkzeug.serving import make_server

    from portal import create_app
    from portal.settings import PORTAL

    listen = PORTAL.of(services.config).listen
    app = create_app(services)
    server = make_server(listen.host, listen.port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="portal", daemon=True)
    thread.start()
    log.info("portal and API on http://%s:%d", listen.host, server.port)

    def stop() -> None:
        # Ends the live pages' streams first: each holds a server thread until it does.
        app.extensions["keyturn_live"].feed.stop()
        server.shutdown()

    return thread, stop


def _ingester_child_setup() -> None:
    # Lower priority: under load the gateway's own work comes first; the spool
    # absorbs the difference and the ingester catches up when load drops.
    os.nice(10)
    # If the gateway dies without stopping us, drain and exit instead of lingering.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    # A gateway that died before the request above took effect sends nothing: the
    # ingester notices the new parent itself (AuditIngester.orphaned).


class Ingester:
    """The ``keyturn audit ingest --follow`` child, restarted if it dies."""

    def __init__(self, config: Config):
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keyturn.launch", "-c", self.config.path, "audit", "ingest",
             "--follow"],
            preexec_fn=_ingester_child_setup, env={**os.environ, PARENT_ENV: str(os.getpid())})

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None and not self.stopping:
            log.error("audit ingester exited with %s; restarting it", self.proc.returncode)
            self.start()

    def stop(self) -> None:
        self.stopping = True
        if self.proc is None or self.proc.poll() is not None:
            return
        log.info("waiting for the audit ingester to drain the spool")
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(INGEST_DRAIN_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("audit ingester did not finish in %ss; the rest of the spool is kept "
                      "in %s and ingested at the next start", INGEST_DRAIN_TIMEOUT,
                      self.config.gateway.audit_spool)
            self.proc.kill()


def run(config: Config, *, gateway: bool, portal: bool,
        ready: Callable[[Services], None] | None = None, bots: bool | None = None) -> int:
    """``gateway``: start every registered gateway that has connections in ``config``.
    ``bots``: run the Slack / Teams bots too; None = when integrations are configured."""
    spool = None
    plans = gateways(config) if gateway else []
    classes = [plan.load() for plan in plans]
    if gateway:
        if not plans:
            log.warning("no connection in %s has a gateway to start", config.path)
        # A gateway may bring the spool's line buffer: PostgreSQL's compiled one lets its
        # fast path append audit lines in C.
        buffer = next((b for cls in classes
                       if (b := getattr(cls, "audit_buffer", None)) is not None), None)
        spool = AuditSpool(config.gateway.audit_spool, config.gateway.gateway_id,
                           buffer=buffer)
    services = build_services(config, audit_sink=spool.record if spool else None)
    ingester = Ingester(config) if spool else None
    if ingester:
        ingester.start()
    # Every gateway and portal process sweeps: tickets expire, and those of dead gateway
    # instances are abandoned, whichever process holds them and whether any does.
    sweeper = Sweeper(services.approvals)
    instance = None
    if gateway:
        instance = Instance(services.store, config.gateway.gateway_id)
        instance.register()
        services.approvals.instance_id = instance.id  # stamped on the tickets it holds
    stops: list[Callable[[], None]] = []
    try:
        if portal:
            _, stop = start_portal(services)
            stops.append(stop)
        if CHAT.of(config) is not None and bots is not False:
            from bots.server import start_in_thread

            stops.append(start_in_thread(config))
        if gateway:
            import uvloop

            async def main() -> None:
                assert spool is not None  # a gateway process always has its spool
                started = []
                for plan, cls in zip(plans, classes, strict=True):
                    gw = cls(services, spool)
                    await gw.start()
                    started.append(gw)
                    log.info("%s gateway started for %s", plan.ctype.name,
                             ", ".join(plan.connections))
                # Everything loaded so far lives as long as the process: keep it out of
                # the cyclic collector's full passes, which the relay would pay for.
                gc.collect()
                gc.freeze()
                assert instance is not None
                # Kept: a task nobody references may be collected mid-run.
                background = [asyncio.create_task(instance.run(), name="heartbeat"),
                              asyncio.create_task(sweeper.run(), name="ticket-sweeper")]
                stop_event = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop_event.set)
                if ready:
                    ready(services)
                while not stop_event.is_set():
                    try:
                        await asyncio.wait_for(stop_event.wait(), 2)
                    except TimeoutError:
                        if ingester:
                            ingester.check()
                log.info("stopping: closing listeners and cancelling holds")
                for gw in reversed(started):
                    await gw.stop()
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                # Dead at once: what it still held (approved, never claimed) is abandoned
                # now rather than after the heartbeat bound.
                await asyncio.to_thread(instance.stopped)
                await asyncio.to_thread(sweeper.sweep)

            uvloop.run(main())
        else:
            sweeping = threading.Event()
            sweep_thread = threading.Thread(target=sweeper.run_until, args=(sweeping,),
                                            name="ticket-sweeper", daemon=True)
            sweep_thread.start()

            def stop_sweeping() -> None:
                sweeping.set()
                sweep_thread.join(10)

            stops.append(stop_sweeping)
            # The handlers only record the signal: one that set an Event would take its
            # lock, which the main thread may hold at that moment (inside wait()).
            received: list[int] = []
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda signum, _frame: received.append(signum))
            if ready:
                ready(services)
            while not received:
                time.sleep(0.2)
    finally:
        for stop in stops:
            stop()
        if spool:
            spool.close()  # never raises; a record it could not write is logged
            log.info("audit spool closed (%d records this run)", spool.records)
        if ingester:
            ingester.stop()
        services.store.dispose()
    return 0
