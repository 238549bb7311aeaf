"""Judge a classified statement by what really runs on the target: user functions,
operators, casts, views, rules, triggers and defaults found in its catalog.

The analyser (postgres.py) classifies by name and records every name whose meaning
depends on the catalog (``Statement.refs``); ``resolve`` looks those names and the
statement's relations up in a ``TargetCatalog`` (pgcatalog.py) and returns the statement
with its class raised, the user functions that may run added to ``functions``, the base
tables of views added to ``tables``, and a reason for each.  Matching is by name: a user
function called ``upper`` in a schema the session may search makes every ``upper(...)``
call a possible user function, whatever its arguments (overloading).

It only ever raises a class, never lowers one, and fails closed: without a catalog every
name that is not qualified into pg_catalog may be user code.  It must not do I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keyturn.analysis.pgcatalog import ANY, Relation, Routine, TargetCatalog
from keyturn.analysis.postgres import Analyzer, Statement, StatementClass, riskiest

C = StatementClass
#: Views within views within views...: deeper than this is judged unknown.
MAX_DEPTH = 16
_NOTHING: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Scope:
    """What one session adds to the catalog: the schemas its search_path may name, the
    objects it created or changed since the catalog was read ((kind, name) -> texts of
    CREATE VIEW / CREATE RULE that define what runs, see Statement.defines), and why the
    catalog is unavailable (None when it is there)."""

    schemas: frozenset[str] = frozenset({"public"})
    created: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    unavailable: str | None = None
    # A definition stored in the target, printed with search_path = pg_catalog: every
    # name outside pg_catalog in it is schema-qualified, every unqualified one built in.
    stored: bool = False
    # Texts in ``created`` already judged for this statement (text -> what it runs,
    # judged): views defined on views are judged once each, not once per path to them
    # (a chain of views naming two views each would otherwise double the work per level).
    # None: no memo (a scope shared between calls, such as STORED).
    judged: dict[str, tuple[Statement, ...]] | None = None

    def search(self, catalog: TargetCatalog) -> frozenset[str]:
        return _NOTHING if self.stored else catalog.schemas(self.schemas)


#: System views whose built-in rules change session settings when written.
#: (An unqualified name in a stored definition is a built-in one, which the analyser
#: reports in public.)
_SETTINGS_VIEWS = frozenset({"pg_catalog.pg_settings", "public.pg_settings"})

#: The scope of stored definitions (views, rules).
STORED = Scope(schemas=frozenset(), stored=True)


class _Judgement:
    __slots__ = ("an", "catalog", "scope", "findings", "tables", "functions", "depth",
                 "opaque", "vetted_calls", "forbidden")

    def __init__(self, an: Analyzer, catalog: TargetCatalog | None, scope: Scope, depth: int):
        self.an, self.catalog, self.scope, self.depth = an, catalog, scope, depth
        self.findings: list[tuple[StatementClass, str]] = []
        self.tables: dict[str, None] = {}
        self.functions: dict[str, None] = {}
        self.opaque: dict[str, None] = {}
        # Calls (schema or "", name) whose every candidate on the target is vetted
        # extension code (pgcatalog.Routine.vetted).
        self.vetted_calls: set[tuple[str, str]] = set()
        # Why the statement must never run, whatever the policy (Statement.forbidden).
        self.forbidden: str | None = None

    def user_code(self, routines: list[Routine], how: str) -> None:
        for r in routines:
            if r.vetted:
                continue
            entry = self.an.resolve([r.schema, r.name])[1]
            cls = riskiest([self.an.unknown_function_class, *([entry[0]] if entry else [])],
                           C.UNKNOWN)
            self.functions[r.qualified] = None
            self.opaque[r.qualified] = None
            self.findings.append((cls, f"{how} user-defined {r.describe()} "
                                       f"(treated as {cls.value})"))

    def function_names(self, functions: list[tuple[str, str]], how: str) -> None:
        """(what, schema.function) pairs run by a type or relation."""
        assert self.catalog is not None
        for what, qualified in functions:
            schema, _, name = qualified.rpartition(".")
            routine = self.catalog.routine(qualified)
            if routine is not None:
                self.user_code([routine], f"{how} {what} runs")
                continue
            found, entry = self.an.resolve([name] if schema == "pg_catalog" else [schema, name])
            cls = entry[0] if entry else self.an.unknown_function_class
            self.functions[found] = None
            if entry is None:
                self.opaque[found] = None
            if cls.risk > C.READ.risk:
                self.findings.append((cls, f"{how} {what} runs {found}"))

    def merge(self, inner: Statement, how: str) -> None:
        self.tables.update(dict.fromkeys(inner.tables))
        self.functions.update(dict.fromkeys(inner.functions))
        self.opaque.update(dict.fromkeys(inner.opaque))
        if inner.forbidden:
            # What a client may never send directly (a setting name that cannot be read,
            # an identity change) is the riskiest when stored code does it.
            self.findings.append((C.UNKNOWN, f"{how}: {inner.forbidden}"))
        if inner.search_path is not None:
            # Stored code that changes search_path changes what the session's next
            # statements call, behind the gateway's back.
            self.findings.append((C.UNKNOWN, f"{how}: it changes search_path"))
        if inner.cls is C.SESSION:
            # Stored code that changes a setting does it where the gateway does not see
            # it (standard_conforming_strings, the read-only default...): what follows
            # waits for it, as for code the gateway cannot see into.
            self.opaque.update(dict.fromkeys(inner.functions or (how,)))
        if inner.cls.risk > C.READ.risk:
            # The first reason is one for its class (see Statement.reasons).
            self.findings.append((inner.cls, f"{how} ({inner.cls.value}): "
                                             f"{inner.reasons[0] if inner.reasons else '?'}"))

    def definitions(self, texts: tuple[str, ...], how: str, scope: Scope) -> None:
        if self.depth >= MAX_DEPTH:
            self.findings.append((C.UNKNOWN, f"{how}: definitions nested too deeply"))
            return
        memo = scope.judged
        for text in texts:
            judged = memo.get(text) if memo is not None else None
            if judged is None:
                judged = tuple(resolve(self.an, inner, self.catalog, scope, self.depth + 1)
                               for inner in self.an.runs(text))
                if memo is not None:
                    memo[text] = judged
            for inner in judged:
                self.merge(inner, how)

    # -- what a statement names ------------------------------------------------------------

    def refs(self, st: Statement) -> None:
        catalog, scope = self.catalog, self.scope
        created = scope.created
        schemas = scope.search(catalog) if catalog is not None else _NOTHING
        for kind, schema, name in st.refs:
            if kind == "s":
                self.timeout(schema, float(name))
                continue
            if schema == "pg_catalog" and kind in ("f", "t", "u"):
                # The server's own objects, but a superuser may have created more there
                # (the catalog lists them with the user code), and a user function may be
                # an explicit cast to a built-in type (x::int4, int4(x)).
                if catalog is not None:
                    self.pg_catalog_ref(kind, name)
                continue
            if catalog is None:
                if kind != "a":
                    self.findings.append((self.an.unknown_function_class, self.unavailable(
                        f"{_KINDS[kind]} {_spell(schema, name)}")))
                continue
            where = frozenset({ANY}) if schema == "*" else frozenset({schema}) if schema \
                else schemas | _PG_CATALOG
            if kind in ("f", "a"):
                if (kind, name) in created or ("f", name) in created:
                    self.created(f"function {name}")
                how = "calls" if kind == "f" else f"{name} (attribute notation) may call"
                routines = catalog.functions(name, where)
                if not schema and "pg_catalog" not in schemas and ANY not in schemas:
                    # pg_catalog is searched first: its functions win over same-signature
                    # ones later on the path.
                    routines = [r for r in routines if not r.shadowed]
                self.user_code(routines, how)
                if kind == "f" and routines and all(r.vetted for r in routines):
                    self.vetted_calls.add((schema, name))
                if kind == "f" and not schema:
                    self.builtin_casts(name, kind)
            elif kind == "u":
                self.sort_families(name, where)
            elif kind == "o":
                if ("o", name) in created:
                    self.created(f"operator {name}")
                for op in catalog.operators_named(name, where):
                    routine = catalog.routine(op.function)
                    if routine is not None:
                        self.user_code([routine], f"operator {op.schema}.{name} calls")
                    else:
                        self.function_names([("its function", op.function)],
                                            f"operator {op.schema}.{name}:")
            elif kind == "t":
                if ("t", name) in created:
                    self.created(f"type {name}")
                types = where | {"pg_catalog"} if not schema else where
                for type_schema, what, fn in catalog.type_code(name, types):
                    self.function_names([(what, fn)], f"a cast to {type_schema}.{name}:")
                for type_schema, what, sql in catalog.type_checks(name, types):
                    self.expression(("type", type_schema, name, what), sql,
                                    f"a cast to {type_schema}.{name}: its {what} runs")

    def pg_catalog_ref(self, kind: str, name: str) -> None:
        """A name qualified into pg_catalog (see refs)."""
        assert self.catalog is not None
        if kind == "f":
            self.user_code(self.catalog.functions(name, _PG_CATALOG), "calls")
        elif kind == "u":
            self.sort_families(name, _PG_CATALOG)
            return
        self.builtin_casts(name, kind)
        if kind == "t":
            for type_schema, what, sql in self.catalog.type_checks(name, _PG_CATALOG):
                self.expression(("type", type_schema, name, what), sql,
                                f"a cast to {type_schema}.{name}: its {what} runs")

    def sort_families(self, name: str, where: frozenset[str]) -> None:
        """ORDER BY ... USING ``name``: the sort support of a family holding it."""
        assert self.catalog is not None
        found = [(what, fn) for op_schema, what, fn in self.catalog.sorts.get(name, ())
                 if ANY in where or op_schema in where or op_schema == "pg_catalog"]
        if found:
            self.function_names(found, f"ORDER BY ... USING {name}: its")

    def builtin_casts(self, name: str, kind: str) -> None:
        """A user function as an explicit cast to the built-in type ``name`` (a cast to it,
        or a call ``name(x)``, which is a cast when no function of that name fits)."""
        assert self.catalog is not None
        for type_schema, what, fn in self.catalog.type_code(name, frozenset({"pg_catalog"})):
            if type_schema == "pg_catalog" and (kind == "t" or what.startswith("a cast")):
                self.function_names([(what, fn)], f"a cast to {type_schema}.{name}:")

    def hooks(self) -> None:
        """User code the target may run for any statement (catalog ``hooks``)."""
        assert self.catalog is not None
        self.function_names(list(self.catalog.hooks), "any statement of this target:")

    def timeout(self, name: str, millis: float) -> None:
        """A session timeout set to ``millis``: above the target's own value it weakens
        the guard the operator configured (0 was judged by the analyser already)."""
        if self.catalog is None:
            self.findings.append((C.SAFETY, self.unavailable(
                f"whether {name} = {millis:.0f} ms raises the target's configured value")))
            return
        configured = self.catalog.settings.get(name, 0.0)
        if configured > 0 and millis > configured:
            self.findings.append((C.SAFETY, f"raises {name} to {millis:.0f} ms, above the "
                                            f"target's configured {configured:.0f} ms"))

    def relations(self, st: Statement) -> None:
        catalog, scope = self.catalog, self.scope
        writes = st.is_dml or st.cls.risk >= C.WRITE.risk
        if catalog is None:
            if st.tables:
                self.findings.append((self.an.unknown_function_class, self.unavailable(
                    f"whether {', '.join(st.tables[:3])} run views, rules or triggers")))
            return
        seen: dict[str, Relation] = {}
        for table in st.tables:
            parts = table.split(".")
            if len(parts) >= 2:
                found = catalog.relation(parts[-2], parts[-1])
                if found is not None:
                    seen[found.qualified] = found
        schemas = scope.search(catalog) | _PG_CATALOG
        for name in () if scope.stored else st.unqualified:
            for found in catalog.relations_named(name, schemas):
                seen[found.qualified] = found
        defined = [(schema, name) for kind, schema, name in st.defines if kind == "f"]
        if defined:
            # Replacing a function changes what every table whose trigger, default, check
            # or policy calls it does: those tables count as changed by the statement (an
            # unqualified name may be the function of any schema).
            exact = {f"{schema}.{name}" for schema, name in defined if schema}
            anywhere = {name for schema, name in defined if not schema}
            for rels in catalog.relations.values():
                for rel in rels:
                    if any(fn in exact or fn.rpartition(".")[2] in anywhere
                           for _, fn in (*rel.on_write, *rel.on_read)):
                        self.tables[rel.qualified] = None
        refresh = st.command == "REFRESH MATERIALIZED VIEW"
        for rel in list(seen.values()):
            self.relation(rel, writes, runs_query=refresh)
            if "row_type" in st.facts and rel.row_users:
                # Its row type is stored in these tables: their values change too.
                self.tables.update(dict.fromkeys(rel.row_users))
            for child in rel.children:
                # Read (or written) with its parent unless ONLY: judged as itself too.
                self.tables[child] = None
                cs, _, cn = child.partition(".")
                found = catalog.relation(cs, cn)
                if found is not None and found.qualified not in seen:
                    seen[found.qualified] = found
                    self.relation(found, writes)
        for table in (*st.tables, *st.unqualified):
            name = table.rpartition(".")[2]
            texts = scope.created.get(("r", name))
            if texts is None:
                continue
            if texts:
                self.definitions(texts, f"{name}, as this session redefined it,", scope)
            if writes:
                self.created(f"relation {name}")
        if st.is_dml and _SETTINGS_VIEWS.intersection(self.tables):
            # A view over pg_settings (automatically updatable): writing it runs
            # pg_settings' built-in rules, which call set_config (the role, search_path, the
            # read-only guard...), like UPDATE pg_settings itself.
            self.forbidden = ("it writes through a view over pg_settings, whose rules change "
                              "session settings, including the role")

    def relation(self, rel: Relation, writes: bool, runs_query: bool = False) -> None:
        """What using ``rel`` runs. ``runs_query``: a materialized view's query runs
        (REFRESH), with write access, and counts like a view's: its functions too."""
        pg = STORED
        if rel.view is not None and rel.materialized and not runs_query:
            # Its rows hold data of the tables its query names; the query does not run.
            key = ("matview", rel.qualified, self.an.unknown_function_class)
            tables = self.catalog.memo.get(key) if self.catalog is not None else None
            if tables is None:
                inner = _Judgement(self.an, self.catalog, pg, self.depth)
                inner.definitions((rel.view,), f"materialized view {rel.qualified}", pg)
                tables = tuple(inner.tables)
                if self.catalog is not None:
                    self.catalog.memo[key] = tables
            self.tables.update(dict.fromkeys(tables))
        elif rel.view is not None:
            key = ("view" if not rel.materialized else "refresh", rel.qualified,
                   self.an.unknown_function_class)
            judged = self.catalog.memo.get(key) if self.catalog is not None else None
            if judged is None:
                inner = _Judgement(self.an, self.catalog, pg, self.depth)
                inner.definitions((rel.view,), f"view {rel.qualified} runs", pg)
                judged = (inner.findings, tuple(inner.tables), tuple(inner.functions),
                          tuple(inner.opaque))
                if self.catalog is not None:
                    self.catalog.memo[key] = judged
            self.take(judged)
        if rel.on_read:
            self.function_names(list(rel.on_read), f"using {rel.qualified}:")
        for what, sql in rel.on_read_sql:
            self.expression(("policy", rel.qualified, what), sql,
                            f"using {rel.qualified}: its {what} runs")
        if writes:
            self.definitions(tuple(d for _, d in rel.rules),
                             f"a rule on {rel.qualified} also runs", pg)
            self.function_names(list(rel.on_write), f"writing {rel.qualified}:")
            for what, sql in rel.on_write_sql:
                self.expression(("write", rel.qualified, what), sql,
                                f"writing {rel.qualified}: its {what} runs", in_write=True)
            for child in rel.cascades:
                # A referential action writes it too: as written, and named to the policy.
                if child in self.tables:
                    continue
                self.tables[child] = None
                cs, _, cn = child.partition(".")
                found = self.catalog.relation(cs, cn) if self.catalog is not None else None
                if found is not None:
                    self.relation(found, True)

    def expression(self, key: tuple[str, ...], sql: str, how: str,
                   in_write: bool = False) -> None:
        """An expression the target stores and runs (a policy, a domain check), judged
        once per catalog like a view's definition. ``in_write``: it runs as part of a
        write (a default, a check), which already is one: what only reads or writes
        (nextval, now()) adds nothing, so such a statement stays plain."""
        memo_key = (*key, self.an.unknown_function_class)
        judged = self.catalog.memo.get(memo_key) if self.catalog is not None else None
        if judged is None:
            inner = _Judgement(self.an, self.catalog, STORED, self.depth)
            inner.definitions((sql,), how, STORED)
            judged = (inner.findings, tuple(inner.tables), tuple(inner.functions),
                      tuple(inner.opaque))
            if in_write:
                # (A default or check cannot hold a subquery: the relations it names are
                # the sequences of its nextval calls, part of the table it fills.)
                findings = [f for f in inner.findings if f[0] not in (C.READ, C.WRITE)]
                judged = (findings, *judged[1:]) if findings or inner.opaque \
                    else ([], (), (), ())
            if self.catalog is not None:
                self.catalog.memo[memo_key] = judged
        self.take(judged)

    def take(self, judged: tuple[Any, ...]) -> None:
        """Add what a memoised judgement of stored code found."""
        findings, tables, functions, opaque = judged
        self.findings.extend(findings)
        self.tables.update(dict.fromkeys(tables))
        self.functions.update(dict.fromkeys(functions))
        self.opaque.update(dict.fromkeys(opaque))

    def created(self, what: str) -> None:
        self.findings.append((self.an.unknown_function_class,
                              f"a statement sent through the gateway created or changed "
                              f"{what}; keyturn has not "
                              "read its definition from the target yet"))

    def unavailable(self, what: str) -> str:
        return (f"the target's catalog could not be read ({self.scope.unavailable}), so "
                f"keyturn cannot tell {what}" if what.startswith("whether") else
                f"the target's catalog could not be read ({self.scope.unavailable}): "
                f"{what} may be user-defined")


