"""Messages the target ignores while it skips to the Sync after an error, and portal
names the client's SQL cursors and user code share with protocol portals (attack run
22). Each test asserts the safe behaviour.

After an error in the extended protocol the server ignores everything up to the next
Sync, a simple Query too, which then gets no answer: the gateway does not send it and
expects nothing for it (queued, it would take the Sync's ReadyForQuery and put every
later answer on the request before it), and never ends the skip early with a Sync of its
own. A protocol portal's binding is forgotten once user code ran or a SQL DECLARE or CLOSE
was sent: an Execute of the name is then refused until it is bound again."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from proxies.postgres import codec
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import (
    FLUSH,
    B,
    E,
    P,
    Q,
    RawConn,
    S,
    drain,
    errors,
    in_step,
    masked_policy,
    read_until,
    vault_policy,
    vault_schema,
)
from tests.pg_raw import leaked as secret_leaked

POLICIES = (vault_policy("a22", ["a22_vault"]) + vault_policy("a22w", ["a22_vault"], """\
      - name: w
        match: {class: [write], tables: ["public.open_data", "public.inbox"]}
        action: allow
""") + masked_policy("a22m", ["a22_vault"], ["public.inbox"]))

SCHEMA = vault_schema("a22_vault") + """
CREATE TABLE public.inbox (v text);
CREATE TABLE a22_vault.victim (v text);
INSERT INTO a22_vault.victim VALUES ('keep me');
CREATE TABLE public.people (id int PRIMARY KEY, email text, nick text);
CREATE FUNCTION public.sp_vault() RETURNS text LANGUAGE plpgsql AS
  $$BEGIN PERFORM set_config('search_path', 'a22_vault, public', false); RETURN 'ok'; END$$;
INSERT INTO public.people VALUES (1, 'realperson1@example.org', 'zorblax1'),
                                 (2, 'realperson2@example.org', 'zorblax2');
"""

MASKED_COLUMNS = """
columns:
  public.people.email: [pii.email]
  public.people.nick: [pii.name]
