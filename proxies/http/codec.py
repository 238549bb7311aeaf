"""What the HTTP gateway knows about requests, without sockets: the request target split
into connection, normalised path and query; the class of a request; the headers that
pass to the target and back; what a held request's ticket shows.

**Paths.** The path a rule judges is the path the target receives, byte for byte:
``normalise`` turns the raw request target into one canonical form and the gateway
forwards exactly that form. Every segment is percent-decoded (``%2e``, ``%7E``, any
case of hex digits), matrix parameters are dropped (``/a;jsessionid=1/b`` -> ``/a/b``),
``.`` segments and empty ones (``//``) vanish, ``..`` removes the segment before it,
and the result is encoded again one way (unreserved characters and the sub-delimiters
as they are, everything else as ``%XX`` upper case). What could mean two things to
two servers is refused instead (``Refused``, rendered as 400): an encoded slash or
backslash, a literal backslash, NUL and other control characters, bytes that are not
UTF-8 (overlong dots such as ``%c0%ae``), a percent sign that decodes to another
escape (``%252e``: decoded twice by some servers), a malformed escape, and a ``..`` that
would climb above the connection's root.

This module must not import asyncio, sockets or aiohttp (the sans-I/O contract), nor
decide what a request may do (keyturn.policy does).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import quote

from proxies.http.register import Route

METHOD_CLASSES = {"GET": "read", "HEAD": "read", "OPTIONS": "read", "POST": "write",
                  "PUT": "write", "PATCH": "write", "DELETE": "delete"}
#: Hop-by-hop headers (RFC 9110 7.6.1) and the ones the gateway owns: never copied from
#: the client to the target. Authorization carries the client's Keyturn token; the
#: Forwarded family is set by the gateway (a client could name any address in it).
CLIENT_DROPPED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "host", "authorization", "expect",
    "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
#: Headers of the target's answer never copied to the client (hop-by-hop).
TARGET_DROPPED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade"})
# Characters of a segment kept as they are when it is encoded again: RFC 3986's
# unreserved ones and the sub-delimiters but ``;`` (a matrix parameter to some servers),
# plus ``:`` and ``@``.
_SAFE = "-._~!$&'()*+,=:@"
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_ESCAPED_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
EXCERPT = 400  # characters of a JSON body shown in a ticket


class Refused(Exception):
    """A request the gateway will not judge, with the HTTP status and why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Target:
    """Where a request goes: the connection's name, the normalised path under it (always
    starting with ``/``) and the query string exactly as the client sent it."""

    connection: str
    path: str
    query: str

    @property
    def path_qs(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")


def _segment(raw: str) -> str:
    """One path segment, decoded, or Refused."""
    raw = raw.split(";", 1)[0]  # matrix parameters: dropped
    if "\\" in raw:
        raise Refused(400, "a backslash in the path is ambiguous (a separator to some "
                           "servers)")
    data = raw.encode("utf-8", "surrogateescape")
    if b"%" in _ESCAPE.sub(b"", data):
        raise Refused(400, "a malformed percent-escape in the path")

    def decode(m: re.Match[bytes]) -> bytes:
        byte = int(m.group(1), 16)
        if byte in (0x2F, 0x5C):
            raise Refused(400, "an encoded slash or backslash (%2F, %5C) in the path is "
                               "ambiguous; it is refused")
        return bytes([byte])

    try:
        text = _ESCAPE.sub(decode, data).decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "the path does not decode to UTF-8 (overlong or stray "
                           "bytes)") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise Refused(400, "a control character (NUL...) in the path")
    if _ESCAPED_ESCAPE.search(text):
        raise Refused(400, "a double-encoded escape (%25XX) in the path is ambiguous; it "
                           "is refused")
    return text


