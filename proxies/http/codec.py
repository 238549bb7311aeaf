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
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from proxies.http.register import Route, glob_key, path_key

METHOD_CLASSES = {"GET": "read", "HEAD": "read", "OPTIONS": "read", "POST": "write",
                  "PUT": "write", "PATCH": "write", "DELETE": "delete"}
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade"})
#: Headers never copied from the client to the target, by family (docs/http-gateway.md,
#: "What the gateway strips and why"). Names are compared as ``header_key`` spells them
#: (lower case, ``_`` read as ``-``), as WSGI/CGI servers fold them.
STRIPPED = {
    "hop-by-hop": _HOP_BY_HOP | {"host", "expect"},
    # Frameworks run the request as the method these name (Express, Symfony, Laravel,
    # ASP.NET): policy judged the request line's method.
    "method override": frozenset({"x-http-method-override", "x-http-method",
                                  "x-method-override"}),
    # Servers and frameworks route by these instead of the request line (IIS, Symfony,
    # Laminas, Java filters): the target must serve the path that was judged.
    "path override": frozenset({"x-original-url", "x-rewrite-url", "x-original-uri",
                                "x-original-path", "x-envoy-original-path"}),
    # Who is calling, from where: only the gateway vouches for these (it sets
    # X-Forwarded-For, X-Forwarded-Proto and X-Real-IP itself). Every ``x-forwarded-*``
    # goes too (FORWARDED_PREFIXES).
    "client address": frozenset({
        "forwarded", "x-real-ip", "true-client-ip", "x-client-ip", "x-cluster-client-ip",
        "cf-connecting-ip", "fastly-client-ip", "x-originating-ip", "x-remote-ip",
        "x-remote-addr", "client-ip", "x-host", "x-proxyuser-ip", "via"}),
    # The target sees the gateway's credential only (and the identity header): the
    # client's own Keyturn token, and keys of its own for the target, never pass.
    "credential": frozenset({
        "authorization", "proxy-authorization", "x-api-key", "api-key", "apikey",
        "x-apikey", "x-auth-token", "x-access-token", "private-token", "job-token",
        "x-gitlab-token", "x-token", "x-authorization", "x-amz-security-token",
        "x-goog-api-key", "ocp-apim-subscription-key", "x-functions-key"}),
}
#: Every client header beginning so is stripped: the X-Forwarded family (path, prefix,
#: port, scheme, ssl, server, host, uri...) and the gateway's own namespace.
FORWARDED_PREFIXES = ("x-forwarded-", "x-keyturn-")
CLIENT_DROPPED = frozenset().union(*STRIPPED.values())
#: Headers of the target's answer never copied to the client (hop-by-hop), besides its
#: ``X-Keyturn-*`` ones (only the gateway speaks in that namespace).
TARGET_DROPPED = _HOP_BY_HOP
#: The portal's cookies (same host, so a browser sends them to the gateway too): never
#: passed to a target.
OWN_COOKIES = frozenset({"keyturn_session"})
#: Methods frameworks accept as ``_method`` on a POST (Rails, Laravel, Symfony, Spring,
#: Express method-override): when a POST's body may name one the gateway did not read, it
#: is judged as each of them.
OVERRIDING = ("PUT", "PATCH", "DELETE")
# Characters of a segment kept as they are when it is encoded again: RFC 3986's
# unreserved ones and the sub-delimiters but ``;`` (a matrix parameter to some servers),
# plus ``:`` and ``@``.
_SAFE = "-._~!$&'()*+,=:@"
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_ESCAPED_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_MULTIPART_METHOD = re.compile(
    rb'name\s*=\s*"?_method"?[^\r\n]*\r?\n(?:[^\r\n]+\r?\n)*\r?\n([^\r\n]*)', re.I)
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
    connection's routes that matches (its glob with or without the path's trailing slash,
    ``register.glob_key``), else the method's class (``unknown`` for a method not in the
    table)."""
    key = path_key(path)
    for r in routes:
        if (not r.methods or method in r.methods) and fnmatchcase(key, glob_key(r.path)):
            return r.cls, f"route {r.path} is {r.cls}"
    cls = METHOD_CLASSES.get(method, "unknown")
    return cls, f"{method} is {cls}" if cls != "unknown" else f"method {method} is unknown"


@dataclass(frozen=True)
class HTTPAction:
    """One HTTP request as policy sees it (keyturn.request.Action). ``paths`` holds the
    path as globs match it (``register.path_key``: with one trailing slash)."""

    text: str
    cls: str
    reasons: tuple[str, ...]
    paths: tuple[str, ...]
    methods: tuple[str, ...]
    forbidden: str | None = None


def action_of(method: str, target: Target, routes: Iterable[Route],
              why: str | None = None) -> HTTPAction:
    cls, because = classify(method, target.path, routes)
    reasons = (because,) if why is None else (why, because)
    return HTTPAction(f"{method} {target.path_qs}", cls, reasons, (path_key(target.path),),
                      (method,))


def actions_of(method: str, target: Target, routes: Iterable[Route],
               overrides: Iterable[str] = ()) -> list[HTTPAction]:
    """The request as each method it may run as, the declared one first: a HEAD runs the
    GET handler in most frameworks (side effects included), and a POST naming ``_method``
    runs as that method. Policy judges them all; the strictest decision wins."""
    routes = tuple(routes)
    out = [action_of(method, target, routes)]
    seen = {method}
    if method == "HEAD":
        out.append(action_of("GET", target, routes, "a HEAD runs as the GET of its path"))
        seen.add("GET")
    for m in overrides:
        m = m.strip().upper()
        if not _TOKEN.match(m):
            m = "UNREADABLE"  # not a method: class unknown
        if m not in seen:
            seen.add(m)
            out.append(action_of(m, target, routes, f"_method={m} makes the target run "
                                                    f"this {method} as {m}"))
    return out


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """(``type/subtype`` in lower case, parameters) of a Content-Type value."""
    kind, *params = content_type.split(";")
    out = {}
    for p in params:
        name, _, value = p.partition("=")
        out[name.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), out


def _is_json(kind: str) -> bool:
    return kind == "application/json" or (kind.startswith("application/") and
                                          kind.endswith("+json"))


def may_override(method: str, content_type: str) -> bool:
    """Whether the body of this request may name a ``_method`` the target obeys: a POST
    whose body is a form (or has no Content-Type: Rack reads it as one) or JSON
    (Laravel)."""
    if method != "POST":
        return False
    kind = media_type(content_type)[0]
    return kind in ("", "application/x-www-form-urlencoded", "multipart/form-data") or \
        _is_json(kind)


def method_overrides(method: str, query: str, body: bytes | None, content_type: str,
                     whole: bool) -> tuple[str, ...]:
    """The methods a POST asks the target to run as (``_method`` in its query or body);
    ``OVERRIDING`` when its body was not read whole (``whole`` false) and may name one."""
    if method != "POST":
        return ()
    found = [v for k, v in parse_qsl(query, keep_blank_values=True)
             if k.lower() == "_method"]
    if not may_override(method, content_type) or not body and whole:
        return tuple(found)
    if not whole:
        return (*found, *OVERRIDING)
    assert body is not None
    kind = media_type(content_type)[0]
    if kind in ("", "application/x-www-form-urlencoded"):
        text = body.decode("utf-8", "replace")
        found += [v for k, v in parse_qsl(text, keep_blank_values=True)
                  if k.lower() == "_method"]
    elif kind == "multipart/form-data":
        for m in _MULTIPART_METHOD.finditer(body):
            found.append(m.group(1).decode("utf-8", "replace"))
        if b"_method" in body.lower() and not found:
            found += OVERRIDING  # named but not read: any of them
    else:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            found += [str(v) for k, v in doc.items() if k.lower() == "_method"]
    return tuple(found)


def header_key(name: str) -> str:
    """A header name as servers compare it: lower case, ``_`` read as ``-`` (WSGI, CGI,
    PHP-FPM and Rack fold both into ``HTTP_X_NAME``)."""
    return name.lower().replace("_", "-")


def _listed(value: str) -> set[str]:
    return {header_key(v.strip()) for v in value.split(",") if v.strip()}


def _without_own_cookies(value: str) -> str:
    kept = [c for c in value.split(";")
            if c.strip() and c.split("=", 1)[0].strip() not in OWN_COOKIES]
    return ";".join(kept).strip()


def forwarded_headers(headers: Iterable[tuple[str, str]], *, drop: Iterable[str] = ()
                      ) -> list[tuple[str, str]]:
    """The client's headers that go to the target: not hop-by-hop, not those named by its
    Connection header, none of the families in ``STRIPPED`` or ``FORWARDED_PREFIXES``, not
    the gateway's own (``drop``: its identity and credential headers) - all compared as
    ``header_key`` spells them - and without the portal's cookies."""
    items = list(headers)
    named = set().union(*(_listed(v) for k, v in items if header_key(k) == "connection"))
    gone = CLIENT_DROPPED | named | {header_key(d) for d in drop}
    out = []
    for k, v in items:
        key = header_key(k)
        if key in gone or key.startswith(FORWARDED_PREFIXES):
            continue
        if key == "cookie":
            v = _without_own_cookies(v)
            if not v:
                continue
        out.append((k, v))
    return out


