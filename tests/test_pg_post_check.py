"""The check after an approved statement ran (proxies/postgres/holding.py _post_check).

An approved statement that waits behind another transaction (a row lock on its own row)
runs what that transaction commits meanwhile: a helper its trigger calls, replaced after
the approval's re-check. The gateway ends the approved statement's transaction with a
wait for a lock of its own, reads the target's code again once the statement ran, and
rolls it back when the code differs from what the approvers were shown. Driven with
psycopg (extended protocol with parameters, in and outside a client transaction) and raw
simple Queries; the concurrent transaction runs directly on the target. Any change of
stored code counts, as in the re-check before release.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import (
    B,
    E,
    P,
    Q,
    RawConn,
    S,
    errors,
    read_until,
    tags,
    vault_policy,
    vault_schema,
)

DB = "postcheck"
V = "pc_vault"

POLICIES = vault_policy("pc", [V], """\
      - name: w
        match: {class: [write], tables: ["public.*"]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
      - name: d
        match: {class: [ddl]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
""")

SCHEMA = vault_schema(V) + f"""
CREATE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS $$BEGIN PERFORM 1; END$$;
CREATE FUNCTION public.t_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM helper(); RETURN NEW; END$$;
CREATE TABLE public.box (id int PRIMARY KEY, v text);
INSERT INTO public.box SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE TRIGGER t BEFORE UPDATE ON public.box FOR EACH ROW EXECUTE FUNCTION public.t_fn();
CREATE TABLE public.plain (id int PRIMARY KEY, v text);
INSERT INTO public.plain SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE FUNCTION public.early_fn() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE k int8;
BEGIN
  SELECT (l.classid::int8 << 32) | l.objid::int8 INTO k FROM pg_locks l
    JOIN pg_stat_activity a ON a.pid = l.pid
   WHERE a.application_name = 'keyturn-postcheck' AND l.locktype = 'advisory'
     AND l.granted LIMIT 1;
  IF k IS NOT NULL THEN
    PERFORM pg_advisory_lock(k);
    IF TG_ARGV[0] = 'release' THEN PERFORM pg_advisory_unlock(k); END IF;
  END IF;
  FOR i IN 1..100 LOOP
    EXIT WHEN EXISTS (SELECT FROM public.plain WHERE id = 20 AND v = 'go');
    PERFORM pg_sleep(0.1);
  END LOOP;
  EXECUTE 'SELECT public.helper()';
  RETURN NEW;
END$$;
CREATE TABLE public.early (id int PRIMARY KEY, v text);
INSERT INTO public.early VALUES (1, 'a');
CREATE TRIGGER t BEFORE UPDATE ON public.early FOR EACH ROW
  EXECUTE FUNCTION public.early_fn('release');
CREATE TABLE public.early2 (id int PRIMARY KEY, v text);
INSERT INTO public.early2 VALUES (1, 'a');
CREATE TRIGGER t BEFORE UPDATE ON public.early2 FOR EACH ROW
  EXECUTE FUNCTION public.early_fn('keep');
CREATE FUNCTION public.d_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM helper(); RETURN NULL; END$$;
CREATE TABLE public.dbox (id int PRIMARY KEY, v text);
INSERT INTO public.dbox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE CONSTRAINT TRIGGER dt AFTER UPDATE ON public.dbox DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION public.d_fn();
CREATE TABLE {V}.victim (v text);
INSERT INTO {V}.victim VALUES ('keep me');
"""

EVIL = ("CREATE OR REPLACE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS "
        f"$$BEGIN DELETE FROM {V}.victim; END$$")
GOOD = ("CREATE OR REPLACE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM 1; END$$")


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("pc"), DB, schema=SCHEMA,
                            policies=POLICIES, connections={"pc": "policy: pc"})
    k.start()
    yield k
    k.stop()


def direct(pg: LocalPostgres, sql: str) -> list[tuple]:
    with psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD),
                         autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description else []


def _reset(pg: LocalPostgres, kt: Keyturn) -> None:
    direct(pg, GOOD)
    direct(pg, f"DELETE FROM {V}.victim; INSERT INTO {V}.victim VALUES ('keep me')")
    direct(pg, "UPDATE public.box SET v = 'a'")
    direct(pg, "UPDATE public.plain SET v = 'a'")
    direct(pg, "UPDATE public.early SET v = 'a'; UPDATE public.early2 SET v = 'a'")
    direct(pg, "UPDATE public.dbox SET v = 'a'")
    direct(pg, "DROP FUNCTION IF EXISTS public.unrelated()")
    kt.skip_pending()


def _ticket(kt: Keyturn, tid: int, final: set[str], timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        t = requests.get(f"{kt.url}/api/v1/tickets/{tid}", timeout=5, headers={
            "Authorization": f"Bearer {kt.tokens['bob']}"}).json()
        if t["status"] in final or time.monotonic() > deadline:
            return t
        time.sleep(0.2)


def _own_connections(pg: LocalPostgres) -> list[tuple]:
    return direct(pg, "SELECT pid FROM pg_stat_activity "
                      "WHERE application_name = 'keyturn-postcheck'")


class Client(threading.Thread):
    """A psycopg client sending a parameterised statement (extended protocol), held."""

    def __init__(self, kt: Keyturn, sql: str, params: tuple, *, in_tx: bool) -> None:
        super().__init__(daemon=True)
        self.dsn, self.sql, self.params, self.in_tx = kt.dsn("alice", dbname="pc"), sql, \
            params, in_tx
        self.error: psycopg.Error | None = None
        self.rowcount: int | None = None
        self.after: str | None = None

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=not self.in_tx) as c:
            try:
                self.rowcount = c.execute(self.sql, self.params).rowcount
                c.commit()
            except psycopg.Error as exc:
                self.error = exc
                c.rollback()
            # the session goes on serving
            self.after = str(c.execute("SELECT v FROM public.plain WHERE id = 20").fetchone())


#: Any change of stored code counts (code reaches code the catalog does not link).
UNRELATED = "CREATE FUNCTION public.unrelated() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$"


def _race(kt: Keyturn, pg: LocalPostgres, client: Client, row: int, *, change: bool) -> int:
    """Hold the client's UPDATE of ``row`` of public.plain, lock that row in another
    transaction, approve, then (``change``) create a function and commit while the
    UPDATE waits. (A parameterised statement that runs user code is refused before it
    is sent, never held: the extended protocol's held statements run none when held.)"""
    client.start()
    try:
        ticket = kt.wait_ticket()
    except TimeoutError:
        client.join(5)
        raise AssertionError(f"not held: {client.error!r}") from None
    with psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD)) as other:
        other.execute("SELECT id FROM public.plain WHERE id = %s FOR UPDATE", (row,))
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        time.sleep(3)  # the re-check passed; the approved UPDATE waits for the row lock
        assert client.is_alive()
        if change:
            other.execute(UNRELATED)
        other.commit()
    client.join(30)
    assert not client.is_alive()
    return int(ticket["id"])


@pytest.mark.parametrize("in_tx", [False, True], ids=["autocommit", "transaction"])
def test_extended_update_is_rolled_back_when_code_changed_while_it_waited(
        kt: Keyturn, pg: LocalPostgres, in_tx: bool) -> None:
    _reset(pg, kt)
    row = 1 + int(in_tx)
    client = Client(kt, "UPDATE public.plain SET v = %s WHERE id = %s", ("b", row),
                    in_tx=in_tx)
    tid = _race(kt, pg, client, row, change=True)
    assert client.error is not None, client.rowcount
    assert client.error.sqlstate == "55000", client.error
    assert "rolled back" in str(client.error)
    assert "changed" in str(client.error)
    assert direct(pg, f"SELECT v FROM public.plain WHERE id = {row}") == [("a",)]
    assert client.after == "('a',)"
    t = _ticket(kt, tid, {"failed"})
    assert t["status"] == "failed", t
    time.sleep(0.5)
    assert _own_connections(pg) == []


def test_simple_query_update_is_rolled_back_when_a_helper_changed_while_it_waited(
        kt: Keyturn, pg: LocalPostgres) -> None:
    _reset(pg, kt)
    with RawConn(kt.dsn("alice", dbname="pc")) as r:
        r.send(Q("UPDATE public.box SET v = 'q' WHERE id = 2"))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        with psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD)) as other:
            other.execute("SELECT id FROM public.box WHERE id = 2 FOR UPDATE")
            kt.cli("approve", str(ticket["id"]), token_of="bob")
            time.sleep(3)
            other.execute(EVIL)
            other.commit()
        a = r.until_ready()
        assert [e["C"] for e in errors(a)] == ["55000"], a
        after = r.run(Q("SELECT v FROM public.box WHERE id = 2"))
    assert (b"D", b"\x00\x01\x00\x00\x00\x01a") in after, after
    assert direct(pg, f"SELECT count(*) FROM {V}.victim") == [(1,)]
    assert _ticket(kt, int(ticket["id"]), {"failed"})["status"] == "failed"


