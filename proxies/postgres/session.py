"""One client connection through the PostgreSQL gateway.

``ClientSession`` is the asyncio.Protocol for the client side and decides
what happens to each message: it authenticates the client with SCRAM against
the user's access tokens, logs in to the target with stored credentials,
then classifies every Query and Execute, asks ``keyturn.policy`` and
forwards, blocks or holds.

Ordering is kept with a queue of *expected responses*: every message we
forward to the target appends what the target will answer (ParseComplete,
ReadyForQuery, ...), and anything the gateway itself must say (a block
error, a notice) is queued behind it, so our messages reach the client
exactly where PostgreSQL would have put them. While a statement is held, the
client's later messages wait in a backlog, in order.

Bytes are framed by the sans-I/O codec; the target side lives in
upstream.py. This module must not block the event loop: store calls go to
threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import secrets
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from keyturn import auditschema, holds
from keyturn.analysis import StatementClass
from keyturn.analysis.postgres import (
    DEFAULT_SEARCH_PATH,
    MAX_SHAPED_TEXT,
    Statement,
    client_encoding_refusal,
    fast_shape,
    search_path_schemas,
)
from keyturn.approvals import TicketRequest, binding_of
from keyturn.policy import Decision, Request, masks_in
from proxies.postgres import codec, guard, rowmask, settings
from proxies.postgres.auth import AuthError, ScramServer, mock_salt
from proxies.postgres.codec import NEED_DATA, Message, ProtocolError
from proxies.postgres.register import target_of
from proxies.postgres.speedups import compiled as _speedups

if TYPE_CHECKING:
    from keyturn.analysis import Analyzer
    from keyturn.config import Connection
    from keyturn.identity import Identity
    from proxies.postgres.gateway import PostgresGateway
    from proxies.postgres.upstream import Upstream

log = logging.getLogger(__name__)

PROTOCOL = "postgres"  # the audit records' protocol
# The keys of a fast-path audit line after the session's prefix, in the order the
# compiled path writes them (see audit_line in _speedups.c): the time, the statement's
# text, then (after the decision fragment) a completed statement's outcome, duration and
# row count, and the intent number. Built from the schema, so C spells no field name.
FAST_AUDIT_LAYOUT = (
    auditschema.key("at"),
    b"," + auditschema.key("statement"),
    b"," + auditschema.fragment(outcome="ok") + b"," + auditschema.key("duration_ms"),
    b"," + auditschema.key("rows"),
    b"," + auditschema.key("n"),
)

MAX_BACKLOG = 64 * 1024 * 1024
REFUSED_STARTUP = {
    "options": "it can change the role or settings that decide how SQL is read",
    "role": "it changes who you are",
    "session_authorization": "it changes who you are",
}
_FAKE_SALT_SECRET = secrets.token_bytes(32)


@dataclass(slots=True)
class Ctx:
    """What the audit record of one forwarded request needs."""

    statement: str
    classification: str
    action: str
    rule: str | None
    reason: str
    t0: float
    ticket_id: int | None = None
    params: list[Any] | None = None
    rows: int | None = None
    tags: list[str] | None = None
    error: dict[str, str] | None = None
    # Masking (masked connections only): the sensitivity, the statement's lineage, the
    # plan for the current result, what was masked and what the detectors found.
    sens: Any = None
    lineages: Any = None
    portal: str | None = None
    plan: Any = None
    masked: dict[str, int] | None = None
    detected: dict[str, int] | None = None
    refusal: bytes | None = None
    # It runs user-defined code: nothing after it is sent until it completes (that code
    # could change how the target reads the next message; see _dispatch).
    barrier: bool = False
    rewrite: Any = None  # DataRow (chunk, body start, end) -> replacement, or None
    mask_counts: Any = None  # [(field names, masked values per field)] per result
    masked_by: Any = None  # {output column: the rule that masks it}
    copy: Any = None  # keyturn.masking.copy.CopyMasker for COPY … TO rows
    # On masked connections: the statement and parameters as shown (literals that touch
    # sensitive columns redacted); what runs is unchanged.
    shown: str | None = None
    shown_params: list[Any] | None = None
    # PREPARE / DEALLOCATE changes of the SQL namespace: (statement index, name, change),
    # settled with the outcome when the request is audited.
    changes: Any = None
    analysis: Any = None  # what the read-only guard plans from (set when dispatched)
    n: int = 0  # the number of its intent record (written before it was sent), 0: none


@dataclass(slots=True)
class Expect:
    """One response the target owes us, or (kind "!") bytes of our own to send."""

    kind: bytes
    ctx: Ctx | None = None
    inject: bytes | None = None
    rfq: bool = False
    name: str | None = None  # the statement a Describe asks about
    replace: bytes | None = None  # sent to the client instead of the target's error
    plan_for: Ctx | None = None  # our own Describe(portal): its answer plans ctx's masking
    swallow: bool = False  # the answer to a message of our own: not forwarded
    then: Message | None = None  # with plan_for: the Execute waiting for this answer
    # Parse / Close of a prepared statement: its key, the change's number and what the
    # name held before (restored when the target refuses or skips the change).
    op: int = 0
    prior: Any = None
    mine: Any = None
    # The read-only guard (proxies/postgres/guard.py): hide = a Query of the gateway's own,
    # answered to it alone; ours = per statement of a rewritten Query, whether it is the
    # gateway's (its CommandComplete is not forwarded); ci counts CommandCompletes seen.
    hide: bool = False
    ours: tuple[bool, ...] | None = None
    ci: int = 0
    rewritten: Any = None
    guard_stmt: str | None = None  # a Parse of one of the gateway's guard statements
    # The guard ran the client's implicit transaction as an explicit one and a hidden
    # ROLLBACK follows: the client is told 'I' as the implicit transaction would say.
    as_idle: bool = False


@dataclass(slots=True)
class StmtInfo:
    sql: str
    analysis: Any
    param_types: tuple[int, ...] = ()
    decision: Decision | None = None
    names: bool = False  # PREPARE / DEALLOCATE / DISCARD: it changes the SQL namespace


#: What a prepared-statement name may hold when the target's answer to a change of it is
#: still unknown (or the change failed after later ones were sent): never run.
_AMBIGUOUS = StmtInfo("", None)
_NAMESPACE_COMMANDS = frozenset(("PREPARE", "DEALLOCATE", "DISCARD"))


def _pkey(name: str) -> str:
    """A protocol-level statement or portal name as the server keys it: its first 63
    bytes (a byte cut, not a character one: the server copies names with strlcpy)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= 63:
        return name
    return raw[:63].decode("utf-8", "surrogateescape")


_DEFAULT_SCHEMAS = frozenset(DEFAULT_SEARCH_PATH)
_MASKED_TYPES = frozenset((b"T", b"C", b"E", b"N"))
_QUOTED = re.compile(r'"[^"]*"')
_FAILING_ROW = re.compile(r"(Failing row contains |Key )\(.*\)(?=[^()]*$)", re.S)
# Types whose binary wire form is their UTF-8 text (jsonb adds a version byte: not here).
_MASKABLE_BINARY = frozenset((25, 1043, 1042, 19, 114))
_LINE = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def _splice(out: list[bytes] | None, chunk: bytes, seg: int, start: int, end: int,
            new: bytes) -> tuple[list[bytes], int]:
    """Replace chunk[start:end] by ``new`` in the output being built from ``chunk``."""
    if out is None:
        out = []
    out.append(chunk[seg:start])
    out.append(new)
    return out, end
# Types whose text form holds no free text: the detectors skip them.
_PLAIN_OIDS = frozenset((16, 20, 21, 23, 26, 700, 701, 1700, 1082, 1083, 1114, 1184, 1186,
                         1266, 2950, 790))


def _detect_op(detectors: Any, ctx: Ctx) -> tuple[int, Any]:
    """The row masker's op for a free-text field: detector hits are redacted and counted
    into ctx.detected (summed into the audit record when the statement finishes)."""
    if ctx.detected is None:
        ctx.detected = {}
    hits_total = ctx.detected
    redact = detectors.redact_bytes

    def detect(value: bytes) -> bytes | None:
        new, hits = redact(value)
        if not hits:
            return None
        for k, c in hits.items():
            hits_total[k] = hits_total.get(k, 0) + c
        return new

    return (rowmask.OP_DETECT, detect)


# Sent to the target in place of a refused statement: it fails the transaction the
# statement was in, exactly as a real error would (the client sees our error instead).
# (The target's log shows the text, so it says what happened.)
_FAIL_SQL = "SELECT 'keyturn refused a statement; this transaction is aborted'::pg_catalog.int4"
_FAIL_TRANSACTION = codec.encode_query(_FAIL_SQL)
_FAIL_EXTENDED = codec.encode_parse("", _FAIL_SQL) + codec.encode_bind("", "") + \
    codec.encode_execute("", 0)

# Responses that carry no per-request state are shared (never mutated).
_EXPECT_B, _EXPECT_P, _EXPECT_S, _EXPECT_C = Expect(b"B"), Expect(b"P"), Expect(b"S"), Expect(b"C")

# The read-only guard's statements, prepared on the target when first needed (extended
# protocol), and the session-default Queries around commands that cannot run in a block.
_GUARD_NAMES = {guard.SQL_RW_LOCAL: "keyturn_rw_local", guard.SQL_RW_TX: "keyturn_rw_tx",
                guard.SQL_SAVEPOINT: "keyturn_savepoint", guard.SQL_RO: "keyturn_ro",
                guard.SQL_RELEASE: "keyturn_release", guard.SQL_BEGIN_RW: "keyturn_begin",
                guard.SQL_COMMIT: "keyturn_commit"}
_GUARD_PORTAL = "keyturn_portal"
_GUARD_BIND = {sql: codec.encode_bind(_GUARD_PORTAL, name) for sql, name in _GUARD_NAMES.items()}
_GUARD_RUN = codec.encode_execute(_GUARD_PORTAL, 0) + codec.encode_close("P", _GUARD_PORTAL)
_DEFAULT_RW_QUERY = codec.encode_query(guard.SQL_DEFAULT_RW)
_DEFAULT_RO_QUERY = codec.encode_query(guard.SQL_DEFAULT_RO)
_ROLLBACK_QUERY = codec.encode_query(guard.SQL_ROLLBACK)
_OWN_PREFIX = "keyturn"
_FIRST_USER_OID = 16384  # OIDs below are the server's own objects
#: How a hold that did not run its statement is reported (keyturn.holds).
_OUTCOME_SQLSTATE = {holds.DEFERRED: "42501", "rejected": "42501", "expired": "57014",
                     "cancelled": "57014"}
#: Settings the target reports whose value decides how it reads query text: the value
#: must be what the analyser assumes (a function giving None when it is).
_READ_AS_ANALYSED = {
    "standard_conforming_strings": lambda v: None if v == "on" else "off",
    "client_encoding": client_encoding_refusal,
}
# The read-only guard keeps the target session read-only by default; clients that ask
# whether they reached a primary (pgjdbc targetServerType=primary: SHOW
# transaction_read_only) are told what the gateway grants: writes, as the policy allows.
_SHOW_READ_ONLY = re.compile(
    r"\s*show\s+(default_transaction_read_only|transaction_read_only)\s*;?\s*\Z", re.I)


def _show_read_only(sql: str) -> str:
    m = _SHOW_READ_ONLY.match(sql)
    assert m is not None
    return f"SELECT 'off'::pg_catalog.text AS {m.group(1).lower()}"

_BINARY_INTS = {21: "!h", 23: "!i", 20: "!q", 26: "!I"}
_BINARY_FLOATS = {700: "!f", 701: "!d"}
_TEXT_OIDS = {25, 1043, 1042, 19, 114, 3802}