def _scoped_cookie(value: str, connection: str, prefix: str) -> str | None:
    """A target's Set-Cookie with its Path moved under ``/<connection>`` (the target's
    ``prefix`` taken off) and no Domain; None for a cookie that cannot be scoped
    (``__Host-``: browsers insist on Path=/)."""
    first, *attrs = value.split(";")
    if first.strip().startswith("__Host-"):
        return None
    kept, path = [], None
    for a in attrs:
        name = a.split("=", 1)[0].strip().lower()
        if name == "domain":
            continue
        if name == "path":
            path = a.split("=", 1)[1].strip() if "=" in a else ""
            continue
        kept.append(a.strip())
    if path is not None:
        rest = path[len(prefix):] if prefix and (path == prefix or path.startswith(
            prefix + "/")) else ("" if prefix else path)
        if rest == "/" or not rest:
            rest = ""
        elif not rest.startswith("/"):
            rest = "/" + rest
        kept.insert(0, f"Path=/{connection}{rest}")
    return "; ".join([first.strip(), *kept])


def _gateway_location(value: str, connection: str, target_url: str) -> str:
    """A target's Location pointing at its own origin (and under its URL's prefix),
    rewritten to the same place through the gateway (an absolute path); others as sent."""
    parts = urlsplit(value)
    base = urlsplit(target_url)
    if parts.scheme or parts.netloc:
        if (parts.scheme.lower(), parts.netloc.lower()) != (base.scheme.lower(),
                                                            base.netloc.lower()):
            return value
    elif not value.startswith("/"):
        return value  # relative to the request's own path: already under the gateway's
    prefix = base.path.rstrip("/")
    path = parts.path
    if prefix and path != prefix and not path.startswith(prefix + "/"):
        return value
    rest = path[len(prefix):] or "/"
    return urlunsplit(("", "", f"/{connection}{rest}", parts.query, parts.fragment))


