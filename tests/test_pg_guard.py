"""The read-only guard: what the gateway allows as a read runs where the target itself
refuses writes, so a classification gap ends in a server error, never in changed data.

The connection here classifies functions it does not know as reads
(``unknown_functions: read``): the analyser's detection of hidden writes is off, and
``hidden_write()`` (a user function that INSERTs) is judged a read. Every way of
running it must still fail on the target, while allowed writes keep working in every
client mode. A direct connection checks that nothing was written.

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import Keyturn, direct_shop, make_keyturn
from tests.pg_raw import B, E, P, Q, RawConn, S, errors, tags

GUARDED = """
  guarded:
    default: block
    rules:
      - name: reads
        match: {class: [read, transaction, session, lock]}
        action: allow
      - name: allowed-writes
        match: {class: [write, ddl, admin], tables: ["public.guard_ok"]}
        action: allow
"""
SETUP = """
CREATE OR REPLACE FUNCTION escapes_on() RETURNS text LANGUAGE sql VOLATILE
  AS 'SELECT set_config(''standard_conforming_strings'', ''off'', false)';
CREATE OR REPLACE FUNCTION latin1() RETURNS text LANGUAGE sql VOLATILE
  AS 'SELECT set_config(''client_encoding'', ''LATIN1'', false)';
DROP TABLE IF EXISTS guard_hidden, guard_ok CASCADE;
CREATE TABLE guard_hidden (id serial PRIMARY KEY, note text);
CREATE TABLE guard_ok (id int);
CREATE OR REPLACE FUNCTION hidden_write() RETURNS int LANGUAGE sql VOLATILE
  AS 'INSERT INTO guard_hidden (note) VALUES (''written'') RETURNING 1';
