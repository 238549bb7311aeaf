"""Adversarial tests: user code hidden behind names that look built in. Through the live
gateway (psql, psycopg simple and extended protocol) on a connection whose policy allows
reads and blocks everything else; each check then asks a direct connection whether the
hidden code ran: advisory locks and NOTIFY (which a read-only transaction allows) and
deleted rows. The objects live in a database of their own, so other tests keep the
built-ins they expect.

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from proxies.postgres.catalog import REFRESH_SECONDS
from tests.conftest import APP_PASSWORD, Keyturn, make_keyturn
from tests.pg_raw import B, E, P, RawConn, S, errors

DB = "usercode"
POLICIES = """
  uc_strict:
    default: block
    rules:
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
      - name: ruled-inserts
        match: {class: write, tables: ["public.ruled"]}
        action: allow
      - name: tally-inserts
        match: {class: write, tables: ["public.tallies"]}
        action: allow
  uc_writes:
    default: block
    rules:
      - name: reads-and-writes
        match: {class: [read, transaction, session, write]}
        action: allow
  uc_ddl:
    default: block
    rules:
      - name: reads-and-schema
        match: {class: [read, transaction, session, ddl, procedural]}
        action: allow
"""
SCHEMA = """
CREATE TYPE mytype AS (a int);
CREATE TABLE victim (id int);
INSERT INTO victim SELECT generate_series(1, 10);
CREATE FUNCTION public.upper(mytype) RETURNS text LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 'x'; END $$;
CREATE SCHEMA evil;
CREATE SCHEMA late;
CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_notify('uc_events', 'now'); RETURN pg_catalog.now(); END $$;
CREATE FUNCTION public.add_lock(mytype, mytype) RETURNS int LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 1; END $$;
CREATE OPERATOR + (leftarg = mytype, rightarg = mytype, function = public.add_lock);
CREATE FUNCTION public.eq_notify(mytype, mytype) RETURNS boolean LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_notify('uc_events', 'eq'); RETURN true; END $$;
CREATE OPERATOR = (leftarg = mytype, rightarg = mytype, function = public.eq_notify);
CREATE FUNCTION public.notify_me() RETURNS int LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_notify('uc_events', 'view'); RETURN 1; END $$;
CREATE VIEW v_notify AS SELECT public.notify_me() AS x;
CREATE VIEW v_outer AS SELECT x FROM v_notify;
CREATE TABLE ruled (id int);
CREATE RULE ruled_also AS ON INSERT TO ruled DO ALSO DELETE FROM victim;
CREATE FUNCTION public.sum_lock(int, mytype) RETURNS int LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 1; END $$;
CREATE AGGREGATE public.sum(mytype) (sfunc = public.sum_lock, stype = int);
CREATE FUNCTION public.generate_series(mytype) RETURNS SETOF int LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN NEXT 1; END $$;
CREATE FUNCTION public.make_interval(days mytype) RETURNS interval LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN '1 day'; END $$;
CREATE FUNCTION public.to_mytype(int) RETURNS mytype LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN ROW($1); END $$;
CREATE CAST (int AS mytype) WITH FUNCTION public.to_mytype(int);
CREATE TABLE rls_lock (id int);
INSERT INTO rls_lock VALUES (1);
ALTER TABLE rls_lock ENABLE ROW LEVEL SECURITY;
ALTER TABLE rls_lock FORCE ROW LEVEL SECURITY;
CREATE POLICY p_lock ON rls_lock USING (pg_try_advisory_lock(4242) IS NOT NULL);
CREATE TABLE rls_cfg (id int);
ALTER TABLE rls_cfg ENABLE ROW LEVEL SECURITY;
ALTER TABLE rls_cfg FORCE ROW LEVEL SECURITY;
CREATE POLICY p_cfg ON rls_cfg USING (set_config('statement_timeout', '0', false) IS NOT NULL);
CREATE TABLE rls_path (id int);
ALTER TABLE rls_path ENABLE ROW LEVEL SECURITY;
ALTER TABLE rls_path FORCE ROW LEVEL SECURITY;
CREATE POLICY p_path ON rls_path
  USING (set_config('search_path', 'evil, public, pg_catalog', false) IS NOT NULL);
