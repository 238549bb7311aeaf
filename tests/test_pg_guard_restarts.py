"""Transactions that start in the middle of a message, and verdicts the memo must not share.

The read-only guard keeps every implicit transaction read-only through the session
default (``default_transaction_read_only = on``); the server reports a change of it only
at the end of a message. A function the policy lets run as a read may turn the default off
and back on inside one message: a transaction that *starts* in between (after a COMMIT in
the same simple Query or extended batch) would be read-write. These tests drive that
through the live gateway against a real PostgreSQL, with the configuration the guard is
the backstop for (``unknown_functions: read``), and check the target: nothing written.

They also hold the numeric-shape memo to numbers that are constants (an EXPLAIN option's
value decides whether the statement runs) and the scanner that decides whether an
unreadable message may change its transaction.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import orjson
import psycopg
import pytest

from keyturn.analysis.postgres import (
    MAX_STATEMENTS,
    Analyzer,
    fast_shape,
    may_change_transaction,
)
from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import B, E, P, Q, RawConn, S, errors

POLICIES = """
  reads_only:
    default: block
    rules:
      - name: no-vault
        match: {tables: ["restart_vault.*"]}
        action: block
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
  reads_and_unknown:
    default: block
    rules:
      - name: reads
        match: {class: [read, transaction, session, unknown]}
        action: allow
"""

SCHEMA = """
DROP TABLE IF EXISTS restart_victims;
CREATE TABLE restart_victims (id int);
CREATE OR REPLACE FUNCTION public.run_sql(q text) RETURNS text LANGUAGE plpgsql
  AS $$BEGIN EXECUTE q; RETURN 'ok'; END$$;
-- A function named like a built-in, in a schema no search_path names.
CREATE SCHEMA IF NOT EXISTS restart_util;
CREATE OR REPLACE FUNCTION restart_util.upper(q text) RETURNS text LANGUAGE plpgsql
  AS $$BEGIN EXECUTE q; RETURN 'ok'; END$$;
CREATE SCHEMA IF NOT EXISTS restart_vault;
CREATE TABLE IF NOT EXISTS restart_vault.secrets (s text);
INSERT INTO restart_vault.secrets VALUES ('top secret');
-- Same argument types as built-ins, yet reachable: VARIADIC expanded, a named argument.
CREATE OR REPLACE FUNCTION public.cardinality(VARIADIC a anyarray) RETURNS int
  LANGUAGE plpgsql AS $$BEGIN DELETE FROM restart_victims; RETURN 0; END$$;
CREATE OR REPLACE FUNCTION public.initcap(q text) RETURNS text
  LANGUAGE plpgsql AS $$BEGIN DELETE FROM restart_victims; RETURN q; END$$;
-- An operator of a session's own that an extension's SQL function would call.
CREATE EXTENSION IF NOT EXISTS citext;
CREATE SCHEMA IF NOT EXISTS restart_evil;
CREATE OR REPLACE FUNCTION restart_evil.cat(a text, b text) RETURNS text
  LANGUAGE plpgsql AS $$BEGIN DELETE FROM restart_victims; RETURN a; END$$;
