"""Load and validate ``keyturn.yaml``.

One YAML file describes the store, identity (users and groups), connections,
policies and integrations. It is validated completely at start-up; every
error names the key path and the line it came from, so an operator can fix
the file without guessing. Secrets are never inline: they are referenced with
``*_env`` (an environment variable) or ``*_file`` (a file), and resolved only
when used.

This module must not open network connections or touch the store.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from keyturn.analysis.classes import POSTGRES
from keyturn.errors import ConfigError
from keyturn.request import known_classes, resource_kinds

CONNECTION_TYPES = ("postgres", "mysql", "ssh", "http", "kubernetes")
ACTIONS = ("allow", "block", "review", "mask")
REVIEW_MODES = ("hold", "defer")
# The PostgreSQL vocabulary is part of the core (its analyser lives in keyturn.analysis);
# other protocols register theirs when their package is imported (keyturn.request).
STATEMENT_CLASSES = POSTGRES.classes
# Keys whose value would be a secret if written inline.
_SECRET_KEYS = {"password", "secret", "token", "secret_key", "signing_secret", "bot_token",
                "client_secret", "app_password", "mask_key"}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def fold_identifiers(pattern: str) -> str:
    """``schema.table.column`` as PostgreSQL names it: unquoted parts folded to lower case,
    quoted parts kept as written without their quotes (``public."Staff".SSN`` ->
    ``public.Staff.ssn``)."""
    parts, buf, quoted = [], "", False
    for ch in pattern:
        if ch == '"':
            quoted = not quoted
            buf += ch
        elif ch == "." and not quoted:
            parts.append(buf)
            buf = ""
        else:
            buf += ch
    parts.append(buf)
    return ".".join(p[1:-1].replace('""', '"') if len(p) > 1 and p[0] == p[-1] == '"'
                    else p.lower() for p in parts)


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"90s"``, ``"10m"``, ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 10m, 1h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


# ---------------------------------------------------------------- YAML with lines

class _Doc:
    """Plain Python data plus the source line of every key path."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.lines: dict[tuple[Any, ...], int] = {}
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", exc)
            raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from exc
        self.data = self._convert(node, ()) if node is not None else {}

    def _convert(self, node: yaml.Node, at: tuple[Any, ...]) -> Any:
        self.lines[at] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                key = yaml.safe_load(yaml.serialize(knode))
                if key in out:
                    line = knode.start_mark.line + 1
                    raise ConfigError(f"{self.path}:{line}: {_fmt(at + (key,))}: duplicate key")
                out[key] = self._convert(vnode, at + (key,))
                self.lines[at + (key,)] = knode.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(v, at + (i,)) for i, v in enumerate(node.value)]
        return yaml.safe_load(yaml.serialize(node))

    def error(self, at: tuple[Any, ...], message: str) -> ConfigError:
        probe = at
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe)
        where = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{where}: {_fmt(at)}: {message}")


def _fmt(at: Iterable[Any]) -> str:
    out = ""
    for part in at:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


# ---------------------------------------------------------------- typed config

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


MASK_STYLES = ("full", "partial", "email", "null", "hash")
# Refusals a masking rule may lift (``mask.allow``); see docs/masking.md.
MASK_REFUSALS = ("predicates", "whole_row", "aggregates", "catalog", "procedural")


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
    host: str
    port: int
    dbname: str | None = None
    user: str | None = None
    password: SecretRef | None = None
    sslmode: str = "disable"


@dataclass(frozen=True)
class Connection:
    name: str
    type: str
    target: Target
    policy: str
    unknown_function_class: str = "write"
    description: str = ""
    # Tags attached to columns: (``schema.table.column`` glob, tags).
    columns: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Content detectors run on masked results (None: all built-ins) and custom ones.
    detectors: tuple[str, ...] | None = None
    custom_detectors: tuple[tuple[str, str], ...] = ()


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


@dataclass(frozen=True)
class GatewaySettings:
    postgres: Listener | None = Listener("127.0.0.1", 6432)
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    gateway_id: str = "gateway"
    # scram: always SCRAM-SHA-256. password: a cleartext token inside TLS (SCRAM without TLS).
    client_auth: str = "scram"
    audit_spool: str = "audit-spool"
    mask_key: SecretRef | None = None  # HMAC key of the "hash" masking style
    limits: ClientLimits = ClientLimits()


