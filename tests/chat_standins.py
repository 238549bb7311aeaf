"""Local stand-ins for the Slack Web API and the Teams (Bot Framework)
connector service, speaking their real wire formats over real HTTP.

Each records every call, keeps the messages it was sent (so a test can check
the final state of a message), and can be told to fail: HTTP errors, 429 with
Retry-After, or "down" (connections refused by closing the listener).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web
from joserfc import jwt
from joserfc.jwk import RSAKey

from tests.conftest import free_port


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    headers: dict[str, str]
    at: float = field(default_factory=time.time)
    status: int = 200


@dataclass
class Failure:
    method: str          # "*" for any
    status: int          # 429, 500, 503 ...
    count: int
    retry_after: float | None = None


class StandIn:
    """An aiohttp server on its own loop in a thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self.calls: list[Call] = []
        self.failures: list[Failure] = []
        self.lock = threading.RLock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        raise NotImplementedError

    def start(self) -> StandIn:
        self.thread.start()
        self.up()
        return self

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def up(self) -> None:
        async def go() -> None:
            self.runner = web.AppRunner(self.app())
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self._run(go())

    def down(self) -> None:
        """Stop listening: clients get connection refused until ``up()``."""
        async def go() -> None:
            if self.runner:
                await self.runner.cleanup()
                self.runner = None
        self._run(go())

    def stop(self) -> None:
        self.down()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def fail(self, method: str, status: int, count: int = 1,
             retry_after: float | None = None) -> None:
        with self.lock:
            self.failures.append(Failure(method, status, count, retry_after))

    def _failure(self, method: str) -> Failure | None:
        with self.lock:
            for f in self.failures:
                if f.count > 0 and f.method in ("*", method):
                    f.count -= 1
                    return f
        return None

    def record(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)

    def calls_to(self, method: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.method == method and c.status == 200]

    def wait_for(self, predicate: Any, timeout: float = 15, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; calls: "
                             f"{[(c.method, c.status) for c in self.calls][-30:]}")


# ---------------------------------------------------------------- Slack