CREATE DOMAIN lockdom AS text CHECK (pg_try_advisory_lock(4242) IS NOT NULL);
CREATE DOMAIN lockdom2 AS lockdom;
CREATE TYPE comp_lock AS (x lockdom);
CREATE TABLE dtab (x lockdom);
CREATE TABLE uj_a (m mytype);
CREATE TABLE uj_b (m mytype);
INSERT INTO uj_a VALUES (ROW(1));
INSERT INTO uj_b VALUES (ROW(1));
CREATE VIEW v_using AS SELECT * FROM uj_a JOIN uj_b USING (m);
CREATE DOMAIN public.reverse AS text CHECK (pg_try_advisory_lock(4242) IS NOT NULL);
INSERT INTO dtab VALUES (NULL);
CREATE TABLE wr (id int);
INSERT INTO wr VALUES (1);
CREATE FUNCTION wr_text(wr) RETURNS text LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 'x'; END $$;
CREATE CAST (wr AS text) WITH FUNCTION wr_text(wr) AS IMPLICIT;
CREATE OPERATOR === (LEFTARG = int4, RIGHTARG = int4, FUNCTION = int4eq, NEGATOR = !==);
CREATE OPERATOR !== (LEFTARG = int4, RIGHTARG = int4, FUNCTION = pg_try_advisory_lock,
                     NEGATOR = ===);
CREATE TABLE tallies (n int);
CREATE FUNCTION public.wipe() RETURNS int LANGUAGE plpgsql
  AS $$ BEGIN DELETE FROM victim; RETURN 1; END $$;
CREATE FUNCTION public.json_scalar(int) RETURNS text LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 'x'; END $$;
CREATE FUNCTION public.json(int) RETURNS text LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 'x'; END $$;
CREATE FUNCTION public.json_array(int, int) RETURNS text LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 'x'; END $$;
CREATE FUNCTION public.json_object(int, int) RETURNS text LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 'x'; END $$;
CREATE FUNCTION public.json_query(int, int) RETURNS text LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 'x'; END $$;
CREATE FUNCTION public.merge_action() RETURNS text LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 'x'; END $$;
CREATE AGGREGATE public.json_arrayagg(mytype) (sfunc = public.sum_lock, stype = int);
CREATE EXTENSION tcn;
CREATE FUNCTION public.upper(int) RETURNS text LANGUAGE plpgsql STABLE
  AS $$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 'x'; END $$;
ALTER EXTENSION tcn ADD FUNCTION public.upper(int);
CREATE TABLE bumps (n int);
CREATE FUNCTION public.md5(int) RETURNS int LANGUAGE sql
  AS $$ INSERT INTO bumps VALUES ($1) RETURNING $1 $$;
