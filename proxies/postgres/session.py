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
upstream.py. The session's other parts are mixins in their own modules (startup.py,
decisions.py, holding.py, enforce.py, masker.py, ordering.py; state.py declares what
they share); docs/architecture.md maps them. This module must not block the event
loop: store calls go to threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pickle
import re
import secrets
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson

from keyturn import auditschema
from keyturn.analysis import StatementClass
from keyturn.analysis.postgres import (
    DEFAULT_SEARCH_PATH,
    Analysis,
    Statement,
    analysis_cost,
    fast_shape,
    may_change_transaction,
)
from keyturn.auditspool import AuditUnwritable
from keyturn.policy import Decision
from proxies.postgres import codec, guard, settings
from proxies.postgres.auth import ScramServer
from proxies.postgres.codec import Message, ProtocolError
from proxies.postgres.decisions import Decisions
from proxies.postgres.enforce import ReadOnlyGuard
from proxies.postgres.holding import Holds, post_check_sql, with_post_check
from proxies.postgres.masker import ResultMasking
from proxies.postgres.ordering import ResponseRelay
from proxies.postgres.startup import StartupSteps
from proxies.postgres.state import (
    _AMBIGUOUS,
    _EXPECT_B_UNNAMED,
    _EXPECT_C,
    _EXPECT_S,
    _FIRST_USER_OID,
    _NAMESPACE_COMMANDS,
    _TEXT_OIDS,
    PROTOCOL,
    CommitCheck,
    Ctx,
    Expect,
    StmtInfo,
    _pkey,
    _runs_user_code,
    _Single,
)

if TYPE_CHECKING:
    from keyturn.analysis import Analyzer
    from keyturn.config import Connection
    from keyturn.identity import Identity
    from proxies.postgres.gateway import PostgresGateway
    from proxies.postgres.upstream import Upstream

log = logging.getLogger(__name__)

# The keys of a fast-path audit line after the session's prefix, in the order the
# compiled path writes them (see audit_line in _speedups.c): the time, the statement's
# text, then (after the decision fragment) a completed statement's outcome, duration and
# row count, and the intent number. Built from the schema, so C spells no field name.

MAX_BACKLOG = 64 * 1024 * 1024
#: Client messages one session handles in one turn of the event loop (tens of ms on the
#: Python path): the rest wait for the next turn, so a client pipelining thousands of
#: batches in one write cannot hold the loop from every other session.
MAX_TURN_MESSAGES = 1024
#: Bytes of waiting client messages at which the session stops reading its client (and
#: below which it reads again): what a pipelining client sends beyond stays in its socket.
BACKLOG_PAUSE, BACKLOG_RESUME = 1024 * 1024, 256 * 1024
#: The audit record's key for the parameters of a statement (detail.params), as the
#: compiled fast path writes it after a decision's fragment.
_DETAIL_PARAMS = b"," + auditschema.key("detail") + b'{"params":'
#: The facts (keyturn.analysis.postgres.FACTS) of the statements the compiled fast path
#: runs with the read-only guard's statements around their Execute.
_FAST_GUARD_FACTS: tuple[frozenset[str], ...] = (frozenset(), frozenset({"begin"}),
                                                frozenset({"end"}))
#: The Expect kinds of a guard statement's Bind, Execute and Close (see _guard_run).
_GUARD_ANSWERS = (b"B", b"E", b"C")
#: Analysis the event loop may do in one iteration, all sessions together
#: (``analysis_cost`` units: about 60 ms of ordinary SQL at most, less when nested); texts
#: beyond it go to the analysis worker, so clients sending costly statements (large, or
#: deeply nested) cannot stall the other sessions (keyturn.analysis.elsewhere.LoopBudget).
LOOP_ANALYSIS_BUDGET = 64 * 1024
#: Texts costing at most this (about 500 characters of ordinary SQL) are analysed on the
#: loop while their session spent less than SESSION_CHEAP_BUDGET in the iteration.
CHEAP_ANALYSIS = 4 * 1024
SESSION_CHEAP_BUDGET = 16 * 1024
#: Characters of SQL in the Parse messages of one batch (up to its Sync) that are
#: analysed: the batch is judged as a whole, so all their analyses are held at once (10
#: to 30 times the text for huge ones). Beyond, a Parse's text is UNKNOWN unanalysed.
MAX_BATCH_SQL = 4 * 1024 * 1024
#: Masking lineages from the analysis worker a session keeps (by text).
MAX_LINEAGES = 32
# Bytes a client may send before its session is ready (logged in, target connected).
MAX_BEFORE_READY = 1024 * 1024
# The longest Parse whose verdict the compiled fast path may reuse (its key is kept).
_MAX_PARSE_KEY = 4096


#: What a prepared-statement name may hold when the target's answer to a change of it is
#: still unknown (or the change failed after later ones were sent): never run.


# Types whose binary wire form is their UTF-8 text (jsonb adds a version byte: not here).
_LINE = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


# Types whose text form holds no free text: the detectors skip them.


# Sent to the target in place of a refused statement: it fails the transaction the
# statement was in, exactly as a real error would (the client sees our error instead).
# (The target's log shows the text, so it says what happened.)
_FAIL_SQL = "SELECT 'keyturn refused a statement; this transaction is aborted'::pg_catalog.int4"
_FAIL_TRANSACTION = codec.encode_query(_FAIL_SQL)
_FAIL_EXTENDED = codec.encode_parse("", _FAIL_SQL) + codec.encode_bind("", "") + \
    codec.encode_execute("", 0)

# Responses that carry no per-request state are shared (never mutated).

# The read-only guard's statements, prepared on the target when first needed (extended
# protocol), and the session-default Queries around commands that cannot run in a block.
_DEFAULT_RW_QUERY = codec.encode_query(guard.SQL_DEFAULT_RW)
_DEFAULT_RO_QUERY = codec.encode_query(guard.SQL_DEFAULT_RO)
_ROLLBACK_QUERY = codec.encode_query(guard.SQL_ROLLBACK)
_OWN_PREFIX = "keyturn"
#: How a hold that did not run its statement is reported (keyturn.holds).
#: Settings the target reports whose value decides how it reads query text: the value
#: must be what the analyser assumes (a function giving None when it is).
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


