"""The read-only guard: the target itself refuses a write the gateway judged a read.

The analyser will always miss some way to write (a function found through overloading
or search_path, an operator, a view or rule, a name the server cuts at 63 bytes...). So
what the gateway allows as a read runs where PostgreSQL refuses writes:

- The upstream session starts with ``default_transaction_read_only = on``: every implicit
  (autocommit) transaction is read-only, and the client can never turn that off (the
  analyser refuses every spelling; the startup parameter is the gateway's).
- A statement the gateway allowed as a write (class ``write``, ``ddl``, ``lock``...) gets
  write access for exactly its transaction: ``SET LOCAL transaction_read_only = off``
  first in its implicit transaction (a multi-statement Query is one implicit
  transaction), or, for the few commands that cannot run inside a transaction block
  (VACUUM, CREATE DATABASE, CALL...), the session default is turned off around that one
  Query and back on after it.
- A transaction the client opens (BEGIN) is made read-write right away (``SET
  TRANSACTION READ WRITE``); inside it, reads run in the gateway's read-only
  subtransaction (``SAVEPOINT keyturn_ro; SET LOCAL transaction_read_only = on``),
  released before the next write or savepoint. A read-only subtransaction inside a
  read-write transaction is PostgreSQL's own mechanism: the parent's mode comes back
  when it is released.

This module is the pure part: given what a message holds and the transaction state
the gateway predicts, which statements of its own go where. The session does the I/O.

It must not do I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from keyturn.analysis.classes import WRITE_CLASSES

#: Classes that need write access (everything else runs read-only, or needs no guard).
RW_CLASSES = WRITE_CLASSES
#: Classes the guard runs read-only: every class but those that need write access and
#: transaction control (an allowed "unknown" is the riskiest: read-only too; a SELECT of
#: set_config() is "session" or "safety" and may call anything else beside it).
GUARDED_CLASSES = frozenset({"read", "unknown", "session", "safety"})

SQL_RW_LOCAL = "SET LOCAL transaction_read_only = off"
SQL_RW_TX = "SET TRANSACTION READ WRITE"
SQL_SAVEPOINT = "SAVEPOINT keyturn_ro"
SQL_RO = "SET LOCAL transaction_read_only = on"
SQL_RELEASE = "RELEASE SAVEPOINT keyturn_ro"
SQL_BEGIN_RW = "BEGIN READ WRITE"
SQL_COMMIT = "COMMIT"
SQL_ROLLBACK = "ROLLBACK"
SQL_DEFAULT_RW = "SET default_transaction_read_only = off"
SQL_DEFAULT_RO = "SET default_transaction_read_only = on"
#: Commands that can take SET LOCAL in front of them in one implicit transaction.
_BLOCK_SAFE = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "VALUES",
                         "TABLE", "WITH", "EXPLAIN", "LOCK", "DECLARE CURSOR", "NOTIFY",
                         "CREATE TABLE", "CREATE TABLE AS", "ALTER TABLE", "DROP TABLE",
                         "TRUNCATE", "CREATE VIEW", "CREATE FUNCTION", "GRANT", "REVOKE",
                         "COMMENT", "CREATE SEQUENCE", "ALTER SEQUENCE", "SELECT INTO"})


class Refused(Exception):
    """A message the guard cannot make safe; the text says how to send it instead."""


@dataclass(slots=True)
class TxState:
    """What the gateway predicts about the target's transaction at the point where the
    next message will run (messages may be sent before earlier answers arrive)."""

    block: bool = False  # an explicit transaction is open (T or E)
    block_ro: bool = False  # ... opened READ ONLY: the target refuses writes in it itself
    ro_open: bool = False  # the gateway's read-only savepoint is open
    hold: bool = False  # a WITH HOLD cursor was declared: its query finishes at COMMIT

    def copy(self) -> TxState:
        return TxState(self.block, self.block_ro, self.ro_open, self.hold)


@dataclass(slots=True)
class Plan:
    """How to send one simple Query: ``parts`` lists client statement indexes (int) and
    statements of the gateway's own (str), in order; ``toggle``: wrap the unchanged
    Query in session-default changes instead; ``state``: the state after it.
    ``explicit``: the Query's implicit transaction was made an explicit one (to guard its
    reads with a savepoint): a ROLLBACK must follow it, so that after an error the
    session is idle again as it would have been, and the client must see 'I'."""

    parts: list[int | str]
    state: TxState
    toggle: bool = False
    explicit: bool = False

    @property
    def changed(self) -> bool:
        return any(isinstance(p, str) for p in self.parts)


def _needs_rw(st: Any) -> bool:
    return str(st.cls) in RW_CLASSES


def outside_block(st: Any) -> bool:
    """Whether a statement alone in its message runs outside any transaction block
    (VACUUM, CREATE DATABASE, CALL, which may COMMIT...): see plan_query."""
    return _needs_rw(st) and not st.facts and st.command not in _BLOCK_SAFE


def plan_query(statements: Sequence[Any], state: TxState) -> Plan:
    """The statements to send for one simple Query whose ``statements`` were all allowed,
    starting from ``state``. Raises Refused for the few orders it cannot guard."""
    st = state.copy()
    parts: list[int | str] = []
    n = len(statements)
    if (n == 1 and not st.block and _needs_rw(statements[0]) and not statements[0].facts
            and statements[0].command not in _BLOCK_SAFE):
        # VACUUM, CREATE DATABASE, CALL (which may COMMIT)...: not inside a block.
        return Plan([0], st, toggle=True)
    if not st.block:
        explicit = _explicit_plan(statements, st)
        if explicit is not None:
            return explicit
    fresh = True  # at the start of an implicit transaction: nothing of it ran yet
    implicit_rw = False  # this implicit transaction was given write access
    ran_query = False  # a statement that may have taken a snapshot ran in it
    ended = False  # a transaction ended in this message: the next one starts mid-message
    for j, s in enumerate(statements):
        facts = s.facts
        cls = str(s.cls)
        if not st.block:
            if fresh:
                fresh, implicit_rw = False, False
                # Write access for this implicit transaction if anything in it (up to a
                # BEGIN, which makes it an explicit one, or a COMMIT, which ends it)
                # needs it: SET LOCAL must come before any query.
                rw, guarded = _segment(statements, j)
                if rw and guarded:
                    raise Refused("this message mixes reads and writes with BEGIN / COMMIT "
                                  "outside a transaction; send them as separate queries "
                                  "or inside BEGIN ... COMMIT")
                if rw:
                    parts.append(SQL_RW_LOCAL)
                    implicit_rw = True
                elif guarded and ended:
                    # A transaction that starts after a COMMIT in the same message takes
                    # the session default as it is then, and a function that ran earlier
                    # in the message may have turned it off and (before the message's
                    # end, so the server never reports it) back on: read-only, explicitly.
                    parts.append(SQL_RO)
            if "begin" in facts:
                parts.append(j)
                st.block, st.ro_open, st.hold = True, False, False
                st.block_ro = "begin_ro" in facts
                if not st.block_ro and not implicit_rw:
                    if ran_query:
                        raise Refused("send BEGIN as the first statement of its message: "
                                      "statements before it would run without keyturn's "
                                      "read-only guard")
                    parts.append(SQL_RW_TX)
                continue
            parts.append(j)
            if cls not in ("transaction", "session", "safety"):
                ran_query = True
            if "end" in facts:
                fresh, ran_query, ended = True, False, True
            continue
        # Inside an explicit transaction.
        if st.block_ro:
            parts.append(j)
            if "end" in facts and "chain" not in facts:
                st.block = st.block_ro = False
                fresh, ran_query, ended = True, False, True
            continue
        parts += before_in_block(st, facts, (cls,))
        parts.append(j)
        after_in_block(st, facts)
        if not st.block:
            fresh, ran_query, ended = True, False, True
    return Plan(parts, st)


#: The states the compiled fast path plans in: no transaction, in a read-write one, in
#: one with the read-only savepoint open.
FAST_STATES = (TxState(), TxState(block=True), TxState(block=True, ro_open=True))


def fast_plans(statement: Any) -> tuple[tuple[Any, ...] | None, ...]:
    """How ``plan_query`` sends ``statement`` alone in each of FAST_STATES, for the
    compiled fast path: (the guard's statements before the client's text, joined as
    ``rewrite`` joins them, as bytes; those after it; a mask with bit i set when the
    Query's i-th CommandComplete answers one of the guard's; block after; savepoint open
    after; the transaction status after; the plan's parts), or None where the plan is
    one the fast path leaves to Python (refused, session-default toggles, the gateway's
    own explicit transaction, a READ ONLY transaction or a WITH HOLD cursor after)."""
    out: list[tuple[Any, ...] | None] = []
    for state in FAST_STATES:
        try:
            plan = plan_query((statement,), state)
        except Refused:
            out.append(None)
            continue
        after, parts = plan.state, plan.parts
        mine = [i for i, part in enumerate(parts) if not isinstance(part, str)]
        if plan.toggle or plan.explicit or after.block_ro or after.hold or len(mine) != 1:
            out.append(None)
            continue
        k = mine[0]
        before = "".join(f"{part}\n;\n" for part in parts[:k])
        behind = "".join(f"\n;\n{part}" for part in parts[k + 1:])
        hide = sum(1 << i for i, part in enumerate(parts) if isinstance(part, str))
        out.append((before.encode(), behind.encode(), hide, after.block, after.ro_open,
                    "T" if after.block else "I", tuple(parts)))
    return tuple(out)


def _segment(statements: Sequence[Any], j: int) -> tuple[bool, bool]:
    """Whether the implicit transaction starting at statement ``j`` (up to a BEGIN, which
    makes it an explicit one, or a COMMIT, which ends it) holds a statement that needs
    write access, and one the guard runs read-only."""
    rw = guarded = False
    for k in range(j, len(statements)):
        s = statements[k]
        facts = s.facts
        if "begin" in facts:
            break
        cls = str(s.cls)
        rw = rw or cls in RW_CLASSES
        guarded = guarded or cls in GUARDED_CLASSES
        if "end" in facts:
            break
    return rw, guarded


def _explicit_plan(statements: Sequence[Any], state: TxState) -> Plan | None:
    """A Query outside a transaction whose one implicit transaction holds both an allowed
    write and reads: write access for the whole of it would let a read that hides a
    write run read-write, and a savepoint cannot be taken in an implicit transaction.
    So it runs in an explicit read-write transaction of the gateway's own (BEGIN ...
    COMMIT around it), its reads in the read-only savepoint like in a client's."""
    if any("begin" in s.facts or "end" in s.facts for s in statements):
        return None  # several transactions: plan_query refuses the mixed ones
    if len(statements) < 2:
        return None
    rw, guarded = _segment(statements, 0)
    if not (rw and guarded):
        return None
    st = state.copy()
    st.block, st.block_ro, st.ro_open, st.hold = True, False, False, False
    parts: list[int | str] = [SQL_BEGIN_RW]
    for j, s in enumerate(statements):
        parts += before_in_block(st, s.facts, (str(s.cls),))
        parts.append(j)
        after_in_block(st, s.facts)
    parts += before_in_block(st, frozenset({"end"}), ())
    parts.append(SQL_COMMIT)
    return Plan(parts, TxState(), explicit=True)


