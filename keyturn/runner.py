"""Run long-lived surfaces in one process: gateway (asyncio on uvloop) and/or
the portal (a threaded WSGI server). SIGTERM and Ctrl-C stop accepting,
cancel holds cleanly and flush the audit queue before exit, so nothing is
lost.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable

from keyturn.audit import AuditWriter
from keyturn.config import Config
from keyturn.services import Services, build_services

log = logging.getLogger(__name__)


def start_portal(services: Services) -> tuple[threading.Thread, Callable[[], None]]:
    from werkzeug.serving import make_server

    from portal import create_app

    listen = services.config.portal.listen
    server = make_server(listen.host, listen.port, create_app(services), threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="portal", daemon=True)
    thread.start()
    log.info("portal and API on http://%s:%d", listen.host, server.port)
    return thread, server.shutdown


def run(config: Config, *, gateway: bool, portal: bool,
        ready: Callable[[Services], None] | None = None) -> int:
    writer_box: list[AuditWriter] = []
    services = build_services(config, audit_sink=lambda **rec: writer_box[0].record(**rec))
    writer = AuditWriter(services.audit, spill_path=None).start()
    writer_box.append(writer)
    stops: list[Callable[[], None]] = []
    try:
        if portal:
            _, stop = start_portal(services)
            stops.append(stop)
        if gateway:
            import uvloop

            from proxies.postgres.gateway import PostgresGateway

            async def main() -> None:
                gw = PostgresGateway(services, writer)
                await gw.start()
                stop_event = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop_event.set)
                if ready:
                    ready(services)
                await stop_event.wait()
                log.info("stopping: closing listeners and cancelling holds")
                await gw.stop()

            uvloop.run(main())
        else:
            stop_event = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop_event.set())
            if ready:
                ready(services)
            stop_event.wait()
    finally:
        for stop in stops:
            stop()
        writer.close()
        log.info("audit queue flushed (%d records written)", writer.written)
        services.store.dispose()
    return 0
