"""Which values a masking decision hides, how, and what it refuses.

``Sensitivity`` answers, for one user on one connection under the masking
rules that decided a statement, whether a source column is sensitive and with
which style (tags come from the connection's ``columns``; rules name columns
and tags by glob; per-group styles and exemptions apply).

``check`` looks at a statement's lineage (keyturn.analysis.lineage) before it
runs and returns the reason to refuse it, if any: whole-row / JSON / XML
conversions of sensitive tables, functions that run SQL given as text,
concatenating aggregates and hashes of sensitive values, sensitive columns in
predicates, statistics catalogs, procedural code, and writes that copy
sensitive values elsewhere. Each family can be lifted per rule (``allow``).

``output_plan`` decides, once the result's RowDescription is known, which
output fields to mask: by the field's source column when PostgreSQL names one,
and by lineage for expressions.

This module must not import protocol or web code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from keyturn.analysis.lineage import Lineage
from keyturn.config import Connection, MaskSettings

JSON_XML = frozenset({
    "row_to_json", "to_json", "to_jsonb", "json_agg", "jsonb_agg", "json_object_agg",
    "jsonb_object_agg", "json_build_object", "jsonb_build_object", "json_build_array",
    "jsonb_build_array", "array_to_json", "json_object", "jsonb_object", "json_strip_nulls",
    "jsonb_strip_nulls", "jsonb_pretty", "table_to_xml", "query_to_xml", "cursor_to_xml",
    "table_to_xml_and_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xmlschema",
    "xmlforest", "xmlelement", "xmlagg", "xmlconcat", "hstore", "row", "record_out",
    "to_tsvector", "jsonb_to_record", "json_populate_record", "jsonb_populate_record",
})
# Functions that run SQL given as text, or read tables by name, out of the analyser's sight.
RUNS_SQL = re.compile(r"(^|_)query(_|$)|cursor|(^|_)exec|eval|^dblink|^table_to_xml|"
                      r"^schema_to_xml|^database_to_xml")
CONCATENATING = frozenset({
    "string_agg", "array_agg", "json_agg", "jsonb_agg", "xmlagg", "json_object_agg",
    "jsonb_object_agg", "listagg", "group_concat",
})
HASHES = frozenset({
    "md5", "sha224", "sha256", "sha384", "sha512", "digest", "hmac", "hashtext",
    "hashtextextended", "crc32", "crc32c", "hash_record", "hash_array",
})
# Functions that put a value where the masking cannot follow it: session settings (reported
# back in ParameterStatus, read with current_setting/SHOW), notifications, large objects.
SINKS = frozenset({
    "set_config", "pg_notify", "lo_from_bytea", "lo_put", "lowrite", "pg_advisory_lock",
    "pg_advisory_xact_lock", "pg_try_advisory_lock", "pg_try_advisory_xact_lock",
    "pg_advisory_lock_shared", "pg_try_advisory_lock_shared", "txid_current_if_assigned",
})
STATISTICS = frozenset({
    "pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic", "pg_statistic_ext",
    "pg_statistic_ext_data", "pg_stat_statements",
})


@dataclass
class MaskCatalog:
    """What the gateway knows of a target database's columns (read once, then cached):
    RowDescription origins, columns whose values come from other columns (views,
    inheritance children, partitions) and each table's columns in order."""

    origins: dict[tuple[int, int], str]
    derived: dict[str, set[str]]
    columns: dict[str, list[str]]


def derived_columns(views: Sequence[tuple[str, str]], parents: Sequence[tuple[str, str]],
                    columns: dict[str, list[str]]) -> dict[str, set[str]]:
    """``schema.view.column`` -> its sources, from each view's definition (positions of
    its select list, as stored with ``*`` expanded); ``schema.child.column`` -> the
    parent's column of that name. A view whose definition cannot be traced derives
    every column from everything it reads."""
    from keyturn.analysis.lineage import trace

    out: dict[str, set[str]] = {}
    for view, definition in views:
        cols = columns.get(view, [])
        try:
            (lin,) = trace(definition)
        except Exception:
            lin = None
        if lin is not None and lin.outputs is not None and len(lin.outputs) == len(cols):
            for col, o in zip(cols, lin.outputs, strict=True):
                out[f"{view}.{col}"] = set(o.sources)
        else:
            every = lin.all_sources | {f"{t}.*" for t in lin.star_tables} if lin else set()
            for col in cols:
                out[f"{view}.{col}"] = set(every) or {f"{view}.*"}
    for child, parent in parents:
        for col in columns.get(child, []):
            out.setdefault(f"{child}.{col}", set()).add(f"{parent}.{col}")
    return out


