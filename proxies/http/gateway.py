"""The HTTP gateway: one listener for every ``type: http`` connection (aiohttp).

Clients reach a connection as ``http(s)://gateway:8443/<connection>/<path>`` and
authenticate with their Keyturn access token: ``Authorization: Bearer <token>``, or basic
auth with the token as the password (the user name empty or theirs). Each request is one
action:

- the request target is normalised (proxies/http/codec.py: percent-decoding, dot
  segments, ``//``, matrix parameters); what is ambiguous is refused with 400, and the
  target receives exactly the path policy judged;
- its class comes from the method (read, write, delete), or from the connection's
  ``routes``; keyturn.policy decides with the path and method as resources;
- a HEAD is judged as the GET it runs as too, and a POST naming ``_method`` (query or
  body, read first when it is a form or JSON) as each method it may run as; the
  strictest decision wins;
- allowed, it is forwarded with the client's credentials, hop-by-hop, override,
  address and credential headers stripped (codec.STRIPPED) and the target's credential
  (and the identity header) injected, both bodies streamed, the target's cookies and
  redirects scoped to the connection; blocked, the client gets 403 with a JSON body;
- each connection has its own client pool (``max_target_connections``, a user holds at
  most half) and timeouts: a target silent for ``read_timeout`` gets 504;
- ``review`` holds it (keyturn.holds): the body is read, up to the connection's
  ``inspect_bytes`` (larger ones get 413), and shown in the ticket with its size,
  SHA-256, content type, the forwarded headers and, for JSON, an excerpt; the client
  simply waits. Approved, exactly that request is sent once and the answer streamed
  back; rejected or expired, 403 with
  ``{"error", "ticket", "decided_by", "reason"}``. A client that hangs up while it waits
  cancels the ticket. ``defer`` mode answers 202 with the ticket; the identical request
  sent again once it is approved (same headers too) runs once.

Audit: every request has a record (user, connection, method, path, status, bytes,
duration). A forwarded request's intent reaches the spool file before the target is
asked (write-ahead); its outcome completes it.

This module must not decide what a request may do (keyturn.policy does, from the class
codec.py gives) nor what an audit record holds (keyturn.auditschema); it must not forward
a request other than the one that was judged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import secrets
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from keyturn import holds
from keyturn.approvals import TicketRequest, binding_of
from keyturn.auditspool import AuditSpool, AuditUnwritable
from keyturn.bus import DecisionWatcher
from keyturn.config import Connection
from keyturn.errors import ConfigError, StoreUnavailable, Unauthorized
from keyturn.identity import Identity, LoginThrottle
from keyturn.policy import Decision, PolicyEngine
from keyturn.request import Request
from keyturn.services import Services
from portal.settings import PORTAL
from proxies.http.codec import (
    HTTPAction,
    Refused,
    Target,
    actions_of,
    answered_headers,
    bound_headers,
    forwarded_headers,
    may_override,
    method_overrides,
    normalise,
    summarise,
)
from proxies.http.register import HTTPTarget, target_of

log = logging.getLogger(__name__)

PROTOCOL = "http"
CHUNK = 65536
KEEPALIVE = 75.0
GONE_POLL = 0.25  # seconds between looks at a held client's socket
TICKET_HEADER = "X-Keyturn-Ticket"
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None
          ) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _gone(request: web.BaseRequest) -> bool:
    t = request.transport
    return t is None or t.is_closing()


class HTTPGateway:
    def __init__(self, services: Services, audit: AuditSpool):
        self.services = services
        self.config = services.config
        self.audit_spool = audit
        self.watcher = DecisionWatcher(services.approvals, services.store)
        self.holds = holds.HoldService(services.approvals, self.watcher, self.audit,
                                       public_url=PORTAL.of(self.config).public_url)
        self.policy = PolicyEngine(self.config)
        self.limits = self.config.gateway.limits
        self.throttle = LoginThrottle(self.limits.auth_throttle)
        gw = self.config.gateway
        self.tls: ssl.SSLContext | None = None
        if gw.tls_cert_file and gw.tls_key_file:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(gw.tls_cert_file, gw.tls_key_file)
            self.tls = ctx
        # Tokens checked recently: sha256(token) -> (identity, until). A revoked token
        # stops working within revocation_check seconds, as other gateways' sessions end.
        self._tokens: dict[str, tuple[Identity, float]] = {}
        # Requests in flight per user (held ones too): at most
        # limits.max_connections_per_user, so one person cannot take the gateway.
        self.in_flight: Counter[str] = Counter()
        # Requests in flight per (user, connection): at most half the connection's pool.
        self.in_flight_on: Counter[tuple[str, str]] = Counter()
        # One client session per connection: its own pool and timeouts, so a silent or
        # slow target (or one user's unread downloads) cannot take another's connections.
        self._clients: dict[str, aiohttp.ClientSession] = {}
        self._contexts: dict[str, ssl.SSLContext | bool] = {}
        self._runner: web.ServerRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    # ---- lifecycle

    async def start(self) -> None:
        listen = self.config.gateway.listener("http")
        assert listen is not None
        self.watcher.hear_local_decisions(asyncio.get_running_loop())
        self.watcher.start()
        for conn in self.config.connections_of("http"):
            target = target_of(conn)
            connect = float(conn.option("connect_timeout"))
            # auto_decompress off: bodies pass as the target sent them (Content-Encoding
            # too). ``connect`` covers waiting for a pooled connection as well: a full pool
            # answers 504 after it instead of queueing forever.
            self._clients[conn.name] = aiohttp.ClientSession(
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                connector=aiohttp.TCPConnector(
                    limit=int(conn.option("max_target_connections")), limit_per_host=0),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=connect, sock_connect=connect,
                    sock_read=float(conn.option("read_timeout"))))
            self._contexts[conn.name] = _client_tls(target)
            if target.auth is not None:
                try:
                    target.auth.secret.resolve()
                except ConfigError as exc:  # said now; each request through it gets 502
                    log.error("http: connection %s cannot authenticate to its target: %s",
                              conn.name, exc)
        # An idle keep-alive connection is closed after KEEPALIVE (aiohttp keeps one an
        # hour by default). aiohttp has no timeout for reading a request's head.
        server = web.Server(self.handle, access_log=None, keepalive_timeout=KEEPALIVE)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, listen.host, listen.port, ssl_context=self.tls,
                           reuse_address=True, shutdown_timeout=5.0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("http gateway on %s:%d (%d connections, TLS %s)", listen.host, self.port,
                 len(self.config.connections_of("http")), "on" if self.tls else "off")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        for client in self._clients.values():
            await client.close()
        await self.watcher.stop()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def audit(self, **rec: Any) -> None:
        rec.setdefault("protocol", PROTOCOL)
        self.audit_spool.record(**rec)

    # ---- one request

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        addr = request.remote or ""
        ident = await self._authenticate(request, addr)
        if isinstance(ident, web.StreamResponse):
            return ident
        sid = "http-" + secrets.token_hex(8)
        user = ident.user

        def refuse(status: int, rule: str, why: str, statement: str,
                   connection: str | None = None) -> web.Response:
            self.audit(kind="statement", user=user, connection=connection, session_id=sid,
                       client_addr=addr, statement=statement, classification="unknown",
                       action="block", rule=rule, reason=why, outcome="refused",
                       detail={"method": request.method, "status": status})
            return _json(status, {"error": why})

        try:
            target = normalise(request.raw_path)
        except Refused as exc:
            return refuse(exc.status, "builtin:path", exc.message,
                          f"{request.method} {request.raw_path[:1000]}")
        line = f"{request.method} {target.path_qs}"
        conn = self.config.connections.get(target.connection)
        if conn is None or conn.type != PROTOCOL:
            return refuse(404, "builtin:connection",
                          f"no http connection {target.connection!r}", line, target.connection)
        if self.in_flight[user] >= self.limits.max_connections_per_user:
            return refuse(429, "builtin:limits",
                          f"too many requests of user {user} in flight "
                          f"({self.limits.max_connections_per_user}); wait for one to end",
                          line, conn.name)
        share = max(1, int(conn.option("max_target_connections")) // 2)
        if self.in_flight_on[user, conn.name] >= share:
            return refuse(429, "builtin:limits",
                          f"too many requests of user {user} in flight on {conn.name} "
                          f"({share}, half its max_target_connections); wait for one to "
                          f"end", line, conn.name)
        self.in_flight[user] += 1
        self.in_flight_on[user, conn.name] += 1
        try:
            return await _Exchange(self, request, ident, conn, target, sid, addr).run()
        except Exception as exc:
            log.exception("http: the request of %s failed", user)
            self.audit(kind="statement", user=user, connection=conn.name, session_id=sid,
                       client_addr=addr, statement=line,
                       classification="unknown", action="block", rule="builtin:error",
                       reason=f"internal error: {exc!r}", outcome="error",
                       detail={"method": request.method, "status": 500})
            return _json(500, {"error": "internal error in the gateway; see its log"})
        finally:
            self.in_flight[user] -= 1
            if not self.in_flight[user]:
                del self.in_flight[user]
            self.in_flight_on[user, conn.name] -= 1
            if not self.in_flight_on[user, conn.name]:
                del self.in_flight_on[user, conn.name]

    async def _authenticate(self, request: web.BaseRequest,
                            addr: str) -> Identity | web.StreamResponse:
        """The caller's identity from its access token, or the 401 to answer."""
        header = request.headers.get("Authorization", "")
        token, user = _credential(header)
        if token is None:
            # Audited and slowed down like a bad token: probing leaves a trace.
            why = ("no access token" if not header.strip() else
                   "an Authorization header that is not Bearer <token> or basic auth with "
                   "the token as the password")
            return await self._failed(user or "", addr, why, request,
                                      "send your Keyturn access token: Authorization: "
                                      "Bearer <token>, or basic auth with the token as the "
                                      "password")
        key = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        now = time.monotonic()
        hit = self._tokens.get(key)
        ident = hit[0] if hit is not None and hit[1] > now else None
        if ident is None:
            try:
                ident = await asyncio.to_thread(
                    self.services.identities.authenticate_token, token)
            except Unauthorized as exc:
                return await self._failed(user or "", addr, exc.message, request)
            except StoreUnavailable as exc:
                log.error("http: the store is unavailable (%s)", exc)
                return _json(503, {"error": "the gateway cannot check tokens right now"})
            if len(self._tokens) > 10_000:
                self._tokens.clear()
            self._tokens[key] = (ident, now + self.limits.revocation_check)
            wait = self.throttle.success_wait(addr)
            if wait:
                await asyncio.sleep(wait)
        if user and user != ident.user:
            return await self._failed(user, addr, "the token belongs to another user",
                                      request)
        return ident

    async def _failed(self, user: str, addr: str, why: str, request: web.BaseRequest,
                      answer: str | None = None) -> web.StreamResponse:
        """Audit a failed authentication and answer it after the throttle's delay, as the
        PostgreSQL gateway does: one auth_failed record per request (the delay paces
        them per user and per address), and auth_throttled when the delay starts."""
        verdict = self.throttle.failed(user, addr)
        conn = request.raw_path.lstrip("/").split("/", 1)[0].split("?", 1)[0][:100]
        who = dict(user=user or None, client_addr=addr,
                   connection=conn if conn in self.config.connections else None)
        if verdict.started:
            log.warning("http: login throttling started for user %r / address %s (%d / %d "
                        "failures)", user, addr, verdict.failures_user,
                        verdict.failures_addr)
            self.audit(kind="auth_throttled", **who, outcome="delayed",
                       reason="repeated failed logins: failures are answered after a "
                              "growing delay", detail=verdict.detail())
        self.audit(kind="auth_failed", **who, outcome="refused", reason=why,
                   statement=f"{request.method} {request.raw_path[:1000]}",
                   detail=verdict.detail())
        if verdict.wait:
            await asyncio.sleep(verdict.wait)
        return _unauthorized(answer or why)


