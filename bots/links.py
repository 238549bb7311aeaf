"""Explicit links between chat accounts and Keyturn users.

A link is made by an operator (``keyturn bots link``) or by a signed-in user
on the portal, never by the chat platform alone. The bots also resolve people
by verified e-mail; that needs no row here.

It must not make a link on the chat platform's word alone.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from sqlalchemy import delete, select

from bots.models import IdentityLink, LinkCode
from keyturn.config import Config
from keyturn.errors import KeyturnError, NotFound, Unauthorized
from keyturn.store import Store

PLATFORMS = ("slack", "teams")
CODE_TTL = 600.0
_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"   # no 0/O, 1/I/L: codes are typed by people


def _hash(code: str) -> str:
    return hashlib.sha256(code.strip().upper().replace("-", "").encode()).hexdigest()


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

    def start_claim(self, platform: str, platform_user: str, *,
                    address: dict[str, Any] | None = None, now: float | None = None) -> str:
        """A one-time code for this chat account (shown only to its owner in chat)."""
        now = time.time() if now is None else now
        raw = "".join(secrets.choice(_ALPHABET) for _ in range(10))
        with self.store.write() as s:
            s.add(LinkCode(code_hash=_hash(raw), platform=platform, platform_user=platform_user,
                           address=address or {}, created_at=now, expires_at=now + CODE_TTL))
        return f"{raw[:5]}-{raw[5:]}"

    def claim(self, code: str, user: str, *, now: float | None = None) -> IdentityLink:
        """Redeem a code as ``user`` (already authenticated): links the chat account
        that asked for the code. Single use; expired or unknown codes fail alike."""
        now = time.time() if now is None else now
        with self.store.write() as s:
            row = s.scalars(select(LinkCode).where(LinkCode.code_hash == _hash(code))).first()
            if row is None or row.used_at is not None or row.expires_at <= now:
                raise Unauthorized("unknown, used or expired link code (ask for a new one with "
                                   "/keyturn link)")
            row.used_at = now
            platform, platform_user, address = row.platform, row.platform_user, row.address
        return self.link(platform, platform_user, user, by=user, address=address)

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

    def of_user(self, user: str) -> list[IdentityLink]:
        """Every chat account linked to ``user``, oldest first."""
        with self.store.session() as s:
            return list(s.scalars(select(IdentityLink).where(IdentityLink.user == user)
                                  .order_by(IdentityLink.id)))

    def unlink_own(self, link_id: int, user: str) -> IdentityLink:
        """Remove one of ``user``'s own links. Someone else's link id answers exactly
        like a missing one, so ids reveal nothing."""
        with self.store.write() as s:
            row = s.scalars(select(IdentityLink).where(IdentityLink.id == link_id,
                                                       IdentityLink.user == user)).first()
            if row is None:
                raise NotFound(f"no chat account link {link_id}")
            s.delete(row)
            return row