@dataclass(frozen=True)
class ColumnMask:
    column: str
    style: str
    rule: str
    why: str


class Sensitivity:
    """Sensitive columns for one user and one set of deciding masking rules."""

    def __init__(self, connection: Connection, masks: Sequence[tuple[str, MaskSettings]],
                 groups: Sequence[str], derived: dict[str, set[str]] | None = None,
                 schemas: Sequence[str] = ()):
        self.connection = connection
        self.masks = tuple(masks)
        self.groups = set(groups)
        self.derived = derived or {}
        # Schemas besides public that the session's search_path may name: lineage reports
        # an unqualified table in public, so its columns are checked in each of them too.
        self.schemas = tuple(s for s in schemas if s != "public")
        self._memo: dict[str, ColumnMask | None] = {}

    @property
    def active(self) -> bool:
        return bool(self.masks)

    def allows(self, refusal: str) -> bool:
        """True when every deciding masking rule lifts this refusal."""
        return bool(self.masks) and all(refusal in m.allow for _, m in self.masks)

    def tags_of(self, column: str) -> list[str]:
        return [t for pat, tags in self.connection.columns if fnmatchcase(column, pat)
                for t in tags]

    def column(self, column: str) -> ColumnMask | None:
        """The mask for a ``schema.table.column`` source (``schema.table.*`` = any of its
        columns), or None when it is not sensitive for this user."""
        if column in self._memo:
            return self._memo[column]
        self._memo[column] = None  # a view defined on itself cannot loop us
        hit = None
        for rule, m in self.masks:
            hit = self._column(column, rule, m)
            if hit is not None:
                break
        if hit is None:
            # A view's, child table's or partition's column carries its sources' values.
            sources = self.derived.get(column)
            if column.endswith(".*"):
                prefix = column[:-1]
                sources = {s for c, srcs in self.derived.items() if c.startswith(prefix)
                           for s in srcs}
            if sources:
                inner = self.first(sources)
                if inner is not None:
                    hit = ColumnMask(column, inner.style, inner.rule,
                                     f"{inner.why}, through {column}")
        if hit is None and self.schemas and column.startswith("public."):
            rest = column[len("public."):]
            for schema in self.schemas:
                inner = self.column(f"{schema}.{rest}")
                if inner is not None:
                    hit = ColumnMask(column, inner.style, inner.rule,
                                     f"{inner.why}, as search_path may resolve "
                                     f"{rest.rsplit('.', 1)[0]} in schema {schema}")
                    break
        self._memo[column] = hit
        return hit

    def _column(self, column: str, rule: str, m: MaskSettings) -> ColumnMask | None:
        wildcard = column.endswith(".*")
        table = column[:-2] if wildcard else None
        why = None
        matched: str | None = None
        for pat in m.columns:
            if fnmatchcase(column, pat) or (wildcard and fnmatchcase(table or "", _table_of(pat))):
                why, matched = f"column {pat}", pat
                break
        if why is None:
            tags = self.tags_of(column) if not wildcard else [
                t for pat, tags in self.connection.columns
                if fnmatchcase(table or "", _table_of(pat)) for t in tags]
            for tag in tags:
                if any(fnmatchcase(tag, tp) for tp in m.tags):
                    why, matched = f"tag {tag}", tag
                    break
        if why is None:
            return None
        style = m.style
        for pat, st in m.styles:
            if matched is not None and (fnmatchcase(matched, pat) or fnmatchcase(column, pat)):
                style = st
                break
        for group, st in m.groups:
            if group in self.groups:
                if st == "exempt":
                    return None
                style = st
                break
        return ColumnMask(column, style, rule, f"{why} (rule {rule})")

    def first(self, sources: set[str]) -> ColumnMask | None:
        for src in sorted(sources):
            hit = self.column(src)
            if hit is not None:
                return hit
        return None

    def table_sensitive(self, table: str) -> bool:
        return self.column(f"{table}.*") is not None


