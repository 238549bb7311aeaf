"""Identity: who a person is, and the access tokens they use.

Users and groups come from the config file. Access tokens are what a person
types as the password in psql (and sends as a Bearer token to the API). SSH public
keys, registered per person (``PublicKey``), log them in to the SSH gateway.
A token is shown once and stored only as hashes:

* ``lookup_hash`` — SHA-256 of the token, for the API and for cleartext
  password logins inside TLS;
* SCRAM-SHA-256 ``stored_key``/``server_key`` derived with the user's one
  salt, so the gateway can run SCRAM with psql and match any of the user's
  live tokens.

This module must not know about protocols beyond computing SCRAM keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from keyturn.config import AuthThrottle, Config
from keyturn.errors import KeyturnError, NotFound, StoreUnavailable, Unauthorized
from keyturn.models import PublicKey, Token, UserSalt
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
        with _store_errors(), self.store.write() as s:
            row = s.scalars(select(Token).where(Token.lookup_hash == lookup_hash(token))).first()
            if row is None or row.revoked_at is not None or row.expires_at <= now:
                raise Unauthorized("invalid, expired or revoked token")
            if row.user not in self.config.users:
                raise Unauthorized(f"user {row.user!r} is no longer configured")
            row.last_used_at = now
            return Identity(row.user, self.config.groups_of(row.user), row.id)

    # ---- SSH public keys

    def add_key(self, user: str, line: str, *, now: float | None = None) -> PublicKey:
        """Register ``line`` (one OpenSSH public key line) as ``user``'s."""
        if user not in self.config.users:
            raise NotFound(f"unknown user {user!r} (users come from the config file)")
        algorithm, fingerprint, canonical, comment = parse_public_key(line)
        with self.store.write() as s:
            taken = s.scalars(select(PublicKey).where(
                PublicKey.fingerprint == fingerprint)).first()
            if taken is not None:
                raise BadKey(f"key {fingerprint} is already registered"
                             + (" for you" if taken.user == user else " for another user"))
            row = PublicKey(user=user, fingerprint=fingerprint, algorithm=algorithm,
                            openssh=canonical, comment=comment[:200],
                            created_at=time.time() if now is None else now)
            s.add(row)
            s.flush()
            return row

    def list_keys(self, user: str | None = None) -> list[PublicKey]:
        with self.store.session() as s:
            q = select(PublicKey).order_by(PublicKey.id)
            if user:
                q = q.where(PublicKey.user == user)
            return list(s.scalars(q))

    def remove_key(self, key_id: int, *, user: str | None = None) -> PublicKey:
        with self.store.write() as s:
            row = s.get(PublicKey, key_id)
            if row is None or (user is not None and row.user != user):
                raise NotFound(f"no key {key_id}")
            s.delete(row)
            return row

    def keys_of(self, user: str) -> list[str]:
        """``user``'s public keys (OpenSSH lines), none for a user not configured."""
        if user not in self.config.users:
            return []
        with _store_errors(), self.store.session() as s:
            return list(s.scalars(select(PublicKey.openssh).where(PublicKey.user == user)))

    def key_used(self, user: str, fingerprint: str) -> Identity:
        """A login with ``fingerprint`` succeeded: who it is (the key must still be
        ``user``'s)."""
        with _store_errors(), self.store.write() as s:
            row = s.scalars(select(PublicKey).where(
                PublicKey.fingerprint == fingerprint)).first()
            if row is None or row.user != user or user not in self.config.users:
                raise Unauthorized("the key is not registered for this user")
            row.last_used_at = time.time()
            return Identity(user, self.config.groups_of(user), None)

    def scram_credentials(self, user: str) -> ScramCredentials | None:
        """The live tokens of ``user`` as SCRAM verifiers, or None if unknown."""
        if user not in self.config.users:
            return None
        now = time.time()
        with _store_errors(), self.store.session() as s:
            salt_row = s.get(UserSalt, user)
            if salt_row is None:
                return None
            rows = s.scalars(select(Token).where(
                Token.user == user, Token.revoked_at.is_(None), Token.expires_at > now))
            cands = tuple((r.id, r.stored_key, r.server_key) for r in rows)
            return ScramCredentials(salt_row.salt, salt_row.iterations, cands)

    def revoked(self, token_ids: Iterable[int]) -> dict[int, str]:
        """Of ``token_ids``, those that no longer let anyone in, with why (for ending the
        sessions opened with them). Expiry ends no session: it only stops new logins."""
        ids = sorted(set(token_ids))
        if not ids:
            return {}
        out = {i: "was deleted" for i in ids}
        with _store_errors(), self.store.session() as s:
            for row in s.execute(select(Token.id, Token.user, Token.revoked_at)
                                 .where(Token.id.in_(ids))):
                if row.revoked_at is not None:
                    out[row.id] = "was revoked"
                elif row.user not in self.config.users:
                    out[row.id] = f"belongs to user {row.user!r}, who is no longer configured"
                else:
                    del out[row.id]
        return out


class BadKey(KeyturnError):
    """An SSH public key that cannot be registered (the message says why)."""

    code = "bad_key"


#: Public key algorithms accepted for people's keys (no DSA, no RSA-SHA1-only keys).
KEY_ALGORITHMS = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                  "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
                  "sk-ecdsa-sha2-nistp256@openssh.com")


