"""The target's user-defined code, read from its catalog and kept per connection.

``Catalogs`` reads each PostgreSQL connection's user functions, operators, casts, views,
rules, triggers and defaults (``read_catalog``, in a thread) into a
``keyturn.analysis.pgcatalog.TargetCatalog``, shares it between the sessions of that
connection, and judges their statements with it (``resolve``, called from the session's
``_decide``). It reads the catalog again every ``REFRESH_SECONDS`` while sessions are open
and soon after a session ran DDL; when the catalog changed, every session of the
connection forgets its memoised verdicts.

What a session creates through the gateway (CREATE FUNCTION / OPERATOR / AGGREGATE / VIEW
/ RULE / CAST, ALTER ... RENAME / SET SCHEMA ...) counts, by name, for every session of the
same target from the moment it is decided, before the target has even run it, until a
re-read that started once that session was idle again (its transaction committed or
rolled back) has completed. Objects created by other means (directly on the target, or
by code that runs DDL it builds as a string) are seen at the next re-read.

When the catalog cannot be read the connection fails closed: every name that is not
qualified into pg_catalog may be user code (keyturn.analysis.usercode).

It must not judge statements itself (keyturn.analysis.usercode does) nor block the event
loop (reads run in threads).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keyturn.analysis.pgcatalog import ANY, TargetCatalog
from keyturn.analysis.postgres import ANY_OBJECT, Statement, StatementClass
from keyturn.analysis.usercode import Scope, resolve
from keyturn.config import Connection
from proxies.postgres.register import target_of

if TYPE_CHECKING:
    from proxies.postgres.gateway import PostgresGateway
    from proxies.postgres.session import ClientSession

log = logging.getLogger(__name__)

#: Seconds between re-reads of a connection's catalog while it has sessions.
REFRESH_SECONDS = 10.0
#: How long a new session waits for a stale catalog to be read again.
READY_WAIT = 5.0
#: Seconds after a session's DDL before the catalog is read again for everyone.
AFTER_DDL_SECONDS = 0.5
_BUILTIN = "IN ('pg_catalog', 'information_schema')"
_NOT_BUILTIN = "NOT " + _BUILTIN
#: Objects below this OID are the server's own (made by initdb); anything created later is
#: user-defined wherever it lives, pg_catalog included (a superuser can create there).
FIRST_USER_OID = 16384


def _user(ns: str, obj: str) -> str:
    """SQL: the object ``obj`` in namespace ``ns`` (table aliases) is user-defined."""
    return f"({ns}.nspname {_NOT_BUILTIN} OR {obj}.oid >= {FIRST_USER_OID})"


def _builtin(ns: str, obj: str) -> str:
    """SQL: the object ``obj`` in namespace ``ns`` (table aliases) is the server's own."""
    return f"({ns}.nspname {_BUILTIN} AND {obj}.oid < {FIRST_USER_OID})"

_ROUTINES = f"""
SELECT n.nspname, p.proname, p.prokind, p.provolatile, l.lanname, p.prosecdef,
       (SELECT e.extname FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
         WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
           AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
           -- ALTER EXTENSION ADD lets an extension's owner (a database owner, for a
           -- trusted extension) add a function of their own: only what a superuser owns
           -- (what an extension script made) counts as the extension's.
           AND EXISTS (SELECT FROM pg_roles r WHERE r.oid = p.proowner AND r.rolsuper)
         LIMIT 1),
       -- A built-in of the same name, kind and argument types: an unqualified call never
       -- reaches this one while pg_catalog is searched first (pgcatalog.Routine.shadowed),
       -- unless it can be called in a way the built-in cannot (VARIADIC expanded, named
       -- arguments, defaults).
       p.provariadic = 0 AND p.proargnames IS NULL AND p.pronargdefaults = 0
       AND EXISTS (SELECT FROM pg_proc b
                WHERE b.pronamespace = 'pg_catalog'::regnamespace AND b.oid < {FIRST_USER_OID}
                  AND b.proname = p.proname AND b.prokind = p.prokind
                  AND b.proargtypes = p.proargtypes)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE {_user("n", "p")}"""

# What an operator may run: its function, the functions of its commutator and negator
# (the planner rewrites NOT (a op b) and b op a with them, and selectivity estimation
# calls them) two links deep, and its restriction and join selectivity functions.
_OPERATOR_RUNS = """
linked(oid, op) AS (
  SELECT o.oid, o.oid FROM pg_operator o
  UNION SELECT o.oid, l.oid FROM pg_operator o
    JOIN pg_operator l ON l.oid IN (o.oprcom, o.oprnegate)
  UNION SELECT o.oid, l2.oid FROM pg_operator o
    JOIN pg_operator l ON l.oid IN (o.oprcom, o.oprnegate)
    JOIN pg_operator l2 ON l2.oid IN (l.oprcom, l.oprnegate)
), runs(oid, fn) AS (
  SELECT k.oid, l.oprcode FROM linked k JOIN pg_operator l ON l.oid = k.op
  UNION SELECT k.oid, l.oprrest::oid FROM linked k JOIN pg_operator l ON l.oid = k.op
    WHERE l.oprrest <> 0
  UNION SELECT k.oid, l.oprjoin::oid FROM linked k JOIN pg_operator l ON l.oid = k.op
    WHERE l.oprjoin <> 0
)"""