CREATE OPERATOR restart_evil.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = restart_evil.cat);
"""

OFF = "SELECT run_sql('SET default_transaction_read_only = off')"
ON = "SELECT run_sql('SET default_transaction_read_only = on')"
DELETE = "SELECT run_sql('DELETE FROM restart_victims')"


#: A database of its own: restart_util.upper would change how other modules' statements
#: are judged once they ran user code.
DB = "restarts"


def direct(pg: LocalPostgres) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD), autocommit=True)


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("restarts"), DB, schema=SCHEMA,
                            policies=POLICIES, connections={
                                "ro": "policy: reads_only",
                                "fnread": "policy: reads_only\nunknown_functions: read",
                                "fnunknown": "policy: reads_and_unknown\n"
                                             "unknown_functions: read"})
    k.start()
    yield k
    k.stop()


def victims(pg: LocalPostgres) -> int:
    with direct(pg) as c:
        c.execute("SET default_transaction_read_only = off")
        return c.execute("SELECT count(*) FROM restart_victims").fetchone()[0]


@pytest.fixture()
def ten(pg: LocalPostgres) -> None:
    with direct(pg) as c:
        c.execute("TRUNCATE restart_victims; "
                  "INSERT INTO restart_victims SELECT generate_series(1, 10)")


@pytest.mark.parametrize("message", [
    f"{OFF}; COMMIT; {DELETE}; COMMIT; {ON}",
    f"{OFF}; COMMIT; {DELETE}; {ON}",
    f"BEGIN; {OFF}; COMMIT; {DELETE}; COMMIT; {ON}",
    f"BEGIN READ ONLY; {OFF}; END; {DELETE}; END; {ON}",
    f"{OFF}; ROLLBACK; {DELETE}; COMMIT; {ON}",
])
def test_a_transaction_started_mid_query_is_read_only(kt: Keyturn, pg: LocalPostgres,
                                                      ten: None, message: str) -> None:
    with psycopg.connect(kt.dsn("alice", dbname="fnread"), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as err:
            c.execute(message)
        # The target refused the write (read-only transaction), or, the default being
        # off at the message's end, the gateway ended the session (its guard was lost).
        assert err.value.sqlstate in ("25006", "XX000"), err.value
    assert victims(pg) == 10


def test_a_query_with_commits_between_reads_still_runs(kt: Keyturn) -> None:
    with psycopg.connect(kt.dsn("alice", dbname="ro"), autocommit=True) as c:
        cur = c.execute("SELECT 1; COMMIT; SELECT 2; COMMIT; SELECT 3 AS last")
        rows = [cur.fetchall()]
        while cur.nextset():
            rows.append(cur.fetchall() if cur.description else None)
        assert rows == [[(1,)], None, [(2,)], None, [(3,)]]
        assert c.execute("SELECT 'still here'").fetchone() == ("still here",)


def test_a_transaction_started_mid_batch_is_read_only(kt: Keyturn, pg: LocalPostgres,
                                                      ten: None) -> None:
    for statements in ([OFF, "COMMIT", DELETE, "COMMIT", ON],
                       ["BEGIN", OFF, "COMMIT", DELETE, ON]):
        with RawConn(kt.dsn("alice", dbname="fnread")) as r:
            answers = r.run(b"".join(P("", s) + B("", "") + E("") for s in statements) + S())
        assert victims(pg) == 10, (statements, errors(answers))


@pytest.mark.parametrize("later", [
    [DELETE],
    ["SELECT 1", DELETE],
    [DELETE, ON],
])
def test_a_batch_pipelined_behind_one_that_turned_the_default_off_is_read_only(
        kt: Keyturn, pg: LocalPostgres, ten: None, later: list[str]) -> None:
    """The server reports a changed default only with the ReadyForQuery of the batch
    that changed it: batches the client pipelined behind it were sent before that, and
    each starts a transaction with the default as the code left it."""
    with RawConn(kt.dsn("alice", dbname="fnread")) as r:
        r.send(P("", OFF) + B("", "") + E("") + S()
               + b"".join(P("", s) + B("", "") + E("") + S() for s in later))
        answers = r.until_closed()
    assert victims(pg) == 10, errors(answers)


def test_nothing_is_in_flight_when_the_guard_is_found_lost(kt: Keyturn) -> None:
    """The Sync of a batch that ran user code holds the client's next messages until its
    ReadyForQuery, which reports the default the code turned off: the session ends with
    nothing else sent, so no statement is left with an unknown outcome."""
    marker = "SELECT 'pipelined behind the change' AS m"
    with RawConn(kt.dsn("alice", dbname="fnread")) as r:
        r.send(P("", OFF) + B("", "") + E("") + S() + P("", marker) + B("", "") + E("") + S())
        answers = r.until_closed()
    assert any("lost its read-only guard" in e.get("M", "") for e in errors(answers))
    out = kt.cli("audit", "export", "--format", "jsonl").stdout
    records = [r for r in map(orjson.loads, out.splitlines()) if r.get("kind") == "statement"]
    assert any(r["statement"] == OFF and r["outcome"] == "ok" for r in records)
    assert not [r for r in records if r["statement"] == marker], "sent after the change"


def test_an_unreadable_message_that_commits_midway_is_refused(kt: Keyturn, pg: LocalPostgres,
                                                              ten: None) -> None:
    many = "SELECT 1;" * (MAX_STATEMENTS + 1)  # more statements than are analysed
    with psycopg.connect(kt.dsn("alice", dbname="fnunknown"), autocommit=True) as c:
        with pytest.raises(psycopg.Error, match="may end its transaction"):
            c.execute(f"{OFF}; {many} COMMIT; {DELETE}; {ON}")
        # Unreadable but without a transaction change: runs (read-only).
        assert c.execute(many + "SELECT 2").fetchone() == (1,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            c.execute(many + DELETE)
    assert victims(pg) == 10


@pytest.mark.parametrize("sql, changes", [
    ("SELECT 1; COMMIT; SELECT 2", True),
    ("SELECT 1; /* a /* nested */ comment */ END; SELECT 2", True),
    ("SELECT 1; -- c\n ROLLBACK", True),
    ("DO $$ BEGIN COMMIT; END $$", True),
    ("CALL p()", True),
    ("COMMIT", False),
    ("SELECT $$; COMMIT; $$; SELECT 1", False),
    ("SELECT 'a; commit'; SELECT CASE WHEN true THEN 1 END", False),
    ("SELECT 1;" + " " * (70 * 1024), True),  # too long to scan on the event loop
])
def test_which_unreadable_messages_may_change_their_transaction(sql: str, changes: bool) -> None:
    assert may_change_transaction(sql) is changes


def test_the_number_memo_never_shares_numbers_that_are_not_constants() -> None:
    a = Analyzer()
    for sql, shared in [("EXPLAIN (ANALYZE 0) SELECT pg_advisory_lock(1)", False),
                        ("EXPLAIN (ANALYZE 0, COSTS 1) SELECT 1", False),
                        ("FETCH 5 FROM c", False),
                        ("SELECT v FROM t WHERE id = 5 LIMIT 3", True),
                        ("EXPLAIN SELECT v FROM t WHERE id = 5", True)]:
        a.analyze(sql)
        assert a.known_shape(fast_shape(sql)) is shared, sql


def test_explain_analyze_is_judged_by_its_option_value(kt: Keyturn, pg: LocalPostgres) -> None:
    with psycopg.connect(kt.dsn("alice", dbname="ro"), autocommit=True) as c:
        c.execute("EXPLAIN (ANALYZE 0) SELECT pg_advisory_lock(4215)")
        c.execute("EXPLAIN (ANALYZE 0) SELECT pg_advisory_lock(4215)")  # memoised now
        with pytest.raises(psycopg.Error, match="blocked"):
            c.execute("EXPLAIN (ANALYZE 1) SELECT pg_advisory_lock(4215)")
        time.sleep(0.1)
        with direct(pg) as d:
            assert d.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                             "AND objid = 4215").fetchone()[0] == 0


def test_an_unreadable_do_sent_as_a_parse_is_refused(kt: Keyturn, pg: LocalPostgres,
                                                     ten: None) -> None:
    """A DO may COMMIT and go on in a new transaction; too large to analyse, it is
    UNKNOWN, which this policy allows: refused all the same (the extended protocol's one
    statement cannot be planned around)."""
    body = ("DO $$BEGIN SET default_transaction_read_only = off; COMMIT; "
            "DELETE FROM restart_victims; COMMIT; SET default_transaction_read_only = on; "
            "END$$ -- " + "x" * (300 * 1024))
    with RawConn(kt.dsn("alice", dbname="fnunknown")) as r:
        answers = r.run(P("", body) + B("", "") + E("") + S(), syncs=1)
    assert [e["C"] for e in errors(answers)] == ["25000"], errors(answers)
    assert "may end its transaction" in errors(answers)[0]["M"]
    assert victims(pg) == 10


def test_user_code_that_moves_search_path_makes_names_resolve_anywhere(
        kt: Keyturn, pg: LocalPostgres, ten: None) -> None:
    """The server does not report search_path: after a function moved it, ``upper`` is
    restart_util.upper (user code), so each statement calling it waits for the one
    before, and the default turned off ends the session before the DELETE is sent."""
    with RawConn(kt.dsn("alice", dbname="fnread")) as r:
        r.run(Q("SELECT run_sql('SET search_path = restart_util, pg_catalog, public')"))
        r.send(Q("SELECT upper('SET default_transaction_read_only = off')"),
               Q("SELECT upper('DELETE FROM restart_victims')"),
               Q("SELECT upper('SET default_transaction_read_only = on')"))
        answers = r.until_closed()
    assert any(e["M"].startswith("keyturn: the session lost its read-only guard")
               for e in errors(answers)), answers
    assert victims(pg) == 10


@pytest.mark.parametrize("message", [
    "SELECT cardinality('x'::text, 'y'::text)",  # VARIADIC, expanded: not the built-in's
    "SELECT initcap(q => 'x')",  # the built-in has no argument names
    # citext's regexp_match is SQL: its || is the session's own operator here
    "SET search_path = restart_evil, pg_catalog, public; "
    "SELECT regexp_match('a'::citext, 'a'::citext, 'x')",
])
def test_user_code_that_looks_built_in_is_user_code(kt: Keyturn, pg: LocalPostgres,
                                                    ten: None, message: str) -> None:
    with psycopg.connect(kt.dsn("alice", dbname="ro"), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="user-defined"):
            c.execute(message)
    assert victims(pg) == 10

