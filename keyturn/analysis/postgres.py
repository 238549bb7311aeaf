"""Risk classification of PostgreSQL statements for the Keyturn gateway.

Every SQL message a client sends is parsed with pglast (PostgreSQL's own parser) and the
*whole* parse tree is walked: data-modifying CTEs, functions called in FROM, defaults, EXPLAIN
targets, COPY queries and PREPARE bodies all count.  Each statement gets a StatementClass, the
tables and functions it touches, the reasons for its class, and a ``forbidden`` reason when it
would change who the session is or how the server reads SQL.

This module must fail closed: anything it cannot parse or does not recognise is UNKNOWN, the
riskiest class, and an unknown function is at least ``unknown_function_class``.  It must not
execute SQL or talk to a database, and it must not use ``pglast.parse_sql`` (AST objects) on
the hot path: ``parse_sql_json`` is about ten times cheaper.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import sys
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import pglast.ast
from pglast import parser as _pg

from keyturn.analysis import catalogue
from keyturn.analysis.classes import _RISK, StatementClass

C = StatementClass


def riskiest(classes: Iterable[StatementClass], default: StatementClass) -> StatementClass:
    return max(classes, key=_RISK.__getitem__, default=default)


@dataclass(frozen=True, slots=True)
class Statement:
    """One classified statement of a message."""

    text: str
    cls: StatementClass
    command: str
    tables: tuple[str, ...]
    functions: tuple[str, ...]
    reasons: tuple[str, ...]
    forbidden: str | None
    is_dml: bool
    prepared_name: str | None
    literal_dependent: bool
    # Relations named without a schema (reported in ``tables`` as public.<name>); the
    # gateway re-resolves them when the session's search_path may have changed.
    unqualified: tuple[str, ...] = ()
    # The schemas a SET search_path / set_config('search_path') names ("$user" kept,
    # ("*",) when the value cannot be read), or None when it leaves search_path alone.
    search_path: tuple[str, ...] | None = None
    # What the gateway's transaction guard needs to know (see FACTS).
    facts: frozenset[str] = frozenset()
    # Names whose meaning depends on the target's catalog, as written: (kind, schema or "",
    # name) with kind f (function call), a (attribute notation, ``c.fullname``, which may
    # call a function), o (operator, also the implicit ones of IN, BETWEEN, simple CASE,
    # ANY, DISTINCT FROM, LIKE, ORDER BY ... USING), t (type named in a cast),
    # s (a timeout set to a value: ("s", setting, milliseconds)), u (ORDER BY ... USING
    # operator: the sort support of a family holding it).
    # keyturn.analysis.usercode resolves them against the target's catalog.
    refs: tuple[Ref, ...] = ()
    # Catalog objects this statement creates or redefines: (f|o|t|r, schema or "", name),
    # r being a relation whose views, rules, triggers or defaults change.
    defines: tuple[Ref, ...] = ()
    # Functions whose effects keyturn cannot see (not in its catalogue of built-ins, or
    # user-defined on the target): they may write any table, so a rule that allows
    # writes to some tables does not cover them unless it names them (keyturn.policy).
    opaque: tuple[str, ...] = ()
    # The class without the calls of functions keyturn's catalogue does not know (None:
    # there are none). keyturn.analysis.usercode uses it when the target's catalog shows
    # every such call to be vetted extension code (pgcrypto's digest, pg_trgm's
    # similarity...).
    known_cls: StatementClass | None = None


#: Statement facts the gateway's read-only guard relies on:
#: begin (BEGIN/START TRANSACTION), begin_ro (... READ ONLY), end (COMMIT, ROLLBACK, PREPARE
#: TRANSACTION), chain (... AND CHAIN), savepoint (SAVEPOINT), sp_destroy (RELEASE or
#: ROLLBACK TO, which can end a savepoint the gateway opened), copy_in (COPY FROM STDIN),
#: hold_cursor (DECLARE ... WITH HOLD: the rest of its query runs at COMMIT).
FACTS = frozenset({"begin", "begin_ro", "end", "chain", "savepoint", "sp_destroy", "copy_in",
                   "hold_cursor"})
#: Classes that run inside a read-only transaction; every other class needs write access.
READ_ONLY_CLASSES = frozenset({"transaction", "session", "read"})
#: PostgreSQL keeps the first NAMEDATALEN-1 bytes of identifiers and of statement and
#: portal names; longer names that share them name the same object.
NAME_BYTES = 63


#: A catalog reference of a statement: (kind, schema or "", name); see Statement.refs.
Ref = tuple[str, str, str]


def server_name(name: str) -> str:
    """A name as the server keeps it: cut to 63 bytes of UTF-8 at a character boundary."""
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) <= NAME_BYTES:
        return name
    return raw[:NAME_BYTES].decode("utf-8", "ignore")


#: search_path as the gateway assumes it until a session changes it.
DEFAULT_SEARCH_PATH: tuple[str, ...] = ("public",)


def search_path_schemas(value: str | None) -> tuple[str, ...]:
    """Every schema a search_path value could name, generously: the value split at
    commas, each part with and without quotes and case folding (extra candidates only
    make the gateway more careful). None or an empty value: ("*",), unknown."""
    if value is None:
        return ("*",)
    out: dict[str, None] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        bare = part.strip('"')
        for candidate in (part, bare, bare.lower()):
            out[candidate] = None
    return tuple(out) or DEFAULT_SEARCH_PATH


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for item in items if item))


@dataclass(frozen=True, slots=True)
class Analysis:
    """The classification of one SQL message (one or more statements)."""

    text: str
    statements: tuple[Statement, ...]
    error: str | None
    # Changes to the session's prepared-statement names this message sends:
    # (statement index, name or None for DEALLOCATE ALL, PreparedStatements ticket).
    changes: tuple[tuple[int, str | None, int], ...] = ()

    @property
    def cls(self) -> StatementClass:
        if self.error is not None:
            return C.UNKNOWN
        # An empty or comment-only message runs nothing.
        return riskiest((s.cls for s in self.statements), C.READ)

    @property
    def forbidden(self) -> str | None:
        return next((s.forbidden for s in self.statements if s.forbidden), None)

    @property
    def reasons(self) -> tuple[str, ...]:
        error = (f"could not analyse: {self.error}",) if self.error is not None else ()
        return _unique([*error, *(r for s in self.statements for r in s.reasons)])

    @property
    def tables(self) -> tuple[str, ...]:
        return _unique(t for s in self.statements for t in s.tables)

    @property
    def functions(self) -> tuple[str, ...]:
        return _unique(f for s in self.statements for f in s.functions)


class PreparedStatements:
    """One client session's model of the server's prepared-statement namespace.

    SQL PREPARE / EXECUTE / DEALLOCATE and the protocol's Parse / Bind / Close share one
    namespace on the server, keyed by the first 63 bytes of the name.  The gateway sends a
    change long before it learns whether the server accepted it (a PREPARE fails when the
    name exists, a DEALLOCATE when it does not, both in an aborted transaction), so a name
    holds every definition the server may have under it: each change is a *candidate*
    with a sequence number, ``settle`` narrows them once the server's answer is known, and
    a lookup sees the riskiest candidate.  A name with no candidate is unknown (EXECUTE is
    then UNKNOWN, the riskiest class): forgetting errs towards caution, never the reverse.
    """

    MAX_NAMES = 10_000
    #: Changes of one name not answered yet that are kept apart; beyond, what the name
    #: holds is unknown until the server answers (EXECUTE of it is UNKNOWN meanwhile).
    MAX_CANDIDATES = 8

    __slots__ = ("_by_name", "_seq")

    def __init__(self) -> None:
        # name -> [(seq, statement or None)]; None: the name may be free (deallocated).
        self._by_name: dict[str, list[tuple[int, Statement | None]]] = {}
        self._seq = 0

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def remember(self, name: str, statement: Statement) -> int:
        """A PREPARE (or Parse) of ``name`` was sent; returns its ticket for ``settle``."""
        name = server_name(name)
        seq = self._next()
        cands = self._by_name.get(name)
        if cands is None:
            if len(self._by_name) >= self.MAX_NAMES:
                return seq  # not stored: its EXECUTE is UNKNOWN (fail closed)
            cands = self._by_name[name] = []
        self._add(cands, seq, statement)
        return seq

    def _add(self, cands: list[tuple[int, Statement | None]], seq: int,
             statement: Statement | None) -> None:
        if len(cands) >= self.MAX_CANDIDATES:
            # Too many possibilities to weigh at every EXECUTE: the name holds something
            # unknown until an answer settles it.
            cands[:] = [(seq, _UNKNOWABLE)]
            return
        cands.append((seq, statement))

    def forget(self, name: str) -> int:
        """A DEALLOCATE (or Close) of ``name`` was sent. Until its answer the old
        definitions stay candidates: a failed DEALLOCATE leaves them on the server."""
        name = server_name(name)
        seq = self._next()
        cands = self._by_name.get(name)
        if cands is not None:
            self._add(cands, seq, None)
        return seq

    def forget_all(self) -> int:
        seq = self._next()
        for cands in self._by_name.values():
            self._add(cands, seq, None)
        return seq

    def settle(self, name: str | None, seq: int, ok: bool) -> None:
        """The server answered the change ``seq`` of ``name`` (None: DEALLOCATE ALL).

        A PREPARE or DEALLOCATE that succeeded replaced everything before it; one that
        failed changed nothing, so only its own candidate goes."""
        targets = self._by_name.values() if name is None else \
            [c for c in (self._by_name.get(server_name(name)),) if c is not None]
        for cands in targets:
            if ok:
                cands[:] = [c for c in cands if c[0] >= seq]
            else:
                cands[:] = [c for c in cands if c[0] != seq]
        # A name whose only candidates are "deallocated" is free, like one never seen.
        for key in [k for k, c in self._by_name.items() if all(st is None for _, st in c)]:
            del self._by_name[key]

    def drop(self, key: str) -> None:
        """A protocol Parse or Close changed ``key``: what SQL EXECUTE of it runs is
        unknown from now on (the name is forgotten, so EXECUTE of it is UNKNOWN)."""
        self._by_name.pop(key, None)

    def lookup(self, name: str) -> Statement | None:
        """The riskiest definition the server may hold under ``name``; None when the name
        is unknown here (or may be free, which the server would refuse anyway)."""
        name = server_name(name)
        cands = [st for _, st in self._by_name.get(name, ()) if st is not None]
        if not cands or any(st == _UNKNOWABLE for st in cands):  # (== survives pickling)
            return None
        top = cands[0]
        for other in cands[1:]:
            top = _merge_candidates(name, top, other)
        return top

    def texts(self, name: str) -> tuple[str, ...]:
        """The text of every definition the server may hold under ``name`` ("" for
        none): what an EXECUTE of it may run, for binding an approval to."""
        return tuple("" if st is None else st.text
                     for _, st in self._by_name.get(server_name(name), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.lookup(name) is not None

    def __len__(self) -> int:
        return len(self._by_name)


# A placeholder candidate: the name's definition cannot be told (see MAX_CANDIDATES).
_UNKNOWABLE = Statement("", C.UNKNOWN, "UNKNOWN", (), (), ("too many unanswered changes",),
                        None, False, None, False)


def _merge_candidates(name: str, old: Statement, new: Statement) -> Statement:
    top = new if new.cls.risk >= old.cls.risk else old
    note = f"{name} may hold more than one definition on the server; assuming the riskiest"
    return Statement(
        text=new.text, cls=top.cls, command=top.command,
        tables=_unique([*old.tables, *new.tables]),
        functions=_unique([*old.functions, *new.functions]),
        reasons=_unique([note, *top.reasons, *old.reasons, *new.reasons]),
        forbidden=old.forbidden or new.forbidden, is_dml=old.is_dml or new.is_dml,
        prepared_name=name, literal_dependent=old.literal_dependent or new.literal_dependent,
        unqualified=_unique([*old.unqualified, *new.unqualified]),
        facts=old.facts | new.facts, refs=tuple(dict.fromkeys([*old.refs, *new.refs])),
        defines=tuple(dict.fromkeys([*old.defines, *new.defines])),
        opaque=_unique([*old.opaque, *new.opaque]),
    )


# --- catalogue, converted once so a typo in catalogue.py fails at import -------------------

Entry = tuple[StatementClass, str]


def _entries(data: Mapping[str, tuple[str, str]]) -> dict[str, Entry]:
    return {name: (StatementClass(cls), reason) for name, (cls, reason) in data.items()}


_BUILTINS = _entries(catalogue.BUILTIN_FUNCTIONS)
_EXTENSIONS = _entries(catalogue.EXTENSION_FUNCTIONS)


def _builtin_names() -> frozenset[str]:
    # Every function name in pg_catalog (scripts/gen_pg_builtins.py); one per line, "#" starts
    # a comment line.  A missing or empty file fails the import rather than silently making
    # every built-in an unknown function.
    text = resources.files("keyturn.analysis").joinpath("pg_builtins.txt").read_text("utf-8")
    names = frozenset(line.strip() for line in text.splitlines()
                      if line.strip() and not line.lstrip().startswith("#"))
    if not names:
        raise RuntimeError("keyturn/analysis/pg_builtins.txt lists no functions")
    return names


#: Built-in function names; one with no catalogue entry only computes or reads (READ).
_BUILTIN_NAMES = _builtin_names()
_BUILTIN_READ: Entry = (StatementClass.READ, "")
_SETTINGS = _entries(catalogue.SETTINGS)
_SETTING_PREFIXES = _entries(catalogue.SETTING_PREFIXES)
_STATIC = _entries(catalogue.STATEMENTS)
_DROPS = _entries(catalogue.DROP_CLASSES)


def _struct_fields() -> dict[str, dict[str, str]]:
    # parse_sql_json writes a field whose C type is a specific struct (RangeVar *relation,
    # FuncCall *funccall, ...) without the {"NodeName": ...} wrapper that Node * fields get,
    # so the walker needs pglast's slot types to know what such a dict is.
    names = {n for n, obj in vars(pglast.ast).items()
             if isinstance(obj, type) and issubclass(obj, pglast.ast.Node)}
    out: dict[str, dict[str, str]] = {}
    for name in names:
        slots = getattr(getattr(pglast.ast, name), "__slots__", None)
        if not isinstance(slots, dict):
            continue
        fields = {field: info.c_type.rstrip("*") for field, info in slots.items()
                  if info.c_type.rstrip("*") in names - {"Node", "Expr"}}
        if fields:
            out[name] = fields
    return out


_FIELD_TYPES = _struct_fields()
_NODE_NAMES = frozenset(n for n, obj in vars(pglast.ast).items() if isinstance(obj, type))
_NO_FIELDS: dict[str, str] = {}
_NO_CTES: frozenset[str] = frozenset()
# Nodes that cannot contain a relation, a function call or a statement.
_LEAVES = frozenset({"String", "Integer", "Float", "Boolean", "BitString", "A_Const", "A_Star",
                     "ParamRef", "SQLValueFunction", "RoleSpec", "Alias"})
# Statement kinds that may be served from the normalized-text cache (see Analyzer): common
# statements whose classification reads no constant except where it says so (literal
# flag).  Everything else is cached by exact text only.
_SHAPE_KINDS = frozenset({
    "SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "ExplainStmt",
    "CopyStmt", "TransactionStmt", "VariableShowStmt", "VariableSetStmt", "FetchStmt",
    "ClosePortalStmt", "DeclareCursorStmt", "ListenStmt", "UnlistenStmt", "NotifyStmt",
    "LockStmt", "CallStmt", "DoStmt",
})
_TABLE_OBJECTS = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW",
                            "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE", "OBJECT_INDEX"})
_RUN, _PLAN = "run", "plan"


def _names(items: Any) -> list[str]:
    # A qualified name is a list of {"String": {"sval": ...}} nodes.
    out = []
    for item in items or ():
        value = item.get("String") if isinstance(item, dict) else None
        out.append(value.get("sval", "") if isinstance(value, dict) else "?")
    return out


def _literal(node: Any) -> str | None:
    """The text of a constant argument, or None when it is not a plain constant.

    A cast is not looked through: ``'statement_timeoutX'::varchar(17)`` or
    ``'05'::char(1)`` is another text on the server than the constant inside it (and a
    type name may resolve to a user's domain), so a cast constant cannot be read."""
    if not isinstance(node, dict) or len(node) != 1:
        return None
    ((kind, body),) = node.items()
    if kind != "A_Const" or body.get("isnull"):
        return None
    for field in ("sval", "ival", "fval", "boolval", "bsval"):
        if field in body:
            value = body[field].get(field)
            if field == "boolval":
                return "true" if value else "false"
            return str(value if value is not None else 0 if field == "ival" else "")
    return None


_NAME_PART = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([^".\s]+))\s*')


def _relation_name(text: str) -> list[str] | None:
    """A relation name as regclass input reads it (dots between parts, quoted parts kept,
    others folded to lower case), or None when it is not one."""
    parts: list[str] = []
    pos = 0
    while True:
        m = _NAME_PART.match(text, pos)
        if m is None or m.end() == pos:
            return None
        quoted, plain = m.groups()
        parts.append(quoted.replace('""', '"') if quoted is not None else plain.lower())
        pos = m.end()
        if pos == len(text):
            break
        if text[pos] != ".":
            return None
        pos += 1
    return parts if 1 <= len(parts) <= 3 else None


def _qualify(catalog: str | None, schema: str | None, name: str | None) -> str:
    # Unqualified names are reported in public, the convention policy patterns use too; the
    # real schema depends on the session's search_path, which is not tracked here.
    return ".".join(p for p in (catalog, schema or "public", name) if p)


def _object_word(objtype: str | None) -> str:
    word = (objtype or "OBJECT_UNKNOWN").removeprefix("OBJECT_")
    return {"MATVIEW": "MATERIALIZED VIEW", "FDW": "FOREIGN DATA WRAPPER",
            "FOREIGN_SERVER": "SERVER"}.get(word, word.replace("_", " "))


class _Walk:
    """Walks one top-level statement's JSON tree and collects its findings."""

    __slots__ = ("an", "prepared", "text", "findings", "tables", "functions", "forbidden",
                 "literal", "session_bound", "effects", "mode", "in_cte", "wrapper", "is_dml",
                 "prepared_name", "unqualified", "search_path", "facts", "refs", "defines",
                 "opaque", "opaque_reasons")

    def __init__(self, analyzer: Analyzer, prepared: PreparedStatements | None, text: str):
        self.an, self.prepared, self.text = analyzer, prepared, text
        self.findings: list[tuple[StatementClass, str]] = []
        self.tables: dict[str, None] = {}
        self.functions: dict[str, None] = {}
        self.forbidden: str | None = None
        self.literal = False
        self.session_bound = False
        self.effects: list[tuple[str, str, Statement | None]] = []
        self.mode = _RUN
        self.in_cte = 0
        self.wrapper: str | None = None
        self.is_dml = False
        self.prepared_name: str | None = None
        self.unqualified: dict[str, None] = {}
        self.search_path: tuple[str, ...] | None = None
        self.facts: set[str] = set()
        self.refs: dict[Ref, None] = {}
        self.opaque: dict[str, None] = {}
        self.opaque_reasons: set[str] = set()  # findings that are calls of unknown functions
        self.defines: dict[Ref, None] = {}

    # -- results ---------------------------------------------------------------------------

    def add(self, cls: StatementClass, reason: str) -> None:
        self.findings.append((cls, reason))

    def forbid(self, reason: str) -> None:
        self.forbidden = self.forbidden or reason

    def statement(self, kind: str, body: dict[str, Any]) -> Statement:
        self.stmt(kind, body, _NO_CTES, top=True)
        cls = self._class(kind, self.findings)
        known = self._class(kind, [f for f in self.findings if f[1] not in self.opaque_reasons]) \
            if self.opaque_reasons else None
        # Reasons for the final class first, then the rest by risk; sorted() is stable, so
        # walk order breaks ties.
        ordered = sorted(self.findings, key=lambda f: (f[0] is not cls, -f[0].risk))
        return Statement(
            text=self.text, cls=cls,
            command=_command(kind, body), tables=tuple(self.tables),
            functions=tuple(self.functions), reasons=_unique(r for _, r in ordered),
            forbidden=self.forbidden, is_dml=self.is_dml, prepared_name=self.prepared_name,
            literal_dependent=self.literal, unqualified=tuple(self.unqualified),
            search_path=self.search_path, facts=frozenset(self.facts),
            refs=tuple(self.refs), defines=tuple(self.defines), opaque=tuple(self.opaque),
            known_cls=known,
        )

    def _class(self, kind: str, findings: list[tuple[StatementClass, str]]) -> StatementClass:
        cls = riskiest((f[0] for f in findings), C.UNKNOWN)
        if kind == "SelectStmt" and cls is C.READ and not self.tables and any(
                f[0] is C.SESSION for f in findings):
            # SELECT set_config(...) / pg_advisory_lock(...) reading no table is, in effect,
            # a session command.  Only table-less SELECTs, so no data read is relabelled.
            cls = C.SESSION
        return cls

    def merge(self, other: Statement) -> None:
        self.refs.update(dict.fromkeys(other.refs))
        self.defines.update(dict.fromkeys(other.defines))
        self.tables.update(dict.fromkeys(other.tables))
        self.unqualified.update(dict.fromkeys(other.unqualified))
        self.functions.update(dict.fromkeys(other.functions))
        self.opaque.update(dict.fromkeys(other.opaque))
        if other.forbidden:
            self.forbid(other.forbidden)
        self.literal = self.literal or other.literal_dependent

    # -- generic traversal -----------------------------------------------------------------

    def node(self, kind: str, body: dict[str, Any], ctes: frozenset[str]) -> None:
        if kind in _LEAVES:
            return
        if kind in _STMT_KINDS:
            self.stmt(kind, body, ctes, top=False)
            return
        handler = _NODE_HANDLERS.get(kind)
        if handler is not None:
            handler(self, body, ctes)
            return
        if kind.endswith("Stmt"):
            self.add(C.UNKNOWN, f"unrecognised statement type {kind}")
        self.children(kind, body, ctes)

    def children(self, kind: str, body: dict[str, Any], ctes: frozenset[str],
                 skip: tuple[str, ...] = ()) -> None:
        # json.loads only makes dict, list, str, int, float, bool and None, so exact type
        # checks are safe here (and this loop is the analyser's hot spot).
        types = _FIELD_TYPES.get(kind, _NO_FIELDS)
        for field, value in body.items():
            kind_of = type(value)
            if kind_of is dict:
                if not value or field in skip:
                    continue
                sub = types.get(field)
                if sub is None or (len(value) == 1 and next(iter(value)) in _NODE_NAMES):
                    # A Node * field, or (defensively) a struct field that arrived wrapped.
                    self.tagged(value, ctes)
                else:
                    self.node(sub, value, ctes)
            elif kind_of is list and field not in skip:
                self.items(value, ctes)

    def tagged(self, value: dict[str, Any], ctes: frozenset[str]) -> None:
        for kind, body in value.items():
            kind_of = type(body)
            if kind_of is dict:
                if kind not in _LEAVES:
                    self.node(kind, body, ctes)
            elif kind_of is list:
                self.items(body, ctes)

    def items(self, values: list[Any], ctes: frozenset[str]) -> None:
        for value in values:
            kind_of = type(value)
            if kind_of is dict:
                self.tagged(value, ctes)
            elif kind_of is list:
                self.items(value, ctes)

    def wrapped(self, query: Any, ctes: frozenset[str], label: str, mode: str = _RUN) -> None:
        saved = self.wrapper, self.mode
        self.wrapper = label
        self.mode = _PLAN if _PLAN in (mode, self.mode) else _RUN
        try:
            if isinstance(query, dict):
                self.tagged(query, ctes)
        finally:
            self.wrapper, self.mode = saved

    def with_clause(self, clause: Any, ctes: frozenset[str]) -> frozenset[str]:
        if not clause:
            return ctes
        items = [c.get("CommonTableExpr", {}) for c in clause.get("ctes") or ()]
        names = [c.get("ctename", "") for c in items]
        visible_all = ctes | frozenset(names)
        self.in_cte += 1
        try:
            for i, cte in enumerate(items):
                # A non-recursive CTE sees only the CTEs before it; a same-named table
                # referenced earlier is a real table and must be reported.
                seen = visible_all if clause.get("recursive") else ctes | frozenset(names[:i])
                self.children("CommonTableExpr", cte, seen)
        finally:
            self.in_cte -= 1
        return visible_all

    # -- relations and functions -----------------------------------------------------------

    def relation(self, body: Any, ctes: frozenset[str]) -> str | None:
        if not isinstance(body, dict):
            return None
        schema, catalog = body.get("schemaname"), body.get("catalogname")
        name = body.get("relname")
        if not name or (not schema and not catalog and name in ctes):
            return None
        qualified = _qualify(catalog, schema, name)
        self.tables[qualified] = None
        if not schema and not catalog:
            self.unqualified[name] = None
        if (name in catalogue.READS_ANY_TABLE and schema in (None, "pg_catalog")) or \
                name in catalogue.READS_ANY_TABLE_ANYWHERE:
            # Planner statistics and statement texts hold values of any table.
            self.tables[catalogue.ANY_TABLE] = None
        return qualified

    def call(self, names: list[str], args: list[Any]) -> None:
        if not names:
            self.add(C.UNKNOWN, "function call without a name")
            return
        self.refs[("f", *_split(names))] = None
        qualified, entry = self.an.resolve(names)
        self.functions[qualified] = None
        if entry is None:
            self.opaque[qualified] = None
            cls = self.an.unknown_function_class
            if self.mode == _PLAN:
                # The planner may evaluate immutable or stable user functions.
                reason = f"function {qualified} is not in the catalogue and may run while " \
                    "planning"
            else:
                reason = f"function {qualified} is not in the catalogue (treated as " \
                    f"{cls.value})"
            self.add(cls, reason)
            self.opaque_reasons.add(reason)
            return
        cls, reason = entry
        if qualified == "pg_catalog.set_config":
            cls, reason = self.set_config(args)
        elif qualified in catalogue.READS_ANY_TABLE_FUNCTIONS:
            self.tables[catalogue.ANY_TABLE] = None
        elif qualified in catalogue.RELATION_ARGUMENT_FUNCTIONS:
            self.relation_argument(args[0] if args else None)
        if self.mode == _PLAN:
            return  # catalogued side effects are all volatile functions: never run by planning
        self.add(cls, f"function {qualified} {reason}" if reason else "")

    def relation_argument(self, arg: Any) -> None:
        """A function argument naming a relation (``'vault.s_seq'``, as regclass reads
        it): that relation is read; a name that is not a plain constant may be any."""
        self.literal = True  # what it reads depends on the constant
        if isinstance(arg, dict) and "TypeCast" in arg:
            # 'name'::regclass (how stored defaults spell nextval's argument) reads the
            # constant like the function's own regclass argument does; regclass is always
            # the built-in type (pg_catalog is searched first).
            cast = arg["TypeCast"]
            type_name = cast.get("typeName") or {}
            if _names(type_name.get("names")) in (["regclass"], ["pg_catalog", "regclass"]) \
                    and not type_name.get("arrayBounds"):
                arg = cast.get("arg")
        text = _literal(arg) if arg is not None else None
        parts = _relation_name(text) if text is not None else None
        if parts is None:
            self.tables[catalogue.ANY_TABLE] = None
            return
        self.tables[_qualify(*([None] * (3 - len(parts))), *parts)] = None
        if len(parts) == 1:
            self.unqualified[parts[0]] = None

    def operator(self, names: list[str]) -> None:
        if names:
            self.refs[("o", *_split(names))] = None

    def set_config(self, args: list[Any]) -> Entry:
        self.literal = True
        name = _literal(args[0]) if args else None
        if name is None:
            self.forbid("set_config() with a setting name that is not a constant")
            return C.SESSION, "changes a session setting that cannot be determined"
        value = _literal(args[1]) if len(args) > 1 else None
        if name.strip().lower() == "search_path":
            self.search_path = search_path_schemas(value)
        return self.setting("set_config()", name.strip().lower(), value, has_value=True)

    def setting(self, verb: str, name: str, value: str | None, *, has_value: bool) -> Entry:
        if name in catalogue.IDENTITY_SETTINGS:
            self.forbid(f"{verb} {name} changes the database role of the session")
        elif name == "standard_conforming_strings" and has_value:
            self.literal = True
            if value is None or value.strip().lower() not in catalogue.TRUE_WORDS:
                self.forbid(f"{verb} standard_conforming_strings other than on changes how "
                            "string literals are read")
        elif name == "client_encoding" and has_value:
            self.literal = True
            refused = client_encoding_refusal(value)
            if refused is not None:
                self.forbid(f"{verb} client_encoding {refused}")
        elif name in catalogue.READ_ONLY_SETTINGS:
            self.literal = True
            if not has_value or value is None or not _truthy(value):
                self.forbid(f"{verb} {name} other than on would give the session write "
                            "access, which keyturn grants statement by statement")
        elif name in catalogue.SAFETY_SETTINGS:
            self.literal = True
            kind = catalogue.SAFETY_SETTINGS[name]
            if not has_value or value is None or _disables(kind, value):
                return C.SAFETY, f"turns off a safety setting ({name})"
            if kind == "duration":
                # Raising it above the target's own value weakens the guard too; the
                # target's value is in its catalog (keyturn.analysis.usercode).
                self.refs[("s", name, str(_milliseconds(value)))] = None
        entry = _SETTINGS.get(name) or next(
            (e for prefix, e in _SETTING_PREFIXES.items() if name.startswith(prefix)), None)
        if entry is None and name.startswith("transaction"):
            return C.TRANSACTION, "changes transaction characteristics"
        return entry or (C.SESSION, "changes a session setting")

    def transaction_mode(self, verb: str, options: Iterable[Any], *,
                         begin: bool = False) -> str | None:
        """"on" / "off" for a READ ONLY / READ WRITE option, None when there is none.

        The gateway holds the target session's read/write mode: SET TRANSACTION / SET
        SESSION CHARACTERISTICS ... READ WRITE are refused. BEGIN READ WRITE is allowed
        (``begin``): every transaction a client opens is made read-write by the gateway,
        which guards the reads inside it with read-only savepoints."""
        mode = None
        for option in options:  # the server applies them in order: the last one counts
            elem = option.get("DefElem") if isinstance(option, dict) else None
            if not elem or elem.get("defname") != "transaction_read_only":
                continue
            value = _literal(elem.get("arg"))
            mode = "on" if value is not None and _truthy(value) else "off"
        if mode == "off" and not begin:
            self.forbid(f"{verb} asks for write access, which keyturn grants statement "
                        "by statement")
        return mode

    # -- statements --------------------------------------------------------------------------

    def stmt(self, kind: str, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        if kind in _DEFINING:
            self.defines.update(dict.fromkeys(_defined(kind, body)))
        if kind in _REACHING:
            for table, why in _reach(kind, body):
                self.tables[table] = None
                if why and self.mode == _RUN:
                    self.add(C.DDL, why)
            if kind == "AlterTableStmt" and (body.get("objtype") == "OBJECT_TYPE" or any(
                    (c.get("AlterTableCmd") or {}).get("subtype") in _ROW_TYPE_CHANGES
                    for c in body.get("cmds") or ())):
                # Its row type (or the composite type) may be a column type of other tables,
                # whose stored values change: the target's catalog says which (usercode).
                self.facts.add("row_type")
        handler = _STMT_HANDLERS.get(kind)
        if handler is not None:
            handler(self, body, ctes, top)
            return
        static = _STATIC.get(kind)
        if static is None:
            self.add(C.UNKNOWN, f"unrecognised statement type {kind}")
        elif self.mode == _RUN:
            self.add(static[0], static[1] if top else f"nested {static[1]}")
        self.children(kind, body, ctes)

    def _s_SelectStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        if top:
            self.add(C.READ, "VALUES computes rows" if body.get("valuesLists")
                     else "SELECT reads data")
        into = body.get("intoClause")
        if into and self.mode == _RUN:
            target = self.relation(into.get("rel"), _NO_CTES)
            self.add(C.DDL, f"SELECT INTO creates table {target}")
        for clause in body.get("lockingClause") or ():
            strength = clause.get("LockingClause", {}).get("strength", "")
            words = catalogue.LOCK_STRENGTHS.get(strength, "FOR UPDATE/SHARE")
            if self.mode == _RUN:
                self.add(C.LOCK, f"SELECT {words} locks the rows it reads, blocking other "
                                 "sessions' writes")
        ctes = self.with_clause(body.get("withClause"), ctes)
        # lockingClause names aliases (FOR UPDATE OF o), not tables.
        self.children("SelectStmt", body, ctes, skip=("withClause", "intoClause",
                                                      "lockingClause"))

    def _dml(self, kind: str, verb: str, body: dict[str, Any], ctes: frozenset[str],
             top: bool) -> None:
        rel = body.get("relation")
        target = self.relation(rel, _NO_CTES)  # a DML target is always a real table
        if isinstance(rel, dict) and rel.get("relname") == "pg_settings" and \
                rel.get("schemaname") in (None, "pg_catalog"):
            self.forbid(f"{verb} pg_settings changes session settings, including the role")
        label, self.wrapper = self.wrapper, None
        if self.mode == _RUN:
            if top:
                self.add(C.WRITE, f"{verb} {target} modifies rows")
            elif self.in_cte:
                self.add(C.WRITE, f"data-modifying CTE: {verb} {target}")
            else:
                self.add(C.WRITE, f"{label or 'nested statement'}: {verb} {target}")
        if top:
            self.is_dml = True
        ctes = self.with_clause(body.get("withClause"), ctes)
        self.children(kind, body, ctes, skip=("relation", "withClause"))

    def _s_InsertStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        self._dml("InsertStmt", "INSERT", body, ctes, top)

    def _s_UpdateStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        self._dml("UpdateStmt", "UPDATE", body, ctes, top)

    def _s_DeleteStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        self._dml("DeleteStmt", "DELETE", body, ctes, top)

    def _s_MergeStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        self._dml("MergeStmt", "MERGE", body, ctes, top)

    def _s_ExplainStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        if _explain_analyze(body.get("options") or ()):
            self.add(C.READ, "EXPLAIN ANALYZE executes the statement")
            self.wrapped(body.get("query"), ctes, "EXPLAIN ANALYZE executes")
        else:
            self.add(C.READ, "EXPLAIN without ANALYZE only plans the statement")
            self.wrapped(body.get("query"), ctes, "EXPLAIN plans", _PLAN)

    def _s_CopyStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        target = self.relation(body.get("relation"), _NO_CTES)
        direction = "FROM" if body.get("is_from") else "TO"
        if body.get("is_program"):
            self.add(C.FILE, f"COPY {direction} PROGRAM runs a command on the server")
        elif body.get("filename") is not None:
            self.add(C.FILE, f"COPY {direction} a file reads or writes the server's file system")
        elif body.get("is_from"):
            self.add(C.WRITE, f"COPY FROM STDIN loads rows into {target}")
            self.facts.add("copy_in")
        else:
            self.add(C.READ, "COPY TO STDOUT reads data")
        self.wrapped(body.get("query"), ctes, "COPY runs")
        self.children("CopyStmt", body, ctes, skip=("relation", "query"))

    def _s_CreateTableAsStmt(self, body: dict[str, Any], ctes: frozenset[str],
                             top: bool) -> None:
        into = body.get("into") or {}
        target = self.relation(into.get("rel"), _NO_CTES)
        what = _object_word(body.get("objtype", "OBJECT_TABLE")).lower()
        if self.mode == _RUN:
            self.add(C.DDL, f"CREATE {what.upper()} AS creates {what} {target}")
        self.wrapped(body.get("query"), ctes, f"CREATE {what.upper()} AS runs")
        self.children("IntoClause", into, ctes, skip=("rel",))

    def _s_DeclareCursorStmt(self, body: dict[str, Any], ctes: frozenset[str],
                             top: bool) -> None:
        self.add(C.READ, "DECLARE CURSOR runs its query as rows are fetched")
        if int(body.get("options") or 0) & _CURSOR_OPT_HOLD:
            self.facts.add("hold_cursor")
        self.wrapped(body.get("query"), ctes, "cursor runs")

    def own_name(self, verb: str, name: str) -> None:
        if name.lower().startswith("keyturn"):
            self.forbid(f"{verb} {name}: statement names starting with keyturn are the "
                        "gateway's own")

    def _s_PrepareStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        name = body.get("name", "")
        self.own_name("PREPARE", name)
        query = body.get("query") or {}
        if len(query) != 1:
            self.add(C.UNKNOWN, "PREPARE without a statement")
            return
        ((kind, inner_body),) = query.items()
        inner = _Walk(self.an, self.prepared, self.text)
        inner.items(body.get("argtypes") or [], ctes)  # PREPARE p(mydomain): its checks
        remembered = inner.statement(kind, inner_body)
        remembered = _with_name(remembered, name)
        # Preparing runs nothing; the remembered class applies at EXECUTE.
        self.add(C.SESSION, f"PREPARE {name} stores a {remembered.cls.value} statement "
                            f"({remembered.command}) for a later EXECUTE")
        self.merge(remembered)
        self.effects.append(("prepare", name, remembered))
        self.session_bound = True
        if top:
            self.prepared_name = name

    def _s_ExecuteStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        name = body.get("name", "")
        self.own_name("EXECUTE", name)
        self.session_bound = True
        remembered = self.prepared.lookup(name) if self.prepared is not None else None
        if remembered is None:
            self.add(C.UNKNOWN, f"EXECUTE of prepared statement {name}, whose PREPARE was "
                                "not seen in this session")
        else:
            self.add(remembered.known_cls or remembered.cls,
                     f"EXECUTE of prepared {name}: {remembered.command} "
                     f"({remembered.cls.value})")
            if remembered.known_cls is not None:
                reason = f"EXECUTE of prepared {name}: it calls functions keyturn does not know"
                self.add(remembered.cls, reason)
                self.opaque_reasons.add(reason)
            for reason in remembered.reasons:
                self.add(C.TRANSACTION, reason)  # explanation only; the class is counted above
            self.merge(remembered)
        if top:
            self.prepared_name = name
        self.children("ExecuteStmt", body, ctes)

    def _s_DeallocateStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        self.session_bound = True
        if body.get("isall"):
            self.add(C.SESSION, "DEALLOCATE ALL forgets every prepared statement")
            self.effects.append(("forget_all", "", None))
        else:
            name = body.get("name", "")
            self.own_name("DEALLOCATE", name)
            self.add(C.SESSION, f"DEALLOCATE forgets prepared statement {name}")
            self.effects.append(("forget", name, None))
            self.prepared_name = name

    def _s_DiscardStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        target = body.get("target", "")
        if target == "DISCARD_ALL":
            self.add(C.SESSION, "DISCARD ALL resets the session")
            self.forbid("DISCARD ALL runs SET SESSION AUTHORIZATION DEFAULT and RESET ALL")
            self.effects.append(("forget_all", "", None))
            self.session_bound = True
        else:
            self.add(C.SESSION, f"DISCARD {target.removeprefix('DISCARD_')} drops session state")

    def _s_VariableSetStmt(self, body: dict[str, Any], ctes: frozenset[str],
                           top: bool) -> None:
        if not top:
            # SET clauses of CREATE FUNCTION, ALTER ROLE/DATABASE/SYSTEM configure other
            # sessions or code; their parent statement decides the class.
            return
        kind = body.get("kind", "")
        name = str(body.get("name", "")).lower()
        verb = "RESET" if kind.startswith("VAR_RESET") else "SET"
        if body.get("is_local"):
            verb += " LOCAL"
        if kind == "VAR_RESET_ALL":
            # role and session_authorization are exempt from RESET ALL in PostgreSQL; the
            # safety settings are not: it is RESET statement_timeout, lock_timeout, ...
            # at once, which is class SAFETY like each of them.
            self.literal = True
            self.add(C.SAFETY, "RESET ALL turns the safety settings back to their defaults "
                               f"({', '.join(catalogue.SAFETY_SETTINGS)})")
            self.search_path = DEFAULT_SEARCH_PATH
            return
        if name in ("transaction", "session characteristics"):
            # SET TRANSACTION / SET SESSION CHARACTERISTICS AS TRANSACTION ...
            self.transaction_mode(f"SET {name.upper()} ... READ WRITE",
                                  body.get("args") or ())
            self.add(C.TRANSACTION if name == "transaction" else C.SESSION,
                     f"SET {name.upper()} changes transaction characteristics")
            return
        args = body.get("args") or []
        value = _literal(args[0]) if kind == "VAR_SET_VALUE" and len(args) == 1 else None
        has_value = kind in ("VAR_SET_VALUE", "VAR_SET_CURRENT")
        if name == "search_path":
            self.literal = True  # the schemas are constants: never share a cached shape
            if kind == "VAR_SET_VALUE":
                parts = [_literal(a) for a in args]
                self.search_path = search_path_schemas(
                    None if None in parts else ",".join(p or "" for p in parts))
            elif kind == "VAR_SET_CURRENT":
                self.search_path = ("*",)
            else:  # RESET search_path, SET search_path TO DEFAULT
                self.search_path = DEFAULT_SEARCH_PATH
        cls, reason = self.setting(verb, name, value, has_value=has_value)
        self.add(cls, f"{verb} {name} {reason}")

    def _s_TransactionStmt(self, body: dict[str, Any], ctes: frozenset[str],
                           top: bool) -> None:
        kind = body.get("kind", "")
        words = catalogue.TRANSACTION_COMMANDS.get(kind, "transaction statement")
        fact = _TRANSACTION_FACTS.get(kind)
        if fact is not None:
            self.facts.add(fact)
        savepoint = str(body.get("savepoint_name") or "")
        if savepoint.lower().startswith("keyturn"):
            self.forbid(f"savepoint names starting with keyturn are the gateway's own "
                        f"({savepoint})")
        if body.get("chain"):
            self.facts.add("chain")
        if kind in ("TRANS_STMT_BEGIN", "TRANS_STMT_START"):
            mode = self.transaction_mode(f"{words} READ WRITE", body.get("options") or (),
                                         begin=True)
            if mode == "on":
                self.facts.add("begin_ro")
        if kind in ("TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED",
                    "TRANS_STMT_ROLLBACK_PREPARED"):
            self.add(C.ADMIN, f"{words} is two-phase commit: it can finish work that was not "
                              "reviewed in this session")
        else:
            self.add(C.TRANSACTION, f"{words} controls the transaction")

    def _s_CallStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        call = body.get("funccall") or {}
        qualified, _ = self.an.resolve(_names(call.get("funcname")))
        self.add(C.PROCEDURAL, f"CALL runs procedure {qualified}")
        self.node("FuncCall", call, ctes)

    def _s_DropStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        objtype = body.get("removeType", "")
        cls, reason = _DROPS.get(objtype, (C.DDL, "changes the schema"))
        if self.mode == _RUN:
            self.add(cls, f"DROP {_object_word(objtype)} {reason}")
        if objtype in _TABLE_OBJECTS:
            for obj in body.get("objects") or ():
                names = _names((obj.get("List") or {}).get("items"))
                if names:
                    self.tables[_qualify(*([None] * (3 - len(names))), *names[-3:])] = None
                    if len(names) == 1:
                        self.unqualified[names[0]] = None

    def _s_AlterTableStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        target = self.relation(body.get("relation"), _NO_CTES)
        word = _object_word(body.get("objtype", "OBJECT_TABLE"))
        self.add(C.DDL, f"ALTER {word} {target} changes the schema")
        for cmd in body.get("cmds") or ():
            subtype = (cmd.get("AlterTableCmd") or {}).get("subtype", "")
            if subtype in catalogue.ALTER_TABLE_PRIVILEGE_CMDS:
                self.add(C.PRIVILEGE, catalogue.ALTER_TABLE_PRIVILEGE_CMDS[subtype])
        self.children("AlterTableStmt", body, ctes, skip=("relation",))

    def _s_GrantStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        verb = "GRANT" if body.get("is_grant") else "REVOKE"
        self.add(C.PRIVILEGE, f"{verb} changes privileges" if top
                 else f"nested {verb} changes privileges")
        self.children("GrantStmt", body, _NO_CTES, skip=("grantees", "grantor"))

    def _s_GrantRoleStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        verb = "GRANT" if body.get("is_grant") else "REVOKE"
        self.add(C.PRIVILEGE, f"{verb} of role membership changes who can act as whom")

    def _s_RenameStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        if body.get("renameType") == "OBJECT_ROLE":
            self.add(C.PRIVILEGE, "ALTER ROLE ... RENAME changes a role")
        else:
            self.add(C.DDL, f"ALTER {_object_word(body.get('renameType'))} ... RENAME changes "
                            "the schema")
        self.relation(body.get("relation"), _NO_CTES)

    def _s_CreateSchemaStmt(self, body: dict[str, Any], ctes: frozenset[str],
                            top: bool) -> None:
        self.add(C.DDL, "CREATE SCHEMA changes the schema")
        if body.get("authrole"):
            self.add(C.PRIVILEGE, "CREATE SCHEMA AUTHORIZATION sets the schema's owner")
        self.children("CreateSchemaStmt", body, ctes)

    def _s_CreateFunctionStmt(self, body: dict[str, Any], ctes: frozenset[str],
                              top: bool) -> None:
        what = "PROCEDURE" if body.get("is_procedure") else "FUNCTION"
        language, definer = _function_options(body.get("options") or ())
        if language is None or language in catalogue.TRUSTED_LANGUAGES:
            inspected = "its body is analysed" if body.get("sql_body") else \
                "its body is not analysed"
            self.add(C.DDL, f"CREATE {what} stores code that runs later ({inspected})")
        elif language in catalogue.LIBRARY_LANGUAGES:
            self.add(C.FILE, f"CREATE {what} LANGUAGE {language} loads a shared library "
                             "from the server's file system")
        else:
            self.add(C.PROCEDURAL, f"CREATE {what} LANGUAGE {language} stores code that is "
                                   "not analysed")
        if definer:
            self.add(C.PRIVILEGE, "SECURITY DEFINER code runs with its owner's privileges")
        self.children("CreateFunctionStmt", body, ctes, skip=("options",))

    def _s_AlterFunctionStmt(self, body: dict[str, Any], ctes: frozenset[str],
                             top: bool) -> None:
        self.add(C.DDL, "ALTER FUNCTION changes stored code")
        if _function_options(body.get("actions") or ())[1]:
            self.add(C.PRIVILEGE, "SECURITY DEFINER code runs with its owner's privileges")

    def _s_CreateTrigStmt(self, body: dict[str, Any], ctes: frozenset[str], top: bool) -> None:
        qualified, _ = self.an.resolve(_names(body.get("funcname")))
        self.functions[qualified] = None
        self.add(C.DDL, f"CREATE TRIGGER runs {qualified} on future writes")
        self.children("CreateTrigStmt", body, ctes, skip=("funcname",))


#: Statements that change tables they do not name: what depends on a dropped object
#: (CASCADE), the tables of a schema, the table a trigger, rule or policy is on, every
#: column of an enum type.
_REACHING = frozenset({"DropStmt", "TruncateStmt", "AlterTableStmt", "AlterDomainStmt",
                       "AlterEnumStmt", "RenameStmt", "AlterOwnerStmt", "GrantStmt",
                       "AlterDefaultPrivilegesStmt", "AlterObjectSchemaStmt", "CommentStmt",
                       "SecLabelStmt"})
#: Column changes of a table that other tables may use as a column type (its row type).
_ROW_TYPE_CHANGES = frozenset({"AT_DropColumn", "AT_AlterColumnType"})
_ON_TABLE = frozenset({"OBJECT_TRIGGER", "OBJECT_RULE", "OBJECT_POLICY"})


def _schema_tables(name: Any) -> str | None:
    return f"{name}.*" if isinstance(name, str) and name else None


def _reach(kind: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    """(table, why) for each table ``kind`` changes without naming it; ``*`` is any."""
    out: list[tuple[str, str]] = []
    behaviors = [body.get("behavior")]
    if kind == "AlterTableStmt":
        behaviors += [(c.get("AlterTableCmd") or {}).get("behavior")
                      for c in body.get("cmds") or ()]
    if "DROP_CASCADE" in behaviors:
        out.append((catalogue.ANY_TABLE, "CASCADE also changes or drops whatever depends on "
                                         "it, in any table"))
    if kind == "AlterDomainStmt":
        # Every column of the domain, in any table: a new constraint is validated by reading
        # them (its errors show their values), a default or NOT NULL changes their writes.
        out.append((catalogue.ANY_TABLE, "ALTER DOMAIN changes and checks every column of "
                                         "the domain, in any table"))
    if kind in ("CommentStmt", "SecLabelStmt") and body.get("objtype") in (
            "OBJECT_TABLE", "OBJECT_COLUMN", "OBJECT_VIEW", "OBJECT_MATVIEW",
            "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE", "OBJECT_INDEX"):
        names = _names((body.get("object") or {}).get("List", {}).get("items"))
        if body.get("objtype") == "OBJECT_COLUMN":
            names = names[:-1]
        if names:
            out.append((_qualify(*([None] * (3 - len(names))), *names[-3:]), ""))
    if kind == "AlterEnumStmt" and body.get("oldVal"):
        out.append((catalogue.ANY_TABLE, "renaming an enum value changes what every column "
                                         "of the type reads"))
    if kind == "DropStmt":
        objtype = body.get("removeType")
        for obj in body.get("objects") or ():
            if objtype == "OBJECT_SCHEMA":
                table = _schema_tables((obj.get("String") or {}).get("sval"))
                if table:
                    out.append((table, ""))
            elif objtype == "OBJECT_STATISTIC_EXT":
                names = _names((obj.get("List") or {}).get("items"))
                schema = _schema_tables(names[-2]) if len(names) >= 2 else "public.*"
                out.append((schema or catalogue.ANY_TABLE, ""))
            elif objtype in _ON_TABLE:
                names = _names((obj.get("List") or {}).get("items"))[:-1]
                if names:
                    out.append((_qualify(*([None] * (3 - len(names))), *names[-3:]), ""))
    elif kind == "RenameStmt" and body.get("renameType") == "OBJECT_SCHEMA":
        table = _schema_tables(body.get("subname"))
        if table:
            out.append((table, ""))
    elif kind == "AlterOwnerStmt" and body.get("objectType") == "OBJECT_SCHEMA":
        table = _schema_tables((body.get("object") or {}).get("String", {}).get("sval"))
        if table:
            out.append((table, ""))
    elif kind == "GrantStmt" and body.get("targtype") == "ACL_TARGET_ALL_IN_SCHEMA":
        for obj in body.get("objects") or ():
            table = _schema_tables((obj.get("String") or {}).get("sval"))
            if table:
                out.append((table, ""))
    elif kind == "AlterDefaultPrivilegesStmt":
        for opt in body.get("options") or ():
            d = opt.get("DefElem") or {}
            if d.get("defname") == "schemas":
                for item in (d.get("arg") or {}).get("List", {}).get("items") or ():
                    table = _schema_tables((item.get("String") or {}).get("sval"))
                    if table:
                        out.append((table, ""))
    elif kind == "AlterObjectSchemaStmt":
        table = _schema_tables(body.get("newschema"))
        if table:
            out.append((table, ""))  # moving an object into a schema changes the schema
    return out


_CURSOR_OPT_HOLD = 0x0020
_TRANSACTION_FACTS = {
    "TRANS_STMT_BEGIN": "begin", "TRANS_STMT_START": "begin", "TRANS_STMT_COMMIT": "end",
    "TRANS_STMT_ROLLBACK": "end", "TRANS_STMT_PREPARE": "end",
    "TRANS_STMT_SAVEPOINT": "savepoint", "TRANS_STMT_RELEASE": "sp_destroy",
    "TRANS_STMT_ROLLBACK_TO": "sp_destroy",
}


def client_encoding_refusal(value: str | None) -> str | None:
    """Why a client_encoding value is refused, or None when it names UTF8.

    The one rule for SET, set_config() and the startup packet. The gateway reads every
    message as UTF-8, so the server must read it the same way: the value is normalised as
    PostgreSQL normalises encoding names (lowercased, every character that is not a letter
    or digit dropped: ``UTF-8``, ``utf_8`` and ``'Unicode'`` all name UTF8) and must be
    one of PostgreSQL's names for UTF8. SQL_ASCII gets its own reason: the server takes
    any bytes as they come, so the text it runs could differ from the text analysed.
    """
    if value is None:
        return "with a value keyturn cannot read is refused (use UTF8)"
    name = "".join(c.lower() for c in value if c.isascii() and c.isalnum())
    if name in catalogue.UTF8_NAMES:
        return None
    if name == "sqlascii":
        return ("SQL_ASCII is refused: the server would accept bytes that are not UTF-8, so "
                "keyturn could analyse different text than the server runs (use UTF8)")
    return f"{value!r} is refused: other encodings change how the query text is read (use UTF8)"


def _normal_word(value: str) -> str:
    return value.strip().strip("'\"").lower()


def _truthy(value: str) -> bool:
    return _normal_word(value) in catalogue.TRUE_WORDS


#: A number as the server's integer-setting parser reads it (strtol, or strtod when a
#: fraction or exponent follows), then an optional unit.  Hexadecimal and other forms the
#: server also reads do not match and count as turning the guard off (fail closed).
_DURATION = re.compile(r"[ \t\n\r\f\v]*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
                       r"[ \t\n\r\f\v]*([a-z]*)[ \t\n\r\f\v]*", re.ASCII)


def _disables(kind: str, value: str) -> bool:
    """Whether setting a safety setting of ``kind`` to ``value`` turns its guard off."""
    if kind == "bool":
        return not _truthy(value)
    if kind != "duration":
        return True
    millis = _milliseconds(value)
    return millis is None or millis <= 0


def _milliseconds(value: str) -> float | None:
    """The whole milliseconds the server makes of a duration setting's value, or None.

    Like the server: the number is scaled by its unit (milliseconds when there is none),
    a fraction is rounded to the next smaller unit, then to a whole millisecond, so
    '0.4', '400us' and '1e-9' all mean 0 (no timeout)."""
    match = _DURATION.fullmatch(value)
    if match is None:
        return None
    number, unit = match.groups()
    try:
        amount = float(number)
    except ValueError:
        return None
    units = catalogue.TIME_UNITS_MS
    if unit:
        index = next((i for i, (name, _) in enumerate(units) if name == unit), None)
        if index is None:
            return None
        amount *= units[index][1]
        if index + 1 < len(units):
            smaller = units[index + 1][1]
            amount = round(amount / smaller) * smaller
    return float(round(amount))


def _with_name(statement: Statement, name: str) -> Statement:
    return dataclasses.replace(statement, prepared_name=name)


def _function_options(options: Iterable[Any]) -> tuple[str | None, bool]:
    language, definer = None, False
    for option in options:
        elem = option.get("DefElem") if isinstance(option, dict) else None
        if not elem:
            continue
        arg = elem.get("arg") or {}
        if elem.get("defname") == "language":
            language = str((arg.get("String") or {}).get("sval", "?")).lower()
        elif elem.get("defname") == "security":
            definer = bool((arg.get("Boolean") or {}).get("boolval"))
    return language, definer


def _explain_analyze(options: Iterable[Any]) -> bool:
    for option in options:
        elem = option.get("DefElem") if isinstance(option, dict) else None
        if not elem or str(elem.get("defname", "")).lower() not in ("analyze", "analyse"):
            continue
        arg = elem.get("arg")
        if not arg:
            return True
        # PostgreSQL accepts true/false/on/off/1/0; anything not clearly false counts as
        # ANALYZE so an odd spelling cannot hide an executed statement.
        if "Integer" in arg:
            off = not (arg["Integer"] or {}).get("ival")
        elif "Boolean" in arg:
            off = not (arg["Boolean"] or {}).get("boolval")
        else:
            off = _literal_text(arg) in ("false", "off", "0")
        if not off:
            return True
    return False


def _literal_text(node: dict[str, Any]) -> str:
    for value in node.values():
        if isinstance(value, dict):
            return str(value.get("sval", "")).strip().lower()
    return ""


_STMT_HANDLERS = {name[3:]: fn for name, fn in vars(_Walk).items() if name.startswith("_s_")}
_STMT_KINDS = frozenset(_STMT_HANDLERS) | frozenset(_STATIC)
_BETWEEN = frozenset({"AEXPR_BETWEEN", "AEXPR_NOT_BETWEEN", "AEXPR_BETWEEN_SYM",
                      "AEXPR_NOT_BETWEEN_SYM"})


def _a_expr(w: _Walk, body: dict[str, Any], ctes: frozenset[str]) -> None:
    # Every operator form calls the operator's function: a + b, IN (=, <>), LIKE (~~),
    # DISTINCT FROM and NULLIF (=), ANY/ALL; BETWEEN compares with >= and <=.
    if body.get("kind") in _BETWEEN:
        w.operator([">="])
        w.operator(["<="])
    else:
        w.operator(_names(body.get("name")))
    w.children("A_Expr", body, ctes, skip=("name",))


def _sub_link(w: _Walk, body: dict[str, Any], ctes: frozenset[str]) -> None:
    if body.get("subLinkType") in ("ANY_SUBLINK", "ALL_SUBLINK", "ROWCOMPARE_SUBLINK"):
        w.operator(_names(body.get("operName")) or ["="])  # x IN (SELECT ...) is = ANY
    w.children("SubLink", body, ctes, skip=("operName",))


def _case(w: _Walk, body: dict[str, Any], ctes: frozenset[str]) -> None:
    if body.get("arg"):
        w.operator(["="])  # CASE x WHEN y compares with =
    w.children("CaseExpr", body, ctes)


def _sort_by(w: _Walk, body: dict[str, Any], ctes: frozenset[str]) -> None:
    names = _names(body.get("useOp"))
    w.operator(names)
    if names:
        # Its sort support comes from an operator family holding it: a "u" reference.
        w.refs[("u", *_split(names))] = None
    w.children("SortBy", body, ctes, skip=("useOp",))


def _func_call(w: _Walk, body: dict[str, Any], ctes: frozenset[str]) -> None:
    names = _names(body.get("funcname"))
    args = body.get("args") or []
    w.call(names, args)
    if len(names) == 2 and names[0] == "pg_catalog" and names[1] in _NEWER_QUALIFIED:
        w.refs[("f", "", names[1])] = None   # an older target resolves it by search path
    if names and len(args) == 1 and not body.get("agg_star") and not body.get("over") \
            and "NamedArgExpr" not in args[0]:
        # f(x) is a cast to a type named f when no function takes x exactly (a literal):
        # a domain named like a built-in function runs its checks.
        w.refs[("t", *_split(names))] = None
    w.children("FuncCall", body, ctes, skip=("funcname",))


def _join(w: _Walk, body: dict[str, Any], ctes: frozenset[str]) -> None:
    if body.get("usingClause") or body.get("isNatural"):
        # JOIN ... USING (c) / NATURAL JOIN compare with the column type's = operator,
        # which no text names (a stored view prints only USING): any schema's = may be it.
        w.refs[("o", "*", "=")] = None
    w.children("JoinExpr", body, ctes)


def _type_name(w: _Walk, body: dict[str, Any], ctes: frozenset[str]) -> None:
    # Every type a statement names may run code for its values: a cast, a column
    # definition list (AS t(x mydomain)), a typed PREPARE, a composite holding a domain.
    names = _names(body.get("names"))
    if names:
        w.refs[("t", *_split(names))] = None
    w.children("TypeName", body, ctes, skip=("names",))


def _column_ref(w: _Walk, body: dict[str, Any], ctes: frozenset[str]) -> None:
    # c.fullname may be the function fullname(c) when c has no column of that name.
    fields = body.get("fields") or []
    if len(fields) > 1:
        last = fields[-1].get("String") if isinstance(fields[-1], dict) else None
        if isinstance(last, dict):
            name = str(last.get("sval", ""))
            w.refs[("a", "", name)] = None
            w.refs[("t", "", name)] = None  # ... or a cast to a type of that name


def _indirection(w: _Walk, body: dict[str, Any], ctes: frozenset[str]) -> None:
    for item in body.get("indirection") or ():  # (c).fullname, like c.fullname
        name = item.get("String") if isinstance(item, dict) else None
        if isinstance(name, dict):
            w.refs[("a", "", str(name.get("sval", "")))] = None
            w.refs[("t", "", str(name.get("sval", "")))] = None  # (x).name: a cast too
    w.children("A_Indirection", body, ctes)


#: Syntax the parser (PostgreSQL 18's grammar) reads as SQL/JSON or MERGE constructs, but
#: which an older target (15 has none of it) reads as a call of a function of that name,
#: found through the search path: a user function (or aggregate) so named would run.
#: Each counts as a call of that name; on a target that knows the syntax, a user
#: function so named is merely suspicious, which is the safe side.
_NEWER_SYNTAX = {
    "JsonScalarExpr": "json_scalar", "JsonParseExpr": "json",
    "JsonSerializeExpr": "json_serialize", "JsonArrayConstructor": "json_array",
    "JsonArrayQueryConstructor": "json_array", "JsonObjectConstructor": "json_object",
    "JsonArrayAgg": "json_arrayagg", "JsonObjectAgg": "json_objectagg",
    "MergeSupportFunc": "merge_action", "JsonTable": "json_table",
}
_JSON_FUNC_OPS = {"JSON_QUERY_OP": "json_query", "JSON_VALUE_OP": "json_value",
                  "JSON_EXISTS_OP": "json_exists", "JSON_TABLE_OP": "json_table"}
#: Calls the newer grammar writes as pg_catalog.<name> where an older one resolves the
#: name through the search path (json_object(...) became a keyword in PostgreSQL 16).
_NEWER_QUALIFIED = frozenset({"json_object", "system_user"})


def _newer_syntax(kind: str) -> Any:
    def handler(w: _Walk, body: dict[str, Any], ctes: frozenset[str]) -> None:
        name = _JSON_FUNC_OPS.get(str(body.get("op")), "json_query") \
            if kind == "JsonFuncExpr" else _NEWER_SYNTAX[kind]
        w.refs[("f", "", name)] = None
        w.children(kind, body, ctes)
    return handler


_NODE_HANDLERS = {
    **{k: _newer_syntax(k) for k in (*_NEWER_SYNTAX, "JsonFuncExpr")},
    "RangeVar": lambda w, body, ctes: w.relation(body, ctes),
    "FuncCall": _func_call, "JoinExpr": _join,
    "A_Expr": _a_expr, "SubLink": _sub_link, "CaseExpr": _case, "SortBy": _sort_by,
    "TypeName": _type_name, "ColumnRef": _column_ref, "A_Indirection": _indirection,
}


def _split(names: list[str]) -> tuple[str, str]:
    """(schema or "", name) of a qualified name (a database qualifier is dropped)."""
    return (names[-2] if len(names) > 1 else "", names[-1])


def _rel_ref(rel: Any) -> list[Ref]:
    if not isinstance(rel, dict) or not rel.get("relname"):
        return []
    return [("r", str(rel.get("schemaname") or ""), str(rel["relname"]))]


_DEFINE_KINDS = {"OBJECT_AGGREGATE": "f", "OBJECT_FUNCTION": "f", "OBJECT_PROCEDURE": "f",
                 "OBJECT_ROUTINE": "f", "OBJECT_OPERATOR": "o", "OBJECT_TYPE": "t",
                 "OBJECT_DOMAIN": "t", "OBJECT_VIEW": "r", "OBJECT_MATVIEW": "r",
                 "OBJECT_TABLE": "r", "OBJECT_FOREIGN_TABLE": "r"}


def _object_names(obj: Any) -> list[str]:
    if not isinstance(obj, dict):
        return []
    if "ObjectWithArgs" in obj:
        return _names(obj["ObjectWithArgs"].get("objname"))
    if "List" in obj:
        return _names(obj["List"].get("items"))
    if "TypeName" in obj:
        return _names(obj["TypeName"].get("names"))
    return []


#: Statements that may change what existing relations, types or operators run in ways
#: not followed by name (a table gains a parent's readers, an operator family a member,
#: a type new I/O, an extension anything): they define ANY_OBJECT, so every session of
#: the target judges its statements as if the catalog were unread until it is read again.
_CHANGES_ANYTHING = frozenset({
    "AlterTableStmt", "CreateStatsStmt", "CreateOpClassStmt", "CreateOpFamilyStmt",
    "AlterOpFamilyStmt", "AlterDomainStmt", "AlterTypeStmt", "AlterEnumStmt",
    "CreateConversionStmt", "CreateExtensionStmt", "AlterExtensionStmt",
    "AlterExtensionContentsStmt", "CreateAmStmt", "CreateFdwStmt", "AlterFdwStmt",
    "CreateForeignServerStmt", "AlterForeignServerStmt", "CreateForeignTableStmt",
    "CreateUserMappingStmt", "AlterUserMappingStmt", "AlterFunctionStmt",
    "CreateTransformStmt", "CreateEventTrigStmt", "AlterEventTrigStmt",
    "AlterTSConfigurationStmt", "AlterTSDictionaryStmt", "CreatePLangStmt", "GrantStmt",
    "AlterRoleSetStmt", "AlterDatabaseSetStmt", "AlterSystemStmt", "AlterOwnerStmt",
    "AlterDefaultPrivilegesStmt", "CreateRangeStmt", "CreateEnumStmt",
    "AlterOperatorStmt", "AlterCollationStmt"})
#: What a statement of _CHANGES_ANYTHING defines.
ANY_OBJECT: Ref = ("*", "", "*")


def _defined(kind: str, body: dict[str, Any]) -> list[Ref]:
    """The catalog objects a statement creates or changes (see Statement.defines)."""
    found = _defined_by_name(kind, body)
    if kind in _CHANGES_ANYTHING or (kind == "CreateStmt" and (
            body.get("inhRelations") or body.get("partbound"))) or kind == "CreateCastStmt":
        # (A cast between built-in types may apply anywhere; a type named without a
        # schema may be either.)
        found.append(ANY_OBJECT)
    return found


_FUNCTION_OBJECTS = frozenset({"OBJECT_FUNCTION", "OBJECT_PROCEDURE", "OBJECT_ROUTINE",
                               "OBJECT_AGGREGATE"})


def _defined_by_name(kind: str, body: dict[str, Any]) -> list[Ref]:
    if kind == "CreateFunctionStmt":
        return [("f", *_split(_names(body.get("funcname"))))]
    if kind == "AlterFunctionStmt":
        # SET search_path / config, SECURITY DEFINER, STRICT...: what it runs changes.
        names = _names((body.get("func") or {}).get("objname"))
        return [("f", *_split(names))] if names else []
    if kind == "AlterOwnerStmt" and body.get("objectType") in _FUNCTION_OBJECTS:
        # A SECURITY DEFINER function runs with its (new) owner's rights.
        names = _object_names(body.get("object"))
        return [("f", *_split(names))] if names else []
    if kind == "DefineStmt":
        names = _names(body.get("defnames"))
        what = _DEFINE_KINDS.get(body.get("kind", ""), "t")
        return [(what, *_split(names))] if names else []
    if kind in ("ViewStmt", "RuleStmt", "CreateTrigStmt", "IndexStmt", "AlterTableStmt",
                "CreatePolicyStmt", "AlterPolicyStmt"):
        return _rel_ref(body.get("view") or body.get("relation") or body.get("table"))
    if kind == "CreateCastStmt":
        # A cast's built-in side (pg_catalog.int4) keeps its own casts.
        return [("t", *_split(names)) for side in ("sourcetype", "targettype")
                if (names := _names((body.get(side) or {}).get("names")))
                and names[0] != "pg_catalog"]
    if kind == "CreateDomainStmt":
        return [("t", *_split(_names(body.get("domainname"))))]
    if kind in ("RenameStmt", "AlterObjectSchemaStmt"):
        changed = _DEFINE_KINDS.get(str(body.get("renameType") or body.get("objectType")))
        if changed is None:
            return []
        if kind == "RenameStmt":
            return [(changed, "", str(body.get("newname") or ""))]
        if changed == "r":
            return _rel_ref(body.get("relation"))
        names = _object_names(body.get("object"))
        return [(changed, *_split(names))] if names else []
    return []


_DEFINING = frozenset({"CreateFunctionStmt", "DefineStmt", "ViewStmt", "RuleStmt",
                       "CreateTrigStmt", "IndexStmt", "AlterTableStmt", "CreatePolicyStmt",
                       "AlterPolicyStmt", "CreateCastStmt", "CreateDomainStmt", "RenameStmt",
                       "AlterObjectSchemaStmt", "CreateStmt"}) | _CHANGES_ANYTHING
_CAMEL = re.compile(r"[A-Z]+(?![a-z])|[A-Z][a-z]*")


def _command(kind: str, body: dict[str, Any]) -> str:
    if kind == "SelectStmt":
        return "VALUES" if body.get("valuesLists") else "SELECT"
    if kind == "TransactionStmt":
        return catalogue.TRANSACTION_COMMANDS.get(body.get("kind", ""), "TRANSACTION")
    if kind == "VariableSetStmt":
        return "RESET" if str(body.get("kind", "")).startswith("VAR_RESET") else "SET"
    if kind == "FetchStmt":
        return "MOVE" if body.get("ismove") else "FETCH"
    if kind == "VacuumStmt":
        return "VACUUM" if body.get("is_vacuumcmd") else "ANALYZE"
    if kind in ("GrantStmt", "GrantRoleStmt"):
        return "GRANT" if body.get("is_grant") else "REVOKE"
    if kind == "DropStmt":
        return f"DROP {_object_word(body.get('removeType'))}"
    if kind == "AlterTableStmt":
        return f"ALTER {_object_word(body.get('objtype', 'OBJECT_TABLE'))}"
    if kind == "CreateTableAsStmt":
        return f"CREATE {_object_word(body.get('objtype', 'OBJECT_TABLE'))} AS"
    if kind == "CreateFunctionStmt":
        return "CREATE PROCEDURE" if body.get("is_procedure") else "CREATE FUNCTION"
    if kind in catalogue.COMMANDS:
        return catalogue.COMMANDS[kind]
    if kind in _STMT_KINDS:
        return " ".join(_CAMEL.findall(kind.removesuffix("Stmt"))).upper()
    return "UNKNOWN"


# --- the analyser -------------------------------------------------------------------------

# Texts longer than this are analysed every time rather than pinned in memory as cache keys.
_MAX_CACHED_TEXT = 64 * 1024
#: Longer messages (UTF-8 bytes) are UNKNOWN without being parsed: their parse tree is 10
#: to 25 times their size and walking it holds the gateway's event loop (docs/
#: postgres-gateway.md, "Known limits", has the figures).
MAX_ANALYSED_TEXT = 256 * 1024
#: Messages with more statements than this are UNKNOWN (each costs a walk of its own).
MAX_STATEMENTS = 2000
#: The interpreter's recursion limit while analysing (see Analyzer).
RECURSION_LIMIT = 12_000
MAX_SHAPED_TEXT = _MAX_CACHED_TEXT  # fast_shape gives None for longer texts


class _LRU:
    """A bounded map for the hot path; size 0 disables it.

    When full it starts over rather than tracking recency: a plain dict lookup
    is several times cheaper than an ordered, locked LRU, and a working set
    larger than the cache is re-analysed at the same cost either way. Each
    operation is a single dict call, atomic under the GIL, so threads may
    share it.
    """

    __slots__ = ("_data", "_size")

    def __init__(self, size: int) -> None:
        self._data: dict[Hashable, Any] = {}
        self._size = size

    def get(self, key: Hashable) -> Any:
        return self._data.get(key)

    def put(self, key: Hashable, value: Any) -> None:
        if self._size <= 0:
            return
        if len(self._data) >= self._size:
            self._data.clear()
        self._data[key] = value

    def __len__(self) -> int:
        return len(self._data)


# The cheap shape: texts with no quotes, dollars, backslashes or comments can be
# tokenised by eye, so a bare number there is always a numeric constant. Texts that
# differ only in such numbers are a subset of those pglast.normalize merges.
_UNSAFE_FOR_FAST_SHAPE = re.compile(r"['\"$\\\x00]|--|/\*")
_BARE_NUMBER = re.compile(r"(?<![\w$.])\d+(?:\.\d+)?(?![\w.])", re.ASCII)


def fast_shape(sql: str) -> str | None:
    """The text with every bare numeric constant replaced by 0, or None when the text
    holds anything (quotes, dollars, backslashes, comments) that makes that unsafe.

    About 1 µs, against 10+ µs for ``pglast.parser.normalize``; the gateway keys its
    per-session memo of allowed statements on it (``Analyzer.known_shape``)."""
    # ASCII only: PostgreSQL identifiers may hold any non-ASCII letter or digit, and
    # "t٣" must never look like "t" followed by a number.
    if len(sql) > _MAX_CACHED_TEXT or not sql.isascii() or _UNSAFE_FOR_FAST_SHAPE.search(sql):
        return None
    return _BARE_NUMBER.sub("0", sql)


class Analyzer:
    """Classifies SQL messages.  Thread-safe; share one per gateway.

    Two caches sit in front of the parser.  The first is keyed by the exact text and holds
    any analysis that does not depend on session state.  The second is keyed by the text as
    ``pglast.parser.normalize`` rewrites it (every constant replaced by $n, everything else
    kept), so a statement repeated with other constants is classified without walking its
    tree again; it only holds common statement kinds whose classification read no constant
    (``literal_dependent`` is false).  pg_query's fingerprint is deliberately not used as a
    key: it also ignores schema names and the names of aliased relations, so
    ``SELECT * FROM secrets s`` would share an entry with ``SELECT * FROM public_data s``.
    Statements that PREPARE, EXECUTE or DEALLOCATE are never cached, so session memory is
    updated on every call.
    """

    def __init__(self, *, unknown_function_class: StatementClass = StatementClass.WRITE,
                 cache_size: int = 10_000) -> None:
        if sys.getrecursionlimit() < RECURSION_LIMIT:
            # Generated SQL nests deeper than Python's default allows a tree walk (a sum
            # of 600 terms is 1,200 levels of JSON); deeper still is UNKNOWN.
            sys.setrecursionlimit(RECURSION_LIMIT)
        self.unknown_function_class = StatementClass(unknown_function_class)
        self._by_text = _LRU(cache_size)
        self._by_shape = _LRU(cache_size)
        self._by_fast = _LRU(cache_size)

    def resolve(self, names: list[str]) -> tuple[str, Entry | None]:
        """Qualified name of a called function and its catalogue entry (None if unknown).

        An unqualified or pg_catalog-qualified name is looked up in the curated catalogue
        (side effects and reviewed reads), then among extension functions, then in the list
        of PostgreSQL's built-in functions, where it is a plain read.  A name qualified with
        any other schema is user or extension code: only extension functions match it.
        """
        if len(names) == 1 or (len(names) == 2 and names[0] == "pg_catalog"):
            name = names[-1]
            entry = _BUILTINS.get(name)
            if entry is not None:
                return f"pg_catalog.{name}", entry
            entry = _EXTENSIONS.get(name)
            if entry is None and name in _BUILTIN_NAMES:
                return f"pg_catalog.{name}", _BUILTIN_READ
            return (f"public.{name}" if len(names) == 1 else ".".join(names)), entry
        # Another schema's pg_read_file or version is a user function, not the builtin.
        return ".".join(names), _EXTENSIONS.get(names[-1]) if names else None

    def runs(self, sql: str) -> tuple[Statement, ...]:
        """What a stored definition runs when it fires: the query of a CREATE VIEW, each
        action of a CREATE RULE (as pg_get_ruledef prints it), every statement of any
        other text. A definition that does not parse runs something unknown."""
        try:
            tree = json.loads(_pg.parse_sql_json(sql))
            out: list[Statement] = []
            for raw_stmt in tree.get("stmts") or ():
                ((kind, body),) = raw_stmt["stmt"].items()
                if kind == "RuleStmt":
                    parts = [a for a in body.get("actions") or () if isinstance(a, dict)]
                elif kind == "ViewStmt":
                    parts = [body.get("query") or {}]
                else:
                    parts = [raw_stmt["stmt"]]
                for part in parts:
                    ((inner, inner_body),) = part.items()
                    out.append(_Walk(self, None, sql).statement(inner, inner_body))
            return tuple(out)
        except Exception as exc:  # RecursionError included: fail closed
            reason = f"a stored definition could not be analysed: {type(exc).__name__}"
            return (Statement(sql, C.UNKNOWN, "UNKNOWN", (), (), (reason,), None, False, None,
                              False),)

    def cached(self, sql: str) -> Analysis | None:
        """The analysis of ``sql`` when it costs nothing: cached, or refused unparsed
        (a NUL character, too large). None: ``analyze`` would parse it."""
        cached = self._by_text.get(sql)
        if cached is not None:
            return cached
        if "\x00" in sql:
            # libpg_query stops at a NUL byte, so it would see less than the server rejects.
            return Analysis(sql, (), "query text contains a NUL character")
        if len(sql) * 4 > MAX_ANALYSED_TEXT:  # a character is at most 4 bytes
            # More characters than the limit are more bytes too (not worth encoding).
            size = len(sql) if len(sql) > MAX_ANALYSED_TEXT else \
                len(sql.encode("utf-8", "surrogatepass"))
            if size > MAX_ANALYSED_TEXT:
                return Analysis(sql, (), f"the message is too large to analyse ({size} bytes "
                                         f"or more; keyturn analyses up to {MAX_ANALYSED_TEXT})")
        return None

    def adopt(self, sql: str, analysis: Analysis, by_text: bool) -> None:
        """Keep an analysis made elsewhere (``analyze_detached``) as ``analyze`` would."""
        if by_text and len(sql) <= _MAX_CACHED_TEXT:
            self._by_text.put(sql, analysis)

    def analyze(self, sql: str, prepared: PreparedStatements | None = None) -> Analysis:
        cached = self.cached(sql)
        if cached is not None:
            return cached
        shape = _shape(sql) if len(sql) <= _MAX_CACHED_TEXT else None
        if shape is not None:
            template = self._by_shape.get(shape)
            if template is not None:
                hit = _from_template(sql, template)
                if hit is not None:
                    self._by_text.put(sql, hit)
                    self._note_fast(sql, shape, template)
                    return hit
        analysis, by_text, by_shape = self._analyze(sql, prepared)
        if by_text and len(sql) <= _MAX_CACHED_TEXT:
            self._by_text.put(sql, analysis)
        if by_shape and shape is not None:
            self._by_shape.put(shape, analysis.statements)
            self._note_fast(sql, shape, analysis.statements)
        return analysis

    def _note_fast(self, sql: str, shape: str, template: tuple[Statement, ...]) -> None:
        key = fast_shape(sql)
        if key is None or self._by_fast.get(key) is not None:
            return
        # Every number fast_shape zeroed must be a constant that normalize replaces too:
        # a number anywhere else (an EXPLAIN or COPY option's value, a FETCH count...) is
        # kept by normalize, may decide the class (EXPLAIN (ANALYZE 0) only plans, ANALYZE
        # 1 runs), and must never be served for another value.
        # (Checked with 0 and with 1 in every such place: a kept number shows as a
        # difference.)
        if key != sql and not (_shape(key) == shape == _shape(_BARE_NUMBER.sub("1", sql))):
            return
        self._by_fast.put(key, template)

    def known_shape(self, key: str) -> bool:
        """True when every text whose ``fast_shape`` is ``key`` classifies like the one
        analysed: it was cached by shape (its class read no constant, it has no
        session effects). Until then, and after the cache starts over, False."""
        return self._by_fast.get(key) is not None

    def _analyze(self, sql: str, prepared: PreparedStatements | None
                 ) -> tuple[Analysis, bool, bool]:
        """The analysis, whether it may be cached by text, and whether by shape."""
        if len(sql) <= _MAX_CACHED_TEXT or not gc.isenabled():
            return self._analyze_tree(sql, prepared)
        # A large tree is hundreds of thousands of new containers: without the collector
        # running over and over meanwhile, analysis takes a half to a third of the time.
        gc.disable()
        try:
            return self._analyze_tree(sql, prepared)
        finally:
            gc.enable()

    def _analyze_tree(self, sql: str, prepared: PreparedStatements | None
                      ) -> tuple[Analysis, bool, bool]:
        try:
            tree = json.loads(_pg.parse_sql_json(sql))
        except _pg.ParseError as exc:
            return Analysis(sql, (), f"syntax error: {exc}"), True, False
        except RecursionError:
            return Analysis(sql, (), "statement is nested too deeply to analyse"), True, False
        except Exception as exc:  # e.g. text that cannot be encoded as UTF-8
            return Analysis(sql, (), f"could not parse: {type(exc).__name__}: {exc}"), False, False
        if len(tree.get("stmts") or ()) > MAX_STATEMENTS:
            return Analysis(sql, (), f"the message holds {len(tree['stmts'])} statements; "
                                     f"keyturn analyses up to {MAX_STATEMENTS}"), True, False
        by_text = by_shape = True
        statements: list[Statement] = []
        changes: list[tuple[int, str | None, int]] = []
        try:
            raw = sql.encode("utf-8")
            for raw_stmt in tree.get("stmts") or ():
                ((kind, body),) = raw_stmt["stmt"].items()
                # Locations are byte offsets into the UTF-8 text; stmt_len 0 means "to the end".
                start = raw_stmt.get("stmt_location", 0)
                length = raw_stmt.get("stmt_len", 0)
                text = raw[start:start + length if length else len(raw)]
                walk = _Walk(self, prepared, text.decode("utf-8", "replace").strip())
                statements.append(walk.statement(kind, body))
                if walk.session_bound:
                    by_text = by_shape = False
                elif kind not in _SHAPE_KINDS or walk.literal:
                    by_shape = False
                if prepared is not None:
                    changes.extend((len(statements) - 1, name, seq)
                                   for name, seq in _apply(prepared, walk.effects))
        except RecursionError:
            return Analysis(sql, (), "statement is nested too deeply to analyse"), True, False
        except Exception as exc:  # fail closed on any surprise in the tree
            error = f"analysis failed: {type(exc).__name__}: {exc}"
            return Analysis(sql, (), error), False, False
        return Analysis(sql, tuple(statements), None, tuple(changes)), by_text, by_shape


_NOT_PARENS = re.compile(r"[^()]+")
#: Characters of operators: each nests the parse tree one level (a chain of 2,000 terms
#: is 2,000 levels), which costs about as much as a dozen characters of flat SQL.
_OPERATOR_CHARS = "+-*/%^<>=~!@#&|"
_NO_OPERATORS = str.maketrans("", "", _OPERATOR_CHARS)
OPERATOR_COST = 12
#: What parsing any text costs before its first character (about 0.1 ms).
TEXT_COST = 200


def analysis_cost(sql: str) -> int:
    """What analysing ``sql`` is expected to cost, in units of about a microsecond or less:
    TEXT_COST, its length times one plus its deepest nesting of parentheses, and
    OPERATOR_COST per operator character. Parsing and normalising grow with nesting (a
    460-character text of 50 nested subqueries takes about as long as 15 KiB of flat SQL,
    a 4 KiB sum of 2,000 terms as 20 KiB); parentheses and operators in strings count
    too, which only overestimates."""
    operators = len(sql) - len(sql.translate(_NO_OPERATORS))
    return TEXT_COST + _nesting_cost(sql) + OPERATOR_COST * operators


def _nesting_cost(sql: str) -> int:
    if "(" not in sql:
        return len(sql)
    depth = deepest = 0
    for c in _NOT_PARENS.sub("", sql):
        if c == "(":
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return len(sql) * (1 + deepest)


#: The first words (as the scanner names them) of statements that end or start a
#: transaction, and of code that may (DO and CALL run COMMIT / ROLLBACK themselves).
_TX_FIRST_TOKENS = frozenset({"COMMIT", "END_P", "ROLLBACK", "ABORT_P", "PREPARE", "BEGIN_P",
                              "START", "SAVEPOINT", "RELEASE"})
_CODE_FIRST_TOKENS = frozenset({"DO", "CALL"})
#: Texts longer than this are not scanned on the event loop (about 20 ms): they count as
#: possibly ending their transaction.
MAX_SCANNED_TEXT = 64 * 1024


def may_change_transaction(sql: str, *, single: bool = False) -> bool:
    """Whether the server could run, in a text the analyser could not read (too large, too
    deep, too many statements), a statement that ends or starts a transaction with more
    statements after it, or code that may commit (DO, CALL). With PostgreSQL's own
    scanner (strings, comments, dollar quotes as the server reads them); True when that
    cannot be told (too long, or the scanner fails): a statement after a COMMIT runs in
    a new transaction that takes the session's default as it is then.

    ``single``: the text is one statement (a Parse: the server refuses more), so only its
    first word counts, found in its first MAX_SCANNED_TEXT characters."""
    if len(sql) > MAX_SCANNED_TEXT and not single:
        return True
    try:
        tokens = _pg.scan(sql[:MAX_SCANNED_TEXT] if single else sql)
    except Exception:
        return True
    statements = 0
    first = True
    control = False
    for token in tokens:
        name = token.name
        if name == "ASCII_59":  # ;
            first = True
            continue
        if not first or name in ("C_COMMENT", "SQL_COMMENT"):
            continue
        first = False
        statements += 1
        if name in _CODE_FIRST_TOKENS:
            return True
        if single:
            return False
        control = control or name in _TX_FIRST_TOKENS
    return single or (control and statements > 1)  # (single: no word in reach)


def analyze_detached(unknown_function_class: str, sql: str,
                     prepared: PreparedStatements | None,
                     masked: list[str] | None = None
                     ) -> tuple[Analysis, bool, PreparedStatements | None, Any]:
    """``Analyzer.analyze`` without its caches, for another process: the analysis,
    whether it may be cached by text, ``prepared`` as the message changed it, and for a
    masked connection (``masked``: its sensitive column globs) what masking needs of the
    text: {"lineage": ``lineage.trace`` (the error's text when it cannot be traced),
    "redacted": ``redact_statement`` without content detectors}, else None."""
    analyzer = _DETACHED.get(unknown_function_class)
    if analyzer is None:
        analyzer = _DETACHED[unknown_function_class] = Analyzer(
            unknown_function_class=StatementClass(unknown_function_class), cache_size=0)
    analysis, by_text, _ = analyzer._analyze(sql, prepared)
    extras: Any = None
    if masked is not None:
        from keyturn.analysis.lineage import trace
        from keyturn.masking.redact import redact_statement, sensitive_names
        extras = {}
        try:
            extras["lineage"] = trace(sql)
        except Exception as exc:  # reported as the session's own trace would be
            extras["lineage"] = str(exc) or type(exc).__name__
        extras["redacted"] = redact_statement(sql, sensitive_names(masked))
    return analysis, by_text, prepared, extras


_DETACHED: dict[str, Analyzer] = {}


def _shape(sql: str) -> str | None:
    try:
        return _pg.normalize(sql)
    except Exception:  # a parse error is reported by the full analysis
        return None


def _apply(prepared: PreparedStatements, effects: list[tuple[str, str, Statement | None]]
           ) -> list[tuple[str | None, int]]:
    out: list[tuple[str | None, int]] = []
    for action, name, statement in effects:
        if action == "prepare" and statement is not None:
            out.append((name, prepared.remember(name, statement)))
        elif action == "forget":
            out.append((name, prepared.forget(name)))
        elif action == "forget_all":
            out.append((None, prepared.forget_all()))
    return out


def _from_template(sql: str, template: tuple[Statement, ...]) -> Analysis | None:
    if len(template) == 1 and "--" not in sql and "/*" not in sql:
        # One statement and no comments: the text the parser would cut out is the
        # whole message without surrounding blanks and a trailing semicolon.
        text = sql.strip()
        if text.endswith(";"):
            text = text[:-1].rstrip()
        if ";" not in text:
            s = template[0]
            return Analysis(sql, (Statement(text, s.cls, s.command, s.tables, s.functions,
                                            s.reasons, s.forbidden, s.is_dml, s.prepared_name,
                                            s.literal_dependent, s.unqualified,
                                            s.search_path, s.facts, s.refs, s.defines,
                                            s.opaque, s.known_cls),), None)
    try:
        # The same texts the full analysis cuts from stmt_location/stmt_len, then strips.
        texts = _pg.split(sql)
    except Exception:
        return None
    if len(texts) != len(template):
        return None
    return Analysis(sql, tuple(
        Statement(text, s.cls, s.command, s.tables, s.functions, s.reasons, s.forbidden,
                  s.is_dml, s.prepared_name, s.literal_dependent, s.unqualified, s.search_path,
                  s.facts, s.refs, s.defines, s.opaque, s.known_cls)
        for text, s in zip(texts, template, strict=True)
    ), None)