"""


def leaked(answers: list[tuple[bytes, bytes]]) -> bool:
    return secret_leaked(answers) or any(
        t == b"D" and (b"realperson" in body or b"zorblax" in body) for t, body in answers)


def direct(pg: LocalPostgres, sql: str) -> list[tuple]:
    with psycopg.connect(pg.dsn("atk22", user="app", password=APP_PASSWORD),
                         autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description else []


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a22"), "atk22", schema=SCHEMA,
                            policies=POLICIES, connections={
                                "a22read": "policy: a22\nunknown_functions: read",
                                "a22plain": "policy: a22",
                                "a22w": "policy: a22w",
                                "a22m": "policy: a22m" + MASKED_COLUMNS})
    k.start()
    yield k
    k.stop()










def fail_and_wait(r: RawConn) -> list[tuple[bytes, bytes]]:
    """An extended batch whose Execute fails, flushed but without its Sync: the target
    now ignores every message up to the next Sync (a Query included)."""
    r.send(P("", "SELECT 1/0"), B("", ""), E(""), FLUSH)
    return read_until(r, b"E")


def test_query_while_target_skips_to_sync_masked(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a22m")) as r:
        fail_and_wait(r)
        r.send(Q("SELECT 'ignored'::text"), S())
        a = drain(r, 1.5)
        r.send(Q(""))
        a += drain(r, 1.0)
        r.send(Q("SELECT nick FROM people WHERE id = 1"))
        b = drain(r, 1.5)
        assert not leaked(b), (a, b)


def shift_by_one(r: RawConn) -> list[tuple[bytes, bytes]]:
    """A Query sent while the target skips to Sync: the target ignores it, the Sync's
    ReadyForQuery answers; then an empty Query."""
    a = fail_and_wait(r)
    r.send(Q("SELECT 'ignored'::text"), S())
    a += drain(r, 1.0)
    r.send(Q(""))
    a += drain(r, 1.0)
    return a


def test_query_while_skipping_cannot_swap_a_sql_prepared_statement(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a22plain")) as r:
        a = r.run(P("s", "SELECT s FROM a22_vault.secrets"), S())
        shift_by_one(r)
        r.send(Q("SELECT 1/0; DEALLOCATE s; PREPARE s AS SELECT 'decoy'::text"))
        a += drain(r, 1.0)
        r.send(Q("SELECT 1; SELECT 2; SELECT 3"))
        a += drain(r, 1.0)
        r.send(Q("EXECUTE s"))
        b = drain(r, 1.5)
        assert not leaked(b), (a, b)


def test_query_while_skipping_cannot_swap_an_allowed_write(kt: Keyturn,
                                                          pg: LocalPostgres) -> None:
    direct(pg, "CREATE TABLE IF NOT EXISTS a22_vault.victim2 (v text); "
               "INSERT INTO a22_vault.victim2 VALUES ('keep me')")
    with RawConn(kt.dsn("alice", dbname="a22w")) as r:
        a = r.run(P("w", "DELETE FROM a22_vault.victim2"), S())
        shift_by_one(r)
        r.send(Q("SELECT 1/0; DEALLOCATE w; PREPARE w AS INSERT INTO inbox VALUES ('decoy')"))
        a += drain(r, 1.0)
        r.send(Q("SELECT 1; SELECT 2; SELECT 3"))
        a += drain(r, 1.0)
        r.send(Q("EXECUTE w"))
        a += drain(r, 1.5)
    assert direct(pg, "SELECT count(*) FROM a22_vault.victim2") == [(1,)], a


def test_control_masked_column_is_masked(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a22m")) as r:
        a = r.run(Q("SELECT nick FROM people WHERE id = 1"))
        assert not leaked(a) and any(t == b"D" for t, _ in a), a


def test_control_user_code_search_path_is_read_back(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a22read")) as r:
        a = r.run(Q("BEGIN"), Q("SELECT sp_vault()"), Q("SELECT s FROM secrets"),
                  Q("ROLLBACK"))
        assert not leaked(a), a


def test_hidden_sync_after_a_failed_parse_keeps_user_code_tracked(kt: Keyturn) -> None:
    """A Parse that fails, then (no Sync) a Query the guard plans: the gateway's hidden
    Sync ends the target's skipping, but the session must not go on believing the target
    skips (it then forwards user code without waiting for it or reading search_path
    back)."""
    with RawConn(kt.dsn("alice", dbname="a22read")) as r:
        r.send(P("", "SELEC bad"), FLUSH)
        a = read_until(r, b"E")
        r.send(Q("BEGIN"))
        assert drain(r, 1.0) == [], "ignored until the Sync, as the server ignores it"
        a += r.run(S())
        a += r.run(Q("BEGIN"), Q("SELECT sp_vault()"), Q("SELECT s FROM secrets"),
                   Q("ROLLBACK"))
        assert not leaked(a), a
        in_step(r)


def test_nothing_of_a_batch_runs_after_its_error_before_its_sync(kt: Keyturn,
                                                                 pg: LocalPostgres) -> None:
    """After an error the server skips everything up to the client's Sync. The gateway
    must not end that early with a Sync of its own (the one that gives a batch write
    access): the write after the error must not run."""
    with RawConn(kt.dsn("alice", dbname="a22w")) as r:
        r.send(P("", "SELEC bad"), FLUSH)
        a = read_until(r, b"E")
        a += r.run(P("", "INSERT INTO inbox VALUES ('a22-after-error')"), B("", ""), E(""),
                   S())
        assert not any(t == b"C" for t, _ in a), a
        in_step(r)
    assert direct(pg, "SELECT count(*) FROM inbox WHERE v = 'a22-after-error'") == [(0,)]


def victim_intact(pg: LocalPostgres, table: str = "a22_vault.victim") -> bool:
    return direct(pg, f"SELECT count(*) FROM {table}") == [(1,)]


def test_hidden_sync_after_a_failed_parse_keeps_the_guard_statements(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """The same stale belief: user code run then is not seen as user code, so the
    gateway's own prepared statements are not prepared again after it; a function that
    redefines keyturn_ro turns the read-only savepoint off for the next read."""
    direct(pg, "CREATE TABLE IF NOT EXISTS a22_vault.victim3 (v text); "
               "TRUNCATE a22_vault.victim3; INSERT INTO a22_vault.victim3 VALUES ('keep me')")
    with RawConn(kt.dsn("alice", dbname="a22read")) as r:
        a = r.run(Q("BEGIN"))
        a += r.run(P("", "SELECT 1"), B("", ""), E(""), S())   # prepares keyturn_ro
        a += r.run(Q("COMMIT"))
        r.send(P("", "SELEC bad"), FLUSH)
        a += read_until(r, b"E")
        r.send(Q("BEGIN"))
        assert drain(r, 1.0) == [], "ignored until the Sync, as the server ignores it"
        a += r.run(S())
        a += r.run(Q("BEGIN"))
        a += r.run(Q("SELECT rb_run('DEALLOCATE keyturn_ro'), "
                     "rb_run('PREPARE keyturn_ro AS SELECT 1')"))
        a += r.run(Q("SAVEPOINT x"))  # the read-only savepoint is released before it
        a += r.run(P("", "SELECT rb_run('DELETE FROM a22_vault.victim3')"), B("", ""), E(""),
                   S())
        a += r.run(Q("COMMIT"))
    assert victim_intact(pg, "a22_vault.victim3"), a


def test_sql_cursor_named_like_a_stale_portal_is_masked(kt: Keyturn) -> None:
    """A protocol portal 'c' bound to a decoy (gone when its transaction ended), then a
    SQL cursor 'c' over a masked column: a protocol Execute of 'c' runs the cursor, and
    must be masked as the cursor, not planned as the decoy."""
    with RawConn(kt.dsn("alice", dbname="a22m")) as r:
        a = r.run(P("dc", "SELECT 'decoy'::text AS nick"), B("c", "dc"), S())
        a += r.run(Q("BEGIN"), Q("DECLARE c CURSOR FOR SELECT nick FROM people"))
        b = r.run(E("c"), S())
        b += r.run(Q("ROLLBACK"))
        assert not leaked(b), (a, b)


def test_control_sql_cursor_fetch_is_masked(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a22m")) as r:
        a = r.run(Q("BEGIN"), Q("DECLARE c CURSOR FOR SELECT nick FROM people"),
                  Q("FETCH ALL FROM c"), Q("ROLLBACK"))
        assert not leaked(a) and any(t == b"D" for t, _ in a), a


def test_protocol_execute_of_a_sql_cursor_running_user_code_is_tracked(kt: Keyturn) -> None:
    """A stale protocol portal 'c' (a decoy read) and a SQL cursor 'c' whose query runs
    user code that moves search_path: the Execute of 'c' runs that code, so what follows
    must be judged with search_path read back."""
    with RawConn(kt.dsn("alice", dbname="a22read")) as r:
        a = r.run(P("dc", "SELECT 'decoy'::text"), B("c", "dc"), S())
        a += r.run(Q("BEGIN"), Q("DECLARE c CURSOR FOR SELECT sp_vault()"))
        a += r.run(E("c"), S())
        a += r.run(Q("SELECT s FROM secrets"))
        a += r.run(Q("ROLLBACK"))
        assert not leaked(a), a


def test_control_fetch_of_a_cursor_running_user_code_is_tracked(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a22read")) as r:
        a = r.run(Q("BEGIN"), Q("DECLARE c CURSOR FOR SELECT sp_vault()"),
                  Q("FETCH ALL FROM c"), Q("SELECT s FROM secrets"), Q("ROLLBACK"))
        assert not leaked(a), a


def test_protocol_execute_of_sql_cursors_cannot_turn_the_guard_off(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """Stale protocol portals 'c' and 'd' (decoy reads) and SQL cursors of those names:
    'c' redefines the gateway's keyturn_ro statement, 'd' writes the vault. Judged as the
    decoys, neither counts as user code: the read-only savepoint must still hold."""
    direct(pg, "CREATE TABLE IF NOT EXISTS a22_vault.victim4 (v text); "
               "TRUNCATE a22_vault.victim4; INSERT INTO a22_vault.victim4 VALUES ('keep me')")
    with RawConn(kt.dsn("alice", dbname="a22read")) as r:
        a = r.run(P("dc", "SELECT 'decoy'::text"), B("c", "dc"), B("d", "dc"), S())
        a += r.run(Q("BEGIN"),
                   Q("DECLARE c CURSOR FOR SELECT rb_run('DEALLOCATE keyturn_ro'), "
                     "rb_run('PREPARE keyturn_ro AS SELECT 1')"),
                   Q("DECLARE d CURSOR FOR SELECT rb_run('DELETE FROM a22_vault.victim4')"))
        a += r.run(Q("SAVEPOINT x"))
        a += r.run(B("", "dc"), E(""), S())  # the gateway prepares keyturn_ro
        a += r.run(E("c"), S())
        a += r.run(Q("SAVEPOINT y"))
        a += r.run(E("d"), S())
        a += r.run(Q("COMMIT"))
    assert victim_intact(pg, "a22_vault.victim4"), a


@pytest.fixture(scope="module")
def kt_audit(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a22a"), "atk22a", schema=SCHEMA,
                            policies=POLICIES, connections={"a22plain": "policy: a22"})
    k.start()
    yield k
    k.stop()


def test_query_while_skipping_is_audited_with_its_own_outcome(kt_audit: Keyturn) -> None:
    """After the target ignored a Query sent while it skipped to Sync, each statement's
    record must carry its own outcome: a failing Query is not recorded as having run
    another's statements."""
    with RawConn(kt_audit.dsn("alice", dbname="a22plain")) as r:
        shift_by_one(r)
        r.send(Q("SELECT 1/0 AS a22_failing"))
        drain(r, 1.0)
        r.send(Q("SELECT 1 AS a22_ok1; SELECT 2 AS a22_ok2"))
        drain(r, 1.0)
        r.send(Q("SELECT 3 AS a22_last"))
        drain(r, 1.0)
    kt_audit.stop()
    out = kt_audit.cli("audit", "export", "--format", "jsonl").stdout
    recs = [json.loads(line) for line in out.splitlines() if line.strip()]
    by = {rec.get("statement"): rec for rec in recs if rec.get("kind") == "statement"}
    failing = by["SELECT 1/0 AS a22_failing"]
    ok = by["SELECT 1 AS a22_ok1; SELECT 2 AS a22_ok2"]
    assert failing.get("outcome") == "error" and ok.get("outcome") == "ok", (failing, ok)


def test_row_limited_executes_of_a_masked_portal_stay_masked(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a22m")) as r:
        a = r.run(Q("BEGIN"))
        a += r.run(P("", "SELECT nick FROM people ORDER BY id"), B("pm", ""), E("pm", 1),
                   E("pm", 1), codec.encode_describe("P", "pm"), E("pm", 0), S())
        a += r.run(Q("ROLLBACK"))
        assert not leaked(a) and not errors(a), a
        in_step(r)


def test_notifications_between_answers_keep_the_session_in_step(kt: Keyturn,
                                                                pg: LocalPostgres) -> None:
    """NotificationResponse from another session arriving mid-answer is forwarded and
    attributed to nothing."""
    with RawConn(kt.dsn("alice", dbname="a22plain")) as r:
        r.run(Q("LISTEN a22ch"))
        for i in range(3):
            direct(pg, f"NOTIFY a22ch, 'payload{i}'")
        a = r.run(P("", "SELECT pg_sleep(0.2), 'x'::text"), B("", ""), E(""), S(),
                  Q("SELECT 'y'::text"))
        a += drain(r, 0.5)
        assert not errors(a), a
        in_step(r)