@pytest.mark.parametrize("in_tx", [False, True], ids=["autocommit", "transaction"])
def test_an_approved_update_that_waited_for_nothing_new_commits(
        kt: Keyturn, pg: LocalPostgres, in_tx: bool) -> None:
    """The other transaction only held the row: the same code ran, the UPDATE commits."""
    _reset(pg, kt)
    row = 3 + int(in_tx)
    client = Client(kt, "UPDATE public.plain SET v = %s WHERE id = %s", ("ok", row),
                    in_tx=in_tx)
    tid = _race(kt, pg, client, row, change=False)
    assert client.error is None, client.error
    assert client.rowcount == 1
    assert direct(pg, f"SELECT v FROM public.plain WHERE id = {row}") == [("ok",)]
    assert _ticket(kt, tid, {"executed"})["status"] == "executed"
    time.sleep(0.5)
    assert _own_connections(pg) == []


def test_an_approved_statement_that_changes_code_itself_runs(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """Its own change is not another transaction's: the check reads committed code only,
    so approved DDL that replaces a function is not rolled back by its own change."""
    _reset(pg, kt)
    with RawConn(kt.dsn("alice", dbname="pc")) as r:
        r.send(Q("CREATE OR REPLACE FUNCTION public.helper3() RETURNS int LANGUAGE sql "
                 "AS $$ SELECT 3 $$"))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    assert not errors(a), a
    assert "CREATE FUNCTION" in tags(a)
    assert direct(pg, "SELECT public.helper3()") == [(3,)]
    direct(pg, "DROP FUNCTION public.helper3()")


def test_an_approved_statement_that_fails_ends_the_check_and_the_session_goes_on(
        kt: Keyturn, pg: LocalPostgres) -> None:
    _reset(pg, kt)
    client = Client(kt, "UPDATE public.plain SET id = %s WHERE id = %s", (6, 5), in_tx=False)
    client.start()
    ticket = kt.wait_ticket()
    kt.cli("approve", str(ticket["id"]), token_of="bob")
    client.join(30)
    assert client.error is not None and client.error.sqlstate == "23505", client.error
    assert client.after == "('a',)"
    assert _ticket(kt, int(ticket["id"]), {"failed"})["status"] == "failed"
    time.sleep(0.5)
    assert _own_connections(pg) == []


def test_the_check_fails_closed_when_the_gateway_s_lock_connection_is_killed(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """Code with the target role's rights can end the gateway's check connection (same
    role), which releases its lock early: the waiting statement must not take that for
    a passed check. Nothing changed here but the connection: rolled back all the same."""
    _reset(pg, kt)
    with RawConn(kt.dsn("alice", dbname="pc")) as r:
        r.send(Q("UPDATE public.plain SET v = 'k' WHERE id = 7"))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        with psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD)) as other:
            other.execute("SELECT id FROM public.plain WHERE id = 7 FOR UPDATE")
            kt.cli("approve", str(ticket["id"]), token_of="bob")
            time.sleep(3)
            killed = other.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'keyturn-postcheck'").fetchall()
            assert killed == [(True,)], killed
            other.commit()
        a = r.until_ready()
        assert [e["C"] for e in errors(a)] == ["55000"], a
        assert b"rolled back" in b"".join(body for _, body in errors_raw(a))
    assert direct(pg, "SELECT v FROM public.plain WHERE id = 7") == [("a",)]