def _builtin(fname: str) -> bool:
    from keyturn.analysis.postgres import _BUILTIN_NAMES

    schema, _, base = fname.rpartition(".")
    return schema in ("", "pg_catalog") and base in _BUILTIN_NAMES


def _table_of(pattern: str) -> str:
    return pattern.rsplit(".", 1)[0]


def check(lineages: Sequence[Lineage], sens: Sensitivity, *, classes: Sequence[str] = (),
          tables: Sequence[str] = (), writes: bool = True) -> str | None:
    """The reason to refuse a statement on a masked connection, or None. ``writes``:
    also refuse writes that copy masked values (see ``copied`` for sending them to
    review instead)."""
    if not sens.active:
        return None
    if "procedural" in classes and not sens.allows("procedural"):
        return "procedural code cannot be followed by masking (mask.allow: procedural)"
    if not sens.allows("catalog"):
        for t in tables:
            if t.rsplit(".", 1)[-1] in STATISTICS:
                return f"{t} exposes sampled column values on a masked connection " \
                       "(mask.allow: catalog)"
    for lin in lineages:
        for fname, args, whole in lin.calls:
            base = fname.rsplit(".", 1)[-1]
            if not sens.allows("procedural") and not _builtin(fname):
                return f"{fname}() is not a PostgreSQL built-in: its body may return masked " \
                       "columns out of the gateway's sight (mask.allow: procedural)"
            if base in SINKS:
                hit = sens.first(args)
                if hit is not None:
                    return f"{base}() would carry masked column {hit.column} ({hit.why}) out " \
                           "of the result, where it cannot be masked"
            if RUNS_SQL.search(base):
                return f"{base}() runs SQL or reads a table out of the gateway's sight on a " \
                       "masked connection"
            if base in JSON_XML and not sens.allows("whole_row"):
                hit = sens.first(args) or next(
                    (sens.column(f"{t}.*") for t in whole if sens.table_sensitive(t)), None)
                if hit is not None:
                    return f"{base}() would convert masked column {hit.column} ({hit.why}) " \
                           "to JSON/XML (mask.allow: whole_row)"
            if (base in CONCATENATING or base in HASHES) and not sens.allows("aggregates"):
                hit = sens.first(args)
                if hit is not None:
                    kind = "aggregates" if base in CONCATENATING else "hashes"
                    return f"{base}() {kind} masked column {hit.column} ({hit.why}) " \
                           "(mask.allow: aggregates)"
        if not sens.allows("whole_row"):
            for t in sorted(lin.whole_rows):
                if sens.table_sensitive(t):
                    hit = sens.column(f"{t}.*")
                    return f"a whole-row value of {t} would carry masked columns " \
                           f"({hit.why if hit else ''}) (mask.allow: whole_row)"
        if not sens.allows("predicates"):
            hit = sens.first(lin.predicates)
            if hit is not None:
                return f"masked column {hit.column} ({hit.why}) is used in a condition or " \
                       "ordering, which could reveal it (mask.allow: predicates)"
        hit = sens.first(lin.writes) if writes else None
        if hit is not None:
            return f"the statement copies masked column {hit.column} ({hit.why}) into " \
                   "another place"
    return None


def copied(lineages: Sequence[Lineage], sens: Sensitivity) -> ColumnMask | None:
    """The masked column a write would copy into another place, if any."""
    for lin in lineages:
        hit = sens.first(lin.writes)
        if hit is not None:
            return hit
    return None


@dataclass
class FieldPlan:
    index: int
    mask: ColumnMask
    type_oid: int
    binary: bool