CREATE OR REPLACE VIEW guard_view AS SELECT hidden_write() AS x;
"""
READ_ONLY = "25006"  # read_only_sql_transaction


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    kt = make_keyturn(tmp_path_factory.mktemp("guard"), pg, extra=GUARDED,
                      shop_policy="guarded", unknown_functions="read")
    kt.start()
    yield kt
    kt.stop()


direct = direct_shop


@pytest.fixture()
def tables(pg: LocalPostgres) -> Iterator[None]:
    with direct(pg) as c:
        c.execute(SETUP)
    yield
    with direct(pg) as c:
        hidden = c.execute("SELECT count(*) FROM guard_hidden").fetchone()
        assert hidden == (0,), "a hidden write reached the target's data"


def ok_rows(pg: LocalPostgres) -> int:
    with direct(pg) as c:
        row = c.execute("SELECT count(*) FROM guard_ok").fetchone()
        return int(row[0]) if row else 0


def psql(kt: Keyturn, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["psql", kt.dsn("alice"), "-X", "-At", "-v", "ON_ERROR_STOP=1",
                           "-c", sql], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- hidden writes fail

@pytest.mark.parametrize("sql", [
    "SELECT hidden_write()",
    "SELECT * FROM guard_view",
    "SELECT 1; SELECT hidden_write(); SELECT 2",
    "WITH x AS (SELECT hidden_write()) SELECT * FROM x",
    "BEGIN; SELECT hidden_write(); COMMIT",
    "BEGIN READ WRITE; SELECT 1; SELECT hidden_write(); COMMIT",
    # the server applies the last mode given: a read-write transaction like any other
    "BEGIN READ ONLY, READ WRITE; SELECT hidden_write(); COMMIT",
    "START TRANSACTION READ ONLY READ WRITE; SELECT * FROM guard_view; COMMIT",
    # a SELECT of set_config() is a session statement, and may call anything beside it
    "BEGIN; SELECT set_config('application_name', 'x', false), hidden_write(); COMMIT",
    "BEGIN; SELECT 1; SAVEPOINT s; SELECT set_config('application_name', 'x', false), "
    "hidden_write(); COMMIT",
    "INSERT INTO guard_ok VALUES (1); "
    "SELECT set_config('application_name', 'x', false), hidden_write()",
    # a holdable cursor's query runs again at COMMIT, after every savepoint ended
    "BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT hidden_write(); COMMIT",
    "BEGIN; INSERT INTO guard_ok VALUES (1); "
    "DECLARE c CURSOR WITH HOLD FOR SELECT hidden_write(); COMMIT",
])
def test_a_hidden_write_judged_a_read_fails_on_the_target(kt: Keyturn, tables: None,
                                                          sql: str) -> None:
    res = psql(kt, sql)
    assert res.returncode != 0 and "read-only transaction" in res.stderr, res.stderr


@pytest.mark.parametrize("sql, refusal", [
    # (A table after user code in the same message cannot be resolved: that code may
    # change search_path before it runs. Refused before anything runs.)
    ("SELECT hidden_write(); INSERT INTO guard_ok VALUES (1)", "cannot be resolved"),
    ("INSERT INTO guard_ok VALUES (1); SELECT hidden_write()", "read-only transaction"),
    ("SELECT 1; INSERT INTO guard_ok VALUES (1); SELECT * FROM guard_view; SELECT 2",
     "read-only transaction"),
])
def test_a_hidden_write_next_to_an_allowed_write_in_one_message_fails(
        kt: Keyturn, tables: None, pg: LocalPostgres, sql: str, refusal: str) -> None:
    """A Query outside a transaction is one implicit transaction: the allowed write gets
    write access, the reads around it still run read-only, and the whole Query is undone
    as the implicit transaction would be."""
    res = psql(kt, sql)
    assert res.returncode != 0 and refusal in res.stderr, res.stderr
    assert ok_rows(pg) == 0
    with RawConn(kt.dsn("alice")) as r:
        answers = r.run(Q(sql))
        assert [e["C"] for e in errors(answers)] == \
            [READ_ONLY if refusal == "read-only transaction" else "42501"]
        assert answers[-1] == (b"Z", b"I")  # idle, as after a failed implicit transaction
        assert not errors(r.run(Q("SELECT 1")))


def test_reads_and_an_allowed_write_in_one_message_commit_together(
        kt: Keyturn, tables: None, pg: LocalPostgres) -> None:
    res = psql(kt, "SELECT count(*) FROM guard_ok; INSERT INTO guard_ok VALUES (1); "
                   "SELECT count(*) FROM guard_ok")
    assert res.returncode == 0 and res.stdout.split() == ["0", "INSERT", "0", "1", "1"], \
        res.stderr
    assert ok_rows(pg) == 1
    with RawConn(kt.dsn("alice")) as r:
        # An error after the write undoes it, like the implicit transaction would.
        answers = r.run(Q("SELECT 1; INSERT INTO guard_ok VALUES (2); SELECT 1/0"))
        assert [e["C"] for e in errors(answers)] == ["22012"]
        assert answers[-1] == (b"Z", b"I")
        answers = r.run(Q("INSERT INTO guard_ok VALUES (3); SELECT count(*) FROM guard_ok"))
        assert not errors(answers) and tags(answers) == ["INSERT 0 1", "SELECT 1"]
        assert answers[-1] == (b"Z", b"I")
    assert ok_rows(pg) == 2
    res = psql(kt, "SELECT 1; INSERT INTO guard_ok VALUES (4); COMMIT")
    assert res.returncode != 0 and "separate queries" in res.stderr, res.stderr
    assert ok_rows(pg) == 2


def test_hidden_writes_fail_inside_transactions_that_write(kt: Keyturn, tables: None,
                                                           pg: LocalPostgres) -> None:
    with psycopg.connect(kt.dsn("alice")) as c:  # psycopg's default: transactions
        c.execute("INSERT INTO guard_ok VALUES (1)")
        assert c.execute("SELECT count(*) FROM guard_ok").fetchone() == (1,)
        c.execute("INSERT INTO guard_ok VALUES (2)")  # a write after a read
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            c.execute("SELECT hidden_write()")
        c.rollback()
        c.execute("INSERT INTO guard_ok VALUES (3)")
        c.execute("SELECT 1")
        c.commit()
    assert ok_rows(pg) == 1


@pytest.mark.parametrize("autocommit", [True, False])
def test_extended_protocol_with_parameters(kt: Keyturn, tables: None, pg: LocalPostgres,
                                           autocommit: bool) -> None:
    with psycopg.connect(kt.dsn("alice"), autocommit=autocommit) as c:
        c.execute("INSERT INTO guard_ok VALUES (%s)", (1,))
        assert c.execute("SELECT count(*) FROM guard_ok WHERE id = %s", (1,)).fetchone() \
            == (1,)
        c.execute("INSERT INTO guard_ok VALUES (%s)", (2,))
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            c.execute("SELECT hidden_write() WHERE %s = 1", (1,))
        if not autocommit:
            c.rollback()
            c.execute("INSERT INTO guard_ok VALUES (%s)", (1,))
            c.execute("INSERT INTO guard_ok VALUES (%s)", (2,))
            c.commit()
    assert ok_rows(pg) == 2


def test_a_pipeline_mixing_an_allowed_write_and_a_hidden_one(
        kt: Keyturn, tables: None, pg: LocalPostgres) -> None:
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            with c.pipeline():
                c.execute("INSERT INTO guard_ok VALUES (%s)", (1,))
                c.execute("SELECT hidden_write() + %s", (0,))
        with c.pipeline():
            c.execute("INSERT INTO guard_ok VALUES (%s)", (2,))
            cur = c.execute("SELECT count(*) FROM guard_ok WHERE id >= %s", (0,))
        assert cur.fetchone() == (1,)
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert ok_rows(pg) == 1


def test_prepared_statements_and_pipelines(kt: Keyturn, tables: None,
                                           pg: LocalPostgres) -> None:
    with psycopg.connect(kt.dsn("alice"), autocommit=True, prepare_threshold=0) as c:
        for i in range(3):
            c.execute("INSERT INTO guard_ok VALUES (%s)", (i,))
            c.execute("SELECT count(*) FROM guard_ok WHERE id >= %s", (0,)).fetchone()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            c.execute("SELECT hidden_write() + %s", (0,))
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        with c.pipeline():  # a write and reads in one batch (one implicit transaction)
            c.execute("INSERT INTO guard_ok VALUES (%s)", (10,))
            c.execute("SELECT count(*) FROM guard_ok WHERE id = %s", (10,))
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), c.pipeline():
            c.execute("SELECT count(*) FROM guard_ok WHERE id = %s", (10,))
            c.execute("SELECT hidden_write() + %s", (0,))
    with psycopg.connect(kt.dsn("alice")) as c:  # in a transaction: read by read
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), c.pipeline():
            c.execute("INSERT INTO guard_ok VALUES (%s)", (11,))
            c.execute("SELECT count(*) FROM guard_ok WHERE id = %s", (11,))
            c.execute("SELECT hidden_write() + %s", (0,))
    assert ok_rows(pg) == 4


def test_asyncpg_prepares_then_binds(kt: Keyturn, tables: None, pg: LocalPostgres) -> None:
    import asyncio

    import asyncpg

    async def main() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=kt.gateway_port, user="alice",
                                     password=kt.tokens["alice"], database="shop", ssl=False)
        try:
            await conn.execute("INSERT INTO guard_ok VALUES ($1)", 1)
            assert await conn.fetchval("SELECT count(*) FROM guard_ok WHERE id = $1", 1) == 1
            async with conn.transaction():
                await conn.execute("INSERT INTO guard_ok VALUES ($1)", 2)
                await conn.fetchval("SELECT count(*) FROM guard_ok")
                await conn.execute("INSERT INTO guard_ok VALUES ($1)", 3)
            with pytest.raises(asyncpg.exceptions.ReadOnlySQLTransactionError):
                await conn.fetchval("SELECT hidden_write() + $1", 0)
        finally:
            await conn.close()

    asyncio.run(main())
    assert ok_rows(pg) == 3


def test_the_guards_own_statements_say_nothing_to_the_client(kt: Keyturn, tables: None) -> None:
    """A lone write in the extended protocol gets write access with SET LOCAL outside a
    transaction block, which the server answers with a WARNING (25P01): the client sent
    no such statement and must not see it."""
    with RawConn(kt.dsn("alice")) as r:
        answers = r.run(P("", "INSERT INTO guard_ok VALUES (1)"), B("", ""), E(), S())
        assert not errors(answers) and tags(answers) == ["INSERT 0 1"]
        assert [t for t, _ in answers] == [b"1", b"2", b"C", b"Z"], answers


def test_raw_batches_of_reads_and_writes(kt: Keyturn, tables: None, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice")) as r:
        # A write and a read in one batch: the write writes, the read reads...
        answers = r.run(P("", "INSERT INTO guard_ok VALUES (1)"), B("", ""), E(),
                        P("", "SELECT count(*) FROM guard_ok"), B("", ""), E(), S())
        assert not errors(answers) and tags(answers) == ["INSERT 0 1", "SELECT 1"]
        assert answers[-1] == (b"Z", b"I")
        # ...a read that hides a write fails, before or after the write, and the batch
        # is undone as its implicit transaction would be.
        for first, second in (("INSERT INTO guard_ok VALUES (9)", "SELECT hidden_write()"),
                              ("SELECT * FROM guard_view", "INSERT INTO guard_ok VALUES (9)")):
            answers = r.run(P("", first), B("", ""), E(), P("", second), B("", ""), E(), S())
            assert [e["C"] for e in errors(answers)] == [READ_ONLY]
            assert answers[-1] == (b"Z", b"I")
        # The same batch split over two sends (its Sync not seen with the write).
        r.send(P("", "INSERT INTO guard_ok VALUES (9)"), B("", ""), E())
        time.sleep(0.2)
        answers = r.run(P("", "SELECT hidden_write()"), B("", ""), E(), S())
        assert [e["C"] for e in errors(answers)] == [READ_ONLY]
        assert answers[-1] == (b"Z", b"I")
        # ...a batch of reads may not write either.
        answers = r.run(P("", "SELECT hidden_write()"), B("", ""), E(), S())
        assert [e["C"] for e in errors(answers)] == [READ_ONLY]
        # The client's BEGIN after a write: one transaction of the client's, as PostgreSQL
        # makes of an implicit one.
        answers = r.run(P("", "INSERT INTO guard_ok VALUES (2)"), B("", ""), E(),
                        P("", "SELECT 1"), B("", ""), E(),
                        P("", "BEGIN"), B("", ""), E(),
                        P("", "INSERT INTO guard_ok VALUES (3)"), B("", ""), E(), S())
        assert not errors(answers) and answers[-1] == (b"Z", b"T")
        assert not errors(r.run(Q("ROLLBACK")))
        assert ok_rows(pg) == 1
        # BEGIN in the batch: the transaction is read-write, its reads read-only.
        answers = r.run(P("", "BEGIN"), B("", ""), E(),
                        P("", "INSERT INTO guard_ok VALUES (2)"), B("", ""), E(),
                        P("", "SELECT hidden_write()"), B("", ""), E(), S())
        assert [e["C"] for e in errors(answers)] == [READ_ONLY]
        assert not errors(r.run(Q("ROLLBACK")))
    assert ok_rows(pg) == 1


# ---------------------------------------------------------------- writes keep working

def test_savepoints_around_writes_after_reads(kt: Keyturn, tables: None,
                                              pg: LocalPostgres) -> None:
    script = """
