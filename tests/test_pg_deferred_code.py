"""Code that runs later than the statement that set it up, and code stored with a table.

A cursor's query runs at FETCH (a WITH HOLD cursor's rest at COMMIT); deferred triggers
run at COMMIT or SET CONSTRAINTS ... IMMEDIATE; the end of a transaction brings back a
session setting that a SET LOCAL hid from the gateway's read-back. Column defaults and
CHECK constraints may call built-in functions with effects (set_config), which the
catalog's dependencies do not list. Each may change search_path, the role or a setting
the gateway relies on behind its back. These tests (from an independent attack run:
each asserts the safe behaviour) drive them through the live gateway against a real
PostgreSQL: no blocked table is read, nothing is smuggled, and pipelines that straddle
the per-turn message limit keep their order.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import B, E, P, Q, RawConn, S, errors

DB = "atk18"

POLICIES = """
  atk18_ro:
    default: block
    rules:
      - name: no-vault18
        match: {tables: ["v18.*", "k18.*"]}
        action: block
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
  atk18_w:
    default: block
    rules:
      - name: no-vault18w
        match: {tables: ["v18.*", "k18.*"]}
        action: block
      - name: w18-writes
        match: {class: write}
        action: allow
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
"""

SETUP = r"""
CREATE OR REPLACE FUNCTION public.run18(q text) RETURNS text LANGUAGE plpgsql
  AS $$BEGIN EXECUTE q; RETURN 'ok'; END$$;
CREATE TABLE public.open18 (v text);
INSERT INTO public.open18 VALUES ('public value');
CREATE SCHEMA v18;
CREATE TABLE v18.secrets (s text);
INSERT INTO v18.secrets VALUES ('top secret 18');
CREATE SCHEMA k18;
CREATE TABLE k18.secrets (s text);
INSERT INTO k18.secrets VALUES ('keeper secret 18');
CREATE TABLE public.w18 (i int);
CREATE SCHEMA m18;
CREATE TABLE public.wdef18 (i int,
  x text DEFAULT pg_catalog.set_config('search_path', 'v18, public', false));
CREATE TABLE public.wchk18 (i int,
  CHECK (pg_catalog.set_config('search_path', 'v18, public', false) <> ''));
CREATE TABLE public.wsmug18 (i int,
  CHECK (pg_catalog.set_config('standard_conforming_strings', 'off', false) <> ''
     AND pg_catalog.set_config('default_transaction_read_only', 'off', false) <> ''));
CREATE TABLE m18.people (id int, ssn text);
INSERT INTO m18.people VALUES (1, '219-09-9999');
CREATE OR REPLACE FUNCTION public.trg18() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_catalog.set_config('search_path', 'v18, public', false); RETURN NEW; END$$;
"""


def direct(pg: LocalPostgres) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD), autocommit=True)


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    pg.execute("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'k18') "
               "THEN CREATE ROLE k18 NOLOGIN; END IF; END$$; GRANT k18 TO app")
    k = keyturn_on_database(
        pg, tmp_path_factory.mktemp("kt18"), DB, policies=POLICIES,
        schema=SETUP + "ALTER SCHEMA k18 OWNER TO k18; ALTER TABLE k18.secrets OWNER TO k18; "
        "GRANT USAGE ON SCHEMA v18 TO k18; GRANT SELECT ON v18.secrets TO k18; "
        "GRANT EXECUTE ON FUNCTION run18(text) TO k18;",
        connections={
            "ur18": "policy: atk18_ro\nunknown_functions: read",
            "ro18": "policy: atk18_ro",
            "w18": "policy: atk18_w\nunknown_functions: read",
            "ws18": "policy: atk18_w",
            "m18": "policy: masked\nunknown_functions: read\n"
                   "columns:\n  m18.people.ssn: [pii.ssn]",
        })
    k.start()
    yield k
    k.stop()


def blocked(answers: list[tuple[bytes, bytes]]) -> bool:
    return any("keyturn" in e.get("M", "") for e in errors(answers))


def leaked(answers: list[tuple[bytes, bytes]]) -> bool:
    return any(t == b"D" and b"secret" in body for t, body in answers)


def safe(answers: list[tuple[bytes, bytes]]) -> None:
    assert not leaked(answers), answers


SESSION_THEN_LOCAL = ("SELECT run18('SET search_path = v18, public'), "
                      "run18('SET LOCAL search_path = public')")


def test_set_local_masks_session_path_extended(kt: Keyturn) -> None:
    """The read-back runs inside the batch's implicit transaction: a SET LOCAL hides the
    session-level value that becomes current at the Sync's commit."""
    with RawConn(kt.dsn("alice", dbname="ur18")) as r:
        a = r.run(P("", SESSION_THEN_LOCAL) + B("", "") + E("") + S())
        assert not [e for e in errors(a)], a
        safe(r.run(Q("SELECT s FROM secrets")))