def output_plan(fields: Sequence[tuple[str, int, int, int, int]], lineages: Sequence[Lineage],
                sens: Sensitivity, origins: dict[tuple[int, int], str]) -> list[FieldPlan]:
    """Which fields of a RowDescription to mask: ``fields`` = (name, table_oid, attnum,
    type_oid, format) per field; ``origins`` maps (table_oid, attnum) to a column."""
    if not sens.active:
        return []
    aligned: list[set[str]] | None = None
    plain: list[bool] = []
    if len(lineages) == 1 and lineages[0].outputs is not None \
            and len(lineages[0].outputs) == len(fields):
        aligned = [o.sources for o in lineages[0].outputs]
        plain = [o.plain for o in lineages[0].outputs]
    loose: set[str] = set()
    for lin in lineages:
        loose |= lin.all_sources
    plan = []
    for i, (_name, table_oid, attnum, type_oid, fmt) in enumerate(fields):
        hit = None
        origin = origins.get((table_oid, attnum)) if table_oid else None
        if origin is not None:
            hit = sens.column(origin)
        elif table_oid:
            # A table the gateway has not seen (created since it read the catalog): its
            # columns may carry anything.
            any_hit = sens.first(loose) or sens.first(
                {f"{t}.*" for lin in lineages for t in lin.tables})
            if any_hit is not None or loose:
                hit = ColumnMask(f"oid {table_oid}.{attnum}", "full", any_hit.rule if any_hit
                                 else sens.masks[0][0], "a column of a table created after "
                                 "the gateway read the catalog")
        if hit is None:
            if aligned is not None:
                hit = sens.first(aligned[i])
                if hit is not None and not plain[i]:
                    hit = _expression_style(hit)
            elif not table_oid:
                # Cannot tell which source feeds this field: mask it if anything could.
                hit = sens.first(loose)
                if hit is not None:
                    hit = _expression_style(hit)
        if hit is not None:
            plan.append(FieldPlan(i, hit, type_oid, fmt == 1))
    return plan


def _expression_style(hit: ColumnMask) -> ColumnMask:
    """A value computed from a masked column gets the full style: a partial or email shape
    of ``'x' || substr(ssn, 1, 4)`` would show the very characters it hides."""
    if hit.style.startswith(("partial", "email")):
        return ColumnMask(hit.column, "full", hit.rule, f"{hit.why}; computed value")
    return hit


def describe(plan: Sequence[FieldPlan], fields: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
    """For the audit record and ``policy explain``: output column -> why it is masked."""
    return {str(fields[p.index][0]): {"source": p.mask.column, "style": p.mask.style,
                                      "why": p.mask.why} for p in plan}


def explain(sql: str, masks: Sequence[tuple[str, MaskSettings]], connection: Connection,
            groups: Sequence[str], *, tables: Sequence[str] = (),
            classes: Sequence[str] = ()) -> dict[str, Any]:
    """What ``policy explain`` shows about masking: the refusal, if any, and for each
    output column its sources and whether (and why) it will be masked. Without the
    target's catalog a ``*`` over a table is reported as such: its columns are masked by
    their origin at run time."""
    from keyturn.analysis.lineage import trace

    sens = Sensitivity(connection, masks, groups)
    try:
        lineages = trace(sql)
    except Exception as exc:
        return {"refused": f"the statement cannot be traced for masking ({exc})",
                "outputs": []}
    out: dict[str, Any] = {"refused": check(lineages, sens, tables=tables, classes=classes)}
    outputs: list[dict[str, Any]] = []
    for lin in lineages:
        if lin.outputs is None:
            for t in sorted(lin.star_tables):
                hit = sens.column(f"{t}.*")
                outputs.append({"name": f"{t}.*", "sources": [f"{t}.*"], "masked": None if hit
                                is None else {"style": "per column", "why": f"columns of {t} "
                                              "matching the masking rules, by origin"}})
            if lin.expression_sources:
                hit = sens.first(lin.expression_sources)
                outputs.append({"name": "(expressions)", "sources": sorted(
                    lin.expression_sources), "masked": None if hit is None else {
                    "style": hit.style, "why": hit.why}})
            continue
        for o in lin.outputs:
            hit = sens.first(o.sources)
            outputs.append({"name": o.name, "sources": sorted(o.sources),
                            "masked": None if hit is None else {"style": hit.style,
                                                                "why": hit.why}})
    out["outputs"] = outputs
    return out
