"""Attack run 30: the check after an approved statement ran (holding.py _post_check,
gateway.py USER_CODE_SQL) and deferred work, through the live gateway. Each test asserts
the safe behaviour and checks the target directly; each FAILS while its bypass exists.

The requester's second session runs directly on the target as the same role (app), as
in tests/test_pg_attack29.py.

Findings (each test FAILS while the bypass exists):

- class bypass: a domain's DEFAULT expression is not in the catalog model (catalog.py
  _TYPE_CODE / _RELATION_CODE / _EXPRESSIONS): an INSERT the policy allows runs the user
  function the default calls, read-write (the vault emptied without any approval).
- names not in the code digest (gateway.py USER_CODE_SQL): pg_namespace (ALTER SCHEMA
  ... RENAME swaps which function a qualified or unqualified name reaches) and
  pg_attribute (column renames): both pass the re-check before release and the check
  after the statement ran.
- work after the check: a WITH HOLD cursor declared by stored code (its query runs at
  COMMIT), and a deferred constraint trigger that runs SET CONSTRAINTS ALL DEFERRED and
  queues another one past the gateway's SET CONSTRAINTS ALL IMMEDIATE.
- denial of service: gateway.column_origins (masked connections) has no lock/statement
  timeout and runs in asyncio's default executor; a lock held on a table under a view
  stalls it, a few masked logins fill the executor, and every other session's
  authentication (to_thread) stops.

Held (pass): a trigger calling the same function as the domain default is seen
(control); a view's own column default calling user code is seen.

Status: closed — domain defaults are code of every table with a column of the domain
(on writes: catalog.py _TYPE_CODE 'its default', _EXPRESSIONS kind 'd'); the digest
counts schema names and columns; the check that ends a transaction (the Query's own, or
the one before the client's COMMIT) makes the rest of it read-only, so work stored code
left for COMMIT cannot write; column origins are read with bounded waits, on threads of
their own, one read per connection at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import (
    Q,
    RawConn,
    direct_on,
    errors,
    masked_policy,
    read_until,
    vault_policy,
    vault_schema,
)

DB = "atk30"
V = "a30_vault"

POLICIES = vault_policy("a30", [V], """\
      - name: w
        match: {class: [write], tables: ["public.*"]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
      - name: d
        match: {class: [ddl, procedural]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
""") + masked_policy("a30m", [V], ["public.inbox"]) + vault_policy("a30w", [V], """\
      - name: w
        match: {class: [write], tables: ["public.dtab", "public.ttab", "public.vw",
                                          "public.vbase"]}
        action: allow
""")

SCHEMA = vault_schema(V) + f"""
CREATE TABLE {V}.victim (v text);
INSERT INTO {V}.victim VALUES ('keep me');
CREATE TABLE public.gate (id int PRIMARY KEY);
INSERT INTO public.gate VALUES (1);
-- two schemas with a helper each: the good one, and one that empties the vault
CREATE SCHEMA a30s;
CREATE FUNCTION a30s.helper() RETURNS void LANGUAGE plpgsql AS
  $$BEGIN EXECUTE 'SELECT 1'; END$$;
CREATE SCHEMA a30t;
CREATE FUNCTION a30t.helper() RETURNS void LANGUAGE plpgsql AS
  $$BEGIN EXECUTE 'DELETE FROM ' || 'a30_' || 'vault.victim'; END$$;
-- a trigger that waits for a row of public.gate, then calls a30s.helper() (qualified)
CREATE FUNCTION public.n_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM 1 FROM public.gate WHERE id = 1 FOR UPDATE; PERFORM a30s.helper();
  RETURN NEW; END$$;
CREATE TABLE public.nbox (id int PRIMARY KEY, v text);
INSERT INTO public.nbox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE TRIGGER n BEFORE UPDATE ON public.nbox FOR EACH ROW EXECUTE FUNCTION public.n_fn();
-- the public helper (replaced by the requester's second session in some tests)
CREATE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS
  $$BEGIN EXECUTE 'SELECT 1'; END$$;
-- a function a cursor's query calls: waits for a row of public.gate, then the helper
CREATE FUNCTION public.wr(i int) RETURNS int LANGUAGE plpgsql AS
  $$BEGIN PERFORM 1 FROM public.gate WHERE id = 1 FOR UPDATE; PERFORM public.helper();
  RETURN i; END$$;
-- a trigger that declares a WITH HOLD cursor (its query runs at COMMIT)
CREATE FUNCTION public.h_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN EXECUTE 'DECLARE a30c CURSOR WITH HOLD FOR SELECT public.wr(1)';
  RETURN NEW; END$$;
CREATE TABLE public.hbox (id int PRIMARY KEY, v text);
INSERT INTO public.hbox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE TRIGGER h BEFORE UPDATE ON public.hbox FOR EACH ROW EXECUTE FUNCTION public.h_fn();
-- the same trigger without a wait (for the statement held while schemas are swapped)
CREATE FUNCTION public.m_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM a30s.helper(); RETURN NEW; END$$;
CREATE TABLE public.mbox (id int PRIMARY KEY, v text);
INSERT INTO public.mbox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE TRIGGER m BEFORE UPDATE ON public.mbox FOR EACH ROW EXECUTE FUNCTION public.m_fn();
CREATE TABLE public.inbox (v text);
-- a domain whose DEFAULT calls a user function (runs on every INSERT that omits it)
CREATE FUNCTION public.dflt() RETURNS text LANGUAGE plpgsql VOLATILE AS
  $$BEGIN EXECUTE 'DELETE FROM ' || 'a30_' || 'vault.victim'; RETURN 'x'; END$$;
CREATE DOMAIN public.a30dom AS text DEFAULT public.dflt();
CREATE TABLE public.dtab (id int, v public.a30dom);
-- control: the same function as a trigger (the catalog sees it: user code)
CREATE FUNCTION public.tt_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM public.dflt(); RETURN NEW; END$$;
CREATE TABLE public.ttab (id int, v text);
CREATE TRIGGER tt BEFORE INSERT ON public.ttab FOR EACH ROW EXECUTE FUNCTION public.tt_fn();
-- a deferred constraint trigger that defers again and queues another deferred one
CREATE FUNCTION public.gy_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM 1 FROM public.gate WHERE id = 1 FOR UPDATE; PERFORM public.helper();
  RETURN NULL; END$$;
CREATE TABLE public.gy (id int PRIMARY KEY, v text);
INSERT INTO public.gy VALUES (1, 'a');
CREATE CONSTRAINT TRIGGER gy AFTER UPDATE ON public.gy DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION public.gy_fn();
CREATE FUNCTION public.gx_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN EXECUTE 'SET CONSTRAINTS ALL DEFERRED';
  UPDATE public.gy SET v = 'z' WHERE id = 1; RETURN NULL; END$$;
CREATE TABLE public.gx (id int PRIMARY KEY, v text);
INSERT INTO public.gx SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE CONSTRAINT TRIGGER gx AFTER UPDATE ON public.gx DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION public.gx_fn();
-- a trigger whose helper sets a harmless flag of public.acct by column name
CREATE TABLE public.acct (id int PRIMARY KEY, pending bool NOT NULL DEFAULT false,
                          is_admin bool NOT NULL DEFAULT false);
INSERT INTO public.acct VALUES (1, false, false);
CREATE FUNCTION public.colw() RETURNS void LANGUAGE plpgsql AS
  $$BEGIN UPDATE public.acct SET pending = true WHERE id = 1; END$$;
CREATE FUNCTION public.c_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM public.colw(); RETURN NEW; END$$;
CREATE TABLE public.cbox (id int PRIMARY KEY, v text);
INSERT INTO public.cbox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE TRIGGER c BEFORE UPDATE ON public.cbox FOR EACH ROW EXECUTE FUNCTION public.c_fn();
-- an updatable view whose column default calls user code
CREATE TABLE public.vbase (id int, v text);
CREATE VIEW public.vw AS SELECT id, v FROM public.vbase;
ALTER VIEW public.vw ALTER COLUMN v SET DEFAULT public.dflt();
-- a view and its base table (the DoS test locks the base table)
CREATE TABLE public.lk (x int);
CREATE VIEW public.lkv AS SELECT x FROM public.lk;
"""

EVIL = ("CREATE OR REPLACE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS "
        "$$BEGIN EXECUTE 'DELETE FROM ' || 'a30_' || 'vault.victim'; END$$")
GOOD = ("CREATE OR REPLACE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS "
        "$$BEGIN EXECUTE 'SELECT 1'; END$$")
#: swaps the two helper schemas: no pg_proc row changes, only pg_namespace names
SWAP = ("ALTER SCHEMA a30s RENAME TO a30z; ALTER SCHEMA a30t RENAME TO a30s; "
        "ALTER SCHEMA a30z RENAME TO a30t")


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a30"), DB, schema=SCHEMA,
                            policies=POLICIES, connections={"a30": "policy: a30",
                                                            "a30m": "policy: a30m",
                                                            "a30w": "policy: a30w"})
    k.start()
    yield k
    k.stop()


def direct(pg: LocalPostgres, sql: str) -> list[tuple] | str:
    return direct_on(pg.dsn(DB, user="app", password=APP_PASSWORD), sql)


def victim(pg: LocalPostgres) -> list[tuple] | str:
    return direct(pg, f"SELECT count(*) FROM {V}.victim")


def _schemas_in_order(pg: LocalPostgres) -> None:
    """a30s holds the good helper again (a swap may have run)."""
    bad = direct(pg, "SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                     "WHERE n.nspname = 'a30s' AND p.prosrc LIKE '%DELETE%'")
    if bad:
        direct(pg, SWAP)


def _reset(pg: LocalPostgres, kt: Keyturn) -> None:
    _schemas_in_order(pg)
    direct(pg, GOOD)
    direct(pg, f"DELETE FROM {V}.victim; INSERT INTO {V}.victim VALUES ('keep me')")
    for t in ("nbox", "hbox", "mbox", "gx", "gy"):
        direct(pg, f"UPDATE public.{t} SET v = 'a'")
    kt.skip_pending()
    time.sleep(1)


@pytest.fixture(autouse=True)
def _clean(pg: LocalPostgres, kt: Keyturn) -> Iterator[None]:
    _reset(pg, kt)
    yield
    _schemas_in_order(pg)
    direct(pg, GOOD)


def _race(kt: Keyturn, pg: LocalPostgres, sql: str, lock_sql: str, change: str, *,
          after_commit: Callable[[RawConn], list] | None = None) -> list[tuple[bytes, bytes]]:
    """Hold ``sql`` (simple Query), lock what it will wait for (``lock_sql``) in the
    requester's second session, approve, let the pre-release re-check pass and the
    statement wait, then run ``change`` and commit. The client's answers."""
    with RawConn(kt.dsn("alice", dbname="a30")) as r:
        r.send(Q(sql))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        with psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD)) as other:
            other.execute(lock_sql)
            kt.cli("approve", str(ticket["id"]), token_of="bob")
            time.sleep(3)  # re-checked before release; the statement waits for the row
            other.execute(change)
            other.commit()
        try:
            a = r.until_ready()
        except ConnectionError as exc:
            time.sleep(2)
            return [(b"!", str(exc).encode())]
        if after_commit is not None:
            a += after_commit(r)
        return a


# ------------------------------------------------------------------ class bypass


def test_a_domain_default_calling_user_code_runs_in_an_allowed_insert(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """A column whose type is a domain with DEFAULT public.dflt(): every INSERT that
    omits the column runs the domain's default expression. The catalog model never
    reads it: _TYPE_CODE lists casts, I/O, domain CHECKs (pg_constraint) and operator
    classes; _RELATION_CODE follows pg_depend only from pg_attrdef / pg_constraint /
    pg_class / pg_statistic_ext / pg_policy (a domain default depends from pg_type);
    _EXPRESSIONS prints column defaults (pg_attrdef) and domain checks, not
    pg_type.typdefaultbin. So "INSERT INTO public.dtab (id) VALUES (1)" is a plain write
    of public.dtab, allowed by the policy, given write access by the guard, and the
    default's function empties a30_vault.victim (a table the policy blocks outright).
    FIX: add domain defaults to _TYPE_CODE ('its default': pg_depend rows with classid
    pg_type and refclassid pg_proc/pg_operator/pg_type, and typdefaultbin printed with
    pg_get_expr into _EXPRESSIONS as 'w' code of every table with a column of that domain
    or of a domain over it), and judge them for writes of such tables."""
    with RawConn(kt.dsn("alice", dbname="a30w")) as r:
        a = r.run(Q("INSERT INTO public.dtab (id) VALUES (1)"))
    assert victim(pg) == [(1,)], ("an allowed INSERT ran the domain default's user "
                                  f"function, which emptied the vault; answers {a}")


def test_probe_view_column_default_calling_user_code(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """held: a view's own column default (ALTER VIEW ... SET DEFAULT) that calls user
    code is seen (pg_attrdef of the view): the INSERT through the view is not run as a
    plain allowed write."""
    with RawConn(kt.dsn("alice", dbname="a30w")) as r:
        a = r.run(Q("INSERT INTO public.vw (id) VALUES (1)"))
    assert victim(pg) == [(1,)], a
    assert errors(a), a


def test_control_a_trigger_calling_the_same_function_is_not_allowed(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """Control for the test above (held, passes): the same function run by a trigger of
    a table the policy allows writes to is user code (unknown_functions: write with an
    unknown reach), and the INSERT is not run as a plain allowed write."""
    with RawConn(kt.dsn("alice", dbname="a30w")) as r:
        a = r.run(Q("INSERT INTO public.ttab (id) VALUES (1)"))
    assert victim(pg) == [(1,)], a
    assert errors(a), a


# ------------------------------------------------------------------ not in the digest


def test_schema_rename_swaps_the_helper_without_changing_the_digest(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """USER_CODE_SQL hashes pg_proc rows by pronamespace (an OID), never the schema's
    NAME, and pg_namespace is not in the digest at all (only in CATALOG_CHANGES_SQL, for
    uncommitted rows before release). Stored code names functions by schema name
    (a30s.helper(), or unqualified through search_path / "$user"). While the approved
    UPDATE's trigger waits for a row of the requester's, the requester swaps the names
    of two schemas that both existed, unchanged, when approvers were asked (ALTER SCHEMA
    ... RENAME: every pg_proc row keeps its xmin, oid and pronamespace): the trigger's
    a30s.helper() now resolves to the other schema's function, which empties the vault;
    the check after it ran sees the same digest and lets it commit.
    Same family: ALTER SCHEMA RENAME into the role's "$user" schema (which precedes
    public on the default path) shadows any unqualified call.
    FIX: add pg_namespace (oid, nspname, nspowner, xmin) of every non-temporary schema
    to USER_CODE_SQL, and hash functions/types/operators/relations by their qualified
    NAME (n.nspname) too, not only the OID; better, count every catalog row's xmin in
    the catalogs that resolve names (pg_namespace, pg_class incl. sequences, pg_type)."""
    a = _race(kt, pg, "UPDATE public.nbox SET v = 'q' WHERE id = 1",
              "SELECT id FROM public.gate WHERE id = 1 FOR UPDATE", SWAP)
    assert victim(pg) == [(1,)], ("the trigger's a30s.helper() resolved to the swapped-in "
                                  f"schema's function; the digest did not change; answers {a}")


def test_schema_swap_while_held_passes_the_release_recheck(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """Same gap, no race needed: the UPDATE is held, the requester swaps the two schema
    names (committed), then the approver approves. The re-check before release
    (_recheck) compares the decision's shape (the statement still touches public.mbox and
    calls public.m_fn) and the code digest (pg_proc rows unchanged: same oid, xmin,
    pronamespace, prosrc), and finds no uncommitted catalog change: it releases, and the
    trigger's a30s.helper() is now the other schema's function. Approvers were shown a
    statement whose trigger calls a harmless helper; it empties the vault.
    FIX: as above (pg_namespace names in USER_CODE_SQL)."""
    with RawConn(kt.dsn("alice", dbname="a30")) as r:
        r.send(Q("UPDATE public.mbox SET v = 'q' WHERE id = 3"))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        assert direct(pg, SWAP) == []
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    assert victim(pg) == [(1,)], ("the schemas swapped while the UPDATE was held changed "
                                  f"which helper its trigger runs; answers {a}")
    assert [e["C"] for e in errors(a)] == ["55000"], a


COLSWAP = ("ALTER TABLE public.acct RENAME pending TO tmp; "
           "ALTER TABLE public.acct RENAME is_admin TO pending; "
           "ALTER TABLE public.acct RENAME tmp TO is_admin")


def test_column_rename_swap_while_held_passes_the_release_recheck(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """pg_attribute is not in USER_CODE_SQL either (nor is a relation's xmin): column
    names, types (ALTER COLUMN TYPE to a domain), collations can change while the
    digest stays the same. Stored code names columns by name: the approved UPDATE's
    trigger helper sets public.acct.pending; while it is held the requester swaps the
    names of acct's columns pending and is_admin, the approver approves, the re-check
    before release finds the same digest and shape, and the helper now sets the column
    that was is_admin (privilege escalation in the application's own data).
    FIX: add pg_attribute (attrelid, attnum, attname, atttypid, attcollation,
    attisdropped, attgenerated) of user relations to USER_CODE_SQL (or the xmin of
    every pg_class row, which ALTER TABLE updates)."""
    with RawConn(kt.dsn("alice", dbname="a30")) as r:
        r.send(Q("UPDATE public.cbox SET v = 'q' WHERE id = 4"))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        assert direct(pg, COLSWAP) == []
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    # (after the swap, the column now called "pending" is the former is_admin)
    flag = direct(pg, "SELECT pending FROM public.acct WHERE id = 1")
    direct(pg, COLSWAP)
    direct(pg, "UPDATE public.acct SET pending = false, is_admin = false")
    assert flag == [(False,)], ("the column swap while held changed which column the "
                                f"trigger's helper sets (the former is_admin); answers {a}")


# ------------------------------------------------------------------ code after the check


def test_a_trigger_declares_a_with_hold_cursor_whose_query_runs_at_commit(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """An approved DECLARE ... WITH HOLD whose query runs user code is refused
    (holding.py _uncheckable: 'hold_cursor' fact), and a client transaction that
    declared one is made read-only before COMMIT; but stored code can declare one itself
    (plpgsql EXECUTE 'DECLARE c CURSOR WITH HOLD FOR ...'), which the gateway cannot see.
    The approved UPDATE's trigger declares it; the UPDATE completes, the check statement
    (SET CONSTRAINTS ALL IMMEDIATE; DO ... advisory lock) passes, and only then the
    implicit COMMIT persists the cursor: its query runs to completion there, after the
    check, read-write (the approved statement's transaction). It waits for the
    requester's row, then runs the helper replaced meanwhile.
    FIX: fail the check when pg_catalog.pg_cursors shows a holdable cursor the client's
    statements did not declare (add it to post_check_sql's first test, after the
    statement ran), and make the rest of an approved statement's transaction read-only
    once the check passed (SET LOCAL transaction_read_only = on in the check statement,
    as the gateway does before a client COMMIT of a transaction that declared a WITH
    HOLD cursor), so a cursor query at COMMIT that writes fails and rolls back."""
    a = _race(kt, pg, "UPDATE public.hbox SET v = 'q' WHERE id = 2",
              "SELECT id FROM public.gate WHERE id = 1 FOR UPDATE", EVIL)
    assert victim(pg) == [(1,)], ("a WITH HOLD cursor declared by the approved statement's "
                                  "trigger ran its query at COMMIT, after the check, with the "
                                  f"replaced helper; answers {a}")


def test_a_deferred_trigger_defers_again_past_set_constraints_all_immediate(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """with_post_check(immediate=True) sends SET CONSTRAINTS ALL IMMEDIATE before the
    check so that deferred constraint triggers fire inside the checked window. But a
    deferred trigger fired by that very SET CONSTRAINTS runs stored code, which may run
    SET CONSTRAINTS ALL DEFERRED itself and then queue another deferred trigger (an
    UPDATE of public.gy): AfterTriggerSetState fires only the events that are immediate
    now, so gy's trigger stays queued until the implicit COMMIT, after the check
    statement passed. There it waits for the requester's row and runs the helper
    replaced meanwhile.
    FIX: stored code can always defer again, so no SET CONSTRAINTS before the check
    can empty the queue. Make whatever runs after the check unable to write: once the
    check passed, the check statement itself runs SET LOCAL transaction_read_only = on
    (allowed at any point; the gateway already does this before a client COMMIT of a
    transaction that declared a WITH HOLD cursor), so a deferred trigger or holdable
    cursor query at COMMIT that writes fails and the transaction rolls back; and/or
    refuse approvals whose statement's reach has deferrable constraint triggers."""
    a = _race(kt, pg, "UPDATE public.gx SET v = 'q' WHERE id = 1",
              "SELECT id FROM public.gate WHERE id = 1 FOR UPDATE", EVIL)
    assert victim(pg) == [(1,)], ("a deferred trigger re-deferred past the gateway's SET "
                                  "CONSTRAINTS ALL IMMEDIATE ran at COMMIT, after the check, "
                                  f"with the replaced helper; answers {a}")


# ------------------------------------------------------------------ denial of service


def test_a_lock_on_a_viewed_table_exhausts_the_gateways_threads_through_masked_logins(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """(Control, checked by hand: with the lock held but no masked logins, the unmasked
    login answers at once; so the stall is the executor, not the lock itself.)
    gateway.column_origins (masked connections: run in asyncio's default executor at
    every masked login while the per-connection cache is empty, and again whenever a
    result names a table the cache has not seen: masker._refresh_catalog forgets it
    first) prints every view with pg_get_viewdef, which takes AccessShareLock on the
    tables each view reads, on a connection with NO lock_timeout / statement_timeout
    (read_catalog sets lock_timeout = 2000; this one was missed). Anyone holding an
    ACCESS EXCLUSIVE lock on a table under any view (the requester's second session:
    BEGIN; LOCK TABLE public.lk) blocks every such read forever. The default executor
    has min(32, cpu_count + 4) threads (6 on a 2-core host): a few masked logins fill it,
    and then every asyncio.to_thread of the gateway waits — token/SCRAM authentication,
    catalog reads, approvals — so an unrelated user on an unmasked connection can no
    longer log in or run SELECT 1.
    FIX: give column_origins' connection the same guards as read_catalog
    (options='-c lock_timeout=2000 -c statement_timeout=20000 -c search_path=pg_catalog'
    — it also calls pg_get_viewdef unqualified-safe but takes the role's search_path),
    read view columns from pg_depend/pg_rewrite without pg_get_viewdef, let only one
    read per connection run at a time (others wait for it, not for a thread), and run
    blocking target I/O in a bounded executor of its own, separate from authentication."""
    import threading

    # a table the gateway's cached catalog has not seen (forces a refresh)
    assert direct(pg, "CREATE TABLE IF NOT EXISTS public.fresh (x int)") == []
    stuck: list[object] = []

    def masked_login(sql: str | None) -> None:
        try:
            with psycopg.connect(kt.dsn("alice", dbname="a30m"), connect_timeout=40,
                                 autocommit=True) as c:
                if sql:
                    c.execute(sql)
                    time.sleep(30)
        except Exception as exc:  # noqa: BLE001
            stuck.append(exc)

    with psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD)) as locker:
        locker.execute("LOCK TABLE public.lk IN ACCESS EXCLUSIVE MODE")
        threads = [threading.Thread(target=masked_login,
                                    args=("SELECT * FROM public.fresh",), daemon=True)]
        for t in threads:
            t.start()
        time.sleep(2)
        for _ in range(8):
            t = threading.Thread(target=masked_login, args=(None,), daemon=True)
            t.start()
            threads.append(t)
        time.sleep(3)
        t0 = time.time()
        try:
            with psycopg.connect(kt.dsn("alice", dbname="a30"), connect_timeout=10,
                                 autocommit=True) as c:
                ok = c.execute("SELECT 1").fetchone()
            err = None
        except Exception as exc:  # noqa: BLE001
            ok, err = None, exc
        took = time.time() - t0
        locker.rollback()
    for t in threads:
        t.join(timeout=45)
    assert ok == (1,) and took < 8, (
        "an unmasked login of another connection stalled while masked logins waited "
        f"on a lock held by the requester ({took:.1f}s, {err!r})")
