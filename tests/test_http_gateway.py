"""The HTTP gateway: the request target's normalisation and classes (no sockets), the
connection type's validation, and end to end a real ``keyturn up`` in front of a real
aiohttp service, driven with curl and an aiohttp client: tokens, injected credentials,
paths refused or normalised as judged, held requests approved and rejected through the
CLI, bodies too large to inspect, and the audit records of all of it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from keyturn.config import parse_config
from keyturn.errors import ConfigError
from keyturn.tlsutil import ensure_self_signed
from proxies.http.codec import (
    Refused,
    action_of,
    actions_of,
    answered_headers,
    classify,
    forwarded_headers,
    method_overrides,
    normalise,
    summarise,
)
from proxies.http.gateway import _credential
from proxies.http.register import Route, glob_key, target_of
from tests.conftest import Keyturn, free_port, wait_port

TARGET_TOKEN = "target-secret-Q7"

# ---------------------------------------------------------------- paths (no sockets)


@pytest.mark.parametrize("raw, conn, path, query", [
    ("/api/users/1", "api", "/users/1", ""),
    ("/api/users/1?x=1&y=%2F", "api", "/users/1", "x=1&y=%2F"),
    ("/api", "api", "/", ""),
    ("/api/", "api", "/", ""),
    ("//api//users///1", "api", "/users/1", ""),
    ("/api/a/./b/../c", "api", "/a/c", ""),
    ("/api/a/%2e%2E/c", "api", "/c", ""),
    ("/api/a/.%2e/c", "api", "/c", ""),
    ("/api/admin;jsessionid=XYZ/list", "api", "/admin/list", ""),
    ("/api/admin/..;/x", "api", "/x", ""),
    ("/api/%61dmin/%7euser", "api", "/admin/~user", ""),
    ("/api/a%20b/c%3bd", "api", "/a%20b/c%3Bd", ""),
    ("/api/a/b/..", "api", "/a/", ""),
    ("/api/a/", "api", "/a/", ""),
    ("/api/caf%C3%A9", "api", "/caf%C3%A9", ""),
])
def test_paths_are_normalised_to_one_form(raw: str, conn: str, path: str,
                                          query: str) -> None:
    t = normalise(raw)
    assert (t.connection, t.path, t.query) == (conn, path, query)
    # The normal form is a fixed point: what is forwarded judges the same again.
    assert normalise(f"/{conn}{t.path_qs}") == t


@pytest.mark.parametrize("raw, why", [
    ("/api/a%2fb", "encoded slash"),
    ("/api/a%2Fb", "encoded slash"),
    ("/api/a%5cb", "encoded slash"),
    ("/api/a\\b", "backslash"),
    ("/api/..", "climbs above"),
    ("/api/a/../../x", "climbs above"),
    ("/api/%2e%2e/x", "climbs above"),
    ("/api/a%00b", "control character"),
    ("/api/%252e%252e/x", "double-encoded"),
    ("/api/%c0%ae%c0%ae/x", "UTF-8"),
    ("/api/a%zzb", "malformed"),
    ("/api/a%2", "malformed"),
    ("api/x", "origin form"),
])
def test_ambiguous_paths_are_refused(raw: str, why: str) -> None:
    with pytest.raises(Refused) as exc:
        normalise(raw)
    assert exc.value.status == 400 and why in exc.value.message


PIECES = ["a", "B", ".", "..", "%2e", "%2E%2e", ".%2e", "", ";x=1", "%3B", "%2f", "%5C",
          "%61", "%7e", "%25", "%252e", "%00", "%c0%ae", "%C3%A9", "é", " ", "~", "*", "?",
          "%", "%g1", ":", "@"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12), st.text(max_size=30))
def test_normalised_paths_are_fixed_points_with_no_tricks_left(pieces: list[str],
                                                               fuzz: str) -> None:
    """Whatever the client sends: refused, or a path with no dot segments, no empty
    segments but a trailing one, nothing encoded that two servers could read two ways,
    and which normalises to itself (what is judged is what is forwarded)."""
    for raw in ("/api/" + "/".join(pieces), "/api/" + "".join(pieces), "/api/" + fuzz):
        try:
            t = normalise(raw)
        except Refused as exc:
            assert exc.status in (400, 404)
            continue
        assert t.connection == "api" and t.path.startswith("/")
        segments = t.path.split("/")[1:]
        assert all(seg not in (".", "..") for seg in segments)
        assert all(segments[:-1]), t.path
        low = t.path.lower()
        assert "%2f" not in low and "%5c" not in low and "\\" not in t.path
        assert not re.search("%25[0-9a-f]{2}", low)  # no escape that decodes to an escape
        assert normalise(f"/api{t.path_qs}") == t


def test_a_path_names_a_connection() -> None:
    for raw in ("/", "//", "/..", "/%2e%2e/x"):
        with pytest.raises(Refused) as exc:
            normalise(raw)
        assert exc.value.status == 404


def test_classes_by_method_and_by_route() -> None:
    routes = (Route("/admin/*", "admin"), Route("/search", "read", ("POST",)))
    assert classify("GET", "/x", routes)[0] == "read"
    assert classify("HEAD", "/x", ())[0] == "read"
    assert classify("OPTIONS", "/x", ())[0] == "read"
    assert classify("PATCH", "/x", ())[0] == "write"
    assert classify("DELETE", "/x", ())[0] == "delete"
    assert classify("PROPFIND", "/x", ())[0] == "unknown"
    assert classify("GET", "/admin/users", routes) == ("admin", "route /admin/* is admin")
    assert classify("POST", "/search", routes)[0] == "read"
    assert classify("PUT", "/search", routes)[0] == "write"
    a = action_of("DELETE", normalise("/api/orders/7?force=1"), routes)
    assert (a.text, a.cls, a.paths, a.methods) == ("DELETE /orders/7?force=1", "delete",
                                                   ("/orders/7/",), ("DELETE",))


def test_routes_match_with_and_without_a_trailing_slash() -> None:
    routes = (Route("/admin/*", "admin"), Route("/export", "admin", ("GET",)),
              Route("*.json", "read"))
    for path in ("/admin", "/admin/", "/admin/users", "/export", "/export/", "/a.json"):
        assert classify("GET", path, routes)[0] in ("admin", "read"), path
    assert classify("GET", "/admin", routes)[0] == "admin"
    assert classify("GET", "/administrator", routes)[0] == "read"
    assert classify("DELETE", "/exports", routes)[0] == "delete"
    assert (glob_key("/export"), glob_key("/export/"), glob_key("/admin/*"),
            glob_key("/")) == ("/export/", "/export/", "/admin/*", "/")


def test_head_and_method_overrides_are_judged_as_what_they_run_as() -> None:
    t = normalise("/api/orders/7")
    assert [a.methods for a in actions_of("HEAD", t, ())] == [("HEAD",), ("GET",)]
    form = "application/x-www-form-urlencoded"
    assert method_overrides("POST", "_method=delete", b"", form, True) == ("delete",)
    assert method_overrides("POST", "", b"a=1&_method=DELETE", form, True) == ("DELETE",)
    assert method_overrides("POST", "", b'{"_method": "PUT"}', "application/json",
                            True) == ("PUT",)
    multipart = (b'--x\r\nContent-Disposition: form-data; name="_method"\r\n\r\n'
                 b'DELETE\r\n--x--\r\n')
    assert method_overrides("POST", "", multipart, "multipart/form-data; boundary=x",
                            True) == ("DELETE",)
    assert method_overrides("POST", "", b"a" * 10, form, False) == ("PUT", "PATCH", "DELETE")
    assert method_overrides("PUT", "_method=DELETE", b"", form, True) == ()
    acts = actions_of("POST", t, (), ("DELETE", "bad method!"))
    assert [a.cls for a in acts] == ["write", "delete", "unknown"]


def test_hop_by_hop_and_client_credentials_are_not_forwarded() -> None:
    sent = [("Host", "gw"), ("Authorization", "Bearer kt"), ("Connection", "close, X-Hop"),
            ("X-Hop", "1"), ("Keep-Alive", "5"), ("X-Forwarded-For", "6.6.6.6"),
            ("X-Keyturn-User", "root"), ("Accept", "*/*"), ("Cookie", "a=b"),
            ("Transfer-Encoding", "chunked"), ("Content-Length", "3")]
    assert forwarded_headers(sent, drop=["x-keyturn-user"]) == [
        ("Accept", "*/*"), ("Cookie", "a=b"), ("Content-Length", "3")]
    assert answered_headers([("Connection", "keep-alive"), ("Content-Type", "a/b"),
                             ("Transfer-Encoding", "chunked")]) == [("Content-Type", "a/b")]


def test_every_family_of_stripped_headers_is_stripped_in_any_spelling() -> None:
    sent = [("X_Keyturn_User", "root"), ("x-keyturn-user", "root"), ("X-Auth_Token", "t"),
            ("X-HTTP-Method-Override", "DELETE"), ("X_Original_URL", "/admin"),
            ("X-Forwarded-Prefix", "/a"), ("X-Forwarded-Port", "1"), ("True-Client-IP", "1"),
            ("CF-Connecting-IP", "1"), ("Private-Token", "t"), ("Proxy_Authorization", "t"),
            ("My-Header", "ok"), ("Cookie", "keyturn_session=s; app=1"),
            ("Cookie", "keyturn_session=s")]
    assert forwarded_headers(sent, drop=["X-Keyturn-User"]) == [("My-Header", "ok"),
                                                                 ("Cookie", "app=1")]


def test_target_answers_are_scoped_to_their_connection() -> None:
    got = answered_headers(
        [("Set-Cookie", "s=1; Path=/; Domain=svc.internal; HttpOnly"),
         ("Set-Cookie", "t=2; Path=/base/app"), ("Set-Cookie", "__Host-x=1; Path=/"),
         ("Set-Cookie", "u=3"), ("Location", "http://svc:8080/base/next?a=1"),
         ("Location", "https://elsewhere/x"), ("Location", "/base/x"),
         ("X-Keyturn-User", "forged")],
        connection="api", target_url="http://svc:8080/base")
    assert got == [("Set-Cookie", "s=1; Path=/api; HttpOnly"),
                   ("Set-Cookie", "t=2; Path=/api/app"), ("Set-Cookie", "u=3"),
                   ("Location", "/api/next?a=1"), ("Location", "https://elsewhere/x"),
                   ("Location", "/api/x")]


def test_client_credentials() -> None:
    basic = "Basic " + base64.b64encode(b"alice:tok").decode()
    assert _credential("Bearer abc") == ("abc", None)
    assert _credential(basic) == ("tok", "alice")
    assert _credential("Basic " + base64.b64encode(b":tok").decode()) == ("tok", "")
    assert _credential("Basic !!!") == (None, None)
    assert _credential("Basic " + base64.b64encode(b"alice:").decode()) == (None, None)
    assert _credential("") == (None, None)


def test_body_summaries() -> None:
    s = summarise(b'{"a": 1, "b": [1, 2]}', "application/json; charset=utf-8")
    assert s.size == 21 and s.excerpt == '{"a":1,"b":[1,2]}' and len(s.sha256) == 64
    assert summarise(b"\x00\x01", "application/octet-stream").excerpt is None
    assert summarise(b"{not json", "application/json").excerpt is None
    form = b'{"amount":1,"x":"&amount=1000000&"}'
    for ctype in ("application/x-www-form-urlencoded; x=json", "text/json-ish",
                  "application/json; x=1"):
        assert summarise(form, ctype).excerpt is None, ctype
    assert summarise(form, "application/vnd.api+json").excerpt is not None
    assert summarise(form, "application/json", "gzip").excerpt is None
    dup = summarise(b'{"amount": 1, "amount": 1000}', "application/json")
    assert dup.warning is not None and "amount" in dup.warning


# ---------------------------------------------------------------- the connection type

BASE = """\
store: {url: "sqlite:///k.db"}
identity: {users: {alice: {groups: [engineers]}}}
policies: {p: []}
connections:
  - name: api
    type: http
    policy: p
