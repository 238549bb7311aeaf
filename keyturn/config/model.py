"""The core's typed config: store, identity (users), connections, policies and the
gateway settings every protocol shares, as frozen dataclasses.

A connection is protocol-neutral here: its ``target`` is whatever its connection type
validated the ``target:`` mapping into (a subclass of ``Target``), and the keys its type
adds (``unknown_functions``, ``columns``, ``detectors``...) are in ``options``. The
settings of edges (the portal, the chat bots) are in ``Config.sections``, typed by the
modules that register them (keyturn.config.registry).

What it must not do: validate (keyturn.config.validate), read files, or name a protocol,
the web or chat: nothing here may say PostgreSQL, portal or Slack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyturn.errors import ConfigError

ACTIONS = ("allow", "block", "review", "mask")
REVIEW_MODES = ("hold", "defer")
MASK_STYLES = ("full", "partial", "email", "null", "hash")
# Refusals a masking rule may lift (``mask.allow``); see docs/masking.md.
MASK_REFUSALS = ("predicates", "whole_row", "aggregates", "catalog", "procedural")


@dataclass(frozen=True)
class SecretRef:
    """A secret named by environment variable or file; resolved on use."""

    env: str | None = None
    file: str | None = None
    where: str = field(default="", compare=False)  # for messages; not part of its identity

    def resolve(self) -> str:
        if self.env:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"{self.where}: environment variable {self.env} is not set")
            return value
        if self.file:
            try:
                return Path(self.file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{self.where}: cannot read {self.file}: {exc.strerror}") from exc
        raise ConfigError(f"{self.where}: no secret configured")


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    email: str | None = None
    display_name: str | None = None


@dataclass(frozen=True)
class ReviewSettings:
    approvers: tuple[str, ...]
    min_approvals: int = 1
    timeout: float = 600.0
    mode: str = "hold"
    # Still pending after this many seconds (or this fraction of the timeout, when
    # ``escalate_after_fraction``), the ticket's approvers grow by ``escalate_to``.
    escalate_to: tuple[str, ...] = ()
    escalate_after: float = 0.0
    escalate_after_fraction: bool = False

    def escalation_delay(self) -> float | None:
        """Seconds after creation when the ticket escalates, or None."""
        if not self.escalate_to:
            return None
        return self.escalate_after * self.timeout if self.escalate_after_fraction \
            else self.escalate_after


@dataclass(frozen=True)
class Match:
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    connections: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    # (resource kind, globs as written) for every kind the rule names: tables and
    # functions for SQL, and what other protocols' vocabularies declare.
    resources: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def globs(self, kind: str) -> tuple[str, ...]:
        return next((g for k, g in self.resources if k == kind), ())

    @property
    def tables(self) -> tuple[str, ...]:
        return self.globs("tables")

    @property
    def functions(self) -> tuple[str, ...]:
        return self.globs("functions")


@dataclass(frozen=True)
class MaskSettings:
    """What a rule masks and how. Patterns are globs: columns ``schema.table.column``,
    tags as attached to columns in the connection's ``columns``."""

    columns: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    style: str = "full"
    styles: tuple[tuple[str, str], ...] = ()  # (tag or column glob, style), first match wins
    groups: tuple[tuple[str, str], ...] = ()  # (group, style or "exempt")
    allow: tuple[str, ...] = ()  # refusals lifted
    writes: str = "block"  # writes that copy sensitive values elsewhere: block or review
    writes_review: ReviewSettings | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    action: str
    reason: str | None = None
    review: ReviewSettings | None = None
    line: int | None = None
    mask: MaskSettings | None = None


@dataclass(frozen=True)
class Policy:
    name: str
    rules: tuple[Rule, ...]
    default_action: str = "block"


@dataclass(frozen=True)
class Target:
    """Where a connection's requests go. Each connection type validates ``target:`` into
    its own subclass, with what its protocol needs besides the address (a database,
    credentials by reference, TLS settings...)."""

    host: str
    port: int

    @property
    def address(self) -> str:
        """How people recognise the target (``host:port``; protocols add more)."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Connection:
    name: str
    type: str
    target: Target
    policy: str
    description: str = ""
    # The keys the connection type adds, as (key, validated value) for every key the type
    # declares (its default when the file does not give it). A tuple, so that a
    # connection stays hashable and comparable (a policy reload compares them).
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, key: str, default: Any = None) -> Any:
        return next((v for k, v in self.options if k == key), default)

    # Options that capabilities of the core read, wherever a protocol uses them: the SQL
    # analyser (keyturn.analysis) and masking (keyturn.masking).

    @property
    def unknown_function_class(self) -> str:
        """The class of a function the analyser does not know (``unknown_functions``)."""
        return str(self.option("unknown_functions", "write"))

    @property
    def columns(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Tags attached to columns: (``schema.table.column`` glob, tags)."""
        return tuple(self.option("columns", ()))

    @property
    def detectors(self) -> tuple[str, ...] | None:
        """Content detectors run on masked results (None: all built-ins)."""
        value = self.option("detectors")
        return None if value is None else tuple(value)

    @property
    def custom_detectors(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.option("custom_detectors", ()))


