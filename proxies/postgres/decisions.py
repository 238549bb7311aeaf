"""Deciding statements: the server's prepared-statement namespace as this session
changed it, the verdict memo, and the policy question for each analysed statement.

Part of ``ClientSession`` (proxies/postgres/session.py), as a mixin. It must not write
to the client or the target; it says what a statement is and what the policy decided."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from keyturn.analysis import StatementClass
from keyturn.analysis.postgres import (
    DEFAULT_SEARCH_PATH,
    Statement,
    search_path_schemas,
)
from keyturn.policy import Decision, Request
from proxies.postgres import codec
from proxies.postgres.register import target_of
from proxies.postgres.state import (
    _AMBIGUOUS,
    _FIRST_USER_OID,
    Ctx,
    Expect,
    Probe,
    SessionState,
    StmtInfo,
    _pkey,
    _runs_deferred_code,
    _runs_user_code,
)

if TYPE_CHECKING:
    from proxies.postgres.session import ClientSession

log = logging.getLogger(__name__)

#: Statements that change session settings (SET, RESET, set_config, PREPARE...).
_SETTING_CLASSES = frozenset({StatementClass.SESSION, StatementClass.SAFETY})
#: ... and DDL or riskier: objects the session made (temporary tables, which unqualified
#: names in stored code find first) count as its state too.
_DDL_RISK = StatementClass.DDL.risk


_DEFAULT_SCHEMAS = frozenset(DEFAULT_SEARCH_PATH)


class Decisions(SessionState):
    """ClientSession's decisions (mixin; methods run on the session's state)."""

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
        self.fast_guarded_stmts.pop(key.encode("utf-8", "surrogateescape"), None)
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
        self.fast_guarded_stmts.pop(key.encode("utf-8", "surrogateescape"), None)
        if latest and self.stmts.get(key) is _AMBIGUOUS:
            # An earlier change of the name in this batch failed, so this one was skipped
            # after it: what it held before this one (the failed change's statement) is
            # not what the server holds.
            return
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

    def _plain_builtins(self, statements: Sequence[Statement]) -> bool:
        """Whether the target's catalog shows nothing but the server's own code and plain
        tables in ``statements`` (no user function, operator, type, view, rule or
        trigger, and a catalog that was read): the gateway may then plan them itself."""
        resolved = self.gw.catalogs.resolve(cast("ClientSession", self), tuple(statements))
        # A referential action (ON DELETE CASCADE...) only adds the tables it writes: the
        # planner runs none of it. Anything else the catalog found (a function, a
        # finding, an unread catalog) changes the class, reasons or functions.
        return all(not st.opaque and (r is st or (
            r.cls is st.cls and r.reasons == st.reasons and r.functions == st.functions
            and not r.opaque)) for r, st in zip(resolved, statements, strict=True))

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
                self.fast_guarded_stmts.clear()
                self.guard_stmts.clear()  # DEALLOCATE ALL took the guard's too
            else:
                self.fast_stmts.pop(_pkey(name).encode("utf-8", "surrogateescape"), None)
                self.fast_guarded_stmts.pop(_pkey(name).encode("utf-8", "surrogateescape"),
                                            None)

    def _decide(self, analysis: Any) -> Decision:
        assert self.identity is not None and self.conn is not None
        statements = analysis.statements
        schemas = self.schemas | self.gw.catalogs.default_schemas(self.conn)
        if schemas != _DEFAULT_SCHEMAS:
            statements = tuple(self._resolve(st, schemas) for st in statements)
        # What runs on the target:
        session = cast("ClientSession", self)
        resolved = self.gw.catalogs.resolve(session, statements)
        if len(statements) > 1:
            resolved = self._after_user_code(session, statements, resolved)
        decision = self.gw.policy.evaluate(Request(self.user, self.identity.groups, self.conn,
                                                   resolved, analysis.error))
        if any(st.opaque for st in resolved):
            decision = dataclasses.replace(decision, opaque_code=True)
        if decision.action != "block" and decision.action != "review":
            # (A held one counts once approved: holding.py notes it as it runs.)
            self.gw.catalogs.note(session, statements)
        return decision

    def _after_user_code(self, session: ClientSession, statements: tuple[Statement, ...],
                         resolved: tuple[Statement, ...]) -> tuple[Statement, ...]:
        """Statements of one message that run after user code in it: that code may have
        changed search_path or the role before they run (the gateway reads them back
        only between messages, enforce.py _probe_search_path), so their functions and
        operators resolve as if any schema were searched, and an unqualified table
        cannot be resolved at all (unknown)."""
        pending = self.code_pending
        first = next((i for i, (st, r) in enumerate(zip(statements, resolved, strict=True))
                      if r.opaque or r.cls != st.cls or (pending and _runs_deferred_code((st,)))),
                     None)
        if first is None or first == len(statements) - 1:
            return resolved
        later = []
        for st in statements[first + 1:]:
            if st.unqualified:
                names = ", ".join(st.unqualified)
                st = dataclasses.replace(st, cls=StatementClass.UNKNOWN, reasons=(
                    f"user code earlier in the same message may change search_path, so "
                    f"{names} cannot be resolved (send it as a query of its own)",
                    *st.reasons))
            later.append(st)
        again = self.gw.catalogs.resolve(session, (*statements[:first + 1], *later),
                                         anywhere=True)
        return (*resolved[:first + 1], *again[first + 1:])

    def _note_search_path(self, statements: tuple[Statement, ...]) -> None:
        """Widen the schemas unqualified names may resolve in; forget memoised verdicts.
        Note settings changes and DDL (``settings_seen``)."""
        for st in statements:
            if st.cls in _SETTING_CLASSES or st.cls.risk >= _DDL_RISK:
                self.settings_seen = hashlib.sha256(
                    (self.settings_seen + "\0" + st.text).encode()).hexdigest()[:32]
            if st.search_path is None:
                continue
            wider = self.schemas | set(st.search_path)
            if wider != self.schemas:
                self.schemas = wider
                self.forget_verdicts()

    def _user_code_runs(self, portal: str | None = None) -> None:
        """A statement running user code is sent (or an approved one runs): it may change
        search_path (or the role, and with it "$user"), which the server does not report,
        so from now on functions, operators and types are judged as if any schema were
        searched (catalog.py), and nothing memoised before stands. It may also close
        portals and open others under their names (``portal``: the one it runs in)."""
        self.probe_due = self.code_pending = True
        self.guard_stmts.clear()  # (see session._forward)
        self._forget_portals(portal)
        if not self.ran_user_code:
            self.ran_user_code = True
            self.forget_verdicts()

    def _code_runs(self, analysis: Any, decision: Decision) -> bool:
        """Whether running this statement runs user code: its own (_runs_user_code), or
        code an earlier statement of the transaction set up (``code_pending``)."""
        return _runs_user_code(analysis, decision) or (
            self.code_pending and _runs_deferred_code(analysis.statements))

    def _probed(self, probe: Probe) -> None:
        """The target's search_path and current role, read after user code ran
        (enforce.py _probe_search_path): unqualified names may resolve in every schema
        it names from now on (the set only grows: what the code set may be rolled back
        or set again). A read that failed leaves the path unknown: unqualified tables
        are then judged as unknown. What waited for it goes on (``barrier_done``)."""
        self.probe_due = False
        self.barrier_done = True
        values = None if probe.failed else _data_row(b"".join(probe.rows))
        if values is None or len(values) != 2 or values[0] is None:
            log.warning("session %s: search_path could not be read after user code ran; "
                        "unqualified names count as unknown from now on", self.session_id)
            names = {"*"}
        else:
            path, role = values[0], values[1]
            names = {n for n in search_path_schemas(path) if n.strip('"') != "$user"}
            assert self.conn is not None
            if "$user" in path and role and role != (target_of(self.conn).user or self.user):
                # "$user" names the role in force, which code may have set. (For the role
                # the gateway logs in as it is left out, as in the path assumed at the
                # start: DEFAULT_SEARCH_PATH.)
                names.add(role)
        wider = self.schemas | names
        if wider != self.schemas:
            self.schemas = frozenset(wider)
            self.forget_verdicts()

    def forget_verdicts(self) -> None:
        """Judge every statement afresh: what a name means has changed (search_path, or
        the target's catalog; proxies/postgres/catalog.py)."""
        self.verdicts.clear()
        self.fast_verdicts.clear()
        self.guarded_verdicts.clear()
        self.fast_guarded.clear()
        self.fast_guarded_stmts.clear()
        self.fast_stmts.clear()
        self.fast_parses.clear()
        self.fast_guarded_parses.clear()
        for info in self.stmts.values():
            info.decision = None

    def _resolve(self, st: Statement, schemas: frozenset[str] | None = None) -> Statement:
        """The statement with each unqualified table in every schema the session's
        search_path may name, so a rule on ``secret.*`` sees ``SELECT * FROM t`` after
        ``SET search_path = secret``. An unreadable search_path makes it unknown."""
        if not st.unqualified:
            return st
        names = ", ".join(st.unqualified)
        schemas = self.schemas if schemas is None else schemas
        if "*" in schemas:
            return dataclasses.replace(st, cls=StatementClass.UNKNOWN, reasons=(
                f"the session set search_path to a value keyturn cannot read, so {names} "
                "cannot be resolved", *st.reasons))
        assert self.conn is not None
        role = target_of(self.conn).user or self.user
        # pg_catalog is searched first whatever the path says (unless the path names it
        # later): an unqualified pg_settings is the built-in one.
        names_in = sorted({"pg_catalog", *(role if s == "$user" else s for s in schemas)})
        extra = [f"{schema}.{name}" for name in st.unqualified for schema in names_in]
        return dataclasses.replace(
            st, tables=tuple(dict.fromkeys([*st.tables, *extra])),
            reasons=(*st.reasons, f"search_path may resolve {names} in schema(s) "
                                  f"{', '.join(names_in)}"))


def _data_row(data: bytes) -> list[str | None] | None:
    """The text values of the first DataRow in ``data`` (whole messages), or None."""
    p = 0
    while len(data) - p >= 5:
        n = int.from_bytes(data[p + 1:p + 5], "big")
        if n < 4:
            return None
        if data[p:p + 1] == b"D" and p + 1 + n <= len(data):
            body = data[p + 5:p + 1 + n]
            if len(body) < 2:
                return None
            count, q = int.from_bytes(body[:2], "big"), 2
            out: list[str | None] = []
            for _ in range(count):
                if len(body) - q < 4:
                    return None
                size = int.from_bytes(body[q:q + 4], "big", signed=True)
                q += 4
                if size < 0:
                    out.append(None)
                    continue
                if len(body) - q < size:
                    return None
                out.append(body[q:q + size].decode("utf-8", "replace"))
                q += size
            return out
        p += 1 + n
    return None
