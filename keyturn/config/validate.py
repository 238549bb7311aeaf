"""Validate ``keyturn.yaml`` into a ``Config``: the core's sections (store, identity,
policies, connections, gateway), then every registered section.

The whole file is validated at start-up; every error names the file, the line and the
key path. A connection is validated by its registered connection type (its target
schema, its options); a ``gateway:`` key is a listener when a registered type names it
so; a top-level key that is not the core's belongs to a registered section
(keyturn.config.registry). Secrets are never inline: they are referenced with ``*_env``
or ``*_file`` and resolved only when used.

What it must not do: open network connections, touch the store, or know a protocol or
an edge by name: what it knows of them comes from the registry.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from keyturn.config import registry
from keyturn.config.checks import Checker
from keyturn.config.model import (
    ACTIONS,
    MASK_REFUSALS,
    MASK_STYLES,
    REVIEW_MODES,
    AuthThrottle,
    ClientLimits,
    Config,
    Connection,
    GatewaySettings,
    Listener,
    MaskSettings,
    Match,
    Policy,
    ReviewSettings,
    Rule,
    User,
)
from keyturn.config.values import fold_identifiers
from keyturn.config.yamldoc import Doc, KeyPath
from keyturn.errors import ConfigError
from keyturn.request import known_classes, resource_kinds

_GATEWAY_KEYS = {"tls", "id", "client_auth", "audit_spool", "recordings", "mask_key_env",
                 "mask_key_file", "limits", "recording_keyframes", "recording_min_free_mib",
                 "max_pending_per_user"}


def _installed_types() -> str:
    names = [t.name for t in registry.connection_types()]
    return ", ".join(names) if names else \
        "none: no registration was imported; keyturn.launch.installed.install() does that"


class Validator(Checker):
    """The core's sections, checked with the helpers every registration uses."""

    def run(self) -> Config:
        top = self.mapping(self.doc.data, (), set(registry.CORE_KEYS) |
                           {s.key for s in registry.sections()})
        url = self.store(top.get("store"))
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
        core = Config(
            path=self.doc.path, store_url=url, users=users, connections=connections,
            policies=policies, gateway=self.gateway(top.get("gateway"), connections),
            integrations=self.mapping(top.get("integrations"), ("integrations",)),
            token_ttl=self.token_ttl(top.get("identity")),
        )
        settings = {s.name: s.validate(self, top.get(s.key), core) for s in registry.sections()}
        return dataclasses.replace(core, sections=settings)

    def store(self, value: Any) -> str:
        store = self.mapping(value, ("store",), {"url", "url_env"})
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
            url = "sqlite:///" + self.relative_path(url[len("sqlite:///"):])
        return url

    def token_ttl(self, ident: Any) -> float:
        return self.duration((ident or {}).get("token_ttl", "90d"), ("identity", "token_ttl"))

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

    # ---- policies

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

    def rule(self, value: Any, at: KeyPath) -> Rule:
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

    def review_settings(self, value: Any, at: KeyPath) -> ReviewSettings:
        rv = self.mapping(value, at, {"approvers", "min_approvals", "timeout", "mode",
                                      "escalate"})
        approvers = self.str_list(rv.get("approvers"), at + ("approvers",))
        if not approvers:
            raise self.err(at + ("approvers",), "a review needs approver groups")
        n = rv.get("min_approvals", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise self.err(at + ("min_approvals",), "expected an integer >= 1")
        timeout = self.duration(rv.get("timeout", "10m"), at + ("timeout",))
        mode = rv.get("mode", "hold")
        if mode not in REVIEW_MODES:
            raise self.err(at + ("mode",), "expected hold or defer")
        if rv.get("escalate") is None:
            return ReviewSettings(approvers, n, timeout, mode)
        esc = self.mapping(rv["escalate"], at + ("escalate",), {"after", "to"})
        to = self.str_list(esc.get("to"), at + ("escalate", "to"))
        if not to:
            raise self.err(at + ("escalate", "to"), "name the approver groups to escalate to")
        after = esc.get("after", "50%")
        if isinstance(after, str) and after.strip().endswith("%"):
            try:
                pct = float(after.strip()[:-1])
            except ValueError:
                pct = -1
            if not 0 < pct < 100:
                raise self.err(at + ("escalate", "after"),
                               "expected a percentage of the timeout between 0% and 100%")
            return ReviewSettings(approvers, n, timeout, mode, to, pct / 100, True)
        secs = self.duration(after, at + ("escalate", "after"))
        if not 0 < secs < timeout:
            raise self.err(at + ("escalate", "after"),
                           "expected a time shorter than the review's timeout")
        return ReviewSettings(approvers, n, timeout, mode, to, secs, False)

    def mask_style(self, value: Any, at: KeyPath, *, exempt: bool = False) -> str:
        text = str(value) if isinstance(value, (str, int)) else ""
        kind, _, keep = text.partition(":")
        if exempt and text == "exempt":
            return text
        if kind not in MASK_STYLES or (keep and (kind != "partial" or not keep.isdigit())):
            extra = ", exempt" if exempt else ""
            raise self.err(at, f"expected a mask style: {', '.join(MASK_STYLES)}, "
                               f"partial:N{extra}; got {value!r}")
        return text

    def mask(self, value: Any, at: KeyPath) -> MaskSettings:
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

    # ---- connections and the gateway

    def connections(self, value: Any, policies: dict[str, Policy]) -> dict[str, Connection]:
        if value is None:
            return {}
        if not isinstance(value, list):
            raise self.err(("connections",), "expected a list of connections")
        out: dict[str, Connection] = {}
        for i, spec in enumerate(value):
            at = ("connections", i)
            c = self.mapping(spec, at)
            name = self.string(c.get("name"), at + ("name",))
            if name in out:
                raise self.err(at + ("name",), f"duplicate connection name {name!r}")
            ctype = c.get("type")
            kind = registry.connection_type(ctype) if isinstance(ctype, str) else None
            if kind is None:
                raise self.err(at + ("type",), (
                    f"no gateway for connection type {ctype!r} is installed" if ctype is not None
                    else "is required") + f" (installed: {_installed_types()})")
            self.mapping(c, at, {"name", "type", "target", "policy", "description",
                                 *kind.options})
            policy = self.string(c.get("policy"), at + ("policy",))
            if policy not in policies:
                raise self.err(at + ("policy",), f"unknown policy {policy!r}")
            target = kind.target(self, c.get("target"), at + ("target",), name)
            options = tuple((key, opt.validate(self, c[key], at + (key,)) if key in c
                             else opt.default) for key, opt in kind.options.items())
            description = c.get("description") or ""
            if not isinstance(description, str):
                raise self.err(at + ("description",), "expected a string")
            out[name] = Connection(name, kind.name, target, policy, description, options)
        return out

    def gateway(self, value: Any, connections: dict[str, Connection]) -> GatewaySettings:
        types = [t for t in registry.connection_types() if t.listener]
        g = self.mapping(value, ("gateway",), _GATEWAY_KEYS | {str(t.listener) for t in types})
        client_auth = g.get("client_auth", "scram")
        if client_auth not in ("scram", "password"):
            raise self.err(("gateway", "client_auth"), "expected scram or password")
        tls = self.mapping(g.get("tls"), ("gateway", "tls"), {"cert_file", "key_file"})
        if bool(tls.get("cert_file")) != bool(tls.get("key_file")):
            raise self.err(("gateway", "tls"), "give both cert_file and key_file")
        keyframes = g.get("recording_keyframes", 30)
        if isinstance(keyframes, bool) or not isinstance(keyframes, int | float) or \
                not 1 <= keyframes <= 3600:
            raise self.err(("gateway", "recording_keyframes"),
                           "expected seconds between keyframes, 1 to 3600")
        keep = g.get("recording_min_free_mib", 256)
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= 1 << 30:
            raise self.err(("gateway", "recording_min_free_mib"),
                           "expected MiB the recordings' disk keeps free, 0 or more")
        pending = g.get("max_pending_per_user", 20)
        if isinstance(pending, bool) or not isinstance(pending, int) or \
                not 0 <= pending <= 1_000_000:
            raise self.err(("gateway", "max_pending_per_user"),
                           "expected the pending tickets one user may have at once, "
                           "0 (no limit) or more")
        return GatewaySettings(self.listeners(g, types, connections),
                               tls.get("cert_file"), tls.get("key_file"),
                               str(g.get("id", "gateway")), client_auth,
                               self.relative_path(g.get("audit_spool", "audit-spool")),
                               self.secret(g, "mask_key", ("gateway",)),
                               self.limits(g.get("limits")),
                               self.relative_path(g.get("recordings", "recordings")),
                               float(keyframes), keep, pending)

    def listeners(self, g: dict, types: list[registry.ConnectionType],
                  connections: dict[str, Connection]) -> tuple[tuple[str, Listener], ...]:
        out: list[tuple[str, Listener]] = []
        taken: dict[tuple[str, int], str] = {}
        for t in types:
            key = str(t.listener)
            at = ("gateway", key)
            listen = self.listener(g[key], at) if key in g else t.default_listener
            used = any(c.type == t.name for c in connections.values())
            if listen is None:
                if used and t.gateway:
                    first = next(i for i, c in enumerate(self.doc.data.get("connections") or [])
                                 if isinstance(c, dict) and c.get("type") == t.name)
                    raise self.err(("connections", first, "type"),
                                   f"{t.name} connections need a listener: give "
                                   f"gateway.{key}: HOST:PORT")
                continue
            out.append((key, listen))
            # Two gateways in one process cannot share a socket (port 0: any free port).
            if used and listen.port:
                other = taken.setdefault((listen.host, listen.port), key)
                if other != key:
                    raise self.err(at, f"{listen.host}:{listen.port} is already the listener "
                                       f"of gateway.{other}")
        return tuple(out)

    def limits(self, value: Any) -> ClientLimits:
        at = ("gateway", "limits")
        m = self.mapping(value, at, {f.name for f in fields(ClientLimits)})
        t = self.mapping(m.get("auth_throttle"), at + ("auth_throttle",),
                         {f.name for f in fields(AuthThrottle)})
        d, dt = ClientLimits(), AuthThrottle()
        throttle = AuthThrottle(
            self.count(t, "free_attempts", dt.free_attempts, at + ("auth_throttle",), 0),
            self.seconds(t, "base_delay", dt.base_delay, at + ("auth_throttle",)),
            self.seconds(t, "max_delay", dt.max_delay, at + ("auth_throttle",)),
            self.seconds(t, "forget_after", dt.forget_after, at + ("auth_throttle",)))
        total = self.count(m, "max_connections", d.max_connections, at, 1)
        limits = ClientLimits(
            self.seconds(m, "login_timeout", d.login_timeout, at), total,
            self.count(m, "max_connections_per_user", d.max_connections_per_user, at, 1),
            self.count(m, "max_pending_logins", min(d.max_pending_logins, total), at, 1),
            self.seconds(m, "revocation_check", d.revocation_check, at), throttle,
            large_rows_mib_per_user=self.count(m, "large_rows_mib_per_user",
                                               d.large_rows_mib_per_user, at, 64),
            large_rows_mib=self.count(m, "large_rows_mib", d.large_rows_mib, at, 64))
        if limits.max_pending_logins > limits.max_connections:
            raise self.err(at + ("max_pending_logins",), "must not exceed max_connections")
        if limits.large_rows_mib_per_user > limits.large_rows_mib:
            raise self.err(at + ("large_rows_mib_per_user",), "must not exceed large_rows_mib")
        return limits


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the config file (``-c`` / ``KEYTURN_CONFIG`` / ./keyturn.yaml)."""
    path = str(path or os.environ.get("KEYTURN_CONFIG") or "keyturn.yaml")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    return parse_config(text, path)


def parse_config(text: str, path: str = "<config>") -> Config:
    return Validator(Doc(path, text)).run()
