"""Identity: who a person is, and the access tokens they use.

Users and groups come from the config file. Access tokens are what a person
types as the password in psql (and sends as a Bearer token to the API).
A token is shown once and stored only as hashes:

* ``lookup_hash`` — SHA-256 of the token, for the API and for cleartext
  password logins inside TLS;
* SCRAM-SHA-256 ``stored_key``/``server_key`` derived with the user's one
  salt, so the gateway can run SCRAM with psql and match any of the user's
  live tokens.

This module must not know about protocols beyond computing SCRAM keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select

from keyturn.config import Config
from keyturn.errors import NotFound, Unauthorized
from keyturn.models import Token, UserSalt
from keyturn.store import Store

TOKEN_PREFIX = "kt_"
SCRAM_ITERATIONS = 4096


@dataclass(frozen=True)
class Identity:
    """An authenticated person."""

    user: str
    groups: tuple[str, ...]
    token_id: int | None = None


@dataclass(frozen=True)
class IssuedToken:
    id: int
    user: str
    token: str
    expires_at: float


@dataclass(frozen=True)
class ScramCredentials:
    salt: bytes
    iterations: int
    candidates: tuple[tuple[int, bytes, bytes], ...]  # (token id, stored_key, server_key)


def lookup_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def salted_keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """SCRAM-SHA-256 (RFC 5802/7677): ClientKey, StoredKey and ServerKey of a password
    (already SASLprep'd). The one derivation shared by token storage and the proxies."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return client_key, hashlib.sha256(client_key).digest(), server_key


def scram_keys(token: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """StoredKey and ServerKey of an access token (ASCII, so SASLprep leaves it as is)."""
    _, stored_key, server_key = salted_keys(token.encode(), salt, iterations)
    return stored_key, server_key


class Identities:
    def __init__(self, config: Config, store: Store):
        self.config = config
        self.store = store

    # ---- people

    def identity_of(self, user: str, token_id: int | None = None) -> Identity:
        if user not in self.config.users:
            raise Unauthorized(f"unknown user {user!r}")
        return Identity(user, self.config.groups_of(user), token_id)

    # ---- tokens

    def create_token(self, user: str, *, description: str = "", ttl: float | None = None,
                     now: float | None = None) -> IssuedToken:
        if user not in self.config.users:
            raise NotFound(f"unknown user {user!r} (users come from the config file)")
        now = time.time() if now is None else now
        token = TOKEN_PREFIX + secrets.token_urlsafe(30)
        with self.store.write() as s:
            salt_row = s.get(UserSalt, user)
            if salt_row is None:
                salt_row = UserSalt(user=user, salt=secrets.token_bytes(16),
                                    iterations=SCRAM_ITERATIONS)
                s.add(salt_row)
            stored, server = scram_keys(token, salt_row.salt, salt_row.iterations)
            row = Token(user=user, description=description, prefix=token[:10],
                        lookup_hash=lookup_hash(token), stored_key=stored, server_key=server,
                        created_at=now, expires_at=now + (ttl or self.config.token_ttl))
            s.add(row)
            s.flush()
            return IssuedToken(row.id, user, token, row.expires_at)

    def list_tokens(self, user: str | None = None) -> list[Token]:
        with self.store.session() as s:
            q = select(Token).order_by(Token.id)
            if user:
                q = q.where(Token.user == user)
            return list(s.scalars(q))

    def revoke_token(self, token_id: int, *, user: str | None = None) -> Token:
        with self.store.write() as s:
            row = s.get(Token, token_id)
            if row is None or (user is not None and row.user != user):
                raise NotFound(f"no token {token_id}")
            if row.revoked_at is None:
                row.revoked_at = time.time()
            return row

    def authenticate_token(self, token: str) -> Identity:
        """API / cleartext login: the token alone says who you are."""
        now = time.time()
        with self.store.write() as s:
            row = s.scalars(select(Token).where(Token.lookup_hash == lookup_hash(token))).first()
            if row is None or row.revoked_at is not None or row.expires_at <= now:
                raise Unauthorized("invalid, expired or revoked token")
            if row.user not in self.config.users:
                raise Unauthorized(f"user {row.user!r} is no longer configured")
            row.last_used_at = now
            return Identity(row.user, self.config.groups_of(row.user), row.id)

    def scram_credentials(self, user: str) -> ScramCredentials | None:
        """The live tokens of ``user`` as SCRAM verifiers, or None if unknown."""
        if user not in self.config.users:
            return None
        now = time.time()
        with self.store.session() as s:
            salt_row = s.get(UserSalt, user)
            if salt_row is None:
                return None
            rows = s.scalars(select(Token).where(
                Token.user == user, Token.revoked_at.is_(None), Token.expires_at > now))
            cands = tuple((r.id, r.stored_key, r.server_key) for r in rows)
            return ScramCredentials(salt_row.salt, salt_row.iterations, cands)