"""


def parse(target: str, extra: str = "") -> Any:
    return parse_config(BASE + f"    target: {target}\n" + extra, "k.yaml")


def test_a_valid_http_connection() -> None:
    cfg = parse("{url: 'https://api.internal:8443/v1/', auth: {type: basic, user: svc, "
                "password_env: API_PW}, identity_header: X-Keyturn-User}",
                "    routes: [{path: /admin/*, class: admin}]\n    inspect_bytes: 2048\n")
    conn = cfg.connections["api"]
    t = target_of(conn)
    assert (t.url, t.host, t.port, t.verify, t.identity_header) == (
        "https://api.internal:8443/v1", "api.internal", 8443, True, "X-Keyturn-User")
    assert t.auth is not None and (t.auth.kind, t.auth.user, t.auth.secret.env) == (
        "basic", "svc", "API_PW")
    assert conn.option("routes") == (Route("/admin/*", "admin"),)
    assert conn.option("inspect_bytes") == 2048
    assert cfg.gateway.listener("http").port == 8443


@pytest.mark.parametrize("target, message", [
    ("{url: 'ftp://x'}", "target.url: expected an http(s) URL"),
    ("{url: 'http://'}", "expected scheme://host"),
    ("{url: 'http://u:p@h/'}", "no query, fragment or credentials"),
    ("{url: 'http://h:99999'}", "bad port"),
    ("{url: 'http://h', auth: {type: bearer}}", "bearer auth needs the token: give "
                                                "token_env or token_file"),
    ("{url: 'http://h', auth: {type: bearer, token: abc}}", "secrets must not be inline"),
    ("{url: 'http://h', auth: {type: header, header: X-Api-Key, value: abc}}",
     "secrets must not be inline; use value_env or value_file"),
    ("{url: 'http://h', auth: {type: header, header: Host, value_env: V}}",
     "a header the gateway sets or strips"),
    ("{url: 'http://h', auth: {type: digest}}", "expected one of bearer, basic, header"),
    ("{url: 'http://h', auth: {type: bearer, token_env: T, user: u}}",
     "not a key of auth type bearer"),
    ("{url: 'http://h', verify: 'no'}", "expected true or false"),
    ("{url: 'https://h', ca_file: /nonexistent/ca.pem}", "cannot read"),
    ("{url: 'http://h', identity_header: 'Bad Header'}", "is not a header name"),
])
def test_bad_http_targets_are_refused_with_file_line_and_key(target: str,
                                                              message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(target)
    assert "k.yaml:8: connections[0].target" in str(exc.value) and message in str(exc.value)


def test_bad_routes_are_refused() -> None:
    with pytest.raises(ConfigError, match="class: expected one of read, write"):
        parse("{url: 'http://h'}", "    routes: [{path: /x, class: superuser}]\n")
    with pytest.raises(ConfigError, match="expected a path glob starting with /"):
        parse("{url: 'http://h'}", "    routes: [{path: x, class: read}]\n")


# ---------------------------------------------------------------- end to end


class Service:
    """A real HTTP service on its own event loop and thread: it answers every request
    with what it received, as JSON, and remembers each one."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.tls = tls
        self.seen: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        rec = {"method": request.method, "path": request.raw_path,
               "headers": list(request.headers.items()), "body": body.decode("latin-1")}
        self.seen.append(rec)
        if request.raw_path.startswith("/base/broken"):
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await resp.prepare(request)
            await resp.write(b"partial " * 100)
            assert request.transport is not None
            request.transport.abort()  # the service dies mid-answer
            return resp
        if request.raw_path.startswith("/base/silent"):
            await asyncio.sleep(2.5)  # longer than the slow connection's read_timeout
            return web.Response(text="late")
        if request.raw_path.startswith("/base/stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await resp.prepare(request)
            for i in range(50):
                await resp.write(b"%05d" % i + b"x" * 1019)
            await resp.write_eof()
            return resp
        return web.json_response({"method": rec["method"], "path": rec["path"],
                                  "bytes": len(body)}, headers={"X-Service": "yes"})

    async def _serve(self) -> None:
        runner = web.ServerRunner(web.Server(self._handle))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self.tls).start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())
        self.ready.set()
        self.loop.run_forever()

    def headers_of(self, n: int = -1) -> dict[str, str]:
        return {k.lower(): v for k, v in self.seen[n]["headers"]}

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