def _statement_text(sql: str) -> str:
    """A one-statement Query's text as the analyser cuts it out (no surrounding blanks,
    no trailing semicolon): what guard.rewrite places between the guard's statements
    (the compiled fast path strips it the same way)."""
    text = sql.strip()
    if text.endswith(";"):
        text = text[:-1].rstrip()
    return text


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


#: Statements that create or drop portals under a name the client chooses (SQL cursors
#: and protocol portals are one namespace on the server).
_PORTAL_COMMANDS = frozenset(("DECLARE CURSOR", "CLOSE"))


def _changes_portals(analysis: Any) -> bool:
    return analysis.error is not None or any(
        st.command in _PORTAL_COMMANDS for st in analysis.statements)


_COPY_WORD = re.compile(r"\bcopy\b", re.IGNORECASE)


def _may_copy_in(analysis: Any, sql: str) -> bool:
    """Whether ``sql`` may start COPY FROM STDIN on the server: it does, or the analyser
    could not read it and it names COPY (the riskiest reading)."""
    if analysis.error is not None:
        return _COPY_WORD.search(sql) is not None
    return any("copy_in" in st.facts for st in analysis.statements)


def _bind_params(b: codec.Bind, types: tuple[int, ...]) -> list[Any] | None:
    if not b.params:
        return None
    fmts = b.param_formats
    out = []
    for i, v in enumerate(b.params):
        fmt = fmts[0] if len(fmts) == 1 else (fmts[i] if i < len(fmts) else 0)
        out.append(_param_text(v, fmt, types[i] if i < len(types) else 0))
    return out


