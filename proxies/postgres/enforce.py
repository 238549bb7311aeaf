"""The session side of the read-only guard: the statements slotted around client
messages so that the target itself refuses writes the gateway did not allow.

The plans (which guard statements, from the transaction state) are pure functions in
proxies/postgres/guard.py; this mixin of ``ClientSession`` sends them and tracks what
the target reports. It must not decide statements."""

from __future__ import annotations

import logging
from typing import Any

from keyturn.analysis.postgres import (
    client_encoding_refusal,
)
from proxies.postgres import codec, guard
from proxies.postgres.codec import Message
from proxies.postgres.state import _AMBIGUOUS, Ctx, Expect, Probe, SessionState, _pkey

log = logging.getLogger(__name__)


_GUARD_NAMES = {guard.SQL_RW_LOCAL: "keyturn_rw_local", guard.SQL_RW_TX: "keyturn_rw_tx",
                guard.SQL_SAVEPOINT: "keyturn_savepoint", guard.SQL_RO: "keyturn_ro",
                guard.SQL_RELEASE: "keyturn_release", guard.SQL_BEGIN_RW: "keyturn_begin",
                guard.SQL_COMMIT: "keyturn_commit"}


_GUARD_PORTAL = "keyturn_portal"


_GUARD_BIND = {sql: codec.encode_bind(_GUARD_PORTAL, name) for sql, name in _GUARD_NAMES.items()}


_GUARD_RUN = codec.encode_execute(_GUARD_PORTAL, 0) + codec.encode_close("P", _GUARD_PORTAL)


#: The gateway's read of what user code may have changed unseen (the server reports
#: neither): the search_path and the role "$user" stands for.
PROBE_SQL = "SELECT pg_catalog.current_setting('search_path'), current_user"
_PROBE_STMT = "keyturn_probe"
_PROBE_RUN = (codec.encode_bind(_GUARD_PORTAL, _PROBE_STMT) + _GUARD_RUN
              + codec.encode_flush())


_READ_AS_ANALYSED = {
    "standard_conforming_strings": lambda v: None if v == "on" else "off",
    "client_encoding": client_encoding_refusal,
}