def before_in_block(st: TxState, facts: frozenset[str], classes: Sequence[str]) -> list[str]:
    """The gateway's statements to run before one of the client's inside an explicit
    read-write transaction (``st.block`` and not ``st.block_ro``); updates ``st``."""
    if "end" in facts:
        if not st.hold:
            if "chain" in facts and st.ro_open:
                # AND CHAIN starts a transaction with the mode in force at this point:
                # inside the guard's savepoint that is read-only. Released first, the
                # chained transaction is read-write like the one it follows.
                st.ro_open = False
                return [SQL_RELEASE]
            return []
        # A WITH HOLD cursor's query finishes at COMMIT, after every savepoint was
        # released: the transaction itself must be read-only by then (going read-only is
        # always allowed; what it wrote before still commits). A transaction chained to
        # it is read-only too.
        out = [SQL_RELEASE] if st.ro_open else []
        st.ro_open = False
        if "chain" in facts:
            st.block_ro = True
        return [*out, SQL_RO]
    if "savepoint" in facts or "begin" in facts or any(c in RW_CLASSES for c in classes):
        # Before a write (or the client's savepoint, which would nest in ours).
        if st.ro_open:
            st.ro_open = False
            return [SQL_RELEASE]
        return []
    if "sp_destroy" not in facts and not st.ro_open and (
            not classes or any(c in GUARDED_CLASSES for c in classes)):
        st.ro_open = True
        return [SQL_SAVEPOINT, SQL_RO]
    return []