class ClientSession(StartupSteps, Decisions, Holds, ReadOnlyGuard, ResultMasking, ResponseRelay,
                    asyncio.Protocol):
    def __init__(self, gw: PostgresGateway):
        self.gw = gw
        self.reader = codec.FrontendReader(max_message_size=codec.MAX_LOGIN_MESSAGE_SIZE)
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
        # The session stopped after MAX_TURN_MESSAGES; the backlog goes on next turn.
        self.turn_yield = False
        # Why the client's socket is not read (the target reads slower than the client
        # sends: "target"; too much waits in the backlog: "backlog").
        self.read_paused: set[str] = set()
        self.held_ticket: int | None = None
        # Approved statements in the open transaction whose COMMIT must check again
        # (holding.py _arm_commit_check); None outside such a transaction.
        self.commit_check: CommitCheck | None = None
        # Analysis off the event loop (keyturn.analysis.elsewhere): characters of text
        # analysed here in this turn, Parse texts analysed elsewhere for the messages
        # in hand, and the last SQL text analysed elsewhere with the session's
        # prepared names as they were sent (pickled) and as the worker left them.
        self.turn_analysed = 0
        self.pre_parsed: dict[str, Any] = {}
        self.elsewhere: tuple[str, bytes, Any, Any] | None = None
        # What the analysis worker worked out for masking (masked connections): text ->
        # {"lineage": the lineages or why it cannot be traced, "redacted": the text
        # for the audit and the parameters to hide} (see masker.py).
        self.lineages: dict[str, Any] = {}
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
        # The same for every allowed statement (writes, BEGIN/COMMIT, and reads for when a
        # transaction is open): Python only, as
        # the read-only guard plans each (Decision, the statement as analysed).
        self.guarded_verdicts: dict[str, tuple[Decision, Statement]] = {}
        # The same for the compiled fast path: (Decision, fragment, guard.fast_plans).
        self.fast_guarded: dict[str, tuple[Any, ...]] = {}
        # Prepared statements allowed, with the read-only guard's statements to send
        # before their Execute inside a transaction, for the compiled fast path: name ->
        # (Decision, fragment, statement as JSON, statement, name, StmtInfo, plans (see
        # _guard_exec_plans), whether its audit carries the parameters (not a read)).
        self.fast_guarded_stmts: dict[bytes, tuple[Any, ...]] = {}
        # Prepared statements allowed as reads, for the compiled fast path:
        # name -> (Decision, audit fields, statement as JSON, statement, name).
        self.fast_stmts: dict[bytes, tuple[Any, ...]] = {}
        # Parses of the unnamed statement allowed as reads, for the compiled fast path:
        # the Parse body after the name -> the fast_stmts tuple and the StmtInfo.
        self.fast_parses: dict[bytes, tuple[Any, ...]] = {}
        # The same for statements the read-only guard plans (fast_guarded_stmts entries).
        self.fast_guarded_parses: dict[bytes, tuple[Any, ...]] = {}
        self.fast: Any = None  # the compiled fast path, once the session is ready
        # Every schema this session's search_path may name (it only grows: a SET may be
        # rolled back, so the gateway cannot know it was undone).
        self.schemas: frozenset[str] = frozenset(DEFAULT_SEARCH_PATH)
        self.ran_user_code = False  # see _client_message: names may resolve anywhere now
        # A digest of the SETs (and other session-class statements) sent so far: stored
        # code reads settings, so a deferred approval re-runs only under the same ones.
        self.settings_seen = ""
        # User code ran since search_path and the role were last read from the target
        # (decisions.py _probe_search_path): until they are, every statement waits for
        # the one before it to complete.
        self.probe_due = False
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
        # The target skips what it is sent up to the client's next Sync (an error in the
        # batch whose Sync is not sent yet).
        self.target_skipping = False
        self.barrier_from: Ctx | None = None  # ... that statement
        # User code ran in the current batch (extended protocol): its Sync holds what
        # follows until the target's ReadyForQuery, which reports what the code changed
        # (default_transaction_read_only): nothing more is in flight when it does.
        self.code_in_batch = False
        # User code ran in the current transaction: what it set up (a cursor's query,
        # deferred triggers, a session setting hidden by SET LOCAL) may run or show at
        # a FETCH, SET CONSTRAINTS or the transaction's end (state._runs_deferred_code),
        # which then count as user code. Cleared when the target is idle outside a
        # transaction.
        self.code_pending = False
        # In the current implicit transaction (extended protocol): a message has started
        # it / a Bind or Execute has run in it.
        self.imp_started = False
        self.imp_bound = False
        # A transaction ended in this batch: the next one starts mid-batch (see
        # _guard_before_execute).
        self.imp_ended = False
        self.upstream_ro = True  # the target's default_transaction_read_only, as reported
        # A COPY FROM STDIN was sent and neither the client's CopyDone/CopyFail nor the
        # statement's end has come: the target may be reading the client's messages as
        # COPY data (see _in_copy).
        self.copy_window: Ctx | None = None
        # Write-ahead audit: intent records are numbered 2, 4, 6... (the compiled fast
        # path uses odd numbers); ``unsent`` = intents appended since the last flush.
        self.intent_n = 0
        self.unsent = False
        self._intent_prefix: bytes | None = None
        self.closed = False
        # A statement decided here may change anything in the target's catalog
        # (catalog.Catalogs.sent, called when such a statement is sent).
        self.changes_anything = False
        self.changed_catalog = False  # it sent such a statement: see Catalogs.idle
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
                # _install_relays), which then call it without asking here first. Nor
                # while a ReadyForQuery with the status the session holds would change
                # more than that status (_on_ready: the guard, a catalog change that
                # waits for the session to be idle): the fast path relays it unseen. Nor
                # in the middle of a batch the session opened: its Sync is the session's
                # (it ends the batch's write access and implicit transaction). (It
                # checks the read-only guard's state itself: reads go as they are only
                # while it is quiet, statements it plans change it as Python would.)
                up = self.upstream
                if fast is not None and not self.expect and not self.holding and \
                        self.commit_check is None and \
                        not self.turn_yield and \
                        not self.batch_open and \
                        self.gw.audit_spool.accepting and self._guard_synced() and \
                        not (self.changed_catalog and self.tx_status == "I") and \
                        not self.skip_until_sync and not self.fail_at_sync and \
                        not self.probe_due and not self.target_skipping and \
                        not self.code_pending and \
                        self.reader.idle and not self.closed and up is not None and \
                        not up.closed and up.reader.idle and fast.client(data):
                    return
                self._client_messages(self.reader.feed(data))
                return
            self.reader.receive_data(data)
            if self.reader.pending > MAX_BEFORE_READY:
                # Before the session is ready nothing legitimate is this big (a startup
                # packet, a password message, a few pipelined queries): a client must not
                # make the gateway buffer for it before it has even logged in.
                raise codec.RemoteProtocolError("too much data before the session was ready")
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
        """The client relay's fast path raised (see _install_relays): as data_received.
        The write-ahead records it appended could not be written: nothing was sent."""
        if isinstance(exc, AuditUnwritable):
            log.error("session %s: %s", self.session_id, exc)
            self.fatal("58030", str(exc))
            return
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
        self._drop_commit_check()
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
            self.upstream.count_held()  # the client is not reading what it was sent

    def resume_writing(self) -> None:
        if self.upstream:
            self.upstream.resume_reading()
            self.upstream.count_held()  # the client read: it holds less now

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

    def abort(self, sqlstate: str, message: str) -> None:
        """End this connection at once, dropping what the client has not read yet (to
        free memory); the error goes out only if the socket takes it right away."""
        if self.closed:
            return
        self.write(codec.encode_error("FATAL", sqlstate, message))
        log.info("session %s aborted: %s %s", self.session_id, sqlstate, message)
        if self.transport:
            self.transport.abort()
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

    # ------------------------------------------------------------ client -> target

    def _take_fast(self) -> None:
        """Take over what the compiled fast path queued, if anything (before anything is
        queued here), so the session's expectation queue stays in the order the target
        answers."""
        fast = self.fast
        if fast is None or not fast.pending:
            return
        expect = self.expect
        for kind, sql, decision, t0, rows, tag, n, planned in fast.drain():
            if kind == b"G":
                # One of the read-only guard's statements the fast path sent before an
                # Execute (_guard_run): its answers not seen yet (``n`` were).
                expect.extend(Expect(k, swallow=True) for k in _GUARD_ANSWERS[n:])
            elif kind == b"B":
                expect.append(_EXPECT_B_UNNAMED)
            elif kind == b"S":
                expect.append(_EXPECT_S)
                self.syncs += 1
            elif kind == b"P":
                # A Parse of the unnamed statement not answered yet (``sql`` is its
                # StmtInfo, already in self.stmts): in doubt like one sent here.
                self.op_seq += 1
                self.stmt_op[""] = (self.op_seq, self.syncs)
                self.doubt[""] = self.doubt.get("", 0) + 1
                # ``decision`` is what the name held before that Parse (None: nothing).
                expect.append(Expect(b"P", op=self.op_seq, name="", prior=decision,
                                     mine=sql))
            elif kind == b"D":
                expect.append(Expect(b"D"))  # Describe of the unnamed portal
            else:
                ctx = Ctx(sql, decision.classification, "allow", decision.rule, decision.reason,
                          t0, portal="" if kind == b"E" else None, n=n)
                if kind == b"E" and planned is not None:
                    ctx.params = planned  # a guarded Execute's parameters, as audited
                    planned = None
                if tag is not None:
                    ctx.tags, ctx.rows = [tag.decode("utf-8", "replace")], rows
                if planned is not None and len(planned[0][6]) > 1:
                    # Sent with the read-only guard's statements (guard.fast_plans): its
                    # answers are read as _forward_query's rewritten Query would be.
                    new = guard.rewrite(sql, [_statement_text(sql)], planned[0][6])
                    expect.append(Expect(kind, ctx, ours=new.ours, rewritten=new,
                                         ci=planned[1]))
                    continue
                expect.append(Expect(kind, ctx))

    def _client_messages(self, msgs: list[Message]) -> None:
        self._take_fast()
        if not msgs:
            return
        if self.holding or self.turn_yield:
            self._to_backlog(msgs)
            return
        if len(msgs) > MAX_TURN_MESSAGES:
            # The rest next turn (after what a hold started now puts in the backlog).
            rest = msgs[MAX_TURN_MESSAGES:]
            self._client_turn(msgs[:MAX_TURN_MESSAGES])
            self._to_backlog(rest)
            self._yield_turn()
            return
        self._client_turn(msgs)

    def _yield_turn(self) -> None:
        """Go on with the backlog in the next turn of the event loop, unless a hold
        started (its end replays the backlog)."""
        if not self.holding and not self.closed and self.backlog and not self.turn_yield:
            self.turn_yield = True
            (self.gw.loop or asyncio.get_running_loop()).call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self.turn_yield = False
        if not self.holding:
            self._replay_backlog()

    def pause_client(self, reason: str) -> None:
        """Stop reading the client's socket for ``reason`` (until resume_client)."""
        if not self.read_paused and self.transport is not None:
            self.transport.pause_reading()
        self.read_paused.add(reason)

    def resume_client(self, reason: str) -> None:
        if reason not in self.read_paused:
            return
        self.read_paused.discard(reason)
        if not self.read_paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _client_turn(self, msgs: list[Message]) -> None:
        self.turn_analysed = 0
        if self._parses_elsewhere(msgs):
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
        else:
            if self.pre_parsed:
                self.pre_parsed.clear()
        if out and self.upstream:
            self._send(b"".join(out))

    # -- analysis off the event loop -------------------------------------------------

    def _parse_analysis(self, sql: str) -> Any:
        """The analysis of a Parse's text (no session state): from the texts analysed
        elsewhere for the messages in hand, else here."""
        pre = self.pre_parsed.get(sql) if self.pre_parsed else None
        return pre if pre is not None else self.analyzer.analyze(sql)

    def _parses_elsewhere(self, msgs: list[Message]) -> bool:
        """Parse texts in ``msgs`` beyond what this turn may analyse here go to the
        analysis worker, all at once; the session waits with ``msgs`` in its backlog.
        True when it does.

        A batch (messages up to a Sync) is judged as a whole before it runs, so the
        analyses of all its Parses are kept at once: Parse texts beyond MAX_BATCH_SQL
        characters in one batch are not analysed (UNKNOWN, refused unless a rule allows
        unknown statements), which bounds what one session makes the gateway hold."""
        spent = batch = 0
        texts: list[str] = []
        budget = self.gw.analysis_budget if self.gw.analysis_pool is not None else None
        for m in msgs:
            if m.type == b"S":
                batch = 0
                continue
            if m.type != b"P":
                continue
            try:
                sql = codec.decode_parse(m.body).query
            except ProtocolError:
                continue  # refused when its turn comes
            batch += len(sql)
            if sql in self.pre_parsed or self.analyzer.cached(sql) is not None:
                continue
            if batch > MAX_BATCH_SQL:
                self.pre_parsed[sql] = Analysis(sql, (), (
                    f"the batch holds more than {MAX_BATCH_SQL} characters of SQL in "
                    f"Parse messages before its Sync; keyturn analyses up to that"))
                continue
            cost = analysis_cost(sql)
            if budget is None or budget.take(cost, spent):
                spent += cost
            else:
                texts.append(sql)
        self.turn_analysed = spent
        if not texts:
            return False
        self._to_backlog(msgs)
        self.holding = True
        self._spawn(self._analyse_elsewhere(list(dict.fromkeys(texts)), None))
        return True

    def _query_analysis(self, msg: Message, sql: str) -> Any:
        """The analysis of a SQL text with the session's prepared names (a Query, or
        PREPARE sent as a Parse): here while the loop's analysis budget lasts, else None after
        sending it to the analysis worker with the session waiting at ``msg`` (put
        back at the head of the backlog: it is handled again with the result)."""
        done = self.elsewhere
        if done is not None and done[0] == sql:
            self.elsewhere = None
            text, sent, analysis, after = done
            if after is None or pickle.dumps(self.prepared) == sent:
                if after is not None:
                    self.prepared = after
                return analysis
        if self.gw.analysis_pool is not None and self.analyzer.cached(sql) is None:
            # (On a masked connection its masking lineage is traced too: twice the work.)
            cost = analysis_cost(sql) * (2 if self.masking else 1)
            if not self.gw.analysis_budget.take(cost, self.turn_analysed):
                self._to_backlog([msg])
                self.holding = True
                self._spawn(self._analyse_elsewhere([sql], pickle.dumps(self.prepared)))
                return None
            self.turn_analysed += cost
        return self.analyzer.analyze(sql, self.prepared)

    async def _analyse_elsewhere(self, texts: list[str], prepared: bytes | None) -> None:
        """Analyse ``texts`` in the worker (with the session's prepared names when
        ``prepared`` is given), then go on with the backlog."""
        pool = self.gw.analysis_pool
        assert pool is not None
        try:
            for sql in texts:
                state = pickle.loads(prepared) if prepared is not None else None
                analysis, by_text, after, traced = await pool.analyze(
                    self.user, self.analyzer.unknown_function_class.value, sql, state,
                    masked=self._sensitive_patterns() if self.masking else None)
                if self.closed:
                    return
                if by_text:
                    self.analyzer.adopt(sql, analysis, by_text)
                if traced is not None:
                    if len(self.lineages) >= MAX_LINEAGES:
                        self.lineages.clear()
                    self.lineages[sql] = traced
                if prepared is None:
                    self.pre_parsed[sql] = analysis
                else:
                    self.elsewhere = (sql, prepared, analysis, after)
        except Exception:
            log.exception("session %s: analysis elsewhere failed", self.session_id)
            for sql in texts:  # fail closed: what could not be analysed is UNKNOWN
                failed = Analysis(sql, (), "analysis failed in the gateway")
                if prepared is None:
                    self.pre_parsed[sql] = failed
                else:
                    self.elsewhere = (sql, prepared, failed, None)
        finally:
            self.holding = False
        self._replay_backlog()

    def _send(self, data: bytes) -> None:
        """Write to the target; intent records appended for what it carries reach the
        spool file first (a write to the OS), so a statement that reached the target
        has a record even if this process is killed right after."""
        if self.unsent:
            self.unsent = False
            try:
                self.gw.audit_spool.flush_ahead()
            except AuditUnwritable as exc:
                # Their records are not on disk: none of it goes to the target.
                log.error("session %s: %s", self.session_id, exc)
                self.fatal("58030", str(exc))
                return
        assert self.upstream is not None
        self.upstream.write(data)

    def _to_backlog(self, msgs: list[Message]) -> None:
        for m in msgs:
            self.backlog.append(m)
            self.backlog_bytes += len(m.raw)
        if self.backlog_bytes > BACKLOG_PAUSE:
            self.pause_client("backlog")
            if self.backlog_bytes > MAX_BACKLOG:
                self.fatal("54000", "keyturn: too much data sent while a statement is held")

    def _client_message(self, msg: Message, out: list[bytes]) -> bool:
        """Handle one message; False when it started a hold."""
        t = msg.type
        if self.copy_window is not None:
            self._in_copy(t)
        if self.skip_until_sync and t != b"S":
            return True
        if t == b"Q":
            if self.target_skipping:
                self._skipped_query(msg)
                return True
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
            target = self._bind_target(skey)
            if target is None or target is _AMBIGUOUS:
                # The server plans what the name holds at Bind (and runs immutable code
                # then): a statement the gateway cannot tell (prepared by SQL PREPARE,
                # or changed with an unknown outcome) is refused before its Bind.
                what = "cannot tell which definition the server holds for" \
                    if target is _AMBIGUOUS else "did not see the Parse of"
                ctx = Ctx(f"<prepared statement {skey!r}>", "unknown", "block",
                          "builtin:unknown-statement",
                          f"keyturn {what} this prepared statement; it cannot be analysed "
                          "(prepare it with a protocol Parse)", time.time())
                self._blocked(ctx, b"E", out)
                return True
            if target is not _AMBIGUOUS and \
                    target.analysis is not None and target.analysis.statements and \
                    target.analysis.error is None and \
                    self._refuse_parse(target.sql, target.analysis, out):
                # The server plans again at Bind (folding immutable functions): a
                # statement that runs user code and is no longer allowed stops here.
                return True
            binding = self.portals[pkey] = (skey, body)
            self.bound[pkey] = (body, target)
            if pkey and self.masking:
                self.mask_cursors.pop(pkey, None)  # SQL cursors are portals too
            if not self.batch_rw and not self.txs.block and target is not None \
                    and target is not _AMBIGUOUS and self._grant_classes(target.analysis)[0]:
                # A write bound in a later read than the batch's start: what else the
                # batch holds is not known, so its reads are guarded (explicit).
                self._grant_batch(out, explicit=True)
            self.imp_started = self.imp_bound = True
            # Until its BindComplete the binding is a hope: a Bind the target refuses or
            # skips leaves whatever the name held there (a cursor, an older portal).
            self.expect.append(Expect(b"B", portal=pkey, binding=binding))
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
            analysis = self._parse_analysis(p.query)
            if p.param_types and max(p.param_types) >= _FIRST_USER_OID:
                analysis = self._typed_parameters(analysis, p.param_types)
            self._note_search_path(analysis.statements)
            if analysis.statements and analysis.error is None and \
                    self._refuse_parse(p.query, analysis, out):
                return True
            if _may_copy_in(analysis, p.query):
                self._refuse_copy(p.query, b"E", out)
                return True
            if p.name and self.masking:
                self.mask_prepared.pop(_pkey(p.name), None)  # one namespace with PREPARE
            info = StmtInfo(p.query, analysis, p.param_types, names=any(
                st.command in _NAMESPACE_COMMANDS for st in analysis.statements))
            if not p.name and msg.body[:1] == b"\0" and len(msg.body) <= _MAX_PARSE_KEY:
                info.parse_key = msg.body[1:]  # as sent (not a rewritten SHOW)
            self.imp_started = True
            self.expect.append(self._namespace_op(_pkey(p.name), b"P", info))
            out.append(msg.raw)
            return True
        if t == b"S":
            self.skip_until_sync = self.target_skipping = False
            self.syncs += 1
            explicit = self.batch_explicit
            self.batch_open = self.batch_rw = self.imp_started = self.imp_bound = False
            self.imp_ended = False
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
            release, self.code_in_batch = self.code_in_batch, False
            if not explicit:
                self.expect.append(Expect(b"S", release=True) if release else _EXPECT_S)
                out.append(msg.raw)
            else:
                end = self._end_batch(out)
                end.release = release
                self.expect.append(end)
                out.append(msg.raw)
                self.expect.append(Expect(b"Q", hide=True))
                out.append(_ROLLBACK_QUERY)
            if release:
                # (Code may also run at the batch's end: deferred triggers. Read the
                # path again once it ended.)
                self.holding = True
                self.barrier_from = None
                self.probe_due = True
                return False
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

    def _skipped_query(self, msg: Message) -> None:
        """A simple Query while the target skips to the Sync after an error in the
        extended protocol: the server ignores it (no answer at all), so the gateway does
        not send it, expects nothing for it and records that it did not run. (Queued, it
        would have taken the Sync's ReadyForQuery, and every later answer the request's
        before it.)"""
        sql = codec.decode_query(msg.body)
        ctx = Ctx(sql, "unknown", "block", "builtin:skipped",
                  "sent after an error in the batch and before its Sync: the server ignores "
                  "a Query then, so it was not sent", time.time())
        self._audit(ctx, outcome="skipped")

    def _bind_failed(self, entry: Expect) -> None:
        """A Bind the target refused or skipped: what the name holds there is not what
        the gateway recorded (if it still holds this Bind's binding, a later Bind did
        not replace it), so the name is forgotten: its Execute is refused until a Bind
        of it completes."""
        name = entry.portal
        assert name is not None
        if entry.binding is None or self.portals.get(name) is entry.binding:
            self.portals.pop(name, None)
            self.bound.pop(name, None)

    def _forget_portals(self, keep: str | None = None) -> None:
        """What the client's protocol portals hold may have changed on the server (user
        code may close a portal and open another under its name, a SQL DECLARE or CLOSE
        uses the same names): an Execute of one of them is refused from now on (an
        unknown portal) until it is bound again. ``keep``: the portal being executed
        (the server does not let it be dropped while it runs)."""
        for names in (self.portals, self.bound):
            for name in [n for n in names if n != keep]:
                del names[name]

    def _in_copy(self, t: bytes) -> None:
        """A client message while a COPY FROM STDIN may be reading the client's messages
        on the target. There the server takes CopyData, CopyDone and CopyFail, ignores
        Flush and Sync (a Sync it ignores answers nothing, so the answers after it would
        be read as the wrong requests' answers) and fails on anything else. Whether it
        reads them so depends on whether the COPY started, which the gateway learns
        only later: anything but COPY messages and Flush ends the session here."""
        if t == b"c" or t == b"f":
            self.copy_window = None
        elif t != b"d" and t != b"H":
            what = "Sync" if t == b"S" else f"a message of type {t.decode('latin-1')!r}"
            raise codec.RemoteProtocolError(
                f"keyturn: {what} was sent during COPY FROM STDIN; only CopyData, CopyDone, "
                "CopyFail and Flush may follow it until CopyDone or CopyFail")

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
            if hit is not None and self.gw.audit_spool.accepting and self._guard_quiet() \
                    and not self.probe_due and not self.code_pending:
                known = hit[0]
                ctx = Ctx(sql, known.classification, "allow", known.rule, known.reason,
                          time.time())
                self.expect.append(Expect(b"Q", ctx))
                self._intent(ctx)
                out.append(msg.raw)
                return True
            guarded = self.guarded_verdicts.get(fast)
            if guarded is not None and self.gw.audit_spool.accepting and \
                    not self.probe_due and not self.code_pending:
                # The same for an allowed write or transaction statement: no analysis or
                # policy, but the read-only guard plans it (it depends on the state).
                known, st = guarded
                text = _statement_text(sql)
                ctx = Ctx(sql, known.classification, "allow", known.rule, known.reason,
                          time.time())
                ctx.analysis = _Single((st,), texts=(text,))
                return self._forward_query(msg, ctx, out)
        analysis = self._query_analysis(msg, sql)
        if analysis is None:
            return False  # analysed elsewhere first: this message comes back then
        statements = analysis.statements
        self._note_search_path(statements)
        if len(statements) == 1 and analysis.error is None:
            # Hot path: one statement whose verdict this session has seen before
            # (the verdict depends on everything in the key, never on the text).
            st = statements[0]
            decision = self._verdict(analysis)
            if (decision.action == "allow" and fast is not None and not self.masking
                    and len(self.fast_verdicts) < 4096 and self.analyzer.known_shape(fast)
                    and not _runs_user_code(analysis, decision)
                    and "copy_in" not in st.facts and st.command not in _PORTAL_COMMANDS):
                if decision.classification == "read" and not st.facts:
                    self.fast_verdicts[fast] = (decision, _fragment(decision))
                if len(self.guarded_verdicts) < 4096:
                    # (A read too: inside a read-write transaction the guard plans it.)
                    judged = _as_decided(analysis, decision).statements[0]
                    self.guarded_verdicts[fast] = (decision, judged)
                    if self.fast is not None and len(self.fast_guarded) < 4096:
                        self.fast_guarded[fast] = (decision, _fragment(decision),
                                                   guard.fast_plans(judged))
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
                    st.facts or st.command in _PORTAL_COMMANDS
                    for st in info.analysis.statements) \
                and self._bind_target(stmt_name) is info:
            # Bind/Execute/Sync of this statement can now take the compiled fast path.
            key = stmt_name.encode()
            entry = self.fast_stmts.get(key)
            if entry is None and len(self.fast_stmts) < 4096:
                entry = self.fast_stmts[key] = (d, _fragment(d), orjson.dumps(info.sql),
                                                info.sql, stmt_name, info)
            if entry is not None and info.parse_key is not None and \
                    info.parse_key not in self.fast_parses and len(self.fast_parses) < 1024 \
                    and all(st.search_path is None for st in info.analysis.statements):
                # ... and so can a Parse of the same text into the unnamed statement.
                self.fast_parses[info.parse_key] = entry
        if self.fast is not None and d.action == "allow" and stmt_name is not None \
                and not info.names and len(self.fast_guarded_stmts) < 4096 \
                and len(info.analysis.statements) == 1 \
                and info.analysis.statements[0].facts in _FAST_GUARD_FACTS \
                and info.analysis.statements[0].command not in _PORTAL_COMMANDS \
                and not _runs_user_code(info.analysis, d) \
                and not info.analysis.statements[0].literal_dependent \
                and self._bind_target(stmt_name) is info:
            # ... and with the read-only guard's statements around it (a write or a read
            # inside a read-write transaction, a plain BEGIN, COMMIT or ROLLBACK).
            key = stmt_name.encode()
            guarded = self.fast_guarded_stmts.get(key)
            if guarded is None:
                classes = [str(st.cls) for st in
                           _as_decided(info.analysis, d).statements]
                guarded = self.fast_guarded_stmts[key] = (
                    d, _fragment(d), orjson.dumps(info.sql), info.sql, stmt_name, info,
                    self._guard_exec_plans(classes, info.analysis.statements[0].facts),
                    d.classification != "read", _DETAIL_PARAMS)
            if not stmt_name and info.parse_key is not None \
                    and info.parse_key not in self.fast_guarded_parses \
                    and len(self.fast_guarded_parses) < 1024 \
                    and info.analysis.statements[0].search_path is None:
                # ... and so can a Parse of the same text into the unnamed statement.
                self.fast_guarded_parses[info.parse_key] = guarded
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
            again = self._query_analysis(msg, info.sql)
            if again is None:
                return False  # analysed elsewhere first: this Execute comes back then
            changes = again.changes
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
            user_code = self._code_runs(analysis, decision)
            if (not ctx.defines and not user_code and not self.probe_due) or \
                    self.target_skipping:
                # (A target skipping to the Sync after an error runs nothing of it: no
                # answer comes to wait for.)
                return self._forward(msg, ctx, kind, out)
            # User-defined code may turn standard_conforming_strings off or change the
            # encoding, and the target would read messages already sent behind it with
            # those settings (the gateway hears of the change only afterwards). So what
            # follows waits until it completed (and a changed setting ended the session).
            # The same on a masked connection for a DECLARE or PREPARE: a FETCH or EXECUTE
            # right behind it must be masked as what the name holds once it completed.
            # And while search_path is to be read back after user code (probe_due): what
            # follows is judged once it was.
            ctx.barrier = True
            if user_code:
                self._user_code_runs(ctx.portal)
                if kind == b"E":
                    self.code_in_batch = True
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

    def _refused_here(self, ctx: Ctx, kind: bytes, out: list[bytes]) -> None:
        """Refused for where it stands in its transaction (25000, ctx.reason), audited."""
        self._refuse(codec.encode_error("ERROR", "25000", f"keyturn: {ctx.reason}"), kind, out)
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
        if ctx.analysis is not None and _changes_portals(ctx.analysis):
            self._forget_portals(ctx.portal)
        if self.changes_anything or self.changed_catalog:
            # A statement that may change anything in the catalog (or what ends its
            # transaction, making the change visible to others) is about to be sent.
            self.changes_anything = False
            analysis = ctx.analysis
            ends = not self.txs.block or (analysis is not None and any(
                "end" in st.facts for st in getattr(analysis, "statements", ())))
            self.gw.catalogs.sent(self, ends=ends)

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

    def _forward(self, msg: Message, ctx: Ctx, kind: bytes, out: list[bytes]) -> bool:
        """Send a Query or Execute on; False when the Execute waits (see below)."""
        if kind == b"Q":
            return self._forward_query(msg, ctx, out)
        analysis = ctx.analysis
        if analysis is not None and analysis.error is not None and \
                may_change_transaction(ctx.statement, single=True):
            # One statement the analyser could not read, which may commit and go on in a
            # new transaction (DO, CALL) that no plan can keep read-only.
            ctx.action = "block"
            ctx.reason = ("keyturn cannot analyse this statement and it may end its "
                          "transaction and go on in another (DO, CALL), which keyturn cannot "
                          "keep read-only")
            self._refused_here(ctx, b"E", out)
            return True
        if ctx.post_key is not None and (analysis is None or any(
                guard.outside_block(st) for st in analysis.statements)):
            ctx.post_key = None  # VACUUM, CALL...: they commit on their own
        if self._commit_at(ctx, analysis) != -1:
            if ctx.action != "block":
                ctx.action, ctx.rule = "block", "builtin:commit-check"
                ctx.reason = ("keyturn checks the COMMIT of a transaction that ran an "
                              "approved statement: send COMMIT as a simple Query")
            elif ctx.reason and not ctx.reason.endswith("simple Query"):
                ctx.reason += " (send COMMIT as a simple Query)"
            self._refused_here(ctx, b"E", out)
            return True
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
                ctx.post_key = None  # (sent later, on its own: not checked after it ran)
                self.expect.append(Expect(b"D", plan_for=ctx, then=msg))
                self.holding = True
                return False
            self.expect.append(Expect(b"D", plan_for=ctx))
        self.expect.append(Expect(kind, ctx))
        self._intent(ctx)
        out.append(msg.raw)
        if ctx.post_key is not None:
            self._post_check_execute(ctx, ctx.post_key, ctx.post_pid, out)
        if ctx.barrier:
            # Code that runs here may DEALLOCATE and PREPARE the gateway's own statement
            # names (through EXECUTE in a function): prepared again before their next use.
            self.guard_stmts.clear()
        self._guard_after_execute(ctx, out)
        return True

    def _commit_at(self, ctx: Ctx, analysis: Any) -> int:
        """Where a Query commits a transaction whose COMMIT owes a check (the index of
        its first COMMIT, END or PREPARE TRANSACTION), -1 when it does not, -2 when it
        is refused (ctx says why): SET CONSTRAINTS would run the approved statements'
        deferred triggers outside the check, and a Query the analyser could not read may
        commit."""
        cc = self.commit_check
        if cc is None or analysis is None:
            return -1
        if self.tx_status == "E" and not self.expect and analysis.error is None and \
                analysis.statements and all(st.command in ("COMMIT", "ROLLBACK")
                                            for st in analysis.statements[:1]):
            return -1  # an aborted transaction: a COMMIT first only rolls it back
        if cc.spent and analysis.error is None and not any(
                st.command in ("COMMIT", "PREPARE TRANSACTION", "SET CONSTRAINTS")
                for st in analysis.statements):
            return -1
        if cc.spent:
            ctx.reason = ("this transaction's COMMIT check already ran (it failed, or its "
                          "COMMIT did not run) and the transaction ran approved statements: "
                          "roll it back")
        elif analysis.error is not None:
            if not may_change_transaction(ctx.statement):
                return -1
            ctx.reason = ("keyturn cannot analyse this statement and it may commit a "
                          "transaction that ran an approved statement, whose COMMIT the "
                          "gateway checks")
        else:
            for i, st in enumerate(analysis.statements):
                if st.command in ("COMMIT", "PREPARE TRANSACTION"):
                    return i
                if st.command == "SET CONSTRAINTS":
                    ctx.reason = ("SET CONSTRAINTS in a transaction that ran an approved "
                                  "statement would run its deferred triggers where the "
                                  "gateway cannot check them; COMMIT runs them, checked")
                    break
            else:
                return -1
        ctx.action, ctx.rule = "block", "builtin:commit-check"
        return -2

    def _post_check_execute(self, ctx: Ctx, key: int, pid: int, out: list[bytes]) -> None:
        """The gateway's check right behind an approved Execute, in its transaction (before
        the client's Sync): statement and portal of their own, closed again."""
        name = f"keyturn_post_{key}"
        out += [codec.encode_parse(name, post_check_sql(key, pid)),
                codec.encode_bind(name, name),
                codec.encode_close("S", name), codec.encode_execute(name, 0),
                codec.encode_close("P", name)]
        self.expect.extend([Expect(b"P", swallow=True), Expect(b"B", swallow=True),
                            Expect(b"C", swallow=True), Expect(b"E", swallow=True, post=ctx),
                            Expect(b"C", swallow=True)])

    def _refuse_copy(self, sql: str, kind: bytes, out: list[bytes]) -> None:
        """COPY FROM STDIN other than alone in a simple Query: refused before it is sent
        (the target would read the messages sent behind it, the gateway's own too, as
        COPY data, and ignore the Syncs among them)."""
        reason = ("COPY FROM STDIN is accepted only as a simple Query of its own, as psql, "
                  "libpq's PQexec, psycopg, asyncpg, pgx and JDBC's CopyManager send it" +
                  (" (not through Parse/Bind/Execute)" if kind == b"E" else
                   " (not with other statements in the same Query)"))
        self._refuse(codec.encode_error("ERROR", "0A000", f"keyturn: {reason}"), kind, out)
        ctx = Ctx(sql, "write", "block", "builtin:copy-in-batch", reason, time.time())
        self._audit(ctx, outcome="blocked")

    def _forward_query(self, msg: Message, ctx: Ctx, out: list[bytes]) -> bool:
        analysis = ctx.analysis
        if analysis is not None and _may_copy_in(analysis, ctx.statement):
            if len(analysis.statements) > 1:
                self._refuse_copy(ctx.statement, b"Q", out)
                return True
            # Until the client's CopyDone/CopyFail or the statement's end (_finished).
            self.copy_window = ctx
        try:
            if analysis is None or (not analysis.statements and analysis.error is None):
                plan = None  # nothing to run (an empty query)
            elif analysis.error is not None:
                plan = guard.plan_unparsed(self.txs, may_change_transaction(ctx.statement))
            else:
                plan = guard.plan_query(analysis.statements, self.txs)
        except guard.Refused as exc:
            ctx.action, ctx.reason = "block", str(exc)
            self._refused_here(ctx, b"Q", out)
            return True
        if ctx.post_key is not None and plan is not None and plan.toggle and \
                ctx.post_in_block:
            # An approved command that would run outside a block and runs user code:
            # in an implicit transaction with write access, checked before it commits.
            plan = guard.Plan([guard.SQL_RW_LOCAL, 0], self.txs.copy())
        if ctx.post_key is not None and (plan is None or plan.toggle):
            ctx.post_key = None  # nothing to check, or a command outside any transaction
        at_commit = self._commit_at(ctx, analysis)
        if at_commit == -2:
            self._refused_here(ctx, b"Q", out)
            return True
        if plan is not None and (plan.changed or plan.toggle) and self.imp_started \
                and not self.imp_bound and not self.txs.block and not self.target_skipping:
            # Parse/Describe without a Sync (asyncpg prepares so) began an implicit
            # transaction, and took a snapshot: the guard's statements must come first
            # in theirs, so a Sync of the gateway's own ends it (nothing ran in it).
            out.append(codec.encode_sync())
            self.expect.append(Expect(b"S", hide=True))
            self.imp_started = False
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
        if not plan.changed and ctx.post_key is None and at_commit < 0:
            self.expect.append(Expect(b"Q", ctx))
            out.append(msg.raw)
            return True
        texts = [ctx.statement] if analysis.error is not None else \
            getattr(analysis, "texts", None) or [st.text for st in analysis.statements]
        parts: list[int | str] = list(plan.parts) if plan.changed else \
            list(range(len(texts)))
        if ctx.post_key is not None:
            # An approved Query: it ends waiting for the gateway's check (holding.py).
            parts = with_post_check(
                parts, analysis.statements, ctx.post_key, ctx.post_pid,
                immediate=not plan.state.block)
            # Left its transaction open: the COMMIT is checked too (_arm_commit_check).
            ctx.commit_armed = plan.state.block and (
                ctx.commit_lock is not None or self.commit_check is not None)
        cc = self.commit_check
        if at_commit >= 0 and cc is not None:
            # The COMMIT of a transaction that ran approved statements: their deferred
            # triggers fire first, then the gateway compares the code again.
            # (The guard's plan keeps every client statement; if not, ValueError ends the
            # session, which rolls the transaction back: fails closed.)
            i = parts.index(at_commit)
            parts[i:i] = ["SET CONSTRAINTS ALL IMMEDIATE",
                          post_check_sql(cc.key, cc.pid, last=True)]
            # The check below owns its lock now. Owed until the transaction ends ('I'):
            # a COMMIT that did not end it (its check failed, an error skipped it, then
            # ROLLBACK TO SAVEPOINT revived it; or AND CHAIN) cannot commit again.
            cc.spent = True
            self._spawn(self._post_check(ctx, cc.lock, cc.key,
                                         [(want, tables) for _, want, tables in cc.checks],
                                         at_commit=True))
        new = guard.rewrite(ctx.statement, texts, parts)
        self.expect.append(Expect(b"Q", ctx, ours=new.ours, rewritten=new,
                                  as_idle=plan.explicit))
        out.append(codec.encode_query(new.sql))
        if plan.explicit:
            # After an error the target skipped the gateway's COMMIT: end the transaction
            # (after a COMMIT, the ROLLBACK only warns, which nobody sees).
            self.expect.append(Expect(b"Q", hide=True))
            out.append(_ROLLBACK_QUERY)
        return True

    def _replay_backlog(self) -> None:
        """A wait ended: handle the client messages that arrived meanwhile, in order
        (MAX_TURN_MESSAGES of them in this turn, the rest in the next ones)."""
        if self.closed or not self.backlog or self.turn_yield:
            return
        backlog = self.backlog
        if len(backlog) <= MAX_TURN_MESSAGES:
            pending = list(backlog)
            backlog.clear()
            self.backlog_bytes = 0
            self.resume_client("backlog")
            self._client_messages(pending)
            return
        pending = [backlog.popleft() for _ in range(MAX_TURN_MESSAGES)]
        rest_bytes = self.backlog_bytes - sum(len(m.raw) for m in pending)
        # What a hold starting now puts back goes before the rest.
        self.backlog, self.backlog_bytes = deque(), 0
        self._client_messages(pending)
        self.backlog.extend(backlog)
        self.backlog_bytes += rest_bytes
        if self.backlog_bytes < BACKLOG_RESUME:
            self.resume_client("backlog")
        self._yield_turn()

    # ------------------------------------------------------------ target -> client

    def _finished(self, ctx: Ctx) -> None:
        ctx.post_done = True
        if self.copy_window is ctx:
            self.copy_window = None  # it failed before it read any COPY data
        if ctx.barrier:
            self.barrier_done = True  # released once this answer reached the client
            self.barrier_from = ctx
        outcome = "error" if ctx.error else "ok"
        if ctx.defines:
            self._defined(ctx, not ctx.error)
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