def key_fingerprint(blob: bytes) -> str:
    """A key's fingerprint as OpenSSH prints it (``SHA256:`` and unpadded base64)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def parse_public_key(line: str) -> tuple[str, str, str, str]:
    """(algorithm, fingerprint, ``algorithm base64``, comment) of one OpenSSH public key
    line; BadKey says what is wrong with it."""
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        raise BadKey("expected one OpenSSH public key line: 'ssh-ed25519 AAAA... comment'")
    algorithm, data = parts[0], parts[1]
    if algorithm not in KEY_ALGORITHMS:
        raise BadKey(f"unsupported key type {algorithm!r} (expected one of "
                     f"{', '.join(KEY_ALGORITHMS)})")
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadKey("the key's base64 part is damaged") from None
    # The blob starts with its own algorithm name: a line whose parts disagree is not a key.
    if len(blob) < 4 or blob[4:4 + int.from_bytes(blob[:4], "big")] != algorithm.encode():
        raise BadKey("the key's data does not match its type")
    if not algorithm.startswith("sk-"):
        from cryptography.hazmat.primitives.serialization import load_ssh_public_key
        try:
            load_ssh_public_key(f"{algorithm} {data}".encode())
        except (ValueError, TypeError) as exc:
            raise BadKey(f"not a valid {algorithm} key ({exc})") from None
    return algorithm, key_fingerprint(blob), f"{algorithm} {data}", \
        parts[2].strip() if len(parts) > 2 else ""


@contextmanager
def _store_errors() -> Iterator[None]:
    """Driver and pool failures as StoreUnavailable, which callers can explain."""
    try:
        yield
    except (DBAPIError, PoolTimeout) as exc:
        orig = getattr(exc, "orig", None) or exc
        reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        raise StoreUnavailable(reason) from exc


# ---------------------------------------------------------------- login throttling

@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    busy_until: float = 0.0  # failures keep being answered no earlier than this


@dataclass
class ThrottleVerdict:
    """How long to wait before answering a login attempt, and what to audit about it."""

    wait: float
    failures_user: int = 0
    failures_addr: int = 0
    started: bool = False  # this failure is the first one delayed for its user or address

    def detail(self) -> dict[str, object]:
        return {"throttle_ms": round(self.wait * 1000), "failures_user": self.failures_user,
                "failures_addr": self.failures_addr}


@dataclass
class LoginThrottle:
    """Exponential back-off after failed logins, per user name and per client address.

    * A failure is answered after a delay that doubles with each failure of its user or
      of its address past ``free_attempts`` (capped at ``max_delay``); failures that
      arrive together queue behind each other, so parallel guessing is no faster.
    * A success waits only for its *address*'s back-off (as long as a failure from there
      would, at most ``max_delay``): someone guessing from one address learns nothing by
      hanging up early, and the right token from another address is never delayed by
      a user's failures (no lock-out).
    * Counts are forgotten ``forget_after`` seconds after their last failure. The
      table is bounded (``max_keys``, oldest forgotten first) so made-up user names
      cannot grow it without limit.

    Protocol-neutral; the caller measures time with ``clock`` (monotonic seconds).
    """

    settings: AuthThrottle
    max_keys: int = 100_000
    clock: Callable[[], float] = time.monotonic
    _keys: OrderedDict[tuple[str, str], _Failures] = field(default_factory=OrderedDict)

    def _get(self, key: tuple[str, str], now: float) -> _Failures | None:
        f = self._keys.get(key)
        if f is not None and now - f.last > self.settings.forget_after and now >= f.busy_until:
            del self._keys[key]
            return None
        return f

    def _delay(self, count: int) -> float:
        over = count - self.settings.free_attempts
        if over <= 0:
            return 0.0
        return min(self.settings.max_delay, self.settings.base_delay * 2 ** min(over - 1, 32))

    def success_wait(self, addr: str) -> float:
        """Seconds to wait before telling ``addr`` that its login succeeded: as long as a
        failure from that address would wait, so timing tells a guesser nothing, but at
        most ``max_delay`` (people sharing an address with a guesser are slowed, never
        locked out). A success does not count as a failure."""
        now = self.clock()
        f = self._get(("addr", addr), now)
        if f is None:
            return 0.0
        wait = max(0.0, f.busy_until - now) + self._delay(f.count + 1)
        return min(self.settings.max_delay, wait)

    def failed(self, user: str, addr: str) -> ThrottleVerdict:
        """Count a failed login; returns how long to wait before saying so."""
        now = self.clock()
        answer_at = now
        counts = []
        started = False
        for key in (("user", user), ("addr", addr)):
            f = self._get(key, now)
            if f is None:
                f = self._keys[key] = _Failures()
            self._keys.move_to_end(key)
            f.count += 1
            f.last = now
            delay = self._delay(f.count)
            started |= delay > 0 and self._delay(f.count - 1) == 0
            at = max(now, f.busy_until) + delay
            f.busy_until = at
            answer_at = max(answer_at, at)
            counts.append(f.count)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return ThrottleVerdict(answer_at - now, counts[0], counts[1], started)

    def failures(self, kind: str, name: str) -> int:
        f = self._get((kind, name), self.clock())
        return f.count if f is not None else 0