def test_set_local_masks_session_path_in_transaction(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="ur18")) as r:
        a = r.run(Q("BEGIN") + Q(SESSION_THEN_LOCAL) + Q("COMMIT"), syncs=3)
        assert not errors(a), a
        safe(r.run(Q("SELECT s FROM secrets")))


def test_set_local_role_masks_session_role(kt: Keyturn) -> None:
    """Same with the role ("$user")."""
    with RawConn(kt.dsn("alice", dbname="ur18")) as r:
        a = r.run(Q("BEGIN") + Q("SELECT run18('SET ROLE k18'), run18('SET LOCAL ROLE app')")
                  + Q("COMMIT"), syncs=3)
        assert not errors(a), a
        safe(r.run(Q("SELECT s FROM secrets")))


def test_cursor_fetch_runs_code_later(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="ur18")) as r:
        a = r.run(Q("BEGIN") + Q("DECLARE c18 CURSOR FOR "
                                 "SELECT run18('SET search_path = v18, public')")
                  + Q("FETCH c18"), syncs=3)
        assert not [e for e in errors(a)], a
        safe(r.run(Q("SELECT s FROM secrets")))
        r.run(Q("ROLLBACK"))


def test_with_hold_cursor_runs_code_at_commit(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="ur18")) as r:
        a = r.run(Q("BEGIN") + Q("DECLARE h18 CURSOR WITH HOLD FOR "
                                 "SELECT run18('SET search_path = v18, public')")
                  + Q("COMMIT"), syncs=3)
        assert not errors(a), a
        safe(r.run(Q("SELECT s FROM secrets")))


def test_deferred_trigger_runs_code_at_commit(kt: Keyturn, pg: LocalPostgres) -> None:
    """An allowed write whose (deferred) constraint trigger moves search_path at COMMIT."""
    with direct(pg) as c:
        c.execute("DROP TABLE IF EXISTS public.wd18; CREATE TABLE public.wd18 (i int); "
                  "CREATE CONSTRAINT TRIGGER td18 AFTER INSERT ON public.wd18 "
                  "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION trg18()")
    with RawConn(kt.dsn("alice", dbname="w18")) as r:
        r.run(Q("SELECT 1"))
    # w18 may write public.w18 only: use a trigger there too (immediate one is covered by
    # the catalog); the deferred one is on w18 itself.
    with direct(pg) as c:
        c.execute("DROP TRIGGER IF EXISTS td18w ON public.w18; "
                  "CREATE CONSTRAINT TRIGGER td18w AFTER INSERT ON public.w18 "
                  "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION trg18()")
    import time
    time.sleep(11)  # the catalog is re-read every 10 s
    try:
        with RawConn(kt.dsn("alice", dbname="w18")) as r:
            a = r.run(Q("BEGIN") + Q("INSERT INTO w18 VALUES (1)") + Q("COMMIT"), syncs=3)
            assert not errors(a), a
            safe(r.run(Q("SELECT s FROM secrets")))
    finally:
        with direct(pg) as c:
            c.execute("DROP TRIGGER IF EXISTS td18w ON public.w18")