def after_in_block(st: TxState, facts: frozenset[str]) -> None:
    """The state after one of the client's statements ran inside an explicit transaction."""
    if "hold_cursor" in facts:
        st.hold = True
    if "end" in facts:
        st.ro_open = st.hold = False
        if "chain" not in facts:  # AND CHAIN: a new transaction, read-write like this
            st.block = st.block_ro = False
    elif "sp_destroy" in facts:
        # RELEASE / ROLLBACK TO of the client's savepoint ends ours (it is newer).
        st.ro_open = False


def plan_unparsed(state: TxState, changes_transaction: bool = False) -> Plan:
    """A Query the analyser could not read (allowed only by a rule naming class unknown):
    sent unchanged, read-only (inside a transaction: in the read-only savepoint).
    ``changes_transaction``: it may end its transaction and run more after that
    (keyturn.analysis.postgres.may_change_transaction), which no plan can keep read-only:
    refused."""
    if changes_transaction:
        raise Refused("keyturn cannot analyse this message and it may end its transaction "
                      "and go on in another, which keyturn cannot keep read-only; send its "
                      "statements as separate queries (or as one statement with the "
                      "extended protocol)")
    st = state.copy()
    if st.block and not st.block_ro and not st.ro_open:
        st.ro_open = True
        return Plan([SQL_SAVEPOINT, SQL_RO, 0], st)
    return Plan([0], st)


