"""Holding a statement for approval: hands the request to ``keyturn.holds`` and renders
its outcome as PostgreSQL answers (the result, or an ERROR with the ticket's outcome).

Part of ``ClientSession`` (proxies/postgres/session.py), as a mixin. The hold workflow
itself (tickets, waiting, expiry, claims) lives in keyturn/holds.py, not here.

It must not make tickets or wait on its own: keyturn.holds does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from keyturn import holds
from keyturn.approvals import TicketRequest, binding_of
from keyturn.policy import Decision
from proxies.postgres import codec, guard
from proxies.postgres.codec import Message
from proxies.postgres.state import CommitCheck, Ctx, SessionState

if TYPE_CHECKING:
    from proxies.postgres.session import ClientSession

log = logging.getLogger(__name__)


def _tables_of(decision: Decision) -> list[str]:
    return sorted({t for s in decision.statements for t in s.tables})


def _shape(decision: Decision) -> str:
    """What a decision says runs (each statement's class, tables and functions, and
    whether it runs code keyturn cannot see into), as a digest kept on the ticket."""
    parts = [[s.classification, sorted(s.tables), sorted(s.functions)]
             for s in decision.statements]
    return hashlib.sha256(json.dumps([parts, decision.opaque_code]).encode()).hexdigest()


#: How long an approved statement waits for a fresh read of its target's catalog before
#: it runs (it must run what was approved: see _changed_while_held).
RECHECK_SECONDS = 10.0


def post_check_sql(key: int, pid: int, *, last: bool = False) -> str:
    """The statement an approved Query ends with (holding.py _post_check): it waits for
    the gateway's advisory lock ``key``, then goes on only if the gateway's connection
    (backend ``pid``) says the check passed, in its application_name; a gateway
    connection that ended, or anything else, fails it, and its transaction rolls back.
    Its transaction holding ``key`` already, or the gateway's connection no longer
    holding it when the statement starts (stored code that waited for it, so that the
    gateway checked, passed and let go too early, whether that code kept the lock or
    released it), fails it too: the gateway lets go only after it saw this statement
    wait, which it does only once both were true. ``last``: nothing of the transaction's
    own runs after it but its COMMIT (deferred triggers fired before it): the rest of
    the transaction is read-only, so stored code that made work for COMMIT anyway (a
    trigger deferring again, a WITH HOLD cursor declared through EXECUTE, whose query
    runs at COMMIT) cannot write there. It answers no rows and names only pg_catalog."""
    def lock(holder: str) -> str:
        return ("SELECT FROM pg_catalog.pg_locks l WHERE l.pid OPERATOR(pg_catalog.=) "
                f"{holder} AND l.granted AND l.locktype OPERATOR(pg_catalog.=) "
                "'advisory'::pg_catalog.text AND l.classid OPERATOR(pg_catalog.=) "
                f"{key >> 32}::pg_catalog.oid AND l.objid OPERATOR(pg_catalog.=) "
                f"{key & 0xFFFFFFFF}::pg_catalog.oid AND l.objsubid OPERATOR(pg_catalog.=) 1")
    fail = ("RAISE EXCEPTION USING ERRCODE = '55000', MESSAGE = 'keyturn: the check after "
            "this approved statement did not pass; it was rolled back'")
    return ("DO $keyturn$BEGIN "
            f"IF EXISTS ({lock('pg_catalog.pg_backend_pid()')}) OR NOT EXISTS "
            f"({lock(str(int(pid)))}) THEN {fail}; END IF; "
            "PERFORM pg_catalog.pg_advisory_xact_lock("
            f"{int(key)}::pg_catalog.int8); PERFORM pg_catalog.pg_stat_clear_snapshot(); "
            "IF NOT EXISTS (SELECT FROM pg_catalog.pg_stat_activity a WHERE a.pid "
            f"OPERATOR(pg_catalog.=) {int(pid)} AND a.application_name "
            f"OPERATOR(pg_catalog.=) '{post_check_name(key)}'::pg_catalog.text) THEN "
            f"{fail}; END IF; " +
            ("PERFORM pg_catalog.set_config('transaction_read_only', 'on', true); "
             if last else "") + "END$keyturn$")


def post_check_name(key: int) -> str:
    """What the gateway's check connection calls itself once the check passed."""
    return f"keyturn-passed-{int(key)}"


