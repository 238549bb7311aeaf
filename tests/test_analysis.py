"""Tests for keyturn.analysis: statement classes, evasions, extraction, session memory, caches.

These tests pin the security-relevant behaviour of the SQL classifier.  They must stay fast
(no database, no network) and must not depend on test order: every test builds its own
Analyzer unless it is specifically about cache sharing.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast import parser as pg

from keyturn.analysis import Analysis, Analyzer, PreparedStatements, StatementClass, catalogue
from keyturn.analysis.postgres import _BUILTIN_NAMES as BUILTIN_NAMES

BUILTINS_FILE = Path(catalogue.__file__).with_name("pg_builtins.txt")

C = StatementClass
TRANSACTION, SESSION, READ, WRITE, DDL = C.TRANSACTION, C.SESSION, C.READ, C.WRITE, C.DDL
PRIVILEGE, PROCEDURAL, ADMIN, FILE, UNKNOWN = (
    C.PRIVILEGE, C.PROCEDURAL, C.ADMIN, C.FILE, C.UNKNOWN)
LOCK, SAFETY = C.LOCK, C.SAFETY


def analyze(sql: str, prepared: PreparedStatements | None = None) -> Analysis:
    return Analyzer().analyze(sql, prepared)


def run(analyzer: Analyzer, sql: str, session: PreparedStatements,
        ok: bool = True) -> Analysis:
    """Analyse ``sql`` and settle its namespace changes as the server would answer them."""
    result = analyzer.analyze(sql, session)
    for _index, name, seq in result.changes:
        session.settle(name, seq, ok)
    return result


# What psql sends for \d (list relations) and \d t (its columns query).
PSQL_LIST_TABLES = """
SELECT n.nspname as "Schema", c.relname as "Name",
  CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
    WHEN 'i' THEN 'index' WHEN 'S' THEN 'sequence' WHEN 't' THEN 'TOAST table'
    WHEN 'f' THEN 'foreign table' WHEN 'p' THEN 'partitioned table'
    WHEN 'I' THEN 'partitioned index' END as "Type",
  pg_catalog.pg_get_userbyid(c.relowner) as "Owner"
FROM pg_catalog.pg_class c
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam
WHERE c.relkind IN ('r','p','v','m','S','f','')
      AND n.nspname <> 'pg_catalog'
      AND n.nspname !~ '^pg_toast'
      AND n.nspname <> 'information_schema'
  AND pg_catalog.pg_table_is_visible(c.oid)
