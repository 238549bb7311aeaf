"""What a target database defines beyond PostgreSQL's built-ins, as the analyser needs it.

A name alone does not say what runs: ``upper(x)`` may resolve to a user function through
overloading or search_path, ``a + b`` calls whatever function the operator names, a cast
may call a cast function or a domain check, reading a view runs its definition, and a
write fires rules, triggers, defaults and checks.  ``TargetCatalog`` is built from rows the
gateway reads from the target's catalog (pg_proc, pg_operator, pg_cast, pg_type,
pg_rewrite, pg_trigger, pg_depend; see proxies/postgres/catalog.py) and answers questions
about names: which user functions, operators and types a name may mean in a set of
schemas, and what runs when a relation is read or written.

This module is pure: it takes rows and answers questions.  It must not talk to a database
and must not judge anything (keyturn.analysis.usercode does); it only knows names.
Everything outside pg_catalog and information_schema counts as user-defined here, and so
does what a superuser created inside them after initdb (OID 16384 and up).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from keyturn.analysis.postgres import search_path_schemas

#: A schema set that stands for "any schema" (the session's search_path is unreadable).
ANY = "*"
_VOLATILITY = {"i": "immutable", "s": "stable", "v": "volatile"}
_EVENTS = {"1": "SELECT", "2": "UPDATE", "3": "INSERT", "4": "DELETE"}


@dataclass(frozen=True, slots=True)
class Routine:
    """A function, aggregate, window function or procedure outside pg_catalog."""

    schema: str
    name: str
    kind: str  # f, a (aggregate), w (window), p (procedure)
    volatility: str  # i, s, v
    language: str
    definer: bool
    extension: str | None = None  # the extension it belongs to, if any
    # A built-in function of the same name, kind and argument types exists: PostgreSQL
    # keeps only the one found first on the search path, so an unqualified call never
    # reaches this one while pg_catalog is searched first (it is, unless search_path
    # names it later). pgcrypto's gen_random_uuid() beside the built-in one.
    shadowed: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def vetted(self) -> bool:
        """Installed by an extension (made by its script: owned by a superuser, which the
        catalog read checks), declared immutable or stable, not SECURITY DEFINER, and
        compiled (C or internal): code the database's administrator installed (citext's
        ``citext_eq``), which no session can replace. An SQL or procedural-language
        function resolves the names in its body with the caller's search_path at run time
        (citext's SQL ``regexp_match`` calls ``||``, which a session's own operator may
        answer), so it is user code like everything else."""
        return self.extension is not None and self.volatility in ("i", "s") and \
            not self.definer and self.language in ("c", "internal")

    def describe(self) -> str:
        bits = [self.language, _VOLATILITY.get(self.volatility, self.volatility)]
        if self.definer:
            bits.append("SECURITY DEFINER")
        if self.extension:
            bits.append(f"extension {self.extension}")
        return f"{self.qualified} ({', '.join(bits)})"


@dataclass(frozen=True, slots=True)
class Operator:
    schema: str
    name: str
    function: str  # schema.name of the function it calls (oprcode)


@dataclass(frozen=True, slots=True)
class Relation:
    """What runs when a relation is used: a view's definition (read with the target's
    search_path set to pg_catalog, so every other name in it is schema-qualified), rules
    on writes (``CREATE RULE`` text), functions run on writes (defaults, checks, index
    expressions, triggers) and on every access (row-level security policies, casts and
    operators of column types)."""

    schema: str
    name: str
    view: str | None = None
    rules: tuple[tuple[str, str], ...] = ()  # (event, definition)
    on_write: tuple[tuple[str, str], ...] = ()  # (what, schema.function)
    on_read: tuple[tuple[str, str], ...] = ()
    # SQL run on every access (row security policies), as (what, SELECT text).
    on_read_sql: tuple[tuple[str, str], ...] = ()
    # SQL run on writes (defaults, checks, policies' WITH CHECK, index and partition key
    # expressions), as (what, SELECT text).
    on_write_sql: tuple[tuple[str, str], ...] = ()
    # A materialized view: ``view`` is the query its rows came from (naming the tables
    # they hold data of); it does not run when the materialized view is read.
    materialized: bool = False
    # Relations read with this one unless ONLY: inheritance children and partitions, at
    # any depth, as schema.name.
    children: tuple[str, ...] = ()
    # Tables a write of this one also writes (foreign keys referencing it with ON DELETE
    # or ON UPDATE CASCADE, SET NULL, SET DEFAULT), as schema.name.
    cascades: tuple[str, ...] = ()
    # Tables with a column of this relation's row type (or an array of it), as schema.name:
    # dropping or retyping one of its columns changes the values stored there.
    row_users: tuple[str, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def _inherit(table: dict[tuple[str, str], set[Any]], bases: list[tuple[Any, ...]]) -> None:
    """Give each type what its bases have (domains their base, arrays their element,
    composites their attributes' types); domains of arrays of domains...: a few levels
    are plenty."""
    for _ in range(8):
        grew = False
        for s, t, bs, bt in bases:
            inherited = table.get((bs, bt), set()) - table.get((s, t), set())
            if inherited:
                table.setdefault((s, t), set()).update(inherited)
                grew = True
        if not grew:
            break


def _temp(schema: str) -> bool:
    return schema.startswith("pg_temp_") or schema == "pg_temp"


@dataclass
class TargetCatalog:
    """The user-defined objects of one target database (see the module docstring)."""

    user: str
    search_path: tuple[str, ...]
    routines: dict[str, list[Routine]]
    operators: dict[str, list[Operator]]
    types: dict[str, list[tuple[str, str, str]]]  # name -> (schema, what, schema.function)
    relations: dict[str, list[Relation]]
    fingerprint: str
    # type name -> (schema, what, SELECT text) run for a value cast to it (domain checks,
    # also those of the domains it is based on)
    type_sql: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    # OID -> (schema, name) of every user type (Parse declares parameter types by OID)
    type_oids: dict[int, tuple[str, str]] = field(default_factory=dict)
    # User code any statement may run without naming it (implicit casts, default operator
    # classes of built-in types...): (what, schema.function).
    hooks: tuple[tuple[str, str], ...] = ()
    # The target's own timeouts for the gateway's role, in milliseconds (0: none).
    settings: dict[str, float] = field(default_factory=dict)
    # Operator name -> (operator schema, what, schema.function): user code in an operator
    # family holding an operator of that name (ORDER BY ... USING takes its sort support
    # from such a family).
    sorts: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    # Derived answers (views judged, ...) for the users of this catalog; dropped with it.
    memo: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, *, user: str, search_path: str | None,
                  routines: Iterable[Sequence[Any]] = (),
                  operators: Iterable[Sequence[Any]] = (),
                  type_code: Iterable[Sequence[Any]] = (),
                  type_bases: Iterable[Sequence[Any]] = (),
                  views: Iterable[Sequence[Any]] = (),
                  rules: Iterable[Sequence[Any]] = (),
                  relation_code: Iterable[Sequence[Any]] = (),
                  typed_columns: Iterable[Sequence[Any]] = (),
                  expressions: Iterable[Sequence[Any]] = (),
                  type_oids: Iterable[Sequence[Any]] = (),
                  hooks: Iterable[Sequence[Any]] = (),
                  children: Iterable[Sequence[Any]] = (),
                  settings: Iterable[Sequence[Any]] = (),
                  sort_code: Iterable[Sequence[Any]] = (),
                  cascades: Iterable[Sequence[Any]] = (),
                  row_users: Iterable[Sequence[Any]] = ()) -> TargetCatalog:
        """Rows as proxies/postgres/catalog.py reads them:

        routines: (schema, name, kind, volatility, language, security definer, extension[,
            shadowed by a built-in])
        operators: (schema, name, function schema, function name)
        type_code: (schema, type, what, function schema, function name): a cast, domain
            check, I/O or operator-class function that runs for values of the type
        type_bases: (schema, type, base schema, base type): domains and arrays, which
            inherit their base's code
        views: (schema, name, definition[, relkind v or m])
        rules: (schema, table, event 1-4 or name, CREATE RULE text)
        relation_code: (schema, table, what, function schema, function name, on reads)
        typed_columns: (schema, table, column, type schema, type)
        expressions: (r, w or t, schema, relation or type, what, SQL expression): row
            security policies of relations (r), what runs on their writes (w), checks
            of domains (t)
        type_oids: (oid, schema, name) of every user type
        hooks: (what, function schema, function name): user code any statement may run
        children: (schema, relation, child schema, child): inheritance and partitions
        settings: (name, milliseconds): the target's timeouts
        sort_code: (operator schema, operator, what, function schema, function name): user
            code of operator families holding the operator
        cascades: (schema, table, referencing schema, referencing table): foreign keys
            whose referential action writes the referencing table
        row_users: (schema, relation, user schema, user table): tables with a column of
            the relation's row type (a composite type's too)
        """
        rows: list[Any] = []

        def keep(items: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
            out = sorted(tuple(str(v) if v is not None else "" for v in r) for r in items)
            rows.append(out)
            return out

        by_name: dict[str, list[Routine]] = {}
        for s, n, k, vol, lang, definer, ext, *shadowed in keep(routines):
            by_name.setdefault(n, []).append(Routine(s, n, k, vol, lang, definer == "True",
                                                     ext or None, shadowed == ["True"]))
        ops: dict[str, list[Operator]] = {}
        for s, n, fs, fn in keep(operators):
            ops.setdefault(n, []).append(Operator(s, n, f"{fs}.{fn}"))
        code: dict[tuple[str, str], set[tuple[str, str]]] = {}
        for s, t, what, fs, fn in keep(type_code):
            code.setdefault((s, t), set()).add((what, f"{fs}.{fn}"))
        bases = keep(type_bases)
        _inherit(code, bases)
        exprs = keep(expressions)
        checks: dict[tuple[str, str], set[tuple[str, str]]] = {}
        defaults: dict[tuple[str, str], set[tuple[str, str]]] = {}
        for kind, s, t, what, expr in exprs:
            if kind == "t" or kind == "d":
                (checks if kind == "t" else defaults).setdefault((s, t), set()).add(
                    (what, f"SELECT {expr}"))
        _inherit(checks, bases)
        _inherit(defaults, bases)
        type_sql: dict[str, list[tuple[str, str, str]]] = {}
        for (s, t), found in checks.items():
            type_sql.setdefault(t, []).extend((s, what, sql) for what, sql in sorted(found))
        types: dict[str, list[tuple[str, str, str]]] = {}
        for (s, t), funcs in code.items():
            types.setdefault(t, []).extend((s, what, fn) for what, fn in sorted(funcs)
                                           if what != "its default")  # (not for a cast)
        rels: dict[tuple[str, str], dict[str, Any]] = {}

        def rel(s: str, n: str) -> dict[str, Any]:
            return rels.setdefault((s, n), {"view": None, "rules": [], "on_write": [],
                                            "on_read": [], "on_read_sql": [],
                                            "on_write_sql": [], "materialized": False,
                                            "children": [], "cascades": [],
                                            "row_users": []})

        for s, n, definition, *kind in keep(views):
            rel(s, n)["view"] = definition
            rel(s, n)["materialized"] = kind == ["m"]
        for s, n, cs, cn in keep(children):
            rel(s, n)["children"].append(f"{cs}.{cn}")
        for s, n, cs, cn in keep(cascades):
            rel(s, n)["cascades"].append(f"{cs}.{cn}")
        for s, n, us, un in keep(row_users):
            rel(s, n)["row_users"].append(f"{us}.{un}")
        for s, n, event, definition in keep(rules):
            rel(s, n)["rules"].append((_EVENTS.get(event, event), definition))
        for s, n, what, fs, fn, on_read in keep(relation_code):
            rel(s, n)["on_read" if on_read == "True" else "on_write"].append(
                (what, f"{fs}.{fn}"))
        for kind, s, n, what, expr in exprs:
            if kind == "r" or kind == "w":
                rel(s, n)["on_read_sql" if kind == "r" else "on_write_sql"].append(
                    (what, f"SELECT {expr}"))
        # A relation's row type is named like it and runs its casts when the row is used
        # as a value (SELECT upper(t) FROM t, t::text): judged on every read. (A type with
        # code that is no relation's row type gets an entry no relation ever matches: a
        # relation and a type cannot share a name in one schema.)
        for (s, n), funcs in sorted(code.items()):
            for what, fn in sorted(funcs):
                rel(s, n)["on_read"].append((f"its row type ({what})", fn))
        for s, n, col, ts, tn in keep(typed_columns):
            for what, fn in sorted(code.get((ts, tn), ())):
                # (A domain's default runs on writes only: INSERT, and UPDATE ... DEFAULT.)
                rel(s, n)["on_write" if what == "its default" else "on_read"].append(
                    (f"column {col} of type {ts}.{tn} ({what})", fn))
            for what, sql in sorted(defaults.get((ts, tn), ())):
                rel(s, n)["on_write_sql"].append(
                    (f"column {col} of type {ts}.{tn} ({what})", sql))
            # A row of the table may be made from other values (json_populate_record of
            # the table's row type): its columns' domain checks run.
            for what, sql in sorted(checks.get((ts, tn), ())):
                rel(s, n)["on_read_sql"].append(
                    (f"column {col} of type {ts}.{tn} ({what})", sql))
        relations: dict[str, list[Relation]] = {}
        for (s, n), parts in sorted(rels.items()):
            relations.setdefault(n, []).append(Relation(
                s, n, parts["view"], tuple(parts["rules"]), tuple(dict.fromkeys(
                    parts["on_write"])), tuple(dict.fromkeys(parts["on_read"])),
                tuple(parts["on_read_sql"]), tuple(parts["on_write_sql"]),
                parts["materialized"], tuple(dict.fromkeys(parts["children"])),
                tuple(dict.fromkeys(parts["cascades"])),
                tuple(dict.fromkeys(parts["row_users"]))))
        path = tuple(search_path_schemas(search_path)) if search_path is not None \
            else ("$user", "public")
        oids = {int(oid): (str(sch), str(name)) for oid, sch, name in keep(type_oids)}
        hooked = tuple((what, f"{fs}.{fn}") for what, fs, fn in keep(hooks))
        timeouts = {name: float(value) for name, value in keep(settings)
                    if value.lstrip("-").isdigit()}
        sorts: dict[str, list[tuple[str, str, str]]] = {}
        for os_, on, what, fs, fn in keep(sort_code):
            sorts.setdefault(on, []).append((os_, what, f"{fs}.{fn}"))
        digest = hashlib.sha256(repr((user, path, rows)).encode()).hexdigest()
        return cls(user, path, by_name, ops, types, relations, digest, type_sql=type_sql,
                   type_oids=oids, hooks=hooked, settings=timeouts, sorts=sorts)

    # -- questions --------------------------------------------------------------------------

    def schemas(self, session: Iterable[str]) -> frozenset[str]:
        """Every schema unqualified names may resolve in: the session's search_path
        candidates and the target's own default for this role, "$user" made the role."""
        return frozenset(self.user if s.strip('"') == "$user" else s
                         for s in (*session, *self.search_path))

    def functions(self, name: str, schemas: frozenset[str]) -> list[Routine]:
        """User routines called ``name`` in any of ``schemas`` (ANY: every schema).
        pg_temp is never searched for functions by PostgreSQL, only when named."""
        return [r for r in self.routines.get(name, ())
                if ANY in schemas or r.schema in schemas]

    def routine(self, qualified: str) -> Routine | None:
        schema, _, name = qualified.rpartition(".")
        return next((r for r in self.routines.get(name, ()) if r.schema == schema), None)

    def operators_named(self, symbol: str, schemas: frozenset[str]) -> list[Operator]:
        """Operators spelled ``symbol`` in ``schemas`` or whose function is not built in
        (including a pg_catalog operator calling user code)."""
        return [o for o in self.operators.get(symbol, ())
                if ANY in schemas or o.schema in schemas or o.schema == "pg_catalog"]

    def type_code(self, name: str, schemas: frozenset[str]) -> list[tuple[str, str, str]]:
        """(schema, what, function) run for values of a type called ``name`` (types are
        also found in the session's temporary schema)."""
        return [t for t in self.types.get(name, ())
                if ANY in schemas or t[0] in schemas or _temp(t[0])]

    def type_checks(self, name: str, schemas: frozenset[str]) -> list[tuple[str, str, str]]:
        """(schema, what, SELECT text) run for a value cast to a type called ``name``."""
        return [t for t in self.type_sql.get(name, ())
                if ANY in schemas or t[0] in schemas or _temp(t[0])]

    def relation(self, schema: str, name: str) -> Relation | None:
        return next((r for r in self.relations.get(name, ()) if r.schema == schema), None)

    def relations_named(self, name: str, schemas: frozenset[str]) -> list[Relation]:
        """Relations an unqualified name may mean: in ``schemas`` or a temporary schema
        (pg_temp comes first for relations)."""
        return [r for r in self.relations.get(name, ())
                if ANY in schemas or r.schema in schemas or _temp(r.schema)]