class SlackStandIn(StandIn):
    """``https://slack.com/api/<method>`` plus the Socket Mode websocket."""

    def __init__(self, token: str = "xoxb-test-token", app_token: str = "xapp-test-token"):
        super().__init__()
        self.token = token
        self.app_token = app_token
        # slack id -> users.info "user" object
        self.users: dict[str, dict[str, Any]] = {}
        # (channel, ts) -> the message as it stands now
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}
        self.ts = itertools.count(1)
        self.sockets: list[web.WebSocketResponse] = []
        self.socket_replies: dict[str, dict[str, Any]] = {}
        # channel id -> name, for conversations.info
        self.channel_names: dict[str, str] = {"CAPPROVALS": "approvals",
                                              "CBILLING": "billing-approvals"}

    def add_user(self, slack_id: str, email: str | None, *, confirmed: bool = True) -> None:
        self.users[slack_id] = {"id": slack_id, "name": slack_id.lower(), "deleted": False,
                                "is_bot": False, "is_email_confirmed": confirmed,
                                "profile": {"email": email} if email else {}}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self.api)
        app.router.add_get("/socket", self.socket)
        return app

    async def api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        args: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            raw = await request.text()
            if request.content_type == "application/json":
                args.update(json.loads(raw or "{}"))
            else:
                args.update(dict(parse_qsl(raw)))
        for k in ("blocks", "view"):
            if isinstance(args.get(k), str):
                args[k] = json.loads(args[k])
        call = Call(method, args, dict(request.headers))
        f = self._failure(method)
        if f is not None:
            call.status = f.status
            self.record(call)
            headers = {"Retry-After": str(int(f.retry_after))} if f.retry_after else {}
            body = {"ok": False, "error": "ratelimited" if f.status == 429 else "fatal_error"}
            return web.json_response(body, status=f.status, headers=headers)
        want = self.app_token if method == "apps.connections.open" else self.token
        if request.headers.get("Authorization") != f"Bearer {want}":
            call.status = 401
            self.record(call)
            return web.json_response({"ok": False, "error": "invalid_auth"})
        self.record(call)
        with self.lock:
            return web.json_response(self.dispatch(method, args))

    def dispatch(self, method: str, a: dict[str, Any]) -> dict[str, Any]:
        if method == "auth.test":
            return {"ok": True, "url": "https://example.slack.com/", "team": "Example",
                    "user": "keyturn", "team_id": "T1", "user_id": "UBOT", "bot_id": "B1"}
        if method == "chat.postMessage":
            channel = a["channel"]
            ts = f"{int(time.time())}.{next(self.ts):06d}"
            msg = {"channel": channel, "ts": ts, "text": a.get("text"),
                   "blocks": a.get("blocks"), "thread_ts": a.get("thread_ts")}
            self.messages[(channel, ts)] = msg
            return {"ok": True, "channel": channel, "ts": ts, "message": msg}
        if method == "chat.update":
            key = (a["channel"], a["ts"])
            if key not in self.messages:
                return {"ok": False, "error": "message_not_found"}
            self.messages[key].update(text=a.get("text"), blocks=a.get("blocks"))
            return {"ok": True, "channel": a["channel"], "ts": a["ts"]}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": f"{time.time():.6f}"}
        if method == "chat.getPermalink":
            return {"ok": True, "permalink": f"https://example.slack.com/archives/"
                                             f"{a['channel']}/p{a['message_ts']}"}
        if method == "conversations.info":
            name = self.channel_names.get(a.get("channel", ""))
            return {"ok": True, "channel": {"id": a["channel"], "name": name}} if name else \
                {"ok": False, "error": "channel_not_found"}
        if method == "views.open":
            return {"ok": True, "view": {"id": "V1", **a["view"]}}
        if method == "users.info":
            u = self.users.get(a.get("user", ""))
            return {"ok": True, "user": u} if u else {"ok": False, "error": "user_not_found"}
        if method == "users.lookupByEmail":
            for u in self.users.values():
                if (u["profile"].get("email") or "").lower() == a.get("email", "").lower():
                    return {"ok": True, "user": u}
            return {"ok": False, "error": "users_not_found"}
        if method == "apps.connections.open":
            return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"}
        return {"ok": False, "error": "unknown_method"}

    # ---- what tests look at

    def channel_messages(self, channel: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for (c, _), m in self.messages.items() if c == channel
                    and not m.get("thread_ts")]

    def replies(self, channel: str, ts: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for (c, _), m in self.messages.items() if c == channel
                    and m.get("thread_ts") == ts]

    def dms(self, slack_id: str) -> list[str]:
        with self.lock:
            return [m["text"] for (c, _), m in self.messages.items() if c == slack_id]

    def ephemerals(self, slack_id: str) -> list[str]:
        return [c.args.get("text", "") for c in self.calls_to("chat.postEphemeral")
                if c.args.get("user") == slack_id]

    # ---- Socket Mode

    async def socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1}))
        self.sockets.append(ws)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                data = json.loads(msg.data)
                if "envelope_id" in data:
                    with self.lock:
                        self.socket_replies[data["envelope_id"]] = data
        return ws

    def socket_send(self, kind: str, payload: dict[str, Any]) -> str:
        """Push one envelope to the connected app; returns its envelope id."""
        envelope_id = str(uuid.uuid4())

        async def go() -> None:
            await self.sockets[-1].send_str(json.dumps({
                "envelope_id": envelope_id, "type": kind, "payload": payload,
                "accepts_response_payload": True, "retry_attempt": 0}))
        self.wait_for(lambda: self.sockets, what="a Socket Mode connection")
        self._run(go())
        return envelope_id


# ---------------------------------------------------------------- Teams

