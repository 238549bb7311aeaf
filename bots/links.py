"""Explicit links between chat accounts and Keyturn users.

A link is made by an operator (``keyturn bots link``) or by a signed-in user
on the portal, never by the chat platform alone. The bots also resolve people
by verified e-mail; that needs no row here.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import delete, select

from bots.models import IdentityLink
from keyturn.config import Config
from keyturn.errors import KeyturnError, NotFound
from keyturn.store import Store

PLATFORMS = ("slack", "teams")


class Links:
    def __init__(self, config: Config, store: Store):
        self.config = config
        self.store = store

    def link(self, platform: str, platform_user: str, user: str, *, by: str | None = None,
             address: dict[str, Any] | None = None) -> IdentityLink:
        if platform not in PLATFORMS:
            raise KeyturnError(f"unknown platform {platform!r} (expected slack or teams)")
        if not platform_user.strip():
            raise KeyturnError("the platform user id is empty")
        if user not in self.config.users:
            raise NotFound(f"unknown user {user!r} (users come from the config file)")
        with self.store.write() as s:
            row = s.scalars(select(IdentityLink).where(
                IdentityLink.platform == platform,
                IdentityLink.platform_user == platform_user)).first()
            if row is None:
                row = IdentityLink(platform=platform, platform_user=platform_user, user=user,
                                   source="explicit", address=address or {},
                                   created_at=time.time(), created_by=by)
                s.add(row)
            else:
                row.user, row.created_by, row.created_at = user, by, time.time()
                if address:
                    row.address = address
            s.flush()
            return row

    def remember_address(self, platform: str, platform_user: str,
                         address: dict[str, Any]) -> None:
        """Keep how to reach a linked person proactively (Teams needs the
        conversation details the person's first message brought)."""
        with self.store.write() as s:
            row = s.scalars(select(IdentityLink).where(
                IdentityLink.platform == platform,
                IdentityLink.platform_user == platform_user)).first()
            if row is not None and row.address != address:
                row.address = address

    def unlink(self, platform: str, platform_user: str) -> bool:
        with self.store.write() as s:
            res = s.execute(delete(IdentityLink).where(
                IdentityLink.platform == platform, IdentityLink.platform_user == platform_user))
            return bool(res.rowcount)  # type: ignore[attr-defined]

    def user_of(self, platform: str, platform_user: str) -> str | None:
        with self.store.session() as s:
            user = s.scalar(select(IdentityLink.user).where(
                IdentityLink.platform == platform, IdentityLink.platform_user == platform_user))
        return user if user in self.config.users else None

    def accounts_of(self, platform: str, user: str) -> list[IdentityLink]:
        with self.store.session() as s:
            return list(s.scalars(select(IdentityLink).where(
                IdentityLink.platform == platform, IdentityLink.user == user)
                .order_by(IdentityLink.id)))

    def all(self) -> list[IdentityLink]:
        with self.store.session() as s:
            return list(s.scalars(select(IdentityLink).order_by(IdentityLink.id)))

    def user_by_email(self, email: str | None) -> str | None:
        if not email:
            return None
        email = email.strip().lower()
        for name, u in self.config.users.items():
            if u.email and u.email.lower() == email:
                return name
        return None