def _credential(header: str) -> tuple[str | None, str | None]:
    """(token, user name given with it) from an Authorization header."""
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value, None
    if scheme.lower() == "basic" and value:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode(
                "utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        return (password, user) if password else (None, None)
    return None, None


def _unauthorized(why: str) -> web.Response:
    resp = _json(401, {"error": why})
    resp.headers.add("WWW-Authenticate", 'Bearer realm="keyturn"')
    resp.headers.add("WWW-Authenticate", 'Basic realm="keyturn", charset="UTF-8"')
    return resp


def _client_tls(target: HTTPTarget) -> ssl.SSLContext | bool:
    if not target.url.startswith("https:"):
        return True  # aiohttp's default; unused for http://
    if not target.verify:
        return False
    return ssl.create_default_context(cafile=target.ca_file)


class _Exchange:
    """One request: decide, hold if need be, forward, answer, audit."""

    def __init__(self, gw: HTTPGateway, request: web.BaseRequest, ident: Identity,
                 conn: Connection, target: Target, sid: str, addr: str):
        self.gw = gw
        self.request = request
        self.ident = ident
        self.conn = conn
        self.target = target
        self.http = target_of(conn)
        self.sid = sid
        self.addr = addr
        self.method = request.method
        self.started = time.monotonic()
        self.detail: dict[str, Any] = {"method": self.method, "path": target.path,
                                       "query": target.query}
        self.common: dict[str, Any] = {}
        # The body's beginning, read before the decision when it may name a _method (and
        # whether that is the whole body); forwarded ahead of the rest.
        self.prefix: bytes | None = None
        self.whole = True
        self._continued = False

    async def run(self) -> web.StreamResponse:
        cap = int(self.conn.option("inspect_bytes"))
        ctype = self.request.headers.get("Content-Type", "")
        if may_override(self.method, ctype) and self.request.can_read_body:
            self.prefix, self.whole = await self._read_upto(cap)
        overrides = method_overrides(self.method, self.target.query, self.prefix, ctype,
                                     self.whole)
        actions = actions_of(self.method, self.target, self.conn.option("routes", ()),
                             overrides)
        action = actions[0]
        if overrides:
            self.detail["overrides"] = sorted(set(overrides))
        req = Request(user=self.ident.user, groups=self.ident.groups, connection=self.conn,
                      actions=list(actions), client_addr=self.addr, session_id=self.sid,
                      application=self.request.headers.get("User-Agent", "")[:200])
        decision = self.gw.policy.evaluate(req)
        self.common = dict(user=self.ident.user, connection=self.conn.name,
                           session_id=self.sid, client_addr=self.addr, statement=action.text,
                           classification=decision.classification)
        if decision.action == "block":
            return self._refuse(403, {"error": f"blocked by rule {decision.rule}: "
                                               f"{decision.reason}",
                                      "rule": decision.rule, "reason": decision.reason},
                                decision, "blocked")
        body: bytes | None = None
        ticket_id: int | None = None
        if decision.action == "review":
            read = await self._read_inspected(decision)
            if isinstance(read, web.StreamResponse):
                return read
            body = read
            outcome = await self._hold(action, req, decision, body)
            ticket_id = outcome.ticket_id
            if not outcome.run:
                return self._refused_hold(outcome, decision)
        return await self._forward(decision, body, ticket_id)

    def _refuse(self, status: int, body: dict[str, Any], decision: Decision, outcome: str,
                reason: str | None = None, ticket_id: int | None = None) -> web.Response:
        self.gw.audit(kind="statement", action=decision.action, rule=decision.rule,
                      reason=reason or decision.reason, outcome=outcome, ticket_id=ticket_id,
                      duration_ms=self._ms(), detail={**self.detail, "status": status},
                      **self.common)
        return _json(status, body)

    def _ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 3)

    # ---- holding

    async def _read_inspected(self, decision: Decision) -> bytes | web.StreamResponse:
        """A held request's body, whole (up to ``inspect_bytes``), or the 413 to answer."""
        cap = int(self.conn.option("inspect_bytes"))
        request = self.request
        if self.prefix is not None and self.whole:
            return self.prefix
        if not request.can_read_body:
            return b""
        length = request.content_length
        too_big = {"error": f"this request is held for approval and its body is larger than "
                            f"the {cap} bytes the gateway inspects (the connection's "
                            f"inspect_bytes); send a smaller body or ask for the route to "
                            f"be allowed", "limit": cap}
        if length is not None and length > cap:
            return self._refuse(413, too_big, decision, "refused",
                                reason=f"body of {length} bytes over inspect_bytes {cap}")
        if self.prefix is not None:  # read before the decision, and more than the cap
            return self._refuse(413, too_big, decision, "refused",
                                reason=f"body over inspect_bytes {cap}")
        body, whole = await self._read_upto(cap)
        if not whole:
            return self._refuse(413, too_big, decision, "refused",
                                reason=f"body over inspect_bytes {cap}")
        return body

    async def _read_upto(self, cap: int) -> tuple[bytes, bool]:
        """Up to ``cap`` bytes of the body (one more, when there is more) and whether
        that is all of it."""
        await self._continue()
        chunks, size = [], 0
        while size <= cap:
            chunk = await self.request.content.read(cap + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks), size <= cap

    async def _continue(self) -> None:
        """Answer ``Expect: 100-continue`` once the gateway means to read the body (a
        refused request's body is never sent)."""
        if self._continued:
            return
        self._continued = True
        if self.request.headers.get("Expect", "").lower() == "100-continue" and \
                self.request.version >= aiohttp.HttpVersion11:
            await self.request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _hold(self, action: HTTPAction, req: Request, decision: Decision,
                    body: bytes) -> holds.Outcome:
        review = decision.review
        assert review is not None
        ctype = self.request.headers.get("Content-Type", "")
        encoding = self.request.headers.get("Content-Encoding", "")
        summary = summarise(body, ctype, encoding)
        self.detail.update(body_bytes=summary.size, body_sha256=summary.sha256)
        # The approval binds what reaches the target: the request line, the body, and the
        # client's headers that pass (after stripping); another header is another request.
        headers_sha256, shown = bound_headers(self._client_headers())
        binding = binding_of(self.ident.user, self.conn.name, action.text,
                             {"body_sha256": summary.sha256, "content_type": ctype,
                              "headers_sha256": headers_sha256})
        facts = [("target", self.http.url), ("method", self.method),
                 ("path", self.target.path), ("query", self.target.query or "—"),
                 ("content type", ctype or "none"),
                 ("body", f"{summary.size} bytes, sha256 {summary.sha256}"
                          if summary.size else "none")]
        if encoding:
            facts.append(("content encoding", encoding))
        if "overrides" in self.detail:
            facts.append(("judged also as", ", ".join(self.detail["overrides"])))
        facts.append(("headers", "; ".join(shown) if shown else "none"))
        if summary.excerpt is not None:
            facts.append(("excerpt", summary.excerpt))
        if summary.warning is not None:
            facts.append(("warning", summary.warning))
        ticket = TicketRequest(
            requester=self.ident.user, requester_groups=req.groups,
            connection=self.conn.name, statement=action.text,
            classification=decision.classification, rule=decision.rule or "",
            reason=decision.reason, approver_groups=review.approvers,
            min_approvals=review.min_approvals, timeout=review.timeout, mode=review.mode,
            escalate_after=review.escalation_delay(), escalate_to=review.escalate_to,
            client_addr=self.addr, application=req.application, session_id=self.sid,
            protocol=PROTOCOL, gateway_id=self.gw.config.gateway.gateway_id,
            language="http", facts=tuple(facts),
            detail={**self.detail, "content_type": ctype}, binding=binding)
        mine: list[int] = []
        gone: list[str] = []

        def on_held(held: holds.Held) -> None:
            log.info("http: %s %s held (ticket %d)", self.ident.user, action.text,
                     held.ticket_id)

        def on_wait(ticket_id: int | None) -> None:
            if ticket_id is not None:
                mine.append(ticket_id)
                if gone:
                    self.gw.spawn(asyncio.to_thread(self.gw.holds.cancel, ticket_id,
                                                    self.ident.user, gone[0]))

        watch = self.gw.spawn(self._watch_gone(mine, gone))
        try:
            return await self.gw.holds.hold(ticket, binding=binding, noun="request",
                                            on_held=on_held, on_wait=on_wait,
                                            is_gone=lambda: bool(gone) or
                                            _gone(self.request))
        finally:
            watch.cancel()

    async def _watch_gone(self, mine: list[int], gone: list[str]) -> None:
        """While a request is held: the client hanging up cancels its ticket."""
        while not _gone(self.request):
            await asyncio.sleep(GONE_POLL)
        gone.append("the client disconnected while the request was held")
        for ticket_id in list(mine):
            await asyncio.to_thread(self.gw.holds.cancel, ticket_id, self.ident.user,
                                    gone[0])

    def _refused_hold(self, outcome: holds.Outcome, decision: Decision) -> web.Response:
        if outcome.status == holds.DEFERRED:
            self.gw.audit(kind="statement", action="review", rule=decision.rule,
                          reason=outcome.message, outcome=outcome.status,
                          ticket_id=outcome.ticket_id, duration_ms=self._ms(),
                          detail={**self.detail, "status": 202}, **self.common)
            return _json(202, {"message": outcome.message, "ticket": outcome.ticket_id,
                               "url": self.gw.holds.ticket_url(outcome.ticket_id or 0)},
                         {TICKET_HEADER: str(outcome.ticket_id)})
        status = 429 if outcome.status == holds.REFUSED else 403
        body = {"error": outcome.message, "status": outcome.status,
                "ticket": outcome.ticket_id, "decided_by": outcome.decided_by,
                "reason": outcome.comment}
        resp = self._refuse(status, body, decision, outcome.status, reason=outcome.message,
                            ticket_id=outcome.ticket_id)
        if outcome.ticket_id is not None:
            resp.headers[TICKET_HEADER] = str(outcome.ticket_id)
        return resp

    # ---- forwarding

    def _client_headers(self) -> list[tuple[str, str]]:
        """The client's headers that reach the target (codec.forwarded_headers)."""
        http = self.http
        drop = [h for h in (http.identity_header,
                            http.auth.header if http.auth is not None else None) if h]
        return forwarded_headers(self.request.headers.items(), drop=drop)

    def _headers(self) -> list[tuple[str, str]]:
        http = self.http
        out = self._client_headers()
        auth = http.auth
        if auth is not None:
            secret = auth.secret.resolve()
            if any(c in secret for c in "\r\n\0"):
                # It would end the header and start others of its own in the target's request.
                raise ConfigError(f"{auth.secret.where}: the secret holds a line break or NUL")
            if auth.kind == "bearer":
                out.append(("Authorization", f"Bearer {secret}"))
            elif auth.kind == "basic":
                pair = base64.b64encode(f"{auth.user}:{secret}".encode()).decode()
                out.append(("Authorization", f"Basic {pair}"))
            else:
                out.append((auth.header, secret))
        if http.identity_header:
            out.append((http.identity_header, self.ident.user))
        out.append(("X-Forwarded-For", self.addr))
        out.append(("X-Real-IP", self.addr))
        out.append(("X-Forwarded-Proto", "https" if self.gw.tls else "http"))
        return out

    async def _forward(self, decision: Decision, body: bytes | None,
                       ticket_id: int | None) -> web.StreamResponse:
        gw = self.gw
        try:
            headers = self._headers()
        except ConfigError as exc:
            log.error("http: %s", exc)
            return self._refuse(502, {"error": "the gateway cannot read the target's "
                                               "credential; ask an operator"},
                                decision, "error", reason=str(exc), ticket_id=ticket_id)
        # Write-ahead: the intent reaches the spool file before the target is asked.
        gw.audit(kind="intent", n=1, action=decision.action, rule=decision.rule,
                 reason=decision.reason, ticket_id=ticket_id, detail=self.detail,
                 **self.common)
        try:
            gw.audit_spool.flush_ahead()
        except AuditUnwritable as exc:
            gw.audit(kind="statement", n=1, action=decision.action, rule=decision.rule,
                     reason=str(exc), ticket_id=ticket_id, outcome="refused",
                     detail=self.detail, **self.common)
            return _json(503, {"error": str(exc)})
        stats = {"bytes_in": 0, "bytes_out": 0}
        data: Any = None
        if body is not None:
            data = body if body or self.request.can_read_body else None
            stats["bytes_in"] = len(body)
            # The length the approvers saw, whatever framing the client used.
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            if data is not None:
                headers.append(("Content-Length", str(len(body))))
        elif self.prefix is not None and self.whole:
            data = self.prefix  # read before the decision: all of it (the client's framing)
            stats["bytes_in"] = len(self.prefix)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(self.prefix))))
        elif self.request.can_read_body:
            await self._continue()
            data = self._stream_in(stats)
        url = URL(self.http.url + self.target.path_qs, encoded=True)
        client = gw._clients[self.conn.name]
        idle = float(self.conn.option("read_timeout"))
        status: int | None = None
        timed_out = False
        error: str | None = None
        response: web.StreamResponse | None = None
        try:
            async with client.request(
                    self.method, url, headers=headers, data=data, allow_redirects=False,
                    ssl=gw._contexts.get(self.conn.name, True),
                    skip_auto_headers=_SKIP_AUTO) as answer:
                status = answer.status
                response = web.StreamResponse(status=answer.status, reason=answer.reason)
                for k, v in answered_headers(answer.headers.items(),
                                             connection=self.conn.name,
                                             target_url=self.http.url):
                    response.headers.add(k, v)
                if ticket_id is not None:
                    response.headers[TICKET_HEADER] = str(ticket_id)
                await response.prepare(self.request)
                async for chunk in answer.content.iter_chunked(CHUNK):
                    stats["bytes_out"] += len(chunk)
                    # A client that stops reading must not hold the target's connection
                    # for ever: past read_timeout of back-pressure the exchange is cut.
                    async with asyncio.timeout(idle):
                        await response.write(chunk)
                await response.write_eof()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            error = _target_error(self.http, exc, self.conn) if status is None else \
                f"the exchange broke off after the status line: {exc!r}"
            if response is not None and response.prepared:
                # The client must see a broken answer as broken, not as a shorter whole
                # one (aiohttp would end a chunked body cleanly when the handler returns).
                transport = self.request.transport
                if transport is not None:
                    transport.abort()
        outcome = "ok" if error is None and status is not None and status < 400 else "error"
        if ticket_id is not None:
            gw.spawn(asyncio.to_thread(
                gw.services.approvals.finish, ticket_id,
                "execute" if status is not None else "fail", actor=self.ident.user,
                error=None if status is not None else error))
            outcome = "executed" if status is not None else "failed"
        gw.audit(kind="statement", n=1, action=decision.action, rule=decision.rule,
                 reason=error or decision.reason, ticket_id=ticket_id, outcome=outcome,
                 duration_ms=self._ms(), detail={**self.detail, "status": status, **stats},
                 **self.common)
        if response is not None:
            return response
        return _json(504 if timed_out else 502,
                     {"error": error, **({"ticket": ticket_id} if ticket_id else {})})

    async def _stream_in(self, stats: dict[str, int]) -> AsyncIterator[bytes]:
        if self.prefix:  # read before the decision; the rest follows
            stats["bytes_in"] += len(self.prefix)
            yield self.prefix
        async for chunk in self.request.content.iter_chunked(CHUNK):
            stats["bytes_in"] += len(chunk)
            yield chunk


def _target_error(target: HTTPTarget, exc: BaseException, conn: Connection) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLError):
        return f"the certificate of {target.url} could not be verified: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return (f"could not connect to {target.url} within "
                f"{float(conn.option('connect_timeout')):g} s (the connection's "
                f"connect_timeout; its pool may be full)")
    if isinstance(exc, TimeoutError):
        return (f"{target.url} did not answer within "
                f"{float(conn.option('read_timeout')):g} s (the connection's read_timeout)")
    return f"cannot reach {target.url}: {exc}"


__all__ = ["HTTPGateway"]
