"""Slack user <-> Keyturn user.

A Slack user is a Keyturn user when an explicit link says so, or when Slack
reports a CONFIRMED e-mail address (``users.info``; needs the
``users:read.email`` scope) equal to the user's e-mail in the config. The
other direction (mentions, DMs) uses the link or ``users.lookupByEmail``.
Lookups are cached briefly; a failed lookup is not cached.

It must not map a person from an unconfirmed address.
"""

from __future__ import annotations

import logging
import time

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bots.links import Links

log = logging.getLogger(__name__)
TTL = 300.0


class SlackPeople:
    def __init__(self, client: AsyncWebClient, links: Links):
        self.client = client
        self.links = links
        self._to_user: dict[str, tuple[float, str | None]] = {}
        self._to_slack: dict[str, tuple[float, str | None]] = {}

    async def keyturn_user(self, slack_id: str) -> str | None:
        linked = self.links.user_of("slack", slack_id)
        if linked:
            return linked
        hit = self._to_user.get(slack_id)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        try:
            resp = await self.client.users_info(user=slack_id)
        except SlackApiError as exc:
            log.warning("users.info %s failed: %s", slack_id, exc.response.get("error"))
            return None
        u = resp.get("user") or {}
        user = None
        if u.get("is_email_confirmed") and not u.get("deleted") and not u.get("is_bot"):
            user = self.links.user_by_email((u.get("profile") or {}).get("email"))
        self._to_user[slack_id] = (time.monotonic() + TTL, user)
        return user

    async def slack_id(self, user: str) -> str | None:
        linked = self.links.accounts_of("slack", user)
        if linked:
            return linked[-1].platform_user
        hit = self._to_slack.get(user)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        cfg_user = self.links.config.users.get(user)
        if cfg_user is None or not cfg_user.email:
            return None
        try:
            resp = await self.client.users_lookupByEmail(email=cfg_user.email)
        except SlackApiError as exc:
            if exc.response.get("error") == "users_not_found":
                self._to_slack[user] = (time.monotonic() + TTL, None)
                return None
            raise
        sid = (resp.get("user") or {}).get("id")
        self._to_slack[user] = (time.monotonic() + TTL, sid)
        return sid
