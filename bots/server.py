"""The bots process: one asyncio loop with an aiohttp server for inbound chat
requests (Slack HTTP mode at ``/slack/events``, Teams at ``/api/messages``),
Slack Socket Mode when configured, and the outbox loop.

Run by ``keyturn bots``; ``keyturn up`` / ``keyturn demo`` run it in a thread
when integrations are configured. It builds its own services (own store
engine, synchronous audit) so it never shares a session with the gateway.

It must not share a store session with another process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from bots.context import BotContext
from bots.links import Links
from bots.outbox import Notifier, Outbox
from bots.settings import CHAT, ChatSettings
from keyturn.config import Config
from keyturn.errors import ConfigError
from keyturn.feed import ChangeFeed
from keyturn.services import Services, build_services

log = logging.getLogger(__name__)


class BotsServer:
    def __init__(self, config: Config, services: Services | None = None, *,
                 retry_base: float = 1.0, retry_cap: float = 300.0):
        chat = CHAT.of(config)
        if chat is None:
            raise ConfigError(f"{config.path}: no integrations configured "
                              "(integrations.slack / integrations.teams)")
        self.config = config
        self.chat: ChatSettings = chat
        self.services = services or build_services(config)
        self.ctx = BotContext(self.services, Links(config, self.services.store), self.chat)
        self.retry = (retry_base, retry_cap)
        self.slack: Any = None
        self.teams: Any = None
        self.outbox: Outbox | None = None
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.feed: ChangeFeed | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/healthz", self._health)
        from bots.claim import ClaimEndpoint

        ClaimEndpoint(self.ctx).routes(app)
        notifiers: list[Notifier] = []
        if self.chat.slack is not None:
            from bots.slack.app import SlackBot

            self.slack = SlackBot(self.ctx, self.chat.slack)
            if self.chat.slack.mode == "http":
                self.slack.routes(app)
            notifiers.append(self.slack.notifier)
        if self.chat.teams is not None:
            from bots.teams.bot import TeamsBot

            self.teams = TeamsBot(self.ctx, self.chat.teams)
            self.teams.routes(app)
            notifiers.append(self.teams.notifier)
        self.outbox = Outbox(self.services.store, notifiers, base=self.retry[0],
                             cap=self.retry[1])
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.chat.listen.host, self.chat.listen.port)
        await site.start()
        server = getattr(site, "_server", None)
        self.port = server.sockets[0].getsockname()[1] if server else self.chat.listen.port
        log.info("bots listening on http://%s:%d (%s)", self.chat.listen.host, self.port,
                 ", ".join(n.platform for n in notifiers))
        if self.slack is not None and self.chat.slack and self.chat.slack.mode == "socket":
            self._tasks.append(asyncio.create_task(self._socket(), name="slack-socket"))
        # The outbox wakes as soon as a ticket changes (the store's change feed: an
        # in-process poke, LISTEN/NOTIFY with PostgreSQL, a 0.1 s read with SQLite), and
        # polls every poll_interval besides.
        wake = asyncio.Event()
        self.feed = ChangeFeed(self.services.store)
        self.services.approvals.observers.append(self.feed.poke)
        self.feed.start()
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._watch_feed, args=(loop, wake), daemon=True,
                         name="bots-feed").start()
        self._tasks.append(asyncio.create_task(
            self.outbox.run(interval=self.chat.poll_interval, wake=wake), name="outbox"))

    def _watch_feed(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
        feed = self.feed
        assert feed is not None
        gen = feed.gen
        while not feed.stopped:
            feed.wait(gen, 5)
            if feed.gen != gen:
                gen = feed.gen
                try:
                    loop.call_soon_threadsafe(wake.set)
                except RuntimeError:   # the loop closed: the server stopped
                    return

    async def _socket(self) -> None:
        # Socket Mode reconnects by itself once connected; retry the first connect.
        while True:
            try:
                await self.slack.start_socket()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Slack Socket Mode connection failed; retrying in 5s")
                await asyncio.sleep(5)

    async def _health(self, _request: web.Request) -> web.Response:
        backlog = await asyncio.to_thread(self.outbox.backlog) if self.outbox else 0
        return web.json_response({"ok": True, "outbox_backlog": backlog})

    async def stop(self) -> None:
        if self.feed is not None:
            await asyncio.to_thread(self.feed.stop)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.slack is not None:
            await self.slack.stop()
        if self.teams is not None:
            await self.teams.stop()
        if self.runner is not None:
            await self.runner.cleanup()


async def serve(config: Config, stop: asyncio.Event, *, services: Services | None = None,
                ready: Callable[[BotsServer], None] | None = None) -> None:
    server = BotsServer(config, services)
    await server.start()
    if ready:
        ready(server)
    try:
        await stop.wait()
    finally:
        await server.stop()


def start_in_thread(config: Config) -> Callable[[], None]:
    """Run the bots on their own loop in a daemon thread; returns a stop function."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()
    failure: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)

        async def go() -> None:
            try:
                await serve(config, stop, ready=lambda _s: started.set())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                raise

        try:
            loop.run_until_complete(go())
        except Exception:
            log.exception("bots stopped with an error")
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="bots", daemon=True)
    thread.start()
    started.wait(60)
    if failure:
        raise failure[0]

    def stop_fn() -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(15)

    return stop_fn