@dataclass(slots=True)
class Rewritten:
    sql: str
    ours: tuple[bool, ...]  # per statement sent: True for the gateway's own
    # (start in the new text, start in the client's text, length) per client statement,
    # in characters: error positions are mapped back to the client's text.
    spans: tuple[tuple[int, int, int], ...]

    def client_position(self, position: int) -> int | None:
        """A 1-based error position in the text sent, as a position in the client's."""
        for new, old, length in self.spans:
            if new < position <= new + length:
                return old + position - new
        return None


def rewrite(sql: str, texts: Sequence[str], parts: Sequence[int | str]) -> Rewritten:
    """The Query text for ``parts``: the client's statements (``texts``, exactly as in
    ``sql``) with the gateway's own between them. Statements are joined with a newline
    before the semicolon, so a trailing ``--`` comment cannot swallow what follows."""
    starts: list[int] = []
    cursor = 0
    for text in texts:
        at = sql.find(text, cursor)
        if at < 0:
            at = cursor
        starts.append(at)
        cursor = at + len(text)
    pieces: list[str] = []
    ours: list[bool] = []
    spans: list[tuple[int, int, int]] = []
    length = 0
    for part in parts:
        if pieces:
            pieces.append("\n;\n")
            length += 3
        if isinstance(part, str):
            pieces.append(part)
            ours.append(True)
            length += len(part)
        else:
            text = texts[part]
            spans.append((length, starts[part], len(text)))
            pieces.append(text)
            ours.append(False)
            length += len(text)
    return Rewritten("".join(pieces), tuple(ours), tuple(spans))
