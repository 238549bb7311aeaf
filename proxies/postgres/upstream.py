"""The gateway's connection to the target PostgreSQL server.

``Upstream.connect`` opens the TCP connection, negotiates TLS when the
connection's ``sslmode`` asks for it, sends the startup packet and logs in
with the stored credentials (trust, cleartext, md5 or SCRAM-SHA-256) — the
client never sees them. After login every framed message is handed to the
client session, which owns all decisions.

It must not decide anything nor show the target's credentials to the client.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from proxies.postgres import codec
from proxies.postgres.auth import AuthError, TargetAuthenticator
from proxies.postgres.codec import ProtocolError
from proxies.postgres.register import target_of

#: A message from a target partly received and larger than this counts against the
#: large-row budgets (gateway.limits.large_rows_mib*, PostgresGateway.large_row).
LARGE_ROW = 1024 * 1024

if TYPE_CHECKING:
    from keyturn.config import Connection
    from proxies.postgres.session import ClientSession

log = logging.getLogger(__name__)
# An ErrorResponse body starting with these (severity first, as PostgreSQL sends it).
_FATAL_SEVERITIES = (b"SFATAL\x00", b"SPANIC\x00")


class UpstreamError(Exception):
    def __init__(self, message: str, sqlstate: str = "08001"):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


class Upstream(asyncio.Protocol):
    def __init__(self, session: ClientSession, conn: Connection):
        self.session = session
        self.conn = conn
        self.reader = codec.BackendReader()
        self.transport: asyncio.Transport | None = None
        self.parameters: dict[str, str] = {}
        self.backend_key: tuple[int, int] | None = None
        self.tx_status = "I"
        self.ready = False
        self._ssl_reply: asyncio.Future[bytes] | None = None
        self._login: asyncio.Future[None] | None = None
        self._auth: TargetAuthenticator | None = None
        self.closed = False
        self.said_fatal = False  # the target's last message was a FATAL/PANIC error

    @classmethod
    async def connect(cls, session: ClientSession, conn: Connection,
                      params: dict[str, str]) -> Upstream:
        loop = asyncio.get_running_loop()
        t = target_of(conn)
        try:
            password = t.password.resolve() if t.password else None
        except Exception as exc:
            raise UpstreamError(f"target credentials unavailable: {exc}") from exc
        try:
            transport, self = await asyncio.wait_for(
                session.gw.open_target(lambda: cls(session, conn), t.host, t.port), 10)
        except (TimeoutError, OSError) as exc:
            raise UpstreamError(f"{t.host}:{t.port}: {exc}") from exc
        try:
            if t.sslmode != "disable":
                await self._negotiate_tls(loop)
            self._auth = TargetAuthenticator(t.user or session.user, password)
            self._login = loop.create_future()
            startup = dict(params, user=t.user or session.user, database=t.dbname or conn.name)
            assert self.transport is not None
            self.transport.write(codec.encode_startup(startup))
            await asyncio.wait_for(self._login, 15)
        except BaseException:
            self.close()
            raise
        return self

    async def _negotiate_tls(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.transport is not None
        self._ssl_reply = loop.create_future()
        self.transport.write(codec.encode_ssl_request())
        reply = await asyncio.wait_for(self._ssl_reply, 10)
        if reply == b"S":
            ctx = ssl.create_default_context()
            if target_of(self.conn).sslmode != "verify-full":
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            try:
                self.transport = await loop.start_tls(self.transport, self, ctx,
                                                      server_hostname=self.conn.target.host)
            except (OSError, ssl.SSLError) as exc:
                raise UpstreamError(f"TLS to the target failed: {exc}") from exc
        elif target_of(self.conn).sslmode in ("require", "verify-full"):
            raise UpstreamError("the target does not accept TLS but sslmode requires it")

    # ---- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes, fast_ok: bool = True) -> None:
        """``fast_ok=False``: the target relay's fast path already declined this chunk."""
        if self._ssl_reply is not None and not self._ssl_reply.done():
            self._ssl_reply.set_result(data[:1])
            if len(data) > 1:
                self._fail(UpstreamError("target sent data after its SSL reply"))
            return
        try:
            if self.ready:
                session = self.session
                fast = session.fast
                if fast is not None and fast_ok and fast.pending and not session.expect and \
                        self.reader.idle and not session.closed and fast.server(data):
                    # The compiled fast path relayed the ordinary answers to what it sent
                    # (see ClientSession); anything else goes the Python way below, where
                    # server_data takes over what the fast path still expects.
                    return
                chunk, frames = self.reader.scan(data)
                if chunk:
                    if frames and frames[-1][0] == b"E":
                        # A FATAL (pg_terminate_backend, shutdown) is the target's last word:
                        # the client gets it, and no second error of ours after it.
                        start = frames[-1][1] + 5
                        self.said_fatal = chunk[start:start + 7] in _FATAL_SEVERITIES
                    session.server_data(chunk, frames)
                if self.reader.pending > LARGE_ROW or session in session.gw.row_buffers:
                    self.count_held()  # (an unread client buffer: pause_writing counts it)
                return
            self.reader.receive_data(data)
            msgs = self.reader.next_messages()
        except ProtocolError as exc:
            log.error("target %s sent invalid protocol: %s", self.conn.name, exc.message)
            self._fail(UpstreamError(f"invalid protocol from the target: {exc.message}"))
            self.session.upstream_lost("invalid protocol from the target")
            return
        except Exception:
            log.exception("relaying from target %s failed", self.conn.name)
            self.session.fatal("XX000", "keyturn: internal error in the gateway (see its log)")
            return
        self._login_messages(msgs)

    def count_held(self) -> None:
        """What this session holds of large results (a message the target is still
        sending, and what the client has not read yet) against the gateway's large-row
        budgets; over them the session ends at once (its buffers are dropped)."""
        session = self.session
        client = session.transport
        held = self.reader.pending + (client.get_write_buffer_size() if client else 0)
        refused = session.gw.large_row(session, held)
        if refused is not None:
            log.warning("session %s: %s", session.session_id, refused)
            self.close()
            session.abort("53200", refused)

    def fast_failed(self, exc: BaseException) -> None:
        """The target relay's fast path raised (see ClientSession._install_relays)."""
        log.error("relaying from target %s failed", self.conn.name, exc_info=exc)
        self.session.fatal("XX000", "keyturn: internal error in the gateway (see its log)")

    def _login_messages(self, msgs: list[codec.Message]) -> None:
        for i, m in enumerate(msgs):
            t = m.type
            try:
                if t == b"R":
                    code, payload = codec.decode_auth(m.body)
                    assert self._auth is not None
                    reply = self._auth.respond(code, payload)
                    if reply and self.transport:
                        self.transport.write(reply)
                elif t == b"S":
                    name, value = codec.decode_parameter_status(m.body)
                    self.parameters[name] = value
                elif t == b"K":
                    self.backend_key = codec.decode_backend_key_data(m.body)
                elif t == b"E":
                    f = codec.decode_error_fields(m.body)
                    raise UpstreamError(f"target refused the login: {f.get('M', '')}",
                                        f.get("C", "08001"))
                elif t == b"Z":
                    self.tx_status = chr(m.body[0])
                    self.ready = True
                    if self._login and not self._login.done():
                        self._login.set_result(None)
                    rest = msgs[i + 1:]
                    if rest:
                        self.session.server_messages(rest)
                    return
            except AuthError as exc:
                self._fail(UpstreamError(f"cannot log in to the target: {exc}", "28000"))
                return
            except UpstreamError as exc:
                self._fail(exc)
                return

    def _fail(self, exc: UpstreamError) -> None:
        if self._login and not self._login.done():
            self._login.set_exception(exc)
        if self._ssl_reply and not self._ssl_reply.done():
            self._ssl_reply.set_exception(exc)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing()
        err = UpstreamError(f"the target closed the connection{f': {exc}' if exc else ''}",
                            "08006")
        if self._login and not self._login.done():
            self._login.set_exception(err)
        if self._ssl_reply and not self._ssl_reply.done():
            self._ssl_reply.set_exception(err)
        if self.ready:
            self.session.upstream_lost(err.message, said_fatal=self.said_fatal)

    def pause_writing(self) -> None:
        # The target reads slower than the client sends (COPY FROM STDIN): stop reading the client.
        self.session.pause_client("target")

    def resume_writing(self) -> None:
        self.session.resume_client("target")

    # ---- used by the session

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self._drain()
            self.transport.write(data)

    def _drain(self) -> None:
        """Chunks the fast path deferred to the end of this loop turn (the gateway's
        write_ahead) go out before anything written after them."""
        wa = self.session.gw.write_ahead
        if wa is not None and wa.pending:
            wa.drain()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self._drain()
            self._closing()
            self.transport.close()

    def _closing(self) -> None:
        self.closed = True
        fast = self.session.fast
        if fast is not None:
            fast.disarm()  # the client relay must not write to this transport any more

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