@dataclass(frozen=True)
class OidcSettings:
    """Single sign-on through an OpenID Connect provider (issuer discovery)."""

    issuer: str
    client_id: str
    client_secret: SecretRef | None = None
    groups_claim: str = "groups"
    username_claim: str = "preferred_username"
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    label: str = "single sign-on"


@dataclass(frozen=True)
class PortalSettings:
    listen: Listener = Listener("127.0.0.1", 8080)
    public_url: str = "http://127.0.0.1:8080"
    secret_key: SecretRef | None = None
    # Portal roles that do not follow from policy come from these groups.
    manager_groups: tuple[str, ...] = ("managers",)
    auditor_groups: tuple[str, ...] = ("auditors",)
    admin_groups: tuple[str, ...] = ("admins",)
    session_lifetime: float = 8 * 3600.0
    # None: Secure cookies exactly when public_url is https.
    cookie_secure: bool | None = None
    oidc: OidcSettings | None = None


@dataclass(frozen=True)
class SlackSettings:
    """``integrations.slack``: the Slack app the bots run as."""

    bot_token: SecretRef
    signing_secret: SecretRef | None
    app_token: SecretRef | None
    mode: str = "http"
    channel: str = ""
    connection_channels: dict[str, str] = field(default_factory=dict)
    policy_channels: dict[str, str] = field(default_factory=dict)
    reminders: tuple[float, ...] = ()
    api_base_url: str | None = None
    statement_chars: int = 700

    def channel_for(self, connection: str, policy: str | None) -> str:
        return (self.connection_channels.get(connection)
                or (self.policy_channels.get(policy) if policy else None) or self.channel)


@dataclass(frozen=True)
class TeamsSettings:
    """``integrations.teams``: the Azure Bot registration and where cards go."""

    app_id: str
    app_password: SecretRef
    tenant_id: str
    service_url: str
    conversation_id: str
    connection_conversations: dict[str, str] = field(default_factory=dict)
    openid_metadata_url: str = "https://login.botframework.com/v1/.well-known/openidconfiguration"
    issuer: str = "https://api.botframework.com"
    token_url: str = "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token"
    statement_chars: int = 700

    def conversation_for(self, connection: str) -> str:
        return self.connection_conversations.get(connection) or self.conversation_id


@dataclass(frozen=True)
class ChatSettings:
    """The bots process: its HTTP listener and the platforms it serves."""

    listen: Listener = Listener("127.0.0.1", 3000)
    slack: SlackSettings | None = None
    teams: TeamsSettings | None = None
    poll_interval: float = 0.5


@dataclass(frozen=True)
class Config:
    path: str
    store_url: str
    users: dict[str, User]
    connections: dict[str, Connection]
    policies: dict[str, Policy]
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    portal: PortalSettings = field(default_factory=PortalSettings)
    integrations: dict[str, Any] = field(default_factory=dict)
    token_ttl: float = 90 * 86400.0
    chat: ChatSettings | None = None

    def groups_of(self, user: str) -> tuple[str, ...]:
        u = self.users.get(user)
        return u.groups if u else ()

    def members_of(self, group: str) -> list[str]:
        return sorted(n for n, u in self.users.items() if group in u.groups)


# ---------------------------------------------------------------- validation

_TOP_KEYS = {"store", "identity", "connections", "policies", "integrations", "gateway", "portal"}