def _param_text(value: bytes | None, fmt: int, oid: int = 0) -> Any:
    """A bind parameter as people read it (tickets, audit); raw hex if unknown."""
    if value is None:
        return None
    try:
        if fmt == 0 or oid in _TEXT_OIDS:
            return value.decode("utf-8")
        if oid in _BINARY_INTS:
            return str(struct.unpack(_BINARY_INTS[oid], value)[0])
        if oid in _BINARY_FLOATS:
            return repr(struct.unpack(_BINARY_FLOATS[oid], value)[0])
        if oid == 16 and len(value) == 1:
            return "true" if value[0] else "false"
    except (UnicodeDecodeError, struct.error):
        pass
    return "\\x" + value.hex()


def _fragment(d: Decision) -> bytes:
    """An allowed decision's fields of a statement's audit record, as JSON (no braces)."""
    return auditschema.fragment(classification=d.classification, action="allow", rule=d.rule,
                                reason=d.reason)


def _binary_results(portal: tuple[str, bytes] | None) -> bool:
    """Whether the Bind of a portal asks for any result column in binary format."""
    if portal is None:
        return False
    try:
        return bool(portal[1]) and any(codec.decode_bind(portal[1]).result_formats)
    except codec.ProtocolError:
        return True  # cannot tell: the riskier answer


def _bind_params(b: codec.Bind, types: tuple[int, ...]) -> list[Any] | None:
    if not b.params:
        return None
    fmts = b.param_formats
    out = []
    for i, v in enumerate(b.params):
        fmt = fmts[0] if len(fmts) == 1 else (fmts[i] if i < len(fmts) else 0)
        out.append(_param_text(v, fmt, types[i] if i < len(types) else 0))
    return out