_OPERATORS = f"""
WITH {_OPERATOR_RUNS}
SELECT DISTINCT n.nspname, o.oprname, fn.nspname, p.proname
FROM runs r JOIN pg_operator o ON o.oid = r.oid
JOIN pg_namespace n ON n.oid = o.oprnamespace
JOIN pg_proc p ON p.oid = r.fn JOIN pg_namespace fn ON fn.oid = p.pronamespace
WHERE {_user("n", "o")} OR {_user("fn", "p")}"""

# Functions that run for values of a user type: casts to or from it, its I/O and support
# functions, its domain checks and its operator classes (ORDER BY, DISTINCT, indexes).
_TYPE_CODE = f"""
WITH code(typ, what, fn) AS (
  SELECT t.oid, 'a cast', c.castfunc FROM pg_cast c JOIN pg_type t
    ON t.oid IN (c.castsource, c.casttarget) WHERE c.castfunc <> 0
  UNION ALL
  SELECT t.oid, 'its input/output', f FROM pg_type t,
    unnest(ARRAY[t.typinput, t.typoutput, t.typreceive, t.typsend, t.typmodin,
                 t.typmodout, t.typanalyze, t.typsubscript]::oid[]) AS f WHERE f <> 0
  UNION ALL
  SELECT c.contypid, 'a domain check', d.refobjid FROM pg_constraint c
    JOIN pg_depend d ON d.classid = 'pg_constraint'::regclass AND d.objid = c.oid
     AND d.refclassid = 'pg_proc'::regclass WHERE c.contypid <> 0
  UNION ALL
  -- A domain's default runs on every INSERT that leaves a column of it out.
  SELECT t.oid, 'its default', d.refobjid FROM pg_type t
    JOIN pg_depend d ON d.classid = 'pg_type'::regclass AND d.objid = t.oid
     AND d.refclassid = 'pg_proc'::regclass
  WHERE t.typtype = 'd' AND t.typdefaultbin IS NOT NULL
  UNION ALL
  SELECT t, 'an operator class', a.amproc FROM pg_amproc a,
    unnest(ARRAY[a.amproclefttype, a.amprocrighttype]) AS t
  UNION ALL
  -- A range type's subtype operator class, difference and canonical functions.
  SELECT r.rngtypid, 'its subtype operator class', a.amproc FROM pg_range r
    JOIN pg_opclass oc ON oc.oid = r.rngsubopc JOIN pg_amproc a ON a.amprocfamily = oc.opcfamily
  UNION ALL
  SELECT r.rngtypid, 'its range functions', f FROM pg_range r,
    unnest(ARRAY[r.rngcanonical, r.rngsubdiff]::oid[]) AS f WHERE f <> 0
)
SELECT DISTINCT tn.nspname, t.typname, code.what, fn.nspname, p.proname
FROM code JOIN pg_type t ON t.oid = code.typ JOIN pg_namespace tn ON tn.oid = t.typnamespace
JOIN pg_proc p ON p.oid = code.fn JOIN pg_namespace fn ON fn.oid = p.pronamespace
WHERE {_user("tn", "t")} AND {_user("fn", "p")}
UNION
-- A user function as an explicit cast between built-in types runs where a statement casts
-- to the target type (x::int, CAST(x AS integer), int4(x)): code of the built-in type.
-- (Implicit and assignment casts may run anywhere: _HOOKS.)
SELECT tn.nspname, t.typname, 'a cast from ' || format_type(c.castsource, NULL),
       fn.nspname, p.proname
FROM pg_cast c JOIN pg_type t ON t.oid = c.casttarget
JOIN pg_namespace tn ON tn.oid = t.typnamespace
JOIN pg_proc p ON p.oid = c.castfunc JOIN pg_namespace fn ON fn.oid = p.pronamespace
WHERE c.castcontext = 'e' AND {_builtin("tn", "t")} AND {_user("fn", "p")}"""