def test_immediate_trigger_moves_path(kt: Keyturn, pg: LocalPostgres) -> None:
    with direct(pg) as c:
        c.execute("DROP TRIGGER IF EXISTS ti18 ON public.w18; "
                  "CREATE TRIGGER ti18 AFTER INSERT ON public.w18 "
                  "FOR EACH ROW EXECUTE FUNCTION trg18()")
    import time
    time.sleep(11)
    try:
        with RawConn(kt.dsn("alice", dbname="w18")) as r:
            a = r.run(Q("INSERT INTO w18 VALUES (1)"))
            assert not errors(a), a
            safe(r.run(Q("SELECT s FROM secrets")))
    finally:
        with direct(pg) as c:
            c.execute("DROP TRIGGER IF EXISTS ti18 ON public.w18")


EVIL = r"""
CREATE OR REPLACE FUNCTION public.evil18() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_catalog.set_config('standard_conforming_strings', 'off', false);
  PERFORM pg_catalog.set_config('default_transaction_read_only', 'off', false);
  RETURN 'x';
END$$;
"""

# Read as one harmless SELECT with standard_conforming_strings on; with it off, a SELECT
# of one string and then an INSERT.
SMUGGLED = r"SELECT '\' , ' ; INSERT INTO public.w18 VALUES (6618) --'"


def test_hold_cursor_commit_flips_settings_under_pipelined_query(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """COMMIT materialises a WITH HOLD cursor (runs its user code); the gateway does not
    treat COMMIT as user code, so a Query pipelined behind it is sent at once and the
    target reads it with the settings the code left (string literals, read-only default)."""
    with direct(pg) as c:
        c.execute(EVIL)
        c.execute("DELETE FROM public.w18 WHERE i = 6618")
    import time
    time.sleep(11)
    with RawConn(kt.dsn("alice", dbname="ur18")) as r:
        a = r.run(Q("BEGIN") + Q("DECLARE e18 CURSOR WITH HOLD FOR SELECT evil18()"), syncs=2)
        assert not errors(a), a
        r.send(Q("COMMIT") + Q(SMUGGLED))
        try:
            r.until_ready(2)
        except (ConnectionError, OSError):
            pass  # the session ended (the settings changed under it)
    time.sleep(0.5)
    with direct(pg) as c:
        n = c.execute("SELECT count(*) FROM public.w18 WHERE i = 6618").fetchone()
    assert n == (0,), "the smuggled INSERT ran on the target"


def test_set_local_trick_unmasks_column(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="m18")) as r:
        plain = r.run(Q("SELECT ssn FROM m18.people"))
        assert b"219-09-9999" not in b"".join(b for t, b in plain if t == b"D"), plain
        a = r.run(Q("BEGIN") + Q("SELECT run18('SET search_path = m18, public'), "
                                 "run18('SET LOCAL search_path = public')")
                  + Q("COMMIT"), syncs=3)
        if errors(a):
            return  # user code refused on masked connections: held
        a = r.run(Q("SELECT ssn FROM people"))
        assert b"219-09-9999" not in b"".join(b for t, b in a if t == b"D"), a


@pytest.mark.parametrize("dbname", ["w18", "ws18"])
@pytest.mark.parametrize("table", ["wdef18", "wchk18"])
def test_builtin_set_config_in_default_or_check(kt: Keyturn, table: str, dbname: str) -> None:
    """A column default / CHECK calling the built-in set_config (which pg_depend does not
    list: built-ins are pinned) is read like a policy's SQL: the write that runs it
    changes search_path, so it is unknown (refused here), and the vault stays out of
    reach either way."""
    with RawConn(kt.dsn("alice", dbname=dbname)) as r:
        a = r.run(Q(f"INSERT INTO {table} (i) VALUES (1)"))
        assert blocked(a) and "runs" in errors(a)[0]["M"], a
        safe(r.run(Q("SELECT s FROM secrets")))