@dataclass(frozen=True)
class Listener:
    host: str
    port: int


@dataclass(frozen=True)
class AuthThrottle:
    """Back-off after failed logins (see keyturn.identity.LoginThrottle)."""

    free_attempts: int = 3  # failures per user / per address answered without delay
    base_delay: float = 0.5  # the first delayed failure waits this long, each next one twice
    max_delay: float = 10.0
    forget_after: float = 600.0  # a key with no failure for this long starts afresh


@dataclass(frozen=True)
class ClientLimits:
    """What one gateway accepts from clients, so nobody can exhaust it or lock others out."""

    login_timeout: float = 60.0  # startup, TLS and authentication (PostgreSQL, pgbouncer: 60 s)
    max_connections: int = 1000  # every client socket, logged in or not
    max_connections_per_user: int = 100  # logged-in sessions of one user
    max_pending_logins: int = 256  # sockets not logged in yet; the oldest makes room
    revocation_check: float = 2.0  # seconds between checks that sessions' tokens still hold
    auth_throttle: AuthThrottle = AuthThrottle()
    # Memory for large results a message at a time (a row is relayed once it is whole):
    # MiB of partly received messages one user's sessions / all sessions may hold.
    large_rows_mib_per_user: int = 256
    large_rows_mib: int = 1024


@dataclass(frozen=True)
class GatewaySettings:
    """``gateway:``, shared by every protocol's gateway in a process, and one listener
    per connection type that has one (``gateway.<listener key>``)."""

    # (listener key, where it listens), for every registered connection type with a
    # listener: the file's value or the type's default.
    listeners: tuple[tuple[str, Listener], ...] = ()
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    gateway_id: str = "gateway"
    # scram: always SCRAM-SHA-256. password: a cleartext token inside TLS (SCRAM without TLS).
    client_auth: str = "scram"
    audit_spool: str = "audit-spool"
    mask_key: SecretRef | None = None  # HMAC key of the "hash" masking style
    limits: ClientLimits = ClientLimits()
    # Session recordings (transcripts of PostgreSQL sessions, made by the audit ingester);
    # the portal and ``keyturn audit verify`` read them here.
    recordings: str = "recordings"
    # Seconds of a terminal recording between two keyframes (where a player can start).
    recording_keyframes: float = 30.0
    # Terminal recordings end their session (and new ones are refused) rather than fill
    # the disk below this many MiB free: nothing runs unrecorded, the audit spool keeps
    # room.
    recording_min_free_mib: int = 256
    # Pending tickets one requester may have at once, across every gateway process (the
    # store counts them): one more is refused at once instead of held, so one user cannot
    # flood the approvers. 0: no limit.
    max_pending_per_user: int = 20

    def listener(self, key: str) -> Listener | None:
        return next((lst for k, lst in self.listeners if k == key), None)

    if not TYPE_CHECKING:
        # ``config.gateway.postgres``, the form from before listeners were registered. Not
        # seen by mypy, so that typed code says ``listener("postgres")``.
        def __getattr__(self, name: str) -> Listener:
            if not name.startswith("_"):
                for key, lst in self.__dict__.get("listeners", ()):
                    if key == name:
                        return lst
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@dataclass(frozen=True)
class Config:
    path: str
    store_url: str
    users: dict[str, User]
    connections: dict[str, Connection]
    policies: dict[str, Policy]
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    integrations: dict[str, Any] = field(default_factory=dict)
    token_ttl: float = 90 * 86400.0
    # The validated settings of every registered section, by the section's name (the
    # portal's under "portal", the bots' under "chat"). Read them with the section's
    # typed accessor (``PORTAL.of(config)``).
    sections: dict[str, Any] = field(default_factory=dict)

    def groups_of(self, user: str) -> tuple[str, ...]:
        u = self.users.get(user)
        return u.groups if u else ()

    def members_of(self, group: str) -> list[str]:
        return sorted(n for n, u in self.users.items() if group in u.groups)

    def connections_of(self, ctype: str) -> list[Connection]:
        return [c for c in self.connections.values() if c.type == ctype]

    if not TYPE_CHECKING:
        # ``config.portal``, ``config.chat``: a registered section by its name, the form
        # from before sections were registered. Not seen by mypy, so that typed code uses
        # the section's accessor.
        def __getattr__(self, name: str) -> Any:
            sections = self.__dict__.get("sections")
            if name.startswith("_") or sections is None or name not in sections:
                raise AttributeError(f"{type(self).__name__!r} object has no attribute "
                                     f"{name!r} (no registered section of that name)")
            return sections[name]