CONFIG = """\
store: {{url: "sqlite:///keyturn.db"}}
gateway:
  http: 127.0.0.1:{hport}
  tls: {{cert_file: {base}/gw.crt, key_file: {base}/gw.key}}
  limits: {{max_connections_per_user: 3}}
portal:
  listen: 127.0.0.1:{pport}
identity:
  users:
    alice: {{groups: [engineers]}}
    bob: {{groups: [approvers]}}
connections:
  - name: api
    type: http
    target:
      url: http://127.0.0.1:{sport}/base
      auth: {{type: bearer, token_file: {base}/target.token}}
      identity_header: X-Keyturn-User
    policy: api
    inspect_bytes: 1024
    routes:
      - {{path: "/admin/*", class: admin}}
      - {{path: "/search", methods: [POST], class: read}}
  - name: secure
    type: http
    target:
      url: https://127.0.0.1:{tport}
      ca_file: {base}/svc.crt
      auth: {{type: header, header: X-Api-Key, value_file: {base}/target.token}}
    policy: api
  - name: nocred
    type: http
    target:
      url: http://127.0.0.1:{sport}
      auth: {{type: bearer, token_env: KEYTURN_TEST_UNSET_TOKEN}}
    policy: api
  - name: badcred
    type: http
    target:
      url: http://127.0.0.1:{sport}
      auth: {{type: bearer, token_file: {base}/bad.token}}
    policy: api
  - name: untrusted
    type: http
    target: {{url: "https://127.0.0.1:{tport}"}}
    policy: api
  - name: slow
    type: http
    target: {{url: "http://127.0.0.1:{sport}/base"}}
    policy: api
    read_timeout: 1
    connect_timeout: 2
policies:
  api:
    default: block
    rules:
      - name: reads
        match: {{class: read}}
        action: allow
      - name: admin-closed
        match: {{class: admin}}
        action: block
        reason: admin endpoints are closed
      - name: deletes-need-approval
        match: {{class: delete}}
        action: review
        review: {{approvers: [approvers], timeout: 1m}}
      - name: order-writes-need-approval
        match: {{class: write, paths: ["/orders", "/orders/*"]}}
        action: review
        review: {{approvers: [approvers], timeout: 1m}}
      - name: expiring
        match: {{class: write, paths: ["/expiring"]}}
        action: review
        review: {{approvers: [approvers], timeout: 2s}}
      - name: deferred-refunds
        match: {{class: write, paths: ["/refunds"]}}
        action: review
        review: {{approvers: [approvers], timeout: 1m, mode: defer}}
      - name: writes
        match: {{class: write}}
        action: allow
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("kthttp")
    ensure_self_signed(base / "gw.crt", base / "gw.key")
    ensure_self_signed(base / "svc.crt", base / "svc.key")
    return base


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    s = Service()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tls_service(certs: Path) -> Iterator[Service]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs / "svc.crt", certs / "svc.key")
    s = Service(ctx)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def kt(service: Service, tls_service: Service, certs: Path) -> Iterator[Keyturn]:
    base = certs
    (base / "target.token").write_text(TARGET_TOKEN + "\n")
    (base / "bad.token").write_text("abc\r\nX-Injected: 1\n")
    hport, pport = free_port(), free_port()
    path = base / "keyturn.yaml"
    path.write_text(CONFIG.format(hport=hport, pport=pport, sport=service.port,
                                  tport=tls_service.port, base=base))
    k = Keyturn(base, path, hport, pport, None)  # type: ignore[arg-type]
    k.cli("db", "upgrade")
    for user in ("alice", "bob"):
        k.tokens[user] = k.cli("token", "create", "--user", user, "-q").stdout.strip()
    k.start()
    wait_port(hport, proc=k.proc)
    CA[0] = str(base / "gw.crt")
    yield k
    k.stop()


CA = [""]  # the gateway's certificate, which curl and the aiohttp client trust


def url(kt: Keyturn, path: str) -> str:
    return f"https://127.0.0.1:{kt.gateway_port}{path}"


def curl(*args: str, timeout: float = 60) -> tuple[int, dict[str, str], str]:
    """curl's status, response headers (lower-cased) and body."""
    res = subprocess.run(["curl", "-sS", "--cacert", CA[0], "--path-as-is", "-D", "-", *args],
                         capture_output=True, timeout=timeout)
    assert res.returncode == 0, res.stderr
    return _parsed(res.stdout)


