"""Masking results on masked connections: planning each result's columns from the
statement's lineage and the target's catalog, rewriting rows, COPY data and notices.

Part of ``ClientSession`` (proxies/postgres/session.py), as a mixin; the row rewriting
itself is rowmask.py and the rules keyturn/masking. Unmasked sessions never reach it.

It must not let a value it cannot mask through: the result is refused instead.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any

from keyturn.policy import Decision
from proxies.postgres import codec, rowmask
from proxies.postgres.register import target_of
from proxies.postgres.state import _TEXT_OIDS, Ctx, Expect, SessionState, _splice

log = logging.getLogger(__name__)


_QUOTED = re.compile(r'"[^"]*"')


_FAILING_ROW = re.compile(r"(Failing row contains |Key )\(.*\)(?=[^()]*$)", re.S)


# SQLSTATE classes of errors whose texts quote what the client wrote, never a value of
# the data (feature not supported, transaction state, the server going away, prepared
# statement and cursor names, resources, cancels), and one code: permission denied. Every
# other error or notice of a statement that reads masked columns may print a value in any
# form (a date field out of range, an XML or JSON parser's context line, a function's
# RAISE), so its texts are withheld. Names are no exception: a value cast to regclass,
# regoper, regtype or regnamespace, or given to has_*_privilege, is looked up at run time
# and the "does not exist" error (42P01, 42883, 42704, 42601, 3F000, 3D000...) prints it.
_BEFORE_DATA = frozenset(("0A", "25", "08", "26", "34", "53", "57", "42501"))

_WITHHELD = ("keyturn: the error text was withheld because the statement reads masked "
             "columns and the text may show their values (SQLSTATE {code})")

_MASKABLE_BINARY = frozenset((25, 1043, 1042, 19, 114))


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


class ResultMasking(SessionState):
    """ClientSession's result masking (mixin; methods run on the session's state)."""

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
            extras = self.lineages.get(ctx.statement) if self.lineages else None
            traced = extras["lineage"] if extras is not None else None
            if isinstance(traced, str):  # the analysis worker could not trace it
                raise ValueError(traced)
            lineages, why, ctx.defines = self._follow(
                traced if traced is not None else trace(ctx.statement))
            why = why or check(lineages, sens, tables=decision.tables,
                               classes=[s.classification for s in decision.statements],
                               writes=reviewers is None)
        except Exception as exc:  # fail closed: what cannot be traced cannot be masked
            lineages, why = [], f"the statement cannot be traced for masking ({exc})"
        if why is None and any(lin.copy for lin in lineages):
            why = self._copy_plan(ctx, sens, lineages)
        if why is not None:
            self._defined(ctx, False)  # never sent: the names keep what they held
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

        extras = self.lineages.get(ctx.statement) if self.lineages else None
        if extras is not None:  # redacted by the analysis worker (a large text)
            shown, hidden = extras["redacted"]
            ctx.shown = self.detectors.redact(shown)[0] if self.detectors is not None \
                else shown
        else:
            if self._sensitive_name is None:
                self._sensitive_name = sensitive_names(self._sensitive_patterns())
            ctx.shown, hidden = redact_statement(ctx.statement, self._sensitive_name,
                                                 self.detectors)
        ctx.shown_params = redact_params(ctx.params, hidden, self.detectors)

    def _sensitive_patterns(self) -> list[str]:
        """The column globs the connection's masking names (its columns, its rules')."""
        assert self.conn is not None
        policy = self.gw.config.policies[self.conn.policy]
        patterns = [p for p, _ in self.conn.columns]
        return patterns + [c for r in policy.rules if r.mask for c in r.mask.columns]

    def _follow(self, lineages: list[Any]) -> tuple[list[Any], str | None, list[Any]]:
        """EXECUTE and FETCH return what PREPARE and DECLARE named: use that lineage.

        What this message prepares or declares is returned (kind, name, lineage, what the
        name held before) and kept
        only once the server accepted it (``_finished``): a DECLARE or PREPARE of a name
        that is taken fails and leaves the old cursor or statement in place. Until then
        the name is unknown (a FETCH or EXECUTE of it is refused), except later in the
        same message, which the server skips if the DECLARE failed. Portals bound and
        statements parsed through the protocol share these namespaces: they forget the
        name too (see the session's Bind and Parse)."""
        out = []
        defines: list[Any] = []
        here: dict[tuple[str, str], Any] = {}
        for lin in lineages:
            if lin.prepares is not None:
                prior = self.mask_prepared.pop(lin.prepares, None)
                here["p", lin.prepares] = lin
                defines.append(("p", lin.prepares, lin, prior))
            if lin.declares is not None:
                prior = self.mask_cursors.pop(lin.declares, None)
                here["c", lin.declares] = lin
                defines.append(("c", lin.declares, lin, prior))
            if lin.executes is not None or lin.fetches is not None:
                key = ("p", lin.executes) if lin.executes is not None else ("c", lin.fetches)
                known = here.get(key) or (self.mask_prepared if key[0] == "p"
                                          else self.mask_cursors).get(key[1])
                if known is None:
                    what = f"prepared statement {lin.executes!r}" if lin.executes is not None \
                        else f"cursor {lin.fetches!r}"
                    return [], f"{what} was not created through this masked session (or " \
                               "its creation has not completed), so its results cannot " \
                               "be followed", []
                lin = known
            out.append(lin)
        return out, None, defines

    def _defined(self, ctx: Ctx, ok: bool) -> None:
        """The statement completed (``ok``): the cursors and statements it created exist;
        or it failed: a cursor or statement the name held before is still there."""
        for kind, name, lin, prior in ctx.defines or ():
            names = self.mask_prepared if kind == "p" else self.mask_cursors
            if ok:
                names[name] = lin
            elif prior is not None:
                names.setdefault(name, prior)
        ctx.defines = None

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
                self.catalog = await self.gw.origins(conn)
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

    def _redact_notice(self, t: bytes, body: bytes, ctx: Ctx | None = None
                       ) -> bytes | None:
        """Error and notice texts quote values: a cast error quotes its input, a
        regclass or setting lookup quotes the name it was given, a constraint error
        shows the failing row. The detectors read them all; the failing row of a
        constraint error is always hidden on a masked connection; and when the statement
        reads masked columns, every quoted value is redacted, since a name or an address
        matches no detector, and an error that may come from reading data (any class
        but those raised before any row is read) or a notice keeps only its SQLSTATE:
        the server prints values unquoted too."""
        fields = codec.decode_error_fields(body)
        changed = False
        quoting = ctx is not None and ctx.sens is not None and \
            ctx.sens.first({src for lin in ctx.lineages or () for src in
                            lin.all_sources | lin.predicates | lin.writes}) is not None
        code = fields.get("C", "")
        if quoting and code[:2] not in _BEFORE_DATA and code not in _BEFORE_DATA:
            for key in ("D", "H", "W", "q", "p"):
                fields.pop(key, None)
            fields["M"] = _WITHHELD.format(code=code)
            payload = b"".join(k.encode() + v.encode() + b"\0" for k, v in fields.items())
            return codec.encode_message(t, payload + b"\0")
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

    def _mask_message(self, head: Expect, t: bytes, chunk: bytes,
                      start: int, end: int) -> bytes | None:
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