def errors_raw(answers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(t, body) for t, body in answers if t == b"E"]


@pytest.mark.parametrize("table", ["early", "early2"], ids=["released", "kept"])
def test_stored_code_that_waits_for_the_gateway_s_lock_cannot_pass_the_check_early(
        kt: Keyturn, pg: LocalPostgres, table: str) -> None:
    """The approved statement's trigger finds the gateway's lock in pg_locks (readable by
    every role) and waits for it, so that the gateway sees its session wait there and
    compares while the statement is still running: the code is the same, the gateway
    passes and lets go. The trigger then waits for a helper replaced meanwhile and runs
    it. The check statement at the end must not take the early pass: the gateway's
    connection no longer holds the lock when it starts (released), or its own
    transaction holds it (kept). Rolled back, nothing the new helper did remains."""
    _reset(pg, kt)
    with RawConn(kt.dsn("alice", dbname="pc")) as r:
        r.send(Q(f"UPDATE public.{table} SET v = 'q' WHERE id = 1"))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        deadline = time.monotonic() + 15
        while not direct(pg, "SELECT 1 FROM pg_stat_activity "
                             "WHERE application_name LIKE 'keyturn-passed-%'"):
            assert time.monotonic() < deadline, "the gateway never passed the check"
            time.sleep(0.05)
        direct(pg, EVIL)  # after the (early) pass, before the trigger calls the helper
        direct(pg, "UPDATE public.plain SET v = 'go' WHERE id = 20")
        a = r.until_ready()
    assert direct(pg, f"SELECT count(*) FROM {V}.victim") == [(1,)], (
        f"the replaced helper ran and committed after an early pass: {a}")
    assert [e["C"] for e in errors(a)] == ["55000"], a
    assert direct(pg, f"SELECT v FROM public.{table} WHERE id = 1") == [("a",)]


