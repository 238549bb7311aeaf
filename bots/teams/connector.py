"""A small client for the Bot Framework connector REST API (v3): post and
update activities, open a 1:1 conversation, read conversation members.

Failures become ``RetryLater`` for the outbox; 429 carries Retry-After and
pauses all Teams deliveries.

It must not know tickets: it moves activities only.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from bots.outbox import RetryLater
from bots.teams.auth import ConnectorToken


class NotFoundOnTeams(Exception):
    pass


class Connector:
    def __init__(self, session: aiohttp.ClientSession, token: ConnectorToken):
        self.session = session
        self.token = token

    async def _call(self, method: str, url: str, body: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
        try:
            headers = {"Authorization": f"Bearer {await self.token.get()}"}
            async with self.session.request(method, url, json=body, headers=headers) as r:
                if r.status == 429:
                    after = float(r.headers.get("Retry-After", "1"))
                    raise RetryLater(f"Teams rate limit for {after}s", after=after,
                                     platform_wide=True)
                if r.status == 401:
                    self.token.forget()
                if r.status == 404:
                    raise NotFoundOnTeams(f"{method} {url}: 404")
                if r.status >= 400:
                    raise RetryLater(f"Teams answered {r.status}: {(await r.text())[:200]}")
                return await r.json(content_type=None) if r.content_length != 0 else {}
        except aiohttp.ClientResponseError as exc:
            raise RetryLater(f"Teams token endpoint: {exc.message}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RetryLater(f"Teams unreachable: {exc!r}") from exc

    async def post_activity(self, service_url: str, conversation: str,
                            activity: dict[str, Any]) -> str:
        out = await self._call("POST", f"{service_url}/v3/conversations/{conversation}/activities",
                               activity)
        return str(out.get("id", ""))

    async def reply_activity(self, service_url: str, conversation: str, activity_id: str,
                             activity: dict[str, Any]) -> str:
        """ReplyToActivity: a message in the thread under ``activity_id``."""
        out = await self._call("POST", f"{service_url}/v3/conversations/{conversation}/"
                                       f"activities/{activity_id}",
                               {**activity, "replyToId": activity_id})
        return str(out.get("id", ""))

    async def update_activity(self, service_url: str, conversation: str, activity_id: str,
                              activity: dict[str, Any]) -> None:
        await self._call("PUT", f"{service_url}/v3/conversations/{conversation}/activities/"
                                f"{activity_id}", {**activity, "id": activity_id})

    async def open_personal(self, service_url: str, bot_id: str, user_id: str,
                            tenant_id: str) -> str:
        out = await self._call("POST", f"{service_url}/v3/conversations", {
            "bot": {"id": f"28:{bot_id}"}, "members": [{"id": user_id}], "isGroup": False,
            "tenantId": tenant_id, "channelData": {"tenant": {"id": tenant_id}}})
        return str(out["id"])

    async def member(self, service_url: str, conversation: str, user_id: str
                     ) -> dict[str, Any] | None:
        try:
            return await self._call("GET", f"{service_url}/v3/conversations/{conversation}/"
                                           f"members/{user_id}")
        except NotFoundOnTeams:
            return None

    async def members(self, service_url: str, conversation: str) -> list[dict[str, Any]]:
        out = await self._call("GET", f"{service_url}/v3/conversations/{conversation}/members")
        return out if isinstance(out, list) else list(out.get("members", []))
