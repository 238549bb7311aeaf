"""Where each output value of a SQL statement comes from (for masking).

RowDescription tells the gateway the source column of every output that is a
plain column, even through aliases, subqueries and CTEs, but nothing for an
expression (``upper(email)``, ``email || ''``, ``email::text``) or for set
operations. This module follows values through the parse tree instead:

* ``outputs``: for each output position of the statement's result, the set of
  source columns (``schema.table.column``) its value is computed from, through
  aliases, expressions, casts, CASE results, scalar subqueries, CTEs, derived
  tables and every branch of UNION / INTERSECT / EXCEPT. ``None`` when the
  positions cannot be aligned with the result (a ``*`` over a table), in which
  case ``expression_sources`` (everything any non-plain output reads) stands in.
* ``predicates``: columns that decide *which* rows or in what order (WHERE,
  JOIN, GROUP BY, HAVING, ORDER BY, DISTINCT ON, CASE conditions, window
  clauses), which can reveal a value by inference;
* ``whole_rows``: tables used as a whole-row value (``SELECT t FROM t``);
* ``calls``: every function call with the columns and whole rows in its
  arguments, so callers can refuse JSON/XML conversions, concatenating
  aggregates and hashes of sensitive values;
* ``writes``: source columns of values written by INSERT … SELECT / VALUES and
  UPDATE … SET (copying a sensitive value elsewhere).

Resolution is deliberately generous: an unqualified column that could belong
to several tables in scope counts as coming from each of them, so a masking
decision can only err towards masking. Unqualified tables are reported in
``public`` like the analyser does (the gateway widens them per session).

It must not do I/O or decide anything; it only says where columns come from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pglast import parser as _pg


@dataclass
class Output:
    name: str
    sources: set[str] = field(default_factory=set)
    plain: bool = False  # a bare column reference (RowDescription names its origin)


@dataclass
class Lineage:
    outputs: list[Output] | None = None
    expression_sources: set[str] = field(default_factory=set)
    predicates: set[str] = field(default_factory=set)
    whole_rows: set[str] = field(default_factory=set)
    calls: list[tuple[str, set[str], set[str]]] = field(default_factory=list)
    writes: set[str] = field(default_factory=set)
    tables: set[str] = field(default_factory=set)
    star_tables: set[str] = field(default_factory=set)
    unaligned: bool = False  # a table's * in the select list
    copy: bool = False  # COPY … TO: the rows leave as CopyData
    # SQL-level prepared statements and cursors: the session keeps the lineage of what
    # PREPARE / DECLARE named, and EXECUTE / FETCH take it from there.
    prepares: str | None = None
    declares: str | None = None
    executes: str | None = None
    fetches: str | None = None

    @property
    def all_sources(self) -> set[str]:
        out = set(self.expression_sources)
        for o in self.outputs or ():
            out |= o.sources
        return out


def _renamed(outs: list[Output], names: list[str | None]) -> list[Output]:
    """A derived table's or CTE's outputs under its column alias list. When a ``*`` whose
    columns are not known here is among them, positions cannot be matched to names: one
    output, under every given name, stands for all of their sources."""
    if not names:
        return outs
    if any(o.name == "*" for o in outs):
        every = set().union(*(o.sources for o in outs))
        return [Output(n, set(every), False) for n in names if n] + \
            [Output("*", set(every), False)]
    out = list(outs)
    for i, n in enumerate(names):
        if n and i < len(out):
            out[i] = Output(n, out[i].sources, out[i].plain)
    return out


class _Item:
    """One FROM item in scope: a table, or a derived table/CTE with known outputs."""

    __slots__ = ("table", "outputs", "sources")

    def __init__(self, table: str | None = None, outputs: list[Output] | None = None,
                 sources: set[str] | None = None):
        self.table = table
        self.outputs = outputs
        self.sources = sources or set()

    def column(self, name: str) -> set[str] | None:
        if self.table is not None:
            return {f"{self.table}.{name}"}
        if self.outputs is not None:
            hits = [o for o in self.outputs if o.name == name]
            if hits:
                return set().union(*(o.sources for o in hits))
            # A derived table or CTE that selected a table's *: the column is that table's.
            stars = [o for o in self.outputs if o.name == "*"]
            if stars:
                return {src[:-1] + name if src.endswith(".*") else src
                        for o in stars for src in o.sources}
            return None
        return set(self.sources)  # a function in FROM: its arguments

    def everything(self) -> set[str]:
        if self.table is not None:
            return {f"{self.table}.*"}
        if self.outputs is not None:
            return set().union(*(o.sources for o in self.outputs)) if self.outputs else set()
        return set(self.sources)


class _Scope:
    def __init__(self, parent: _Scope | None, ctes: dict[str, list[Output]]):
        self.parent = parent
        self.ctes = ctes
        self.items: dict[str, _Item] = {}


def _sval(node: Any) -> str | None:
    if isinstance(node, dict) and "String" in node:
        return node["String"].get("sval")
    return None


def _qualified(rv: dict[str, Any]) -> str:
    # The parser has already folded unquoted names to lower case and kept quoted ones.
    parts = [rv.get("catalogname"), rv.get("schemaname") or "public", rv.get("relname")]
    return ".".join(p for p in parts if p)


class _Tracer:
    def __init__(self) -> None:
        self.lin = Lineage()

    # ---- statements

    def statement(self, kind: str, body: dict[str, Any]) -> None:
        lin = self.lin
        if kind == "SelectStmt":
            lin.outputs = self.select(body, None, {})
            if body.get("intoClause"):
                # SELECT … INTO t creates a table holding these values.
                for o in lin.outputs:
                    lin.writes |= o.sources
                lin.writes |= lin.expression_sources
        elif kind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            self.write(kind, body)
        elif kind == "ExplainStmt":
            inner = body.get("query") or {}
            for k, v in inner.items():
                self.statement(k, v)
        elif kind == "DeclareCursorStmt":
            lin.declares = body.get("portalname") or ""
            inner = body.get("query") or {}
            for k, v in inner.items():
                self.statement(k, v)
        elif kind == "PrepareStmt":
            lin.prepares = body.get("name") or ""
            inner = body.get("query") or {}
            for k, v in inner.items():
                self.statement(k, v)
        elif kind == "ExecuteStmt":
            lin.executes = body.get("name") or ""
        elif kind == "FetchStmt" and not body.get("ismove"):
            lin.fetches = body.get("portalname") or ""
        elif kind == "CopyStmt" and body.get("query"):
            lin.copy = True
            for k, v in body["query"].items():
                self.statement(k, v)
        elif kind == "CopyStmt" and body.get("relation"):
            lin.copy = not body.get("is_from")
            t = _qualified(body["relation"])
            lin.tables.add(t)
            lin.star_tables.add(t)
            lin.expression_sources.add(f"{t}.*")
        elif kind == "CreateTableAsStmt":
            inner = body.get("query") or {}
            for k, v in inner.items():
                self.statement(k, v)
            if lin.outputs is not None:
                for o in lin.outputs:
                    lin.writes |= o.sources

    def write(self, kind: str, body: dict[str, Any]) -> None:
        lin = self.lin
        ctes = self.with_clause(body.get("withClause"), None, {})
        scope = _Scope(None, ctes)
        rel = body.get("relation")
        if rel:
            t = _qualified(rel)
            lin.tables.add(t)
            alias = (rel.get("alias") or {}).get("aliasname") or rel.get("relname")
            scope.items[alias] = _Item(table=t)
        for item in body.get("fromClause") or body.get("usingClause") or ():
            self.from_item(item, scope)
        if kind == "InsertStmt":
            sel = body.get("selectStmt")
            if sel:
                outs = self.select(sel.get("SelectStmt") or {}, None, ctes)
                for o in outs:
                    lin.writes |= o.sources
        elif kind == "UpdateStmt":
            for target in body.get("targetList") or ():
                rt = target.get("ResTarget") or {}
                lin.writes |= self.expr(rt.get("val"), scope)
        elif kind == "MergeStmt":
            src = body.get("sourceRelation")
            if src:
                self.from_item(src, scope)
            lin.predicates |= self.expr(body.get("joinCondition"), scope)
            for clause in body.get("mergeWhenClauses") or ():
                mc = clause.get("MergeWhenClause") or {}
                lin.predicates |= self.expr(mc.get("condition"), scope)
                for target in mc.get("targetList") or ():
                    lin.writes |= self.expr((target.get("ResTarget") or {}).get("val"), scope)
                for v in mc.get("values") or ():
                    lin.writes |= self.expr(v, scope)
        lin.predicates |= self.expr(body.get("whereClause"), scope)
        returning = body.get("returningList") or (body.get("returningClause") or {}).get("exprs")
        if returning:
            lin.outputs = self.targets(returning, scope)

    # ---- SELECT

    def with_clause(self, wc: Any, parent: _Scope | None,
                    ctes: dict[str, list[Output]]) -> dict[str, list[Output]]:
        ctes = dict(ctes)
        for cte in (wc or {}).get("ctes") or ():
            c = cte.get("CommonTableExpr") or {}
            name = c.get("ctename") or ""
            query = c.get("ctequery") or {}
            outs: list[Output] = []
            for k, v in query.items():
                if k == "SelectStmt":
                    if v.get("op", "SETOP_NONE") != "SETOP_NONE" and (wc or {}).get("recursive"):
                        # Recursive CTE: the non-recursive term first, then the whole union
                        # with the CTE's own outputs known.
                        ctes[name] = self.select(v.get("larg") or {}, parent, ctes)
                    outs = self.select(v, parent, ctes)
                else:  # data-modifying CTE: its RETURNING
                    saved = self.lin.outputs
                    self.statement(k, v)
                    outs = self.lin.outputs or []
                    self.lin.outputs = saved
            names = [_sval(n) for n in c.get("aliascolnames") or ()]
            outs = _renamed(outs, names)
            ctes[name] = outs
        return ctes

    def select(self, body: dict[str, Any], parent: _Scope | None,
               ctes: dict[str, list[Output]]) -> list[Output]:
        ctes = self.with_clause(body.get("withClause"), parent, ctes)
        op = body.get("op", "SETOP_NONE")
        if op != "SETOP_NONE":
            left = self.select(body.get("larg") or {}, parent, ctes)
            right = self.select(body.get("rarg") or {}, parent, ctes)
            outs = [Output(o.name, set(o.sources), False) for o in left]
            for i, o in enumerate(right):
                if i < len(outs):
                    outs[i].sources |= o.sources
            self.order(body, _Scope(parent, ctes), outs)
            return outs
        if body.get("valuesLists"):
            scope = _Scope(parent, ctes)
            rows = [(v.get("List") or {}).get("items") or () for v in body["valuesLists"]]
            width = max((len(r) for r in rows), default=0)
            outs = [Output(f"column{i + 1}") for i in range(width)]
            for r in rows:
                for i, e in enumerate(r):
                    outs[i].sources |= self.expr(e, scope)
            return outs
        scope = _Scope(parent, ctes)
        for item in body.get("fromClause") or ():
            self.from_item(item, scope)
        outs = self.targets(body.get("targetList") or (), scope)
        lin = self.lin
        lin.predicates |= self.expr(body.get("whereClause"), scope)
        lin.predicates |= self.expr(body.get("havingClause"), scope)
        for g in body.get("groupClause") or ():
            lin.predicates |= self.positional(g, scope, outs)
        for d in body.get("distinctClause") or ():
            if d:
                lin.predicates |= self.positional(d, scope, outs)
        for w in body.get("windowClause") or ():
            lin.predicates |= self.expr(w, scope)
        self.order(body, scope, outs)
        return outs

    def order(self, body: dict[str, Any], scope: _Scope, outs: list[Output]) -> None:
        for s in body.get("sortClause") or ():
            node = (s.get("SortBy") or {}).get("node")
            self.lin.predicates |= self.positional(node, scope, outs)

    def positional(self, node: Any, scope: _Scope, outs: list[Output]) -> set[str]:
        """ORDER BY 2 / GROUP BY 1 name an output; ORDER BY alias names one too."""
        if isinstance(node, dict) and "SortBy" in node:
            node = node["SortBy"].get("node")
        if isinstance(node, dict) and "A_Const" in node:
            n = (node["A_Const"].get("ival") or {}).get("ival")
            if isinstance(n, int) and 0 < n <= len(outs):
                return set(outs[n - 1].sources)
            return set()
        if isinstance(node, dict) and "ColumnRef" in node:
            fields = node["ColumnRef"].get("fields") or []
            if len(fields) == 1:
                name = _sval(fields[0])
                hits = [o for o in outs if o.name == name]
                if hits:
                    return set().union(*(o.sources for o in hits)) | self.expr(node, scope)
        return self.expr(node, scope)

    def targets(self, target_list: Any, scope: _Scope) -> list[Output]:
        outs: list[Output] = []
        for target in target_list:
            rt = target.get("ResTarget") or {}
            val = rt.get("val")
            if isinstance(val, dict) and "ColumnRef" in val:
                fields = val["ColumnRef"].get("fields") or []
                if fields and isinstance(fields[-1], dict) and "A_Star" in fields[-1]:
                    expanded = self.star(fields[:-1], scope)
                    if expanded is None:
                        # A table's columns: positions cannot be aligned statically.
                        self.lin.unaligned = True
                        outs.append(Output("*", self.star_sources(fields[:-1], scope), True))
                    else:
                        outs.extend(expanded)
                    continue
                name = rt.get("name") or _sval(fields[-1]) or "?column?"
                outs.append(Output(name, self.expr(val, scope), True))
                continue
            srcs = self.expr(val, scope)
            self.lin.expression_sources |= srcs
            outs.append(Output(rt.get("name") or _output_name(val), srcs, False))
        if len(outs) > MAX_COLUMNS:
            raise TooWide(f"the select list has more than {MAX_COLUMNS} columns, more than "
                          "the server allows in a result")
        return outs

    def star(self, qual: list[Any], scope: _Scope) -> list[Output] | None:
        items = self.items_for(qual, scope)
        out: list[Output] = []
        for item in items:
            if item.outputs is None:
                if item.table is not None:
                    self.lin.star_tables.add(item.table)
                return None
            if len(out) + len(item.outputs) > MAX_COLUMNS:
                raise TooWide(f"* expands to more than {MAX_COLUMNS} columns, more than the "
                              "server allows in a result")
            out.extend(Output(o.name, set(o.sources), o.plain) for o in item.outputs)
        return out

    def star_sources(self, qual: list[Any], scope: _Scope) -> set[str]:
        return set().union(*(i.everything() for i in self.items_for(qual, scope))) \
            if self.items_for(qual, scope) else set()

    def items_for(self, qual: list[Any], scope: _Scope) -> list[_Item]:
        if not qual:
            return list(scope.items.values())
        name = _sval(qual[-1])
        s: _Scope | None = scope
        while s is not None:
            if name in s.items:
                return [s.items[name]]
            s = s.parent
        return []

    # ---- FROM

    def from_item(self, node: Any, scope: _Scope) -> None:
        if not isinstance(node, dict):
            return
        ((kind, body),) = node.items()
        if kind == "RangeVar":
            name = body.get("relname")
            alias = (body.get("alias") or {}).get("aliasname") or name
            if not body.get("schemaname") and name in scope.ctes:
                scope.items[alias] = _Item(outputs=scope.ctes[name])
                return
            s = scope.parent
            while s is not None and not body.get("schemaname"):
                if name in s.ctes:
                    scope.items[alias] = _Item(outputs=s.ctes[name])
                    return
                s = s.parent
            t = _qualified(body)
            self.lin.tables.add(t)
            scope.items[alias] = _Item(table=t)
            # A column alias list renames the table's columns: only the whole is known.
            if (body.get("alias") or {}).get("colnames"):
                scope.items[alias] = _Item(sources={f"{t}.*"})
        elif kind == "RangeSubselect":
            sub = (body.get("subquery") or {}).get("SelectStmt") or {}
            parent = scope if body.get("lateral") else scope.parent
            outs = self.select(sub, parent, scope.ctes)
            alias = (body.get("alias") or {}).get("aliasname") or f"?sub{len(scope.items)}"
            names = [_sval(n) for n in (body.get("alias") or {}).get("colnames") or ()]
            if names and any(o.name == "*" for o in outs):
                # A * whose columns are not known here, renamed by position: which new name
                # is which column cannot be told, so every name stands for all of them.
                scope.items[alias] = _Item(
                    sources=set().union(*(o.sources for o in outs)) if outs else set())
            else:
                scope.items[alias] = _Item(outputs=_renamed(outs, names))
        elif kind == "JoinExpr":
            self.from_item(body.get("larg"), scope)
            self.from_item(body.get("rarg"), scope)
            self.lin.predicates |= self.expr(body.get("quals"), scope)
            for u in body.get("usingClause") or ():
                col = _sval(u)
                if col:
                    self.lin.predicates |= self.column([u], scope)
            alias = (body.get("alias") or {}).get("aliasname")
            if alias:
                inner = set().union(*(i.everything() for i in scope.items.values()))
                scope.items[alias] = _Item(sources=inner)
        elif kind == "RangeFunction":
            srcs: set[str] = set()
            for f in body.get("functions") or ():
                for part in (f.get("List") or {}).get("items") or ():
                    srcs |= self.expr(part, scope)
            alias = (body.get("alias") or {}).get("aliasname") or f"?func{len(scope.items)}"
            scope.items[alias] = _Item(sources=srcs)
        else:
            if kind == "RangeTableSample":
                # people TABLESAMPLE SYSTEM (n): the sampled relation is in scope as itself.
                self.lin.predicates |= self.expr(body.get("args"), scope)
                self.lin.predicates |= self.expr(body.get("repeatable"), scope)
                self.from_item(body.get("relation"), scope)
                return
            # Anything else: every relation inside it is read; its columns are unknown.
            srcs = self.expr(body, scope) | {f"{t}.*" for t in _relations(body)}
            self.lin.tables |= {t for t in _relations(body)}
            scope.items[f"?{kind}{len(scope.items)}"] = _Item(sources=srcs)

    # ---- expressions

    def column(self, fields: list[Any], scope: _Scope) -> set[str]:
        names = [_sval(f) for f in fields]
        if any(n is None for n in names):
            return set()
        if len(names) >= 3:
            return {".".join(names[-3:])}  # type: ignore[arg-type]
        s: _Scope | None = scope
        while s is not None:
            if len(names) == 2:
                item = s.items.get(names[0])  # type: ignore[arg-type]
                if item is not None:
                    return item.column(names[1]) or set()  # type: ignore[arg-type]
            else:
                name = names[0]
                found: set[str] = set()
                hit = False
                for alias, item in s.items.items():
                    if alias == name and item.table is not None:
                        # Could be a whole-row reference to the table itself.
                        self.lin.whole_rows.add(item.table)
                        found |= item.everything()
                        hit = True
                    col = item.column(name)  # type: ignore[arg-type]
                    if col:
                        found |= col
                        hit = True
                if hit:
                    return found
            s = s.parent
        if len(names) == 2:
            # table.column with the table not in scope: a schema-less reference.
            return {f"public.{names[0]}.{names[1]}"}
        return set()

    def expr(self, node: Any, scope: _Scope) -> set[str]:
        out: set[str] = set()
        self._expr(node, scope, out)
        return out

    def _expr(self, node: Any, scope: _Scope, out: set[str]) -> None:
        if isinstance(node, list):
            for n in node:
                self._expr(n, scope, out)
            return
        if not isinstance(node, dict):
            return
        for kind, body in node.items():
            if kind == "ColumnRef":
                fields = body.get("fields") or ()
                if fields and isinstance(fields[-1], dict) and "A_Star" in fields[-1]:
                    items = self.items_for(list(fields[:-1]), scope)
                    for item in items:
                        if item.table is not None:
                            self.lin.whole_rows.add(item.table)
                        out |= item.everything()
                else:
                    out |= self.column(list(fields), scope)
            elif kind == "SubLink":
                sub = (body.get("subselect") or {}).get("SelectStmt") or {}
                outs = self.select(sub, scope, scope.ctes)
                for o in outs:
                    out |= o.sources
                # x IN (SELECT …): the test is a predicate on both sides.
                if body.get("testexpr") is not None:
                    test = self.expr(body.get("testexpr"), scope)
                    self.lin.predicates |= test | set().union(*(o.sources for o in outs)) \
                        if outs else test
                    out |= test
            elif kind == "FuncCall":
                fname = ".".join(n for n in (_sval(x) for x in body.get("funcname") or ())
                                 if n).lower()
                before = set(self.lin.whole_rows)
                args: set[str] = set()
                self._expr(body.get("args"), scope, args)
                self._expr(body.get("agg_order"), scope, args)
                filt = self.expr(body.get("agg_filter"), scope)
                self.lin.predicates |= filt
                over = body.get("over")
                if over:
                    self.lin.predicates |= self.expr(over, scope)
                whole = self.lin.whole_rows - before
                self.lin.calls.append((fname, args, whole | (args & _whole(args))))
                out |= args
            elif kind == "CaseExpr":
                self._expr(body.get("arg"), scope, out)
                for when in body.get("args") or ():
                    w = when.get("CaseWhen") or {}
                    cond = self.expr(w.get("expr"), scope)
                    self.lin.predicates |= cond | self.expr(body.get("arg"), scope)
                    self._expr(w.get("result"), scope, out)
                self._expr(body.get("defresult"), scope, out)
            elif kind in ("A_Const", "ParamRef"):
                continue
            elif isinstance(body, (dict, list)):
                self._expr(body, scope, out)


def _relations(node: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(node, list):
        for n in node:
            out |= _relations(n)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k == "RangeVar" and isinstance(v, dict):
                out.add(_qualified(v))
            else:
                out |= _relations(v)
    return out


def _whole(srcs: set[str]) -> set[str]:
    return {s[:-2] for s in srcs if s.endswith(".*")}


def _output_name(val: Any) -> str:
    if isinstance(val, dict):
        if "FuncCall" in val:
            names = [_sval(n) for n in val["FuncCall"].get("funcname") or ()]
            return (names[-1] if names and names[-1] else "?column?")
        if "TypeCast" in val:
            return _output_name(val["TypeCast"].get("arg"))
    return "?column?"


#: PostgreSQL's limit on a result's columns (MaxTupleAttributeNumber): a select list
#: longer than this fails on the server, so tracing stops there instead of expanding
#: ``*`` over self-joins into millions of outputs (time and memory on the event loop).
MAX_COLUMNS = 1664


class TooWide(ValueError):
    """A select list wider than any the server runs: nothing to trace."""


def trace(sql: str) -> list[Lineage]:
    """The lineage of each statement in ``sql`` (raises pglast's ParseError)."""
    tree = json.loads(_pg.parse_sql_json(sql))
    out = []
    for raw in tree.get("stmts") or ():
        ((kind, body),) = raw["stmt"].items()
        t = _Tracer()
        t.statement(kind, body)
        if t.lin.unaligned:
            t.lin.expression_sources |= t.lin.all_sources
            t.lin.outputs = None
        out.append(t.lin)
    return out