"""


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    pg.create_database(DB, owner="app")
    with direct(pg) as c:
        c.execute(SCHEMA)
    base: Path = tmp_path_factory.mktemp("usercode")
    kt = make_keyturn(base, pg, extra=POLICIES)
    target = (f"target: {{host: 127.0.0.1, port: {pg.port}, dbname: {DB}, user: app, "
              f"password_file: {base / 'app.password'}}}")
    text = kt.config.read_text().replace("connections:\n", textwrap.dedent(f"""\
        connections:
          - name: {DB}
            type: postgres
            {target}
            policy: uc_strict
          - name: {DB}_rw
            type: postgres
            {target}
            policy: uc_writes
          - name: {DB}_ddl
            type: postgres
            {target}
            policy: uc_ddl
        """), 1)
    kt.config.write_text(text)
    kt.start()
    yield kt
    kt.stop()
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        c.execute(f"DROP DATABASE {DB} WITH (FORCE)")


def direct(pg: LocalPostgres) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD), autocommit=True)


def dsn(kt: Keyturn, dbname: str = DB) -> str:
    return kt.dsn("alice", dbname=dbname)


class Witness:
    """A direct connection listening on uc_events that can tell whether hidden code ran."""

    def __init__(self, pg: LocalPostgres):
        self.conn = direct(pg)
        self.conn.execute("LISTEN uc_events")

    def nothing_happened(self) -> None:
        c = self.conn
        locks = c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()
        assert locks == (0,), "an advisory lock was taken"
        assert c.execute("SELECT count(*) FROM victim").fetchone() == (10,), "rows were deleted"
        notes = list(c.notifies(timeout=0.3, stop_after=1))
        assert not notes, f"a notification was sent: {notes}"

    def close(self) -> None:
        self.conn.close()


@pytest.fixture()
def witness(pg: LocalPostgres, kt: Keyturn) -> Iterator[Witness]:
    w = Witness(pg)
    yield w
    w.close()


HIDDEN = {
    "overloaded upper": "SELECT upper(ROW(1)::mytype)",
    "user operator +": "SELECT ROW(1)::mytype + ROW(2)::mytype",
    "IN with a user =": "SELECT ROW(1)::mytype IN (ROW(2)::mytype)",
    "CASE with a user =": "SELECT CASE ROW(1)::mytype WHEN ROW(2)::mytype THEN 1 END",
    "view calling a function": "SELECT * FROM v_notify",
    "view over that view": "SELECT x FROM v_outer",
    "user aggregate": "SELECT sum(ROW(g)::mytype) FROM generate_series(1, 3) g",
    "set-returning function in FROM": "SELECT * FROM generate_series(ROW(1)::mytype)",
    "named arguments": "SELECT make_interval(days => ROW(1)::mytype)",
    "cast with a user function": "SELECT 7::mytype",
    "row security policy taking a lock": "SELECT * FROM rls_lock",
    "domain check taking a lock": "SELECT 'x'::lockdom",
    "domain over that domain": "SELECT 'x'::lockdom2",
    "composite holding the domain": "SELECT '(x)'::comp_lock",
    "array of that composite": """SELECT '{"(x)"}'::comp_lock[]""",
    "row type of a table with a domain column":
        """SELECT json_populate_record(NULL::dtab, '{"x": "y"}')""",
    "column definition list": """SELECT * FROM json_to_record('{"x": "y"}') AS t(x lockdom)""",
    "JOIN USING with a user =": "SELECT * FROM uj_a JOIN uj_b USING (m)",
    "NATURAL JOIN with a user =": "SELECT * FROM uj_a NATURAL JOIN uj_b",
    "a view joining USING": "SELECT * FROM v_using",
    "a table row populated from json":
        """SELECT json_populate_record(d, '{"x": "y"}') FROM (SELECT 1) s
           LEFT JOIN dtab d ON true""",
    "a call that is a cast to a domain named like a built-in": "SELECT reverse('abc')",
    "a cast of a table's row type": "SELECT upper(wr) FROM wr",
    "an operator whose negator takes a lock": "SELECT id FROM wr WHERE NOT (id === 3)",
    "attribute notation as a cast to a domain": "SELECT ('x'::varchar).lockdom",
    # Syntax the analyser's newer grammar reads as SQL/JSON or MERGE, but PostgreSQL 15
    # as calls resolved through the search path.
    "json_scalar(): SQL/JSON syntax only to a newer grammar": "SELECT json_scalar(1)",
    "json(): the same": "SELECT json(1)",
    "json_array(): the same": "SELECT json_array(1, 2)",
    "json_object(): a keyword only to a newer grammar": "SELECT json_object(1, 2)",
    "json_query(): the same": "SELECT json_query(1, 2)",
    "merge_action(): MERGE syntax only to a newer grammar": "SELECT merge_action()",
    "json_arrayagg(): an aggregate to the older grammar":
        "SELECT json_arrayagg(ROW(g)::mytype) FROM generate_series(1, 3) g",
    # A database owner installs a trusted extension and adds a function of their own.
    "a function added to a trusted extension": "SELECT upper(5)",
}


def blocked(err: BaseException) -> bool:
    return "keyturn" in str(err)


@pytest.mark.parametrize("name", list(HIDDEN))
def test_hidden_user_code_is_blocked_with_psycopg(kt: Keyturn, witness: Witness,
                                                  name: str) -> None:
    sql = HIDDEN[name]
    with psycopg.connect(dsn(kt), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as err:  # simple query protocol
            c.execute(sql)
        assert blocked(err.value), err.value
        with pytest.raises(psycopg.Error) as err:  # extended protocol (a parameter)
            c.execute(f"SELECT * FROM ({sql}) q WHERE %s::int IS NOT NULL", (1,))
        assert blocked(err.value), err.value
        witness.nothing_happened()
        # Names no user code shadows still work (upper, =, + now mean user code here).
        assert c.execute("SELECT lower('Still Fine'), now() IS NOT NULL").fetchone() == \
            ("still fine", True)


def test_hidden_user_code_is_blocked_with_psql(kt: Keyturn, witness: Witness) -> None:
    for sql in HIDDEN.values():
        p = subprocess.run(["psql", dsn(kt), "-X", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode != 0 and "keyturn" in p.stderr, (sql, p.stdout, p.stderr)
    witness.nothing_happened()


@pytest.mark.parametrize("table", ["rls_cfg", "rls_path"])
def test_row_security_policies_that_change_settings(kt: Keyturn, table: str) -> None:
    """A policy that turns the statement timeout off or moves search_path (so that the
    session's next upper() is evil.upper) runs on every read of its table: never allowed
    as a read."""
    with psycopg.connect(dsn(kt), autocommit=True) as c:
        c.execute("SET statement_timeout = '5s'")
        for params in ((), (1,)):
            with pytest.raises(psycopg.Error) as err:
                c.execute(f"SELECT * FROM {table}" + (" WHERE %s = 1" if params else ""),
                          params or None)
            assert blocked(err.value), err.value
        assert c.execute("SELECT current_setting('statement_timeout'), "
                         "current_setting('search_path')").fetchone() == ("5s",
                                                                         '"$user", public')


def test_values_typed_as_a_domain_without_a_cast(kt: Keyturn, witness: Witness) -> None:
    """A typed PREPARE, and a Parse that declares its parameter's type by OID, make the
    server coerce bound values to the domain: its check runs as for a cast."""
    with psycopg.connect(dsn(kt), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as err:
            c.execute("PREPARE typed(lockdom) AS SELECT $1")
            c.execute("EXECUTE typed('x')")
        assert blocked(err.value), err.value
    with direct(kt.pg) as c:
        oid = c.execute("SELECT 'lockdom'::regtype::oid").fetchone()[0]  # type: ignore[index]
    with RawConn(dsn(kt)) as r:
        answers = r.run(P("", "SELECT $1", [oid]), B("", "", [0], [b"x"]), E(), S())
        assert [e["C"] for e in errors(answers)] == ["42501"], answers
    witness.nothing_happened()


def test_objects_are_seen_when_no_session_kept_the_catalog_fresh(
        kt: Keyturn, witness: Witness) -> None:
    """The catalog is re-read while sessions use it; a session that opens after a quiet
    spell waits for a fresh read, so a domain created meanwhile is seen."""
    time.sleep(REFRESH_SECONDS + 1)  # no gateway session in this time
    with direct(kt.pg) as c:
        c.execute("CREATE DOMAIN quiet_dom AS text CHECK (pg_try_advisory_lock(4242) IS NOT NULL)")
    try:
        with psycopg.connect(dsn(kt), autocommit=True) as c:
            with pytest.raises(psycopg.Error) as err:
                c.execute("SELECT 'x'::quiet_dom")
            assert blocked(err.value), err.value
        witness.nothing_happened()
    finally:
        with direct(kt.pg) as c:
            c.execute("DROP DOMAIN quiet_dom")


def test_a_schema_before_pg_catalog(kt: Keyturn, witness: Witness) -> None:
    with psycopg.connect(dsn(kt), autocommit=True) as c:
        assert c.execute("SELECT now() IS NOT NULL").fetchone() == (True,)
        c.execute("SET search_path = evil, pg_catalog, public")
        for params in ((), (1,)):
            with pytest.raises(psycopg.Error) as err:
                c.execute("SELECT now()" + (" WHERE %s::int IS NOT NULL" if params else ""), params)
            assert blocked(err.value), err.value
        witness.nothing_happened()
    p = subprocess.run(["psql", dsn(kt), "-X", "-At", "-c", "SET search_path = evil, pg_catalog",
                        "-c", "SELECT now()"], capture_output=True, text=True, timeout=30)
    assert "keyturn" in p.stderr, p.stderr
    witness.nothing_happened()


def test_a_rule_makes_an_allowed_insert_a_delete(kt: Keyturn, witness: Witness) -> None:
    """The policy allows writes to public.ruled; its DO ALSO rule deletes from victim."""
    with psycopg.connect(dsn(kt), autocommit=True) as c:
        for params in ((), (1,)):
            with pytest.raises(psycopg.Error) as err:
                c.execute("INSERT INTO ruled VALUES (" + ("%s" if params else "1") + ")", params)
            assert blocked(err.value), err.value
    witness.nothing_happened()
    with direct(kt.pg) as c:
        assert c.execute("SELECT count(*) FROM ruled").fetchone() == (0,)


def test_an_allowed_write_found_in_the_catalog_gets_write_access(kt: Keyturn) -> None:
    """md5(int) looks built in but is a user function that inserts: the catalog makes
    it a write, the policy allows writes, so the target's read-only guard must let it
    write (psql; psycopg simple, extended, prepared; alone and inside a transaction)."""
    rw = dsn(kt, f"{DB}_rw")
    with direct(kt.pg) as c:
        c.execute("TRUNCATE bumps")
    p = subprocess.run(["psql", rw, "-X", "-v", "ON_ERROR_STOP=1", "-At",
                        "-c", "SELECT md5(1)", "-c", "SELECT 1; SELECT md5(2); SELECT 3"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    with psycopg.connect(rw, autocommit=True) as c:
        assert c.execute("SELECT md5(3)").fetchone() == (3,)
        assert c.execute("SELECT md5(%s::int)", (4,)).fetchone() == (4,)
        for n in (5, 6):  # the second runs the server-side prepared statement
            assert c.execute("SELECT md5(%s::int)", (n,), prepare=True).fetchone() == (n,)
        with c.transaction():
            assert c.execute("SELECT count(*) FROM victim").fetchone() == (10,)
            assert c.execute("SELECT md5(7)").fetchone() == (7,)
            assert c.execute("SELECT md5(%s::int)", (8,)).fetchone() == (8,)
            assert c.execute("SELECT count(*) FROM victim").fetchone() == (10,)
        # Still guarded: a write the policy did not allow fails.
        with pytest.raises(psycopg.Error) as err:
            c.execute("CREATE TABLE nope (x int)")
        assert blocked(err.value), err.value
    with direct(kt.pg) as c:
        assert c.execute("SELECT array_agg(n ORDER BY n) FROM bumps").fetchone() == (
            list(range(1, 9)),)


def test_a_write_rule_on_some_tables_does_not_cover_user_code(kt: Keyturn,
                                                              witness: Witness) -> None:
    """The policy allows inserts into tallies; wipe() deletes from victim. An INSERT that
    calls it writes where no rule allows (and runs with write access, so the target's
    read-only guard cannot help): it is judged without the table rule."""
    with psycopg.connect(dsn(kt), autocommit=True) as c:
        c.execute("INSERT INTO tallies VALUES (1)")
        for sql, params in (("INSERT INTO tallies SELECT wipe()", ()),
                            ("INSERT INTO tallies SELECT wipe() + %s", (1,)),
                            ("INSERT INTO tallies VALUES (upper(ROW(1)::mytype)::int)", ())):
            with pytest.raises(psycopg.Error) as err:
                c.execute(sql, params or None)
            assert blocked(err.value), err.value
    witness.nothing_happened()
    with direct(kt.pg) as c:
        assert c.execute("SELECT count(*) FROM tallies").fetchone() == (1,)
        c.execute("TRUNCATE tallies")


def test_a_function_created_after_the_session_started(kt: Keyturn, pg: LocalPostgres,
                                                      witness: Witness) -> None:
    """Both in the session that creates it (at once) and in one opened before (after the
    catalog was read again)."""
    ddl = f"{DB}_ddl"
    path = "SET search_path = late, pg_catalog, public"
    with psycopg.connect(dsn(kt, ddl), autocommit=True) as early, \
            psycopg.connect(dsn(kt, ddl), autocommit=True) as maker:
        probe = "SELECT lower('A')"
        for c in (early, maker):
            c.execute(path)
            assert c.execute(probe).fetchone() == ("a",)
            c.execute(probe + " WHERE %s::int IS NOT NULL", (1,))  # remembered by both paths
        maker.execute("CREATE FUNCTION late.lower(text) RETURNS text LANGUAGE plpgsql AS "
                      "$$ BEGIN PERFORM pg_advisory_lock(4242); RETURN 'x'; END $$")
        try:
            for params in ((), (1,)):
                with pytest.raises(psycopg.Error) as err:
                    maker.execute(probe + (" WHERE %s::int IS NOT NULL" if params else ""), params)
                assert blocked(err.value), err.value
            deadline = time.monotonic() + 10
            while True:
                try:
                    early.execute(probe)
                except psycopg.Error as exc:
                    assert blocked(exc), exc
                    break
                assert time.monotonic() < deadline, "the other session never saw the function"
                time.sleep(0.2)
            with pytest.raises(psycopg.Error) as err:
                early.execute(probe + " WHERE %s::int IS NOT NULL", (1,))
            assert blocked(err.value), err.value
            witness.nothing_happened()
        finally:
            with direct(pg) as c:
                c.execute("DROP FUNCTION late.lower(text)")


def test_objects_created_directly_on_the_target_are_seen_at_the_next_read(
        kt: Keyturn, pg: LocalPostgres) -> None:
    with psycopg.connect(dsn(kt), autocommit=True) as c:
        c.execute("SET search_path = late, pg_catalog, public")
        assert c.execute("SELECT initcap('a b')").fetchone() == ("A B",)
        with direct(pg) as d:
            d.execute("CREATE FUNCTION late.initcap(text) RETURNS text LANGUAGE sql "
                      "AS $$ SELECT 'harmless' $$")
        try:
            deadline = time.monotonic() + 25  # REFRESH_SECONDS (10) and the read
            while True:
                try:
                    c.execute("SELECT initcap('a b')")
                except psycopg.Error as exc:
                    assert blocked(exc), exc
                    break
                assert time.monotonic() < deadline, "the catalog was never read again"
                time.sleep(0.5)
        finally:
            with direct(pg) as d:
                d.execute("DROP FUNCTION late.initcap(text)")



DDL_REVIEWED = """
  ddlreview:
    default: block
    rules:
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
      - name: ddl-reviewed
        match: {class: ddl}
        action: review
        review: {approvers: [approvers], timeout: 10m}
"""


def test_a_pending_definition_changes_nothing_for_others(
        pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A CREATE FUNCTION held for review has not run: while it waits, and after it was
    rejected, nobody's calls of the built-in it would shadow are judged differently
    (it used to count from the moment it was held: anyone allowed to ask for DDL could
    block everyone's upper() for the length of a review)."""
    k = make_keyturn(tmp_path_factory.mktemp("pending-ddl"), pg, shop_policy="ddlreview",
                     extra=DDL_REVIEWED)
    k.start()
    sql = "SELECT upper(name) FROM customers LIMIT 1"
    try:
        with psycopg.connect(k.dsn("bob"), autocommit=True) as bob:
            assert bob.execute(sql).fetchone()
            errors: list[str] = []

            def alice() -> None:
                try:
                    with psycopg.connect(k.dsn("alice"), autocommit=True) as a:
                        a.execute("CREATE FUNCTION public.upper(text) RETURNS text "
                                  "LANGUAGE sql AS 'SELECT 1::text'")
                except psycopg.Error as exc:
                    errors.append(str(exc))

            held = threading.Thread(target=alice)
            held.start()
            ticket = k.wait_ticket()
            assert bob.execute(sql).fetchone()  # while it waits
            with psycopg.connect(k.dsn("carol"), autocommit=True) as carol:
                assert carol.execute(sql).fetchone()
            k.cli("reject", str(ticket["id"]), "--reason", "no", token_of="dana")
            held.join(20)
            assert errors and "rejected" in errors[0], errors
            assert bob.execute(sql).fetchone()  # and after
    finally:
        k.stop()
