"""What a PostgreSQL client session tracks per request and per expected answer
(``Ctx``, ``Expect``, ``StmtInfo``) and small helpers shared by the session's parts.

Plain data and pure functions: it must not do I/O or decide anything."""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keyturn import auditschema
from keyturn.analysis.postgres import (
    Statement,
)
from keyturn.policy import Decision
from proxies.postgres.codec import Message

if TYPE_CHECKING:
    pass

if TYPE_CHECKING:
    import asyncio
    from collections import deque

    from keyturn.analysis import Analyzer
    from keyturn.analysis.postgres import Statement
    from keyturn.config import Connection
    from keyturn.identity import Identity
    from keyturn.policy import Decision
    from proxies.postgres import codec, guard
    from proxies.postgres.auth import ScramServer
    from proxies.postgres.codec import Message
    from proxies.postgres.gateway import PostgresGateway
    from proxies.postgres.upstream import Upstream

log = logging.getLogger(__name__)


PROTOCOL = "postgres"  # the audit records' protocol


FAST_AUDIT_LAYOUT = (
    auditschema.key("at"),
    b"," + auditschema.key("statement"),
    b"," + auditschema.fragment(outcome="ok") + b"," + auditschema.key("duration_ms"),
    b"," + auditschema.key("rows"),
    b"," + auditschema.key("n"),
)


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
    # Masked connections: SQL cursors and prepared statements it creates, kept once it
    # completed without error (masker.py _follow / _defined).
    defines: Any = None
    # An approved statement checked after it ran (holding.py _post_check): the advisory
    # lock its Query waits for at its end, and the refusal the client gets instead of the
    # cancelled wait when the code it ran had changed.
    post_key: int | None = None
    post_pid: int = 0  # the backend of the gateway's connection holding that lock
    post_in_block: bool = False  # it runs user code: checked inside a block, always
    post_refused: str | None = None
    post_done: bool = False  # its answer completed (the check ran or was skipped)
    # Approved inside a client transaction (holding.py _arm_commit_check): the check the
    # transaction's COMMIT waits for (its deferred triggers run then): a second
    # connection of the gateway's holding ``commit_key`` (backend ``commit_pid``), and
    # whether the Query left the transaction open (session._forward_query).
    commit_lock: Any = None
    commit_key: int | None = None
    commit_pid: int = 0
    commit_armed: bool = False
    n: int = 0  # the number of its intent record (written before it was sent), 0: none


@dataclass(slots=True)
class CommitCheck:
    """What an open client transaction that ran approved statements owes its COMMIT
    (holding.py _arm_commit_check): the deferred triggers they queued run at COMMIT, so
    the gateway makes them fire first (SET CONSTRAINTS ALL IMMEDIATE) and compares the
    target's code again before the COMMIT goes on. ``lock``: the gateway's connection
    holding ``key`` (backend ``pid``); ``checks``: per approved statement, its request,
    the code digest its approvers were shown and the tables it names; ``spent``: a
    COMMIT carrying the check was sent (the check's task owns ``lock`` now), so another
    COMMIT in the same transaction (that one failed or was skipped, and ROLLBACK TO
    SAVEPOINT revived the transaction) is refused until it ends."""

    lock: Any
    key: int
    pid: int
    checks: list[tuple[Ctx, str, list[str]]]
    spent: bool = False


@dataclass(slots=True)
class Probe:
    """The answer to the gateway's read of search_path and current_user: the DataRow
    bytes seen (hidden from the client) and whether it failed."""

    rows: list[bytes] = field(default_factory=list)
    failed: bool = False


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
    # The gateway's own read of search_path and the role after user code ran
    # (decisions.py _probe_search_path): its rows, hidden from the client.
    probe: Probe | None = None
    # The Execute of the gateway's check after an approved Execute (holding.py
    # _post_check): its answer (or its skipping) completes that statement's request.
    post: Ctx | None = None
    # A Sync after user code ran in its batch: the client's next messages wait for its
    # ReadyForQuery (and the settings the target reports with it).
    release: bool = False
    # A Bind: the portal it binds and the binding it recorded (session.portals), undone
    # when the target refuses or skips it (None: the compiled fast path's, unnamed).
    portal: str | None = None
    binding: Any = None


@dataclass(slots=True)
class StmtInfo:
    sql: str
    analysis: Any
    param_types: tuple[int, ...] = ()
    decision: Decision | None = None
    names: bool = False  # PREPARE / DEALLOCATE / DISCARD: it changes the SQL namespace
    # A Parse of the unnamed statement: its body after the name (text and parameter
    # types), the key of the compiled fast path's memo once it was allowed as a read.
    parse_key: bytes | None = None