#: Transaction control that ends, or lets the client roll back, part of the approved
#: statements' transaction: the check must come before it.
_CONTROL = frozenset({"begin", "end", "chain", "savepoint", "sp_destroy"})


def post_check_order(statements: Sequence[Any]) -> bool:
    """Whether one check can cover an approved Query: no work statement after
    transaction control that followed another work statement ("UPDATE a; SAVEPOINT s;
    UPDATE b" would leave the second unchecked, or let ROLLBACK TO undo the check)."""
    seen_work = control_after_work = False
    for st in statements:
        facts: frozenset[str] = getattr(st, "facts", frozenset())
        if facts & _CONTROL:
            control_after_work = control_after_work or seen_work
        elif control_after_work:
            return False
        else:
            seen_work = True
    return True


def with_post_check(parts: Sequence[int | str], statements: Sequence[Any],
                    key: int, pid: int, *, immediate: bool = False) -> list[int | str]:
    """``parts`` (the client's statements by index, the guard's own as text) with the
    check inserted right after the last approved statement that is not transaction
    control, before any COMMIT, SAVEPOINT, RELEASE or ROLLBACK TO behind it
    (post_check_order). ``immediate``: deferred constraint triggers fire first (a
    transaction that ends with the Query: they would run at its COMMIT, after the
    check)."""
    out = list(parts)
    last = max((i for i, p in enumerate(out) if isinstance(p, int)
                and not getattr(statements[p], "facts", frozenset()) & _CONTROL),
               default=max((i for i, p in enumerate(out) if isinstance(p, int)), default=-1))
    check = [post_check_sql(key, pid, last=immediate)]
    if immediate:
        check.insert(0, "SET CONSTRAINTS ALL IMMEDIATE")
    out[last + 1:last + 1] = check
    return out


# A requester over gateway.max_pending_per_user (holds.REFUSED): 53400
# configuration_limit_exceeded, a configured limit a later retry may pass.
_OUTCOME_SQLSTATE = {holds.DEFERRED: "42501", "rejected": "42501", "expired": "57014",
                     "cancelled": "57014", holds.REFUSED: "53400"}


def ticket_facts(classification: str, tables: Sequence[str], row_estimate: int | None,
                 in_transaction: bool) -> tuple[tuple[str, str], ...]:
    """What approvers see about a held statement besides its text, in order (the
    portal, Slack and Teams show these labelled facts without knowing SQL)."""
    cls = classification + (f" on {', '.join(tables)}" if tables else "")
    rows = f"{row_estimate:,} (EXPLAIN)" if row_estimate is not None else "no estimate"
    tx = "yes — the client holds a transaction" if in_transaction else "no"
    return (("Class", cls), ("Estimated rows", rows), ("Transaction open", tx))


