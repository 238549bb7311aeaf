"""PostgreSQL's registration with the core's config: the ``postgres`` connection type.

It says what a ``type: postgres`` connection is: its ``target:`` (host, port, dbname,
user, the password by reference, sslmode) validated into a ``PostgresTarget``; its
options (``unknown_functions``, and masking's ``columns``, ``detectors``,
``custom_detectors``); its listener, ``gateway.postgres`` (default 127.0.0.1:6432); and
the gateway the launcher starts for it, ``PostgresGateway``, by name. Importing it also
registers PostgreSQL's class vocabulary (keyturn.analysis.classes).

The launcher imports this module in every process before a config is read (the portal
and the CLI validate postgres connections too), so it must stay light: it must not import
the gateway, the codec, asyncio or anything that serves connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keyturn.analysis.classes import POSTGRES as VOCABULARY
from keyturn.config import (
    Checker,
    Connection,
    ConnectionType,
    Listener,
    SecretRef,
    Target,
    register_connection_type,
)
from keyturn.config.options import class_option, masking_options
from keyturn.config.yamldoc import KeyPath

SSLMODES = ("disable", "prefer", "require", "verify-full")


@dataclass(frozen=True)
class PostgresTarget(Target):
    dbname: str | None = None
    user: str | None = None
    password: SecretRef | None = None
    sslmode: str = "disable"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}/{self.dbname or ''}"


def _target(check: Checker, value: Any, at: KeyPath, name: str) -> PostgresTarget:
    t = check.mapping(value, at, {"host", "port", "dbname", "user", "password_env",
                                  "password_file", "sslmode"})
    port = check.port(t.get("port", 5432), at + ("port",))
    sslmode = t.get("sslmode", "disable")
    if sslmode not in SSLMODES:
        raise check.err(at + ("sslmode",), "expected disable, prefer, require or verify-full")
    return PostgresTarget(
        host=check.string(t.get("host"), at + ("host",)), port=port,
        dbname=t.get("dbname") or name, user=t.get("user"),
        password=check.secret(t, "password", at), sslmode=sslmode,
    )


def target_of(conn: Connection) -> PostgresTarget:
    """A postgres connection's target, typed."""
    if not isinstance(conn.target, PostgresTarget):
        raise TypeError(f"connection {conn.name!r} is not a postgres connection "
                        f"(type {conn.type!r})")
    return conn.target


POSTGRES = register_connection_type(ConnectionType(
    name=VOCABULARY.protocol,
    target=_target,
    options={"unknown_functions": class_option(VOCABULARY.protocol, "write",
                                               "a statement class"),
             **masking_options()},
    listener="postgres",
    default_listener=Listener("127.0.0.1", 6432),
    gateway="proxies.postgres.gateway:PostgresGateway",
))
