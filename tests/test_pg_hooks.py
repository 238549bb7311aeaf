"""User code the target runs without the statement naming it, through a live gateway:
code attached to built-in types (casts, operator classes), an index's operator class,
foreign tables, relations read with their parent (inheritance, partitions) or through a
materialized view, and timeouts raised above the target's own.

Each object is created directly on the target by its administrator; alice, through the
gateway under a lenient policy (reads allowed; writes, locks, safety and vault.* blocked),
must never make that code run: the statement is blocked and nothing happened on the
target (no advisory lock taken, no program run)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, Keyturn, make_keyturn
from tests.test_pg_families import LENIENT

DB = "hooks"
LOCK = 777  # the advisory lock the hidden code takes

SETUP = f"""
CREATE SCHEMA vault AUTHORIZATION app;
CREATE TABLE vault.secret (v text); INSERT INTO vault.secret VALUES ('top secret');
-- The hidden code: a session advisory lock (a read-only transaction allows it).
CREATE FUNCTION hid_effect() RETURNS void LANGUAGE plpgsql AS
  $$BEGIN PERFORM pg_advisory_lock({LOCK}); END$$;
-- An explicit cast between built-in types, and a domain over its target type.
CREATE FUNCTION d2i(date) RETURNS int LANGUAGE plpgsql AS
  $$BEGIN PERFORM hid_effect(); RETURN 1; END$$;
CREATE CAST (date AS integer) WITH FUNCTION d2i(date);
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
-- A user operator and a user type (with its default btree class) in stored expressions:
-- pg_depend names the operator or the type, not the functions they run.
CREATE SCHEMA xo;
CREATE FUNCTION opfn(int, int) RETURNS bool IMMUTABLE LANGUAGE plpgsql AS
  $$BEGIN PERFORM hid_effect(); RETURN $1 < $2; END$$;
