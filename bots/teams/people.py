"""Teams user <-> Keyturn user.

A Teams user is a Keyturn user when an explicit link names their AAD object
id, or when the connector reports their e-mail / UPN (conversation member
lookup, which Teams answers only for members of that tenant's conversation)
equal to the user's e-mail in the config. To reach a requester proactively we
need their Teams account id: from a remembered address, else from the
approvers' conversation roster.

It must not map a person from an address Teams did not report.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bots.links import Links
from bots.outbox import RetryLater
from bots.settings import TeamsSettings
from bots.teams.connector import Connector

log = logging.getLogger(__name__)


class TeamsPeople:
    def __init__(self, settings: TeamsSettings, connector: Connector, links: Links):
        self.settings = settings
        self.connector = connector
        self.links = links

    async def keyturn_user(self, activity: dict[str, Any]) -> str | None:
        sender = activity.get("from") or {}
        aad = sender.get("aadObjectId")
        service_url = (activity.get("serviceUrl") or self.settings.service_url).rstrip("/")
        tenant = ((activity.get("conversation") or {}).get("tenantId")
                  or ((activity.get("channelData") or {}).get("tenant") or {}).get("id")
                  or self.settings.tenant_id)
        if aad:
            user = await asyncio.to_thread(self.links.user_of, "teams", aad)
            if user:
                await asyncio.to_thread(self.links.remember_address, "teams", aad, {
                    "id": sender.get("id"), "service_url": service_url, "tenant_id": tenant})
                return user
        conv = (activity.get("conversation") or {}).get("id")
        if not conv or not sender.get("id"):
            return None
        try:
            member = await self.connector.member(service_url, conv, sender["id"])
        except RetryLater as exc:
            log.warning("Teams member lookup failed: %s", exc)
            return None
        if not member:
            return None
        if aad and member.get("aadObjectId") and member["aadObjectId"] != aad:
            return None
        return self.links.user_by_email(member.get("email") or member.get("userPrincipalName"))

    async def address_of(self, user: str) -> dict[str, Any] | None:
        linked = await asyncio.to_thread(self.links.accounts_of, "teams", user)
        for row in linked:
            if row.address.get("id"):
                return row.address
        aads = {row.platform_user for row in linked}
        email = (self.links.config.users[user].email or "").lower() \
            if user in self.links.config.users else ""
        roster = await self.connector.members(self.settings.service_url,
                                              self.settings.conversation_id)
        for m in roster:
            mail = (m.get("email") or m.get("userPrincipalName") or "").lower()
            if m.get("aadObjectId") in aads or (email and mail == email):
                return {"id": m["id"], "service_url": self.settings.service_url,
                        "tenant_id": self.settings.tenant_id}
        return None
