"""The PostgreSQL adapter of the transcript harness (tests/playbook.py).

``PgPlaybook`` builds a real ``PostgresGateway`` from a config (a SQLite store and an
audit spool in a temporary directory, the target's catalog given as rows), prepares it
as ``keyturn up`` does but without a listener, and makes a session through
``new_session`` as the listener would. ``login`` drives the startup through the real
entry points: the client's StartupMessage and SCRAM exchange with its access token, the
gateway's login to the target (whose answers the playbook plays), up to the client's
first ReadyForQuery. No socket is opened and no private attribute is set.
"""

from __future__ import annotations

import struct
import textwrap
from pathlib import Path
from typing import Any

from keyturn.analysis.pgcatalog import TargetCatalog
from keyturn.auditspool import AuditSpool
from keyturn.config import parse_config
from keyturn.services import build_services
from proxies.postgres import codec, startup
from proxies.postgres.auth import TargetAuthenticator
from proxies.postgres.codec import Message
from proxies.postgres.gateway import PostgresGateway
from tests.playbook import PlainWire, Playbook, Wire

#: What a PostgreSQL 15 target reports when a session logs in.
TARGET_PARAMETERS = {
    "server_version": "15.0", "server_encoding": "UTF8", "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY", "integer_datetimes": "on", "standard_conforming_strings": "on",
    "default_transaction_read_only": "on", "TimeZone": "UTC", "application_name": "",
    "is_superuser": "off", "session_authorization": "app", "IntervalStyle": "postgres",
}


class _ToClient:
    """Frames what the session sends the client (backend messages)."""

    def __init__(self) -> None:
        self.reader = codec.BackendReader()

    def __call__(self, data: bytes) -> list[Message]:
        self.reader.receive_data(data)
        return self.reader.next_messages()


class _ToTarget:
    """Frames what the session sends the target: a startup packet, then typed messages
    (the startup packet is returned as a Message of type b"" with its body)."""

    def __init__(self) -> None:
        self.reader = codec.FrontendReader()
        self.pending = b""

    def __call__(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        if self.reader.in_startup:
            self.pending += data
            if len(self.pending) < 4:
                return out
            (n,) = struct.unpack_from("!i", self.pending)
            if len(self.pending) < n:
                return out
            out.append(Message(b"", self.pending[4:n], self.pending[:n]))
            data, self.pending = self.pending[n:], b""
            self.reader.start_typed()
        self.reader.receive_data(data)
        out.extend(self.reader.next_messages())
        return out


def types(msgs: list[Message]) -> list[str]:
    return [m.type.decode() for m in msgs]


class PgPlaybook(Playbook):
    """``fast``: "relay" (the compiled fast path with relays in the sockets' place, as
    in production), True (compiled, fed by the session: transports that cannot take a
    relay) or False (Python only, as with KEYTURN_NO_SPEEDUPS). ``catalog_reader``:
    reads the target's catalog (a function of the connection), instead of ``catalog``."""

    def __init__(self, config: str, base: Path, *, catalog: TargetCatalog | None = None,
                 users: tuple[str, ...] = ("alice",), fast: bool | str = "relay",
                 catalog_reader: Any = None) -> None:
        super().__init__(_ToClient(), _ToTarget(), wire=Wire if fast == "relay" else PlainWire)
        self.fast = fast
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        text = f"store: {{url: 'sqlite:///{base / 'keyturn.db'}'}}\n" + textwrap.dedent(config)
        self.config = parse_config(text)
        buffer = PostgresGateway.audit_buffer if fast else None
        self.spool = AuditSpool(base / "spool", buffer=buffer)
        self.services = build_services(self.config, audit_sink=self.spool.record)
        self.tokens = {u: self.services.identities.create_token(u).token for u in users}
        found = catalog or TargetCatalog.from_rows(user="app", search_path=None)
        self.gw = PostgresGateway(self.services, self.spool,
                                  catalog_reader=catalog_reader or (lambda _c: found))
        self.gw.open_target = self._open_target  # type: ignore[method-assign]
        self.run(self.gw.prepare())
        self.session = self.gw.new_session()
        self.client.protocol = self.session
        self.call(self.session.connection_made, self.client)
        self.backend_key = (4242, 17)

    async def _open_target(self, factory: Any, host: str, port: int) -> tuple[Any, Any]:
        self.upstream = factory()
        self.target.protocol = self.upstream
        self.upstream.connection_made(self.target)
        return self.target, self.upstream

    def login(self, user: str = "alice", database: str = "db") -> list[Message]:
        """Log ``user`` in to connection ``database``, the target answering as PostgreSQL
        15 does; returns what the client got after authenticating (through its first
        ReadyForQuery)."""
        compiled = startup._speedups
        if not self.fast:
            startup._speedups = None  # the session makes its fast path as it logs in
        try:
            return self._login(user, database)
        finally:
            startup._speedups = compiled

    def _login(self, user: str, database: str) -> list[Message]:
        self.client_sends(codec.encode_startup({"user": user, "database": database}))
        auth = TargetAuthenticator(user, self.tokens[user])
        while True:
            (msg,) = self.client_gets(1)
            assert msg.type == b"R", msg
            code, payload = codec.decode_auth(msg.body)
            reply = auth.respond(code, payload)
            if reply is not None:
                self.client_sends(reply)
            if code == codec.AUTH_SASL_FINAL:
                break
        (startup,) = self.target_gets(1)  # the gateway's own login to the target
        assert startup.type == b"", startup
        self.target_sends(codec.encode_auth_ok() + b"".join(
            codec.encode_parameter_status(k, v) for k, v in TARGET_PARAMETERS.items()) +
            codec.encode_backend_key_data(*self.backend_key) +
            codec.encode_ready_for_query("I"))
        got: list[Message] = []
        while not got or got[-1].type != b"Z":
            got.extend(self.client_gets(1))
        self.client.mark()
        self.target.mark()
        return got

    def records(self) -> list[bytes]:
        """Every audit line the gateway wrote so far, in order."""
        self.spool.flush()
        return [line for f in sorted((self.base / "spool").glob("*.jsonl"))
                for line in f.read_bytes().splitlines(keepends=True)]

    def close(self) -> None:
        async def stopping() -> None:
            await self.gw.stop()
            await self.gw.catalogs.stop()
            await self.gw.watcher.stop()
        try:
            self.run(stopping())
        finally:
            super().close()
            self.spool.close()
            self.services.store.engine.dispose()