class _Validator:
    def __init__(self, doc: _Doc):
        self.doc = doc

    def err(self, at: tuple[Any, ...], message: str) -> ConfigError:
        return self.doc.error(at, message)

    def mapping(self, value: Any, at: tuple[Any, ...], allowed: set[str] | None = None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.err(at, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            for key in value:
                if key in _SECRET_KEYS:
                    raise self.err(at + (key,), f"secrets must not be inline; use {key}_env or "
                                                f"{key}_file")
                if key not in allowed:
                    raise self.err(at + (key,), f"unknown key (expected one of: "
                                                f"{', '.join(sorted(allowed))})")
        return value

    def str_list(self, value: Any, at: tuple[Any, ...]) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.err(at, "expected a string or a list of strings")
        return tuple(value)

    def string(self, value: Any, at: tuple[Any, ...], *, required: bool = True) -> str:
        if value is None and not required:
            return ""
        if not isinstance(value, str) or not value:
            raise self.err(at, "expected a non-empty string" if value is not None else
                           "is required")
        return value

    def secret(self, m: dict, key: str, at: tuple[Any, ...]) -> SecretRef | None:
        env, file = m.get(f"{key}_env"), m.get(f"{key}_file")
        if env is None and file is None:
            return None
        if env is not None and file is not None:
            raise self.err(at + (f"{key}_env",), f"give {key}_env or {key}_file, not both")
        where = self.doc.error(at + (f"{key}_env" if env else f"{key}_file",), "").args[0]
        return SecretRef(env=env, file=file, where=where.rsplit(": ", 1)[0])

    def listener(self, value: Any, at: tuple[Any, ...]) -> Listener:
        if isinstance(value, int):
            return Listener("127.0.0.1", value)
        if isinstance(value, str) and ":" in value:
            host, _, port = value.rpartition(":")
            if port.isdigit():
                return Listener(host or "127.0.0.1", int(port))
        raise self.err(at, f"expected HOST:PORT or a port number, got {value!r}")

    # ---- sections

    def run(self) -> Config:
        top = self.mapping(self.doc.data, (), _TOP_KEYS)
        store = self.mapping(top.get("store"), ("store",), {"url", "url_env"})
        if "url_env" in store:
            url = os.environ.get(store["url_env"])
            if not url:
                raise self.err(("store", "url_env"), f"environment variable {store['url_env']} "
                                                     "is not set")
        else:
            url = store.get("url", "sqlite:///keyturn.db")
        if not isinstance(url, str) or not url.startswith(("sqlite:", "postgresql")):
            raise self.err(("store", "url"), "expected sqlite:///PATH or postgresql://...")
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and \
                url != "sqlite:///:memory:":
            # Relative SQLite paths are relative to the config file, not the cwd.
            base = Path(self.doc.path).resolve().parent
            url = "sqlite:///" + str(base / url[len("sqlite:///"):])

        users = self.identity(top.get("identity"))
        policies = self.policies(top.get("policies"))
        connections = self.connections(top.get("connections"), policies)
        for pname, policy in policies.items():
            for i, rule in enumerate(policy.rules):
                for u in rule.match.users:
                    if u not in users:
                        raise self.err(("policies", pname, "rules", i, "match", "users"),
                                       f"unknown user {u!r}")
                for c in rule.match.connections:
                    if c not in connections:
                        raise self.err(("policies", pname, "rules", i, "match", "connections"),
                                       f"unknown connection {c!r}")
        integrations = self.mapping(top.get("integrations"), ("integrations",))
        chat = self.integrations(integrations, connections, policies)
        return Config(
            path=self.doc.path, store_url=url, users=users, connections=connections,
            policies=policies, gateway=self.gateway(top.get("gateway")),
            portal=self.portal(top.get("portal")), integrations=integrations,
            token_ttl=self.token_ttl(top.get("identity")), chat=chat,
        )

    def token_ttl(self, ident: Any) -> float:
        raw = (ident or {}).get("token_ttl", "90d")
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise self.err(("identity", "token_ttl"), str(exc)) from exc

    def identity(self, value: Any) -> dict[str, User]:
        ident = self.mapping(value, ("identity",), {"users", "groups", "token_ttl"})
        users_raw = self.mapping(ident.get("users"), ("identity", "users"))
        users: dict[str, User] = {}
        for name, spec in users_raw.items():
            at = ("identity", "users", name)
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.@-]{1,63}", name):
                raise self.err(at, "user names are 1-63 letters, digits, _ . @ -")
            spec = self.mapping(spec, at, {"groups", "email", "name"})
            groups = self.str_list(spec.get("groups"), at + ("groups",))
            users[name] = User(name=name, groups=groups,
                               email=spec.get("email"), display_name=spec.get("name"))
        groups_raw = self.mapping(ident.get("groups"), ("identity", "groups"))
        for group, members in groups_raw.items():
            at = ("identity", "groups", group)
            for member in self.str_list(members, at):
                if member not in users:
                    raise self.err(at, f"unknown user {member!r}")
                u = users[member]
                if group not in u.groups:
                    users[member] = User(u.name, u.groups + (group,), u.email, u.display_name)
        return users

    def policies(self, value: Any) -> dict[str, Policy]:
        raw = self.mapping(value, ("policies",))
        out: dict[str, Policy] = {}
        for pname, spec in raw.items():
            at = ("policies", pname)
            if isinstance(spec, list):
                spec = {"rules": spec}
            spec = self.mapping(spec, at, {"rules", "default"})
            rules_raw = spec.get("rules") or []
            if not isinstance(rules_raw, list):
                raise self.err(at + ("rules",), "expected a list of rules")
            rules = []
            seen: set[str] = set()
            for i, r in enumerate(rules_raw):
                rule = self.rule(r, at + ("rules", i))
                if rule.name in seen:
                    raise self.err(at + ("rules", i, "name"), f"duplicate rule name {rule.name!r}")
                seen.add(rule.name)
                rules.append(rule)
            default = spec.get("default", "block")
            if default not in ("allow", "block"):
                raise self.err(at + ("default",), "expected allow or block")
            out[pname] = Policy(pname, tuple(rules), default)
        return out

    def rule(self, value: Any, at: tuple[Any, ...]) -> Rule:
        r = self.mapping(value, at, {"name", "match", "action", "reason", "review", "mask"})
        name = self.string(r.get("name"), at + ("name",))
        action = r.get("action")
        if action not in ACTIONS:
            raise self.err(at + ("action",),
                           f"expected one of {', '.join(ACTIONS)}, got {action!r}")
        kinds = resource_kinds()
        m = self.mapping(r.get("match"), at + ("match",),
                         {"users", "groups", "connections", "class", *kinds})
        classes = tuple(c.lower() for c in self.str_list(m.get("class"), at + ("match", "class")))
        known = known_classes()
        for c in classes:
            if c not in known:
                raise self.err(at + ("match", "class"),
                               f"unknown class {c!r} (expected {', '.join(known)})")
        match = Match(
            users=self.str_list(m.get("users"), at + ("match", "users")),
            groups=self.str_list(m.get("groups"), at + ("match", "groups")),
            connections=self.str_list(m.get("connections"), at + ("match", "connections")),
            classes=classes,
            resources=tuple((k, self.str_list(m.get(k), at + ("match", k))) for k in kinds
                            if m.get(k) is not None),
        )
        review = None
        if action == "review":
            review = self.review_settings(r.get("review"), at + ("review",))
        elif r.get("review") is not None:
            raise self.err(at + ("review",), "review settings need action: review")
        reason = r.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise self.err(at + ("reason",), "expected a string")
        mask = None
        if r.get("mask") is not None or action == "mask":
            if action == "block":
                raise self.err(at + ("mask",), "a blocked statement returns nothing to mask")
            mask = self.mask(r.get("mask"), at + ("mask",))
        return Rule(name, match, action, reason, review, self.doc.lines.get(at), mask)

    def review_settings(self, value: Any, at: tuple[Any, ...]) -> ReviewSettings:
        rv = self.mapping(value, at, {"approvers", "min_approvals", "timeout", "mode"})
        approvers = self.str_list(rv.get("approvers"), at + ("approvers",))
        if not approvers:
            raise self.err(at + ("approvers",), "a review needs approver groups")
        n = rv.get("min_approvals", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise self.err(at + ("min_approvals",), "expected an integer >= 1")
        try:
            timeout = parse_duration(rv.get("timeout", "10m"))
        except ValueError as exc:
            raise self.err(at + ("timeout",), str(exc)) from exc
        mode = rv.get("mode", "hold")
        if mode not in REVIEW_MODES:
            raise self.err(at + ("mode",), "expected hold or defer")
        return ReviewSettings(approvers, n, timeout, mode)

    def mask_style(self, value: Any, at: tuple[Any, ...], *, exempt: bool = False) -> str:
        text = str(value) if isinstance(value, (str, int)) else ""
        kind, _, keep = text.partition(":")
        if exempt and text == "exempt":
            return text
        if kind not in MASK_STYLES or (keep and (kind != "partial" or not keep.isdigit())):
            extra = ", exempt" if exempt else ""
            raise self.err(at, f"expected a mask style: {', '.join(MASK_STYLES)}, "
                               f"partial:N{extra}; got {value!r}")
        return text

    def mask(self, value: Any, at: tuple[Any, ...]) -> MaskSettings:
        m = self.mapping(value, at, {"columns", "tags", "style", "styles", "groups", "allow",
                                     "writes"})
        columns = tuple(fold_identifiers(c)
                        for c in self.str_list(m.get("columns"), at + ("columns",)))
        for c in columns:
            if c.count(".") != 2:
                raise self.err(at + ("columns",), f"column {c!r}: expected schema.table.column "
                                                  "(globs allowed, e.g. public.*.email)")
        tags = self.str_list(m.get("tags"), at + ("tags",))
        if not columns and not tags:
            raise self.err(at, "say what is sensitive: columns and/or tags")
        style = self.mask_style(m.get("style", "full"), at + ("style",))
        styles = tuple((str(k), self.mask_style(v, at + ("styles", k)))
                       for k, v in self.mapping(m.get("styles"), at + ("styles",)).items())
        groups = tuple((str(k), self.mask_style(v, at + ("groups", k), exempt=True))
                       for k, v in self.mapping(m.get("groups"), at + ("groups",)).items())
        allow = self.str_list(m.get("allow"), at + ("allow",))
        for a in allow:
            if a not in MASK_REFUSALS:
                raise self.err(at + ("allow",), f"unknown refusal {a!r} (expected "
                                                f"{', '.join(MASK_REFUSALS)})")
        writes, writes_review = m.get("writes", "block"), None
        if isinstance(writes, dict):
            w = self.mapping(writes, at + ("writes",), {"review"})
            writes_review = self.review_settings(w.get("review"), at + ("writes", "review"))
            writes = "review"
        elif writes != "block":
            raise self.err(at + ("writes",), "expected block, or review: {approvers: [...], "
                                              "min_approvals, timeout, mode}")
        return MaskSettings(columns, tags, style, styles, groups, allow, writes, writes_review)

    def connections(self, value: Any, policies: dict[str, Policy]) -> dict[str, Connection]:
        if value is None:
            return {}
        if not isinstance(value, list):
            raise self.err(("connections",), "expected a list of connections")
        out: dict[str, Connection] = {}
        for i, spec in enumerate(value):
            at = ("connections", i)
            c = self.mapping(spec, at, {"name", "type", "target", "policy", "description",
                                        "unknown_functions", "columns", "detectors",
                                        "custom_detectors"})
            name = self.string(c.get("name"), at + ("name",))
            if name in out:
                raise self.err(at + ("name",), f"duplicate connection name {name!r}")
            ctype = c.get("type")
            if ctype not in CONNECTION_TYPES:
                raise self.err(at + ("type",), f"expected one of {', '.join(CONNECTION_TYPES)}")
            if ctype != "postgres":
                raise self.err(at + ("type",), f"{ctype} connections are not supported by this "
                                               "version yet (postgres is)")
            policy = self.string(c.get("policy"), at + ("policy",))
            if policy not in policies:
                raise self.err(at + ("policy",), f"unknown policy {policy!r}")
            t = self.mapping(c.get("target"), at + ("target",),
                             {"host", "port", "dbname", "user", "password_env", "password_file",
                              "sslmode"})
            port = t.get("port", 5432)
            if not isinstance(port, int) or not 0 < port < 65536:
                raise self.err(at + ("target", "port"), "expected a port number")
            sslmode = t.get("sslmode", "disable")
            if sslmode not in ("disable", "prefer", "require", "verify-full"):
                raise self.err(at + ("target", "sslmode"),
                               "expected disable, prefer, require or verify-full")
            target = Target(
                host=self.string(t.get("host"), at + ("target", "host")), port=port,
                dbname=t.get("dbname") or name, user=t.get("user"),
                password=self.secret(t, "password", at + ("target",)), sslmode=sslmode,
            )
            ufc = c.get("unknown_functions", "write")
            if ufc not in STATEMENT_CLASSES:
                raise self.err(at + ("unknown_functions",), "expected a statement class")
            columns = []
            for col, tags in self.mapping(c.get("columns"), at + ("columns",)).items():
                if not isinstance(col, str) or col.count(".") != 2:
                    raise self.err(at + ("columns", col), "expected schema.table.column "
                                                          "(globs allowed)")
                columns.append((fold_identifiers(col),
                                self.str_list(tags, at + ("columns", col))))
            detectors = None
            if "detectors" in c:
                detectors = self.str_list(c.get("detectors"), at + ("detectors",))
            custom = self.mapping(c.get("custom_detectors"), at + ("custom_detectors",))
            for dname, rx in custom.items():
                try:
                    re.compile(str(rx))
                except re.error as exc:
                    raise self.err(at + ("custom_detectors", dname),
                                   f"invalid regular expression: {exc}") from exc
            out[name] = Connection(name, ctype, target, policy, ufc,
                                   c.get("description") or "", tuple(columns), detectors,
                                   tuple((str(k), str(v)) for k, v in custom.items()))
        return out

    def gateway(self, value: Any) -> GatewaySettings:
        g = self.mapping(value, ("gateway",), {"postgres", "tls", "id", "client_auth",
                                               "audit_spool", "mask_key_env", "mask_key_file",
                                               "limits"})
        client_auth = g.get("client_auth", "scram")
        if client_auth not in ("scram", "password"):
            raise self.err(("gateway", "client_auth"), "expected scram or password")
        tls = self.mapping(g.get("tls"), ("gateway", "tls"), {"cert_file", "key_file"})
        if bool(tls.get("cert_file")) != bool(tls.get("key_file")):
            raise self.err(("gateway", "tls"), "give both cert_file and key_file")
        pg = self.listener(g["postgres"], ("gateway", "postgres")) if "postgres" in g else \
            Listener("127.0.0.1", 6432)
        return GatewaySettings(pg, tls.get("cert_file"), tls.get("key_file"),
                               str(g.get("id", "gateway")), client_auth,
                               str(Path(self.doc.path).resolve().parent /
                                   g.get("audit_spool", "audit-spool")),
                               self.secret(g, "mask_key", ("gateway",)),
                               self.limits(g.get("limits")))

    def limits(self, value: Any) -> ClientLimits:
        at = ("gateway", "limits")
        m = self.mapping(value, at, {f.name for f in fields(ClientLimits)})
        t = self.mapping(m.get("auth_throttle"), at + ("auth_throttle",),
                         {f.name for f in fields(AuthThrottle)})
        d, dt = ClientLimits(), AuthThrottle()
        throttle = AuthThrottle(
            self._count(t, "free_attempts", dt.free_attempts, at + ("auth_throttle",), 0),
            self._seconds(t, "base_delay", dt.base_delay, at + ("auth_throttle",)),
            self._seconds(t, "max_delay", dt.max_delay, at + ("auth_throttle",)),
            self._seconds(t, "forget_after", dt.forget_after, at + ("auth_throttle",)))
        total = self._count(m, "max_connections", d.max_connections, at, 1)
        limits = ClientLimits(
            self._seconds(m, "login_timeout", d.login_timeout, at), total,
            self._count(m, "max_connections_per_user", d.max_connections_per_user, at, 1),
            self._count(m, "max_pending_logins", min(d.max_pending_logins, total), at, 1),
            self._seconds(m, "revocation_check", d.revocation_check, at), throttle)
        if limits.max_pending_logins > limits.max_connections:
            raise self.err(at + ("max_pending_logins",), "must not exceed max_connections")
        return limits

    def _count(self, m: dict, key: str, default: int, at: tuple[Any, ...], low: int) -> int:
        n = m.get(key, default)
        if not isinstance(n, int) or isinstance(n, bool) or n < low:
            raise self.err(at + (key,), f"expected an integer of at least {low}")
        return n

    def _seconds(self, m: dict, key: str, default: float, at: tuple[Any, ...]) -> float:
        try:
            value = parse_duration(m.get(key, default))
        except ValueError as exc:
            raise self.err(at + (key,), str(exc)) from exc
        if value <= 0:
            raise self.err(at + (key,), "must be more than zero")
        return value

    def portal(self, value: Any) -> PortalSettings:
        p = self.mapping(value, ("portal",), {"listen", "public_url", "secret_key_env",
                                              "secret_key_file", "roles", "session_lifetime",
                                              "cookie_secure", "oidc"})
        for k in ("secret_key", "password"):
            if k in p:
                raise self.err(("portal", k), f"secrets must not be inline; use {k}_env or "
                                              f"{k}_file")
        listen = self.listener(p["listen"], ("portal", "listen")) if "listen" in p else \
            Listener("127.0.0.1", 8080)
        url = p.get("public_url") or f"http://{listen.host}:{listen.port}"
        roles = self.mapping(p.get("roles"), ("portal", "roles"),
                             {"managers", "auditors", "admins"})
        groups = {k: self.str_list(roles[k], ("portal", "roles", k)) if k in roles
                  else (k,) for k in ("managers", "auditors", "admins")}
        try:
            lifetime = parse_duration(p.get("session_lifetime", "8h"))
        except ValueError as exc:
            raise self.err(("portal", "session_lifetime"), str(exc)) from exc
        secure = p.get("cookie_secure")
        if secure is not None and not isinstance(secure, bool):
            raise self.err(("portal", "cookie_secure"), "expected true or false")
        return PortalSettings(listen, url.rstrip("/"), self.secret(p, "secret_key", ("portal",)),
                              groups["managers"], groups["auditors"], groups["admins"], lifetime,
                              secure, self.oidc(p.get("oidc")))

    def oidc(self, value: Any) -> OidcSettings | None:
        if value is None:
            return None
        at = ("portal", "oidc")
        o = self.mapping(value, at, {"issuer", "client_id", "client_secret_env",
                                     "client_secret_file", "groups_claim", "username_claim",
                                     "scopes", "label", "client_secret"})
        if "client_secret" in o:
            raise self.err(at + ("client_secret",), "secrets must not be inline; use "
                                                    "client_secret_env or client_secret_file")
        issuer = self.string(o.get("issuer"), at + ("issuer",))
        if not issuer.startswith(("https://", "http://")):
            raise self.err(at + ("issuer",), "expected an https:// URL")
        scopes = self.str_list(o.get("scopes"), at + ("scopes",)) or \
            ("openid", "profile", "email")
        if "openid" not in scopes:
            raise self.err(at + ("scopes",), "must include openid")
        return OidcSettings(
            issuer.rstrip("/"), self.string(o.get("client_id"), at + ("client_id",)),
            self.secret(o, "client_secret", at),
            self.string(o.get("groups_claim", "groups"), at + ("groups_claim",)),
            self.string(o.get("username_claim", "preferred_username"),
                        at + ("username_claim",)),
            scopes, str(o.get("label") or "single sign-on"))


    # ---- integrations (the chat bots)

    def integrations(self, value: dict, connections: dict[str, Connection],
                     policies: dict[str, Policy]) -> ChatSettings | None:
        at = ("integrations",)
        m = self.mapping(value, at, {"listen", "poll_interval", "slack", "teams"})
        if not m.get("slack") and not m.get("teams"):
            return None
        listen = self.listener(m["listen"], at + ("listen",)) if "listen" in m else \
            Listener("127.0.0.1", 3000)
        try:
            poll = parse_duration(m.get("poll_interval", 0.5))
        except ValueError as exc:
            raise self.err(at + ("poll_interval",), str(exc)) from exc
        slack = self.slack(m["slack"], connections, policies) if m.get("slack") else None
        teams = self.teams(m["teams"], connections) if m.get("teams") else None
        return ChatSettings(listen, slack, teams, poll)

    def _url(self, value: Any, at: tuple[Any, ...]) -> str:
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise self.err(at, f"expected an http(s) URL, got {value!r}")
        return value

    def _chars(self, m: dict, at: tuple[Any, ...]) -> int:
        n = m.get("statement_chars", 700)
        if not isinstance(n, int) or isinstance(n, bool) or not 80 <= n <= 2900:
            raise self.err(at + ("statement_chars",), "expected an integer from 80 to 2900")
        return n

    def _required_secret(self, m: dict, key: str, at: tuple[Any, ...], why: str) -> SecretRef:
        ref = self.secret(m, key, at)
        if ref is None:
            raise self.err(at + (f"{key}_env",), f"{why}: give {key}_env or {key}_file")
        return ref

    def _name_map(self, value: Any, at: tuple[Any, ...], known: dict[str, Any],
                  what: str) -> dict[str, str]:
        raw = self.mapping(value, at)
        for k, v in raw.items():
            if k not in known:
                raise self.err(at + (k,), f"unknown {what} {k!r}")
            self.string(v, at + (k,))
        return dict(raw)

    def slack(self, value: Any, connections: dict[str, Connection],
              policies: dict[str, Policy]) -> SlackSettings:
        at = ("integrations", "slack")
        secrets = {f"{k}_{s}" for k in ("bot_token", "signing_secret", "app_token")
                   for s in ("env", "file")}
        m = self.mapping(value, at, secrets | {"mode", "channel", "channels", "reminders",
                                               "api_base_url", "statement_chars", "app_token"})
        if "app_token" in m:
            raise self.err(at + ("app_token",), "secrets must not be inline; use app_token_env "
                                                "or app_token_file")
        mode = m.get("mode", "http")
        if mode not in ("http", "socket"):
            raise self.err(at + ("mode",), "expected http or socket")
        bot = self._required_secret(m, "bot_token", at, "the bot token (xoxb-...) is required")
        signing = self.secret(m, "signing_secret", at)
        app_token = self.secret(m, "app_token", at)
        if mode == "http" and signing is None:
            raise self.err(at + ("signing_secret_env",), "HTTP mode checks request signatures: "
                           "give signing_secret_env or signing_secret_file")
        if mode == "socket" and app_token is None:
            raise self.err(at + ("app_token_env",), "Socket Mode needs an app-level token "
                           "(xapp-...): give app_token_env or app_token_file")
        channel = self.string(m.get("channel"), at + ("channel",))
        ch = self.mapping(m.get("channels"), at + ("channels",), {"connections", "policies"})
        conn_ch = self._name_map(ch.get("connections"), at + ("channels", "connections"),
                                 connections, "connection")
        pol_ch = self._name_map(ch.get("policies"), at + ("channels", "policies"), policies,
                                "policy")
        rem_raw = m.get("reminders") or []
        if not isinstance(rem_raw, list):
            rem_raw = [rem_raw]
        reminders = []
        for i, r in enumerate(rem_raw):
            try:
                reminders.append(parse_duration(r))
            except ValueError as exc:
                raise self.err(at + ("reminders", i), f"{exc} (time before expiry)") from exc
        base = self._url(m["api_base_url"], at + ("api_base_url",)) if "api_base_url" in m \
            else None
        if base and not base.endswith("/"):
            base += "/"
        return SlackSettings(bot, signing, app_token, mode, channel, conn_ch, pol_ch,
                             tuple(sorted(reminders, reverse=True)), base, self._chars(m, at))

    def teams(self, value: Any, connections: dict[str, Connection]) -> TeamsSettings:
        at = ("integrations", "teams")
        m = self.mapping(value, at, {"app_id", "app_password_env", "app_password_file",
                                     "tenant_id", "service_url", "conversation_id",
                                     "conversations", "openid_metadata_url", "issuer",
                                     "token_url", "statement_chars"})
        defaults = TeamsSettings("", SecretRef(), "", "", "")
        return TeamsSettings(
            app_id=self.string(m.get("app_id"), at + ("app_id",)),
            app_password=self._required_secret(m, "app_password", at,
                                               "the bot's client secret is required"),
            tenant_id=self.string(m.get("tenant_id"), at + ("tenant_id",)),
            service_url=self._url(m.get("service_url"), at + ("service_url",)).rstrip("/"),
            conversation_id=self.string(m.get("conversation_id"), at + ("conversation_id",)),
            connection_conversations=self._name_map(
                self.mapping(m.get("conversations"), at + ("conversations",),
                             {"connections"}).get("connections"),
                at + ("conversations", "connections"), connections, "connection"),
            openid_metadata_url=self._url(m.get("openid_metadata_url",
                                                defaults.openid_metadata_url),
                                          at + ("openid_metadata_url",)),
            issuer=self.string(m.get("issuer", defaults.issuer), at + ("issuer",)),
            token_url=self._url(m.get("token_url", defaults.token_url), at + ("token_url",)),
            statement_chars=self._chars(m, at),
        )


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the config file (``-c`` / ``KEYTURN_CONFIG`` / ./keyturn.yaml)."""
    path = str(path or os.environ.get("KEYTURN_CONFIG") or "keyturn.yaml")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    return _Validator(_Doc(path, text)).run()


def parse_config(text: str, path: str = "<config>") -> Config:
    return _Validator(_Doc(path, text)).run()
