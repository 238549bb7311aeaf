"""Attack run 31: the check at the client's own COMMIT of a transaction that ran approved
statements (session.py _commit_at, _forward_query; holding.py _arm_commit_check,
_post_check(at_commit=True)), the check after an approved statement ran, and the code
digest (gateway.py USER_CODE_SQL), through the live gateway. Each test asserts the safe
behaviour and checks the target directly; each FAILS while its bypass exists.

The requester's second session runs directly on the target as the same role (app), as
in tests/test_pg_attack29.py / test_pg_attack30.py.

Findings (each test FAILS while the bypass exists):

- COMMIT unchecked (savepoints): _commit_at skips the check when the session is in an
  aborted transaction ('E'), but "ROLLBACK TO SAVEPOINT s; COMMIT" in one Query revives
  and commits it; and the CommitCheck is consumed by the first COMMIT Query that carries
  it, even when that COMMIT did not end the transaction (its check failed inside a
  savepoint, or it was skipped after an error in a pipelined Query): ROLLBACK TO
  SAVEPOINT re-queues the deferred triggers and the next COMMIT goes unchecked.
- change and change back: rows of the digest other than pg_proc / pg_trigger /
  pg_rewrite are hashed without their row version, so a schema swap made while a
  deferred trigger runs (at the checked COMMIT) and undone before the gateway compares
  passes the check.
- names not in the code digest: schema ACLs (REVOKE USAGE changes which schema an
  unqualified name resolves to), composite-type attributes (relkind 'c' not in the 'A'
  rows), enum labels (pg_enum).
- output of changed code delivered before the check: the NOTICE / ERROR text raised by
  code replaced after approval (here: by a deferred trigger at the checked COMMIT)
  reaches the client, although the transaction is then rolled back.

Status: closed but the last (xfail, documented) — a COMMIT check, once sent, stays owed
until the transaction ends: another COMMIT in it (after ROLLBACK TO SAVEPOINT revived it)
is refused, and an aborted transaction skips the check only for a Query that starts with
COMMIT or ROLLBACK; every digest row is hashed with its row version; schema ACLs,
composite-type attributes, sequences and enum labels are in the digest.

Held (pass): domain defaults reached through a view, a domain over the domain, a
partitioned table and its partition, INSERT ... SELECT, DEFAULT VALUES, UPDATE SET =
DEFAULT and MERGE are seen as user code. (Also tried and held, no test kept: an
approved Parse/Bind/Execute of a statement with a deferred constraint trigger, in and
outside a client transaction: refused before it is sent, so no COMMIT check is owed.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import (
    Q,
    RawConn,
    direct_on,
    errors,
    read_until,
    vault_policy,
    vault_schema,
)

DB = "atk31"
V = "a31_vault"

POLICIES = vault_policy("a31", [V], """\
      - name: w
        match: {class: [write], tables: ["public.*"]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
      - name: d
        match: {class: [ddl, procedural]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
""") + vault_policy("a31w", [V], """\
      - name: w
        match: {class: [write], tables: ["public.dtab", "public.dview", "public.dtab2",
                                          "public.dpart", "public.dchild"]}
        action: allow
""")

SCHEMA = vault_schema(V) + f"""
CREATE TABLE {V}.victim (v text);
INSERT INTO {V}.victim VALUES ('keep me');
CREATE TABLE public.gate (id int PRIMARY KEY);
INSERT INTO public.gate VALUES (1);
CREATE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS
  $$BEGIN EXECUTE 'SELECT 1'; END$$;
-- a deferred constraint trigger calling the helper
CREATE FUNCTION public.d_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM public.helper(); RETURN NULL; END$$;
CREATE TABLE public.dbox (id int PRIMARY KEY, v text);
INSERT INTO public.dbox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE CONSTRAINT TRIGGER dt AFTER UPDATE ON public.dbox DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION public.d_fn();
-- a deferred constraint trigger that first waits for a row of public.gate
CREATE FUNCTION public.w_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM 1 FROM public.gate WHERE id = 1 FOR UPDATE; PERFORM public.helper();
  RETURN NULL; END$$;
CREATE TABLE public.wbox (id int PRIMARY KEY, v text);
INSERT INTO public.wbox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE CONSTRAINT TRIGGER wt AFTER UPDATE ON public.wbox DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION public.w_fn();
-- two schemas with a helper each; a trigger resolving helper() through its own path
CREATE SCHEMA a31g;
CREATE FUNCTION a31g.helper() RETURNS void LANGUAGE plpgsql AS
  $$BEGIN EXECUTE 'SELECT 1'; END$$;
CREATE SCHEMA a31e;
CREATE FUNCTION a31e.helper() RETURNS void LANGUAGE plpgsql AS
  $$BEGIN EXECUTE 'DELETE FROM ' || 'a31_' || 'vault.victim'; END$$;
CREATE FUNCTION public.u_fn() RETURNS trigger LANGUAGE plpgsql
  SET search_path = a31g, a31e AS
  $$BEGIN PERFORM helper(); RETURN NEW; END$$;
CREATE TABLE public.ubox (id int PRIMARY KEY, v text);
INSERT INTO public.ubox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE TRIGGER u BEFORE UPDATE ON public.ubox FOR EACH ROW EXECUTE FUNCTION public.u_fn();
-- a composite type a function returns positionally; a trigger reads it by field name
CREATE TYPE public.a31t AS (pending bool, is_admin bool);
CREATE FUNCTION public.flags() RETURNS public.a31t LANGUAGE sql AS $$ SELECT true, false $$;
CREATE TABLE public.acct (id int PRIMARY KEY, pending bool NOT NULL DEFAULT false,
                          is_admin bool NOT NULL DEFAULT false);
INSERT INTO public.acct VALUES (1, false, false);
CREATE FUNCTION public.c_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN UPDATE public.acct SET pending = (public.flags()).pending,
  is_admin = (public.flags()).is_admin WHERE id = 1; RETURN NEW; END$$;
CREATE TABLE public.cbox (id int PRIMARY KEY, v text);
INSERT INTO public.cbox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE TRIGGER c BEFORE UPDATE ON public.cbox FOR EACH ROW EXECUTE FUNCTION public.c_fn();
-- a deferred trigger that waits for row 1 of public.gate, calls a31s.helper() (by schema
-- name), then waits for row 2
INSERT INTO public.gate VALUES (2);
CREATE SCHEMA a31s;
CREATE FUNCTION a31s.helper() RETURNS void LANGUAGE plpgsql AS
  $$BEGIN EXECUTE 'SELECT 1'; END$$;
CREATE SCHEMA a31t;
CREATE FUNCTION a31t.helper() RETURNS void LANGUAGE plpgsql AS
  $$BEGIN EXECUTE 'DELETE FROM ' || 'a31_' || 'vault.victim'; END$$;
CREATE FUNCTION public.z_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM 1 FROM public.gate WHERE id = 1 FOR UPDATE; PERFORM a31s.helper();
  PERFORM 1 FROM public.gate WHERE id = 2 FOR UPDATE; RETURN NULL; END$$;
CREATE TABLE public.zbox (id int PRIMARY KEY, v text);
INSERT INTO public.zbox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE CONSTRAINT TRIGGER zt AFTER UPDATE ON public.zbox DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION public.z_fn();
-- an enum whose labels stored code names
CREATE TYPE public.a31role AS ENUM ('member', 'admin');
CREATE TABLE public.acct2 (id int PRIMARY KEY, role public.a31role NOT NULL);
INSERT INTO public.acct2 VALUES (1, 'admin'), (2, 'admin');
CREATE FUNCTION public.e_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN UPDATE public.acct2 SET role = 'member' WHERE id = 2; RETURN NEW; END$$;
CREATE TABLE public.ebox (id int PRIMARY KEY, v text);
INSERT INTO public.ebox SELECT g, 'a' FROM generate_series(1, 20) g;
CREATE TRIGGER e BEFORE UPDATE ON public.ebox FOR EACH ROW EXECUTE FUNCTION public.e_fn();
-- domain defaults calling user code, reached in other ways
CREATE FUNCTION public.dflt() RETURNS text LANGUAGE plpgsql VOLATILE AS
  $$BEGIN EXECUTE 'DELETE FROM ' || 'a31_' || 'vault.victim'; RETURN 'x'; END$$;
CREATE DOMAIN public.a31dom AS text DEFAULT public.dflt();
CREATE DOMAIN public.a31dom2 AS public.a31dom;
CREATE TABLE public.dtab (id int, v public.a31dom);
CREATE VIEW public.dview AS SELECT id, v FROM public.dtab;
CREATE TABLE public.dtab2 (id int, v public.a31dom2);
CREATE TABLE public.dpart (id int, v public.a31dom) PARTITION BY RANGE (id);
CREATE TABLE public.dchild PARTITION OF public.dpart FOR VALUES FROM (0) TO (100);
"""

EVIL = ("CREATE OR REPLACE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS "
        "$$BEGIN EXECUTE 'DELETE FROM ' || 'a31_' || 'vault.victim'; END$$")
GOOD = ("CREATE OR REPLACE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS "
        "$$BEGIN EXECUTE 'SELECT 1'; END$$")


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a31"), DB, schema=SCHEMA,
                            policies=POLICIES, connections={"a31": "policy: a31",
                                                            "a31w": "policy: a31w"})
    k.start()
    yield k
    k.stop()


def direct(pg: LocalPostgres, sql: str) -> list[tuple] | str:
    return direct_on(pg.dsn(DB, user="app", password=APP_PASSWORD), sql)


def victim(pg: LocalPostgres) -> list[tuple] | str:
    return direct(pg, f"SELECT count(*) FROM {V}.victim")


ATTRSWAP = ("ALTER TYPE public.a31t RENAME ATTRIBUTE pending TO tmp; "
            "ALTER TYPE public.a31t RENAME ATTRIBUTE is_admin TO pending; "
            "ALTER TYPE public.a31t RENAME ATTRIBUTE tmp TO is_admin")


def _attrs_in_order(pg: LocalPostgres) -> None:
    first = direct(pg, "SELECT attname FROM pg_attribute WHERE attrelid = "
                       "'public.a31t'::regclass AND attnum = 1")
    if first == [("is_admin",)]:
        direct(pg, ATTRSWAP)


LABELSWAP = ("ALTER TYPE public.a31role RENAME VALUE 'member' TO 'tmp'; "
             "ALTER TYPE public.a31role RENAME VALUE 'admin' TO 'member'; "
             "ALTER TYPE public.a31role RENAME VALUE 'tmp' TO 'admin'")


def _labels_in_order(pg: LocalPostgres) -> None:
    first = direct(pg, "SELECT enumlabel FROM pg_enum WHERE enumtypid = "
                       "'public.a31role'::regtype ORDER BY enumsortorder LIMIT 1")
    if first == [("admin",)]:
        direct(pg, LABELSWAP)


SWAP = ("ALTER SCHEMA a31s RENAME TO a31z; ALTER SCHEMA a31t RENAME TO a31s; "
        "ALTER SCHEMA a31z RENAME TO a31t")


def _schemas_in_order(pg: LocalPostgres) -> None:
    bad = direct(pg, "SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                     "WHERE n.nspname = 'a31s' AND p.prosrc LIKE '%DELETE%'")
    if bad:
        direct(pg, SWAP)


def _reset(pg: LocalPostgres, kt: Keyturn) -> None:
    direct(pg, GOOD)
    direct(pg, "GRANT USAGE ON SCHEMA a31g TO app")
    direct(pg, f"DELETE FROM {V}.victim; INSERT INTO {V}.victim VALUES ('keep me')")
    _attrs_in_order(pg)
    _labels_in_order(pg)
    _schemas_in_order(pg)
    direct(pg, "UPDATE public.acct2 SET role = 'admin'")
    direct(pg, "UPDATE public.acct SET pending = false, is_admin = false")
    for t in ("dbox", "wbox", "ubox", "cbox", "ebox", "zbox"):
        direct(pg, f"UPDATE public.{t} SET v = 'a'")
    kt.skip_pending()
    time.sleep(0.5)


@pytest.fixture(autouse=True)
def _clean(pg: LocalPostgres, kt: Keyturn) -> Iterator[None]:
    _reset(pg, kt)
    yield
    direct(pg, GOOD)
    direct(pg, "GRANT USAGE ON SCHEMA a31g TO app")


def _approved(kt: Keyturn, r: RawConn, *messages: bytes) -> list[tuple[bytes, bytes]]:
    r.send(*messages)
    try:
        ticket = kt.wait_ticket(timeout=8)
    except TimeoutError:
        raise AssertionError(f"not held: {r.until_ready()}") from None
    kt.cli("approve", str(ticket["id"]), token_of="bob")
    return r.until_ready()


# ------------------------------------------------------------------ COMMIT unchecked


def test_rollback_to_savepoint_and_commit_in_one_query_after_an_error_skips_the_commit_check(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """session._commit_at returns -1 ("its COMMIT only rolls back") whenever the session's
    last ReadyForQuery said 'E' and nothing is in flight. But a Query that starts with
    ROLLBACK TO SAVEPOINT leaves the aborted state first and then COMMITs for real: the
    transaction is alive again, with every approved statement from before the savepoint
    and their queued deferred triggers. BEGIN; approved UPDATE of public.dbox (deferred
    trigger calls public.helper()); SAVEPOINT s; SELECT 1/0 (aborted); the requester
    replaces the helper on the side; then "ROLLBACK TO SAVEPOINT s; COMMIT" is forwarded
    as it is: no SET CONSTRAINTS ALL IMMEDIATE, no digest comparison, and the deferred
    trigger runs the replaced helper at COMMIT, which empties the vault.
    FIX: in _commit_at, the 'E' shortcut must only apply when the Query has no ROLLBACK
    TO SAVEPOINT before its COMMIT (scan the statements: a COMMIT after a ROLLBACK TO in
    the same Query owes the check; simplest: drop the shortcut and always insert the
    check before the first COMMIT/END/PREPARE TRANSACTION, which in a still-aborted
    transaction just fails harmlessly); and the same for a COMMIT after ROLLBACK TO in
    any Query sent while the state is 'E'."""
    with RawConn(kt.dsn("alice", dbname="a31")) as r:
        assert not errors(r.run(Q("BEGIN")))
        a = _approved(kt, r, Q("UPDATE public.dbox SET v = 'x' WHERE id = 1"))
        assert not errors(a), a
        assert not errors(r.run(Q("SAVEPOINT s")))
        e = r.run(Q("SELECT 1/0"))
        assert errors(e), e
        assert direct(pg, EVIL) == []
        c = r.run(Q("ROLLBACK TO SAVEPOINT s; COMMIT"))
    assert victim(pg) == [(1,)], ("the COMMIT after ROLLBACK TO in an aborted transaction "
                                  f"ran the deferred trigger unchecked; answers {c}")


def test_a_failed_commit_check_in_a_savepoint_is_undone_by_rollback_to_then_commit_is_unchecked(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """session._forward_query hands the CommitCheck to the COMMIT's Query at once
    (`self.commit_check = None  # the check below owns its lock now`) and nothing arms it
    again when that check fails. But the COMMIT's SET CONSTRAINTS ALL IMMEDIATE and the
    failed check ran inside the client's open savepoint: ROLLBACK TO SAVEPOINT undoes
    both (AfterTriggerEndSubXact un-marks the deferred events fired in the aborted
    subtransaction, so they are queued again; the constraint mode and the check's
    read-only setting are restored), the transaction is usable again, and the next
    COMMIT has no CommitCheck: it is forwarded as it is and the approved UPDATE's
    deferred trigger runs the replaced helper. (Sequence: BEGIN; approved UPDATE of
    public.dbox; SAVEPOINT s; helper replaced elsewhere; COMMIT -> 55000 "not
    committed"; ROLLBACK TO SAVEPOINT s; COMMIT -> COMMIT, vault emptied.)
    FIX: when the check at COMMIT fails (or the COMMIT Query fails before it completes),
    keep the transaction owing the check (re-arm a CommitCheck with a new lock, or
    simpler: refuse every statement but ROLLBACK in that transaction, i.e. mark it
    doomed until the client's ROLLBACK ends it); likewise when the 'E' state is left
    by ROLLBACK TO."""
    with RawConn(kt.dsn("alice", dbname="a31")) as r:
        assert not errors(r.run(Q("BEGIN")))
        a = _approved(kt, r, Q("UPDATE public.dbox SET v = 'x' WHERE id = 3"))
        assert not errors(a), a
        assert not errors(r.run(Q("SAVEPOINT s")))
        assert direct(pg, EVIL) == []
        c1 = r.run(Q("COMMIT"))
        assert [e["C"] for e in errors(c1)] == ["55000"], c1
        c2 = r.run(Q("ROLLBACK TO SAVEPOINT s"))
        c3 = r.run(Q("COMMIT"))
    assert victim(pg) == [(1,)], ("after the failed COMMIT check, ROLLBACK TO and COMMIT "
                                  f"ran the deferred trigger unchecked; answers {c2} {c3}")


def test_a_commit_pipelined_behind_a_failing_statement_consumes_the_commit_check(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """Variant of the test above that needs no code change before the consumed check:
    "SELECT 1/0" and "COMMIT" sent together (pipelined) while the transaction holds an
    approved statement. The gateway sees the COMMIT with an answer still expected, so
    _commit_at inserts SET CONSTRAINTS ALL IMMEDIATE and the check before it and drops
    the CommitCheck (`self.commit_check = None`); on the target the aborted transaction
    skips all three (COMMIT too: statements after an error in a Query are not run), so
    the transaction is still open, aborted, inside savepoint s, and owes nothing any
    more. The helper is replaced afterwards, at leisure; ROLLBACK TO SAVEPOINT s; COMMIT
    runs the approved UPDATE's deferred trigger unchecked.
    FIX: as above: a COMMIT Query that did not end the transaction (its check did not
    pass, or never ran) must leave the CommitCheck armed (or the transaction doomed)."""
    with RawConn(kt.dsn("alice", dbname="a31")) as r:
        assert not errors(r.run(Q("BEGIN")))
        a = _approved(kt, r, Q("UPDATE public.dbox SET v = 'x' WHERE id = 5"))
        assert not errors(a), a
        assert not errors(r.run(Q("SAVEPOINT s")))
        c1 = r.run(Q("SELECT 1/0") + Q("COMMIT"), syncs=2)
        assert errors(c1), c1
        time.sleep(1)
        assert direct(pg, EVIL) == []
        c2 = r.run(Q("ROLLBACK TO SAVEPOINT s"))
        c3 = r.run(Q("COMMIT"))
    assert victim(pg) == [(1,)], ("a pipelined COMMIT behind an error consumed the check; "
                                  f"ROLLBACK TO and COMMIT ran the deferred trigger "
                                  f"unchecked; answers {c1} {c2} {c3}")


def test_a_name_changed_and_changed_back_while_deferred_code_runs_passes_the_commit_check(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """The digest counts functions, triggers and rules with their row version (xmin),
    so "replaced and put back" is seen; but the rows added for names (pg_namespace 'N',
    pg_attribute 'A'), and pg_class, pg_type, pg_policy, pg_operator, pg_cast,
    pg_index, pg_db_role_setting rows are hashed by content only. A change that is made
    and undone while stored code runs leaves the same digest. Here: BEGIN; approved
    UPDATE of public.zbox, whose deferred trigger waits for row 1 of public.gate, calls
    a31s.helper() (by schema name), then waits for row 2. At the client's COMMIT the
    gateway fires it (SET CONSTRAINTS ALL IMMEDIATE); the requester swaps the names of
    schemas a31s and a31t (committed), releases row 1 (the trigger runs a31t's helper,
    which empties the vault), swaps the names back, releases row 2: the check reads the
    same digest as at approval and the COMMIT goes through.
    FIX: hash the row version (xmin) of every row in USER_CODE_SQL, not only of
    pg_proc / pg_trigger / pg_rewrite (pg_namespace, pg_class, pg_attribute, pg_type,
    pg_policy, pg_operator, pg_cast, pg_aggregate, pg_index, pg_attrdef, pg_constraint,
    pg_enum, pg_db_role_setting), so a change undone again still counts."""
    with RawConn(kt.dsn("alice", dbname="a31")) as r:
        assert not errors(r.run(Q("BEGIN")))
        a = _approved(kt, r, Q("UPDATE public.zbox SET v = 'x' WHERE id = 1"))
        assert not errors(a), a
        dsn = pg.dsn(DB, user="app", password=APP_PASSWORD)
        with psycopg.connect(dsn) as o1, psycopg.connect(dsn) as o2:
            o1.execute("SELECT id FROM public.gate WHERE id = 1 FOR UPDATE")
            o2.execute("SELECT id FROM public.gate WHERE id = 2 FOR UPDATE")
            r.send(Q("COMMIT"))
            time.sleep(2)  # the deferred trigger waits for row 1
            assert direct(pg, SWAP) == []
            o1.commit()  # it runs a31s.helper(): a31t's, now
            time.sleep(2)  # it waits for row 2
            assert direct(pg, SWAP) == []  # names back as approved
            o2.commit()
        c = r.until_ready()
    assert victim(pg) == [(1,)], ("schemas swapped and swapped back while the deferred "
                                  f"trigger ran passed the COMMIT check; answers {c}")


# ------------------------------------------------------------------ digest


def test_schema_usage_revoked_while_held_changes_which_helper_runs(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """USER_CODE_SQL hashes pg_namespace as (nspname, nspowner) only, not nspacl. Name
    lookup through search_path skips schemas the role has no USAGE on
    (namespace.c recomputeNamespacePath), and an owner may revoke its own USAGE. The
    approved UPDATE's trigger calls helper() with SET search_path = a31g, a31e: while it
    is held, the requester runs REVOKE USAGE ON SCHEMA a31g FROM app; the digest and the
    statement's shape are the same, the release re-check passes, and helper() now
    resolves to a31e.helper, which empties the vault.
    FIX: hash n.nspacl (and, for the same reason, pg_proc.proacl and the role's
    memberships: pg_auth_members), or the xmin of every pg_namespace row, in
    USER_CODE_SQL."""
    with RawConn(kt.dsn("alice", dbname="a31")) as r:
        r.send(Q("UPDATE public.ubox SET v = 'q' WHERE id = 3"))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        assert direct(pg, "REVOKE USAGE ON SCHEMA a31g FROM app") == []
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    assert victim(pg) == [(1,)], ("revoking USAGE on a schema while held changed which "
                                  f"helper the trigger runs; answers {a}")


def test_composite_type_attribute_rename_while_held_is_not_in_the_digest(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """USER_CODE_SQL's column rows ('A') keep only relations of relkind r, p, v, m, f,
    and its relation rows ('x') the same kinds: the attributes of a composite TYPE
    (pg_class relkind 'c', pg_attribute rows of its typrelid) are in neither, and ALTER
    TYPE ... RENAME ATTRIBUTE changes no pg_type row. Stored code reads composite values
    by field name and builds them by position (a SQL function `SELECT true, false`
    returning public.a31t): while the approved UPDATE of public.cbox is held, the
    requester swaps the names of a31t's attributes pending and is_admin; the release
    re-check sees the same digest and shape, and the trigger now sets public.acct.is_admin
    (privilege escalation in the application's own data) where approvers were shown it
    setting the harmless pending flag.
    FIX: in the 'A' rows keep every relkind (at least 'c'; also 'S' in 'x': a sequence
    renamed changes what nextval('name') reaches), or hash pg_type's typrelid attributes
    with the type."""
    with RawConn(kt.dsn("alice", dbname="a31")) as r:
        r.send(Q("UPDATE public.cbox SET v = 'q' WHERE id = 4"))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        assert direct(pg, ATTRSWAP) == []
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    flags = direct(pg, "SELECT pending, is_admin FROM public.acct WHERE id = 1")
    assert flags != [(False, True)], ("the attribute swap while held made the trigger set "
                                      f"is_admin; answers {a}")
    assert [e["C"] for e in errors(a)] == ["55000"], (flags, a)


@pytest.mark.parametrize("sql", [
    "INSERT INTO public.dview (id) VALUES (1)",
    "INSERT INTO public.dtab2 (id) VALUES (1)",
    "INSERT INTO public.dpart (id) VALUES (1)",
    "INSERT INTO public.dchild (id) VALUES (1)",
    "INSERT INTO public.dtab (id) SELECT 1",
    "INSERT INTO public.dtab DEFAULT VALUES",
    "UPDATE public.dtab SET v = DEFAULT",
    "MERGE INTO public.dtab t USING (SELECT 1 AS id) s ON false "
    "WHEN NOT MATCHED THEN INSERT (id) VALUES (s.id)",
], ids=["view", "domain-over-domain", "partitioned", "partition", "insert-select",
        "default-values", "update-default", "merge"])
def test_domain_default_reached_other_ways_is_user_code(
        kt: Keyturn, pg: LocalPostgres, sql: str) -> None:
    """A domain DEFAULT calling user code (public.dflt empties the vault) reached through
    an auto-updatable view, a domain over the domain, a partitioned table and its
    partition, INSERT ... SELECT, DEFAULT VALUES, UPDATE SET = DEFAULT, MERGE: each must
    be seen as user code, not run as a plain allowed write of public.*. (Held: passes.)
    FIX: catalog.py _TYPE_CODE 'its default' for every such path."""
    direct(pg, "INSERT INTO public.dtab VALUES (0, 'y')") if "UPDATE" in sql else None
    with RawConn(kt.dsn("alice", dbname="a31w")) as r:
        a = r.run(Q(sql))
    direct(pg, "TRUNCATE public.dtab, public.dtab2, public.dpart")
    assert victim(pg) == [(1,)], f"{sql} ran the domain default's function; answers {a}"


def test_enum_label_rename_while_held_is_not_in_the_digest(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """pg_enum is not in USER_CODE_SQL, and ALTER TYPE ... RENAME VALUE changes no
    pg_type row. Stored code names enum values by label: the approved UPDATE of
    public.ebox has a trigger that demotes account 2 (role = 'member'). While it is held
    the requester swaps the labels 'member' and 'admin' (three RENAME VALUEs); the
    release re-check sees the same digest and shape, and the trigger's 'member' now
    resolves to the value that was 'admin' (every admin row is still that value, and so
    is account 2: the demotion approvers were shown became a no-op; written the other
    way, a promotion).
    FIX: hash pg_enum (enumtypid, enumsortorder, enumlabel) of user types in
    USER_CODE_SQL."""
    with RawConn(kt.dsn("alice", dbname="a31")) as r:
        r.send(Q("UPDATE public.ebox SET v = 'q' WHERE id = 5"))
        read_until(r, b"N")
        ticket = kt.wait_ticket()
        assert direct(pg, LABELSWAP) == []
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    # the value account 2 holds: sort order 1 is the value that was 'member' at approval
    order = direct(pg, "SELECT e.enumsortorder FROM public.acct2 a JOIN pg_enum e ON "
                       "e.enumtypid = 'public.a31role'::regtype AND "
                       "e.enumlabel = a.role::text WHERE a.id = 2")
    assert order == [(1.0,)] or [e["C"] for e in errors(a)] == ["55000"], (
        f"the label swap while held changed what the trigger wrote ({order}); answers {a}")


LEAKY = {
    "notice": ("CREATE OR REPLACE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS "
               "$$BEGIN RAISE NOTICE '%', (SELECT string_agg(s, ',') FROM a31_" +
               "vault.secrets); END$$"),
    "error": ("CREATE OR REPLACE FUNCTION public.helper() RETURNS void LANGUAGE plpgsql AS "
              "$$BEGIN RAISE EXCEPTION '%', (SELECT string_agg(s, ',') FROM a31_" +
              "vault.secrets); END$$"),
}


@pytest.mark.xfail(strict=True, reason=(
    "known limit (docs/postgres-gateway.md, 'Checked again after it ran'): what an approved "
    "statement's code says while it runs (NOTICE, an error, result rows) reaches the client "
    "before the check after it ran; the check rolls back what it did, not what it said"))
@pytest.mark.parametrize("how", ["notice", "error"])
def test_code_replaced_while_the_approved_statement_waits_leaks_the_vault_before_the_check(
        kt: Keyturn, pg: LocalPostgres, how: str) -> None:
    """The check after an approved statement ran can roll back writes, not reads: the
    statement runs whatever code was committed while it waited, and that code's NOTICE
    or ERROR message reaches the client before (or instead of) the check. The approved
    UPDATE of public.dbox queues a deferred trigger; at the client's COMMIT it runs
    first (SET CONSTRAINTS ALL IMMEDIATE comes before the check), after the helper was
    replaced (committed by another transaction at any time after approval) with one that
    raises the vault's secret (a table the policy blocks outright for this client). The
    transaction is rolled back, but the secret was delivered in the NOTICE / ERROR.
    (Same for the approved statement's own code when the change lands while it waits:
    the check after it ran comes after its messages.) Caveat: in these tests the change
    is made by a session of the same role, which could read the vault itself; the point
    is that code changed after approval runs unapproved and its output is delivered.
    FIX: while an approved statement (or a COMMIT owing a check) runs, hold back its
    NoticeResponses and the text of an ErrorResponse until the check passed (on a failed
    check, send only the gateway's 55000 error), or run the check's comparison before
    the deferred triggers (digest first, then SET CONSTRAINTS, then the lock wait)."""
    with RawConn(kt.dsn("alice", dbname="a31")) as r:
        assert not errors(r.run(Q("BEGIN")))
        a = _approved(kt, r, Q("UPDATE public.dbox SET v = 'x' WHERE id = 4"))
        assert not errors(a), a
        assert direct(pg, LEAKY[how]) == []
        c = r.run(Q("COMMIT"))
        r.run(Q("ROLLBACK"))
    assert not any(b"top secret" in body for _, body in c), (
        f"the vault's secret reached the client from code replaced after approval: {c}")
