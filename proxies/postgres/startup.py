"""A client session's start: TLS, the startup message, authentication of the client
against its access tokens (SCRAM or cleartext token), and the login to the target.

Part of ``ClientSession`` (proxies/postgres/session.py), as a mixin: its methods run
on the session's state. It must not decide statements or touch the response queue
beyond what login needs."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from typing import TYPE_CHECKING, cast

from keyturn.analysis.postgres import (
    MAX_SHAPED_TEXT,
    client_encoding_refusal,
    search_path_schemas,
)
from keyturn.policy import masks_in
from proxies.postgres import codec, settings
from proxies.postgres.auth import AuthError, ScramServer, mock_salt
from proxies.postgres.codec import NEED_DATA, ProtocolError
from proxies.postgres.speedups import compiled as _speedups
from proxies.postgres.state import FAST_AUDIT_LAYOUT, SessionState

if TYPE_CHECKING:
    from proxies.postgres.session import ClientSession

log = logging.getLogger(__name__)


REFUSED_STARTUP = {
    "options": "it can change the role or settings that decide how SQL is read",
    "role": "it changes who you are",
    "session_authorization": "it changes who you are",
}


_FAKE_SALT_SECRET = secrets.token_bytes(32)


class StartupSteps(SessionState):
    """ClientSession's start and login (mixin; methods run on the session's state)."""

    def _startup_events(self) -> None:
        while self.phase == "startup":
            ev = self.reader.next_event()
            if ev is NEED_DATA:
                return
            if isinstance(ev, codec.SSLRequest):
                if self.gw.tls is None or self.tls_active:
                    self.write(b"N")
                    continue
                self.write(b"S")
                self.phase = "tls"
                assert self.transport is not None
                self.transport.pause_reading()
                self._spawn(self._start_tls())
                return
            if isinstance(ev, codec.GSSENCRequest):
                self.write(b"N")
                continue
            if isinstance(ev, codec.CancelRequest):
                # The requester's socket closes once the cancel is delivered (as PostgreSQL).
                self.closed = True
                self.gw.cancel(ev.pid, ev.secret, self.transport.close if self.transport
                               else None)
                return
            if isinstance(ev, codec.StartupMessage):
                self._on_startup(ev.params)
                return

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None and self.gw.tls is not None
        try:
            transport = await loop.start_tls(self.transport, cast("ClientSession", self),
                                             self.gw.tls, server_side=True)
        except (TimeoutError, OSError, ConnectionError) as exc:
            log.info("TLS handshake with %s failed: %s", self.client_addr, exc)
            self.closed = True
            if self.transport:
                self.transport.close()
            return
        if transport is None:
            self.closed = True
            return
        self.transport = transport
        self.tls_active = True
        self.reader = codec.FrontendReader(max_message_size=codec.MAX_LOGIN_MESSAGE_SIZE)
        self.phase = "startup"

    def _on_startup(self, params: dict[str, str]) -> None:
        self.startup_params = params
        self.user = params.get("user", "")
        database = params.get("database") or self.user
        self.application = params.get("application_name", "")
        if not self.user:
            raise ProtocolError("no user name in the startup packet", "28000")
        repl = params.get("replication")
        if repl is not None and repl.lower() not in ("false", "off", "no", "0"):
            self.fatal("0A000", "keyturn: replication connections are not allowed")
            return
        # Setting names are matched without regard to case by the server (SEARCH_PATH is
        # search_path); a name may come twice.
        named: dict[str, list[str]] = {}
        for key, value in params.items():
            named.setdefault(key.lower(), []).append(value)
        for key, why in REFUSED_STARTUP.items():
            if any(named.get(key, ())):
                self.fatal("42501", f"keyturn: startup parameter {key!r} is refused: {why}")
                return
        if any(v.lower() in ("off", "false", "no", "0")
               for v in named.get("standard_conforming_strings", ())):
            self.fatal("42501", "keyturn: startup parameter 'standard_conforming_strings' is "
                                "refused: off changes how SQL string literals are read")
            return
        for enc in named.get("client_encoding", ()):
            refused = client_encoding_refusal(enc)
            if refused is not None:
                self.fatal("42501", f"keyturn: startup parameter client_encoding {refused}")
                return
        conn = self.gw.config.connections.get(database)
        if conn is None or conn.type != "postgres":
            self.fatal("3D000", f'keyturn: connection "{database}" does not exist',
                       detail="The database name you connect to picks a Keyturn connection.")
            return
        self.conn = conn
        self.analyzer = self.gw.analyzer(conn)
        self.masking = masks_in(self.gw.config.policies[conn.policy])
        for path in named.get("search_path", ()):
            self.schemas |= set(search_path_schemas(path))
        self.phase = "auth"
        self.reader.start_typed()
        self._spawn(self._begin_auth())

    async def _begin_auth(self) -> None:
        from keyturn.errors import StoreUnavailable

        if self.tls_active and self.gw.config.gateway.client_auth == "password":
            # A cleartext token is only ever accepted inside TLS.
            self.cleartext = True
            self.write(codec.encode_auth_cleartext_request())
            self.data_received(b"")
            return

        try:
            creds = await asyncio.to_thread(self.gw.services.identities.scram_credentials,
                                            self.user)
        except StoreUnavailable as exc:
            self.gw.store_failed(exc, cast("ClientSession", self))
            return
        self.gw.store_ok()
        if creds is None:
            self.scram = ScramServer(mock_salt(_FAKE_SALT_SECRET, self.user), 4096, [])
        else:
            self.scram = ScramServer(creds.salt, creds.iterations, creds.candidates)
        self.write(codec.encode_auth_sasl(["SCRAM-SHA-256"]))
        # Messages that arrived meanwhile are still in the reader.
        self.data_received(b"")

    def _auth_messages(self) -> None:
        scram = self.scram
        if scram is None and not self.cleartext:
            return
        for msg in self.reader.next_messages():
            if msg.type != b"p":
                raise codec.RemoteProtocolError(
                    f"expected a password message, got message type {msg.type!r}")
            if self.cleartext:
                token = codec.decode_password(msg.body).decode("utf-8", "replace")
                self.phase = "checking"
                self._spawn(self._check_cleartext(token))
                return
            try:
                if not self.sasl_started:
                    mech, data = codec.decode_sasl_initial_response(msg.body)
                    if mech != "SCRAM-SHA-256":
                        raise AuthError(f"SASL mechanism {mech!r} is not offered")
                    self.sasl_started = True
                    assert scram is not None
                    self.write(codec.encode_auth_sasl_continue(
                        scram.handle_client_first(data or b"")))
                else:
                    assert scram is not None
                    final = scram.handle_client_final(msg.body)
                    self._authenticated(final)
                    return
            except AuthError as exc:
                self._auth_failed(str(exc))
                return

    async def _check_cleartext(self, token: str) -> None:
        from keyturn.errors import StoreUnavailable, Unauthorized

        try:
            ident = await asyncio.to_thread(self.gw.services.identities.authenticate_token, token)
            if ident.user != self.user:
                raise Unauthorized("token belongs to another user")
        except StoreUnavailable as exc:
            self.gw.store_failed(exc, cast("ClientSession", self))
            return
        except Unauthorized as exc:
            self._auth_failed(str(exc))
            return
        self.gw.store_ok()
        self._authenticated(None, ident.token_id)

    def _auth_failed(self, why: str) -> None:
        log.info("authentication of %r failed: %s", self.user, why)
        # Back-off per user and per address: the failure is told only after the delay.
        verdict = self.gw.throttle.failed(self.user, self.client_ip)
        who = dict(user=self.user, connection=self.conn_name, session_id=self.session_id,
                   client_addr=self.client_addr)
        if verdict.started:
            log.warning("login throttling started for user %r / address %s (%d / %d failures)",
                        self.user, self.client_ip, verdict.failures_user, verdict.failures_addr)
            self.gw.audit(kind="auth_throttled", **who, outcome="delayed",
                          reason="repeated failed logins: failures are answered after a "
                                 "growing delay", detail=verdict.detail())
        self.gw.audit(kind="auth_failed", **who, reason=why, outcome="denied",
                      detail=verdict.detail() if verdict.wait else None)
        fail = functools.partial(
            self.fatal, "28P01", f'password authentication failed for user "{self.user}"',
            detail="Use a Keyturn access token as the password (keyturn token create).")
        if verdict.wait > 0 and not self.closed:
            self.phase = "checking"
            asyncio.get_running_loop().call_later(verdict.wait, fail)
        else:
            fail()

    def _authenticated(self, server_final: bytes | None,
                       token_id: int | None = None, *, waited: bool = False) -> None:
        if self.closed:
            return
        wait = 0.0 if waited else self.gw.throttle.success_wait(self.client_ip)
        if wait > 0:
            # This address is throttled: hanging up early must not tell a success apart.
            self.phase = "checking"
            asyncio.get_running_loop().call_later(wait, functools.partial(
                self._authenticated, server_final, token_id, waited=True))
            return
        if server_final is not None:
            assert self.scram is not None
            token_id = self.scram.matched_key
            self.write(codec.encode_auth_sasl_final(server_final))
        self.identity = self.gw.services.identities.identity_of(self.user, token_id)
        # Every setting of the startup packet must pass as the SET it amounts to.
        startup = settings.startup_settings(self.startup_params, REFUSED_STARTUP)
        setting = settings.startup_refusal(startup, self.analyzer.analyze, self._decide)
        if setting is not None:
            self.gw.audit(kind="connect", user=self.user, connection=self.conn_name,
                          session_id=self.session_id, client_addr=self.client_addr,
                          reason=setting.message, outcome="refused",
                          detail={"token_id": token_id, "setting": setting.name,
                                  "statement": setting.sql})
            self.identity = None  # no disconnect record for a session that never started
            self.fatal("42501", setting.message)
            return
        refused = self.gw.logged_in(cast("ClientSession", self))
        if refused is not None:
            self.gw.audit(kind="connect", user=self.user, connection=self.conn_name,
                          session_id=self.session_id, client_addr=self.client_addr,
                          reason=refused, outcome="refused", detail={"token_id": token_id})
            self.identity = None  # no disconnect record for a session that never started
            self.fatal("53300", refused)
            return
        self.phase = "connecting"
        self.gw.audit(kind="connect", user=self.user, connection=self.conn_name,
                      session_id=self.session_id, client_addr=self.client_addr,
                      detail={"application": self.application, "tls": self.tls_active,
                              "token_id": token_id, "settings": startup,
                              "method": "password" if self.cleartext else "scram"})
        self._spawn(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        from keyturn.analysis import PreparedStatements
        from proxies.postgres.upstream import Upstream, UpstreamError

        assert self.conn is not None
        self.prepared = PreparedStatements()
        # Exactly the settings _authenticated judged.
        forward = settings.startup_settings(self.startup_params, REFUSED_STARTUP)
        forward["client_encoding"] = "UTF8"
        # The read-only guard: every implicit transaction is read-only unless the gateway
        # grants write access to an allowed write (whatever the client asked for).
        forward["default_transaction_read_only"] = "on"
        try:
            self.upstream = await Upstream.connect(cast("ClientSession", self), self.conn, forward)
        except UpstreamError as exc:
            self.fatal(exc.sqlstate, f"keyturn: cannot reach connection {self.conn.name!r}: "
                                     f"{exc.message}")
            return
        await self.gw.catalogs.ready(self.conn)  # user code is judged from the first statement
        if self.closed:
            self.upstream.close()
            return
        if self.masking:
            from keyturn.masking.detectors import DetectorSet

            try:
                self.catalog = await self.gw.origins(self.conn)
                self.detectors = DetectorSet.build(self.conn.detectors,
                                                   dict(self.conn.custom_detectors)) \
                    if self.conn.detectors != () else None
            except Exception as exc:
                log.exception("masking set-up for %s failed", self.conn.name)
                self.upstream.close()
                self.fatal("08001", f"keyturn: connection {self.conn.name!r} masks results "
                                    f"but its catalog cannot be read: {exc}")
                return
        # The client sees the target's real pid (NOTIFY, pg_terminate_backend) with a
        # cancel secret of the gateway's own.
        backend = self.upstream.backend_key
        self.key = self.gw.new_key(cast("ClientSession", self),
                                   backend[0] if backend is not None else None)
        out = [codec.encode_auth_ok()]
        params = dict(self.upstream.parameters)
        if params.get("default_transaction_read_only", "on") != "on":
            self.upstream.close()
            self.fatal("08001", f"keyturn: connection {self.conn.name!r}: the target did not "
                                "accept a read-only session (default_transaction_read_only)")
            return
        if "default_transaction_read_only" in params:
            # The guard is the gateway's business: clients (libpq's target_session_attrs)
            # see a server that accepts writes, as it does for what the policy allows.
            params["default_transaction_read_only"] = "off"
        out += [codec.encode_parameter_status(k, v) for k, v in params.items()]
        out.append(codec.encode_backend_key_data(*self.key))
        out.append(codec.encode_ready_for_query(self.upstream.tx_status))
        self.tx_status = self.upstream.tx_status
        self.write(b"".join(out))
        self.phase = "ready"
        self.reader.set_max_message_size(codec.DEFAULT_MAX_MESSAGE_SIZE)
        if _speedups is not None and not self.masking:
            # It writes to both transports directly: callers check that neither is closed.
            assert self.transport is not None and self.upstream.transport is not None
            self.fast = _speedups.FastPath(
                self, self.fast_verdicts, self.fast_stmts, self.portals, self.transport.write,
                self.upstream.transport.write, self.gw.audit_spool.write_line,
                self._audit_prefix_bytes(), FAST_AUDIT_LAYOUT, MAX_SHAPED_TEXT,
                self._intent_prefix_bytes(),
                self.gw.write_ahead or getattr(self.gw.audit_spool, "flush_ahead", None),
                self.fast_parses, self.stmts,
                self.bound, self.fast_guarded, self.fast_guarded_stmts,
                self.fast_guarded_parses)
            self._install_relays()
        self.data_received(b"")

    def _install_relays(self) -> None:
        """Let uvloop hand both sides' chunks to compiled relays (``_speedups.Relay``):
        a chunk the fast path takes then never enters the interpreter; every other
        chunk comes to data_received here or in the Upstream as before."""
        assert _speedups is not None and self.transport is not None
        assert self.upstream is not None and self.upstream.transport is not None
        set_c = getattr(self.transport, "set_protocol", None)
        set_s = getattr(self.upstream.transport, "set_protocol", None)
        if set_c is None or set_s is None:
            return
        set_c(_speedups.Relay(self.fast, self, "client"))
        set_s(_speedups.Relay(self.fast, self.upstream, "server"))