def _parsed(out: bytes) -> tuple[int, dict[str, str], str]:
    head, _, body = out.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return int(lines[0].split()[1]), headers, body.decode()


def bearer(kt: Keyturn, user: str = "alice") -> list[str]:
    return ["-H", f"Authorization: Bearer {kt.tokens[user]}"]


def audit(kt: Keyturn) -> list[dict]:
    out = kt.cli("audit", "export", "--format", "jsonl").stdout
    return [r for r in map(json.loads, out.splitlines()) if r.get("protocol") == "http"]


def wait_record(kt: Keyturn, pred: Any, timeout: float = 20) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hits = [r for r in audit(kt) if pred(r)]
        if hits:
            return hits[-1]
        time.sleep(0.3)
    raise AssertionError(f"no such audit record; http records: {audit(kt)[-6:]}")


def test_an_allowed_get_passes_with_the_target_credential(kt: Keyturn,
                                                          service: Service) -> None:
    status, headers, body = curl(url(kt, "/api/users/1?x=1"), *bearer(kt),
                                 "-H", "X-Keyturn-User: root", "-H", "X-Forwarded-For: 6.6.6.6")
    assert status == 200 and headers.get("x-service") == "yes", (headers, body)
    assert json.loads(body) == {"method": "GET", "path": "/base/users/1?x=1", "bytes": 0}
    seen = service.headers_of()
    assert seen["authorization"] == f"Bearer {TARGET_TOKEN}"  # the client's never goes
    assert kt.tokens["alice"] not in json.dumps(service.seen[-1])
    assert seen["x-keyturn-user"] == "alice"  # the gateway's, not the client's
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    rec = wait_record(kt, lambda r: r["kind"] == "statement" and
                      r["statement"] == "GET /users/1?x=1")
    assert (rec["user"], rec["connection"], rec["classification"], rec["action"],
            rec["rule"], rec["outcome"]) == ("alice", "api", "read", "allow", "reads", "ok")
    assert rec["detail"]["status"] == 200 and rec["detail"]["bytes_out"] == len(body)
    assert rec["duration_ms"] > 0


