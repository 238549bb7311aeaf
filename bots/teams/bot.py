"""The Teams messaging endpoint (``POST /api/messages``).

Every activity's JWT is validated before anything else; a bad one gets 401
and an audit record. ``adaptiveCard/action`` invokes (Action.Execute) carry
the verb: ``approve`` (with an optional ``comment``, and ``seen``: the digest of the
text its card showed), ``review`` (the whole statement), ``reject`` (with the
``reason`` input) or ``refresh``. An approval whose card could not show the whole
statement, or showed another text, is answered with the review card, not counted.
The answer is the card in the ticket's current state, or, for a refusal, a
message only the clicker sees. Votes go through ``keyturn.approvals``.

It must not vote outside ``keyturn.approvals`` nor trust an unauthenticated activity.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from bots.context import BotContext
from bots.settings import TeamsSettings
from bots.teams.auth import AuthError, ConnectorToken, InboundAuth
from bots.teams.cards import CARD_TYPE, review_card, ticket_card
from bots.teams.connector import Connector
from bots.teams.notifier import TeamsNotifier
from bots.teams.people import TeamsPeople
from keyturn.errors import NotFound

log = logging.getLogger(__name__)
MESSAGE_TYPE = "application/vnd.microsoft.activity.message"


def _message(text: str) -> dict[str, Any]:
    return {"statusCode": 200, "type": MESSAGE_TYPE, "value": text}


def _card(card: dict[str, Any]) -> dict[str, Any]:
    return {"statusCode": 200, "type": CARD_TYPE, "value": card}


class TeamsBot:
    def __init__(self, ctx: BotContext, settings: TeamsSettings):
        self.ctx = ctx
        self.settings = settings
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self.inbound = InboundAuth(settings, self.session)
        self.connector = Connector(self.session, ConnectorToken(settings, self.session))
        self.people = TeamsPeople(settings, self.connector, ctx.links)
        self.notifier = TeamsNotifier(ctx, settings, self.connector, self.people)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/messages", self.handle)

    async def stop(self) -> None:
        await self.session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            activity = json.loads(raw or b"{}")
            if not isinstance(activity, dict):
                raise ValueError("not an object")
        except ValueError:
            activity = {}
        try:
            await self.inbound.validate(request.headers.get("Authorization"),
                                        activity.get("serviceUrl"))
        except AuthError as exc:
            log.warning("refused a Teams request from %s: %s", request.remote, exc)
            self.ctx.services.record_audit(
                kind="chat", action="teams-request", outcome="unauthorized", reason=str(exc),
                client_addr=request.remote or "", detail={"platform": "teams",
                                                          "path": request.path})
            return web.json_response({"error": "unauthorized", "message": str(exc)},
                                     status=401)
        log.debug("Teams %s activity from serviceUrl %s in conversation %s", activity.get("type"),
                  activity.get("serviceUrl"), (activity.get("conversation") or {}).get("id"))
        if not activity.get("type"):
            return web.json_response({"error": "bad_request",
                                      "message": "the body is not an activity"}, status=400)
        if activity["type"] == "invoke" and activity.get("name") == "adaptiveCard/action":
            return web.json_response(await self.on_action(activity))
        if activity["type"] in ("message", "conversationUpdate"):
            await self.people.keyturn_user(activity)   # learns a linked person's address
        if activity["type"] == "message" and (activity.get("text") or "").strip().lower() \
                == "link":
            await self.on_link(activity)
        return web.Response(status=200)

    async def on_link(self, activity: dict[str, Any]) -> None:
        """A link code, answered only in a 1:1 chat: in a channel others would see it."""
        conv = activity.get("conversation") or {}
        service_url = (activity.get("serviceUrl") or self.settings.service_url).rstrip("/")
        sender = activity.get("from") or {}
        if conv.get("conversationType", "personal") != "personal":
            text = "Send me `link` in a 1:1 chat, not in a channel."
        elif not sender.get("aadObjectId"):
            text = "Teams did not say who you are (no AAD object id); ask an operator."
        else:
            code = await asyncio.to_thread(
                self.ctx.links.start_claim, "teams", sender["aadObjectId"],
                address={"id": sender.get("id"), "service_url": service_url,
                         "tenant_id": conv.get("tenantId") or self.settings.tenant_id})
            text = (f"To link this Teams account to your Keyturn user, within 10 minutes enter "
                    f"the code {code} on the portal's Chat accounts page "
                    f"({self.ctx.portal_url.rstrip('/')}/chat-accounts), or run, with your "
                    f"access token in KEYTURN_TOKEN: keyturn bots claim {code}")
        try:
            await self.connector.post_activity(service_url, conv["id"], {
                "type": "message", "text": text, "replyToId": activity.get("id")})
        except Exception:
            log.exception("could not answer a Teams link request")

    async def on_action(self, activity: dict[str, Any]) -> dict[str, Any]:
        action = (activity.get("value") or {}).get("action") or {}
        verb = action.get("verb")
        data = action.get("data") or {}
        try:
            ticket = int(str(data.get("ticket")))
        except (TypeError, ValueError):
            return {"statusCode": 400, "type": "application/vnd.microsoft.error",
                    "value": {"code": "BadRequest", "message": "no ticket in the action"}}
        try:
            view = await asyncio.to_thread(self.notifier.view, ticket)
        except NotFound:
            return _message(f"There is no ticket #{ticket}.")
        if verb == "refresh":
            return _card(ticket_card(view))
        if verb not in ("approve", "reject", "review"):
            return _message(f"Unknown action {verb!r}.")
        sender = activity.get("from") or {}
        platform_user = sender.get("aadObjectId") or sender.get("id") or "?"
        user = await self.people.keyturn_user(activity)
        if verb == "review" or (verb == "approve" and (view.truncated or "seen" in data)
                                and data.get("seen") != view.digest):
            refusal = await self.ctx.precheck_async(
                platform="teams", platform_user=platform_user, user=user, ticket_id=ticket,
                action="approve")
            return _message(refusal) if refusal else _card(review_card(view))
        if verb == "reject":
            comment = (data.get("reason") or "").strip() or None
            if comment is None:
                return _message("A rejection needs a reason.")
        else:
            comment = (data.get("comment") or "").strip() or None
        out = await self.ctx.avote(platform="teams", platform_user=platform_user, user=user,
                                   ticket_id=ticket, vote=verb, comment=comment)
        if not out.ok:
            return _message(out.message)
        return await self._view_card(ticket)

    async def _view_card(self, ticket: int) -> dict[str, Any]:
        view = await asyncio.to_thread(self.notifier.view, ticket)
        return _card(ticket_card(view))
