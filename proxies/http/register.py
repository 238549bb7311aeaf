"""HTTP's registration with the core's config: the ``http`` connection type.

A ``type: http`` connection is one HTTP service, reached through the gateway as
``http(s)://gateway:8443/<connection>/<path>``. Its ``target:`` says where (``url``: the
base URL, ``http://`` or ``https://``, with an optional path prefix), how the target's
certificate is checked (``verify``, default true; ``ca_file``: a PEM bundle of CAs to
trust instead of the system's), how the gateway authenticates to it (``auth``: ``bearer``,
``basic`` or ``header``, the secret always by reference, ``token_env``/``token_file``,
``password_env``/``password_file``, ``value_env``/``value_file``) and whether the target is
told who asks (``identity_header``, e.g. ``X-Keyturn-User``). Options of the connection:
``routes`` (a class per method and path glob, overriding the class by method) and
``inspect_bytes`` (the most of a held request's body the gateway reads and shows in its
ticket; default 1 MiB), ``connect_timeout`` and ``read_timeout`` (seconds to connect to
the target, and the longest silence of the target or of a client reading its answer;
default 10 and 60) and ``max_target_connections`` (the connection's own pool to its
target, default 512; one user holds at most half of it). Its listener is
``gateway.http`` (default 127.0.0.1:8443) and its gateway ``HTTPGateway``. Importing it
also registers HTTP's class vocabulary.

Like every registration this module must stay light: it must not import aiohttp, the
gateway, asyncio or anything that serves connections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keyturn.config import (
    Checker,
    Connection,
    ConnectionType,
    Listener,
    Option,
    SecretRef,
    Target,
    register_connection_type,
)
from keyturn.config.yamldoc import KeyPath
from keyturn.request import Vocabulary, register

#: Least to most risky. ``read``: GET, HEAD, OPTIONS; ``write``: POST, PUT, PATCH;
#: ``delete``: DELETE; ``admin``: only what a connection's ``routes`` call so; ``unknown``:
#: any other method (PROPFIND, TRACE...), or a request the gateway could not read.
CLASSES = ("read", "write", "delete", "admin", "unknown")



def path_key(path: str) -> str:
    """A normalised path as globs match it: with one trailing slash, so ``/export`` and
    ``/export/`` (one handler to most frameworks) are one name."""
    return path if path.endswith("/") else path + "/"


def glob_key(glob: str) -> str:
    """A route's or rule's path glob as it matches ``path_key`` names: ``/export`` and
    ``/export/`` both become ``/export/`` (the path with or without its trailing slash);
    a glob ending in ``*`` stays as it is, so ``/admin/*`` also covers ``/admin``."""
    if glob.endswith("*"):
        return glob
    return glob.rstrip("/") + "/"


def _normalize(kind: str, glob: str) -> str:
    return glob_key(glob) if kind == "paths" else glob


VOCABULARY = register(Vocabulary(
    protocol="http", classes=CLASSES, write_classes=frozenset(CLASSES[1:]),
    resources=("paths", "methods"), normalize=_normalize))

AUTH_KINDS = ("bearer", "basic", "header")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an RFC 9110 token
#: Headers the gateway sets or strips itself: an ``auth.header`` or ``identity_header``
#: may not name them.
RESERVED_HEADERS = frozenset({
    "host", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "content-length", "content-type", "cookie",
    "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "expect"})
DEFAULT_INSPECT = 1 << 20
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_POOL = 512


@dataclass(frozen=True)
class TargetAuth:
    """How the gateway authenticates to the target: ``kind`` bearer (``Authorization:
    Bearer <secret>``), basic (``user`` and the secret as password) or header
    (``header: <secret>``)."""

    kind: str
    secret: SecretRef
    user: str = ""
    header: str = ""


@dataclass(frozen=True)
class HTTPTarget(Target):
    url: str = ""
    verify: bool = True
    ca_file: str | None = None
    auth: TargetAuth | None = None
    identity_header: str | None = None

    @property
    def address(self) -> str:
        return self.url


@dataclass(frozen=True)
class Route:
    """A class for the requests whose method is one of ``methods`` (all when empty) and
    whose normalised path matches ``path`` (a glob; ``*`` crosses ``/``; with or without
    a trailing slash, see ``glob_key``)."""

    path: str
    cls: str
    methods: tuple[str, ...] = ()


def _header_name(check: Checker, value: Any, at: KeyPath) -> str:
    name = check.string(value, at)
    if not _HEADER_NAME.match(name):
        raise check.err(at, f"{name!r} is not a header name")
    if name.lower() in RESERVED_HEADERS:
        raise check.err(at, f"{name} is a header the gateway sets or strips itself")
    return name


def _auth(check: Checker, value: Any, at: KeyPath) -> TargetAuth | None:
    if value is None:
        return None
    a = check.mapping(value, at, {"type", "user", "header", "token_env", "token_file",
                                  "password_env", "password_file", "value_env",
                                  "value_file"})
    kind = a.get("type")
    if kind not in AUTH_KINDS:
        raise check.err(at + ("type",), f"expected one of {', '.join(AUTH_KINDS)}, "
                                        f"got {kind!r}")
    allowed = {"bearer": {"type", "token_env", "token_file"},
               "basic": {"type", "user", "password_env", "password_file"},
               "header": {"type", "header", "value_env", "value_file"}}[kind]
    for key in a:
        if key not in allowed:
            raise check.err(at + (key,), f"not a key of auth type {kind} (expected one of: "
                                         f"{', '.join(sorted(allowed))})")
    if kind == "bearer":
        return TargetAuth(kind, check.required_secret(a, "token", at, "bearer auth needs "
                                                                      "the token"))
    if kind == "basic":
        return TargetAuth(kind, check.required_secret(a, "password", at, "basic auth needs "
                                                                         "the password"),
                          user=check.string(a.get("user"), at + ("user",)))
    return TargetAuth(kind, check.required_secret(a, "value", at, "header auth needs the "
                                                                  "header's value"),
                      header=_header_name(check, a.get("header"), at + ("header",)))


def _target(check: Checker, value: Any, at: KeyPath, name: str) -> HTTPTarget:
    t = check.mapping(value, at, {"url", "verify", "ca_file", "auth", "identity_header"})
    url = check.url(t.get("url"), at + ("url",))
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise check.err(at + ("url",), f"{url!r} has a bad port") from None
    if not parts.hostname or parts.query or parts.fragment or parts.username or \
            parts.password:
        raise check.err(at + ("url",), f"{url!r}: expected scheme://host[:port][/prefix], "
                        "with no query, fragment or credentials (give those under auth)")
    verify = t.get("verify", True)
    if not isinstance(verify, bool):
        raise check.err(at + ("verify",), "expected true or false")
    ca = t.get("ca_file")
    if ca is not None:
        ca = check.relative_path(check.string(ca, at + ("ca_file",)))
        if not Path(ca).is_file():
            raise check.err(at + ("ca_file",), f"cannot read {ca}")
        if parts.scheme != "https":
            raise check.err(at + ("ca_file",), "a CA file is for an https:// target")
    ident = t.get("identity_header")
    return HTTPTarget(host=parts.hostname, port=port, url=url.rstrip("/"), verify=verify,
                      ca_file=ca, auth=_auth(check, t.get("auth"), at + ("auth",)),
                      identity_header=None if ident is None else
                      _header_name(check, ident, at + ("identity_header",)))


def _routes(check: Checker, value: Any, at: KeyPath) -> tuple[Route, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise check.err(at, "expected a list of {path, class, methods}")
    out = []
    for i, spec in enumerate(value):
        r = check.mapping(spec, at + (i,), {"path", "class", "methods"})
        path = check.string(r.get("path"), at + (i, "path"))
        if not path.startswith(("/", "*")):
            raise check.err(at + (i, "path"), "expected a path glob starting with /")
        cls = r.get("class")
        if cls not in CLASSES:
            raise check.err(at + (i, "class"), f"expected one of {', '.join(CLASSES)}")
        methods = tuple(m.upper() for m in check.str_list(r.get("methods"),
                                                          at + (i, "methods")))
        out.append(Route(path, cls, methods))
    return tuple(out)


def _inspect(check: Checker, value: Any, at: KeyPath) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise check.err(at, "expected a number of bytes of at least 1")
    return value


def _seconds(check: Checker, value: Any, at: KeyPath) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise check.err(at, "expected a number of seconds above 0")
    return float(value)


def _pool(check: Checker, value: Any, at: KeyPath) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise check.err(at, "expected a number of connections of at least 2")
    return value


def target_of(conn: Connection) -> HTTPTarget:
    if not isinstance(conn.target, HTTPTarget):
        raise TypeError(f"connection {conn.name!r} is not an http connection "
                        f"(type {conn.type!r})")
    return conn.target


HTTP = register_connection_type(ConnectionType(
    name="http",
    target=_target,
    options={"routes": Option(_routes, ()),
             "inspect_bytes": Option(_inspect, DEFAULT_INSPECT),
             "connect_timeout": Option(_seconds, DEFAULT_CONNECT_TIMEOUT),
             "read_timeout": Option(_seconds, DEFAULT_READ_TIMEOUT),
             "max_target_connections": Option(_pool, DEFAULT_POOL)},
    listener="http",
    default_listener=Listener("127.0.0.1", 8443),
    gateway="proxies.http.gateway:HTTPGateway",
))
