"""``POST /links/claim`` on the bots listener: a Keyturn user redeems a link
code they got in chat (``/keyturn link`` in Slack, "link" to the bot in a
Teams 1:1), authenticated with their own access token.

Both sides are proven: the code was shown only to the chat account's owner,
and the bearer token only to the Keyturn user. Every attempt is audited.

It must not link an account on one proof alone or trust a code shown to anyone else.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from bots.context import BotContext
from keyturn.errors import KeyturnError

log = logging.getLogger(__name__)


class ClaimEndpoint:
    def __init__(self, ctx: BotContext):
        self.ctx = ctx

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/links/claim", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            body = await request.json()
        except ValueError:
            body = None
        code = body.get("code") if isinstance(body, dict) else None
        if not isinstance(code, str) or not code.strip():
            return web.json_response({"error": "bad_request",
                                      "message": "send JSON {\"code\": \"XXXXX-XXXXX\"}"},
                                     status=400)
        user = None
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise KeyturnError("send Authorization: Bearer <access token>")
            ident = await asyncio.to_thread(self.ctx.services.identities.authenticate_token,
                                            token.strip())
            user = ident.user
            link = await asyncio.to_thread(self.ctx.links.claim, code, user)
        except KeyturnError as exc:
            self.ctx.services.record_audit(kind="chat", user=user, action="link-claim",
                                           outcome="unauthorized", reason=exc.message,
                                           client_addr=request.remote or "")
            return web.json_response({"error": "unauthorized", "message": exc.message},
                                     status=401)
        self.ctx.services.record_audit(
            kind="chat", user=user, action="link-claim", outcome="ok",
            client_addr=request.remote or "",
            detail={"platform": link.platform, "platform_user": link.platform_user})
        return web.json_response({"platform": link.platform,
                                  "platform_user": link.platform_user, "user": link.user})