def test_basic_auth_with_the_token_as_password(kt: Keyturn, service: Service) -> None:
    status, _, _ = curl(url(kt, "/api/basic"), "-u", f"alice:{kt.tokens['alice']}")
    assert status == 200 and service.seen[-1]["path"] == "/base/basic"
    assert service.headers_of()["authorization"] == f"Bearer {TARGET_TOKEN}"
    # A token with another person's name is refused.
    status, _, body = curl(url(kt, "/api/basic"), "-u", f"bob:{kt.tokens['alice']}")
    assert status == 401 and "another user" in json.loads(body)["error"]


def test_no_or_a_bad_token_gets_401_json(kt: Keyturn, service: Service) -> None:
    n = len(service.seen)
    status, headers, body = curl(url(kt, "/api/users/1"))
    assert status == 401 and "Bearer" in json.loads(body)["error"]
    assert "realm=\"keyturn\"" in headers["www-authenticate"]  # (Bearer, then Basic)
    status, _, body = curl(url(kt, "/api/users/1"), "-H", "Authorization: Bearer nope")
    assert status == 401 and json.loads(body)["error"] == "invalid, expired or revoked token"
    assert len(service.seen) == n  # nothing reached the service
    wait_record(kt, lambda r: r["kind"] == "auth_failed")