class TeamsStandIn(StandIn):
    """The Bot Framework connector service, its token endpoint and the OpenID
    metadata / JWKS that inbound activities are signed against."""

    def __init__(self, app_id: str = "11111111-2222-3333-4444-555555555555",
                 app_password: str = "teams-secret"):
        super().__init__()
        self.app_id = app_id
        self.app_password = app_password
        self.issuer = "https://api.botframework.com"
        self.kid = "test-key-1"
        self.key = RSAKey.generate_key(2048, parameters={"kid": self.kid})
        self.members: dict[str, dict[str, Any]] = {}
        self.activities: dict[tuple[str, str], dict[str, Any]] = {}
        self.ids = itertools.count(1)
        self.tokens: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/openid", self.openid)
        app.router.add_get("/jwks", self.jwks)
        app.router.add_post("/botframework/token", self.token)
        app.router.add_post("/v3/conversations", self.create_conversation)
        app.router.add_post("/v3/conversations/{cid}/activities", self.post_activity)
        app.router.add_put("/v3/conversations/{cid}/activities/{aid}", self.put_activity)
        app.router.add_post("/v3/conversations/{cid}/activities/{aid}", self.reply_activity)
        app.router.add_get("/v3/conversations/{cid}/members/{uid}", self.member)
        app.router.add_get("/v3/conversations/{cid}/members", self.roster)
        return app

    def rotate_key(self) -> None:
        """Publish a new signing key (new kid) instead of the old one."""
        self.kid = f"test-key-{uuid.uuid4().hex[:6]}"
        self.key = RSAKey.generate_key(2048, parameters={"kid": self.kid})

    def public_jwk(self) -> dict[str, Any]:
        return {**self.key.as_dict(private=False), "use": "sig", "alg": "RS256"}

    def sign(self, claims: dict[str, Any] | None = None, *, key: Any = None,
             kid: str | None = None) -> str:
        now = int(time.time())
        body = {"iss": self.issuer, "aud": self.app_id, "iat": now - 5, "nbf": now - 5,
                "exp": now + 600, "serviceurl": self.url}
        body.update(claims or {})
        header = {"alg": "RS256", "kid": kid or self.kid, "typ": "JWT"}
        return jwt.encode(header, body, key or self.key)

    def add_member(self, user_id: str, aad: str, email: str) -> None:
        self.members[user_id] = {"id": user_id, "aadObjectId": aad, "email": email,
                                 "userPrincipalName": email, "name": email.split("@")[0]}

    async def openid(self, _r: web.Request) -> web.Response:
        self.record(Call("openid", {}, {}))
        return web.json_response({"issuer": self.issuer, "jwks_uri": f"{self.url}/jwks",
                                  "id_token_signing_alg_values_supported": ["RS256"]})

    async def jwks(self, _r: web.Request) -> web.Response:
        self.record(Call("jwks", {}, {}))
        return web.json_response({"keys": [self.public_jwk()]})

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        call = Call("token", form, dict(request.headers))
        if form.get("client_id") != self.app_id or form.get("client_secret") != \
                self.app_password or form.get("grant_type") != "client_credentials":
            call.status = 401
            self.record(call)
            return web.json_response({"error": "invalid_client"}, status=401)
        self.record(call)
        tok = f"bf-{uuid.uuid4()}"
        with self.lock:
            self.tokens.add(tok)
        return web.json_response({"token_type": "Bearer", "expires_in": 3600,
                                  "access_token": tok})

    async def _guard(self, request: web.Request, method: str, args: dict[str, Any]
                     ) -> web.Response | None:
        call = Call(method, args, dict(request.headers))
        f = self._failure(method)
        if f is not None:
            call.status = f.status
            self.record(call)
            headers = {"Retry-After": str(int(f.retry_after))} if f.retry_after else {}
            return web.json_response({"error": {"code": "ServiceError"}}, status=f.status,
                                     headers=headers)
        auth = request.headers.get("Authorization", "")
        with self.lock:
            ok = auth.startswith("Bearer ") and auth[7:] in self.tokens
        if not ok:
            call.status = 401
            self.record(call)
            return web.json_response({"error": {"code": "Unauthorized"}}, status=401)
        self.record(call)
        return None

    async def create_conversation(self, request: web.Request) -> web.Response:
        body = await request.json()
        refused = await self._guard(request, "create_conversation", body)
        if refused:
            return refused
        return web.json_response({"id": f"a:1on1-{body['members'][0]['id']}"})

    async def post_activity(self, request: web.Request) -> web.Response:
        body = await request.json()
        cid = request.match_info["cid"]
        refused = await self._guard(request, "post_activity", {"conversation": cid, **body})
        if refused:
            return refused
        aid = f"act-{next(self.ids)}"
        with self.lock:
            self.activities[(cid, aid)] = body
        return web.json_response({"id": aid}, status=201)

    async def reply_activity(self, request: web.Request) -> web.Response:
        """ReplyToActivity: a reply in the thread of an existing activity."""
        body = await request.json()
        cid, parent = request.match_info["cid"], request.match_info["aid"]
        refused = await self._guard(request, "reply_activity",
                                    {"conversation": cid, "parent": parent, **body})
        if refused:
            return refused
        with self.lock:
            if (cid, parent) not in self.activities:
                return web.json_response({"error": {"code": "NotFound"}}, status=404)
            aid = f"act-{next(self.ids)}"
            self.activities[(cid, aid)] = body
        return web.json_response({"id": aid}, status=201)

    async def put_activity(self, request: web.Request) -> web.Response:
        body = await request.json()
        cid, aid = request.match_info["cid"], request.match_info["aid"]
        refused = await self._guard(request, "put_activity",
                                    {"conversation": cid, "activity": aid, **body})
        if refused:
            return refused
        with self.lock:
            if (cid, aid) not in self.activities:
                return web.json_response({"error": {"code": "NotFound"}}, status=404)
            self.activities[(cid, aid)] = body
        return web.json_response({"id": aid})

    async def member(self, request: web.Request) -> web.Response:
        uid = request.match_info["uid"]
        refused = await self._guard(request, "member", {"user": uid})
        if refused:
            return refused
        m = self.members.get(uid)
        if m is None:
            return web.json_response({"error": {"code": "MemberNotFoundInConversation"}},
                                     status=404)
        return web.json_response(m)

    async def roster(self, request: web.Request) -> web.Response:
        refused = await self._guard(request, "roster", {"conversation": request.match_info["cid"]})
        if refused:
            return refused
        return web.json_response(list(self.members.values()))

    # ---- what tests look at

    def cards(self, conversation: str) -> list[dict[str, Any]]:
        """The current Adaptive Card of every activity in a conversation."""
        with self.lock:
            return [a["attachments"][0]["content"] for (c, _), a in self.activities.items()
                    if c == conversation and a.get("attachments")]

    def texts(self, conversation: str) -> list[str]:
        with self.lock:
            return [a.get("text", "") for (c, _), a in self.activities.items()
                    if c == conversation and a.get("text")]


