"""Attack run 29: the check after an approved statement ran (holding.py _post_check) and
the approval path, through the live gateway. Each test asserts the safe behaviour and
checks the target directly; each FAILS while its bypass exists.

The requester's second session runs directly on the target as the same role (app), as
the concurrent transaction of tests/test_pg_post_check.py does.

- The lock the check waits for is held by a connection the requester can end: the
  same role may pg_terminate_backend it, or make the target end it (ALTER ROLE ... SET
  idle_session_timeout, which every new connection of the role, the gateway's too,
  takes). The lock is then free, the approved statement's transaction commits, and
  _post_check's poll on the dead connection raises: nothing was compared.
- The gateway's digest connections take the role's settings: ALTER ROLE ... SET
  search_path = evil, pg_catalog lets a function evil.md5(text) stand in for the
  digest's unqualified md5(): every digest is the same, any code change passes both the
  re-check before release and the check after.
- Code that runs after the check: a deferred constraint trigger (at the client's later
  COMMIT, or at the implicit COMMIT after the check), a WITH HOLD cursor's query
  (persisted at COMMIT).
- Statements the planner sends "outside a block" (toggle) are not checked after they
  ran: any command not in guard._BLOCK_SAFE, e.g. CALL of a procedure that does not
  COMMIT (documented only for one that commits).
- The check's refusal undone: "UPDATE ...; SAVEPOINT s" puts the check inside s; the
  client rolls back to s and commits the approved UPDATE.
- The wait spoofed: the key is in pg_locks; stored code of the approved statement
  waits for it itself, the gateway compares too early and releases.
- Not in the digest: pg_index (an expression index created while the statement waits).
- Denial of service: one open, uncommitted CREATE OR REPLACE FUNCTION in any schema
  refuses every approval on the target.

Status: closed — the check fails closed without the gateway's word (its connection's
application_name), so a killed lock connection rolls back; the gateway's connections
resolve names in pg_catalog alone; deferred triggers fire before the check when the
transaction ends with the Query; CALL and other block-less commands that run user code
run in a block and are checked; the check goes before SAVEPOINT/RELEASE/ROLLBACK TO;
a transaction already holding the key fails the check; pg_index in the digest; an
approved WITH HOLD cursor whose query runs user code is refused; the client
transaction's own COMMIT is checked too, after the deferred triggers fired (a later
session's fix); an open catalog change elsewhere no longer refuses a statement that
is checked after it ran (a later session's fix).

Held (no test): a client that disconnects while its approved statement waits (the
backend is ended), FETCH from an approved cursor (runs read-only), an extended-protocol
statement that runs user code (refused before it is sent, so no max_rows partial run).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import Q, RawConn, direct_on, errors, read_until, vault_policy, vault_schema

DB = "atk29"
V = "a29_vault"

POLICIES = vault_policy("a29", [V], """\
      - name: w
        match: {class: [write], tables: ["public.*"]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
      - name: d
        match: {class: [ddl, procedural]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
""")

SCHEMA = vault_schema(V) + f"""
CREATE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS
  $$BEGIN EXECUTE 'SELECT 1'; END$$;
CREATE FUNCTION public.t_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM helper(); RETURN NEW; END$$;
CREATE TABLE public.box (id int PRIMARY KEY, v text);
INSERT INTO public.box SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE TRIGGER t BEFORE UPDATE ON public.box FOR EACH ROW EXECUTE FUNCTION public.t_fn();
-- a deferred constraint trigger: runs at COMMIT, after the gateway's check
CREATE FUNCTION public.dt_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM helper(); RETURN NULL; END$$;
CREATE TABLE public.dbox (id int PRIMARY KEY, v text);
INSERT INTO public.dbox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE CONSTRAINT TRIGGER dt AFTER UPDATE ON public.dbox DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION public.dt_fn();
-- a procedure that does not COMMIT
CREATE TABLE public.plain (id int PRIMARY KEY, v text);
INSERT INTO public.plain SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE PROCEDURE public.p(i int) LANGUAGE plpgsql AS
  $$BEGIN UPDATE public.plain SET v = 'p' WHERE id = i; PERFORM helper(); END$$;
CREATE TABLE {V}.victim (v text);
INSERT INTO {V}.victim VALUES ('keep me');
CREATE TABLE public.gate (id int PRIMARY KEY);
INSERT INTO public.gate VALUES (1);
-- stored code (unchanged, so its digest matches) that finds the gateway's key in
-- pg_locks, waits for it itself, then waits for a row and calls the helper
CREATE FUNCTION public.s_fn() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE k bigint;
BEGIN
  SELECT (l.classid::bigint << 32) | l.objid::bigint INTO k FROM pg_locks l
    JOIN pg_database d ON d.oid = l.database AND d.datname = current_database()
   WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
     AND l.pid <> pg_backend_pid() LIMIT 1;
  IF k IS NOT NULL THEN PERFORM pg_advisory_xact_lock(k); END IF;
  PERFORM 1 FROM public.gate WHERE id = 1 FOR UPDATE;
  PERFORM helper();
  RETURN NEW;
END$$;
-- a trigger that waits for a row of public.gate, then calls the helper
CREATE FUNCTION public.w_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM 1 FROM public.gate WHERE id = 1 FOR UPDATE; PERFORM helper();
  RETURN NEW; END$$;
CREATE TABLE public.wbox (id int PRIMARY KEY, v text);
INSERT INTO public.wbox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE TRIGGER w BEFORE UPDATE ON public.wbox FOR EACH ROW EXECUTE FUNCTION public.w_fn();
-- an index expression runs code: pg_index is not in the digest
CREATE FUNCTION public.ixhelp() RETURNS void LANGUAGE plpgsql AS
  $$BEGIN EXECUTE 'DELETE FROM ' || 'a29_' || 'vault.victim'; END$$;
CREATE FUNCTION public.ix(t text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS
  $$BEGIN PERFORM public.ixhelp(); RETURN t; END$$;
CREATE TABLE public.ilog (v text);
CREATE FUNCTION public.i_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM 1 FROM public.gate WHERE id = 1 FOR UPDATE;
  INSERT INTO public.ilog VALUES (NEW.v); RETURN NEW; END$$;
CREATE TABLE public.ibox (id int PRIMARY KEY, v text);
INSERT INTO public.ibox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE TRIGGER i BEFORE UPDATE ON public.ibox FOR EACH ROW EXECUTE FUNCTION public.i_fn();
-- a function a cursor's query calls: waits for a row of public.gate, writes, helper
CREATE FUNCTION public.wr(i int) RETURNS int LANGUAGE plpgsql AS
  $$BEGIN PERFORM 1 FROM public.gate WHERE id = 1 FOR UPDATE;
  UPDATE public.plain SET v = 'w' WHERE id = i; PERFORM helper(); RETURN i; END$$;
CREATE SCHEMA a29own;
CREATE FUNCTION a29own.f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;
CREATE TABLE public.sbox (id int PRIMARY KEY, v text);
INSERT INTO public.sbox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE TRIGGER s BEFORE UPDATE ON public.sbox FOR EACH ROW EXECUTE FUNCTION public.s_fn();
"""

#: The helper replaced by the requester's second session (names the vault only in a
#: string, so the analyser's view of what the statement touches stays the same).
EVIL = ("CREATE OR REPLACE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS "
        "$$BEGIN EXECUTE 'DELETE FROM ' || 'a29_' || 'vault.victim'; END$$")
GOOD = ("CREATE OR REPLACE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS "
        "$$BEGIN EXECUTE 'SELECT 1'; END$$")


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a29"), DB, schema=SCHEMA,
                            policies=POLICIES, connections={"a29": "policy: a29"})
    k.start()
    yield k
    k.stop()


def direct(pg: LocalPostgres, sql: str) -> list[tuple] | str:
    return direct_on(pg.dsn(DB, user="app", password=APP_PASSWORD), sql)


def victim(pg: LocalPostgres) -> list[tuple] | str:
    return direct(pg, f"SELECT count(*) FROM {V}.victim")


def _reset(pg: LocalPostgres, kt: Keyturn) -> None:
    direct(pg, f"ALTER ROLE app IN DATABASE {DB} RESET ALL")
    direct(pg, "DROP SCHEMA IF EXISTS a29evil CASCADE")
    direct(pg, "DROP INDEX IF EXISTS public.a29_ix")
    direct(pg, GOOD)
    direct(pg, f"DELETE FROM {V}.victim; INSERT INTO {V}.victim VALUES ('keep me')")
    direct(pg, "UPDATE public.box SET v = 'a'")
    direct(pg, "UPDATE public.wbox SET v = 'a'")
    direct(pg, "UPDATE public.plain SET v = 'a'")
    kt.skip_pending()
    time.sleep(1)


@pytest.fixture(autouse=True)
def _clean(pg: LocalPostgres, kt: Keyturn) -> Iterator[None]:
    _reset(pg, kt)
    yield
    direct(pg, f"ALTER ROLE app IN DATABASE {DB} RESET ALL")
    direct(pg, GOOD)


def _race(kt: Keyturn, pg: LocalPostgres, sql: str, lock_sql: str,
          meanwhile: Callable[[psycopg.Connection], None] | None = None, *,
          before: Callable[[psycopg.Connection], None] | None = None,
          disconnect: bool = False, change: str = EVIL) -> list[tuple[bytes, bytes]]:
    """Hold ``sql`` (simple Query), lock what it will wait for (``lock_sql``) in the
    requester's second session, approve, let the pre-release re-check pass and the
    statement wait, run ``meanwhile``, then replace the helper and commit. The
    client's answers."""
    with RawConn(kt.dsn("alice", dbname="a29")) as r:
        r.send(Q(sql))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        with psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD)) as other:
            other.execute(lock_sql)
            if before is not None:
                before(other)
            kt.cli("approve", str(ticket["id"]), token_of="bob")
            time.sleep(3)  # re-checked before release; the statement waits for the row
            if meanwhile is not None:
                meanwhile(other)
            if disconnect:
                r.sock.shutdown(socket.SHUT_RDWR)  # the client goes away
                time.sleep(1)
            other.execute(change)
            other.commit()
        if disconnect:
            return []
        try:
            return r.until_ready()
        except ConnectionError as exc:  # the gateway closed the session
            time.sleep(2)  # (the target's backend goes on without its client)
            return [(b"!", str(exc).encode())]


# ------------------------------------------------------------------ the lock holder


def test_terminating_the_check_lock_connection_lets_the_approved_statement_commit(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """The gateway's lock connection runs as the target role, so the requester's own
    session may end it (pg_terminate_backend: same role). The advisory lock goes with it,
    the approved UPDATE runs the replaced helper, its check statement gets the free lock
    at once and commits; _post_check's poll on the dead connection raises: no compare.
    FIX: fail closed. The check statement must not be able to go on unless the gateway
    said so: e.g. after getting lock K it verifies that a second key K2 is held by the
    gateway's connection (which takes K2 only when the digest matched, before releasing
    K) and RAISEs otherwise; run the lock connection as a role the target role is not a
    member of (or pg_signal_backend-proof), and on any error of the lock connection
    cancel/terminate the client's backend."""
    def kill(other: psycopg.Connection) -> None:
        with psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD),
                             autocommit=True) as c:
            # (the key is visible in pg_locks too: any session of the role finds it)
            killed = c.execute(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l "
                "JOIN pg_database d ON d.oid = l.database AND d.datname = current_database() "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()"
            ).fetchall()
            assert killed, "no advisory lock holder found"
        time.sleep(0.5)

    a = _race(kt, pg, "UPDATE public.box SET v = 'q' WHERE id = 2",
              "SELECT id FROM public.box WHERE id = 2 FOR UPDATE", kill)
    assert victim(pg) == [(1,)], ("the replaced helper ran and committed: the check's "
                                  f"lock holder was ended by the requester; answers {a}")
    assert [e["C"] for e in errors(a)] == ["55000"], a