def test_check_constraint_smuggles_write(kt: Keyturn, pg: LocalPostgres) -> None:
    """The CHECK turns standard_conforming_strings and the read-only default off; the
    Query pipelined behind the INSERT is read by the target as a SELECT and an INSERT
    into the vault, which the policy blocks."""
    with RawConn(kt.dsn("alice", dbname="w18")) as r:
        r.send(Q("INSERT INTO wsmug18 VALUES (1)")
               + Q(r"SELECT '\' , ' ; INSERT INTO v18.secrets VALUES (''smuggled18'') --'"))
        try:
            r.until_ready(2)
        except (ConnectionError, OSError):
            pass  # the session ended (the settings changed under it)
    with direct(pg) as c:
        n = c.execute("SELECT count(*) FROM v18.secrets WHERE s = 'smuggled18'").fetchone()
    assert n == (0,), "a write to the blocked vault table ran on the target"


def test_turn_limit_user_code_straddles_turns(kt: Keyturn) -> None:
    """User code near the 1,024-message turn limit, the vault read just after it."""
    with RawConn(kt.dsn("alice", dbname="ur18")) as r:
        msgs = [Q("SELECT 1")] * 1022 + [Q("SELECT run18('SET search_path = v18, public')")] \
            + [Q("SELECT 2")] * 3 + [Q("SELECT s FROM secrets")] + [Q("SELECT 3")] * 20
        a = r.run(*msgs)
        safe(a)
        assert sum(1 for t, _ in a if t == b"Z") == len(msgs)


def test_turn_limit_extended_batches_straddle(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="ur18")) as r:
        one = P("", "SELECT 1") + B("", "") + E("") + S()
        mv = P("", "SELECT run18('SET search_path = v18, public')") + B("", "") + E("")
        rd = P("", "SELECT s FROM secrets") + B("", "") + E("")
        msgs = [one] * 255 + [mv, rd, S()] + [one] * 10
        a = r.run(*msgs, syncs=255 + 1 + 10)
        safe(a)


def _with_deferred_trigger(pg: LocalPostgres) -> None:
    with direct(pg) as c:
        c.execute("DROP TRIGGER IF EXISTS td18x ON public.w18; "
                  "CREATE CONSTRAINT TRIGGER td18x AFTER INSERT ON public.w18 "
                  "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION trg18()")
    import time
    time.sleep(11)


def _drop_deferred_trigger(pg: LocalPostgres) -> None:
    with direct(pg) as c:
        c.execute("DROP TRIGGER IF EXISTS td18x ON public.w18")


def test_deferred_trigger_in_implicit_extended_batch(kt: Keyturn, pg: LocalPostgres) -> None:
    _with_deferred_trigger(pg)
    try:
        with RawConn(kt.dsn("alice", dbname="w18")) as r:
            a = r.run(P("", "INSERT INTO w18 VALUES (1)") + B("", "") + E("") + S())
            assert not errors(a), a
            safe(r.run(Q("SELECT s FROM secrets")))
    finally:
        _drop_deferred_trigger(pg)


def test_set_constraints_immediate_fires_deferred_trigger(kt: Keyturn, pg: LocalPostgres) -> None:
    _with_deferred_trigger(pg)
    try:
        with RawConn(kt.dsn("alice", dbname="w18")) as r:
            a = r.run(Q("BEGIN") + Q("INSERT INTO w18 VALUES (1)")
                      + Q("SET CONSTRAINTS ALL IMMEDIATE"), syncs=3)
            assert not errors(a), a
            safe(r.run(Q("SELECT s FROM secrets")))
            r.run(Q("ROLLBACK"))
    finally:
        _drop_deferred_trigger(pg)