def answered_headers(headers: Iterable[tuple[str, str]], *, connection: str | None = None,
                     target_url: str = "") -> list[tuple[str, str]]:
    """The target's headers that go back to the client: not hop-by-hop, no
    ``X-Keyturn-*``; with ``connection``, Set-Cookie scoped to it and a Location at the
    target's own origin sent through the gateway."""
    items = list(headers)
    named = set().union(*(_listed(v) for k, v in items if header_key(k) == "connection"))
    prefix = urlsplit(target_url).path.rstrip("/")
    out = []
    for k, v in items:
        key = header_key(k)
        if key in TARGET_DROPPED | named or key.startswith("x-keyturn-"):
            continue
        if connection is not None and key == "set-cookie":
            scoped = _scoped_cookie(v, connection, prefix)
            if scoped is None:
                continue
            v = scoped
        elif connection is not None and key in ("location", "content-location"):
            v = _gateway_location(v, connection, target_url)
        out.append((k, v))
    return out


def bound_headers(forwarded: Iterable[tuple[str, str]]) -> tuple[str, list[str]]:
    """(SHA-256, lines shown to approvers) of the client's headers that reach the target,
    Content-Length aside (the body digest binds it): an approval binds them, so the same
    request with other headers (a tenant, If-Match, an idempotency key) is a new one.
    Cookie values are shown by digest only (they are the client's session)."""
    items = sorted(((k.lower(), v) for k, v in forwarded if k.lower() != "content-length"),
                   key=lambda kv: kv[0])
    digest = hashlib.sha256("\n".join(f"{k}: {v}" for k, v in items).encode(
        "utf-8", "surrogateescape")).hexdigest()
    shown = [f"{k}: <{len(v)} bytes, sha256 {hashlib.sha256(v.encode()).hexdigest()[:16]}>"
             if k == "cookie" else f"{k}: {v}" for k, v in items]
    return digest, shown


@dataclass(frozen=True)
class BodySummary:
    """What a ticket says about a held request's body. ``warning``: what may make the
    target read it otherwise than the excerpt shows."""

    size: int
    sha256: str
    excerpt: str | None = None
    warning: str | None = None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise _Duplicate(dup)
    return dict(pairs)


class _Duplicate(ValueError):
    def __init__(self, keys: list[str]):
        super().__init__(keys)
        self.keys = keys


def summarise(body: bytes, content_type: str, content_encoding: str = "") -> BodySummary:
    """Size, digest and, for a JSON body (media type exactly ``application/json`` or
    ``application/*+json``, no parameter but ``charset``, no Content-Encoding), a compact
    excerpt. Duplicate keys are flagged: servers disagree on which one counts."""
    digest = hashlib.sha256(body).hexdigest()
    kind, params = media_type(content_type)
    if not body or not _is_json(kind) or set(params) - {"charset"} or \
            content_encoding.strip().lower() not in ("", "identity"):
        return BodySummary(len(body), digest)
    warning = None
    try:
        doc = json.loads(body, object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        warning = (f"duplicate keys in the JSON body ({', '.join(exc.keys)}): servers "
                   f"disagree on which one counts; the excerpt shows the last")
        doc = json.loads(body)
    except ValueError:
        return BodySummary(len(body), digest)
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    excerpt = text if len(text) <= EXCERPT else text[:EXCERPT] + "…"
    return BodySummary(len(body), digest, excerpt, warning)


__all__ = ["BodySummary", "HTTPAction", "Refused", "Target", "action_of", "actions_of",
           "answered_headers", "bound_headers", "classify", "forwarded_headers",
           "header_key", "media_type", "method_overrides", "may_override", "normalise",
           "summarise"]