class ClientSession(asyncio.Protocol):
    def __init__(self, gw: PostgresGateway):
        self.gw = gw
        self.reader = codec.FrontendReader()
        self.phase = "startup"
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.tls_active = False
        self.client_addr = ""
        self.session_id = secrets.token_hex(8)
        self.key: tuple[int, int] | None = None
        self.user = ""
        self.identity: Identity | None = None
        self.conn: Connection | None = None
        self.startup_params: dict[str, str] = {}
        self.application = ""
        self.scram: ScramServer | None = None
        # Chosen with the connection at startup, before any statement can arrive.
        self.analyzer: Analyzer = None  # type: ignore[assignment]
        self.sasl_started = False
        self.cleartext = False
        self.expect: deque[Expect] = deque()
        self.backlog: deque[Message] = deque()
        self.backlog_bytes = 0
        self.holding = False
        self.held_ticket: int | None = None
        self.skip_until_sync = False
        self.fail_at_sync = False
        # The server's prepared statements as this session sent them (keyed like the
        # server: _pkey); see _namespace_op / _namespace_answer for the doubt kept while
        # a Parse or Close is unanswered.
        self.stmts: dict[str, StmtInfo] = {}
        self.syncs = 0  # Syncs sent: a Bind in the same batch as a Parse sees its result
        self.op_seq = 0
        self.stmt_op: dict[str, tuple[int, int]] = {}  # key -> (latest change, its batch)
        self.doubt: dict[str, int] = {}  # key -> changes not yet answered
        # Portals bound by this module: the statement as it was at Bind (a portal keeps
        # the plan it was bound with, whatever the name holds later).
        self.bound: dict[str, tuple[bytes, StmtInfo | None]] = {}
        self.verdicts: dict[tuple[Any, ...], Decision] = {}
        # Allowed statement shapes: (Decision, its audit fields as JSON) per fast_shape.
        self.fast_verdicts: dict[str, tuple[Decision, bytes]] = {}
        # The same for other allowed statements (writes, BEGIN/COMMIT): Python only, as
        # the read-only guard plans each (Decision, the statement as analysed).
        self.guarded_verdicts: dict[str, tuple[Decision, Statement]] = {}
        # Prepared statements allowed as reads, for the compiled fast path:
        # name -> (Decision, audit fields, statement as JSON, statement, name).
        self.fast_stmts: dict[bytes, tuple[Any, ...]] = {}
        self.fast: Any = None  # the compiled fast path, once the session is ready
        # Every schema this session's search_path may name (it only grows: a SET may be
        # rolled back, so the gateway cannot know it was undone).
        self.schemas: frozenset[str] = frozenset(DEFAULT_SEARCH_PATH)
        # Masking: set when the connection's policy masks anything (rows are then read).
        self.masking = False
        self.catalog: Any = None  # keyturn.masking.engine.MaskCatalog
        self.detectors: Any = None
        self._mask_ops: dict[str, Any] = {}
        self._sensitive_name: Any = None
        self._audit_prefix: bytes | None = None
        self._catalog_refreshing = False
        # Lineage of SQL-level PREPAREd statements and DECLAREd cursors, by name.
        self.mask_prepared: dict[str, Any] = {}
        self.mask_cursors: dict[str, Any] = {}
        self.portals: dict[str, tuple[str, bytes]] = {}
        self.prepared: Any = None
        self.tx_status = "I"
        # The read-only guard: the transaction state predicted where the next message runs,
        # the guard statements prepared on the target, whether a batch (extended protocol,
        # up to Sync) has begun and was given write access.
        self.txs = guard.TxState()
        self.guard_stmts: set[str] = set()
        self.batch_open = False
        self.batch_rw = False
        self.batch_explicit = False  # the batch runs in the gateway's own transaction
        self.barrier_done = False  # a statement that held the client's next ones completed
        # In the current implicit transaction (extended protocol): a message has started
        # it / a Bind or Execute has run in it.
        self.imp_started = False
        self.imp_bound = False
        self.upstream_ro = True  # the target's default_transaction_read_only, as reported
        # Write-ahead audit: intent records are numbered 2, 4, 6... (the compiled fast
        # path uses odd numbers); ``unsent`` = intents appended since the last flush.
        self.intent_n = 0
        self.unsent = False
        self._intent_prefix: bytes | None = None
        self.closed = False
        self.terminating = False
        self.connected_at = time.time()
        self.client_ip = ""  # the address alone: login throttling counts per address

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        self.client_ip = str(peer[0]) if isinstance(peer, tuple) else self.client_addr

    def data_received(self, data: bytes, fast_ok: bool = True) -> None:
        """``fast_ok=False``: the client relay's fast path already declined this chunk."""
        try:
            if self.phase == "ready":
                fast = self.fast if fast_ok else None
                # The fast path may take the chunk only while the session has nothing of
                # its own in flight on either side; taking it arms the relays (see
                # _install_relays), which then call it without asking here first.
                up = self.upstream
                if fast is not None and not self.expect and not self.holding and \
                        self.gw.audit_spool.accepting and self._guard_quiet() and \
                        not self.skip_until_sync and not self.fail_at_sync and \
                        not self.reader.pending and not self.closed and up is not None and \
                        not up.closed and not up.reader.pending and fast.client(data):
                    return
                self._client_messages(self.reader.feed(data))
                return
            self.reader.receive_data(data)
            if self.phase == "startup":
                self._startup_events()
            elif self.phase == "auth":
                self._auth_messages()
            elif self.phase == "ready":
                self._client_messages(self.reader.feed(b""))
            elif self.phase == "tls":
                raise codec.RemoteProtocolError("unencrypted data after SSLRequest")
            # "connecting": kept in the reader until the target is ready.
        except ProtocolError as exc:
            self.fatal(exc.sqlstate, exc.message)
        except Exception:
            log.exception("session %s failed", self.session_id)
            self.fatal("XX000", "keyturn: internal error in the gateway (see its log)")

    def fast_failed(self, exc: BaseException) -> None:
        """The client relay's fast path raised (see _install_relays): as data_received."""
        log.error("session %s failed", self.session_id, exc_info=exc)
        self.fatal("XX000", "keyturn: internal error in the gateway (see its log)")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.fast is not None:
            self.fast.disarm()
        self.gw.drop_key(self.key)
        if self.upstream:
            self.upstream.close()
        if self.held_ticket is not None:
            self._cancel_held("client disconnected")
        self._unfinished("the session ended before the outcome was known: the statement "
                         "was sent to the target and may have run")
        if self.identity is not None:
            self.gw.audit(kind="disconnect", user=self.user, connection=self.conn_name,
                          session_id=self.session_id, client_addr=self.client_addr,
                          duration_ms=(time.time() - self.connected_at) * 1000)

    def _unfinished(self, note: str) -> None:
        """Statements sent to the target whose answer will never be read (the session
        is ending): recorded now, outcome ``unknown`` (a running write may still commit)."""
        try:
            self._take_fast()
        except Exception:  # the fast path's own queue, already gone: nothing to take
            log.exception("session %s: taking the fast path's queue failed", self.session_id)
        expect, self.expect = self.expect, deque()
        for entry in expect:
            ctx = entry.ctx
            if ctx is None or entry.hide or entry.kind not in (b"Q", b"E"):
                continue
            if ctx.error is None:
                ctx.error = {"C": "", "M": note}
            self._audit(ctx, outcome="unknown")

    def pause_writing(self) -> None:
        if self.upstream:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream:
            self.upstream.resume_reading()

    @property
    def conn_name(self) -> str | None:
        return self.conn.name if self.conn else None

    # ------------------------------------------------------------ output helpers

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def fatal(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        """End this one connection with a FATAL error; others are unaffected."""
        if self.closed:
            return
        if self.phase not in ("tls",):
            self.write(codec.encode_error("FATAL", sqlstate, message, detail=detail))
        log.info("session %s closed: %s %s", self.session_id, sqlstate, message)
        if self.transport:
            self.transport.close()
        self.connection_lost(None)

    async def shutdown(self, reason: str) -> None:
        if self.held_ticket is not None:
            await asyncio.to_thread(self._cancel_held_sync, reason)
        self.fatal("57P01", f"keyturn: {reason}")

    def _spawn(self, coro: Any) -> None:
        self.gw.spawn(self._guard(coro))

    async def _guard(self, coro: Any) -> None:
        try:
            await coro
        except Exception:
            log.exception("session %s failed", self.session_id)
            self.fatal("XX000", "keyturn: internal error in the gateway (see its log)")

    # ------------------------------------------------------------ startup

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
            transport = await loop.start_tls(self.transport, self, self.gw.tls, server_side=True)
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
        self.reader = codec.FrontendReader()
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
        for key, why in REFUSED_STARTUP.items():
            if params.get(key):
                self.fatal("42501", f"keyturn: startup parameter {key!r} is refused: {why}")
                return
        scs = params.get("standard_conforming_strings")
        if scs is not None and scs.lower() in ("off", "false", "no", "0"):
            self.fatal("42501", "keyturn: startup parameter 'standard_conforming_strings' is "
                                "refused: off changes how SQL string literals are read")
            return
        enc = params.get("client_encoding")
        refused = client_encoding_refusal(enc) if enc is not None else None
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
        if params.get("search_path") is not None:
            self.schemas |= set(search_path_schemas(params["search_path"]))
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
            self.gw.store_failed(exc, self)
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
            self.gw.store_failed(exc, self)
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

    def _authenticated(self, server_final: bytes | None, token_id: int | None = None, *,
                       waited: bool = False) -> None:
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
        refused = self.gw.logged_in(self)
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
            self.upstream = await Upstream.connect(self, self.conn, forward)
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
                self.catalog = await asyncio.to_thread(self.gw.column_origins, self.conn)
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
        self.key = self.gw.new_key(self, backend[0] if backend is not None else None)
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
        if _speedups is not None and not self.masking:
            # It writes to both transports directly: callers check that neither is closed.
            assert self.transport is not None and self.upstream.transport is not None
            self.fast = _speedups.FastPath(
                self, self.fast_verdicts, self.fast_stmts, self.portals, self.transport.write,
                self.upstream.transport.write, self.gw.audit_spool.write_line,
                self._audit_prefix_bytes(), FAST_AUDIT_LAYOUT, MAX_SHAPED_TEXT,
                self._intent_prefix_bytes(),
                getattr(self.gw.audit_spool, "flush_ahead", None))
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

    # ------------------------------------------------------------ client -> target

    def _take_fast(self) -> None:
        """Take over what the compiled fast path queued, if anything (before anything is
        queued here), so the session's expectation queue stays in the order the target
        answers."""
        fast = self.fast
        if fast is None or not fast.pending:
            return
        expect = self.expect
        for kind, sql, decision, t0, rows, tag, n in fast.drain():
            if kind == b"B":
                expect.append(_EXPECT_B)
            elif kind == b"S":
                expect.append(_EXPECT_S)
            elif kind == b"D":
                expect.append(Expect(b"D"))  # Describe of the unnamed portal
            else:
                ctx = Ctx(sql, decision.classification, "allow", decision.rule, decision.reason,
                          t0, portal="" if kind == b"E" else None, n=n)
                if tag is not None:
                    ctx.tags, ctx.rows = [tag.decode("utf-8", "replace")], rows
                expect.append(Expect(kind, ctx))

    def _client_messages(self, msgs: list[Message]) -> None:
        self._take_fast()
        if not msgs:
            return
        if self.holding:
            self._to_backlog(msgs)
            return
        out: list[bytes] = []
        for i, msg in enumerate(msgs):
            if not self.batch_open and (msg.type == b"P" or msg.type == b"B"
                                        or msg.type == b"E") and not self.skip_until_sync:
                self._open_batch(msgs, i, out)
            if not self._client_message(msg, out):
                # A hold started: everything after it waits, in order.
                self._to_backlog(msgs[i + 1:])
                break
        if out and self.upstream:
            self._send(b"".join(out))

    def _send(self, data: bytes) -> None:
        """Write to the target; intent records appended for what it carries reach the
        spool file first (a write to the OS), so a statement that reached the target
        has a record even if this process is killed right after."""
        if self.unsent:
            self.unsent = False
            self.gw.audit_spool.flush_ahead()
        assert self.upstream is not None
        self.upstream.write(data)

    def _to_backlog(self, msgs: list[Message]) -> None:
        for m in msgs:
            self.backlog.append(m)
            self.backlog_bytes += len(m.raw)
        if self.backlog_bytes > MAX_BACKLOG:
            self.fatal("54000", "keyturn: too much data sent while a statement is held")

    def _client_message(self, msg: Message, out: list[bytes]) -> bool:
        """Handle one message; False when it started a hold."""
        t = msg.type
        if self.skip_until_sync and t != b"S":
            return True
        if t == b"Q":
            return self._on_query(msg, out)
        if t == b"B":
            # Only the names now; parameters are decoded when someone needs to read them.
            body = msg.body
            i = body.find(b"\0")
            j = body.find(b"\0", i + 1)
            if i < 0 or j < 0:
                raise codec.RemoteProtocolError("invalid Bind message")
            pkey = _pkey(body[:i].decode("utf-8", "surrogateescape"))
            skey = _pkey(body[i + 1:j].decode("utf-8", "surrogateescape"))
            if pkey.lower().startswith(_OWN_PREFIX) or skey.lower().startswith(_OWN_PREFIX):
                self._refuse_own_name(pkey if pkey.lower().startswith(_OWN_PREFIX) else skey,
                                      out)
                return True
            self.portals[pkey] = (skey, body)
            target = self._bind_target(skey)
            self.bound[pkey] = (body, target)
            if not self.batch_rw and not self.txs.block and target is not None \
                    and target is not _AMBIGUOUS and self._grant_classes(target.analysis)[0]:
                # A write bound in a later read than the batch's start: what else the
                # batch holds is not known, so its reads are guarded (explicit).
                self._grant_batch(out, explicit=True)
            self.imp_started = self.imp_bound = True
            self.expect.append(_EXPECT_B)
            out.append(msg.raw)
            return True
        if t == b"E":
            return self._on_execute(msg, out)
        if t == b"P":
            p = codec.decode_parse(msg.body)
            if _SHOW_READ_ONLY.match(p.query):
                p = dataclasses.replace(p, query=_show_read_only(p.query))
                raw = codec.encode_parse(p.name, p.query, p.param_types)
                msg = Message(b"P", raw[5:], raw)
            if p.name.lower().startswith(_OWN_PREFIX):
                self._refuse_own_name(p.name, out)
                return True
            analysis = self.analyzer.analyze(p.query)
            if p.param_types and max(p.param_types) >= _FIRST_USER_OID:
                analysis = self._typed_parameters(analysis, p.param_types)
            self._note_search_path(analysis.statements)
            if analysis.statements and analysis.error is None and \
                    self._refuse_parse(p.query, analysis, out):
                return True
            info = StmtInfo(p.query, analysis, p.param_types, names=any(
                st.command in _NAMESPACE_COMMANDS for st in analysis.statements))
            self.imp_started = True
            self.expect.append(self._namespace_op(_pkey(p.name), b"P", info))
            out.append(msg.raw)
            return True
        if t == b"S":
            self.skip_until_sync = False
            self.syncs += 1
            explicit = self.batch_explicit
            self.batch_open = self.batch_rw = self.imp_started = self.imp_bound = False
            if self.fail_at_sync:
                # A refused Execute: before the client's Sync, run a statement that fails,
                # so the target aborts the (possibly implicit) transaction as PostgreSQL
                # would have after an error. Its answers are swallowed (the client already
                # has our error). If the target is already skipping to Sync after an
                # earlier error, it skips these too and the Sync still answers.
                self.fail_at_sync = False
                self.expect.append(self._namespace_op("", b"P", None, swallow=True))
                out.append(_FAIL_EXTENDED)
                # (The constant cast fails already at Parse; any of the three may fail.)
                self.expect.append(Expect(b"B", swallow=True, replace=b""))
                self.expect.append(Expect(b"E", replace=b""))
            if not explicit:
                self.expect.append(_EXPECT_S)
                out.append(msg.raw)
                return True
            self.expect.append(self._end_batch(out))
            out.append(msg.raw)
            self.expect.append(Expect(b"Q", hide=True))
            out.append(_ROLLBACK_QUERY)
            return True
        if t == b"D":
            dsc = codec.decode_describe(msg.body)
            self.imp_started = True
            self.expect.append(Expect(b"D", name=_pkey(dsc.name) if dsc.kind == "S" else None))
            out.append(msg.raw)
            return True
        if t == b"C":
            c = codec.decode_close(msg.body)
            if c.name.lower().startswith(_OWN_PREFIX):
                self._refuse_own_name(c.name, out)
                return True
            self.imp_started = True
            if c.kind == "S":
                self.expect.append(self._namespace_op(_pkey(c.name), b"C", None))
            else:
                self.portals.pop(_pkey(c.name), None)
                self.bound.pop(_pkey(c.name), None)
                self.expect.append(_EXPECT_C)
            out.append(msg.raw)
            return True
        if t in (b"d", b"c", b"f", b"H"):
            out.append(msg.raw)
            return True
        if t == b"X":
            self.terminating = True
            out.append(msg.raw)
            return True
        if t == b"F":
            self._refuse(codec.encode_error("ERROR", "42501", "keyturn: FunctionCall messages "
                                            "are refused; call the function from SQL instead"),
                         b"Q", out)
            return True
        raise codec.RemoteProtocolError(f"unexpected message type {t!r} in a session")

    # ---- the server's prepared-statement namespace

    def _namespace_op(self, key: str, kind: bytes, info: StmtInfo | None, *,
                      swallow: bool = False) -> Expect:
        """A Parse (info: its statement) or a statement Close (None) of ``key`` is sent.

        Until the target answers, the name may still hold what it held before: a Parse
        of an existing name fails, and after an error everything up to Sync is skipped.
        A Bind in the same batch sees the new state (if the change failed or was skipped,
        so is the Bind); a Bind in a later batch while the answer is unknown is refused
        as ambiguous. SQL EXECUTE of the name is unknown from now on."""
        self.op_seq += 1
        prior = self.stmts.get(key)
        if info is None:
            self.stmts.pop(key, None)
        else:
            self.stmts[key] = info
        self.stmt_op[key] = (self.op_seq, self.syncs)
        self.doubt[key] = self.doubt.get(key, 0) + 1
        self.fast_stmts.pop(key.encode("utf-8", "surrogateescape"), None)
        if self.prepared is not None:
            self.prepared.drop(key)
        return Expect(kind, op=self.op_seq, name=key, prior=prior, mine=info,
                      swallow=swallow, replace=b"" if swallow else None)

    def _namespace_answer(self, entry: Expect, ok: bool) -> None:
        """The target accepted (ok), refused or skipped a Parse / Close of ours."""
        key = entry.name
        assert key is not None
        left = self.doubt.get(key, 0) - 1
        if left > 0:
            self.doubt[key] = left
        else:
            self.doubt.pop(key, None)
        latest = self.stmt_op.get(key, (0, 0))[0] == entry.op
        if ok:
            if latest:
                if entry.mine is None:
                    self.stmts.pop(key, None)
                else:
                    self.stmts[key] = entry.mine
            return
        self.fast_stmts.pop(key.encode("utf-8", "surrogateescape"), None)
        if latest:
            if entry.prior is None:
                self.stmts.pop(key, None)
            else:
                self.stmts[key] = entry.prior
        else:
            # A later change was sent on the assumption that this one worked.
            self.stmts[key] = _AMBIGUOUS

    def _refuse_parse(self, sql: str, analysis: Any, out: list[bytes]) -> bool:
        """Refuse a Parse (True) whose statement runs user-defined code before any Execute
        and which the policy does not allow: the server runs a composite or domain type's
        input and checks while it parses a literal, and folds immutable functions while it
        plans at Bind, so deciding at Execute would be too late."""
        decision = self._verdict(analysis)
        if decision.action == "allow" or not _runs_user_code(analysis, decision):
            return False
        how = "blocked" if decision.action == "block" else "not allowed without review"
        reason = (f"{decision.reason}; it runs user-defined code while the server prepares "
                  "it, so it is refused before it is sent" +
                  ("" if decision.action == "block" else
                   " (send it as a simple query to have it held for review)"))
        rule = f"rule {decision.rule!r}" if decision.rule else "the policy default"
        self._refuse(codec.encode_error("ERROR", "42501", f"keyturn: {how} by {rule}: {reason}"),
                     b"E", out)
        ctx = Ctx(sql, decision.classification, "block", decision.rule, reason, time.time())
        self._audit(ctx, outcome="blocked")
        return True

    def _verdict(self, analysis: Any) -> Decision:
        """The decision on an analysis, from the session's memo when it holds one."""
        statements = analysis.statements
        if len(statements) != 1 or analysis.error is not None:
            return self._decide(analysis)
        st = statements[0]
        key = (st.cls, st.tables, st.functions, st.forbidden, st.reasons, st.refs)
        hit = self.verdicts.get(key)
        if hit is None:
            hit = self._decide(analysis)
            # Only allowed verdicts are kept: a policy generation or a catalog change
            # clears them (forget_verdicts).
            if hit.action == "allow" and len(self.verdicts) < 4096:
                self.verdicts[key] = hit
        return hit

    def _typed_parameters(self, analysis: Any, types: Sequence[int]) -> Any:
        """A Parse that declares parameters of user types (a domain, a composite holding
        one): values bound to them run those types' code, as a cast would."""
        assert self.conn is not None
        if not analysis.statements:
            return analysis
        refs = []
        for oid in types:
            if oid >= _FIRST_USER_OID:
                named = self.gw.catalogs.type_named(self.conn, oid)
                if named is not None:
                    refs.append(("t", *named))
        if not refs:
            return analysis
        first = analysis.statements[0]
        first = dataclasses.replace(first, refs=tuple(dict.fromkeys((*first.refs, *refs))))
        return dataclasses.replace(analysis, statements=(first, *analysis.statements[1:]))

    def _bind_target(self, key: str) -> StmtInfo | None:
        info = self.stmts.get(key)
        if self.doubt.get(key) and self.stmt_op.get(key, (0, -1))[1] != self.syncs:
            return _AMBIGUOUS
        return info

    def _sql_namespace(self, changes: Any) -> None:
        """SQL PREPARE / DEALLOCATE / DISCARD may replace or free a name a Parse made:
        that name is unknown at the protocol level from now on (a Bind of it is refused)."""
        for _index, name, _seq in changes:
            keys = list(self.stmts) if name is None else [_pkey(name)]
            for key in keys:
                self.op_seq += 1
                self.stmts.pop(key, None)
                self.stmt_op[key] = (self.op_seq, self.syncs)
            if name is None:
                self.fast_stmts.clear()
                self.guard_stmts.clear()  # DEALLOCATE ALL took the guard's too
            else:
                self.fast_stmts.pop(_pkey(name).encode("utf-8", "surrogateescape"), None)

    # ---- decisions

    def _decide(self, analysis: Any) -> Decision:
        assert self.identity is not None and self.conn is not None
        statements = analysis.statements
        if self.schemas != _DEFAULT_SCHEMAS:
            statements = tuple(self._resolve(st) for st in statements)
        statements = self.gw.catalogs.resolve(self, statements)  # what runs on the target
        return self.gw.policy.evaluate(Request(self.user, self.identity.groups, self.conn,
                                               statements, analysis.error))

    def _note_search_path(self, statements: tuple[Statement, ...]) -> None:
        """Widen the schemas unqualified names may resolve in; forget memoised verdicts."""
        for st in statements:
            if st.search_path is None:
                continue
            wider = self.schemas | set(st.search_path)
            if wider != self.schemas:
                self.schemas = wider
                self.forget_verdicts()

    def forget_verdicts(self) -> None:
        """Judge every statement afresh: what a name means has changed (search_path, or
        the target's catalog; proxies/postgres/catalog.py)."""
        self.verdicts.clear()
        self.fast_verdicts.clear()
        self.guarded_verdicts.clear()
        self.fast_stmts.clear()
        for info in self.stmts.values():
            info.decision = None

    def _resolve(self, st: Statement) -> Statement:
        """The statement with each unqualified table in every schema the session's
        search_path may name, so a rule on ``secret.*`` sees ``SELECT * FROM t`` after
        ``SET search_path = secret``. An unreadable search_path makes it unknown."""
        if not st.unqualified:
            return st
        names = ", ".join(st.unqualified)
        if "*" in self.schemas:
            return dataclasses.replace(st, cls=StatementClass.UNKNOWN, reasons=(
                f"the session set search_path to a value keyturn cannot read, so {names} "
                "cannot be resolved", *st.reasons))
        assert self.conn is not None
        role = target_of(self.conn).user or self.user
        schemas = sorted(role if s == "$user" else s for s in self.schemas)
        extra = [f"{schema}.{name}" for name in st.unqualified for schema in schemas]
        return dataclasses.replace(
            st, tables=tuple(dict.fromkeys([*st.tables, *extra])),
            reasons=(*st.reasons, f"search_path may resolve {names} in schema(s) "
                                  f"{', '.join(schemas)}"))

    def _on_query(self, msg: Message, out: list[bytes]) -> bool:
        sql = codec.decode_query(msg.body)
        if _SHOW_READ_ONLY.match(sql):
            sql = _show_read_only(sql)
            raw = codec.encode_query(sql)
            msg = Message(b"Q", raw[5:], raw)
        fast = fast_shape(sql)
        if fast is not None:
            # Hottest path: a statement this session was allowed to run before, with
            # other numbers in it (pgbench, ORMs that inline ids).
            hit = self.fast_verdicts.get(fast)
            if hit is not None and self.gw.audit_spool.accepting and self._guard_quiet():
                known = hit[0]
                ctx = Ctx(sql, known.classification, "allow", known.rule, known.reason,
                          time.time())
                self.expect.append(Expect(b"Q", ctx))
                self._intent(ctx)
                out.append(msg.raw)
                return True
            guarded = self.guarded_verdicts.get(fast)
            if guarded is not None and self.gw.audit_spool.accepting:
                # The same for an allowed write or transaction statement: no analysis or
                # policy, but the read-only guard plans it (it depends on the state).
                known, st = guarded
                text = sql.strip()
                if text.endswith(";"):
                    text = text[:-1].rstrip()
                ctx = Ctx(sql, known.classification, "allow", known.rule, known.reason,
                          time.time())
                ctx.analysis = _Single((dataclasses.replace(st, text=text),))
                return self._forward_query(msg, ctx, out)
        analysis = self.analyzer.analyze(sql, self.prepared)
        statements = analysis.statements
        self._note_search_path(statements)
        if len(statements) == 1 and analysis.error is None:
            # Hot path: one statement whose verdict this session has seen before
            # (the verdict depends on everything in the key, never on the text).
            st = statements[0]
            decision = self._verdict(analysis)
            if (decision.action == "allow" and fast is not None and not self.masking
                    and len(self.fast_verdicts) < 4096 and self.analyzer.known_shape(fast)
                    and not _runs_user_code(analysis, decision)):
                if decision.classification == "read" and not st.facts:
                    self.fast_verdicts[fast] = (decision, _fragment(decision))
                elif len(self.guarded_verdicts) < 4096:
                    self.guarded_verdicts[fast] = (decision, _as_decided(analysis, decision)
                                                   .statements[0])
        else:
            decision = self._decide(analysis)
        ctx = Ctx(sql, decision.classification, decision.action, decision.rule, decision.reason,
                  time.time())
        if analysis.changes:
            ctx.changes = analysis.changes
            self._sql_namespace(analysis.changes)
        return self._dispatch(msg, ctx, decision, analysis, out, b"Q")

    def _on_execute(self, msg: Message, out: list[bytes]) -> bool:
        body = msg.body
        end = body.find(b"\0")
        if end < 0 or len(body) != end + 5:
            codec.decode_execute(body)  # raises the precise protocol error
            raise codec.RemoteProtocolError("invalid Execute message")
        portal = _pkey(body[:end].decode("utf-8", "surrogateescape")) if end else ""
        self.imp_started = self.imp_bound = True
        stmt_name, bind_body = self.portals.get(portal, (None, b""))
        bound = self.bound.get(portal)
        if bound is not None and bound[0] is bind_body:
            info = bound[1]  # bound here: the statement as it was at Bind
        else:
            # Bound by the compiled fast path (a statement allowed as a read), if at all.
            info = self.stmts.get(stmt_name) if stmt_name is not None else None
        if info is _AMBIGUOUS:
            ctx = Ctx(f"<prepared statement {stmt_name!r}>", "unknown", "block",
                      "builtin:ambiguous-statement",
                      "the statement name was changed (Parse/Close/PREPARE/DEALLOCATE) and "
                      "keyturn cannot tell which definition the server holds", time.time())
            self._blocked(ctx, b"E", out)
            return True
        if info is None:
            # A portal we did not see bound (e.g. a DECLAREd cursor) cannot be judged here.
            ctx = Ctx(f"<portal {portal!r}>", "unknown", "block", "builtin:unknown-portal",
                      "keyturn did not see this portal being bound; it cannot be analysed",
                      time.time())
            self._blocked(ctx, b"E", out)
            return True
        if info.decision is None:
            info.decision = self._verdict(info.analysis)
        d = info.decision
        if self.fast is not None and d.action == "allow" and d.classification == "read" \
                and stmt_name is not None and not info.names \
                and not _runs_user_code(info.analysis, d) and not any(
                    st.facts for st in info.analysis.statements) \
                and self._bind_target(stmt_name) is info:
            # Bind/Execute/Sync of this statement can now take the compiled fast path.
            key = stmt_name.encode()
            if key not in self.fast_stmts and len(self.fast_stmts) < 4096:
                self.fast_stmts[key] = (d, _fragment(d), orjson.dumps(info.sql), info.sql,
                                        stmt_name)
        analysis = info.analysis
        if d.action != "allow":
            # A value the class depends on may be bound ($1 of set_config): judge the
            # values this Bind gives (after the fast path above, which must not keep it).
            rejudged = settings.judge_bound(info.sql, analysis, bind_body,
                                            self.analyzer.analyze, self._decide,
                                            info.param_types)
            if rejudged is not None:
                analysis, d = rejudged
        params = None
        if d.action != "allow" or d.classification != "read":
            # Tickets and the audit of non-reads carry the exact parameters.
            params = _bind_params(codec.decode_bind(bind_body), info.param_types)
        ctx = Ctx(info.sql, d.classification, d.action, d.rule, d.reason, time.time(),
                  params=params, portal=portal)
        if info.names:
            # PREPARE / DEALLOCATE / DISCARD sent as a Parse: it changes the SQL namespace
            # when it runs (judged as it was parsed; applied to the model now).
            changes = self.analyzer.analyze(info.sql, self.prepared).changes
            if changes:
                ctx.changes = changes
                self._sql_namespace(changes)
        return self._dispatch(msg, ctx, d, analysis, out, b"E")

    def _dispatch(self, msg: Message, ctx: Ctx, decision: Decision, analysis: Any,
                  out: list[bytes], kind: bytes) -> bool:
        """Forward, block or hold one Query (kind Q) or Execute (kind E)."""
        ctx.analysis = analysis = _as_decided(analysis, decision)
        spool = self.gw.audit_spool
        if not spool.accepting:
            # Nothing runs unaudited: while records cannot be written, statements fail.
            self._refuse(codec.encode_error("ERROR", "53100", spool.refusal or (
                "keyturn: the audit trail cannot be written; new statements are refused "
                "until it can")), kind, out)
            ctx.action = "block"
            self._audit(ctx, outcome="refused")
            return True
        if self.masking:
            self._redact(ctx)
            if decision.masks and decision.action != "block":
                checked = self._mask_setup(ctx, decision, analysis, kind, out)
                if checked is None:
                    return True
                decision = checked
        if decision.action == "allow" or decision.action == "mask":
            if not _runs_user_code(analysis, decision):
                return self._forward(msg, ctx, kind, out)
            # User-defined code may turn standard_conforming_strings off or change the
            # encoding, and the target would read messages already sent behind it with
            # those settings (the gateway hears of the change only afterwards). So what
            # follows waits until it completed (and a changed setting ended the session).
            ctx.barrier = True
            if not self._forward(msg, ctx, kind, out):
                return False
            if ctx.action == "block":
                return True  # refused by the read-only guard: nothing was sent
            if kind == b"E":
                out.append(codec.encode_flush())  # its answer now, not at the next Sync
            self.holding = True
            return False
        if decision.action == "block":
            self._blocked(ctx, kind, out)
            return True
        return self._start_review(msg, ctx, decision, analysis, out, kind=kind)

    def _blocked(self, ctx: Ctx, kind: bytes, out: list[bytes]) -> None:
        rule = f"rule {ctx.rule!r}" if ctx.rule else "the policy default"
        self._refuse(codec.encode_error("ERROR", "42501",
                                        f"keyturn: blocked by {rule}: {ctx.reason}"), kind, out)
        self._audit(ctx, outcome="blocked")

    def _refuse(self, error: bytes, kind: bytes, out: list[bytes] | None = None) -> None:
        """Answer a Query (kind Q) or Execute (kind E) with our error instead of running it.

        Like any error, a refusal aborts the transaction it happens in: the target is
        sent a query that fails, so a later COMMIT cannot commit work done before the
        refusal, and the client's ReadyForQuery reports the failed transaction ('E').
        For a Query the target's error is replaced by ours; for an Execute ours goes
        out now, the rest of the batch is skipped and the failing query stands in for
        the Sync. ``out`` holds messages not yet written to the target (None: write now).
        """
        if kind == b"Q":
            self.expect.append(Expect(b"Q", replace=error))
            if out is not None:
                out.append(_FAIL_TRANSACTION)
            elif self.upstream:
                self.upstream.write(_FAIL_TRANSACTION)
            return
        self._inject(error)
        self.skip_until_sync = True
        self.fail_at_sync = True

    def _inject(self, data: bytes, *, rfq: bool = False) -> None:
        """Send our own message after everything the target still owes the client."""
        self._take_fast()
        if not self.expect:
            self.write(data + (codec.encode_ready_for_query(self.tx_status) if rfq else b""))
        else:
            self.expect.append(Expect(b"!", inject=data, rfq=rfq))

    def _audit(self, ctx: Ctx, *, outcome: str) -> None:
        if ctx.changes:
            # PREPARE / DEALLOCATE took effect if their statement completed (neither is
            # undone by a rollback); refused, held or skipped ones changed nothing.
            done = len(ctx.tags) if ctx.tags else 0
            for index, name, seq in ctx.changes:
                self.prepared.settle(name, seq, index < done)
            ctx.changes = None
        now = time.time()
        rec: dict[str, Any] = {
            "at": now, "statement": ctx.shown or ctx.statement,
            "classification": ctx.classification,
            "action": ctx.action, "rule": ctx.rule, "reason": ctx.reason, "outcome": outcome,
            "duration_ms": round((now - ctx.t0) * 1000, 3), "rows": ctx.rows}
        if ctx.n:
            rec["n"] = ctx.n  # completes the intent record of that number
        # Absent keys are stored as NULL / {} by the ingester; the hot path skips them.
        if ctx.ticket_id is not None:
            rec["ticket_id"] = ctx.ticket_id
        if ctx.copy is not None and (ctx.copy.masked or ctx.copy.detected):
            ctx.mask_counts = (ctx.mask_counts or []) + [(["copy"], [ctx.copy.masked])]
            ctx.detected = {**(ctx.detected or {}), **ctx.copy.detected} or None
        if ctx.mask_counts:
            masked: dict[str, int] = {}
            for names, counts in ctx.mask_counts:
                if not isinstance(counts, list):
                    counts = counts.counts  # a row masker
                for i, n in enumerate(counts):
                    if n:
                        masked[names[i]] = masked.get(names[i], 0) + n
            ctx.masked = masked or None
        if ctx.params is not None or ctx.error or (ctx.tags and len(ctx.tags) > 1) or \
                ctx.masked or ctx.detected:
            detail: dict[str, Any] = {}
            if ctx.masked:
                detail["masked"] = ctx.masked
                if ctx.masked_by:
                    detail["masked_by"] = {c: ctx.masked_by[c] for c in ctx.masked
                                           if c in ctx.masked_by}
                detail["mask_rules"] = sorted({r for r, _ in ctx.sens.masks}) if ctx.sens else []
            if ctx.detected:
                detail["detector_hits"] = ctx.detected
            if ctx.params is not None:
                detail["params"] = ctx.shown_params if ctx.shown is not None else ctx.params
            if ctx.error:
                detail["sqlstate"] = ctx.error.get("C")
            if ctx.tags and len(ctx.tags) > 1:
                detail["tags"] = ctx.tags
            rec["detail"] = detail
        self.gw.audit_spool.write_line(
            self._audit_prefix_bytes() + orjson.dumps(rec, default=str, option=_LINE)[1:])

    def _intent(self, ctx: Ctx) -> None:
        """Write-ahead: the record of a statement about to be sent (who, what, the
        decision); ``_audit`` completes it with the outcome. Until the outcome is known
        the ingester holds it back; if this process dies first it is stored with the
        outcome ``unknown``. It reaches the spool file before the statement is sent."""
        self.intent_n += 2
        ctx.n = self.intent_n
        rec: dict[str, Any] = {
            "at": ctx.t0, "statement": ctx.shown or ctx.statement,
            "classification": ctx.classification, "action": ctx.action, "rule": ctx.rule,
            "reason": ctx.reason, "n": ctx.n}
        if ctx.ticket_id is not None:
            rec["ticket_id"] = ctx.ticket_id
        if ctx.params is not None:
            rec["detail"] = {"params": ctx.shown_params if ctx.shown is not None
                             else ctx.params}
        self.gw.audit_spool.write_line(
            self._intent_prefix_bytes() + orjson.dumps(rec, default=str, option=_LINE)[1:])
        self.unsent = True

    def _intent_prefix_bytes(self) -> bytes:
        """The fields every intent record of this session shares, serialised once."""
        prefix = self._intent_prefix
        if prefix is None:
            prefix = self._intent_prefix = self._line_prefix("intent")
        return prefix

    def _audit_prefix_bytes(self) -> bytes:
        """The fields every statement record of this session shares, serialised once."""
        prefix = self._audit_prefix
        if prefix is None:
            prefix = self._audit_prefix = self._line_prefix("statement")
        return prefix

    def _line_prefix(self, kind: str) -> bytes:
        return auditschema.line_prefix(kind=kind, user=self.user, connection=self.conn_name,
                                       protocol=PROTOCOL, session_id=self.session_id,
                                       client_addr=self.client_addr)

    # ---- holds

    def _start_review(self, msg: Message, ctx: Ctx, decision: Decision, analysis: Any,
                      out: list[bytes], *, kind: bytes) -> bool:
        # Everything decided so far must reach the target before we wait.
        if out and self.upstream:
            self._send(b"".join(out))
            out.clear()
        self.holding = True
        self._spawn(self._review(msg, ctx, decision, analysis, kind))
        return False

    async def _review(self, msg: Message, ctx: Ctx, decision: Decision, analysis: Any,
                      kind: bytes) -> None:
        try:
            await self._review_inner(msg, ctx, decision, analysis, kind)
        except Exception:
            log.exception("hold in session %s failed", self.session_id)
            self._refuse(codec.encode_error("ERROR", "XX000", "keyturn: the approval workflow "
                                            "failed; the statement was not run"), kind)
            self._audit(ctx, outcome="error")
        finally:
            self.held_ticket = None
            self.holding = False
        self._replay_backlog()

    async def _review_inner(self, msg: Message, ctx: Ctx, decision: Decision, analysis: Any,
                            kind: bytes) -> None:
        """Hold the statement with the core's hold service; render its outcome."""
        assert self.conn is not None and self.identity is not None and decision.review
        review = decision.review
        conn = self.conn
        binding = binding_of(self.user, conn.name, ctx.statement, ctx.params)
        statements = analysis.statements
        readable = not ctx.params or not any(
            isinstance(p, str) and p.startswith("\\x") for p in ctx.params)
        explain = len(statements) == 1 and getattr(statements[0], "is_dml", False) and readable

        async def enrich(req: TicketRequest) -> TicketRequest:
            estimate = await asyncio.to_thread(self.gw.explain_rows, conn, ctx.statement,
                                               ctx.params) if explain else None
            return dataclasses.replace(req, row_estimate=estimate, facts=ticket_facts(
                req.classification, req.tables, estimate, req.in_transaction))
        req = TicketRequest(
            requester=self.user, requester_groups=self.identity.groups,
            connection=conn.name, statement=ctx.shown or ctx.statement,
            classification=decision.classification, rule=decision.rule or "",
            reason=decision.reason, approver_groups=review.approvers,
            min_approvals=review.min_approvals, timeout=review.timeout, mode=review.mode,
            params=ctx.shown_params if ctx.shown is not None else ctx.params,
            tables=decision.tables, client_addr=self.client_addr,
            application=self.application, session_id=self.session_id,
            in_transaction=self.tx_status in ("T", "E"), language="sql",
            gateway_id=self.gw.config.gateway.gateway_id, binding=binding)

        def on_held(held: holds.Held) -> None:
            ctx.ticket_id = held.ticket_id
            if held.mode == "defer":
                return  # the outcome says it
            self._inject(codec.encode_notice("NOTICE", "00000", f"keyturn: {held.message}"))
            if kind == b"E" and self.upstream:
                # Let the target flush ParseComplete/BindComplete so the client sees them.
                self.upstream.write(codec.encode_flush())

        def on_wait(ticket_id: int | None) -> None:
            self.held_ticket = ticket_id

        outcome = await self.gw.holds.hold(req, binding=binding, noun="statement",
                                           on_held=on_held, on_wait=on_wait,
                                           is_gone=lambda: self.closed, enrich=enrich)
        if outcome.status == holds.GONE:
            return
        if outcome.ticket_id is not None:
            ctx.ticket_id = outcome.ticket_id
        if outcome.run:
            self._inject(codec.encode_notice("NOTICE", "00000", f"keyturn: {outcome.message}"))
            self._forward_approved(msg, ctx, kind)
            return
        self._refuse(codec.encode_error("ERROR", _OUTCOME_SQLSTATE.get(outcome.status, "42501"),
                                        f"keyturn: {outcome.message}"), kind)
        if outcome.status == holds.DEFERRED:
            return
        ctx.action = "review"
        self._audit(ctx, outcome=outcome.status)

    def _forward_approved(self, msg: Message, ctx: Ctx, kind: bytes) -> None:
        ctx.t0 = time.time()
        out: list[bytes] = []
        self._forward(msg, ctx, kind, out)
        if self.upstream:
            self._send(b"".join(out))

    def _forward(self, msg: Message, ctx: Ctx, kind: bytes, out: list[bytes]) -> bool:
        """Send a Query or Execute on; False when the Execute waits (see below)."""
        if kind == b"Q":
            return self._forward_query(msg, ctx, out)
        self._guard_before_execute(ctx, out)
        if self.masking:
            # Learn the result's shape and formats before its rows: our own Describe of
            # the portal, answered to us alone.
            out.append(codec.encode_describe("P", ctx.portal or ""))
            if ctx.sens is not None and _binary_results(self.portals.get(ctx.portal or "")):
                # A masked column in a binary format that cannot be masked is refused
                # before it runs, so that, like any error, the refusal skips the rest of
                # the batch and aborts its transaction: the Execute (and every later
                # message) waits for the Describe's answer.
                out.append(codec.encode_flush())
                self.expect.append(Expect(b"D", plan_for=ctx, then=msg))
                self.holding = True
                return False
            self.expect.append(Expect(b"D", plan_for=ctx))
        self.expect.append(Expect(kind, ctx))
        self._intent(ctx)
        out.append(msg.raw)
        self._guard_after_execute(ctx, out)
        return True

    # ---- the read-only guard (proxies/postgres/guard.py)

    def _guard_quiet(self) -> bool:
        """A read may go as it is (the compiled fast path): no explicit transaction, or
        one whose reads are already read-only."""
        txs = self.txs
        return not txs.block or txs.ro_open or txs.block_ro

    def _forward_query(self, msg: Message, ctx: Ctx, out: list[bytes]) -> bool:
        analysis = ctx.analysis
        try:
            if analysis is None or (not analysis.statements and analysis.error is None):
                plan = None  # nothing to run (an empty query)
            elif analysis.error is not None:
                plan = guard.plan_unparsed(self.txs)
            else:
                plan = guard.plan_query(analysis.statements, self.txs)
        except guard.Refused as exc:
            ctx.action, ctx.reason = "block", str(exc)
            self._refuse(codec.encode_error("ERROR", "25000", f"keyturn: {exc}"), b"Q", out)
            self._audit(ctx, outcome="blocked")
            return True
        self._intent(ctx)
        if plan is None:
            self.expect.append(Expect(b"Q", ctx))
            out.append(msg.raw)
            return True
        self.txs = plan.state
        if plan.toggle:
            # A command that cannot run in a transaction block: write access for the
            # session around this one Query, taken back right after it.
            self.expect.append(Expect(b"Q", hide=True))
            self.expect.append(Expect(b"Q", ctx))
            self.expect.append(Expect(b"Q", hide=True))
            out += [_DEFAULT_RW_QUERY, msg.raw, _DEFAULT_RO_QUERY]
            return True
        if not plan.changed:
            self.expect.append(Expect(b"Q", ctx))
            out.append(msg.raw)
            return True
        texts = [st.text for st in analysis.statements] if analysis.error is None \
            else [ctx.statement]
        new = guard.rewrite(ctx.statement, texts, plan.parts)
        self.expect.append(Expect(b"Q", ctx, ours=new.ours, rewritten=new,
                                  as_idle=plan.explicit))
        out.append(codec.encode_query(new.sql))
        if plan.explicit:
            # After an error the target skipped the gateway's COMMIT: end the transaction
            # (after a COMMIT, the ROLLBACK only warns, which nobody sees).
            self.expect.append(Expect(b"Q", hide=True))
            out.append(_ROLLBACK_QUERY)
        return True

    def _guard_run(self, sql: str, out: list[bytes]) -> None:
        """One guard statement as extended-protocol messages answered to the gateway
        alone (its errors reach the client: the target then skips to Sync anyway)."""
        name = _GUARD_NAMES[sql]
        if name not in self.guard_stmts:
            self.guard_stmts.add(name)
            out.append(codec.encode_parse(name, sql))
            self.expect.append(Expect(b"P", swallow=True, guard_stmt=name))
        out.append(_GUARD_BIND[sql])
        out.append(_GUARD_RUN)
        self.expect.append(Expect(b"B", swallow=True))
        self.expect.append(Expect(b"E", swallow=True))
        self.expect.append(Expect(b"C", swallow=True))

    def _open_batch(self, msgs: list[Message], i: int, out: list[bytes]) -> None:
        """The first Parse/Bind/Execute after a Sync: outside a transaction, give this
        batch's implicit transaction write access if a statement bound in it (before a
        BEGIN or COMMIT) needs it. It must come before anything takes a snapshot.

        When the batch also holds reads (or statements not seen yet: its Sync is not in
        this read), write access for the whole implicit transaction would let a read
        that hides a write run read-write: the batch then runs in an explicit read-write
        transaction of the gateway's own, its reads in the read-only savepoint."""
        self.batch_open = True
        self.batch_rw = self.batch_explicit = False
        if self.txs.block:
            return
        parsed: dict[str, Any] = {}
        rw = guarded = complete = False
        for m in msgs[i:]:
            t = m.type
            if t == b"S":
                complete = True
                break
            if t == b"P":
                p = codec.decode_parse(m.body)
                parsed[_pkey(p.name)] = self.analyzer.analyze(p.query)
            elif t == b"B":
                body = m.body
                a = body.find(b"\0")
                b = body.find(b"\0", a + 1)
                if a < 0 or b < 0:
                    return
                key = _pkey(body[a + 1:b].decode("utf-8", "surrogateescape"))
                analysis = parsed.get(key)
                if analysis is None:
                    info = self.stmts.get(key)
                    analysis = info.analysis if info is not None and info is not _AMBIGUOUS \
                        else None
                if analysis is None:
                    guarded = True  # what it runs is not known here: the riskiest
                    continue
                statements = analysis.statements
                if any("begin" in st.facts or "end" in st.facts for st in statements):
                    complete = True  # the implicit transaction ends (or turns explicit)
                    break
                needs, reads = self._grant_classes(analysis)
                rw, guarded = rw or needs, guarded or reads
        if rw:
            self._grant_batch(out, explicit=guarded or not complete)

    def _grant_classes(self, analysis: Any) -> tuple[bool, bool]:
        """Whether a bound statement needs write access as the policy judged it (the
        catalog may make a call that looks like a read a write) and the policy may let it
        run (allowed or reviewed: a blocked one never gets write access); and whether it
        is one the guard runs read-only."""
        statements = analysis.statements
        if analysis.error is not None:
            return False, True
        if not statements:
            return False, False
        if len(statements) == 1 and not statements[0].refs \
                and str(statements[0].cls) not in guard.RW_CLASSES:
            # Nothing the catalog could make a write.
            return False, str(statements[0].cls) in guard.GUARDED_CLASSES
        decision = self._verdict(analysis)
        if decision.action == "block":
            return False, False
        classes = {j.classification for j in decision.statements} | {
            str(st.cls) for st in statements}
        return bool(classes & guard.RW_CLASSES), bool(classes & guard.GUARDED_CLASSES)

    def _grant_batch(self, out: list[bytes], *, explicit: bool) -> None:
        """Write access for the current implicit transaction (extended protocol). It must
        come before anything in it took a snapshot: if only Parse / Describe messages ran
        in it (a driver that prepares, then binds), a Sync of the gateway's own ends it
        first; after a Bind or Execute it is too late, and the target refuses the write.
        ``explicit``: as an explicit transaction of the gateway's own (see _open_batch),
        committed before the client's Sync (_end_batch)."""
        if self.imp_bound:
            return
        if self.imp_started:
            out.append(codec.encode_sync())
            self.expect.append(Expect(b"S", hide=True))
        self.batch_rw = True
        if not explicit:
            self._guard_run(guard.SQL_RW_LOCAL, out)
            return
        self._guard_run(guard.SQL_BEGIN_RW, out)
        self.batch_explicit = True
        txs = self.txs
        txs.block, txs.block_ro, txs.ro_open, txs.hold = True, False, False, False

    def _end_batch(self, out: list[bytes]) -> Expect:
        """Before the client's Sync of a batch the gateway made an explicit transaction:
        commit it (skipped by the target after an error), and after the Sync a ROLLBACK
        of the gateway's own, so the session is idle again as after an implicit
        transaction; the client is told 'I' (the returned Expect of its Sync)."""
        self.batch_explicit = False
        txs = self.txs
        if txs.block and not txs.block_ro:
            for sql in guard.before_in_block(txs, frozenset({"end"}), ()):
                self._guard_run(sql, out)
            self._guard_run(guard.SQL_COMMIT, out)
        self.txs = guard.TxState()
        return Expect(b"S", as_idle=True)

    def _guard_before_execute(self, ctx: Ctx, out: list[bytes]) -> None:
        txs = self.txs
        if not txs.block or txs.block_ro:
            return
        analysis = ctx.analysis
        statements = analysis.statements if analysis is not None else ()
        facts = frozenset().union(*(st.facts for st in statements)) if statements else \
            frozenset()
        for sql in guard.before_in_block(txs, facts, [str(st.cls) for st in statements]):
            self._guard_run(sql, out)

    def _guard_after_execute(self, ctx: Ctx, out: list[bytes]) -> None:
        analysis = ctx.analysis
        statements = analysis.statements if analysis is not None else ()
        if not statements:
            return
        facts = frozenset().union(*(st.facts for st in statements))
        if not facts:
            return
        txs = self.txs
        if not txs.block:
            if "hold_cursor" in facts:
                txs.hold = True
            if "begin" in facts:
                txs.block, txs.ro_open, txs.hold = True, False, False
                txs.block_ro = "begin_ro" in facts
                if not txs.block_ro and not self.batch_rw:
                    self._guard_run(guard.SQL_RW_TX, out)
            return
        if "begin" in facts and self.batch_explicit:
            # The client's BEGIN inside the batch's transaction of the gateway's own: as
            # with an implicit one, everything so far is now the client's transaction.
            self.batch_explicit = False
            txs.block_ro = "begin_ro" in facts
        guard.after_in_block(txs, facts)
        if not txs.block:
            # What follows in this batch runs in a new implicit transaction.
            self.batch_rw = self.imp_started = self.imp_bound = False

    def _guard_sync(self) -> None:
        """Nothing is in flight: the target's ReadyForQuery is the truth."""
        if not self.upstream_ro:
            self._guard_lost()
            return
        if self.tx_status == "I":
            if self.txs.block or self.txs.ro_open:
                self.txs = guard.TxState()
        elif not self.txs.block:
            # A transaction the gateway did not see open: its mode is unknown, so reads
            # go to the read-only savepoint and writes may be refused by the target.
            self.txs = guard.TxState(block=True)

    def _guard_lost(self) -> None:
        log.error("session %s: the target's session is no longer read-only by default",
                  self.session_id)
        self.gw.audit(kind="guard_lost", user=self.user, connection=self.conn_name,
                      session_id=self.session_id, client_addr=self.client_addr,
                      outcome="error", reason="default_transaction_read_only was turned off "
                                              "outside the gateway's control")
        if self.upstream:
            self.upstream.close()
        self.fatal("XX000", "keyturn: the session lost its read-only guard and was ended; "
                            "nothing more runs on it")

    def _refuse_own_name(self, name: str, out: list[bytes]) -> None:
        self._refuse(codec.encode_error(
            "ERROR", "42501", f"keyturn: statement and portal names starting with keyturn "
                              f"are the gateway's own ({name!r})"), b"E", out)

    def _param_status(self, body: bytes) -> bytes | None:
        """A ParameterStatus from the target: None to forward it unchanged, b"" to drop
        it (the read-only guard's own setting is the gateway's business)."""
        try:
            name, value = codec.decode_parameter_status(body)
        except Exception:
            return None
        if name == "default_transaction_read_only":
            self.upstream_ro = value == "on"
            return b""
        if name in _READ_AS_ANALYSED and self.phase == "ready" and \
                _READ_AS_ANALYSED[name](value) is not None:
            # The target would now read query text differently from the analyser (string
            # escapes, another encoding): nothing more may run on this session.
            self._text_guard_lost(name, value)
            return b""
        return None

    def _text_guard_lost(self, name: str, value: str) -> None:
        log.error("session %s: the target reported %s = %s", self.session_id, name, value)
        self.gw.audit(kind="guard_lost", user=self.user, connection=self.conn_name,
                      session_id=self.session_id, client_addr=self.client_addr,
                      outcome="error", reason=f"the target reported {name} = {value}, so "
                                              "it would read query text differently from "
                                              "keyturn")
        if self.upstream:
            self.upstream.close()
        self.fatal("XX000", f"keyturn: the target now reads query text differently "
                            f"({name} = {value}); the session was ended")

    def _release_execute(self, head: Expect) -> None:
        """The answer to our Describe arrived for an Execute that waited for it: refuse
        it (a masked column in binary format) or send it, then go on with the backlog."""
        ctx, msg = head.plan_for, head.then
        assert ctx is not None and msg is not None
        self.holding = False
        if ctx.refusal is not None:
            error, ctx.refusal = ctx.refusal, None
            self._audit_mask_refusal(ctx, error)
            ctx.action = "block"
            self._refuse(error, b"E")
            self._audit(ctx, outcome="blocked")
        else:
            self.expect.append(Expect(b"E", ctx))
            self._intent(ctx)
            after: list[bytes] = [msg.raw]
            self._guard_after_execute(ctx, after)
            if self.upstream:
                self._send(b"".join(after))
        self._replay_backlog()

    def _replay_backlog(self) -> None:
        """A wait ended: handle the client messages that arrived meanwhile, in order."""
        if not self.closed and self.backlog:
            pending = list(self.backlog)
            self.backlog.clear()
            self.backlog_bytes = 0
            self._client_messages(pending)

    # ---- masking

    def _mask_setup(self, ctx: Ctx, decision: Decision, analysis: Any, kind: bytes,
                    out: list[bytes]) -> Decision | None:
        """Check a statement a masking rule decided: None when it was refused, else the
        decision to go on with (a write copying masked values may become a review)."""
        from keyturn.analysis.lineage import trace
        from keyturn.masking.engine import Sensitivity, check, copied

        assert self.conn is not None and self.identity is not None
        role = target_of(self.conn).user or self.user
        sens = Sensitivity(self.conn, decision.masks, self.identity.groups,
                           self.catalog.derived if self.catalog else None,
                           schemas=sorted(role if s == "$user" else s for s in self.schemas
                                          if s != "*"))
        reviewers = next((m.writes_review for _, m in decision.masks
                          if m.writes_review is not None), None)
        try:
            lineages, why = self._follow(trace(ctx.statement))
            why = why or check(lineages, sens, tables=decision.tables,
                               classes=[s.classification for s in decision.statements],
                               writes=reviewers is None)
        except Exception as exc:  # fail closed: what cannot be traced cannot be masked
            lineages, why = [], f"the statement cannot be traced for masking ({exc})"
        if why is None and any(lin.copy for lin in lineages):
            why = self._copy_plan(ctx, sens, lineages)
        if why is not None:
            ctx.action, ctx.rule, ctx.reason = "block", decision.masks[0][0], why
            self._blocked(ctx, kind, out)
            return None
        ctx.sens, ctx.lineages = sens, lineages
        hit = copied(lineages, sens) if reviewers is not None else None
        if hit is not None and decision.action != "review":
            # The rule sends writes that copy masked values to an approver instead.
            reason = f"the statement copies masked column {hit.column} ({hit.why}) into " \
                     "another place"
            ctx.action, ctx.rule, ctx.reason = "review", hit.rule, reason
            return dataclasses.replace(decision, action="review", rule=hit.rule,
                                       reason=reason, review=reviewers)
        return decision

    def _copy_plan(self, ctx: Ctx, sens: Any, lineages: list[Any]) -> str | None:
        """COPY … TO on a masked connection: plan the masking of its rows, or say why
        it cannot be masked."""
        from keyturn.masking import styles
        from keyturn.masking.copy import CopyMasker, copy_options

        opts, why = copy_options(ctx.statement)
        if opts is None:
            return why
        (lin,) = lineages
        if opts.relation is not None:
            names = opts.columns or (self.catalog.columns.get(opts.relation)
                                     if self.catalog else None)
            if names is None:
                return f"the columns of {opts.relation} are not known to the gateway"
            sources = [{f"{opts.relation}.{n}"} for n in names]
        elif lin.outputs is not None:
            sources = [o.sources for o in lin.outputs]
        else:
            return "COPY (SELECT * …) cannot be masked; list the columns"
        maskers = {}
        for i, srcs in enumerate(sources):
            hit = sens.first(srcs)
            if hit is not None:
                maskers[i] = styles.masker(styles.MaskStyle.parse(hit.style),
                                           self.gw.mask_key)
        ctx.copy = CopyMasker(opts, maskers, self.detectors)
        return None

    def _redact(self, ctx: Ctx) -> None:
        from keyturn.masking.redact import redact_params, redact_statement, sensitive_names

        if self._sensitive_name is None:
            assert self.conn is not None
            policy = self.gw.config.policies[self.conn.policy]
            patterns = [p for p, _ in self.conn.columns]
            patterns += [c for r in policy.rules if r.mask for c in r.mask.columns]
            self._sensitive_name = sensitive_names(patterns)
        ctx.shown, hidden = redact_statement(ctx.statement, self._sensitive_name,
                                             self.detectors)
        ctx.shown_params = redact_params(ctx.params, hidden, self.detectors)

    def _follow(self, lineages: list[Any]) -> tuple[list[Any], str | None]:
        """EXECUTE and FETCH return what PREPARE and DECLARE named: use that lineage,
        and remember what this message prepares or declares."""
        out = []
        for lin in lineages:
            if lin.prepares is not None:
                self.mask_prepared[lin.prepares] = lin
            if lin.declares is not None:
                self.mask_cursors[lin.declares] = lin
            if lin.executes is not None or lin.fetches is not None:
                known = self.mask_prepared.get(lin.executes) if lin.executes is not None \
                    else self.mask_cursors.get(lin.fetches)
                if known is None:
                    what = f"prepared statement {lin.executes!r}" if lin.executes is not None \
                        else f"cursor {lin.fetches!r}"
                    return [], f"{what} was not created through this masked session, so " \
                               "its results cannot be followed"
                lin = known
            out.append(lin)
        return out, None

    def _refresh_catalog(self) -> None:
        """Drop the gateway's cached catalog and read it again for this session; until
        then, columns of tables the gateway has not seen are fully masked."""
        if self._catalog_refreshing or self.conn is None:
            return
        self._catalog_refreshing = True
        conn = self.conn
        self.gw.forget_origins(conn)

        async def refresh() -> None:
            try:
                self.catalog = await asyncio.to_thread(self.gw.column_origins, conn)
            except Exception:
                log.exception("re-reading the catalog of %s failed", conn.name)
            finally:
                self._catalog_refreshing = False

        self._spawn(refresh())

    def _mask_op(self, style: str) -> Any:
        """The row masker's op for a style (proxies/postgres/rowmask.py), built once per
        session."""
        op = self._mask_ops.get(style)
        if op is None:
            from keyturn.masking import styles

            parsed = styles.MaskStyle.parse(style)
            text_fn = styles.masker(parsed, self.gw.mask_key)
            fn = functools.partial(styles.mask_bytes, text_fn)
            if parsed.kind == "full":
                op = (rowmask.OP_CONST, styles.FULL_MASK_BYTES)
            elif parsed.kind == "null":
                op = (rowmask.OP_NULL,)
            elif parsed.kind == "partial":
                op = (rowmask.OP_PARTIAL, parsed.keep, fn)
            elif parsed.kind == "email":
                op = (rowmask.OP_EMAIL, fn)
            else:
                op = (rowmask.OP_CALL, fn)
            self._mask_ops[style] = op
        return op

    def _plan(self, ctx: Ctx | None, body: bytes) -> None:
        """A RowDescription arrived for ctx's result: decide which fields to mask and
        build the row rewriter for it (None when rows pass through untouched)."""
        from keyturn.masking.engine import output_plan

        if ctx is None:
            return
        fields = codec.decode_row_description(body)
        spec = [(f.name, f.table_oid, f.column_number, f.type_oid, f.format) for f in fields]
        if self.catalog is not None and any(
                f.table_oid and (f.table_oid, f.column_number) not in self.catalog.origins
                for f in fields):
            self._refresh_catalog()
        plan = output_plan(spec, ctx.lineages or [], ctx.sens, self.catalog.origins) \
            if ctx.sens is not None else []
        ops: dict[int, Any] = {}
        for fp in plan:
            if fp.binary and fp.type_oid not in _MASKABLE_BINARY:
                ctx.refusal = codec.encode_error(
                    "ERROR", "42501",
                    f"keyturn: column {fields[fp.index].name!r} must be masked "
                    f"({fp.mask.why}) but was requested in binary format; request it "
                    "as text")
            ops[fp.index] = self._mask_op(fp.mask.style)
            if ctx.masked_by is None:
                ctx.masked_by = {}
            ctx.masked_by[fields[fp.index].name] = fp.mask.rule
        if self.detectors:
            # The detectors read text values: text-format values of any type that is not
            # a number, date, time, boolean or uuid (whose text cannot hold a secret).
            detect = None
            for i, f in enumerate(fields):
                if i not in ops and (f.format == 0 or f.type_oid in _TEXT_OIDS) \
                        and f.type_oid not in _PLAIN_OIDS:
                    detect = detect or _detect_op(self.detectors, ctx)
                    ops[i] = detect
        ctx.plan = [f.name for f in fields]
        if ops:
            # Fields past the last one with an op are copied without being walked.
            masker = rowmask.RowMasker([ops.get(i) for i in range(max(ops) + 1)])
            ctx.rewrite = masker
            ctx.mask_counts = (ctx.mask_counts or []) + [(ctx.plan, masker)]
        else:
            ctx.rewrite = None

    def _redact_notice(self, t: bytes, body: bytes, ctx: Ctx | None = None) -> bytes | None:
        """Error and notice texts quote values: a cast error quotes its input, a
        regclass or setting lookup quotes the name it was given, a constraint error
        shows the failing row. The detectors read them all; the failing row of a
        constraint error is always hidden on a masked connection; and when the statement
        reads masked columns, every quoted value is redacted, since a name or an address
        matches no detector."""
        fields = codec.decode_error_fields(body)
        changed = False
        quoting = ctx is not None and ctx.sens is not None and \
            ctx.sens.first({src for lin in ctx.lineages or () for src in
                            lin.all_sources | lin.predicates | lin.writes}) is not None
        for key in ("M", "D", "H", "W"):
            if key not in fields:
                continue
            new_text = _FAILING_ROW.sub(r"\1(<redacted>)", fields[key])
            if quoting:
                new_text = _QUOTED.sub('"<redacted>"', new_text)
            if new_text != fields[key]:
                fields[key], changed = new_text, True
            if self.detectors is not None:
                new, hits = self.detectors.redact(fields[key])
                if hits:
                    fields[key], changed = new, True
        if not changed:
            return None
        payload = b"".join(k.encode() + v.encode() + b"\0" for k, v in fields.items()) + b"\0"
        return codec.encode_message(t, payload)

    def _cancel_held_sync(self, reason: str) -> None:
        tid = self.held_ticket
        if tid is not None:
            self.gw.holds.cancel(tid, self.user, reason)

    def _cancel_held(self, reason: str) -> None:
        self._spawn(asyncio.to_thread(self._cancel_held_sync, reason))

    async def on_cancel_request(self) -> None:
        if self.held_ticket is not None:
            await asyncio.to_thread(self._cancel_held_sync, "cancelled by the client (Ctrl-C)")
        elif self.upstream and self.upstream.backend_key and self.conn:
            await self.gw.send_target_cancel(self.conn, *self.upstream.backend_key)

    # ------------------------------------------------------------ target -> client

    def server_messages(self, msgs: list[Message]) -> None:
        """Messages the target sent with its login reply (already framed)."""
        chunk = b"".join(m.raw for m in msgs)
        frames, off = [], 0
        for m in msgs:
            end = off + len(m.raw)
            if m.type != b"D" and m.type != b"d":
                frames.append((m.type, off, end))
            off = end
        if chunk:
            self.server_data(chunk, frames)

    def server_data(self, chunk: bytes, frames: list[tuple[bytes, int, int]]) -> None:
        """Relay one chunk of complete messages from the target to the client.

        ``frames`` lists every message but DataRow/CopyData (codec
        ``BackendReader.scan``). The chunk goes out as it came unless the
        gateway must slot its own messages in after a response completes.
        """
        self._take_fast()
        expect = self.expect
        out: list[bytes] | None = None
        seg = 0
        masking = self.masking
        prev = 0
        waiting: Expect | None = None  # an Execute whose Describe answer is here
        for t, start, end in frames:
            if masking and start > prev and expect:
                # Rows (DataRow, COPY data) lie between the frames listed.
                out, seg = self._rows(expect[0], chunk, prev, start, out, seg)
            prev = end
            if t == b"S":
                # default_transaction_read_only is the guard's: never forwarded, and off
                # only inside the gateway's own Queries around one command.
                drop = self._param_status(chunk[start + 5:end])
                if drop is not None:
                    out, seg = _splice(out, chunk, seg, start, end, drop)
                    if not self.upstream_ro and not (expect and expect[0].hide):
                        self._guard_lost()
                        return
                continue
            if not expect:
                continue
            head = expect[0]
            if head.hide:
                # The answer to a Query of the guard's own: none of it is forwarded.
                out, seg = _splice(out, chunk, seg, start, end, b"")
                if t == b"E":
                    log.warning("session %s: the read-only guard's query failed: %s",
                                self.session_id, codec.decode_error_fields(
                                    chunk[start + 5:end]).get("M", ""))
                if t != b"Z":
                    continue
                self.tx_status = chr(chunk[start + 5]) if end > start + 5 else "I"
                expect.popleft()
                if not expect:
                    self._guard_sync()
                    if self.closed:
                        return
                while expect and expect[0].kind == b"!":
                    inj = expect.popleft()
                    out.append(inj.inject or b"")
                    if inj.rfq:
                        out.append(codec.encode_ready_for_query(self.tx_status))
                continue
            if self.masking and t in _MASKED_TYPES and head.replace is None:
                new = self._mask_message(head, t, chunk, start, end)
                if new is not None:
                    out, seg = _splice(out, chunk, seg, start, end, new)
                if t == b"N" or (t == b"T" and head.plan_for is not None):
                    if t == b"T":
                        expect.popleft()
                        if head.then is not None:
                            waiting = head
                    continue
                if t == b"C" and head.ctx is not None and head.ctx.refusal is not None:
                    if head.kind == b"E":
                        expect.popleft()
                        self._finished(head.ctx)
                    continue
            if t == b"Z":
                self.tx_status = chr(chunk[start + 5]) if end > start + 5 else "I"
                # ReadyForQuery ends a Sync or a simple Query. Anything still expected
                # before it was skipped by the target after an error (messages that
                # reached us after the target's error already arrived): drop it.
                while expect:
                    entry = expect.popleft()
                    if entry.as_idle and self.tx_status != "I":
                        # The client's implicit transaction ran as the gateway's own: it
                        # is told idle, as after an implicit one (a ROLLBACK follows).
                        out, seg = _splice(out, chunk, seg, start, end,
                                           codec.encode_ready_for_query("I"))
                    if entry.op:
                        self._namespace_answer(entry, False)
                    elif entry.guard_stmt:
                        self.guard_stmts.discard(entry.guard_stmt)
                    if entry.ctx is not None:
                        if entry.kind not in (b"S", b"Q") and entry.ctx.error is None:
                            entry.ctx.error = {"C": "", "M": "skipped after an earlier error"}
                        self._finished(entry.ctx)
                    if entry.kind == b"S" or entry.kind == b"Q":
                        break
                if not expect:
                    self._guard_sync()
                    if self.closed:
                        return
            elif t == b"C":
                if head.ours is not None:
                    i = head.ci
                    head.ci = i + 1
                    if i < len(head.ours) and head.ours[i]:
                        out, seg = _splice(out, chunk, seg, start, end, b"")
                        continue  # a statement of the guard's own
                elif head.swallow:
                    out, seg = _splice(out, chunk, seg, start, end, b"")
                    if head.kind == b"E":
                        expect.popleft()
                    continue
                if head.ctx is not None:
                    tag = codec.decode_command_complete(chunk[start + 5:end])
                    ctx = head.ctx
                    if ctx.tags is None:
                        ctx.tags = [tag]
                    else:
                        ctx.tags.append(tag)
                    ctx.rows = _rows(tag, ctx.rows)
                if head.kind == b"E":
                    expect.popleft()
                    if head.ctx is not None:
                        self._finished(head.ctx)
            elif t == b"E":
                if head.replace is not None:
                    # Our refusal stands in for the error of the query that failed the
                    # target's transaction.
                    out, seg = _splice(out, chunk, seg, start, end, head.replace)
                    if head.kind != b"Q":
                        # Extended protocol: the target now skips to the Sync.
                        while expect and expect[0].kind != b"S":
                            dropped = expect.popleft()
                            if dropped.op:
                                self._namespace_answer(dropped, False)
                            elif dropped.guard_stmt:
                                self.guard_stmts.discard(dropped.guard_stmt)
                    continue
                fields = codec.decode_error_fields(chunk[start + 5:end])
                if head.rewritten is not None and "P" in fields:
                    # A position in the text sent: as a position in the client's text.
                    moved = head.rewritten.client_position(int(fields["P"] or 0))
                    out, seg = _splice(out, chunk, seg, start, end,
                                       _error_at(chunk[start + 5:end], moved))
                if head.ctx is not None:
                    head.ctx.error = fields
                if head.kind != b"Q" and head.kind != b"S":
                    # Extended protocol: the target skips everything up to Sync.
                    while expect and expect[0].kind != b"S":
                        dropped = expect.popleft()
                        if dropped.op:
                            self._namespace_answer(dropped, False)
                        elif dropped.guard_stmt:
                            self.guard_stmts.discard(dropped.guard_stmt)
                        if dropped.ctx is not None:
                            if dropped.ctx.error is None:
                                dropped.ctx.error = fields
                            self._finished(dropped.ctx)
            elif t == b"t":
                if head.kind == b"D" and head.name is not None:
                    self._learn_param_types(head.name, chunk[start + 5:end])
                continue
            elif t in (b"1", b"2", b"3", b"n", b"I", b"s") or (t == b"T" and head.kind == b"D"):
                if t in (b"I", b"s") and head.kind != b"E":
                    continue
                expect.popleft()
                if head.op:
                    self._namespace_answer(head, True)
                if head.swallow:
                    out, seg = _splice(out, chunk, seg, start, end, b"")
                    continue
                if head.plan_for is not None:
                    # NoData for our own Describe: nothing to mask, nothing to forward.
                    if out is None:
                        out = []
                    out.append(chunk[seg:start])
                    seg = end
                    if head.then is not None:
                        waiting = head
                    continue
                if head.ctx is not None:
                    self._finished(head.ctx)
            else:
                continue
            if expect and expect[0].kind == b"!":
                if out is None:
                    out = []
                out.append(chunk[seg:end])
                seg = end
                while expect and expect[0].kind == b"!":
                    inj = expect.popleft()
                    out.append(inj.inject or b"")
                    if inj.rfq:
                        out.append(codec.encode_ready_for_query(self.tx_status))
        if masking and prev < len(chunk) and expect:
            out, seg = self._rows(expect[0], chunk, prev, len(chunk), out, seg)
        if out is None:
            self.write(chunk)
        else:
            out.append(chunk[seg:])
            self.write(b"".join(out))
        if waiting is not None:
            self._release_execute(waiting)
        if self.barrier_done:
            self.barrier_done = False
            self.holding = False
            self._replay_backlog()

    def _rows(self, head: Expect, chunk: bytes, start: int, end: int,
              out: list[bytes] | None, seg: int) -> tuple[list[bytes] | None, int]:
        """Masked connections: the DataRow or CopyData messages in chunk[start:end]
        (a run between two other messages), masked as head's statement requires."""
        ctx = head.ctx
        if ctx is None:
            return out, seg
        new: bytes | None = None
        if ctx.rewrite is not None:
            if ctx.refusal is not None:
                new = b""  # the result is refused: no row of it goes out
            else:
                try:
                    new = ctx.rewrite.rows(chunk, start, end)
                except ValueError as exc:
                    # Rows that cannot be read cannot be masked: none of them goes out.
                    log.error("session %s: %s from the target", self.session_id, exc)
                    ctx.refusal = codec.encode_error(
                        "ERROR", "XX000", "keyturn: the target sent a row the gateway "
                        "cannot read, so it cannot be masked; the result is withheld")
                    new = b""
        elif ctx.copy is not None:
            parts: list[bytes] = []
            changed = False
            p = start
            while p < end:  # whole messages, framed by the codec already
                e = p + 1 + int.from_bytes(chunk[p + 1:p + 5], "big")
                line = ctx.copy.rewrite(chunk[p + 5:e]) if chunk[p] == 0x64 else None  # d
                if line is not None:
                    parts.append(codec.encode_message(b"d", line))
                    changed = True
                else:
                    parts.append(chunk[p:e])
                p = e
            if changed:
                new = b"".join(parts)
        if new is None:
            return out, seg
        return _splice(out, chunk, seg, start, end, new)

    def _mask_message(self, head: Expect, t: bytes, chunk: bytes, start: int, end: int
                      ) -> bytes | None:
        """Masked connections: what to send instead of this message (b"" = nothing)."""
        body = chunk[start + 5:end]
        if t == b"T":
            if head.plan_for is not None:
                self._plan(head.plan_for, body)
                return b""  # the answer to our own Describe
            self._plan(head.ctx, body)
            return None
        ctx = head.ctx
        if t == b"C":
            if ctx is not None and ctx.refusal is not None:
                self._audit_mask_refusal(ctx, ctx.refusal)
                return ctx.refusal
            return None
        return self._redact_notice(t, body, ctx)  # E, N

    def _audit_mask_refusal(self, ctx: Ctx, error: bytes) -> None:
        fields = codec.decode_error_fields(error[5:])
        ctx.error = {"C": fields.get("C", ""), "M": fields.get("M", "")}

    def _learn_param_types(self, name: str, body: bytes) -> None:
        """Parameter types the server inferred (clients such as asyncpg send 0 =
        unspecified in Parse), so binary parameters can be shown to approvers."""
        info = self.stmts.get(name)
        if info is None or info is _AMBIGUOUS or len(body) < 2:
            return
        (n,) = struct.unpack_from("!h", body, 0)
        if len(body) >= 2 + 4 * n:
            info.param_types = struct.unpack_from(f"!{n}I", body, 2)

    def _finished(self, ctx: Ctx) -> None:
        if ctx.barrier:
            self.barrier_done = True  # released once this answer reached the client
        outcome = "error" if ctx.error else "ok"
        if self.masking and ctx.classification == "ddl" and not ctx.error:
            # Columns may have changed once DDL has run: read the catalog again.
            self._refresh_catalog()
        if ctx.ticket_id is not None:
            tid = ctx.ticket_id
            approvals = self.gw.services.approvals
            if ctx.error:
                err = f"{ctx.error.get('C', '')}: {ctx.error.get('M', '')}"
                self._spawn(asyncio.to_thread(approvals.finish, tid, "fail", actor=self.user,
                                                error=err))
            else:
                self._spawn(asyncio.to_thread(approvals.finish, tid, "execute",
                                                actor=self.user, rows=ctx.rows))
            outcome = "executed" if not ctx.error else "failed"
        self._audit(ctx, outcome=outcome)

    def upstream_lost(self, message: str, *, said_fatal: bool = False) -> None:
        if (self.terminating or said_fatal) and self.transport:
            # Terminate sent, or the target's own FATAL already relayed: just close (a
            # second error would be read as a second result of the client's statement).
            self.transport.close()
        elif not self.closed:
            self.fatal("08006", f"keyturn: lost the connection to the target: {message}")


def ticket_facts(classification: str, tables: Sequence[str], row_estimate: int | None,
                 in_transaction: bool) -> tuple[tuple[str, str], ...]:
    """What approvers see about a held statement besides its text, in order (the
    portal, Slack and Teams show these labelled facts without knowing SQL)."""
    cls = classification + (f" on {', '.join(tables)}" if tables else "")
    rows = f"{row_estimate:,} (EXPLAIN)" if row_estimate is not None else "no estimate"
    tx = "yes — the client holds a transaction" if in_transaction else "no"
    return (("Class", cls), ("Estimated rows", rows), ("Transaction open", tx))


def _runs_user_code(analysis: Any, decision: Decision) -> bool:
    """Whether the target's catalog showed user-defined code in a statement: code the
    gateway cannot see into, or a class the catalog raised (a type's checks, a view)."""
    judged = decision.statements
    return any(st.opaque for st in analysis.statements) or len(judged) != len(
        analysis.statements) or any(str(st.cls) != j.classification
                                    for st, j in zip(analysis.statements, judged, strict=False))


def _as_decided(analysis: Any, decision: Decision) -> Any:
    """``analysis`` with each statement's class as the policy judged it: the catalog may
    show that a call the analyser took for a read runs a user function that writes, and
    the read-only guard must give an allowed write its write access."""
    statements = analysis.statements
    judged = decision.statements
    if len(judged) != len(statements) or all(
            str(st.cls) == j.classification for st, j in zip(statements, judged, strict=True)):
        return analysis
    decided = tuple(st if str(st.cls) == j.classification
                    else dataclasses.replace(st, cls=StatementClass(j.classification))
                    for st, j in zip(statements, judged, strict=True))
    return _Single(decided, analysis.error, analysis.changes)


@dataclass(slots=True)
class _Single:
    """What the read-only guard plans from, for a statement whose analysis was memoised."""

    statements: tuple[Statement, ...]
    error: Any = None
    changes: Any = ()


def _error_at(body: bytes, position: int | None) -> bytes:
    """An ErrorResponse with its position field (P) set to ``position`` (None: removed)."""
    fields = [f for f in body.split(b"\0") if f]
    parts = [f for f in fields if f[:1] != b"P"]
    if position is not None:
        parts.append(b"P" + str(position).encode())
    payload = b"".join(p + b"\0" for p in parts) + b"\0"
    return b"E" + struct.pack("!i", len(payload) + 4) + payload


def _rows(tag: str, current: int | None) -> int | None:
    last = tag.rsplit(" ", 1)[-1]
    if last.isdigit() and tag.split(" ", 1)[0] in ("SELECT", "INSERT", "UPDATE", "DELETE",
                                                  "MERGE", "COPY", "FETCH", "MOVE"):
        return (current or 0) + int(last)
    return current