class ReadOnlyGuard(SessionState):
    """ClientSession's read-only guard steps (mixin; methods run on the session's state)."""

    def _guard_quiet(self) -> bool:
        """A read may go as it is (the compiled fast path): no explicit transaction, or
        one whose reads are already read-only."""
        txs = self.txs
        return not txs.block or txs.ro_open or txs.block_ro

    def _guard_exec_plans(self, classes: list[str], facts: frozenset[str]
                          ) -> tuple[Any, ...]:
        """For the compiled fast path: what ``_guard_before_execute`` and
        ``_guard_after_execute`` send around the Execute of a statement of ``classes``
        and ``facts`` (none, a plain BEGIN or a plain COMMIT/END/ROLLBACK) alone in its
        batch, in each of guard.FAST_STATES: None where the session must plan it (a
        write outside a transaction gets the batch's write access), else (the guard's
        Bind/Execute/Close messages before the Execute, the names of the guard
        statements they use, the same after it, block after, savepoint open after, the
        transaction status at the batch's Sync)."""
        plans: list[Any] = []
        for state in guard.FAST_STATES:
            st = state.copy()
            before: list[str] = []
            after: list[str] = []
            if not st.block:
                if facts != {"begin"}:
                    plans.append(None)
                    continue
                st.block, st.ro_open, st.hold, st.block_ro = True, False, False, False
                after = [guard.SQL_RW_TX]
            else:
                before = guard.before_in_block(st, facts, classes)
                guard.after_in_block(st, facts)
                if st.block_ro or st.hold:
                    plans.append(None)
                    continue
            plans.append((b"".join(_GUARD_BIND[sql] + _GUARD_RUN for sql in before),
                          tuple(_GUARD_NAMES[sql] for sql in before),
                          b"".join(_GUARD_BIND[sql] + _GUARD_RUN for sql in after),
                          tuple(_GUARD_NAMES[sql] for sql in after),
                          st.block, st.ro_open, "T" if st.block else "I"))
        return tuple(plans)

    def _guard_run(self, sql: str, out: list[bytes]) -> None:
        """One guard statement as extended-protocol messages answered to the gateway
        alone (its errors reach the client: the target then skips to Sync anyway)."""
        name = _GUARD_NAMES[sql]
        if name not in self.guard_stmts:
            self._prepare_own(name, sql, out)
        out.append(_GUARD_BIND[sql])
        out.append(_GUARD_RUN)
        self.expect.append(Expect(b"B", swallow=True))
        self.expect.append(Expect(b"E", swallow=True))
        self.expect.append(Expect(b"C", swallow=True))

    def _prepare_own(self, name: str, sql: str, out: list[bytes]) -> None:
        """Prepare one of the gateway's own statements under ``name``: closed first, as
        user code may have prepared something else under it (SQL PREPARE run by a
        function, which the gateway does not see; session._forward forgets every name
        once such code ran). Closing a name that holds nothing is no error."""
        self.guard_stmts.add(name)
        out.append(codec.encode_close("S", name))
        self.expect.append(Expect(b"C", swallow=True))
        out.append(codec.encode_parse(name, sql))
        self.expect.append(Expect(b"P", swallow=True, guard_stmt=name))

    def _probe_search_path(self) -> bool:
        """After user code ran (``probe_due``) and the statement that held the client's
        next messages completed: read search_path and the role back from the target
        before anything else is judged (decisions.py _probed takes the answer). False
        when it cannot be read now (a failed transaction, a batch skipping to its Sync):
        the next statement then waits for its completion too, and it is tried again."""
        up, ctx = self.upstream, self.barrier_from
        if up is None or up.closed or self.tx_status == "E" or self.skip_until_sync \
                or self.fail_at_sync or self.target_skipping:
            return False
        probe = Probe()
        if ctx is not None and ctx.portal is not None:
            # An Execute: the client's batch goes on after it (its Sync is held), so
            # the read runs inside it, on messages of the gateway's own.
            if ctx.error is not None:
                return False
            out: list[bytes] = []
            if _PROBE_STMT not in self.guard_stmts:
                self._prepare_own(_PROBE_STMT, PROBE_SQL, out)
            out.append(_PROBE_RUN)
            self.expect.append(Expect(b"B", swallow=True))
            self.expect.append(Expect(b"E", swallow=True, probe=probe))
            self.expect.append(Expect(b"C", swallow=True))
            self._send(b"".join(out))
        else:
            self.expect.append(Expect(b"Q", hide=True, probe=probe))
            self._send(codec.encode_query(PROBE_SQL))
        return True

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
            if t == b"Q":
                # A simple Query inside the batch runs in its transaction: what it holds
                # is judged by the Query's own plan, so the batch is made explicit (its
                # reads then run in the read-only savepoint).
                guarded = True
                break
            if t == b"P":
                p = codec.decode_parse(m.body)
                parsed[_pkey(p.name)] = self._parse_analysis(p.query)
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
        if self.imp_bound or self.target_skipping:
            # (Skipping to the client's Sync after an error, the target runs nothing of
            # this batch; a Sync of the gateway's own would end the skip early.)
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
        if txs.block_ro:
            return
        analysis = ctx.analysis
        statements = analysis.statements if analysis is not None else ()
        facts = frozenset().union(*(st.facts for st in statements)) if statements else \
            frozenset()
        if not txs.block:
            if self.imp_ended:
                # The first statement of a transaction that starts after a COMMIT in the
                # same batch: it takes the session default as it is then, and a function
                # that ran earlier in the batch may have turned it off (and back on
                # before the Sync, so the server never reports it). Read-only,
                # explicitly (a BEGIN makes the guard plan an explicit transaction).
                self.imp_ended = False
                if "begin" not in facts:
                    self._guard_run(guard.SQL_RO, out)
            return
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
            if "end" in facts:
                self.imp_ended = True  # (a COMMIT with no transaction open ends the batch's)
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
            self.imp_ended = True

    def _guard_sync(self) -> None:
        """Nothing is in flight: the target's ReadyForQuery is the truth."""
        if not self.upstream_ro:
            self._guard_lost()
            return
        if self.tx_status == "I":
            self.code_pending = False  # what user code set up ran or is gone
            if self.txs.block or self.txs.ro_open:
                self.txs = guard.TxState()
        elif not self.txs.block:
            # A transaction the gateway did not see open: its mode is unknown, so reads
            # go to the read-only savepoint and writes may be refused by the target.
            self.txs = guard.TxState(block=True)

    def _guard_synced(self) -> bool:
        """Whether a ReadyForQuery with the status the session already holds would leave
        the guard as it is (``_guard_sync`` would change nothing). Not always so: the
        ReadyForQuery that reported ``tx_status`` is taken in only when it ends the queue,
        and one that leaves a request behind it (a Parse pipelined after a Query,
        completed by its ParseComplete alone) does not. The compiled fast path relays
        only ReadyForQuery with the status the session holds and sets nothing else, so
        the session offers it chunks only while this holds (session.data_received)."""
        txs = self.txs
        if self.tx_status == "I":
            return self.upstream_ro and not txs.block and not txs.ro_open
        return self.upstream_ro and txs.block

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