# User code that may run for values of built-in types, which any statement may hold
# without naming their type (columns, function results): implicit and assignment casts
# between built-in types with a user function (a cast to or from a user type needs a value
# or a context of that type, which the type's own code covers), the support functions
# and operators of any operator family with members for a built-in type (CREATE OPERATOR
# CLASS ... FOR TYPE box, default or not, ALTER OPERATOR FAMILY ... ADD: the server uses
# them for sorting, grouping, DISTINCT, hashing, row comparisons and predicate proofs
# wherever a statement uses those types' operators), a built-in type's replaced I/O.
# Default encoding
# conversions and text search parsers and templates are user code behind built-in
# functions (convert(), to_tsvector()). Any of these is judged on every statement.
_HOOKS = f"""
WITH code(what, fn) AS (
  SELECT 'an implicit cast from ' || format_type(c.castsource, NULL) || ' to ' ||
         format_type(c.casttarget, NULL), c.castfunc
  FROM pg_cast c JOIN pg_type s ON s.oid = c.castsource JOIN pg_type d ON d.oid = c.casttarget
  JOIN pg_namespace sn ON sn.oid = s.typnamespace JOIN pg_namespace dn ON dn.oid = d.typnamespace
  WHERE c.castfunc <> 0 AND c.castcontext IN ('a', 'i')
    AND {_builtin("sn", "s")} AND {_builtin("dn", "d")}
  UNION ALL
  -- Any operator family with members for a built-in type: the planner and executor may
  -- take any family holding an operator a statement uses (row comparisons, predicate
  -- proofs for partial indexes and constraint exclusion, sorting, hashing), and the
  -- default one for sorting, grouping and DISTINCT.
  SELECT 'the ' || am.amname || ' operator family ' || f.opfname || ' of ' ||
         format_type(a.amproclefttype, NULL), a.amproc
  FROM pg_amproc a JOIN pg_opfamily f ON f.oid = a.amprocfamily
  JOIN pg_am am ON am.oid = f.opfmethod
  JOIN pg_type ty ON ty.oid = a.amproclefttype JOIN pg_namespace tn ON tn.oid = ty.typnamespace
  WHERE {_builtin("tn", "ty")}
  UNION ALL
  SELECT 'an operator of the ' || am.amname || ' operator family ' || f.opfname || ' of ' ||
         format_type(ao.amoplefttype, NULL), o.oprcode::oid
  FROM pg_amop ao JOIN pg_opfamily f ON f.oid = ao.amopfamily
  JOIN pg_am am ON am.oid = f.opfmethod JOIN pg_operator o ON o.oid = ao.amopopr
  JOIN pg_type ty ON ty.oid = ao.amoplefttype JOIN pg_namespace tn ON tn.oid = ty.typnamespace
  WHERE {_builtin("tn", "ty")}
  UNION ALL
  -- A built-in type's I/O functions replaced (ALTER TYPE pg_catalog.x SET (SEND = ...)).
  SELECT 'the input/output of ' || format_type(ty.oid, NULL), f
  FROM pg_type ty JOIN pg_namespace tn ON tn.oid = ty.typnamespace,
    unnest(ARRAY[ty.typinput, ty.typoutput, ty.typreceive, ty.typsend, ty.typmodin,
                 ty.typmodout, ty.typanalyze, ty.typsubscript]::oid[]) AS f
  WHERE f <> 0 AND {_builtin("tn", "ty")}
  UNION ALL
  SELECT 'the default conversion ' || cv.conname, cv.conproc::oid FROM pg_conversion cv
  WHERE cv.condefault
  UNION ALL
  SELECT 'text search parser ' || tp.prsname, f FROM pg_ts_parser tp,
    unnest(ARRAY[tp.prsstart, tp.prstoken, tp.prsend, tp.prsheadline, tp.prslextype]::oid[]) f
  UNION ALL
  SELECT 'text search template ' || tt.tmplname, f FROM pg_ts_template tt,
    unnest(ARRAY[tt.tmplinit, tt.tmpllexize]::oid[]) f
)
SELECT DISTINCT code.what, fn.nspname, p.proname
FROM code JOIN pg_proc p ON p.oid = code.fn JOIN pg_namespace fn ON fn.oid = p.pronamespace
WHERE {_user("fn", "p")}"""

# The btree families an ORDER BY ... USING op (also in windows and aggregates) may take its
# sort support from: any family holding an operator of that name, with user code (a
# non-default operator class for box, say, whose < is built in). (operator schema, name,
# what, function schema, function name)
_SORT_CODE = f"""
WITH fam(fam, what, fn) AS (
  SELECT a.amprocfamily, 'operator family ' || f.opfname, a.amproc
  FROM pg_amproc a JOIN pg_opfamily f ON f.oid = a.amprocfamily
  UNION ALL
  SELECT ao.amopfamily, 'operator family ' || f.opfname, o.oprcode::oid
  FROM pg_amop ao JOIN pg_opfamily f ON f.oid = ao.amopfamily
  JOIN pg_operator o ON o.oid = ao.amopopr
)
SELECT DISTINCT on_.nspname, o.oprname, fam.what, fn.nspname, p.proname
FROM fam JOIN pg_amop m ON m.amopfamily = fam.fam JOIN pg_operator o ON o.oid = m.amopopr
JOIN pg_namespace on_ ON on_.oid = o.oprnamespace
JOIN pg_proc p ON p.oid = fam.fn JOIN pg_namespace fn ON fn.oid = p.pronamespace
WHERE {_user("fn", "p")}"""

# Types that hold values of other types, and so run their code: domains (their base),
# arrays (their element), composites and table row types (their attributes' types).
_TYPE_BASES = f"""
SELECT tn.nspname, t.typname, bn.nspname, b.typname
FROM pg_type t JOIN pg_namespace tn ON tn.oid = t.typnamespace
JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.typelem END
JOIN pg_namespace bn ON bn.oid = b.typnamespace
WHERE {_user("tn", "t")}
UNION
SELECT tn.nspname, t.typname, bn.nspname, b.typname
FROM pg_type t JOIN pg_namespace tn ON tn.oid = t.typnamespace
JOIN pg_attribute a ON a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type b ON b.oid = a.atttypid JOIN pg_namespace bn ON bn.oid = b.typnamespace
WHERE t.typtype = 'c' AND {_user("tn", "t")} AND {_user("bn", "b")}"""

# Every user type by OID: a Parse may declare a parameter's type by OID alone.
_TYPE_OIDS = f"""
SELECT t.oid, tn.nspname, t.typname
FROM pg_type t JOIN pg_namespace tn ON tn.oid = t.typnamespace
WHERE {_user("tn", "t")}"""

_VIEWS = f"""
SELECT n.nspname, c.relname, pg_get_viewdef(c.oid), c.relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND {_user("n", "c")}"""