class Holds(SessionState):
    """ClientSession's holds (mixin; methods run on the session's state)."""

    def _start_review(self, msg: Message, ctx: Ctx, decision: Decision,
                      analysis: Any, out: list[bytes], *, kind: bytes) -> bool:
        # Everything decided so far must reach the target before we wait.
        if out and self.upstream:
            self._send(b"".join(out))
            out.clear()
        self.holding = True
        self._spawn(self._review(msg, ctx, decision, analysis, kind))
        return False

    async def _review(self, msg: Message, ctx: Ctx, decision: Decision,
                      analysis: Any, kind: bytes) -> None:
        try:
            await self._review_inner(msg, ctx, decision, analysis, kind)
        except Exception:
            log.exception("hold in session %s failed", self.session_id)
            ctx.barrier = False
            self._refuse(codec.encode_error("ERROR", "XX000", "keyturn: the approval workflow "
                                            "failed; the statement was not run"), kind)
            self._audit(ctx, outcome="error")
        finally:
            self.held_ticket = None
            if not ctx.barrier or self.closed:
                self.holding = False
        if not self.holding:
            # (An approved statement that runs user code holds the client's next
            # messages until it completed, as an allowed one does: session._dispatch.)
            self._replay_backlog()

    async def _review_inner(self, msg: Message, ctx: Ctx,
                            decision: Decision, analysis: Any, kind: bytes) -> None:
        """Hold the statement with the core's hold service; render its outcome."""
        assert self.conn is not None and self.identity is not None and decision.review
        review = decision.review
        conn = self.conn
        statements = analysis.statements
        # EXECUTE p is bound to what p holds too: p may be prepared again with something
        # else before a deferred approval's re-run.
        executes = [list(self.prepared.texts(st.prepared_name)) for st in statements
                    if st.command == "EXECUTE" and st.prepared_name and
                    self.prepared is not None]
        binding = binding_of(self.user, conn.name, ctx.statement if not executes else
                             json.dumps([ctx.statement, executes]), ctx.params)
        readable = not ctx.params or not any(
            isinstance(p, str) and p.startswith("\\x") for p in ctx.params)
        # The planner runs code while it plans (immutable functions folded, stable ones and
        # operators for estimates, types' input functions): a statement that may run user
        # code is never planned before someone approved it.
        explain = len(statements) == 1 and getattr(statements[0], "is_dml", False) and \
            readable and self._plain_builtins(statements)

        async def enrich(req: TicketRequest) -> TicketRequest:
            estimate = await asyncio.to_thread(self.gw.explain_rows, conn, ctx.statement,
                                               ctx.params) if explain else None
            in_tx = bool(req.detail.get("in_transaction"))
            # What the approvers are shown runs exactly: the user code it calls is
            # compared with what the target holds when it is released (_changed_while_held).
            try:
                code = await asyncio.to_thread(self.gw.code_digest, conn,
                                               _tables_of(decision))
            except Exception as exc:  # noqa: BLE001 - any failure: no digest, refused later
                log.info("no code digest for a held statement on %s: %s", conn.name, exc)
                code = None
            return dataclasses.replace(
                req, detail={**req.detail, "row_estimate": estimate, "code": code},
                facts=ticket_facts(req.classification, req.tables, estimate, in_tx))
        req = TicketRequest(
            requester=self.user, requester_groups=self.identity.groups,
            connection=conn.name, statement=ctx.shown or ctx.statement,
            classification=decision.classification, rule=decision.rule or "",
            reason=decision.reason, approver_groups=review.approvers,
            min_approvals=review.min_approvals, timeout=review.timeout, mode=review.mode,
            escalate_after=review.escalation_delay(), escalate_to=review.escalate_to,
            params=ctx.shown_params if ctx.shown is not None else ctx.params,
            tables=decision.tables, client_addr=self.client_addr,
            application=self.application, session_id=self.session_id,
            detail={"in_transaction": self.tx_status in ("T", "E"), "row_estimate": None,
                    "shape": _shape(decision), "session": self._session_state()},
            language="sql",
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
        post: tuple[Any, str] | None = None
        if outcome.run and outcome.status != holds.GRANTED:
            changed, code = await self._changed_while_held(decision, analysis,
                                                           outcome.ticket_id, kind)
            if changed is None and code is not None:
                changed = self._uncheckable(analysis, decision, kind)
            if changed is None and code is not None and self._post_checkable(analysis, kind):
                # Checked again after it ran, before its transaction commits: what it
                # waited behind (a row lock, a table lock of stored code) may have
                # committed new code in between (_post_check).
                ctx.post_key = secrets.randbits(62) | (1 << 40)
                try:
                    lock = await asyncio.to_thread(self.gw.post_check_open, conn, ctx.post_key)
                    ctx.post_pid = int(lock.info.backend_pid)
                    # A command that would run outside a transaction block (CALL...) runs
                    # in one when it runs user code, so that it is checked too (one that
                    # cannot, such as VACUUM, then fails: nothing unchecked runs code).
                    ctx.post_in_block = self._code_runs(analysis, decision)
                    post = (lock, code)
                    if kind == b"Q" and self.commit_check is None and (
                            self.txs.block or any("begin" in st.facts
                                                  for st in analysis.statements)):
                        # It may leave a transaction open whose COMMIT runs the deferred
                        # triggers it queued: that COMMIT is checked too (a second lock,
                        # given back at once when the Query leaves no transaction open).
                        ctx.commit_key = secrets.randbits(62) | (1 << 40)
                        ctx.commit_lock = await asyncio.to_thread(
                            self.gw.post_check_open, conn, ctx.commit_key)
                        ctx.commit_pid = int(ctx.commit_lock.info.backend_pid)
                except Exception as exc:  # noqa: BLE001 - cannot check after: refuse
                    log.warning("session %s: no post-execution check on %s: %s",
                                self.session_id, conn.name, exc)
                    ctx.post_key = ctx.commit_key = None
                    for opened in (post[0] if post else None, ctx.commit_lock):
                        if opened is not None:
                            await asyncio.to_thread(self.gw.post_check_close, opened)
                    post = ctx.commit_lock = None
                    changed = "the target could not be reached to check it after it runs"
            if changed is not None:
                self._refuse(codec.encode_error(
                    "ERROR", "55000", f"keyturn: {outcome.message}, but {changed} since it "
                    "was held, so it was not run; send it again to ask for a new approval"),
                    kind)
                ctx.action = "review"
                ctx.reason = f"approved, not run: {changed} while it was held"
                self._audit(ctx, outcome="refused")
                return
        if outcome.run:
            self._inject(codec.encode_notice("NOTICE", "00000", f"keyturn: {outcome.message}"))
            # What it defines counts for every session from now (not while it was held:
            # a pending request must not change how others' statements are judged).
            self.gw.catalogs.note(cast("ClientSession", self),
                                  tuple(getattr(analysis, "statements", ())))
            if self._code_runs(analysis, decision):
                self._user_code_runs(ctx.portal)
            ctx.barrier = self.probe_due
            if ctx.barrier and kind == b"E":
                self.code_in_batch = True
            self._forward_approved(msg, ctx, kind)
            if post is not None:
                self._arm_commit_check(ctx, post[1], _tables_of(decision))
                self._spawn(self._post_check(ctx, post[0], ctx.post_key,
                                             [(post[1], _tables_of(decision))]))
            elif ctx.commit_lock is not None:
                self._spawn(asyncio.to_thread(self.gw.post_check_close, ctx.commit_lock))
            return
        self._refuse(codec.encode_error("ERROR", _OUTCOME_SQLSTATE.get(outcome.status, "42501"),
                                        f"keyturn: {outcome.message}"), kind)
        if outcome.status == holds.DEFERRED:
            return
        ctx.action = "review"
        self._audit(ctx, outcome=outcome.status)

    async def _changed_while_held(self, decision: Decision, analysis: Any,
                                  ticket_id: int | None, kind: bytes = b""
                                  ) -> tuple[str | None, str | None]:
        """Why an approved statement must not run: what it would run on the target now
        (triggers, rules, views, defaults added or changed while it waited, by any session;
        the bodies of the user functions it calls) or the policy's verdict differs from
        what its ticket recorded when approvers were asked (in defer mode the statement
        sent again is compared with the one approved). None: it is the same. With it, the
        digest of the target's code recorded on the ticket (None: none recorded)."""
        assert self.conn is not None
        if not getattr(analysis, "statements", ()):
            return None, None
        # Checked after it ran (very likely: _post_checkable, nothing that runs outside a
        # block, no masked result format to check first): a catalog change still open
        # elsewhere counts there if it commits while the statement runs, and not at all
        # if it commits later, so it need not refuse the statement now.
        statements = analysis.statements
        after = self._post_checkable(analysis, kind) and not self.masking and \
            self._uncheckable(analysis, decision, kind) is None and \
            not any(guard.outside_block(st) for st in statements)
        why, recorded = await self._recheck(decision, analysis, ticket_id,
                                            post_checked=after)
        code = recorded.get("code")
        return why, code if isinstance(code, str) else None

    async def _recheck(self, decision: Decision, analysis: Any, ticket_id: int | None, *,
                       post_checked: bool = False) -> tuple[str | None, dict[str, Any]]:
        assert self.conn is not None
        recorded: dict[str, Any] = {}
        if ticket_id is not None:
            t = await asyncio.to_thread(self.gw.services.approvals.get, ticket_id)
            recorded = dict(t.detail or {})
        if not await self.gw.catalogs.fresh(self.conn, RECHECK_SECONDS):
            return "the target's catalog could not be read again to check what it runs", \
                recorded
        now = self._decide(analysis)
        if now.action == "block":
            return f"the policy now blocks it ({now.reason})", recorded
        if "session" in recorded and recorded["session"] != self._session_state():
            return ("the session's settings changed (SET, search_path, PREPARE, or user "
                    "code that ran), and stored code may read them"), recorded
        want = recorded.get("shape") or _shape(decision)
        if _shape(now) != want or (now.opaque_code and not decision.opaque_code):
            before = {t for s in decision.statements for t in (*s.tables, *s.functions)}
            new = sorted({t for s in now.statements for t in (*s.tables, *s.functions)}
                         - before)
            return "what it runs on the target changed" + \
                (f" (it now also touches {', '.join(new[:5])})" if new else
                 f" (it is now {now.classification})"), recorded
        # One read for the rest: the user code it runs (compared with the digest taken
        # when it was held), and any schema change still open in another transaction (a
        # trigger created, a function replaced, then ALTER TABLE to make this statement
        # wait for its commit), which no catalog read can show yet.
        try:
            # Anything but plain DML may take an exclusive lock, which waits behind any.
            code, busy = await asyncio.to_thread(
                self.gw.release_facts, self.conn, _tables_of(now),
                exclusive=any(not getattr(s, "is_dml", False) for s in analysis.statements))
        except Exception as exc:  # noqa: BLE001 - cannot tell: refuse
            log.warning("session %s: the approval re-check could not read %s: %s",
                        self.session_id, self.conn.name, exc)
            code, busy = None, ["(the target could not be read to compare)"]
        if "code" in recorded and (code is None or recorded["code"] is None or
                                   code != recorded["code"]):
            return ("user code stored on the target (functions, triggers, rules, views, "
                    "defaults, constraints or policies) changed, or could not be read to "
                    "compare"), recorded
        if post_checked:
            busy = [b for b in busy if not b.startswith("catalog ")]
        if busy:
            return f"another transaction is changing or holding {', '.join(busy[:5])} " \
                   "(its changes would count only once it commits, after this check)", \
                recorded
        return None, recorded

    def _uncheckable(self, analysis: Any, decision: Decision, kind: bytes) -> str | None:
        """Why an approved statement must not run for want of a check after it ran
        (None: it may)."""
        statements = getattr(analysis, "statements", ())
        if kind == b"Q" and not post_check_order(statements):
            return ("it has statements after a SAVEPOINT, RELEASE, ROLLBACK TO or COMMIT "
                    "that follows another of its statements, which one check after it ran "
                    "cannot cover; send them as separate messages")
        if any("hold_cursor" in getattr(st, "facts", ()) for st in statements) and \
                self._code_runs(analysis, decision):
            return ("a WITH HOLD cursor runs its query when its transaction commits, after "
                    "any check, and its query runs user code; declare it without HOLD "
                    "inside a transaction")
        return None

    @staticmethod
    def _post_checkable(analysis: Any, kind: bytes) -> bool:
        """Whether an approved statement can be checked after it ran: one the analyser
        read (the check is appended to a simple Query as its last statement, or sent
        right behind an Execute, in its transaction; commands that cannot run in a
        transaction block are told apart when the Query is planned:
        session._forward_query)."""
        return kind in (b"Q", b"E") and getattr(analysis, "error", None) is None and \
            bool(getattr(analysis, "statements", ()))

    def _arm_commit_check(self, ctx: Ctx, want: str, tables: list[str]) -> None:
        """An approved Query that left its transaction open (session._forward_query set
        ``commit_armed``): the deferred triggers it queued run at that transaction's
        COMMIT, after its own check, so the COMMIT is checked too (session._commit_check:
        SET CONSTRAINTS ALL IMMEDIATE and a wait for ``commit_key`` come before it). A
        second approved statement in the same transaction joins the first one's check."""
        lock, ctx.commit_lock = ctx.commit_lock, None
        if ctx.commit_armed:
            if self.commit_check is not None:
                if not self.commit_check.spent:
                    self.commit_check.checks.append((ctx, want, tables))  # (lock closed)
            elif lock is not None and ctx.commit_key is not None:
                self.commit_check = CommitCheck(lock, ctx.commit_key, ctx.commit_pid,
                                                [(ctx, want, tables)])
                if self.fast is not None:
                    self.fast.disarm()  # the COMMIT must come through the session
                return
        if lock is not None:
            self._spawn(asyncio.to_thread(self.gw.post_check_close, lock))

    def _drop_commit_check(self, ctx: Ctx | None = None) -> None:
        """The transaction ended (or ``ctx``, one of its approved statements, was rolled
        back by its own check): nothing (more) of it is owed at COMMIT."""
        cc = self.commit_check
        if cc is None:
            return
        if ctx is not None:
            if cc.spent:
                return  # owed until the transaction ends
            cc.checks = [c for c in cc.checks if c[0] is not ctx]
            if cc.checks:
                return
        self.commit_check = None
        if not cc.spent:
            self._spawn(asyncio.to_thread(self.gw.post_check_close, cc.lock))

    async def _post_check(self, ctx: Ctx, lock: Any, key: int | None,
                          checks: list[tuple[str, list[str]]], *,
                          at_commit: bool = False) -> None:
        """After an approved Query's statements ran, before its transaction commits: the
        target's code digest again, compared with the one its approvers were shown
        (``checks``: per approved statement, that digest and the tables it names).

        The Query ends with post_check_sql, which waits for advisory lock ``key`` that
        ``lock`` (a connection of the gateway's own) holds. Once the session waits there,
        every transaction the statement waited behind has committed (or not), so a new
        read sees what it ran with: the same → ``lock`` names itself as passed and
        releases the lock, and the Query commits; changed (or unreadable) → the lock is
        released unnamed, the check fails, its transaction rolls back and the client gets
        a 55000 error saying why (ordering.py _on_error). Fails closed: a lock connection
        that ends (killed by code the statement ran, say) releases the lock unnamed too.
        ``at_commit``: the client's COMMIT of a transaction that ran approved statements,
        after their deferred triggers fired (session._commit_check)."""
        try:
            if key is None or self.upstream is None or not self.upstream.backend_key \
                    or self.conn is None:
                return  # not appended (a command that cannot run in a block)
            pid = self.upstream.backend_key[0]
            delay = 0.01
            while True:
                state = await asyncio.to_thread(self.gw.post_check_state, lock, pid, key)
                if state == "waiting":
                    break
                if state == "gone" or ctx.post_done:
                    return  # it failed before the check (rolled back) or the session ended
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            same = True
            for want, tables in checks:
                try:
                    code: str | None = await asyncio.to_thread(self.gw.code_digest,
                                                               self.conn, tables)
                except Exception as exc:  # noqa: BLE001 - cannot compare: refuse
                    log.warning("session %s: the post-execution check could not read %s: "
                                "%s", self.session_id, self.conn.name, exc)
                    code = None
                same = same and code == want
            if same:
                await asyncio.to_thread(self.gw.post_check_pass, lock, key,
                                        post_check_name(key))
                # Open until the session read the name (its Query completed).
                for _ in range(600):
                    if ctx.post_done or self.closed:
                        break
                    await asyncio.sleep(0.1)
                return
            if at_commit:
                ctx.post_refused = (
                    "keyturn: this transaction ran an approved statement whose deferred "
                    "triggers run at COMMIT, but user code stored on the target (functions, "
                    "triggers, rules, views, defaults, constraints or policies) changed "
                    "since it was approved, or could not be read to compare; the "
                    "transaction was not committed (roll it back) and the approved "
                    "statement must be sent again for a new approval")
            else:
                ctx.post_refused = (
                    "keyturn: the approved statement ran, but user code stored on the "
                    "target (functions, triggers, rules, views, defaults, constraints or "
                    "policies) changed before it completed (committed by a transaction it "
                    "waited behind, or while it ran), or could not be read to compare; it "
                    "was rolled back" +
                    ("" if self.tx_status != "T" else
                     " with the failed transaction (roll the transaction back)") +
                    "; send it again to ask for a new approval")
                self._drop_commit_check(ctx)  # what it queued is rolled back with it
            log.warning("session %s: approved statement rolled back: the target's code "
                        "changed while it ran (ticket %s)", self.session_id, ctx.ticket_id)
        except Exception:
            log.exception("session %s: the post-execution check failed (the approved "
                          "statement's check fails closed)", self.session_id)
        finally:
            await asyncio.to_thread(self.gw.post_check_close, lock)

    def _session_state(self) -> str:
        """What of this session's state stored code may read: the schemas its search_path
        may name, whether user code ran (and may have set anything), the SETs sent."""
        return hashlib.sha256(json.dumps(
            [sorted(self.schemas), self.ran_user_code, self.settings_seen]).encode()
        ).hexdigest()[:32]

    def _forward_approved(self, msg: Message, ctx: Ctx, kind: bytes) -> None:
        ctx.t0 = time.time()
        out: list[bytes] = []
        if not self._forward(msg, ctx, kind, out) or ctx.action == "block":
            ctx.barrier = False  # waits for a Describe, or refused: nothing more to hold
        if ctx.barrier and kind == b"E":
            out.append(codec.encode_flush())  # its answer now, not at the next Sync
        if self.upstream:
            self._send(b"".join(out))

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