_KINDS = {"f": "function", "o": "operator", "t": "type", "a": "attribute",
          "u": "sort operator"}
#: pg_catalog is searched first for functions, types and relations, whatever search_path.
_PG_CATALOG = frozenset({"pg_catalog"})
#: Commands that evaluate no expression, so run no code attached to values' types.
_NO_EXPRESSIONS = frozenset({"BEGIN", "START TRANSACTION", "COMMIT", "END", "ROLLBACK",
                             "ABORT", "SAVEPOINT", "RELEASE", "RELEASE SAVEPOINT",
                             "ROLLBACK TO SAVEPOINT", "SET", "RESET", "SHOW", "DEALLOCATE",
                             "DISCARD", "LISTEN", "UNLISTEN", "CLOSE"})


def _spell(schema: str, name: str) -> str:
    return f"{schema}.{name}" if schema else name


def resolve(an: Analyzer, st: Statement, catalog: TargetCatalog | None, scope: Scope,
            depth: int = 0) -> Statement:
    """``st`` judged by what runs on the target (see the module docstring)."""
    if catalog is None and scope.unavailable is None:
        scope = dataclasses.replace(scope, unavailable="not read yet")
    evaluates = st.command.upper() not in _NO_EXPRESSIONS
    hooked = catalog is not None and bool(catalog.hooks) and evaluates
    changed = evaluates and depth == 0 and any(k == "*" for k, _ in scope.created)
    redefines = any(kind == "f" for kind, _, _ in st.defines)
    if not st.refs and not st.tables and not st.unqualified and not hooked and \
            not changed and not redefines:
        return st
    j = _Judgement(an, catalog, scope, depth)
    j.refs(st)
    j.relations(st)
    if hooked:
        j.hooks()
    if changed:
        j.findings.append((an.unknown_function_class,
                           "a statement just changed this target's catalog in a way keyturn "
                           "does not follow by name (ALTER TABLE, an operator class, an "
                           "extension...), and keyturn has not read it again yet"))
    st = _vetted(an, st, j)
    if j.forbidden is not None and st.forbidden is None:
        st = dataclasses.replace(st, forbidden=j.forbidden)
    if not j.findings and not j.tables and not j.functions and not j.opaque:
        return st
    cls = riskiest([st.cls, *(f[0] for f in j.findings)], C.UNKNOWN)
    ordered = sorted(j.findings, key=lambda f: -f[0].risk)
    reasons = tuple(dict.fromkeys(r for _, r in ordered))
    if cls is st.cls:
        reasons = (*st.reasons, *reasons)
    else:
        reasons = (*reasons, *st.reasons)
    return dataclasses.replace(
        st, cls=cls, reasons=tuple(dict.fromkeys(reasons)),
        tables=tuple(dict.fromkeys([*st.tables, *j.tables])),
        functions=tuple(dict.fromkeys([*st.functions, *j.functions])),
        opaque=tuple(dict.fromkeys([*st.opaque, *j.opaque])))


def _vetted(an: Analyzer, st: Statement, j: _Judgement) -> Statement:
    """``st`` without its calls of functions the analyser did not know when the target's
    catalog shows every one of them to be vetted extension code (installed by an
    extension's script, immutable or stable, not SECURITY DEFINER: pgcrypto's digest,
    pg_trgm's similarity); else ``st``."""
    if st.known_cls is None or j.catalog is None:
        return st
    unknown = {(schema, name): an.resolve([schema, name] if schema else [name])[0]
               for kind, schema, name in st.refs
               if kind == "f" and an.resolve([schema, name] if schema else [name])[1] is None}
    if not unknown or not all(call in j.vetted_calls for call in unknown):
        return st
    names = set(unknown.values())
    gone = tuple(f"function {q} is not in the catalogue" for q in names)
    return dataclasses.replace(
        st, cls=st.known_cls, known_cls=None,
        reasons=tuple(r for r in st.reasons if not r.startswith(gone)),
        opaque=tuple(q for q in st.opaque if q not in names))


__all__ = ["ANY", "MAX_DEPTH", "STORED", "Scope", "resolve"]