# ---------------------------------------------------------------- client side helpers

def slack_headers(body: str, secret: str, *, ts: int | None = None,
                  content_type: str = "application/x-www-form-urlencoded") -> dict[str, str]:
    """Headers Slack sends: v0 HMAC-SHA256 of ``v0:<ts>:<body>`` with the signing secret."""
    import hashlib
    import hmac

    ts = int(time.time()) if ts is None else ts
    sig = "v0=" + hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(),
                           hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": sig,
            "Content-Type": content_type}


def block_action(user: str, action_id: str, ticket: int, *, channel: str = "CAPPROVALS",
                 ts: str = "1.000001") -> dict[str, Any]:
    """A ``block_actions`` interaction payload as Slack posts it."""
    return {
        "type": "block_actions", "user": {"id": user, "username": user.lower(), "team_id": "T1"},
        "api_app_id": "A1", "token": "legacy", "team": {"id": "T1", "domain": "example"},
        "container": {"type": "message", "message_ts": ts, "channel_id": channel,
                      "is_ephemeral": False},
        "trigger_id": f"trig-{uuid.uuid4().hex[:8]}", "channel": {"id": channel,
                                                                  "name": "approvals"},
        "message": {"ts": ts, "text": "ticket"}, "response_url": "https://hooks.invalid/x",
        "actions": [{"action_id": action_id, "block_id": f"kt_decide_{ticket}",
                     "value": str(ticket), "type": "button", "action_ts": str(time.time())}],
    }


def view_submission(user: str, ticket: int, text: str, *,
                    channel: str | None = "CAPPROVALS", callback: str = "kt_reject_modal",
                    meta: dict[str, Any] | None = None, block: str = "reason"
                    ) -> dict[str, Any]:
    """A modal's ``view_submission`` payload: ``text`` typed into input ``block``;
    ``meta`` is the private_metadata the modal was opened with."""
    meta = {"ticket": ticket, "channel": channel} if meta is None else meta
    return {
        "type": "view_submission", "user": {"id": user, "team_id": "T1"}, "api_app_id": "A1",
        "team": {"id": "T1"}, "token": "legacy", "trigger_id": "trig-modal",
        "view": {"id": "V1", "type": "modal", "callback_id": callback,
                 "private_metadata": json.dumps(meta),
                 "state": {"values": {block: {block: {"type": "plain_text_input",
                                                      "value": text or None}}}}},
    }


def slash(user: str, text: str) -> dict[str, str]:
    return {"token": "legacy", "team_id": "T1", "channel_id": "CAPPROVALS", "user_id": user,
            "command": "/keyturn", "text": text, "response_url": "https://hooks.invalid/c",
            "trigger_id": "trig-cmd", "api_app_id": "A1"}