_AMBIGUOUS = StmtInfo("", None)


_NAMESPACE_COMMANDS = frozenset(("PREPARE", "DEALLOCATE", "DISCARD"))


def _pkey(name: str) -> str:
    """A protocol-level statement or portal name as the server keys it: its first 63
    bytes (a byte cut, not a character one: the server copies names with strlcpy)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= 63:
        return name
    return raw[:63].decode("utf-8", "surrogateescape")


def _splice(out: list[bytes] | None, chunk: bytes, seg: int, start: int, end: int,
            new: bytes) -> tuple[list[bytes], int]:
    """Replace chunk[start:end] by ``new`` in the output being built from ``chunk``."""
    if out is None:
        out = []
    out.append(chunk[seg:start])
    out.append(new)
    return out, end


_EXPECT_S, _EXPECT_C = Expect(b"S"), Expect(b"C")
_EXPECT_B_UNNAMED = Expect(b"B", portal="")  # a Bind of the unnamed portal (fast path)


_FIRST_USER_OID = 16384  # OIDs below are the server's own objects


_TEXT_OIDS = {25, 1043, 1042, 19, 114, 3802}


#: Statements that run code an earlier statement of the transaction set up: a cursor's
#: query (FETCH, MOVE; a WITH HOLD cursor's rest at COMMIT), deferred triggers (COMMIT,
#: SET CONSTRAINTS ... IMMEDIATE, PREPARE TRANSACTION), and the end of a transaction or
#: savepoint, which brings back a session setting a SET LOCAL had hidden.
_DEFERRED_CODE_COMMANDS = frozenset(("FETCH", "MOVE", "SET CONSTRAINTS"))
_DEFERRED_CODE_FACTS = frozenset(("end", "sp_destroy"))


def _runs_deferred_code(statements: Any) -> bool:
    """Whether one of ``statements`` may run (or reveal what was changed by) user code an
    earlier statement of the transaction set up (``code_pending``)."""
    return any(st.command in _DEFERRED_CODE_COMMANDS or st.facts & _DEFERRED_CODE_FACTS
               for st in statements)


def _runs_user_code(analysis: Any, decision: Decision) -> bool:
    """Whether the target's catalog showed user-defined code in a statement: code the
    gateway cannot see into (whatever class ``unknown_functions`` gives it), or a class
    the catalog raised (a type's checks, a view)."""
    judged = decision.statements
    return decision.opaque_code or any(st.opaque for st in analysis.statements) or len(
        judged) != len(analysis.statements) or any(
            str(st.cls) != j.classification
            for st, j in zip(analysis.statements, judged, strict=False))


@dataclass(slots=True)
class _Single:
    """What the read-only guard plans from, for a statement whose analysis was memoised."""

    statements: tuple[Statement, ...]
    error: Any = None
    changes: Any = ()
    # The statements' texts as this message has them (the memo's statement keeps the
    # text it was first analysed with: other constants).
    texts: tuple[str, ...] | None = None


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


class SessionState:
    """Everything a client session tracks, declared once for all its parts (the
    mixins in startup, decisions, holding, enforce, masker and ordering run on it).
    ``ClientSession.__init__`` gives the values, with comments on what each means."""

    gw: PostgresGateway
    reader: codec.FrontendReader
    phase: str
    transport: asyncio.Transport | None
    upstream: Upstream | None
    tls_active: bool
    client_addr: str
    session_id: str
    key: tuple[int, int] | None
    user: str
    identity: Identity | None
    conn: Connection | None
    startup_params: dict[str, str]
    application: str
    scram: ScramServer | None
    analyzer: Analyzer
    sasl_started: bool
    cleartext: bool
    expect: deque[Expect]
    backlog: deque[Message]
    backlog_bytes: int
    turn_yield: bool
    holding: bool
    held_ticket: int | None
    commit_check: CommitCheck | None
    turn_analysed: int
    pre_parsed: dict[str, Any]
    elsewhere: tuple[str, bytes, Any, Any] | None
    lineages: dict[str, Any]
    skip_until_sync: bool
    fail_at_sync: bool
    stmts: dict[str, StmtInfo]
    syncs: int
    op_seq: int
    stmt_op: dict[str, tuple[int, int]]
    doubt: dict[str, int]
    bound: dict[str, tuple[bytes, StmtInfo | None]]
    verdicts: dict[tuple[Any, ...], Decision]
    fast_verdicts: dict[str, tuple[Decision, bytes]]
    guarded_verdicts: dict[str, tuple[Decision, Statement]]
    fast_guarded: dict[str, tuple[Any, ...]]
    fast_guarded_stmts: dict[bytes, tuple[Any, ...]]
    fast_stmts: dict[bytes, tuple[Any, ...]]
    fast_parses: dict[bytes, tuple[Any, ...]]
    fast_guarded_parses: dict[bytes, tuple[Any, ...]]
    fast: Any
    schemas: frozenset[str]
    masking: bool
    catalog: Any
    detectors: Any
    _mask_ops: dict[str, Any]
    _sensitive_name: Any
    _audit_prefix: bytes | None
    _catalog_refreshing: bool
    mask_prepared: dict[str, Any]
    mask_cursors: dict[str, Any]
    portals: dict[str, tuple[str, bytes]]
    prepared: Any
    tx_status: str
    txs: guard.TxState
    guard_stmts: set[str]
    batch_open: bool
    batch_rw: bool
    batch_explicit: bool
    barrier_done: bool
    code_in_batch: bool
    code_pending: bool
    target_skipping: bool
    copy_window: Ctx | None
    barrier_from: Ctx | None
    probe_due: bool
    imp_started: bool
    imp_bound: bool
    imp_ended: bool
    ran_user_code: bool
    settings_seen: str
    upstream_ro: bool
    intent_n: int
    unsent: bool
    _intent_prefix: bytes | None
    closed: bool
    changes_anything: bool
    changed_catalog: bool
    terminating: bool
    connected_at: float
    client_ip: str

    if TYPE_CHECKING:
        # What the parts call across modules (the implementations are in the mixins
        # and session.py; mypy checks they match).
        def _audit(self, ctx: Ctx, *, outcome: str) -> None: ...
        def _audit_mask_refusal(self, ctx: Ctx, error: bytes) -> None: ...
        def _audit_prefix_bytes(self) -> bytes: ...
        def _blocked(self, ctx: Ctx, kind: bytes, out: list[bytes]) -> None: ...
        def _decide(self, analysis: Any) -> Decision: ...
        def _finished(self, ctx: Ctx) -> None: ...
        def _forward(self, msg: Message, ctx: Ctx, kind: bytes, out: list[bytes]) -> bool: ...
        def _guard_after_execute(self, ctx: Ctx, out: list[bytes]) -> None: ...
        def _guard_lost(self) -> None: ...
        def _guard_sync(self) -> None: ...
        def _inject(self, data: bytes, *, rfq: bool = False) -> None: ...
        def _intent(self, ctx: Ctx) -> None: ...
        def _intent_prefix_bytes(self) -> bytes: ...
        def _mask_message(self, head: Expect, t: bytes, chunk: bytes,
                          start: int, end: int) -> bytes | None: ...
        def _namespace_answer(self, entry: Expect, ok: bool) -> None: ...
        def _param_status(self, body: bytes) -> bytes | None: ...
        def _guard_synced(self) -> bool: ...
        def _parse_analysis(self, sql: str) -> Any: ...
        def _sensitive_patterns(self) -> list[str]: ...
        def _plain_builtins(self, statements: Any) -> bool: ...
        def forget_verdicts(self) -> None: ...
        def _user_code_runs(self, portal: str | None = None) -> None: ...
        def _forget_portals(self, keep: str | None = None) -> None: ...
        def _bind_failed(self, entry: Expect) -> None: ...
        def _probe_search_path(self) -> bool: ...
        def _probed(self, probe: Probe) -> None: ...
        def _code_runs(self, analysis: Any, decision: Decision) -> bool: ...
        def _defined(self, ctx: Ctx, ok: bool) -> None: ...
        def _refuse(self, error: bytes, kind: bytes, out: list[bytes] | None = None) -> None: ...
        def _replay_backlog(self) -> None: ...
        def _rows(self, head: Expect, chunk: bytes, start: int, end: int,
                  out: list[bytes] | None, seg: int) -> tuple[list[bytes] | None, int]: ...
        def _send(self, data: bytes) -> None: ...
        def _spawn(self, coro: Any) -> None: ...
        def _drop_commit_check(self, ctx: Ctx | None = None) -> None: ...
        def _take_fast(self) -> None: ...
        def _verdict(self, analysis: Any) -> Decision: ...
        @property
        def conn_name(self) -> str | None: ...
        def data_received(self, data: bytes, fast_ok: bool = True) -> None: ...
        def fatal(self, sqlstate: str, message: str, detail: str | None = None) -> None: ...
        def write(self, data: bytes) -> None: ...