BEGIN;
SELECT count(*) FROM guard_ok;
SAVEPOINT s1;
INSERT INTO guard_ok VALUES (1);
RELEASE SAVEPOINT s1;
SELECT count(*) FROM guard_ok;
SAVEPOINT s2;
INSERT INTO guard_ok VALUES (2);
SELECT count(*) FROM guard_ok;
ROLLBACK TO SAVEPOINT s2;
SELECT count(*) FROM guard_ok;
INSERT INTO guard_ok VALUES (3);
COMMIT;
"""
    res = subprocess.run(["psql", kt.dsn("alice"), "-X", "-At", "-v", "ON_ERROR_STOP=1"],
                         input=script, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["BEGIN", "0", "SAVEPOINT", "INSERT", "0", "1", "RELEASE",
                                  "1", "SAVEPOINT", "INSERT", "0", "1", "2", "ROLLBACK", "1",
                                  "INSERT", "0", "1", "COMMIT"]
    assert ok_rows(pg) == 2


def test_commands_that_cannot_run_in_a_transaction(kt: Keyturn, tables: None) -> None:
    res = psql(kt, "VACUUM guard_ok")
    assert res.returncode == 0 and "VACUUM" in res.stdout, res.stderr
    # ...and the session is read-only again right after.
    res = psql(kt, "SELECT hidden_write()")
    assert res.returncode != 0 and "read-only transaction" in res.stderr


def test_copy_from_stdin_of_an_allowed_write(kt: Keyturn, tables: None,
                                             pg: LocalPostgres) -> None:
    res = subprocess.run(["psql", kt.dsn("alice"), "-X", "-At", "-c",
                          "COPY guard_ok FROM STDIN"], input="1\n2\n3\n", capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "COPY 3" in res.stdout, res.stderr
    assert ok_rows(pg) == 3


def test_error_positions_point_into_the_clients_text(kt: Keyturn, tables: None) -> None:
    with psycopg.connect(kt.dsn("alice")) as c:
        c.execute("SELECT 1")  # in a transaction: reads are sent after the guard's own
        sql = "SELECT id FROM guard_ok WHERE nosuchcolumn = 1"
        with pytest.raises(psycopg.errors.UndefinedColumn) as err:
            c.execute(sql)
        assert err.value.diag.statement_position == str(sql.index("nosuchcolumn") + 1)


# ---------------------------------------------------------------- the guard is the gateway's

SMUGGLED = ("SELECT 'a\\', ' ; COMMIT; BEGIN READ WRITE; "
            "INSERT INTO guard_hidden (note) VALUES ($x$smuggled$x$); COMMIT; -- '")


def test_nothing_pipelined_behind_user_code_runs_with_a_changed_setting(
        kt: Keyturn, tables: None) -> None:
    """User code turns backslash escapes on while the client already sent its next
    message, which the analyser reads as one string but the target would now read as
    statements: that message waits until the first completed, and the session ends."""
    with RawConn(kt.dsn("alice")) as r:
        assert not errors(r.run(Q("SET client_min_messages = error")))
        r.send(Q("SELECT escapes_on()"), Q(SMUGGLED))
        answers = r.until_closed()
    assert any("reads query text differently" in e["M"] for e in errors(answers)), answers
    # (the tables fixture checks that guard_hidden is still empty)



@pytest.mark.parametrize("function", ["escapes_on", "latin1"])
def test_a_hidden_change_of_how_text_is_read_ends_the_session(
        kt: Keyturn, tables: None, function: str) -> None:
    """A function judged a read turns backslash escapes on (or changes the encoding):
    the target would now read the next message differently from the analyser, which
    could hide a write inside what looks like a string. The session ends at once."""
    with RawConn(kt.dsn("alice")) as r:
        r.send(Q(f"SELECT {function}()"))
        answers = r.until_closed()
        fatal = [e for e in errors(answers) if "reads query text differently" in e["M"]]
        assert fatal and fatal[0]["S"] == "FATAL", answers



def test_the_client_sees_a_writable_server(kt: Keyturn) -> None:
    dsn = kt.dsn("alice") + " target_session_attrs=read-write"
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.pgconn.parameter_status(b"default_transaction_read_only") == b"off"


@pytest.mark.parametrize("sql", [
    "SET default_transaction_read_only = off",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "BEGIN; SET TRANSACTION READ WRITE; SELECT hidden_write(); COMMIT",
    "BEGIN; SAVEPOINT keyturn_ro; RELEASE SAVEPOINT keyturn_ro; COMMIT",
    "RESET default_transaction_read_only",
    "DEALLOCATE keyturn_ro",
])
def test_the_client_cannot_turn_the_guard_off(kt: Keyturn, tables: None, sql: str) -> None:
    res = psql(kt, sql)
    assert res.returncode != 0 and "keyturn" in res.stderr, res.stderr


def test_the_guards_own_names_are_refused(kt: Keyturn, tables: None) -> None:
    with RawConn(kt.dsn("alice")) as r:
        answers = r.run(P("keyturn_savepoint", "SELECT hidden_write()"), S())
        assert errors(answers)[0]["C"] == "42501"
        assert not errors(r.run(P("x", "SELECT 1"), S()))
        answers = r.run(B("keyturn_portal", "x"), E("keyturn_portal"), S())
        assert errors(answers)[0]["C"] == "42501"


def test_clients_asking_for_a_primary_are_told_it_accepts_writes(kt: Keyturn) -> None:
    # pgjdbc's targetServerType=primary asks SHOW transaction_read_only (extended protocol).
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        for sql in ("SHOW transaction_read_only", "show default_transaction_read_only;"):
            assert c.execute(sql).fetchone() == ("off",)
            assert c.execute(sql, prepare=True).fetchone() == ("off",)
    assert psql(kt, "SHOW transaction_read_only").stdout.strip() == "off"


def test_a_query_inside_a_batch_with_write_access_runs_guarded(
        kt: Keyturn, tables: None, pg: LocalPostgres) -> None:
    """A simple Query sent inside an unfinished extended batch runs in the batch's
    transaction on the server: a batch whose only bound statement is an allowed write
    must not lend its write access to what the Query runs."""
    with RawConn(kt.dsn("alice")) as r:
        answers = r.run(P("", "INSERT INTO guard_ok VALUES (5)"), B("", ""), E(),
                        Q("SELECT hidden_write()"), S())
        assert READ_ONLY in [e["C"] for e in errors(answers)]
        assert not errors(r.run(Q("SELECT 1")))


def test_a_transaction_chained_after_a_read_is_read_write(kt: Keyturn, tables: None,
                                                          pg: LocalPostgres) -> None:
    # COMMIT AND CHAIN starts a transaction with the mode in force when it runs: sent
    # inside the guard's read-only savepoint it would make the chained transaction
    # read-only, and the allowed write after it would fail where PostgreSQL runs it.
    before = ok_rows(pg)
    res = psql(kt, "BEGIN; SELECT 1; COMMIT AND CHAIN; INSERT INTO guard_ok VALUES (7); "
                   "COMMIT")
    assert res.returncode == 0, res.stderr
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        for sql in ("BEGIN", "SELECT 1", "ROLLBACK AND CHAIN",
                    "INSERT INTO guard_ok VALUES (8)", "COMMIT"):
            c.execute(sql)
    assert ok_rows(pg) == before + 2
    # ... and one chained after a WITH HOLD cursor is read-only, hidden writes included.
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        c.execute("BEGIN")
        c.execute("DECLARE h CURSOR WITH HOLD FOR SELECT 1")
        c.execute("COMMIT AND CHAIN")
        with pytest.raises(psycopg.Error) as exc:
            c.execute("SELECT hidden_write()")
        assert exc.value.sqlstate == READ_ONLY