CREATE OPERATOR xo.#~# (LEFTARG = int, RIGHTARG = int, FUNCTION = opfn);
CREATE TABLE o_stat (x int); CREATE STATISTICS o_stat_s ON ((x OPERATOR(xo.#~#) 5)) FROM o_stat;
CREATE TABLE o_ipred (x int); CREATE INDEX ON o_ipred (x) WHERE x OPERATOR(xo.#~#) 5;
CREATE TABLE o_iexpr (x int); CREATE INDEX ON o_iexpr ((x OPERATOR(xo.#~#) 5));
CREATE TABLE o_check (x int CHECK (x OPERATOR(xo.#~#) 1000));
CREATE TABLE o_part (x int) PARTITION BY LIST ((x OPERATOR(xo.#~#) 5));
CREATE TABLE o_part_t PARTITION OF o_part FOR VALUES IN (true);
CREATE TYPE mtxt;
CREATE FUNCTION mtxt_in(cstring) RETURNS mtxt IMMUTABLE STRICT LANGUAGE internal AS 'textin';
CREATE FUNCTION mtxt_out(mtxt) RETURNS cstring IMMUTABLE STRICT LANGUAGE internal AS 'textout';
CREATE TYPE mtxt (INPUT = mtxt_in, OUTPUT = mtxt_out, LIKE = text);
CREATE FUNCTION mtxt_cmp(mtxt, mtxt) RETURNS int IMMUTABLE LANGUAGE plpgsql AS
  $$BEGIN PERFORM hid_effect(); RETURN bttextcmp($1::text, $2::text); END$$;
CREATE CAST (mtxt AS text) WITHOUT FUNCTION AS IMPLICIT;
CREATE FUNCTION mtxt_lt(mtxt, mtxt) RETURNS bool IMMUTABLE LANGUAGE sql AS
  'SELECT $1::text < $2::text';
CREATE OPERATOR xo.< (LEFTARG = mtxt, RIGHTARG = mtxt, FUNCTION = mtxt_lt);
CREATE OPERATOR xo.<= (LEFTARG = mtxt, RIGHTARG = mtxt, FUNCTION = mtxt_lt);
CREATE OPERATOR xo.= (LEFTARG = mtxt, RIGHTARG = mtxt, FUNCTION = mtxt_lt);
CREATE OPERATOR xo.>= (LEFTARG = mtxt, RIGHTARG = mtxt, FUNCTION = mtxt_lt);
CREATE OPERATOR xo.> (LEFTARG = mtxt, RIGHTARG = mtxt, FUNCTION = mtxt_lt);
CREATE OPERATOR CLASS mtxt_ops DEFAULT FOR TYPE mtxt USING btree AS OPERATOR 1 xo.<,
  OPERATOR 2 xo.<=, OPERATOR 3 xo.=, OPERATOR 4 xo.>=, OPERATOR 5 xo.>,
  FUNCTION 1 mtxt_cmp(mtxt, mtxt);
CREATE TABLE o_minmax (x int);
CREATE STATISTICS o_minmax_s ON ((x + length(GREATEST('a'::mtxt, 'b'::mtxt)::text)))
  FROM o_minmax;
-- Vault rows reached without naming vault: a materialized view, an inheritance child,
-- a partition.
CREATE MATERIALIZED VIEW mv_vault AS SELECT v FROM vault.secret;
CREATE TABLE parent_t (v text);
CREATE TABLE vault.kid () INHERITS (parent_t); INSERT INTO vault.kid VALUES ('kid secret');
CREATE TABLE parted (v text) PARTITION BY LIST (v);
CREATE TABLE vault.part PARTITION OF parted DEFAULT; INSERT INTO parted VALUES ('part secret');
-- Foreign tables: a program run by file_fdw, another connection by postgres_fdw.
CREATE EXTENSION file_fdw; CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;
CREATE EXTENSION postgres_fdw;
CREATE SERVER loop FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1', dbname '{DB}');
CREATE USER MAPPING FOR app SERVER loop OPTIONS (user 'app', password '{APP_PASSWORD}');
CREATE FOREIGN TABLE ft_remote (v text) SERVER loop
  OPTIONS (schema_name 'vault', table_name 'secret');
GRANT ALL ON ALL TABLES IN SCHEMA public, vault TO app;
ALTER MATERIALIZED VIEW mv_vault OWNER TO app;
-- Stored expressions the planner folds on reads, and a partition key's operator class.
CREATE FUNCTION evconst(int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS
  $$BEGIN PERFORM hid_effect(); RETURN $1; END$$;
CREATE TABLE pexpr (x int) PARTITION BY RANGE ((x + evconst(1)));
CREATE TABLE pexpr_a PARTITION OF pexpr FOR VALUES FROM (0) TO (1000);
CREATE TABLE iexpr (x int); CREATE INDEX ON iexpr ((x + evconst(2)));
CREATE TABLE ipred (x int); CREATE INDEX ON ipred (x) WHERE x > evconst(3);
CREATE TABLE sexpr (x int); CREATE STATISTICS sexpr_s ON (x + evconst(4)) FROM sexpr;
CREATE TABLE cpar (x int); CREATE TABLE ckid (CHECK (x < evconst(5))) INHERITS (cpar);
CREATE TABLE cplain (x int CHECK (x < evconst(6)));
-- A partition key with a user type's operator class.
CREATE FUNCTION pcmp(mtxt, mtxt) RETURNS int IMMUTABLE LANGUAGE plpgsql AS
  $$BEGIN PERFORM hid_effect(); RETURN bttextcmp($1::text, $2::text); END$$;
CREATE OPERATOR CLASS mtxt_part FOR TYPE mtxt USING btree AS OPERATOR 1 xo.<,
  OPERATOR 2 xo.<=, OPERATOR 3 xo.=, OPERATOR 4 xo.>=, OPERATOR 5 xo.>,
  FUNCTION 1 pcmp(mtxt, mtxt);
CREATE TABLE ptab (x int) PARTITION BY RANGE ((x::text::mtxt) mtxt_part);
CREATE TABLE ptab_a PARTITION OF ptab FOR VALUES FROM ('0') TO ('5');
-- User code a superuser put in pg_catalog.
CREATE FUNCTION pg_catalog.upper(macaddr8) RETURNS text LANGUAGE plpgsql AS
  $$BEGIN PERFORM public.hid_effect(); RETURN $1::text; END$$;
-- Planner statistics of the vault.
INSERT INTO vault.secret SELECT 'top secret' FROM generate_series(1, 50);
CREATE SEQUENCE vault.s_seq; SELECT nextval('vault.s_seq');
ALTER SEQUENCE vault.s_seq OWNER TO app;
ANALYZE vault.secret;
GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
-- The operator's timeouts for the gateway's role.
ALTER ROLE app IN DATABASE {DB} SET statement_timeout = '5s';
ALTER ROLE app IN DATABASE {DB} SET lock_timeout = '2s';
"""


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fdw")
    d.chmod(0o777)  # the server's own user writes the marker
    return d / "program_ran"


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory,
       marker: Path) -> Iterator[Keyturn]:
    pg.create_database(DB, owner="app")
    pg.execute(SETUP, dbname=DB)
    pg.execute(f"""CREATE FOREIGN TABLE ft_prog (line text) SERVER files
                   OPTIONS (program 'echo ran >> {marker}; echo hello');
                   GRANT SELECT ON ft_prog TO app""", dbname=DB)
    kt = make_keyturn(tmp_path_factory.mktemp("hooks"), pg, extra=LENIENT,
                      shop_policy="lenient", shop_db=DB)
    kt.start()
    yield kt
    kt.stop()


def superuser(pg: LocalPostgres) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(DB), autocommit=True)


def lock_holders(pg: LocalPostgres) -> int:
    with superuser(pg) as c:
        row = c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND objid = %s", (LOCK,)).fetchone()
        return int(row[0]) if row else 0


def psql(kt: Keyturn, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["psql", kt.dsn("alice", dbname="shop"), "-X", "-At", "-v",
                           "ON_ERROR_STOP=1", "-c", sql],
                          capture_output=True, text=True, timeout=60)


def assert_blocked(kt: Keyturn, pg: LocalPostgres, sql: str, why: str) -> None:
    """Blocked through psql and psycopg (extended protocol, in and out of a transaction),
    naming ``why``; and the hidden code never ran."""
    res = psql(kt, sql)
    assert res.returncode != 0 and "keyturn: blocked" in res.stderr, (sql, res.stderr)
    assert why in res.stderr, (sql, res.stderr)
    for autocommit in (True, False):
        with psycopg.connect(kt.dsn("alice"), autocommit=autocommit) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="keyturn"):
                c.execute(sql)
    assert lock_holders(pg) == 0, sql


def test_reads_without_hidden_code_still_run(kt: Keyturn) -> None:
    res = psql(kt, "SELECT 1; SELECT count(*) FROM pg_class WHERE relname = 'ptab'; "
                   "SELECT 2 + length('x')")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "1", "3"]


#: (what runs, statement, what the refusal names): each is blocked, never run.
HIDDEN = [
    ("explicit cast", "SELECT current_date::int", "public.d2i"),
    ("explicit cast", "SELECT CAST(DATE '2020-01-01' AS integer)", "public.d2i"),
    ("explicit cast", "SELECT int4(current_date)", "public.d2i"),
    ("explicit cast", "SELECT pg_catalog.int4(current_date)", "public.d2i"),
    ("explicit cast", "SELECT current_date::posint", "public.d2i"),
    ("explicit cast", "SELECT ARRAY[current_date]::int[]", "public.d2i"),
    ("materialized view", "SELECT * FROM mv_vault", "vault-is-off-limits"),
    ("inheritance", "SELECT * FROM parent_t", "vault-is-off-limits"),
    ("inheritance", "TABLE parent_t", "vault-is-off-limits"),
    ("partition", "SELECT * FROM parted", "vault-is-off-limits"),
    ("partition", "SELECT count(*) FROM public.parted WHERE v <> ''", "vault-is-off-limits"),
    ("foreign table", "SELECT * FROM ft_prog", "foreign-data wrapper file_fdw"),
    ("foreign table", "SELECT * FROM ft_remote", "foreign-data wrapper postgres_fdw"),
    ("partition key", "SELECT * FROM ptab WHERE x = 5",
     "its partition key (operator class mtxt_part)"),
    ("partition key", "SELECT * FROM pexpr", "its partition key runs user-defined public.evconst"),
    ("index expression", "SELECT * FROM iexpr",
     "an index expression runs user-defined public.evconst"),
    ("index predicate", "SELECT * FROM ipred WHERE x = 1", "public.evconst"),
    ("statistics", "SELECT * FROM sexpr", "an extended statistics expression"),
    ("check", "SELECT * FROM cpar WHERE x = 1", "a constraint runs user-defined public.evconst"),
    ("check", "SELECT * FROM cplain WHERE x = 1", "public.evconst"),
    ("operator in an expression", "SELECT * FROM o_stat", "(operator #~#) runs user-defined"),
    ("operator in an expression", "SELECT * FROM o_ipred WHERE x = 1", "public.opfn"),
    ("operator in an expression", "SELECT * FROM o_iexpr", "public.opfn"),
    ("operator in an expression", "SELECT * FROM o_check WHERE x = 1", "public.opfn"),
    ("operator in an expression", "SELECT * FROM o_part", "public.opfn"),
    ("type in an expression", "SELECT * FROM o_minmax", "(type public.mtxt) runs user-defined"),
    ("pg_catalog", "SELECT upper(macaddr8 '08:00:2b:01:02:03:04:05')",
     "user-defined pg_catalog.upper"),
    ("pg_catalog", "SELECT pg_catalog.upper(macaddr8 '08:00:2b:01:02:03:04:05')",
     "user-defined pg_catalog.upper"),
    ("planner statistics", "SELECT most_common_vals::text FROM pg_stats "
     "WHERE schemaname = 'vault'", "vault-is-off-limits"),
    ("planner statistics", "SELECT histogram_bounds::text FROM pg_catalog.pg_stats",
     "vault-is-off-limits"),
    ("planner statistics", "SELECT * FROM pg_stats_ext", "vault-is-off-limits"),
    ("a sequence's values", "SELECT pg_sequence_last_value('vault.s_seq')", "vault-is-off-limits"),
    ("a sequence's values", "SELECT * FROM pg_sequence_parameters('vault.s_seq'::regclass)",
     "vault-is-off-limits"),
    ("statement texts", "SELECT query FROM pg_stat_activity", "vault-is-off-limits"),
    ("statement texts", "SELECT pg_stat_get_activity(NULL)", "vault-is-off-limits"),
]


@pytest.mark.parametrize("family, sql, why", HIDDEN, ids=[f"{f}: {s[:40]}" for f, s, _ in HIDDEN])
def test_code_or_rows_reached_without_being_named_are_blocked(
        kt: Keyturn, pg: LocalPostgres, marker: Path, family: str, sql: str, why: str) -> None:
    assert_blocked(kt, pg, sql, why)
    assert not marker.exists()  # file_fdw's program never ran


@pytest.mark.parametrize("sql", [
    "SET statement_timeout = 2147483647",
    "SET statement_timeout = '1h'",
    "SET lock_timeout = '24d'",
    "SELECT set_config('statement_timeout', '2147483647', false)",
    "SET LOCAL statement_timeout = '6s'",
])
def test_a_timeout_raised_above_the_target_s_own(kt: Keyturn, sql: str) -> None:
    res = psql(kt, sql)
    assert res.returncode != 0 and "keyturn: blocked" in res.stderr, (sql, res.stderr)
    assert "above the target's configured" in res.stderr


@pytest.mark.parametrize("sql", ["SET statement_timeout = '1s'", "SET lock_timeout = 2000",
                                 "SET idle_session_timeout = '1h'"])
def test_a_timeout_kept_within_the_target_s_own_is_a_session_setting(
        kt: Keyturn, sql: str) -> None:
    res = psql(kt, sql)
    assert res.returncode == 0, (sql, res.stderr)


#: Code on built-in types that any statement may run: (what, created directly on the target,
#: dropped again, what the refusal of every statement names, statements also blocked).
EVERYWHERE = [
    ("implicit cast",
     """CREATE FUNCTION m2t(macaddr) RETURNS text LANGUAGE plpgsql AS
          $$BEGIN PERFORM hid_effect(); RETURN 'x'; END$$;
        CREATE CAST (macaddr AS text) WITH FUNCTION m2t(macaddr) AS IMPLICIT""",
     "DROP CAST (macaddr AS text); DROP FUNCTION m2t(macaddr)",
     ("implicit cast from macaddr to text runs user-defined public.m2t",),
     ("SELECT length(macaddr '08:00:2b:01:02:03')",)),
    ("default operator class",
     """CREATE FUNCTION jhash(json) RETURNS int IMMUTABLE LANGUAGE plpgsql AS
          $$BEGIN PERFORM hid_effect(); RETURN hashtext($1::text); END$$;
        CREATE FUNCTION jeq(json, json) RETURNS bool IMMUTABLE LANGUAGE sql AS
          $$SELECT $1::text = $2::text$$;
        CREATE SCHEMA hidops;
        CREATE OPERATOR hidops.= (LEFTARG = json, RIGHTARG = json, FUNCTION = jeq);
        CREATE OPERATOR CLASS json_hidden DEFAULT FOR TYPE json USING hash AS
          OPERATOR 1 hidops.= (json, json), FUNCTION 1 jhash(json)""",
     "DROP OPERATOR CLASS json_hidden USING hash; DROP SCHEMA hidops CASCADE;"
     " DROP FUNCTION jhash(json), jeq(json, json)",
     ("hash operator family json_hidden of json runs user-defined public.jhash",
      "public.jeq"), ()),
    ("non-default operator class of a built-in type (index, partition key, row compare)",
     """CREATE FUNCTION icmp(int4, int4) RETURNS int IMMUTABLE LANGUAGE plpgsql AS
          $$BEGIN PERFORM hid_effect(); RETURN btint4cmp($1, $2); END$$;
        CREATE OPERATOR CLASS int4_hidden FOR TYPE int4 USING btree AS OPERATOR 1 <,
          OPERATOR 2 <=, OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >, FUNCTION 1 icmp(int4, int4);
        CREATE TABLE idx_t (id int); CREATE INDEX ON idx_t (id int4_hidden)""",
     "DROP TABLE idx_t; DROP OPERATOR CLASS int4_hidden USING btree;"
     " DROP OPERATOR FAMILY int4_hidden USING btree; DROP FUNCTION icmp(int4, int4)",
     ("btree operator family int4_hidden of integer runs user-defined public.icmp",),
     ("SELECT * FROM idx_t WHERE id = 5", "SELECT (1, 2) < (3, 4)")),
    ("the only sort family of box",
     """CREATE FUNCTION boxcmp(box, box) RETURNS int IMMUTABLE LANGUAGE plpgsql AS
          $$BEGIN PERFORM hid_effect(); RETURN btfloat8cmp(area($1), area($2)); END$$;
        CREATE OPERATOR CLASS box_sort FOR TYPE box USING btree AS OPERATOR 1 <,
          OPERATOR 2 <=, OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >,
          FUNCTION 1 boxcmp(box, box)""",
     "DROP OPERATOR CLASS box_sort USING btree; DROP OPERATOR FAMILY box_sort USING btree;"
     " DROP FUNCTION boxcmp(box, box)",
     ("btree operator family box_sort of box runs user-defined public.boxcmp",),
     ("SELECT (box '((0,0),(1,1))', 1) < (box '((0,0),(2,2))', 2)",
      "SELECT b FROM (VALUES (box '((0,0),(1,1))')) v(b) ORDER BY b USING <")),
    ("a built-in type's I/O replaced",
     """CREATE FUNCTION m8send(macaddr8) RETURNS bytea IMMUTABLE STRICT LANGUAGE plpgsql AS
          $$BEGIN PERFORM hid_effect(); RETURN macaddr8_send($1); END$$;
        ALTER TYPE pg_catalog.macaddr8 SET (SEND = m8send)""",
     "ALTER TYPE pg_catalog.macaddr8 SET (SEND = macaddr8_send);"
     " DROP FUNCTION m8send(macaddr8)",
     ("the input/output of macaddr8 runs user-defined public.m8send",), ()),
    ("an implicit cast through a function created in pg_catalog",
     """CREATE FUNCTION pg_catalog.c2t(circle) RETURNS text LANGUAGE plpgsql AS
          $$BEGIN PERFORM public.hid_effect(); RETURN 'c'; END$$;
        CREATE CAST (circle AS text) WITH FUNCTION pg_catalog.c2t(circle) AS IMPLICIT""",
     "DROP CAST (circle AS text); DROP FUNCTION pg_catalog.c2t(circle)",
     ("implicit cast from circle to text runs user-defined pg_catalog.c2t",), ()),
]


@pytest.mark.parametrize("what, create, drop, names, blocked", EVERYWHERE,
                         ids=[e[0] for e in EVERYWHERE])
def test_code_on_built_in_types_that_any_statement_may_run(
        kt: Keyturn, pg: LocalPostgres, what: str, create: str, drop: str,
        names: tuple[str, ...], blocked: tuple[str, ...]) -> None:
    """Values of built-in types are everywhere, so while the target has such code every
    statement that evaluates values is judged as running it; once it is gone, statements
    run again (at the next catalog read)."""
    def wait_for(blocked: bool) -> subprocess.CompletedProcess[str]:
        deadline = time.monotonic() + 30  # the catalog is read again every 10 s
        while True:
            res = psql(kt, "SELECT 1")
            if (res.returncode != 0) == blocked or time.monotonic() > deadline:
                return res
            time.sleep(0.5)

    assert wait_for(blocked=False).returncode == 0
    with superuser(pg) as c:
        c.execute(create)
    try:
        res = wait_for(blocked=True)
        assert "keyturn: blocked" in res.stderr, res.stderr
        for name in names:
            assert name in res.stderr, (name, res.stderr)
        for sql in blocked:
            assert_blocked(kt, pg, sql, names[0])
        # Transaction control evaluates no values: it still runs.
        assert psql(kt, "BEGIN; COMMIT").returncode == 0
    finally:
        with superuser(pg) as c:
            c.execute(drop)
    assert wait_for(blocked=False).returncode == 0
    assert lock_holders(pg) == 0