def normalise(raw_target: str) -> Target:
    """The request target (``/<connection>/<path>[?query]``, as on the request line)
    split and normalised; Refused when it is ambiguous or names no connection."""
    if not raw_target.startswith("/"):
        raise Refused(400, "expected a path starting with / (origin form)")
    if "#" in raw_target:
        raise Refused(400, "a fragment (#) in the request target")
    path, _, query = raw_target.partition("?")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in query):
        raise Refused(400, "a control character or space in the query")
    raw_segments = path.split("/")[1:]
    while raw_segments and raw_segments[0] == "":
        raw_segments.pop(0)  # "//shop/x": the leading empty segments say nothing
    if not raw_segments:
        raise Refused(404, "name a connection: /<connection>/<path>")
    conn = _segment(raw_segments[0])
    if not _NAME.match(conn) or conn in (".", ".."):
        raise Refused(404, f"no connection {conn!r}")
    out: list[str] = []
    rest = raw_segments[1:]
    for i, raw in enumerate(rest):
        seg = _segment(raw)
        last = i == len(rest) - 1
        if seg == "..":
            if not out:
                raise Refused(400, "the path climbs above the connection's root (..)")
            out.pop()
            if last:
                out.append("")  # "/a/b/.." is "/a/"
        elif seg == ".":
            if last:
                out.append("")
        elif seg == "":
            if last:
                out.append("")  # a trailing slash is kept
        else:
            out.append(seg)
    norm = "/" + "/".join(quote(s, safe=_SAFE) for s in out)
    norm = re.sub("/{2,}", "/", norm)
    return Target(conn, norm, query)


def classify(method: str, path: str, routes: Iterable[Route]) -> tuple[str, str]:
    """The class of ``method`` on the normalised ``path`` and why: the first of the
    connection's routes that matches, else the method's class (``unknown`` for a method
    not in the table)."""
    for r in routes:
        if (not r.methods or method in r.methods) and fnmatchcase(path, r.path):
            return r.cls, f"route {r.path} is {r.cls}"
    cls = METHOD_CLASSES.get(method, "unknown")
    return cls, f"{method} is {cls}" if cls != "unknown" else f"method {method} is unknown"


@dataclass(frozen=True)
class HTTPAction:
    """One HTTP request as policy sees it (keyturn.request.Action)."""

    text: str
    cls: str
    reasons: tuple[str, ...]
    paths: tuple[str, ...]
    methods: tuple[str, ...]
    forbidden: str | None = None


def action_of(method: str, target: Target, routes: Iterable[Route]) -> HTTPAction:
    cls, why = classify(method, target.path, routes)
    return HTTPAction(f"{method} {target.path_qs}", cls, (why,), (target.path,), (method,))


def _listed(value: str) -> set[str]:
    return {v.strip().lower() for v in value.split(",") if v.strip()}


def forwarded_headers(headers: Iterable[tuple[str, str]], *, drop: Iterable[str] = ()
                      ) -> list[tuple[str, str]]:
    """The client's headers that go to the target: not hop-by-hop, not those named by its
    Connection header, not the gateway's own (``CLIENT_DROPPED``, ``drop``)."""
    items = list(headers)
    named = set().union(*(_listed(v) for k, v in items if k.lower() == "connection"))
    gone = CLIENT_DROPPED | named | {d.lower() for d in drop}
    return [(k, v) for k, v in items if k.lower() not in gone]


def answered_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The target's headers that go back to the client."""
    items = list(headers)
    named = set().union(*(_listed(v) for k, v in items if k.lower() == "connection"))
    return [(k, v) for k, v in items if k.lower() not in TARGET_DROPPED | named]


@dataclass(frozen=True)
class BodySummary:
    """What a ticket says about a held request's body."""

    size: int
    sha256: str
    excerpt: str | None = None


def summarise(body: bytes, content_type: str) -> BodySummary:
    digest = hashlib.sha256(body).hexdigest()
    excerpt = None
    if body and "json" in content_type.lower():
        try:
            doc = json.loads(body)
        except ValueError:
            excerpt = None
        else:
            text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
            excerpt = text if len(text) <= EXCERPT else text[:EXCERPT] + "…"
    return BodySummary(len(body), digest, excerpt)


__all__ = ["BodySummary", "HTTPAction", "Refused", "Target", "action_of", "answered_headers",
           "classify", "forwarded_headers", "normalise", "summarise"]