def test_role_idle_session_timeout_ends_the_check_lock_connection(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """Any role may ALTER ROLE itself SET a setting for new connections; the gateway's
    lock connection is one (autocommit, idle while it holds the lock), so
    idle_session_timeout ends it: same effect as terminating it, no extra privilege.
    FIX: as above (fail closed), and start the gateway's own connections with
    -c idle_session_timeout=0 -c idle_in_transaction_session_timeout=0
    -c search_path=pg_catalog (startup options outrank role/database settings)."""
    def before(other: psycopg.Connection) -> None:
        # after the client's own connection was made (it would be ended too when idle)
        assert direct(pg, f"ALTER ROLE app IN DATABASE {DB} SET idle_session_timeout "
                          "= '300ms'") == []

    a = _race(kt, pg, "UPDATE public.box SET v = 'q' WHERE id = 3",
              "SELECT id FROM public.box WHERE id = 3 FOR UPDATE", before=before)
    assert victim(pg) == [(1,)], ("the replaced helper ran and committed: the check's "
                                  f"lock connection timed out idle; answers {a}")


# ------------------------------------------------------------------ the digest itself


def test_role_search_path_shadows_md5_and_blinds_the_digest(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """USER_CODE_SQL calls md5(), concat_ws(), string_agg()... unqualified, on a
    connection that takes the role's settings: with ALTER ROLE app SET search_path =
    a29evil, pg_catalog, public, the role's own a29evil.md5(text) stands in for
    pg_catalog's, every digest is the same, and the helper replaced while the statement
    was held (no change in what it touches: the vault is named in a string) runs.
    FIX: -c search_path=pg_catalog on the gateway's own connections (and every name in
    USER_CODE_SQL / CATALOG_CHANGES_SQL / the lock SQL schema-qualified, operators
    with OPERATOR(pg_catalog.=)); count pg_db_role_setting in the digest."""
    assert direct(pg, "CREATE SCHEMA a29evil") == []
    assert direct(pg, "CREATE FUNCTION a29evil.md5(text) RETURNS text LANGUAGE sql "
                      "IMMUTABLE AS $$ SELECT 'same'::text $$") == []
    assert direct(pg, f"ALTER ROLE app IN DATABASE {DB} SET search_path = "
                      "a29evil, pg_catalog, public") == []
    time.sleep(11)  # the gateway's catalog has read it
    with RawConn(kt.dsn("alice", dbname="a29")) as r:
        r.send(Q("UPDATE public.box SET v = 'q' WHERE id = 4"))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        assert direct(pg, EVIL) == []
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    assert victim(pg) == [(1,)], ("the helper replaced while held ran: the digest was "
                                  f"computed with the role's md5; answers {a}")
    assert [e["C"] for e in errors(a)] == ["55000"], a


# ------------------------------------------------------------------ code after the check


def test_deferred_constraint_trigger_runs_replaced_helper_at_the_clients_commit(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """In a client transaction the approved UPDATE is checked when it ran; its deferred
    constraint trigger runs at the client's COMMIT, a later Query the gateway does not
    check, with whatever the helper is by then.
    FIX: make deferred triggers fire before the check: send SET CONSTRAINTS ALL
    IMMEDIATE right before the check statement (in the Query and behind the Execute),
    so their code runs inside the checked window (or refuse approved statements on
    tables with deferrable constraint triggers)."""
    with RawConn(kt.dsn("alice", dbname="a29")) as r:
        assert not errors(r.run(Q("BEGIN")))
        r.send(Q("UPDATE public.dbox SET v = 'q' WHERE id = 1"))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
        assert not errors(a), a  # checked: nothing had changed yet
        assert direct(pg, EVIL) == []  # the requester's second session
        c = r.run(Q("COMMIT"))
    assert victim(pg) == [(1,)], ("the deferred trigger of the approved UPDATE ran the "
                                  f"helper replaced after the check; answers {c}")


def test_deferred_constraint_trigger_waits_after_the_check_in_autocommit(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """Without a client transaction: the check statement passes, then the implicit
    COMMIT fires the deferred trigger, which waits for a row the requester's second
    session holds and then runs the helper committed meanwhile. Same fix."""
    direct(pg, "CREATE OR REPLACE FUNCTION public.dt_fn() RETURNS trigger LANGUAGE plpgsql "
               "AS $$BEGIN PERFORM 1 FROM public.gate WHERE id = 1 FOR UPDATE; "
               "PERFORM helper(); RETURN NULL; END$$")
    time.sleep(1)
    try:
        a = _race(kt, pg, "UPDATE public.dbox SET v = 'q' WHERE id = 2",
                  "SELECT id FROM public.gate WHERE id = 1 FOR UPDATE")
    finally:
        direct(pg, "CREATE OR REPLACE FUNCTION public.dt_fn() RETURNS trigger LANGUAGE "
                   "plpgsql AS $$BEGIN PERFORM helper(); RETURN NULL; END$$")
    assert victim(pg) == [(1,)], ("the deferred trigger waited at COMMIT, after the check, "
                                  f"and ran the helper committed meanwhile; answers {a}")


# ------------------------------------------------------------------ not checked at all


def test_call_of_a_procedure_that_does_not_commit_is_checked_after_it_ran(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """A single CALL in autocommit is planned "outside a block" (guard.plan_query toggle:
    any rw command not in _BLOCK_SAFE: CALL, DO, CREATE INDEX, REFRESH, CREATE TRIGGER,
    ALTER FUNCTION...), and such a Query gets no check after it ran, although CALL of a
    procedure without transaction control runs fine in a block. The procedure waits for
    a row, the helper is replaced meanwhile, and it runs.
    FIX: append the check to these too (a multi-statement Query is an implicit block; a
    procedure that COMMITs then fails with 2D000, closed), and keep the out-of-block
    path only for commands PostgreSQL refuses in a block (VACUUM, CREATE DATABASE, ...
    CONCURRENTLY), which should then not be approvable when they run user code."""
    a = _race(kt, pg, "CALL public.p(5)",
              "SELECT id FROM public.plain WHERE id = 5 FOR UPDATE")
    assert victim(pg) == [(1,)], ("the approved CALL ran the helper replaced while it "
                                  f"waited, with no check after it ran; answers {a}")


# ------------------------------------------------------------------ the refusal undone


def test_savepoint_after_the_approved_statement_undoes_the_checks_refusal(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """with_post_check puts the check after the Query's last statement unless that is a
    COMMIT/ROLLBACK: "UPDATE ...; SAVEPOINT s" gets it after SAVEPOINT s, inside the
    savepoint. The check refuses (the helper changed while the UPDATE waited) and
    cancels the check statement; the client rolls back to s (allowed: transaction
    control) and COMMITs the approved UPDATE with what the replaced helper did.
    FIX: put the check right after the last approved (work) statement, before any
    SAVEPOINT / RELEASE / ROLLBACK TO that follows it in the Query; and once a check
    refused, make the whole transaction fail for good (the gateway refuses every
    statement but ROLLBACK in it, as for a blocked statement, or terminates the backend
    when it cannot)."""
    with RawConn(kt.dsn("alice", dbname="a29")) as r:
        assert not errors(r.run(Q("BEGIN")))
        r.send(Q("UPDATE public.wbox SET v = 'q' WHERE id = 7; SAVEPOINT s"))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        with psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD)) as other:
            # (a row of a table only the trigger names: a multi-statement Query is
            # checked for any lock on its own tables)
            other.execute("SELECT id FROM public.gate WHERE id = 1 FOR UPDATE")
            kt.cli("approve", str(ticket["id"]), token_of="bob")
            time.sleep(3)
            other.execute(EVIL)
            other.commit()
        a = r.until_ready()
        b = r.run(Q("ROLLBACK TO SAVEPOINT s"))
        c = r.run(Q("COMMIT"))
    assert [e["C"] for e in errors(a)] == ["55000"], a
    assert victim(pg) == [(1,)], ("the check refused, then ROLLBACK TO SAVEPOINT and "
                                  f"COMMIT committed the approved UPDATE; {b} {c}")
    assert direct(pg, "SELECT v FROM public.wbox WHERE id = 7") == [("a",)]


# ------------------------------------------------------------------ the wait spoofed


def test_stored_code_waits_for_the_checks_key_itself_and_runs_after_the_check(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """The key is in pg_locks, which every role reads. Stored code the approved UPDATE
    runs (unchanged: its digest matches) looks it up and waits for it itself: the
    gateway sees the backend wait for its key, compares (nothing changed yet) and
    releases; the code goes on, waits for a row of the requester's, runs the helper
    replaced meanwhile, and the check statement then gets a lock its transaction already
    holds: commit. FIX: decide at the protocol level, where stored code cannot reach:
    run the approved statement in a transaction block of the gateway's own (or the
    client's), compare once its answer ended (ReadyForQuery 'T', after SET CONSTRAINTS
    ALL IMMEDIATE), then send COMMIT or ROLLBACK itself; at least make the check
    statement RAISE when its transaction already holds (or held) the key."""
    a = _race(kt, pg, "UPDATE public.sbox SET v = 'q' WHERE id = 1",
              "SELECT id FROM public.gate WHERE id = 1 FOR UPDATE")
    assert victim(pg) == [(1,)], ("stored code waited for the check's key, the check "
                                  f"passed, then the replaced helper ran; answers {a}")


# ------------------------------------------------------------------ not in the digest


def test_an_expression_index_created_while_the_approved_statement_waits_is_not_seen(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """USER_CODE_SQL has no pg_index (index expressions and predicates run user code on
    every insert/update) and leaves indexes out of its pg_class rows. While the approved
    UPDATE's trigger waits for a row of the requester's, the requester creates an
    expression index on the table the trigger then writes to, calling a function that
    existed unchanged all along: the check after it ran sees the same digest.
    FIX: add pg_index (indexrelid, indrelid, indexprs, indpred, indclass, indkey) of
    user tables to USER_CODE_SQL (and CATALOG_CHANGES_SQL), and with it the other
    catalogs that make code run: pg_amop/pg_amproc/pg_opclass (index and sort support),
    pg_statistic_ext expressions, pg_db_role_setting, pg_extension, pg_language,
    pg_foreign_server/pg_user_mapping options, pg_namespace (a schema created on the
    search_path), pg_collation, pg_ts_config_map."""
    a = _race(kt, pg, "UPDATE public.ibox SET v = 'q' WHERE id = 1",
              "SELECT id FROM public.gate WHERE id = 1 FOR UPDATE",
              change="CREATE INDEX a29_ix ON public.ilog ((public.ix(v)))")
    assert victim(pg) == [(1,)], ("the expression index made after the re-check ran its "
                                  f"function; the digest did not change; answers {a}")


def test_a_with_hold_cursor_runs_its_query_at_commit_after_the_check(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """DECLARE ... WITH HOLD in autocommit: the approved Query declares the cursor, the
    check statement passes (nothing ran yet), and the cursor's query runs to completion
    at the implicit COMMIT, after the check: it waits for the requester's row, then
    runs the helper committed meanwhile. FIX: an approved DECLARE ... WITH HOLD whose
    query may run user code cannot be checked after it ran (its query runs, again from
    the start, when COMMIT persists it: a MOVE ALL before the check does not help), so
    refuse it (ask for it without HOLD inside a transaction), like the commands that
    cannot run in a block."""
    a = _race(kt, pg, "DECLARE c CURSOR WITH HOLD FOR SELECT public.wr(id) FROM public.plain "
              "WHERE id = 12", "SELECT id FROM public.gate WHERE id = 1 FOR UPDATE")
    assert victim(pg) == [(1,)], ("the WITH HOLD cursor's query ran at COMMIT, after the "
                                  f"check, with the replaced helper; answers {a}")


# ------------------------------------------------------------------ denial of service


def test_an_open_unrelated_function_change_refuses_every_approval_on_the_target(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """Any role that may replace one function anywhere (its own schema) and leave the
    transaction open makes CATALOG_CHANGES_SQL report "catalog pg_proc" to every
    approval on the target, for every requester: an approved UPDATE of a table without
    any code is refused, as long as that transaction stays open. FIX: now that the
    check after it ran sees whatever such a transaction commits while the statement
    waits, the pre-release refusal for uncommitted catalog rows is redundant for
    statements that are post-checked: drop it for them (keep it only where no check
    after it runs), or wait for that transaction a bounded time instead of refusing."""
    with psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD)) as other:
        other.execute("CREATE OR REPLACE FUNCTION a29own.f() RETURNS int LANGUAGE sql AS "
                      "$$ SELECT 2 $$")  # left open: not committed
        with RawConn(kt.dsn("alice", dbname="a29")) as r:
            r.send(Q("UPDATE public.plain SET v = 'd' WHERE id = 15"))
            read_until(r, b"N")
            ticket = kt.wait_ticket()
            kt.cli("approve", str(ticket["id"]), token_of="bob")
            a = r.until_ready()
        other.rollback()
    assert not errors(a), ("an unrelated open function change in another schema refused "
                           f"an approved UPDATE of a table with no code: {a}")
    assert direct(pg, "SELECT v FROM public.plain WHERE id = 15") == [("d",)]