@pytest.mark.parametrize("raw, forwarded", [
    ("/api//users///2", "/base/users/2"),
    ("/api/x/%2e%2e/users/3", "/base/users/3"),
    ("/api/users;jsessionid=abc/4", "/base/users/4"),
    ("/api/%75sers/%2E/5", "/base/users/5"),
])
def test_paths_reach_the_target_as_judged(kt: Keyturn, service: Service, raw: str,
                                          forwarded: str) -> None:
    status, _, body = curl(url(kt, raw), *bearer(kt))
    assert status == 200, body
    assert service.seen[-1]["path"] == forwarded


@pytest.mark.parametrize("raw", ["/api/%2e%2e/secret", "/api/a%2fb", "/api/..;/x",
                                 "/api/a%00", "/api/%252e%252e/x"])
def test_ambiguous_paths_are_refused_with_400(kt: Keyturn, service: Service,
                                              raw: str) -> None:
    n = len(service.seen)
    status, _, body = curl(url(kt, raw), *bearer(kt))
    assert status == 400 and json.loads(body)["error"]
    assert len(service.seen) == n


def test_a_route_class_is_judged_whatever_the_path_spelling(kt: Keyturn,
                                                            service: Service) -> None:
    n = len(service.seen)
    for raw in ("/api/admin/users", "/api/%61dmin/users", "/api/x/../admin/users",
                "/api/admin;x=1/users", "/api//admin//users"):
        status, _, body = curl(url(kt, raw), *bearer(kt))
        assert status == 403, (raw, body)
        assert json.loads(body)["rule"] == "admin-closed"
    assert len(service.seen) == n
    # POST /search is a read by route: allowed like a GET.
    status, _, _ = curl(url(kt, "/api/search"), *bearer(kt), "-d", "q=1")
    assert status == 200 and service.seen[-1]["method"] == "POST"


def test_unknown_connection_and_method(kt: Keyturn) -> None:
    status, _, body = curl(url(kt, "/nope/x"), *bearer(kt))
    assert status == 404 and "nope" in json.loads(body)["error"]
    status, _, body = curl(url(kt, "/api/x"), "-X", "PROPFIND", *bearer(kt))
    assert status == 403  # class unknown: no rule names it


def test_an_allowed_write_streams_both_ways(kt: Keyturn, service: Service) -> None:
    async def go() -> tuple[int, int, bytes]:
        async def body() -> Any:
            for _ in range(64):
                yield b"y" * 4096

        tls = ssl.create_default_context(cafile=CA[0])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as s:
            async with s.put(url(kt, "/api/files/big"), data=body(),
                             headers={"Authorization": f"Bearer {kt.tokens['alice']}"}) as r:
                put = json.loads(await r.read())["bytes"]
            async with s.get(url(kt, "/api/stream"),
                             headers={"Authorization": f"Bearer {kt.tokens['alice']}"}) as r:
                return r.status, put, await r.read()

    status, put, streamed = asyncio.run(go())
    assert put == 64 * 4096 and status == 200
    assert len(streamed) == 50 * 1024 and streamed.startswith(b"00000x")
    rec = wait_record(kt, lambda r: r["kind"] == "statement" and
                      r["statement"] == "PUT /files/big")
    assert rec["detail"]["bytes_in"] == 64 * 4096 and rec["outcome"] == "ok"