# Relations read with a relation (unless ONLY): its inheritance children and partitions,
# at any depth.
_CHILDREN = f"""
WITH RECURSIVE tree(parent, child) AS (
  SELECT inhparent, inhrelid FROM pg_inherits
  UNION SELECT t.parent, i.inhrelid FROM tree t JOIN pg_inherits i ON i.inhparent = t.child
)
SELECT pn.nspname, p.relname, cn.nspname, c.relname
FROM tree JOIN pg_class p ON p.oid = tree.parent JOIN pg_namespace pn ON pn.oid = p.relnamespace
JOIN pg_class c ON c.oid = tree.child JOIN pg_namespace cn ON cn.oid = c.relnamespace
WHERE {_user("pn", "p")}"""

# Tables a write of a table also writes: foreign keys that reference it with an action
# (ON DELETE / ON UPDATE CASCADE, SET NULL, SET DEFAULT) make the server update or
# delete rows of the referencing table, running its triggers, defaults and checks.
_CASCADES = f"""
SELECT pn.nspname, p.relname, cn.nspname, c.relname
FROM pg_constraint k JOIN pg_class p ON p.oid = k.confrelid
JOIN pg_namespace pn ON pn.oid = p.relnamespace
JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
WHERE k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))
  AND {_user("pn", "p")}"""

# Tables storing a relation's row type (a composite type is a relation of kind c): a
# column of it, or an array of it (dropped columns excluded).
_ROW_USERS = """
SELECT rn.nspname, r.relname, un.nspname, u.relname
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid OR t.typarray = a.atttypid
JOIN pg_class r ON r.oid = t.typrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace
JOIN pg_class u ON u.oid = a.attrelid JOIN pg_namespace un ON un.oid = u.relnamespace
WHERE t.typrelid <> 0 AND a.attnum > 0 AND NOT a.attisdropped AND a.attrelid <> r.oid
  AND u.relkind IN ('r', 'p', 'm', 'f')"""

# The target's own values of the timeouts a session may change (for this role and
# database, in milliseconds): raising one above them weakens the operator's guard.
_SETTINGS = """
SELECT name, setting FROM pg_settings
WHERE name IN ('statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout',
               'idle_session_timeout', 'transaction_timeout') AND unit = 'ms'"""

_RULES = f"""
SELECT n.nspname, c.relname, r.ev_type, pg_get_ruledef(r.oid)
FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE r.rulename <> '_RETURN' AND {_user("n", "c")}"""

