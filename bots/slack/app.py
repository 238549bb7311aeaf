"""The Slack app: a Bolt ``AsyncApp`` with Keyturn's listeners, served over
HTTP (Events API / interactivity, behind our own signature check so forged
requests are audited) or Socket Mode.

The Web API base URL is configurable (``integrations.slack.api_base_url``) so
the app can run against a stand-in in tests.

It must not answer a request whose signature does not verify.
"""

from __future__ import annotations

import hmac
import logging
import time

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from bots.context import BotContext
from bots.settings import SlackSettings
from bots.slack.listeners import register_all
from bots.slack.listeners.deps import SlackDeps
from bots.slack.notifier import SlackNotifier
from bots.slack.people import SlackPeople

log = logging.getLogger(__name__)
# Slack's own rule: a request older than five minutes is a replay.
MAX_AGE = 300


class SlackBot:
    def __init__(self, ctx: BotContext, settings: SlackSettings):
        self.ctx = ctx
        self.settings = settings
        token = settings.bot_token.resolve()
        self.client = AsyncWebClient(
            token=token, timeout=10,
            base_url=settings.api_base_url or AsyncWebClient.BASE_URL)
        self.people = SlackPeople(self.client, ctx.links)
        self.signing_secret = settings.signing_secret.resolve() if settings.signing_secret \
            else None
        self.app = AsyncApp(
            client=self.client, token=token, signing_secret=self.signing_secret,
            request_verification_enabled=settings.mode == "http",
            # Ack is sent as soon as a listener calls ack(); the vote runs after it.
            process_before_response=False)
        self.deps = SlackDeps(ctx, settings, self.client, self.people)
        register_all(self.app, self.deps)
        self.notifier = SlackNotifier(ctx, settings, self.client, self.people)
        self.socket: AsyncSocketModeHandler | None = None

    # ---- HTTP mode

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/slack/events", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        problem = self.check_signature(body, request.headers.get("X-Slack-Request-Timestamp"),
                                       request.headers.get("X-Slack-Signature"))
        if problem:
            log.warning("refused a Slack request from %s: %s", request.remote, problem)
            self.ctx.services.record_audit(
                kind="chat", action="slack-request", outcome="unauthorized", reason=problem,
                client_addr=request.remote or "", detail={"platform": "slack",
                                                          "path": request.path})
            return web.json_response({"error": "unauthorized", "message": problem}, status=401)
        bolt_req = await to_bolt_request(request)
        return await to_aiohttp_response(await self.app.async_dispatch(bolt_req))

    def check_signature(self, body: bytes, timestamp: str | None, signature: str | None
                        ) -> str | None:
        if self.signing_secret is None:
            return "this app has no signing secret (HTTP mode is off)"
        if not timestamp or not signature:
            return "missing X-Slack-Request-Timestamp or X-Slack-Signature"
        try:
            age = abs(time.time() - int(timestamp))
        except ValueError:
            return "malformed timestamp"
        if age > MAX_AGE:
            return f"timestamp is {int(age)}s old (replay?)"
        expected = SignatureVerifier(self.signing_secret).generate_signature(
            timestamp=timestamp, body=body)
        if expected is None or not hmac.compare_digest(expected, signature):
            return "bad signature"
        return None

    # ---- Socket Mode

    async def start_socket(self) -> None:
        if self.settings.app_token is None:
            return
        self.socket = AsyncSocketModeHandler(self.app, self.settings.app_token.resolve())
        await self.socket.connect_async()
        log.info("Slack Socket Mode connected")

    async def stop(self) -> None:
        if self.socket is not None:
            await self.socket.close_async()
