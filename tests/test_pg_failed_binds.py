"""Binds the target refuses or skips, races between an extended-protocol error and the
messages sent behind it, and a batch whose commit fails at its Sync (attack run 23).
Each test asserts the safe behaviour.

A Bind of a name that already holds a portal or cursor fails on the server (42P03), and
one skipped after an error never ran: either way the name still holds what it held
before, so the gateway forgets the binding it recorded when it sent the Bind (unless a
later Bind replaced it), and an Execute of the name is refused until a Bind of it
completes. A batch whose implicit transaction fails to commit at its Sync gets a record
of that failure after its statements' records."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import (
    B,
    E,
    P,
    Q,
    RawConn,
    S,
    drain,
    in_step,
    masked_policy,
    vault_policy,
    vault_schema,
)
from tests.pg_raw import leaked as secret_leaked

POLICIES = (vault_policy("a23", ["a23_vault"]) + vault_policy("a23w", ["a23_vault"], """\
      - name: w
        match: {class: [write], tables: ["public.open_data", "public.inbox", "public.dchild"]}
        action: allow
""") + masked_policy("a23m", ["a23_vault"], ["public.inbox"]))

SCHEMA = vault_schema("a23_vault") + """
CREATE TABLE public.inbox (v text);
CREATE TABLE a23_vault.victim (v text);
INSERT INTO a23_vault.victim VALUES ('keep me');
CREATE TABLE public.people (id int PRIMARY KEY, email text, nick text);
CREATE FUNCTION public.sp_vault() RETURNS text LANGUAGE plpgsql AS
  $$BEGIN PERFORM set_config('search_path', 'a23_vault, public', false); RETURN 'ok'; END$$;
CREATE FUNCTION public.nick_cur() RETURNS refcursor LANGUAGE plpgsql AS
  $$DECLARE c refcursor; BEGIN OPEN c FOR SELECT nick FROM public.people; RETURN c; END$$;
CREATE FUNCTION public.nick_cur2() RETURNS refcursor LANGUAGE plpgsql AS
  $$DECLARE c refcursor; BEGIN OPEN c FOR SELECT upper(nick) AS nick FROM public.people;
  RETURN c; END$$;
CREATE TABLE public.dparent (id int PRIMARY KEY);
CREATE TABLE public.dchild (pid int REFERENCES public.dparent DEFERRABLE INITIALLY DEFERRED,
                            tag text);
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
        t == b"D" and (b"realperson" in body.lower() or b"zorblax" in body.lower())
        for t, body in answers)


def direct(pg: LocalPostgres, sql: str) -> list[tuple]:
    with psycopg.connect(pg.dsn("atk23", user="app", password=APP_PASSWORD),
                         autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description else []


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a23"), "atk23", schema=SCHEMA,
                            policies=POLICIES, connections={
                                "a23read": "policy: a23\nunknown_functions: read",
                                "a23plain": "policy: a23",
                                "a23w": "policy: a23w",
                                "a23wr": "policy: a23w\nunknown_functions: read",
                                "a23m": "policy: a23m" + MASKED_COLUMNS})
    k.start()
    yield k
    k.stop()