# Functions a relation runs: triggers, defaults and generated columns (on writes); checks,
# index expressions and predicates, partition keys and extended statistics expressions
# (the planner folds them and prunes partitions with the key's operator class on every
# read too) and row-level security policies (on every access).
_RELATION_CODE = f"""
WITH {_OPERATOR_RUNS},
-- What a value of a type may run in an expression: its operator families' support
-- functions and operators (comparisons, GREATEST/LEAST, sorting) and its I/O.
type_runs(typ, fn) AS (
  SELECT a.amproclefttype, a.amproc FROM pg_amproc a
  UNION ALL
  SELECT ao.amoplefttype, o.oprcode::oid FROM pg_amop ao
    JOIN pg_operator o ON o.oid = ao.amopopr
  UNION ALL
  SELECT ty.oid, f FROM pg_type ty,
    unnest(ARRAY[ty.typinput, ty.typoutput, ty.typreceive, ty.typsend]::oid[]) AS f
  WHERE f <> 0
),
-- What stored expressions of a relation depend on: functions, and operators and types,
-- whose functions the expression runs though pg_depend names only the operator or type.
deps(rel, what, ref, refclass, on_read) AS (
  SELECT CASE d.classid
           WHEN 'pg_attrdef'::regclass THEN (SELECT adrelid FROM pg_attrdef WHERE oid = d.objid)
           WHEN 'pg_constraint'::regclass THEN
             (SELECT conrelid FROM pg_constraint WHERE oid = d.objid)
           WHEN 'pg_class'::regclass THEN
             -- an index's expression or predicate, or a table's own partition key
             COALESCE((SELECT indrelid FROM pg_index WHERE indexrelid = d.objid), d.objid)
           WHEN 'pg_statistic_ext'::regclass THEN
             (SELECT stxrelid FROM pg_statistic_ext WHERE oid = d.objid)
           WHEN 'pg_policy'::regclass THEN
             (SELECT polrelid FROM pg_policy WHERE oid = d.objid) END,
         CASE d.classid WHEN 'pg_attrdef'::regclass THEN 'a default'
           WHEN 'pg_constraint'::regclass THEN 'a constraint'
           WHEN 'pg_class'::regclass THEN
             CASE WHEN EXISTS (SELECT FROM pg_index WHERE indexrelid = d.objid)
                  THEN 'an index expression'
                  WHEN d.objsubid > 0 THEN 'a column' ELSE 'its partition key' END
           WHEN 'pg_statistic_ext'::regclass THEN 'an extended statistics expression'
           ELSE 'a row security policy' END,
         d.refobjid, d.refclassid, d.classid <> 'pg_attrdef'::regclass
  FROM pg_depend d
  WHERE d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass, 'pg_type'::regclass)
    AND d.classid IN ('pg_attrdef'::regclass, 'pg_constraint'::regclass,
                      'pg_class'::regclass, 'pg_statistic_ext'::regclass,
                      'pg_policy'::regclass)
),
code(rel, what, fn, on_read) AS (
  SELECT t.tgrelid, 'trigger ' || t.tgname, t.tgfoid, false FROM pg_trigger t
    WHERE NOT t.tgisinternal
  UNION ALL
  SELECT rel, what, ref, on_read FROM deps WHERE refclass = 'pg_proc'::regclass
  UNION ALL
  SELECT d.rel, d.what || ' (operator ' || o.oprname || ')', r.fn, d.on_read
  FROM deps d JOIN runs r ON r.oid = d.ref JOIN pg_operator o ON o.oid = d.ref
  WHERE d.refclass = 'pg_operator'::regclass
  UNION ALL
  SELECT d.rel, d.what || ' (type ' || format_type(d.ref, NULL) || ')', r.fn, d.on_read
  FROM deps d JOIN type_runs r ON r.typ = d.ref WHERE d.refclass = 'pg_type'::regclass
  UNION ALL
  -- A partition key's operator classes: partition pruning calls them on reads.
  SELECT pt.partrelid, 'its partition key (operator class ' || oc.opcname || ')', a.amproc,
         true
  FROM pg_partitioned_table pt, unnest(pt.partclass::oid[]) AS k(opc)
    JOIN pg_opclass oc ON oc.oid = k.opc JOIN pg_amproc a ON a.amprocfamily = oc.opcfamily
  UNION ALL
  SELECT pt.partrelid, 'its partition key (operator class ' || oc.opcname || ')',
         o.oprcode::oid, true
  FROM pg_partitioned_table pt, unnest(pt.partclass::oid[]) AS k(opc)
    JOIN pg_opclass oc ON oc.oid = k.opc
    JOIN pg_amop ao ON ao.amopfamily = oc.opcfamily JOIN pg_operator o ON o.oid = ao.amopopr
  UNION ALL
  -- An index's operator classes: their support functions and operators run on index
  -- scans (reads) as well as on writes.
  SELECT i.indrelid, 'index ' || ic.relname || ' (operator class ' || oc.opcname || ')',
         a.amproc, true
  FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid,
    unnest(i.indclass::oid[]) AS k(opc) JOIN pg_opclass oc ON oc.oid = k.opc
    JOIN pg_amproc a ON a.amprocfamily = oc.opcfamily
  UNION ALL
  SELECT i.indrelid, 'index ' || ic.relname || ' (operator class ' || oc.opcname || ')',
         o.oprcode::oid, true
  FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid,
    unnest(i.indclass::oid[]) AS k(opc) JOIN pg_opclass oc ON oc.oid = k.opc
    JOIN pg_amop ao ON ao.amopfamily = oc.opcfamily JOIN pg_operator o ON o.oid = ao.amopopr
  UNION ALL
  -- The access method of a table or of one of its indexes.
  SELECT c.oid, 'its access method ' || am.amname, am.amhandler::oid, true
  FROM pg_class c JOIN pg_am am ON am.oid = c.relam
  UNION ALL
  SELECT i.indrelid, 'index ' || ic.relname || ' (access method ' || am.amname || ')',
         am.amhandler::oid, true
  FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
  UNION ALL
  -- A foreign table runs its wrapper's code on every access (another connection, a
  -- program, a file: nothing the target's read-only transaction covers).
  SELECT ft.ftrelid, 'foreign-data wrapper ' || w.fdwname, f, true
  FROM pg_foreign_table ft JOIN pg_foreign_server s ON s.oid = ft.ftserver
  JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw,
    unnest(ARRAY[w.fdwhandler, w.fdwvalidator]::oid[]) AS f WHERE f <> 0
)
SELECT DISTINCT n.nspname, c.relname, code.what, fn.nspname, p.proname, code.on_read
FROM code JOIN pg_class c ON c.oid = code.rel JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = code.fn JOIN pg_namespace fn ON fn.oid = p.pronamespace
WHERE {_user("n", "c")}
  AND ({_user("fn", "p")} OR code.what LIKE 'trigger %'
       OR code.what LIKE 'foreign-data wrapper %')"""