def _held(kt: Keyturn, args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["curl", "-sS", "--cacert", CA[0], "-D", "-", *args],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _answer(p: subprocess.Popen[bytes]) -> tuple[int, dict[str, str], str]:
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return _parsed(out)


def test_a_held_delete_runs_once_when_approved(kt: Keyturn, service: Service) -> None:
    kt.last_ticket = 0
    p = _held(kt, [url(kt, "/api/orders/7?force=1"), "-X", "DELETE", *bearer(kt)])
    ticket = kt.wait_ticket()
    assert ticket["statement"] == "DELETE /orders/7?force=1"
    assert ticket["protocol"] == "http" and ticket["classification"] == "delete"
    assert not any(s["method"] == "DELETE" for s in service.seen)  # held: not sent yet
    kt.cli("approve", str(ticket["id"]), token_of="bob")
    status, headers, body = _answer(p)
    assert status == 200 and json.loads(body)["method"] == "DELETE"
    assert headers["x-keyturn-ticket"] == str(ticket["id"])
    deletes = [s for s in service.seen if s["method"] == "DELETE"]
    assert [d["path"] for d in deletes] == ["/base/orders/7?force=1"]
    rec = wait_record(kt, lambda r: r["kind"] == "statement" and
                      r["ticket_id"] == ticket["id"])
    assert rec["outcome"] == "executed" and rec["detail"]["status"] == 200
    assert wait_record(kt, lambda r: r["kind"] == "held" and r["ticket_id"] == ticket["id"])


def test_a_held_json_write_shows_its_body_and_sends_exactly_it(kt: Keyturn,
                                                              service: Service) -> None:
    doc = '{"item": "lamp", "qty": 2}'
    p = _held(kt, [url(kt, "/api/orders"), *bearer(kt), "-H",
                   "Content-Type: application/json", "--data-binary", doc])
    ticket = kt.wait_ticket()
    facts = dict(ticket["facts"]) if isinstance(ticket["facts"], list) else ticket["facts"]
    assert facts["excerpt"] == '{"item":"lamp","qty":2}'
    assert facts["body"].startswith(f"{len(doc)} bytes, sha256 ")
    kt.cli("approve", str(ticket["id"]), token_of="bob")
    status, _, body = _answer(p)
    assert status == 200 and json.loads(body)["bytes"] == len(doc)
    assert service.seen[-1]["body"] == doc and service.seen[-1]["method"] == "POST"


def test_a_rejected_request_gets_403_json_naming_ticket_and_approver(
        kt: Keyturn, service: Service) -> None:
    n = len(service.seen)
    p = _held(kt, [url(kt, "/api/orders/8"), "-X", "DELETE", *bearer(kt)])
    ticket = kt.wait_ticket()
    kt.cli("reject", str(ticket["id"]), "--reason", "not during the sale",
           token_of="bob")
    status, _, body = _answer(p)
    doc = json.loads(body)
    assert status == 403
    assert (doc["ticket"], doc["decided_by"], doc["reason"], doc["status"]) == (
        ticket["id"], "bob", "not during the sale", "rejected")
    assert len(service.seen) == n
    rec = wait_record(kt, lambda r: r["kind"] == "statement" and
                      r["ticket_id"] == ticket["id"])
    assert rec["outcome"] == "rejected" and rec["detail"]["status"] == 403


def test_a_client_hanging_up_cancels_its_ticket(kt: Keyturn, service: Service) -> None:
    p = _held(kt, [url(kt, "/api/orders/9"), "-X", "DELETE", *bearer(kt)])
    ticket = kt.wait_ticket()
    p.kill()
    p.communicate()
    kt.last_ticket = ticket["id"] - 1
    assert kt.wait_ticket("cancelled")["id"] == ticket["id"]
    n = len(service.seen)
    res = kt.cli("approve", str(ticket["id"]), token_of="bob", check=False)
    assert res.returncode != 0
    time.sleep(0.5)
    assert len(service.seen) == n


def test_a_held_body_over_the_inspection_cap_gets_413(kt: Keyturn,
                                                      service: Service) -> None:
    n = len(service.seen)
    status, _, body = curl(url(kt, "/api/orders"), *bearer(kt), "--data-binary",
                           "z" * 5000)
    assert status == 413 and "1024 bytes" in json.loads(body)["error"]
    # Chunked, with no length said up front: read up to the cap, then refused.
    status, _, body = curl(url(kt, "/api/orders"), *bearer(kt), "-H",
                           "Transfer-Encoding: chunked", "--data-binary", "z" * 5000)
    assert status == 413
    assert len(service.seen) == n
    # Allowed routes stream whatever their size.
    status, _, body = curl(url(kt, "/api/notes"), *bearer(kt), "-H",
                           "Content-Type: application/octet-stream", "--data-binary",
                           "z" * 5000)
    assert status == 200 and json.loads(body)["bytes"] == 5000
    # But a form POST larger than the cap may name a _method the gateway did not read: it
    # is judged as PUT, PATCH and DELETE too (here: the delete hold, so 413).
    status, _, body = curl(url(kt, "/api/notes"), *bearer(kt), "--data-binary", "z" * 5000)
    assert status == 413


def test_defer_mode_answers_202_and_runs_the_identical_request_once(
        kt: Keyturn, service: Service) -> None:
    args = [url(kt, "/api/refunds"), *bearer(kt), "-H", "Content-Type: application/json",
            "--data-binary", '{"order": 7}']
    status, headers, body = curl(*args)
    doc = json.loads(body)
    assert status == 202 and doc["ticket"] == int(headers["x-keyturn-ticket"])
    n = len(service.seen)
    kt.cli("approve", str(doc["ticket"]), token_of="bob")
    # A different body is not what was approved: held again (deferred anew).
    status, _, _ = curl(*args[:-1], '{"order": 8}')
    assert status == 202 and len(service.seen) == n
    status, _, body = curl(*args)
    assert status == 200 and service.seen[-1]["body"] == '{"order": 7}'
    status, _, _ = curl(*args)
    assert status == 202  # the approval ran once


def test_policy_explain_judges_an_http_request_as_the_gateway_does(kt: Keyturn) -> None:
    out = json.loads(kt.cli("policy", "explain", "--user", "alice", "--connection", "api",
                            "DELETE /orders/7?force=1").stdout)
    assert (out["action"], out["rule"], out["class"]) == ("review", "deletes-need-approval",
                                                         "delete")
    assert out["statements"][0]["paths"] == ["/orders/7/"]  # as globs match it
    out = json.loads(kt.cli("policy", "explain", "--user", "alice", "--connection", "api",
                            "GET /x/../%61dmin/users").stdout)
    assert (out["action"], out["rule"]) == ("block", "admin-closed")
    res = kt.cli("policy", "explain", "--user", "alice", "--connection", "api",
                 "GET /a%2fb", check=False)
    assert res.returncode != 0 and "encoded slash" in res.stderr


def test_head_answers_headers_only(kt: Keyturn, service: Service) -> None:
    status, headers, body = curl(url(kt, "/api/users/1"), "-I", *bearer(kt))
    assert status == 200 and "{" not in body and service.seen[-1]["method"] == "HEAD"
    assert headers["content-type"].startswith("application/json")


def test_an_https_target_is_verified_with_its_ca_file(kt: Keyturn,
                                                      tls_service: Service) -> None:
    status, _, body = curl(url(kt, "/secure/users/1"), *bearer(kt))
    assert status == 200 and json.loads(body)["path"] == "/users/1"
    seen = tls_service.headers_of()
    assert seen["x-api-key"] == TARGET_TOKEN and "authorization" not in seen
    n = len(tls_service.seen)
    status, _, body = curl(url(kt, "/untrusted/users/1"), *bearer(kt))
    assert status == 502 and "certificate" in json.loads(body)["error"]
    assert len(tls_service.seen) == n
    rec = wait_record(kt, lambda r: r["kind"] == "statement" and
                      r["connection"] == "untrusted")
    assert rec["outcome"] == "error" and "certificate" in rec["reason"]


def test_an_expired_hold_gets_403(kt: Keyturn, service: Service) -> None:
    n = len(service.seen)
    status, _, body = curl(url(kt, "/api/expiring"), *bearer(kt), "-d", "x=1", timeout=90)
    doc = json.loads(body)
    assert status == 403 and doc["status"] == "expired" and doc["ticket"]
    assert "expired" in doc["error"] and len(service.seen) == n


def test_an_answer_the_target_breaks_off_reaches_the_client_broken(
        kt: Keyturn, service: Service) -> None:
    res = subprocess.run(["curl", "-sS", "--cacert", CA[0], url(kt, "/api/broken"),
                          *bearer(kt)], capture_output=True, timeout=60)
    assert res.returncode != 0, "a truncated answer was passed off as complete"
    rec = wait_record(kt, lambda r: r["kind"] == "statement" and
                      r["statement"] == "GET /broken")
    assert rec["outcome"] == "error" and "broke off" in rec["reason"]
    assert rec["detail"]["status"] == 200


def test_a_credential_that_cannot_be_read_is_said_at_start_and_gives_502(
        kt: Keyturn, service: Service) -> None:
    assert "connection nocred cannot authenticate to its target" in kt.log()
    assert "KEYTURN_TEST_UNSET_TOKEN is not set" in kt.log()
    n = len(service.seen)
    status, _, body = curl(url(kt, "/nocred/users/1"), *bearer(kt))
    assert status == 502 and "credential" in json.loads(body)["error"]
    assert len(service.seen) == n
    # A secret with a line break would smuggle headers into the target's request.
    status, _, body = curl(url(kt, "/badcred/users/1"), *bearer(kt))
    assert status == 502 and "credential" in json.loads(body)["error"]
    assert len(service.seen) == n
    assert "the secret holds a line break" in kt.log()


def test_requests_in_flight_per_user_are_capped(kt: Keyturn, service: Service) -> None:
    held = []
    for i in range(3):
        held.append(_held(kt, [url(kt, f"/api/orders/{100 + i}"), "-X", "DELETE",
                               *bearer(kt)]))
        kt.wait_ticket()
    status, _, body = curl(url(kt, "/api/users/1"), *bearer(kt))
    assert status == 429 and "too many requests" in json.loads(body)["error"]
    status, _, _ = curl(url(kt, "/api/users/1"), *bearer(kt, "bob"))
    assert status == 200  # another person is not held up
    for p in held:
        p.kill()
        p.communicate()
    end = time.monotonic() + 20
    while time.monotonic() < end:
        status, _, _ = curl(url(kt, "/api/users/1"), *bearer(kt))
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200


def test_a_silent_target_gets_504_after_read_timeout(kt: Keyturn, service: Service) -> None:
    started = time.monotonic()
    status, _, body = curl(url(kt, "/slow/silent"), *bearer(kt))
    assert status == 504 and "read_timeout" in json.loads(body)["error"]
    assert time.monotonic() - started < 2.5
    rec = wait_record(kt, lambda r: r.get("connection") == "slow" and
                      r.get("kind") == "statement" and r.get("outcome") == "error")
    assert "read_timeout" in rec["reason"] and rec["detail"]["status"] is None
    time.sleep(max(0.0, started + 2.7 - time.monotonic()))  # the service's answer ends