def test_control_masked_column_is_masked(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a23m")) as r:
        a = r.run(Q("SELECT nick FROM people WHERE id = 1"))
        assert not leaked(a) and any(t == b"D" for t, _ in a), a


def test_control_cursor_over_a_computed_masked_column_is_masked(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a23m")) as r:
        a = r.run(Q("BEGIN"), Q("DECLARE c CURSOR FOR SELECT upper(nick) AS nick FROM people"),
                  Q("FETCH ALL FROM c"), Q("ROLLBACK"))
        assert not leaked(a) and any(t == b"D" for t, _ in a), a


@pytest.mark.parametrize("column", ["nick", "upper(nick) AS nick"], ids=["plain", "computed"])
@pytest.mark.parametrize("where", ["hold", "savepoint"])
def test_failed_bind_over_a_cursor_name_is_not_taken_as_bound(kt: Keyturn, column: str,
                                                              where: str) -> None:
    """A cursor 'c' over a masked column (a WITH HOLD one outlives its transaction; a
    plain one inside a savepoint, where the failed Bind aborts the savepoint only); a
    Bind of a decoy to 'c' fails on the target (the name is taken) and must not make the
    gateway believe 'c' holds the decoy: the Execute of 'c' runs the cursor. A computed
    column carries no column origin in its RowDescription, so only the cursor's lineage
    could mask it."""
    with RawConn(kt.dsn("alice", dbname="a23m")) as r:
        if where == "hold":
            a = r.run(Q("BEGIN"),
                      Q(f"DECLARE c CURSOR WITH HOLD FOR SELECT {column} FROM people"),
                      Q("COMMIT"))
        else:
            a = r.run(Q("BEGIN"), Q(f"DECLARE c CURSOR FOR SELECT {column} FROM people"),
                      Q("SAVEPOINT s"))
        a += r.run(P("dc", "SELECT 'decoy'::text AS nick"), B("c", "dc"), S())
        if where == "savepoint":
            a += r.run(Q("ROLLBACK TO SAVEPOINT s"))
        b = r.run(E("c"), S())
        r.run(Q("CLOSE c" if where == "hold" else "ROLLBACK"))
        assert not leaked(b), (a, b)


def test_failed_bind_over_a_refcursor_portal_name(kt: Keyturn) -> None:
    """A function opens '<unnamed portal N>' over a masked column; a Bind of a decoy to
    that name fails on the target and the Execute runs the function's cursor."""
    with RawConn(kt.dsn("alice", dbname="a23m")) as r:
        a = r.run(Q("BEGIN"), Q("SAVEPOINT s0"))
        a += r.run(Q("SELECT nick_cur()"))
        names = [body for t, body in a if t == b"D"]
        name = "<unnamed portal 1>"
        for body in names:
            if b"<unnamed portal" in body:
                name = body[body.index(b"<"):].decode()
        a += r.run(Q("SAVEPOINT s"))
        a += r.run(P("dc", "SELECT 'decoy'::text AS nick"), B(name, "dc"), S())
        a += r.run(Q("ROLLBACK TO SAVEPOINT s"))
        b = r.run(E(name), S())
        r.run(Q("ROLLBACK"))
        assert not leaked(b), (a, b)


def test_failed_bind_over_a_cursor_running_user_code_is_tracked(kt: Keyturn) -> None:
    """A SQL cursor 'c' whose query moves search_path to the vault, a failed Bind of a
    decoy to 'c', then its Execute: what follows must be judged with search_path read
    back."""
    with RawConn(kt.dsn("alice", dbname="a23read")) as r:
        a = r.run(Q("BEGIN"), Q("DECLARE c CURSOR FOR SELECT sp_vault()"), Q("SAVEPOINT s"))
        a += r.run(P("dc", "SELECT 'decoy'::text"), B("c", "dc"), S())
        a += r.run(Q("ROLLBACK TO SAVEPOINT s"))
        a += r.run(E("c"), S())
        a += r.run(Q("SELECT s FROM secrets"))
        a += r.run(Q("ROLLBACK"))
        assert not leaked(a), a


def victim_intact(pg: LocalPostgres, table: str) -> bool:
    return direct(pg, f"SELECT count(*) FROM {table}") == [(1,)]


def fresh_victim(pg: LocalPostgres, table: str) -> None:
    direct(pg, f"CREATE TABLE IF NOT EXISTS {table} (v text); TRUNCATE {table}; "
               f"INSERT INTO {table} VALUES ('keep me')")


def test_control_cursor_running_a_write_is_kept_read_only(kt: Keyturn,
                                                          pg: LocalPostgres) -> None:
    fresh_victim(pg, "a23_vault.victim_c")
    with RawConn(kt.dsn("alice", dbname="a23wr")) as r:
        a = r.run(Q("BEGIN"), Q("INSERT INTO inbox VALUES ('a23-ctl')"),
                  Q("DECLARE c CURSOR FOR SELECT rb_run('DELETE FROM a23_vault.victim_c')"),
                  Q("FETCH ALL FROM c"), Q("COMMIT"))
    assert victim_intact(pg, "a23_vault.victim_c"), a


def test_failed_bind_of_an_allowed_write_over_a_cursor_name(kt: Keyturn,
                                                            pg: LocalPostgres) -> None:
    """A SQL cursor 'c' whose query deletes from the vault through user code; a Bind of
    an allowed write (INSERT INTO inbox) to 'c' fails on the target (the name is taken),
    the savepoint is rolled back, then 'c' is executed: the gateway must not give the
    cursor the write access of the decoy."""
    fresh_victim(pg, "a23_vault.victim5")
    with RawConn(kt.dsn("alice", dbname="a23wr")) as r:
        a = r.run(Q("BEGIN"),
                  Q("DECLARE c CURSOR FOR SELECT rb_run('DELETE FROM a23_vault.victim5')"),
                  Q("SAVEPOINT s"))
        a += r.run(P("w", "INSERT INTO inbox VALUES ('a23-decoy')"), B("c", "w"), S())
        a += r.run(Q("ROLLBACK TO SAVEPOINT s"))
        a += r.run(E("c"), S())
        a += r.run(Q("COMMIT"))
    assert victim_intact(pg, "a23_vault.victim5"), a


def test_hold_cursor_running_a_write_at_commit_is_kept_read_only(kt: Keyturn,
                                                                 pg: LocalPostgres) -> None:
    """A WITH HOLD cursor's query runs to its end at COMMIT, in a transaction an allowed
    write made read-write: the user code in it must not get that write access."""
    fresh_victim(pg, "a23_vault.victim6")
    with RawConn(kt.dsn("alice", dbname="a23wr")) as r:
        a = r.run(Q("BEGIN"), Q("INSERT INTO inbox VALUES ('a23-hold')"),
                  Q("DECLARE c CURSOR WITH HOLD FOR "
                    "SELECT rb_run('DELETE FROM a23_vault.victim6')"),
                  Q("COMMIT"))
        a += r.run(Q("CLOSE c"))
    assert victim_intact(pg, "a23_vault.victim6"), a


def test_hold_cursor_running_a_write_at_protocol_commit(kt: Keyturn,
                                                        pg: LocalPostgres) -> None:
    fresh_victim(pg, "a23_vault.victim7")
    with RawConn(kt.dsn("alice", dbname="a23wr")) as r:
        a = r.run(Q("BEGIN"), Q("INSERT INTO inbox VALUES ('a23-hold')"),
                  Q("DECLARE c CURSOR WITH HOLD FOR "
                    "SELECT rb_run('DELETE FROM a23_vault.victim7')"))
        a += r.run(P("", "COMMIT"), B("", ""), E(""), S())
        a += r.run(Q("CLOSE c"))
    assert victim_intact(pg, "a23_vault.victim7"), a


def test_failed_bind_over_a_refcursor_of_a_computed_column(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a23m")) as r:
        a = r.run(Q("BEGIN"), Q("SELECT nick_cur2()"))
        name = "<unnamed portal 1>"
        for t, body in a:
            if t == b"D" and b"<unnamed portal" in body:
                name = body[body.index(b"<"):].decode()
        a += r.run(Q("SAVEPOINT s"))
        a += r.run(P("dc", "SELECT 'decoy'::text AS nick"), B(name, "dc"), S())
        a += r.run(Q("ROLLBACK TO SAVEPOINT s"))
        b = r.run(E(name), S())
        r.run(Q("ROLLBACK"))
        assert not leaked(b), (a, b)


@pytest.fixture(scope="module")
def kt_audit(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a23a"), "atk23a", schema=SCHEMA,
                            policies=POLICIES, connections={
                                "a23w": "policy: a23w",
                                "a23wr": "policy: a23w\nunknown_functions: read"})
    k.start()
    yield k
    k.stop()


def direct_a(pg: LocalPostgres, sql: str) -> list[tuple]:
    with psycopg.connect(pg.dsn("atk23a", user="app", password=APP_PASSWORD),
                         autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description else []


def audit_records(k: Keyturn) -> list[dict]:
    k.stop()
    out = k.cli("audit", "export", "--format", "jsonl").stdout
    k.start()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_audit_of_a_race_between_an_error_and_a_query(kt_audit: Keyturn,
                                                      pg: LocalPostgres) -> None:
    """A Parse that fails and a write Query behind it in one packet (no Flush, no Sync):
    the target ignores the Query. Whatever the gateway does, the audit must match what
    ran: recorded ok only if the row is there."""
    with RawConn(kt_audit.dsn("alice", dbname="a23w")) as r:
        r.send(P("", "SELEC bad"), Q("INSERT INTO inbox VALUES ('a23-race1')"), S())
        a = drain(r, 1.5)
        in_step(r)
        r.send(P("", "SELECT 1/0"), B("", ""), E(""),
               Q("INSERT INTO inbox VALUES ('a23-race2')"), S())
        a += drain(r, 1.5)
        in_step(r)
    recs = [x for x in audit_records(kt_audit) if x.get("kind") == "statement"]
    for tag in ("a23-race1", "a23-race2"):
        rec = [x for x in recs if tag in (x.get("statement") or "")]
        there = direct_a(pg, f"SELECT count(*) FROM inbox WHERE v = '{tag}'")[0][0]
        assert rec, (tag, a)
        assert (rec[-1].get("outcome") == "ok") == bool(there), (tag, rec, there, a)


def test_deferred_constraint_failing_at_sync_is_recorded(kt_audit: Keyturn,
                                                         pg: LocalPostgres) -> None:
    """An INSERT whose deferred foreign key fails when the batch's Sync commits: the row
    is not there, so the trail must say that its transaction failed to commit (the
    INSERT itself ran: its record says so, and the failed commit follows it)."""
    with RawConn(kt_audit.dsn("alice", dbname="a23w")) as r:
        a = r.run(P("", "INSERT INTO dchild VALUES (99, 'a23-deferred')"), B("", ""), E(""),
                  S())
        in_step(r)
    assert direct_a(pg, "SELECT count(*) FROM dchild WHERE tag = 'a23-deferred'") == [(0,)]
    records = [x for x in audit_records(kt_audit) if x.get("kind") == "statement"]
    at = [i for i, x in enumerate(records) if "a23-deferred" in (x.get("statement") or "")]
    assert at, (records, a)
    commit = records[at[-1] + 1]
    assert commit["rule"] == "builtin:implicit-commit" and commit["outcome"] == "error"
    assert "23503" in commit["reason"] and "rolled back" in commit["reason"]


def test_failed_rebind_of_a_protocol_portal_keeps_its_first_binding(kt: Keyturn) -> None:
    """Protocol portal 'p' bound to a masked (computed) column in a transaction; a second
    Bind of a decoy to 'p' fails (the portal exists); after ROLLBACK TO SAVEPOINT the
    Execute of 'p' runs its first binding and must be masked as that."""
    with RawConn(kt.dsn("alice", dbname="a23m")) as r:
        a = r.run(Q("BEGIN"))
        a += r.run(P("m", "SELECT upper(nick) AS nick FROM people"), B("p", "m"), S())
        a += r.run(Q("SAVEPOINT s"))
        a += r.run(P("dc", "SELECT 'decoy'::text AS nick"), B("p", "dc"), S())
        a += r.run(Q("ROLLBACK TO SAVEPOINT s"))
        b = r.run(E("p"), S())
        r.run(Q("ROLLBACK"))
        assert not leaked(b), (a, b)


def test_failed_rebind_cannot_lend_a_decoy_writes_access(kt: Keyturn,
                                                         pg: LocalPostgres) -> None:
    """Protocol portal 'p' bound to user code that deletes from the vault (a read to the
    policy: unknown_functions read); a second Bind of an allowed write to 'p' fails; the
    Execute of 'p' runs the user code and must not get the decoy's write access."""
    fresh_victim(pg, "a23_vault.victim8")
    with RawConn(kt.dsn("alice", dbname="a23wr")) as r:
        a = r.run(Q("BEGIN"))
        a += r.run(P("m", "SELECT rb_run('DELETE FROM a23_vault.victim8')"), B("p", "m"), S())
        a += r.run(Q("SAVEPOINT s"))
        a += r.run(P("w", "INSERT INTO inbox VALUES ('a23-decoy')"), B("p", "w"), S())
        a += r.run(Q("ROLLBACK TO SAVEPOINT s"))
        a += r.run(E("p"), S())
        a += r.run(Q("COMMIT"))
    assert victim_intact(pg, "a23_vault.victim8"), a


def test_failed_rebind_in_implicit_batch_cannot_lend_write_access(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """The same without a transaction block: the failing Bind ends the batch, so 'p' is
    gone; the Execute must be refused, not run."""
    fresh_victim(pg, "a23_vault.victim9")
    with RawConn(kt.dsn("alice", dbname="a23wr")) as r:
        a = r.run(P("m", "SELECT rb_run('DELETE FROM a23_vault.victim9')"),
                  P("w", "INSERT INTO inbox VALUES ('a23-decoy')"), B("p", "m"), B("p", "w"),
                  E("p"), S())
        a += r.run(E("p"), S())
        in_step(r)
    assert victim_intact(pg, "a23_vault.victim9"), a


def test_control_protocol_portal_running_a_write_is_kept_read_only(
        kt: Keyturn, pg: LocalPostgres) -> None:
    fresh_victim(pg, "a23_vault.victim10")
    with RawConn(kt.dsn("alice", dbname="a23wr")) as r:
        a = r.run(Q("BEGIN"), Q("INSERT INTO inbox VALUES ('a23-ctl2')"))
        a += r.run(P("m", "SELECT rb_run('DELETE FROM a23_vault.victim10')"), B("p", "m"), S())
        a += r.run(Q("SAVEPOINT s"))
        a += r.run(E("p"), S())
        a += r.run(Q("COMMIT"))
    assert victim_intact(pg, "a23_vault.victim10"), a


def test_failed_rebind_write_is_audited_as_what_ran(kt_audit: Keyturn,
                                                    pg: LocalPostgres) -> None:
    """The Execute of 'p' after the failed rebind runs the vault DELETE: its record must
    not name the decoy INSERT."""
    direct_a(pg, "CREATE TABLE IF NOT EXISTS a23_vault.victim11 (v text); "
                 "TRUNCATE a23_vault.victim11; INSERT INTO a23_vault.victim11 VALUES ('k')")
    with RawConn(kt_audit.dsn("alice", dbname="a23wr")) as r:
        a = r.run(Q("BEGIN"))
        a += r.run(P("m", "SELECT rb_run('DELETE FROM a23_vault.victim11')"), B("p", "m"),
                   S())
        a += r.run(Q("SAVEPOINT s"))
        a += r.run(P("w", "INSERT INTO inbox VALUES ('a23-decoy11')"), B("p", "w"), S())
        a += r.run(Q("ROLLBACK TO SAVEPOINT s"))
        a += r.run(E("p"), S())
        a += r.run(Q("COMMIT"))
    gone = direct_a(pg, "SELECT count(*) FROM a23_vault.victim11") == [(0,)]
    recs = [x for x in audit_records(kt_audit) if x.get("kind") == "statement"
            and "a23-decoy11" in (x.get("statement") or "")
            and x.get("outcome") == "ok"]
    assert not (gone and recs), (recs, a)