ORDER BY 1,2;"""
PSQL_DESCRIBE_COLUMNS = """
SELECT a.attname,
  pg_catalog.format_type(a.atttypid, a.atttypmod),
  (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid, true)
   FROM pg_catalog.pg_attrdef d
   WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.atthasdef),
  a.attnotnull,
  (SELECT c.collname FROM pg_catalog.pg_collation c, pg_catalog.pg_type t
   WHERE c.oid = a.attcollation AND t.oid = a.atttypid AND a.attcollation <> t.typcollation)
   AS attcollation,
  a.attidentity,
  a.attgenerated
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = '16384' AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum;"""

CLASS_CASES = [
    # reads
    ("SELECT 1", READ),
    ("select * from orders where id = 1", READ),
    ("TABLE t", READ),
    ("VALUES (1), (2)", READ),
    ("SHOW ALL", READ),
    ("SHOW search_path", READ),
    ("SELECT * FROM t FOR UPDATE", LOCK),
    ("SELECT count(*), sum(x), avg(x), now(), coalesce(a, b), greatest(1, 2), current_user, "
     "extract(year FROM now()), x SIMILAR TO 'y', trim(' a '), position('a' IN 'b'), "
     "substring('abc' FROM 1), lower(x), string_agg(x, ','), row_number() OVER () FROM t", READ),
    ("SELECT jsonb_build_object('a', 1), to_char(now(), 'YYYY'), date_trunc('day', now()), "
     "md5('x'), array_agg(x ORDER BY x) FILTER (WHERE x > 1), percentile_cont(0.5) WITHIN "
     "GROUP (ORDER BY x) FROM t", READ),
    ("SELECT * FROM generate_series(1, 10) g, unnest(ARRAY[1]) u", READ),
    ("SELECT pg_sleep(1)", READ),
    ("SELECT current_setting('search_path')", READ),
    # built-ins with no side effect, as drivers and tools send them
    ("select current_schema()", READ),
    ("select pg_catalog.version()", READ),
    ("SELECT format_type(atttypid, atttypmod) FROM pg_attribute", READ),
    (PSQL_LIST_TABLES, READ),
    (PSQL_DESCRIBE_COLUMNS, READ),
    ("SELECT pg_catalog.has_table_privilege('t', 'SELECT'), to_regclass('t'), "
     "array_to_string(ARRAY[1, 2], ','), pg_catalog.pg_get_expr(adbin, adrelid) "
     "FROM pg_catalog.pg_attrdef", READ),
    ("SELECT pg_relation_filenode('t'), pg_filenode_relation(0, 1), pg_trigger_depth(), "
     "pg_column_size(1), pg_database_size('d'), pg_get_wal_replay_pause_state(), "
     "pg_partition_root('t'), make_date(2024, 1, 1)", READ),
    ("EXPLAIN SELECT current_schema()", READ),
    ("SELECT $x$ ; DELETE FROM t $x$", READ),
    ("SELECT 'a; DELETE FROM t'", READ),
    ("SELECT 1 -- ; DELETE FROM t", READ),
    ("", READ),
    ("   \n\t", READ),
    ("-- only a comment", READ),
    ("/* only a comment */", READ),
    (";", READ),
    ("FETCH 10 FROM c", READ),
    ("MOVE c", READ),
    ("CLOSE c", READ),
    ("DECLARE c CURSOR FOR SELECT * FROM t", READ),
    ("EXPLAIN DELETE FROM t", READ),
    ("EXPLAIN (ANALYZE false) DELETE FROM t", READ),
    ("EXPLAIN (ANALYZE off, VERBOSE) DELETE FROM t", READ),
    ("EXPLAIN SELECT * FROM t", READ),
    ("COPY t TO STDOUT", READ),
    ("COPY (SELECT * FROM t) TO STDOUT", READ),
    # transaction control
    ("BEGIN", TRANSACTION),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", TRANSACTION),
    ("COMMIT", TRANSACTION),
    ("ROLLBACK", TRANSACTION),
    ("SAVEPOINT a", TRANSACTION),
    ("RELEASE SAVEPOINT a", TRANSACTION),
    ("ROLLBACK TO SAVEPOINT a", TRANSACTION),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", TRANSACTION),
    ("SET CONSTRAINTS ALL DEFERRED", TRANSACTION),
    ("PREPARE TRANSACTION 'x'", ADMIN),
    ("COMMIT PREPARED 'x'", ADMIN),
    ("ROLLBACK PREPARED 'x'", ADMIN),
    # session
    ("SET statement_timeout = 1000", SESSION),
    ("SET search_path = app", SESSION),
    ("RESET statement_timeout", SAFETY),
    ("SET statement_timeout = '0.4'", SAFETY),
    ("SET statement_timeout = '400us'", SAFETY),
    ("SET statement_timeout = '1e-9'", SAFETY),
    ("SET statement_timeout = '0x10'", SAFETY),  # not read here: fail closed
    ("SET statement_timeout = '2s'", SESSION),
    ("SET row_security = f", SAFETY),
    ("SET row_security = on", SESSION),
    ("RESET ALL", SAFETY),  # every timeout back to its default at once
    ("SET client_encoding = 'UTF8'", SESSION),
    ("LISTEN ch", SESSION),
    ("UNLISTEN *", SESSION),
    ("DISCARD PLANS", SESSION),
    ("DEALLOCATE ALL", SESSION),
    ("PREPARE p AS DELETE FROM t", SESSION),
    ("SELECT set_config('application_name', 'x', false)", SESSION),
    ("SELECT pg_advisory_lock(1)", LOCK),
    ("SET session_replication_role = replica", SAFETY),
    ("SET log_statement = 'none'", ADMIN),
    ("SELECT set_config('log_statement', 'none', false)", ADMIN),
    # writes
    ("INSERT INTO t VALUES (1)", WRITE),
    ("UPDATE t SET x = 1", WRITE),
    ("DELETE FROM t", WRITE),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", WRITE),
    ("DeLeTe FrOm t", WRITE),
    ("/* /* */ */ DELETE FROM t", WRITE),
    ("/* comment */ DELETE FROM t", WRITE),
    ("WITH x AS (SELECT 1) DELETE FROM t", WRITE),
    ("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d", WRITE),
    ("WITH a AS (WITH b AS (UPDATE t SET x = 1 RETURNING *) SELECT * FROM b) SELECT * FROM a",
     WRITE),
    ("SELECT * FROM (WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d) s", WRITE),
    ("SELECT (WITH d AS (DELETE FROM t RETURNING 1) SELECT count(*) FROM d)", WRITE),
    ("SELECT 1 UNION ALL (WITH d AS (INSERT INTO t VALUES (1) RETURNING 1) SELECT * FROM d)",
     WRITE),
    ("INSERT INTO log WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", WRITE),
    ("EXPLAIN ANALYZE DELETE FROM t", WRITE),
    ("EXPLAIN (ANALYZE) DELETE FROM t", WRITE),
    ("EXPLAIN (ANALYZE true) DELETE FROM t", WRITE),
    ("EXPLAIN (ANALYZE 1) DELETE FROM t", WRITE),
    ("EXPLAIN (analyse on) DELETE FROM t", WRITE),
    ("EXPLAIN (ANALYZE off, ANALYZE on) DELETE FROM t", WRITE),
    ("COPY t FROM STDIN", WRITE),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", WRITE),
    ("SELECT nextval('s')", WRITE),
    ("SELECT setval('s', 1)", WRITE),
    ("SELECT lo_create(0)", WRITE),
    ("SELECT lo_unlink(1)", WRITE),
    ("SELECT lo_from_bytea(0, 'x')", WRITE),
    ("SELECT txid_current()", WRITE),
    ("SELECT pg_notify('ch', 'x')", WRITE),
    ("NOTIFY ch", WRITE),
    ("LOCK TABLE t", LOCK),
    ("REFRESH MATERIALIZED VIEW m", WRITE),
    ("SELECT my_func(1)", WRITE),
    ("select my_func()", WRITE),
    ("select myschema.version()", WRITE),
    ('SELECT "Version"()', WRITE),
    ("SELECT public.pg_read_file('/etc/passwd')", WRITE),
    ("SELECT myschema.pg_read_file('/etc/passwd')", WRITE),
    ('SELECT "PG_READ_FILE"(\'/etc/passwd\')', WRITE),
    ("SELECT * FROM t WHERE my_func(x)", WRITE),
    ("BEGIN; DELETE FROM t; COMMIT", WRITE),
    ("SELECT 1; DELETE FROM t", WRITE),
    # schema changes
    ("CREATE TABLE t (x int)", DDL),
    ("CREATE TABLE x AS SELECT * FROM t", DDL),
    ("SELECT * INTO newtable FROM t", DDL),
    ("CREATE MATERIALIZED VIEW m AS SELECT 1", DDL),
    ("CREATE VIEW v AS SELECT * FROM t", DDL),
    ("ALTER TABLE t ADD COLUMN y int", DDL),
    ("DROP TABLE t", DDL),
    ("TRUNCATE t", DDL),
    ("CREATE INDEX ON t (x)", DDL),
    ("COMMENT ON TABLE t IS 'x'", DDL),
    ("SECURITY LABEL ON TABLE t IS 'x'", DDL),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", DDL),
    ("CREATE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN END $$", DDL),
    ("CREATE SEQUENCE s", DDL),
    ("CREATE TYPE mood AS ENUM ('a')", DDL),
    # privileges
    ("GRANT SELECT ON t TO bob", PRIVILEGE),
    ("REVOKE SELECT ON t FROM bob", PRIVILEGE),
    ("GRANT admin TO bob", PRIVILEGE),
    ("CREATE ROLE bob", PRIVILEGE),
    ("ALTER ROLE bob SUPERUSER", PRIVILEGE),
    ("DROP ROLE bob", PRIVILEGE),
    ("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO bob", PRIVILEGE),
    ("ALTER TABLE t OWNER TO bob", PRIVILEGE),
    ("ALTER SCHEMA s OWNER TO bob", PRIVILEGE),
    ("REASSIGN OWNED BY bob TO alice", PRIVILEGE),
    ("ALTER TABLE t DISABLE ROW LEVEL SECURITY", PRIVILEGE),
    ("CREATE POLICY p ON t USING (true)", PRIVILEGE),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SECURITY DEFINER RETURN 1", PRIVILEGE),
    ("CREATE SCHEMA s CREATE TABLE x (a int) GRANT SELECT ON x TO PUBLIC", PRIVILEGE),
    # code the gateway cannot see
    ("DO $$ BEGIN DELETE FROM t; END $$", PROCEDURAL),
    ("DO LANGUAGE plpgsql $$ BEGIN END $$", PROCEDURAL),
    ("CALL p(1)", PROCEDURAL),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS 'return 1'", PROCEDURAL),
    # administration
    ("VACUUM t", ADMIN),
    ("ANALYZE t", ADMIN),
    ("REINDEX TABLE t", ADMIN),
    ("CLUSTER t", ADMIN),
    ("CHECKPOINT", ADMIN),
    ("ALTER SYSTEM SET work_mem = '1GB'", ADMIN),
    ("CREATE EXTENSION dblink", ADMIN),
    ("DROP EXTENSION dblink", ADMIN),
    ("CREATE DATABASE d", ADMIN),
    ("SELECT pg_terminate_backend(1)", ADMIN),
    ("SELECT pg_cancel_backend(1)", ADMIN),
    ("SELECT pg_reload_conf()", ADMIN),
    ("SELECT pg_switch_wal()", ADMIN),
    ("SELECT pg_create_logical_replication_slot('s', 'pgoutput')", ADMIN),
    ("SELECT pg_stat_reset()", ADMIN),
    ("SELECT brin_summarize_new_values('i')", ADMIN),
    ("SELECT gin_clean_pending_list('i')", ADMIN),
    ("SELECT pg_catalog.pg_nextoid('t', 'c', 'i')", ADMIN),
    ("SELECT heap_force_kill('t', ARRAY['(0,1)'::tid])", ADMIN),
    ("SELECT dblink_exec('dbname=x', 'DROP TABLE x')", ADMIN),
    ("SELECT * FROM dblink('dbname=x', 'SELECT 1') AS t(a int)", ADMIN),
    ("SELECT other.dblink_exec('dbname=x', 'DROP TABLE x')", ADMIN),
    # server file system
    ("COPY t TO PROGRAM 'sh'", FILE),
    ("COPY t FROM PROGRAM 'curl evil'", FILE),
    ("COPY t FROM '/etc/passwd'", FILE),
    ("COPY t FROM 'stdin'", FILE),
    ("COPY (SELECT 1) TO '/tmp/x'", FILE),
    ("SELECT pg_read_file('/etc/passwd')", FILE),
    ("SELECT * FROM pg_read_file('/etc/passwd')", FILE),
    ("SELECT * FROM ROWS FROM (pg_ls_dir('.'))", FILE),
    ("SELECT * FROM t, LATERAL pg_ls_dir(t.path) d", FILE),
    ("SELECT \"pg_read_file\"('x')", FILE),
    ("SELECT PG_READ_FILE('x')", FILE),
    ('SELECT U&"pg\\005fread\\005ffile"(\'/etc/passwd\')', FILE),
    ("SELECT pg_catalog.pg_read_file('/etc/passwd')", FILE),
    ("SELECT pg_catalog.\"pg_read_file\"('/etc/passwd')", FILE),
    ("SELECT lo_import('/etc/passwd')", FILE),
    ("SELECT lo_export(1, '/tmp/x')", FILE),
    ("SELECT pg_stat_file('postgresql.conf')", FILE),
    ("SELECT pg_file_write('x', 'y', false)", FILE),
    ("INSERT INTO t SELECT * FROM pg_ls_dir('/')", FILE),
    ("UPDATE t SET x = pg_read_file('/etc/passwd')", FILE),
    ("SELECT * FROM t WHERE x IN (SELECT pg_read_file('/etc/passwd'))", FILE),
    ("SELECT * FROM t WHERE EXISTS (SELECT 1 WHERE pg_read_file('x') <> '')", FILE),
    ("SELECT CASE WHEN true THEN pg_read_file('x') END", FILE),
    ("SELECT count(*) OVER (PARTITION BY pg_read_file('x')) FROM t", FILE),
    ("SELECT * FROM t ORDER BY pg_read_file('x')", FILE),
    ("WITH f AS (SELECT pg_read_file('x')) SELECT * FROM f", FILE),
    ("EXPLAIN ANALYZE SELECT pg_read_file('x')", FILE),
    ("COPY (SELECT pg_read_file('x')) TO STDOUT", FILE),
    ("DECLARE c CURSOR FOR SELECT pg_read_file('x')", FILE),
    ("CREATE TABLE t (x text DEFAULT pg_read_file('/etc/passwd'))", FILE),
    ("CREATE VIEW v AS SELECT pg_read_file('/etc/passwd')", FILE),
    ("CREATE INDEX ON t ((pg_read_file(x)))", FILE),
    ("ALTER TABLE t ALTER COLUMN x SET DEFAULT pg_read_file('x')", FILE),
    ("LOAD 'evil.so'", FILE),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE c AS '/tmp/evil.so', 'f'", FILE),
    ("SELECT 1; SELECT pg_read_file('x')", FILE),
    # opaque or unparseable
    ("SELECT query_to_xml('DELETE FROM t RETURNING 1', true, true, '')", UNKNOWN),
    ("select query_to_xml('delete from t', true, true, '')", UNKNOWN),
    ("SELECT cursor_to_xml('c', 10, false, true, '')", UNKNOWN),
    ("SELECT table_to_xml('secrets', true, true, '')", UNKNOWN),
    ("SELECT * FROM ts_stat('SELECT v FROM t')", UNKNOWN),
    ("SELECT 1; $$ $$", UNKNOWN),
    ("SELEC 1", UNKNOWN),
    ("SELECT (", UNKNOWN),
    ("SELECT 1\x00; DELETE FROM t", UNKNOWN),
    ("EXECUTE p", UNKNOWN),
]


@pytest.mark.parametrize(("sql", "expected"), CLASS_CASES)
def test_statement_class(sql: str, expected: StatementClass) -> None:
    result = analyze(sql)
    assert result.cls is expected, result.reasons


def test_class_order_is_the_risk_order() -> None:
    assert [c.risk for c in StatementClass] == list(range(12))
    assert TRANSACTION.risk == 0 and UNKNOWN.risk == 11
    assert READ.risk < LOCK.risk < WRITE.risk < SAFETY.risk < DDL.risk
    assert READ.risk < WRITE.risk < DDL.risk < PRIVILEGE.risk < FILE.risk


def test_explain_without_analyze_still_flags_unknown_functions() -> None:
    # The planner may evaluate user functions (constant folding), so they still count.
    assert analyze("EXPLAIN SELECT my_func()").cls is WRITE
    # Catalogued side effects are volatile builtins, never run while planning.
    assert analyze("EXPLAIN SELECT nextval('s')").cls is READ


def test_unknown_function_class_is_configurable() -> None:
    strict = Analyzer(unknown_function_class=UNKNOWN)
    assert strict.analyze("SELECT my_func()").cls is UNKNOWN
    assert strict.analyze("SELECT lower('x')").cls is READ
    # Built-ins are known whether curated or only in pg_builtins.txt; another schema's
    # function of the same name is not a built-in.
    assert strict.analyze("select current_schema()").cls is READ
    assert strict.analyze("select pg_catalog.version()").cls is READ
    assert strict.analyze("select myschema.version()").cls is UNKNOWN
    assert strict.analyze("select my_func()").cls is UNKNOWN
    assert strict.analyze("select nextval('s')").cls is WRITE
    assert strict.analyze("select lo_import('/etc/passwd')").cls is FILE
    assert strict.analyze("select pg_terminate_backend(1)").cls is ADMIN
    assert strict.analyze("select query_to_xml('delete from t', true, true, '')").cls is UNKNOWN
    result = Analyzer().analyze("SELECT my_func()")
    assert any("public.my_func" in r for r in result.reasons)


def test_unrecognised_node_types_are_unknown() -> None:
    # A future PostgreSQL statement type, at top level or nested, must not pass as harmless.
    from keyturn.analysis.postgres import _Walk

    top = _Walk(Analyzer(), None, "x").statement("FancyNewStmt", {})
    assert (top.cls, top.command) == (UNKNOWN, "UNKNOWN")
    assert "FancyNewStmt" in top.reasons[0]
    nested = _Walk(Analyzer(), None, "x").statement(
        "SelectStmt", {"targetList": [{"ResTarget": {"val": {"FancyNewStmt": {}}}}]})
    assert nested.cls is UNKNOWN
    # PLAssignStmt is a real node type that never appears in SQL we are sent.
    assert _Walk(Analyzer(), None, "x").statement("PLAssignStmt", {}).cls is UNKNOWN


FORBIDDEN_CASES = [
    ("SET ROLE postgres", True),
    ("SET role TO 'postgres'", True),
    ('SET "ROLE" TO postgres', True),
    ("SET LOCAL ROLE postgres", True),
    ("SET SESSION ROLE postgres", True),
    ("SET ROLE NONE", True),
    ("RESET ROLE", True),
    ("SET SESSION AUTHORIZATION postgres", True),
    ("SET SESSION AUTHORIZATION DEFAULT", True),
    ("RESET SESSION AUTHORIZATION", True),
    ("SET LOCAL session_authorization = 'postgres'", True),
    ("SET standard_conforming_strings = off", True),
    ("SET standard_conforming_strings TO false", True),
    ("SET standard_conforming_strings = 0", True),
    ("SET LOCAL standard_conforming_strings = off", True),
    ("SET standard_conforming_strings = on", False),
    ("SET standard_conforming_strings TO DEFAULT", False),
    ("SET client_encoding = 'LATIN1'", True),
    ("SET client_encoding TO 'SJIS'", True),
    ("SET NAMES 'latin1'", True),
    ("SET LOCAL client_encoding = 'WIN1252'", True),
    ("SET client_encoding = 'UTF8'", False),
    ("SET client_encoding = 'utf8'", False),
    ("SET client_encoding = 'UTF-8'", False),
    ("SET client_encoding = 'unicode'", False),
    ("SET NAMES 'utf_8'", False),
    ("SET client_encoding TO DEFAULT", False),
    ("SELECT set_config('role', 'postgres', false)", True),
    ("SELECT set_config('ROLE', 'postgres', true)", True),
    ("SELECT pg_catalog.set_config('session_authorization', 'postgres', false)", True),
    ("SELECT set_config('standard_conforming_strings', 'off', false)", True),
    ("SELECT set_config('standard_conforming_strings', 'on', false)", False),
    ("SELECT set_config('client_encoding', 'LATIN1', false)", True),
    ("SELECT set_config('client_encoding', 'UTF8', false)", False),
    ("SELECT set_config('application_name', 'x', false)", False),
    ("SELECT set_config(name, 'x', false) FROM settings_to_apply", True),
    ("SELECT set_config('ro' || 'le', 'x', false)", True),
    ("SELECT set_config('role'::text, 'x', false)", True),
    ("SELECT 1 FROM t WHERE set_config('role', 'postgres', false) IS NOT NULL", True),
    ("SELECT * FROM t, LATERAL (SELECT set_config('role', 'x', true)) s", True),
    ("WITH s AS (SELECT set_config('role', 'x', false)) SELECT * FROM s", True),
    ("UPDATE pg_settings SET setting = 'postgres' WHERE name = 'role'", True),
    ("DISCARD ALL", True),
    ("SELECT 1; SET ROLE postgres; SELECT 2", True),
    ("RESET ALL", False),
    ("SET search_path = app", False),
    ("ALTER ROLE bob SET role = 'admin'", False),
    ("SELECT current_setting('role')", False),
]


@pytest.mark.parametrize(("sql", "forbidden"), FORBIDDEN_CASES)
def test_forbidden(sql: str, forbidden: bool) -> None:
    result = analyze(sql)
    assert (result.forbidden is not None) is forbidden, (result.forbidden, result.reasons)


def test_forbidden_reason_names_the_setting() -> None:
    assert "role" in (analyze("SET ROLE x").forbidden or "")
    assert "client_encoding" in (analyze("SET client_encoding = 'LATIN1'").forbidden or "")


TABLE_CASES = [
    ("SELECT * FROM orders", ("public.orders",)),
    ("SELECT * FROM Orders", ("public.orders",)),
    ('SELECT * FROM "Orders"', ("public.Orders",)),
    ('SELECT * FROM "My Schema"."Orders"', ("My Schema.Orders",)),
    ("SELECT * FROM Sales.Orders", ("sales.orders",)),
    ("SELECT * FROM db.sales.orders", ("db.sales.orders",)),
    ("SELECT * FROM pg_authid", ("public.pg_authid",)),
    ("SELECT * FROM pg_catalog.pg_authid", ("pg_catalog.pg_authid",)),
    ("SELECT * FROM a JOIN b ON true, c", ("public.a", "public.b", "public.c")),
    ("SELECT * FROM t WHERE x IN (SELECT y FROM u)", ("public.t", "public.u")),
    ("WITH x AS (SELECT * FROM t) SELECT * FROM x", ("public.t",)),
    ("WITH x AS (SELECT 1) SELECT * FROM x, public.x", ("public.x",)),
    ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b", ("public.b",)),
    ("WITH RECURSIVE r AS (SELECT 1 UNION ALL SELECT * FROM r) SELECT * FROM r", ()),
    ("SELECT * FROM (WITH y AS (SELECT 1) SELECT * FROM y) s, y", ("public.y",)),
    ("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d", ("public.orders",)),
    ("WITH t AS (SELECT 1) DELETE FROM t", ("public.t",)),
    ("SELECT * FROM orders o FOR UPDATE OF o", ("public.orders",)),
    ("INSERT INTO audit SELECT * FROM src", ("public.audit", "public.src")),
    ("UPDATE t SET x = u.x FROM u WHERE t.id = u.id", ("public.t", "public.u")),
    ("DELETE FROM t USING u WHERE t.id = u.id", ("public.t", "public.u")),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", ("public.t", "public.s")),
    ("COPY app.t FROM STDIN", ("app.t",)),
    ("TRUNCATE a, b.c", ("public.a", "b.c")),
    ("DROP TABLE a.b, c", ("a.b", "public.c")),
    ("LOCK TABLE t", ("public.t",)),
    ("VACUUM t", ("public.t",)),
    ("GRANT SELECT ON t TO bob", ("public.t",)),
    ("CREATE TABLE x AS SELECT * FROM t", ("public.x", "public.t")),
    ("SELECT * INTO n FROM t", ("public.n", "public.t")),
    ("ALTER TABLE t ADD COLUMN y int REFERENCES u(id)", ("public.t", "public.u")),
    ("EXPLAIN DELETE FROM t", ("public.t",)),
    ("SELECT * FROM t TABLESAMPLE SYSTEM (10)", ("public.t",)),
]


@pytest.mark.parametrize(("sql", "tables"), TABLE_CASES)
def test_tables(sql: str, tables: tuple[str, ...]) -> None:
    assert analyze(sql).tables == tables


FUNCTION_CASES = [
    ("SELECT lower(x) FROM t", ("pg_catalog.lower",)),
    ("SELECT pg_catalog.lower(x) FROM t", ("pg_catalog.lower",)),
    ("SELECT my_func(1)", ("public.my_func",)),
    ("SELECT app.my_func(1)", ("app.my_func",)),
    ('SELECT "MyFunc"(1)', ("public.MyFunc",)),
    ("SELECT * FROM ROWS FROM (pg_ls_dir('.'), generate_series(1, 2))",
     ("pg_catalog.pg_ls_dir", "pg_catalog.generate_series")),
    ("SELECT f(g(h(1)))", ("public.f", "public.g", "public.h")),
    ("CALL app.proc(now())", ("app.proc", "pg_catalog.now")),
    ("EXECUTE p(lower('x'))", ("pg_catalog.lower",)),
    ("SELECT count(*) FILTER (WHERE f(x)) FROM t", ("pg_catalog.count", "public.f")),
    ("SELECT dblink('x', 'y')", ("public.dblink",)),
    ("select current_schema()", ("pg_catalog.current_schema",)),
    ("select pg_catalog.version()", ("pg_catalog.version",)),
    ("select myschema.version()", ("myschema.version",)),
    ("SELECT format_type(1, 2)", ("pg_catalog.format_type",)),
    ("SELECT current_user, coalesce(1, 2), greatest(1, 2)", ()),
]


@pytest.mark.parametrize(("sql", "functions"), FUNCTION_CASES)
def test_functions(sql: str, functions: tuple[str, ...]) -> None:
    assert analyze(sql).functions == functions


def test_statement_fields() -> None:
    result = analyze("BEGIN; UPDATE t SET x = 1; EXPLAIN ANALYZE DELETE FROM t; COMMIT")
    assert [s.command for s in result.statements] == ["BEGIN", "UPDATE", "EXPLAIN", "COMMIT"]
    assert [s.is_dml for s in result.statements] == [False, True, False, False]
    assert [s.text for s in result.statements] == [
        "BEGIN", "UPDATE t SET x = 1", "EXPLAIN ANALYZE DELETE FROM t", "COMMIT"]
    assert result.cls is WRITE and result.error is None
    assert result.statements[1].reasons == ("UPDATE public.t modifies rows",)
    assert "data-modifying CTE: DELETE public.orders" in analyze(
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d").reasons


def test_reasons_are_specific() -> None:
    assert "function pg_catalog.pg_read_file reads server files" in analyze(
        "SELECT pg_read_file('x')").reasons
    assert any("FOR UPDATE" in r for r in analyze("SELECT * FROM t FOR UPDATE").reasons)
    assert any("PROGRAM" in r for r in analyze("COPY t TO PROGRAM 'sh'").reasons)
    # The most serious reason comes first.
    assert analyze("SELECT pg_read_file('x') FROM t").reasons[0].startswith("function")


def test_literal_dependent() -> None:
    assert analyze("SELECT set_config('a', 'b', false)").statements[0].literal_dependent
    assert analyze("SET client_encoding = 'UTF8'").statements[0].literal_dependent
    assert not analyze("SELECT * FROM t WHERE x = 'a'").statements[0].literal_dependent
    # statement_timeout = 0 turns a guard off, so its value decides the class.
    assert analyze("SET statement_timeout = 5").statements[0].literal_dependent


def test_parse_error_is_unknown() -> None:
    result = analyze("SELEC * FROM t")
    assert result.cls is UNKNOWN
    assert result.error and "syntax error" in result.error
    assert result.statements == ()
    assert result.reasons and "syntax error" in result.reasons[0]


@pytest.mark.parametrize("sql", ["", "   ", "-- c", "/* c */", ";;", "/* /* nested */ */"])
def test_empty_message_is_read_with_no_statements(sql: str) -> None:
    result = analyze(sql)
    assert (result.cls, result.statements, result.error, result.forbidden) == (READ, (), None,
                                                                               None)


def test_non_ascii_statement_text_is_sliced_by_bytes() -> None:
    sql = "SELECT 'héllo wörld'; DELETE FROM \"tëst\" -- 日本\n;  SELECT '日本語' AS ü"
    result = analyze(sql)
    assert [s.text for s in result.statements] == [
        "SELECT 'héllo wörld'", 'DELETE FROM "tëst" -- 日本', "SELECT '日本語' AS ü"]
    assert result.tables == ("public.tëst",)
    assert result.cls is WRITE


@pytest.mark.parametrize("sql", ["\ud800", "SELECT '\udfff'", "SELECT 1\x00", "\x00"])
def test_text_postgres_cannot_receive_is_unknown(sql: str) -> None:
    analyzer = Analyzer()
    for _ in range(2):  # and the same again, in case it was cached
        result = analyzer.analyze(sql)
        assert result.cls is UNKNOWN and result.error


def test_deeply_nested_input_does_not_raise() -> None:
    deep = "SELECT " + "(" * 5000 + "1" + ")" * 5000
    assert analyze(deep).cls in set(StatementClass)
    deeper = "SELECT " + "ARRAY[" * 3000 + "1" + "]" * 3000
    assert analyze(deeper).cls in set(StatementClass)


# --- prepared statements --------------------------------------------------------------------

def test_prepared_statement_lifecycle() -> None:
    analyzer, session = Analyzer(), PreparedStatements()
    prepare = analyzer.analyze("PREPARE p(int) AS DELETE FROM orders WHERE id = $1", session)
    assert prepare.cls is SESSION
    assert prepare.statements[0].prepared_name == "p"
    assert prepare.tables == ("public.orders",)
    assert "p" in session and len(session) == 1

    execute = analyzer.analyze("EXECUTE p(1)", session)
    assert execute.cls is WRITE
    stmt = execute.statements[0]
    # is_dml only marks INSERT/UPDATE/DELETE/MERGE text (the gateway EXPLAINs it elsewhere).
    assert (stmt.command, stmt.prepared_name, stmt.is_dml) == ("EXECUTE", "p", False)
    assert stmt.text == "EXECUTE p(1)"
    assert stmt.tables == ("public.orders",)
    assert stmt.reasons[0] == "EXECUTE of prepared p: DELETE (write)"

    assert run(analyzer, "DEALLOCATE p", session).cls is SESSION
    assert "p" not in session
    gone = analyzer.analyze("EXECUTE p(1)", session)
    assert gone.cls is UNKNOWN and "not seen" in gone.reasons[0]


def test_execute_without_session_memory_is_unknown() -> None:
    assert Analyzer().analyze("EXECUTE p").cls is UNKNOWN


def test_prepare_and_execute_in_one_message() -> None:
    session = PreparedStatements()
    result = Analyzer().analyze("PREPARE p AS SELECT pg_read_file('x'); EXECUTE p", session)
    assert [s.cls for s in result.statements] == [SESSION, FILE]


def test_deallocate_all_and_discard_all_forget_everything() -> None:
    analyzer, session = Analyzer(), PreparedStatements()
    run(analyzer, "PREPARE a AS SELECT 1; PREPARE b AS SELECT 2", session)
    assert len(session) == 2
    run(analyzer, "DEALLOCATE ALL", session)
    assert len(session) == 0
    run(analyzer, "PREPARE a AS SELECT 1", session)
    run(analyzer, "DISCARD ALL", session)
    assert analyzer.analyze("EXECUTE a", session).cls is UNKNOWN


def test_re_prepare_keeps_the_riskiest_definition() -> None:
    # The server rejects a duplicate PREPARE, but the gateway cannot know whether the first
    # one succeeded, so EXECUTE must assume the riskiest candidate.
    analyzer, session = Analyzer(), PreparedStatements()
    analyzer.analyze("PREPARE p AS DELETE FROM t", session)
    analyzer.analyze("PREPARE p AS SELECT 1", session)
    assert analyzer.analyze("EXECUTE p", session).cls is WRITE


def test_prepared_forbidden_carries_to_execute() -> None:
    analyzer, session = Analyzer(), PreparedStatements()
    analyzer.analyze("PREPARE p AS SELECT set_config('role', 'postgres', false)", session)
    assert analyzer.analyze("EXECUTE p", session).forbidden


def test_nested_execute_uses_session_memory() -> None:
    analyzer, session = Analyzer(), PreparedStatements()
    analyzer.analyze("PREPARE p AS DELETE FROM t RETURNING *", session)
    assert analyzer.analyze("CREATE TABLE x AS EXECUTE p", session).cls is DDL
    assert analyzer.analyze("EXPLAIN ANALYZE EXECUTE p", session).cls is WRITE
    assert Analyzer().analyze("CREATE TABLE x AS EXECUTE p").cls is UNKNOWN


def test_execute_is_never_served_from_cache() -> None:
    analyzer = Analyzer()
    first, second = PreparedStatements(), PreparedStatements()
    analyzer.analyze("PREPARE p AS SELECT 1", first)
    analyzer.analyze("PREPARE p AS DELETE FROM t", second)
    assert analyzer.analyze("EXECUTE p", first).cls is READ
    assert analyzer.analyze("EXECUTE p", second).cls is WRITE
    assert analyzer.analyze("EXECUTE q", second).cls is UNKNOWN  # same fingerprint as "p"
    run(analyzer, "DEALLOCATE p", first)
    assert analyzer.analyze("EXECUTE p", first).cls is UNKNOWN
    # PREPARE is not cached either: a repeat must still update session memory.
    analyzer.analyze("PREPARE p AS SELECT 1", first)
    assert analyzer.analyze("EXECUTE p", first).cls is READ


# --- caches ---------------------------------------------------------------------------------

def _fresh(sql: str) -> Analysis:
    return Analyzer(cache_size=0).analyze(sql)


def test_cache_different_identifiers_do_not_share() -> None:
    assert pg.fingerprint("delete from a") != pg.fingerprint("delete from b")
    analyzer = Analyzer()
    assert analyzer.analyze("delete from a").tables == ("public.a",)
    assert analyzer.analyze("delete from b").tables == ("public.b",)


@pytest.mark.parametrize("order", [0, 1])
def test_cache_set_config_literals_never_share(order: int) -> None:
    pair = ["SELECT set_config('role', 'x', false)",
            "SELECT set_config('application_name', 'x', false)"]
    assert pg.fingerprint(pair[0]) == pg.fingerprint(pair[1])  # why this test exists
    analyzer = Analyzer()
    results = {sql: analyzer.analyze(sql) for sql in (pair if order == 0 else pair[::-1])}
    assert results[pair[0]].forbidden is not None
    assert results[pair[1]].forbidden is None


@pytest.mark.parametrize("order", [0, 1])
def test_cache_client_encoding_values_never_share(order: int) -> None:
    pair = ["SET client_encoding = 'LATIN1'", "SET client_encoding = 'UTF8'"]
    analyzer = Analyzer()
    results = {sql: analyzer.analyze(sql) for sql in (pair if order == 0 else pair[::-1])}
    assert results[pair[0]].forbidden and not results[pair[1]].forbidden


@pytest.mark.parametrize("pair", [
    # pg_query's fingerprint ignores schema names and the names of aliased relations, which
    # is why the analyser does not key its cache on it.
    ("SELECT * FROM a.t", "SELECT * FROM b.t"),
    ("SELECT * FROM secrets s", "SELECT * FROM public_data s"),
    ("DELETE FROM secrets s WHERE s.id = 1", "DELETE FROM other s WHERE s.id = 1"),
    ("WITH x AS (SELECT 1) SELECT * FROM x a", "WITH x AS (SELECT 1) SELECT * FROM y a"),
    ("CREATE TEMP TABLE a (x int)", "CREATE TEMP TABLE b (x int)"),
])
def test_cache_identifiers_the_fingerprint_ignores(pair: tuple[str, str]) -> None:
    assert pg.fingerprint(pair[0]) == pg.fingerprint(pair[1])
    assert pg.normalize(pair[0]) != pg.normalize(pair[1])
    for order in (pair, pair[::-1]):
        analyzer = Analyzer()
        for sql in order:
            assert analyzer.analyze(sql).tables == _fresh(sql).tables


def test_cache_hit_uses_this_text() -> None:
    analyzer = Analyzer()
    analyzer.analyze("SELECT * FROM t WHERE x = 1; DELETE FROM t WHERE y = 2")
    result = analyzer.analyze("SELECT * FROM t WHERE x = 99; DELETE FROM t WHERE y = 'ü'")
    assert result.text == "SELECT * FROM t WHERE x = 99; DELETE FROM t WHERE y = 'ü'"
    assert [s.text for s in result.statements] == [
        "SELECT * FROM t WHERE x = 99", "DELETE FROM t WHERE y = 'ü'"]
    assert result == _fresh(result.text)
    assert len(analyzer._by_shape) == 1  # served from the normalized-text cache


CORPUS = [sql for sql, _ in CLASS_CASES] + [sql for sql, _ in FORBIDDEN_CASES] + [
    sql for sql, _ in TABLE_CASES] + [
    "SELECT 'é' ; /* x */ DELETE FROM t -- y\n; SELECT 1",
    "  SELECT 1  ;  ",
    "SELECT * FROM t WHERE x = 'ü' AND y = 2",
    "SELECT * FROM t WHERE x = 'other' AND y = 3",
    "EXPLAIN (ANALYZE false) DELETE FROM t",
    "EXPLAIN (ANALYZE true) DELETE FROM t",
    "COPY t TO STDOUT", "COPY t TO '/tmp/x'",
]


def test_cache_warm_results_equal_fresh_results() -> None:
    rng = random.Random(1234)
    analyzer = Analyzer()
    for _ in range(3):
        order = CORPUS[:]
        rng.shuffle(order)
        for sql in order:
            if "EXECUTE" in sql.upper():
                continue  # needs session memory; covered above
            assert analyzer.analyze(sql) == _fresh(sql), sql


def test_cache_parameters_and_constants_do_not_share() -> None:
    # normalize() turns both into "SELECT set_config($1, $2, $3)".
    analyzer = Analyzer()
    assert analyzer.analyze("SELECT set_config('application_name', 'x', false)").forbidden is None
    assert analyzer.analyze("SELECT set_config($1, $2, $3)").forbidden is not None


TEMPLATES = [
    "SELECT * FROM {ident} WHERE x = {const}",
    "SELECT * FROM {ident} AS s WHERE s.x = {const}",
    "SELECT * FROM app.{ident} WHERE x = {const}; DELETE FROM {ident} WHERE y = {const}",
    "UPDATE {ident} SET x = {const} WHERE id = {const}",
    "SELECT set_config({const}, {const}, false)",
    "SET client_encoding = {const}",
    "SET standard_conforming_strings = {const}",
    "WITH {ident} AS (SELECT {const}) SELECT * FROM {ident}, t",
    "SELECT {ident}({const})",
    "COPY (SELECT {const}) TO STDOUT",
]
IDENTS = st.sampled_from(["t", "orders", "pg_read_file", "lower", "secrets", '"Mixed"', "é"])
CONSTS = st.sampled_from(["1", "'role'", "'UTF8'", "'latin1'", "'off'", "'on'", "2.5", "true",
                          "'application_name'", "$1", "NULL"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(TEMPLATES), IDENTS, CONSTS, CONSTS), min_size=1,
                max_size=8))
def test_fuzz_shared_cache_matches_fresh_analysis(
        cases: list[tuple[str, str, str, str]]) -> None:
    analyzer = Analyzer()
    for template, ident, first, second in cases:
        sql = template.format(ident=ident, const=first).replace(first, second, 1)
        assert analyzer.analyze(sql) == _fresh(sql), sql


def test_cache_is_bounded() -> None:
    analyzer = Analyzer(cache_size=8)
    for i in range(50):
        analyzer.analyze(f"SELECT * FROM t{i}")
    assert len(analyzer._by_text) <= 8 and len(analyzer._by_shape) <= 8


# --- data and robustness ----------------------------------------------------------------------

def test_catalogue_entries_are_valid_classes() -> None:
    for table in (catalogue.BUILTIN_FUNCTIONS, catalogue.EXTENSION_FUNCTIONS,
                  catalogue.SETTINGS, catalogue.STATEMENTS, catalogue.DROP_CLASSES):
        for name, (cls, reason) in table.items():
            assert StatementClass(cls), name
            assert isinstance(reason, str)
    assert catalogue.BUILTIN_FUNCTIONS["pg_read_file"][0] == "file"
    assert catalogue.BUILTIN_FUNCTIONS["count"][0] == "read"


def test_builtin_list_is_loaded() -> None:
    header = BUILTINS_FILE.read_text("utf-8").splitlines()[0]
    assert header.startswith("# generated by scripts/gen_pg_builtins.py from PostgreSQL ")
    assert len(BUILTIN_NAMES) > 2000
    assert {"current_schema", "version", "format_type", "pg_get_expr", "has_table_privilege",
            "to_regclass", "array_to_string", "pg_table_is_visible"} <= BUILTIN_NAMES


def test_builtin_list_has_no_extension_functions() -> None:
    # Contrib functions (dblink, adminpack, lo, ...) are classified only by the curated
    # catalogue; a list generated from a cluster with extensions installed must not be used.
    adminpack = {"pg_file_write", "pg_file_rename", "pg_file_unlink", "pg_file_sync",
                 "pg_file_read", "pg_file_length", "pg_logdir_ls", "pg_logfile_rotate"}
    assert not (set(catalogue.EXTENSION_FUNCTIONS) | adminpack) & BUILTIN_NAMES


def test_every_risky_looking_builtin_is_curated() -> None:
    # A regenerated pg_builtins.txt must not make a risky built-in READ by default: every name
    # matching an audit pattern needs a decision in the catalogue (a read included).
    patterns = re.compile("|".join(f"(?:{p})" for p in catalogue.AUDIT_PATTERNS))
    missing = sorted(n for n in BUILTIN_NAMES
                     if patterns.search(n) and n not in catalogue.BUILTIN_FUNCTIONS)
    assert not missing, f"classify these in keyturn/analysis/catalogue.py: {missing}"


def test_audit_patterns_cover_the_known_side_effects() -> None:
    # The patterns describe the risky families: every curated built-in with a side effect
    # matches one, so the audit test above would catch a new member of each family.
    patterns = re.compile("|".join(f"(?:{p})" for p in catalogue.AUDIT_PATTERNS))
    unmatched = sorted(name for name, (cls, _) in catalogue.BUILTIN_FUNCTIONS.items()
                       if cls != "read" and not patterns.search(name))
    assert not unmatched
    for name in ("lo_import", "lowrite", "pg_read_file", "pg_ls_dir", "pg_stat_file",
                 "pg_stat_reset", "pg_terminate_backend", "pg_cancel_backend", "setval",
                 "nextval", "pg_notify", "set_config", "pg_advisory_lock", "pg_switch_wal",
                 "pg_create_restore_point", "query_to_xml", "txid_current", "pg_nextoid"):
        assert patterns.search(name), name


SQL_PIECES = st.sampled_from([
    "SELECT", "DELETE", "FROM", "t", "WHERE", "1", "'x'", "$$", "$x$", ";", "(", ")", ",",
    "pg_read_file", "WITH", "AS", "EXPLAIN", "ANALYZE", "COPY", "TO", "PROGRAM", "/*", "*/",
    "--", "\n", "U&\"a\"", "\"", "é", "SET", "ROLE", "PREPARE", "EXECUTE", "p", "INTO",
])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_fuzz_arbitrary_text_never_raises(sql: str) -> None:
    result = Analyzer().analyze(sql, PreparedStatements())
    assert isinstance(result.cls, StatementClass)
    if result.error is not None:
        assert result.cls is UNKNOWN


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SQL_PIECES, max_size=12).map(" ".join))
def test_fuzz_sql_like_text_never_raises(sql: str) -> None:
    analyzer = Analyzer()
    first = analyzer.analyze(sql, PreparedStatements())
    assert isinstance(first.cls, StatementClass)
    # A second call (possibly cached) agrees with the first.
    assert analyzer.analyze(sql, PreparedStatements()).cls is first.cls


# ---------------------------------------------------------------- the gateway's fast shape

from keyturn.analysis.postgres import fast_shape  # noqa: E402


@pytest.mark.parametrize(("a", "b"), [
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
     "SELECT abalance FROM pgbench_accounts WHERE aid = 987654;"),
    ("SELECT * FROM t WHERE x = 3.14 LIMIT 10", "SELECT * FROM t WHERE x = 2 LIMIT 99"),
    ("UPDATE t SET v = v + 1 WHERE id = 5", "UPDATE t SET v = v + 70 WHERE id = 6"),
])
def test_fast_shape_merges_texts_that_differ_only_in_numbers(a, b):
    assert fast_shape(a) == fast_shape(b) is not None
    assert pg.normalize(a) == pg.normalize(b)  # a subset of what the parser's shape merges


@pytest.mark.parametrize(("a", "b"), [
    ("SELECT * FROM t1", "SELECT * FROM t2"),                 # digits inside identifiers
    ("SELECT * FROM s1.t", "SELECT * FROM s2.t"),
    ("SELECT c1 FROM t", "SELECT c2 FROM t"),
    ("SELECT 0x1F", "SELECT 0x2F"),                           # PostgreSQL 15: 0 AS x1F
    ("SELECT 1e5", "SELECT 2e5"),
    ("SELECT .5", "SELECT .6"),
    ("SELECT x.1", "SELECT x.2"),
])
def test_fast_shape_keeps_everything_but_bare_numbers(a, b):
    assert fast_shape(a) != fast_shape(b)


@pytest.mark.parametrize("sql", [
    "SELECT 'x'", 'SELECT "t1".a FROM "t1"', "SELECT $1", "SELECT $$1$$", "SELECT 1 -- 2",
    "SELECT /* 1 */ 2", "SELECT E'\\x41'", "SELECT * FROM t\u0663",   # non-ASCII digit
    "SELECT * FROM \u00e91", "SELECT 1\x00",
])
def test_fast_shape_refuses_texts_it_cannot_read_by_eye(sql):
    assert fast_shape(sql) is None


_FAST_CORPUS = [
    "SELECT a FROM t WHERE id = 1",
    "SELECT pg_terminate_backend(123)",
    "SELECT lo_unlink(4711)",
    "SELECT nextval(5)",
    "DELETE FROM t WHERE id = 1",
    "SELECT * FROM t ORDER BY 1 LIMIT 5 OFFSET 10",
    "SET statement_timeout = 5000",
    "SELECT 1; DELETE FROM t WHERE id = 2",
    "FETCH 10 FROM c",
    "SELECT * FROM generate_series(1, 10) g, t1 WHERE t1.id = g",
]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_FAST_CORPUS), st.lists(st.integers(0, 10**9), min_size=8, max_size=8))
def test_texts_with_one_fast_shape_classify_alike(sql, numbers):
    """The gateway reuses a verdict for every text with the same fast shape once the
    analyser has marked that shape known, so those texts must classify identically."""
    it = iter(numbers)
    other = re.sub(r"(?<![\w$.])\d+(?![\w.])", lambda m: str(next(it)), sql)
    assert fast_shape(other) == fast_shape(sql)
    analyzer = Analyzer()
    first = analyzer.analyze(sql)
    if not analyzer.known_shape(fast_shape(sql)):
        return  # never reused: nothing to prove
    second = Analyzer().analyze(other)
    strip = lambda a: [(s.cls, s.command, s.tables, s.functions, s.reasons, s.forbidden)  # noqa: E731
                       for s in a.statements]
    assert strip(first) == strip(second)


def test_a_shape_is_known_only_when_its_class_reads_no_constant():
    analyzer = Analyzer()
    analyzer.analyze("SELECT a FROM t WHERE id = 7")
    assert analyzer.known_shape(fast_shape("SELECT a FROM t WHERE id = 8"))
    analyzer.analyze("PREPARE p1 AS SELECT 1")
    assert not analyzer.known_shape(fast_shape("PREPARE p1 AS SELECT 2"))
    assert not analyzer.known_shape(fast_shape("SELECT b FROM t WHERE id = 7"))


# --- the server's prepared-statement namespace, answer by answer ------------------------------

def test_a_deallocate_not_yet_answered_keeps_the_old_definition() -> None:
    # Pipelined: DEALLOCATE p; PREPARE p AS DELETE; EXECUTE p -- until the answers arrive
    # every definition the server may hold counts, and EXECUTE is judged by the riskiest.
    analyzer, session = Analyzer(), PreparedStatements()
    run(analyzer, "PREPARE p AS SELECT 1", session)
    analyzer.analyze("DEALLOCATE p", session)
    assert analyzer.analyze("EXECUTE p", session).cls is READ
    analyzer.analyze("PREPARE p AS DELETE FROM t", session)
    assert analyzer.analyze("EXECUTE p", session).cls is WRITE


def test_a_failed_prepare_does_not_replace_the_definition() -> None:
    analyzer, session = Analyzer(), PreparedStatements()
    run(analyzer, "PREPARE p AS DELETE FROM t", session)
    run(analyzer, "PREPARE p AS SELECT 1", session, ok=False)  # 42P05: already exists
    assert analyzer.analyze("EXECUTE p", session).cls is WRITE
    run(analyzer, "DEALLOCATE p", session, ok=False)  # e.g. in an aborted transaction
    assert analyzer.analyze("EXECUTE p", session).cls is WRITE
    run(analyzer, "DEALLOCATE p", session)
    assert analyzer.analyze("EXECUTE p", session).cls is UNKNOWN


def test_prepare_deallocate_prepare_in_one_message() -> None:
    analyzer, session = Analyzer(), PreparedStatements()
    run(analyzer, "PREPARE p AS SELECT 1", session)
    result = analyzer.analyze(
        "DEALLOCATE p; PREPARE p AS DELETE FROM t; EXECUTE p", session)
    assert result.cls is WRITE and result.statements[2].cls is WRITE


def test_names_are_cut_at_63_bytes_like_the_server() -> None:
    analyzer, session = Analyzer(), PreparedStatements()
    long_a = "p" * 63 + "a"
    long_b = "p" * 63 + "b"  # the server sees the same name
    run(analyzer, f"PREPARE {long_a} AS DELETE FROM t", session)
    assert analyzer.analyze(f"EXECUTE {long_b}", session).cls is WRITE
    run(analyzer, f"DEALLOCATE {long_b}", session)
    assert analyzer.analyze(f"EXECUTE {long_a}", session).cls is UNKNOWN