def _approved(kt: Keyturn, r: RawConn, sql: str) -> tuple[int, list[tuple[bytes, bytes]]]:
    r.send(Q(sql))
    read_until(r, b"N")
    ticket = kt.wait_ticket()
    kt.cli("approve", str(ticket["id"]), token_of="bob")
    return int(ticket["id"]), r.until_ready()


def test_commit_of_a_transaction_with_approved_statements_checks_and_commits(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """Two approved UPDATEs of a table with a deferred constraint trigger in one client
    transaction: nothing changed, so the COMMIT (their triggers fire first, then the
    gateway compares) commits both; no connection of the gateway's is left."""
    _reset(pg, kt)
    with RawConn(kt.dsn("alice", dbname="pc")) as r:
        assert not errors(r.run(Q("BEGIN")))
        t1, a = _approved(kt, r, "UPDATE public.dbox SET v = 'x' WHERE id = 1")
        assert not errors(a), a
        t2, a = _approved(kt, r, "UPDATE public.dbox SET v = 'y' WHERE id = 2")
        assert not errors(a), a
        c = r.run(Q("COMMIT"))
        assert not errors(c), c
        assert tags(c) == ["COMMIT"], c
        assert (b"Z", b"I") in c
    assert direct(pg, "SELECT v FROM public.dbox WHERE id IN (1, 2) ORDER BY id") == \
        [("x",), ("y",)]
    assert _ticket(kt, t1, {"executed"})["status"] == "executed"
    assert _ticket(kt, t2, {"executed"})["status"] == "executed"
    time.sleep(0.5)
    assert _own_connections(pg) == []


def test_commit_is_refused_when_code_changed_before_the_deferred_triggers_ran(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """The helper the deferred trigger calls is replaced (committed elsewhere) after the
    approved UPDATE ran and before the client's COMMIT: the triggers fire at the COMMIT,
    so the gateway's check there fails and nothing is committed."""
    _reset(pg, kt)
    with RawConn(kt.dsn("alice", dbname="pc")) as r:
        assert not errors(r.run(Q("BEGIN")))
        _, a = _approved(kt, r, "UPDATE public.dbox SET v = 'z' WHERE id = 3")
        assert not errors(a), a
        direct(pg, EVIL)
        c = r.run(Q("COMMIT"))
        assert [e["C"] for e in errors(c)] == ["55000"], c
        assert "not committed" in errors(c)[0]["M"], c
        assert (b"Z", b"E") in c
        assert tags(r.run(Q("ROLLBACK"))) == ["ROLLBACK"]
        assert not errors(r.run(Q("SELECT 1")))  # the session goes on
    assert direct(pg, f"SELECT count(*) FROM {V}.victim") == [(1,)]
    assert direct(pg, "SELECT v FROM public.dbox WHERE id = 3") == [("a",)]
    time.sleep(0.5)
    assert _own_connections(pg) == []


def test_rolled_back_transaction_owes_no_check_and_leaves_no_connection(
        kt: Keyturn, pg: LocalPostgres) -> None:
    _reset(pg, kt)
    with RawConn(kt.dsn("alice", dbname="pc")) as r:
        assert not errors(r.run(Q("BEGIN")))
        _, a = _approved(kt, r, "UPDATE public.dbox SET v = 'r' WHERE id = 4")
        assert not errors(a), a
        assert tags(r.run(Q("ROLLBACK"))) == ["ROLLBACK"]
        time.sleep(0.5)
        assert _own_connections(pg) == []
        # A later transaction of the session commits unchecked, as usual.
        c = r.run(Q("BEGIN; SELECT 1; COMMIT"))
        assert not errors(c) and "COMMIT" in tags(c), c
    assert direct(pg, "SELECT v FROM public.dbox WHERE id = 4") == [("a",)]


def test_set_constraints_or_an_extended_protocol_commit_after_an_approved_statement_is_refused(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """Either would run the approved statement's deferred triggers where the gateway
    does not check them: refused with the way to go on (COMMIT as a simple Query)."""
    _reset(pg, kt)
    with RawConn(kt.dsn("alice", dbname="pc")) as r:
        assert not errors(r.run(Q("BEGIN")))
        _, a = _approved(kt, r, "UPDATE public.dbox SET v = 's' WHERE id = 5")
        assert not errors(a), a
        direct(pg, EVIL)
        e = errors(r.run(Q("SET CONSTRAINTS ALL IMMEDIATE")))
        assert [x["C"] for x in e] == ["25000"] and "SET CONSTRAINTS" in e[0]["M"], e
        assert tags(r.run(Q("ROLLBACK"))) == ["ROLLBACK"]
        assert not errors(r.run(Q("BEGIN")))
        _, a = _approved(kt, r, "UPDATE public.dbox SET v = 's' WHERE id = 6")
        assert not errors(a), a
        e = errors(r.run(P("", "COMMIT"), B("", ""), E("", 0), S()))
        assert [x["C"] for x in e] == ["25000"] and "simple Query" in e[0]["M"], e
        assert tags(r.run(Q("ROLLBACK"))) == ["ROLLBACK"]
    assert direct(pg, f"SELECT count(*) FROM {V}.victim") == [(1,)]
    assert direct(pg, "SELECT v FROM public.dbox WHERE id IN (5, 6)") == [("a",), ("a",)]