# Expressions that run on every read of a relation (row-level security policies), on
# writes (column defaults and generated columns, check constraints, policies' WITH CHECK,
# index expressions and predicates, partition key expressions) or for a value cast to a
# domain (its checks), as SQL text: they may call built-in functions with effects
# (pg_advisory_lock, set_config...), which pg_depend does not list (built-ins are
# pinned), so they are judged like a view's definition.
_EXPRESSIONS = f"""
SELECT 'r', n.nspname, c.relname, 'row security policy ' || p.polname,
       pg_get_expr(p.polqual, p.polrelid)
FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE p.polqual IS NOT NULL AND {_user("n", "c")}
UNION ALL
SELECT 'w', n.nspname, c.relname, 'row security policy ' || p.polname || ' (WITH CHECK)',
       pg_get_expr(p.polwithcheck, p.polrelid)
FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE p.polwithcheck IS NOT NULL AND {_user("n", "c")}
UNION ALL
SELECT 'w', n.nspname, c.relname, 'default of column ' || a.attname,
       pg_get_expr(d.adbin, d.adrelid)
FROM pg_attrdef d JOIN pg_class c ON c.oid = d.adrelid
JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE {_user("n", "c")}
UNION ALL
SELECT 'w', n.nspname, c.relname, 'check ' || k.conname, pg_get_expr(k.conbin, k.conrelid)
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE k.conrelid <> 0 AND k.conbin IS NOT NULL AND {_user("n", "c")}
UNION ALL
SELECT 'w', n.nspname, c.relname, 'index ' || ic.relname, e
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace,
  unnest(ARRAY[pg_get_expr(i.indexprs, i.indrelid), pg_get_expr(i.indpred, i.indrelid)]) AS e
WHERE e IS NOT NULL AND {_user("n", "c")}
UNION ALL
SELECT 'w', n.nspname, c.relname, 'its partition key', pg_get_expr(pt.partexprs, pt.partrelid)
FROM pg_partitioned_table pt JOIN pg_class c ON c.oid = pt.partrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE pt.partexprs IS NOT NULL AND {_user("n", "c")}
UNION ALL
SELECT 't', n.nspname, t.typname, 'check ' || c.conname, pg_get_expr(c.conbin, 0)
FROM pg_constraint c JOIN pg_type t ON t.oid = c.contypid
JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE c.contypid <> 0 AND c.conbin IS NOT NULL AND {_user("n", "t")}
UNION ALL
SELECT 'd', n.nspname, t.typname, 'its default', pg_get_expr(t.typdefaultbin, 0)
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE t.typtype = 'd' AND t.typdefaultbin IS NOT NULL AND {_user("n", "t")}"""

_TYPED_COLUMNS = f"""
SELECT n.nspname, c.relname, a.attname, tn.nspname, t.typname
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid JOIN pg_namespace tn ON tn.oid = t.typnamespace
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND {_user("n", "c")} AND {_user("tn", "t")}"""


def connect_target(conn: Connection, application: str, *, timeout: int = 5,
                   options: str | None = None) -> Any:
    """A short psycopg connection of the gateway's own to a connection's target."""
    import psycopg

    t = target_of(conn)
    password = t.password.resolve() if t.password else None
    return psycopg.connect(host=t.host, port=t.port, dbname=t.dbname, user=t.user,
                           password=password, connect_timeout=timeout, options=options,
                           sslmode="require" if t.sslmode != "disable" else "disable",
                           application_name=application, autocommit=True)


def read_catalog(conn: Connection) -> TargetCatalog:
    """The connection's user-defined code (blocking: run it in a thread)."""
    # Printing a view's definition locks the tables it reads: a transaction holding one
    # (an open ALTER TABLE) must not hang the read, and with it every session's checks.
    # The target's own timeouts are read first, before the gateway's own replace them.
    with connect_target(conn, "keyturn-catalog") as c:
        # (Every name qualified: the role's own search_path may put a schema of the
        # target role's before pg_catalog.)
        user, path = c.execute("SELECT CURRENT_USER, pg_catalog.current_setting("
                               "'search_path')").fetchone()
        c.execute("SET search_path = pg_catalog")
        settings = c.execute(_SETTINGS).fetchall()
        c.execute("SET lock_timeout = 2000")
        c.execute("SET statement_timeout = 20000")
        # Definitions printed with only pg_catalog on the path name every other object
        # with its schema, so they are read exactly, whatever a session's search_path.
        rows = {name: c.execute(sql).fetchall() for name, sql in (
            ("routines", _ROUTINES), ("operators", _OPERATORS), ("type_code", _TYPE_CODE),
            ("type_bases", _TYPE_BASES), ("views", _VIEWS), ("rules", _RULES),
            ("relation_code", _RELATION_CODE), ("typed_columns", _TYPED_COLUMNS),
            ("expressions", _EXPRESSIONS), ("type_oids", _TYPE_OIDS),
            ("hooks", _HOOKS), ("children", _CHILDREN),
            ("sort_code", _SORT_CODE), ("cascades", _CASCADES),
            ("row_users", _ROW_USERS))}
    return TargetCatalog.from_rows(user=user, search_path=path, settings=settings, **rows)


def target_key(conn: Connection) -> tuple[str, int, str, str]:
    """Connections with the same target database and role share one catalog."""
    t = target_of(conn)
    return (t.host, t.port, t.dbname or "", t.user or "")


@dataclass
class _Defined:
    """An object a session created or changed and the target's catalog may not show yet:
    the CREATE VIEW / CREATE RULE texts that say what it runs, the session, and the
    re-read after which the catalog shows it (None until the session was idle again)."""

    texts: tuple[str, ...]
    owner: weakref.ReferenceType[ClientSession]
    after: int | None = None
    # Whether it counts yet: a change of anything (ANY_OBJECT) counts once the statement
    # was sent (``sent``), not while it is held for review or if it was refused; for
    # other sessions once what ends its transaction was sent (``visible``).
    active: bool = True
    visible: bool = True


@dataclass
class _Target:
    catalog: TargetCatalog | None = None
    error: str | None = "not read yet"
    requested: int = 0  # re-reads asked for
    done: int = 0  # the highest request number a completed re-read covers
    task: asyncio.Task[None] | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None
    defined: dict[tuple[str, str], _Defined] = field(default_factory=dict)
    read_at: float = 0.0  # time.monotonic() when the newest completed read began
    failed: int = 0  # the request number of the latest read that failed (0: none since)


def _counts(d: _Defined, key: tuple[str, str], session: ClientSession) -> bool:
    """Whether a change counts for ``session``'s statements: a change by name from the
    moment it was decided; a change of anything (ANY_OBJECT) once sent, for its own
    session at once, for the others once its session was idle again (committed: until
    then no other transaction can see it) and until the catalog was read after that."""
    if key[0] != "*":
        return True
    return d.active and (d.visible or d.after is not None or d.owner() is session)


def _idle(session: ClientSession | None) -> bool:
    """Nothing in flight and no transaction open (or gone): what it did has committed or
    was rolled back."""
    return session is None or session.closed or (
        session.tx_status == "I" and not session.expect and not session.holding
        and session.held_ticket is None)


class Catalogs:
    """Every PostgreSQL target's TargetCatalog (see the module docstring)."""

    def __init__(self, gw: PostgresGateway, read: Any = read_catalog):
        self.gw = gw
        self._read = read  # None: catalogs are only ever put() (tests)
        self._targets: dict[tuple[str, int, str, str], _Target] = {}
        self._ticker: asyncio.Task[None] | None = None

    def type_named(self, conn: Connection, oid: int) -> tuple[str, str] | None:
        """(schema, name) of a user type by OID, as of the last read of the catalog."""
        catalog = self._target(conn).catalog
        return catalog.type_oids.get(oid) if catalog is not None else None

    def _target(self, conn: Connection) -> _Target:
        return self._targets.setdefault(target_key(conn), _Target())

    def default_schemas(self, conn: Connection) -> frozenset[str]:
        """The schemas the target's own default search_path names for the gateway's
        role (ALTER ROLE / ALTER DATABASE ... SET search_path, read with the catalog;
        "$user" left out, as for the login role in DEFAULT_SEARCH_PATH): a session
        starts with it and RESET goes back to it."""
        catalog = self._target(conn).catalog
        if catalog is None:
            return frozenset()
        return frozenset(s for s in catalog.search_path if s.strip('"') != "$user")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        tasks = [t for t in (self._ticker, *(s.task for s in self._targets.values())) if t]
        for target in self._targets.values():
            if target.timer is not None:
                target.timer.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            used = {target_key(s.conn): s.conn for s in list(self.gw.active) if s.conn}
            for conn in used.values():
                self._settle_defined(conn, self._target(conn))
                self.refresh(conn)

    async def ready(self, conn: Connection) -> None:
        """Wait until the connection's catalog was read once (or failed to be), and, when
        no session kept it fresh (it is re-read only while sessions use it), read it again
        before this session's first statement (at most READY_WAIT seconds)."""
        target = self._target(conn)
        if target.catalog is None and target.task is None and not target.loaded.is_set():
            self.refresh(conn)
        await target.loaded.wait()
        if target.catalog is None or self._read is None or \
                time.monotonic() - target.read_at <= REFRESH_SECONDS:
            return
        # A read under way began just now: wait for it rather than ask for another.
        wanted = target.requested if target.task is not None else self.refresh(conn)
        deadline = time.monotonic() + READY_WAIT
        while target.done < wanted and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def fresh(self, conn: Connection, timeout: float) -> bool:
        """Read the connection's catalog again now and wait for it: False when that read
        did not finish within ``timeout`` seconds, or failed while an older catalog is
        kept (which may not show what changed)."""
        target = self._target(conn)
        wanted = self.refresh(conn)
        deadline = time.monotonic() + timeout
        while target.done < wanted:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        # Never read: statements are judged without it, now as when they were held.
        return target.failed < wanted or target.catalog is None

    def put(self, conn: Connection, catalog: TargetCatalog) -> None:
        """Use ``catalog`` for the connection's target until it is read again."""
        target = self._target(conn)
        target.catalog, target.error = catalog, None
        target.loaded.set()

    def refresh(self, conn: Connection, delay: float = 0.0) -> int:
        """Ask for a re-read; returns its request number (see ``_Defined.after``)."""
        target = self._target(conn)
        target.requested += 1
        if self._read is None:
            target.done = target.requested
            return target.requested
        if delay > 0:
            if target.timer is None:
                def fire() -> None:
                    target.timer = None
                    self.refresh(conn)

                target.timer = asyncio.get_running_loop().call_later(delay, fire)
            return target.requested
        if target.task is None:
            target.task = asyncio.get_running_loop().create_task(self._load(conn, target))
        return target.requested

    async def _load(self, conn: Connection, target: _Target) -> None:
        try:
            while target.done < target.requested:
                covers = target.requested
                began = time.monotonic()
                try:
                    catalog = await asyncio.to_thread(self._read, conn)
                except Exception as exc:
                    if target.catalog is None:
                        target.error = f"{type(exc).__name__}: {exc}".strip()
                        log.error("cannot read the catalog of %s (statements naming anything "
                                  "outside pg_catalog are treated as user code): %s",
                                  conn.name, target.error)
                    else:
                        log.warning("re-reading the catalog of %s failed (keeping the one "
                                    "read before): %s", conn.name, exc)
                    target.done = target.failed = covers
                    continue
                target.read_at = began
                target.failed = 0
                changed = target.catalog is None or \
                    target.catalog.fingerprint != catalog.fingerprint
                if changed:
                    target.catalog, target.error = catalog, None
                    log.info("read the catalog of %s in %.0f ms: %d user functions, %d "
                             "operators, %d types with code, %d relations with code",
                             conn.name, 1000 * (time.monotonic() - began),
                             sum(map(len, catalog.routines.values())),
                             sum(map(len, catalog.operators.values())),
                             len(catalog.types), sum(map(len, catalog.relations.values())))
                target.done = covers
                settled = [k for k, d in target.defined.items()
                           if d.after is not None and d.after <= covers]
                for key in settled:
                    del target.defined[key]
                if changed or any(k[0] == "*" for k in settled):
                    # (A change of anything judged statements as if unread: those
                    # verdicts go with it.)
                    self._forget_verdicts(conn)
        finally:
            target.task = None
            target.loaded.set()

    def _forget_verdicts(self, conn: Connection) -> None:
        key = target_key(conn)
        for session in list(self.gw.active):
            if session.conn is not None and target_key(session.conn) == key:
                session.forget_verdicts()

    # -- judging -----------------------------------------------------------------------------

    def resolve(self, session: ClientSession, statements: tuple[Statement, ...],
                anywhere: bool = False) -> tuple[Statement, ...]:
        """The session's statements judged by what runs on its target (``anywhere``:
        its functions, operators and types as if any schema were searched)."""
        conn = session.conn
        assert conn is not None
        target = self._target(conn)
        self._settle_defined(conn, target)
        created = {k: d.texts for k, d in target.defined.items() if _counts(d, k, session)}
        # What these statements define counts for themselves (a view created and read in
        # one message); for the target only once the policy let them run (``note``).
        for st in statements:
            texts = (st.text,) if st.command in ("CREATE VIEW", "CREATE RULE") else ()
            for kind, _schema, name in st.defines:
                if (kind, _schema, name) != ANY_OBJECT:
                    created[(kind, name)] = (*created.get((kind, name), ()), *texts)
        # After user code ran, the session's search_path is whatever that code set (the
        # server does not report it): its names may resolve in any schema.
        schemas = session.schemas | {ANY} if session.ran_user_code or anywhere \
            else session.schemas
        scope = Scope(schemas=frozenset(schemas), created=created,
                      unavailable=target.error if target.catalog is None else None,
                      judged={})
        return tuple(resolve(session.analyzer, st, target.catalog, scope)
                     for st in statements)

    def note(self, session: ClientSession, statements: tuple[Statement, ...]) -> None:
        """The policy let ``statements`` run (or a held one was approved): what they
        define counts for the target from now (a refused or pending statement defines
        nothing). Cheap for statements that define nothing (most)."""
        if not any(st.defines or st.cls.risk >= StatementClass.DDL.risk
                   for st in statements):
            return
        conn = session.conn
        assert conn is not None
        self._note(session, conn, self._target(conn), statements)

    def sent(self, session: ClientSession, *, ends: bool) -> None:
        """The session sent a statement that may change anything in its target's catalog
        (see ANY_OBJECT), or, after one, a statement that ends its transaction (``ends``:
        also a statement outside a transaction block, which commits at once). From then
        until the catalog is read again after the session is idle, the session's own
        statements, and once the change may be committed every other session's, are
        judged as if the catalog were unread (keyturn.analysis.usercode)."""
        assert session.conn is not None
        target = self._target(session.conn)
        entry = target.defined.get(("*", session.session_id))
        if entry is None or (entry.active and (entry.visible or not ends)):
            return
        entry.active = True
        entry.after = None
        entry.visible = entry.visible or ends
        session.changed_catalog = True  # see idle()
        self._forget_verdicts(session.conn)
        session.forget_verdicts()

    def idle(self, session: ClientSession) -> None:
        """A session that sent a change of anything is idle again (its transaction
        ended): from now the change counts for every session of the target, so no
        verdict memoised before may stand (the compiled fast path reads the same memos)."""
        assert session.conn is not None
        target = self._target(session.conn)
        entry = target.defined.get(("*", session.session_id))
        if entry is not None and entry.active and entry.after is None:
            self._settle_defined(session.conn, target)
            self._forget_verdicts(session.conn)

    def _settle_defined(self, conn: Connection, target: _Target) -> None:
        """Objects whose session is idle again are in the next re-read: ask for it."""
        waiting = [d for d in target.defined.values() if d.after is None and _idle(d.owner())]
        if waiting:
            ticket = self.refresh(conn)
            for d in waiting:
                d.after = ticket

    def _note(self, session: ClientSession, conn: Connection, target: _Target,
              statements: tuple[Statement, ...]) -> None:
        grew = False
        for st in statements:
            texts = (st.text,) if st.command in ("CREATE VIEW", "CREATE RULE") else ()
            for kind, _schema, name in st.defines:
                if (kind, _schema, name) == ANY_OBJECT:
                    key = ("*", session.session_id)
                    if key not in target.defined:
                        target.defined[key] = _Defined((), weakref.ref(session),
                                                       active=False, visible=False)
                    session.changes_anything = True
                    continue
                old = target.defined.get((kind, name))
                grew = grew or old is None
                target.defined[(kind, name)] = _Defined(
                    (*(old.texts if old else ()), *texts), weakref.ref(session))
            if st.defines or st.cls.risk >= StatementClass.DDL.risk:
                # It may change the catalog (DDL, or code that may run DDL): re-read it
                # soon; until then what it names counts as defined for every session.
                self.refresh(conn, AFTER_DDL_SECONDS)
        if grew:
            self._forget_verdicts(conn)
            session.forget_verdicts()  # also when it is not counted in gw.active (tests)
