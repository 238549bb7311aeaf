"""The gateway's own prepared statements, and the search_path a session starts with.

The read-only guard and the read-back of search_path run statements the gateway prepares
once under names of its own (keyturn_*). A client cannot use those names, but a function
can (SQL PREPARE / DEALLOCATE through EXECUTE, which the gateway does not see): after user
code ran, they are prepared again (closed first) before their next use. And a database or
role default search_path (ALTER DATABASE ... SET search_path, made outside the gateway)
is where a session's unqualified names start: the gateway reads it with the catalog.
From an independent attack run; each test asserts the safe behaviour, through the live
gateway against a real PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import Keyturn, keyturn_on_database
from tests.pg_raw import B, E, P, Q, RawConn, S, errors, leaked, vault_policy, vault_schema

POLICIES = vault_policy("a20", ["a20_vault"]) + vault_policy("a20w", ["a20_vault"], """\
      - name: w
        match: {class: [write], tables: ["public.open_data"]}
        action: allow
""")

SCHEMA = vault_schema("a20_vault") + """
CREATE TABLE IF NOT EXISTS public.a20_victim (v text);
INSERT INTO public.a20_victim VALUES ('keep me');
"""


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a20"), "atk20", schema=SCHEMA,
                            policies=POLICIES, connections={
                                "a20read": "policy: a20\nunknown_functions: read",
                                "a20plain": "policy: a20",
                                "a20w": "policy: a20w\nunknown_functions: read"})
    k.start()
    yield k
    k.stop()


@pytest.fixture(scope="module")
def ktd(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    """The database has a default search_path set by its owner outside the gateway."""
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a20d"), "atk20d",
                            schema=SCHEMA + "ALTER DATABASE atk20d "
                                            "SET search_path = a20_vault, public;",
                            policies=POLICIES, connections={"a20dplain": "policy: a20"})
    k.start()
    yield k
    k.stop()


def test_database_default_search_path_hides_vault(ktd: Keyturn) -> None:
    with RawConn(ktd.dsn("alice", dbname="a20dplain")) as r:
        answers = r.run(Q("SELECT s FROM secrets"))
        assert errors(answers) and not leaked(answers), answers


def test_database_default_search_path_extended(ktd: Keyturn) -> None:
    with psycopg.connect(ktd.dsn("alice", dbname="a20dplain"), autocommit=True) as c:
        with pytest.raises(psycopg.Error):
            c.execute("SELECT s FROM secrets WHERE %s", [True]).fetchall()


FORGE_RO = "SELECT rb_run('DEALLOCATE keyturn_ro'), rb_run('PREPARE keyturn_ro AS SELECT 1')"


def test_forged_probe_statement(kt: Keyturn) -> None:
    """User code replaces the gateway's keyturn_probe prepared statement with one that
    answers 'public', then moves search_path to the vault."""
    with RawConn(kt.dsn("alice", dbname="a20read")) as r:
        # 1. user code via Execute: the read-back parses keyturn_probe.
        a = r.run(P("", "SELECT rb_run('SELECT 1')"), B("", ""), E(""), S())
        assert not errors(a), a
        # 2. user code swaps the gateway's statement and moves the path.
        forge = ("SELECT rb_run('DEALLOCATE keyturn_probe'), "
                 "rb_run($q$PREPARE keyturn_probe AS SELECT 'public'::text, current_user$q$), "
                 "rb_run('SET search_path = a20_vault, public')")
        a = r.run(P("", forge), B("", ""), E(""), S())
        a = r.run(Q("SELECT s FROM secrets"))
        assert not leaked(a), a


def test_forged_probe_statement_in_batch(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a20read")) as r:
        a = r.run(P("", "SELECT rb_run('SELECT 1')"), B("", ""), E(""),
                  P("", "SELECT v FROM open_data"), B("", ""), E(""), S())
        forge = ("SELECT rb_run('DEALLOCATE keyturn_probe'), "
                 "rb_run($q$PREPARE keyturn_probe AS SELECT 'public'::text, current_user$q$), "
                 "rb_run('SET search_path = a20_vault, public')")
        a = r.run(P("", forge), B("", ""), E(""),
                  P("", "SELECT s FROM secrets"), B("", ""), E(""), S())
        assert not leaked(a), a
        a = r.run(Q("SELECT s FROM secrets"))
        assert not leaked(a), a


def victim_rows(pg) -> int:
    from tests.conftest import APP_PASSWORD
    with psycopg.connect(pg.dsn("atk20", user="app", password=APP_PASSWORD)) as c:
        return c.execute("SELECT count(*) FROM public.a20_victim").fetchone()[0]


def test_forged_readonly_savepoint_guard(kt: Keyturn, pg: LocalPostgres) -> None:
    """User code replaces the guard's keyturn_ro (SET LOCAL transaction_read_only = on)
    with a no-op: a 'read' inside a write transaction then writes."""
    assert victim_rows(pg) == 1
    with RawConn(kt.dsn("alice", dbname="a20w")) as r:
        r.run(Q("BEGIN"), Q("INSERT INTO public.open_data VALUES ('x')"),
              Q("SELECT v FROM open_data"), Q("COMMIT"))
        r.run(Q(FORGE_RO))
        r.run(Q("BEGIN"), Q("INSERT INTO public.open_data VALUES ('y')"),
              Q("SELECT rb_run('DELETE FROM public.a20_victim')"), Q("COMMIT"))
    assert victim_rows(pg) == 1


def test_forged_readonly_savepoint_guard_extended(kt: Keyturn, pg: LocalPostgres) -> None:
    assert victim_rows(pg) == 1
    with RawConn(kt.dsn("alice", dbname="a20w")) as r:
        a = r.run(Q("BEGIN"), Q("INSERT INTO public.open_data VALUES ('x')"))
        a = r.run(P("", "SELECT v FROM open_data"), B("", ""), E(""), S())
        a += r.run(Q("COMMIT"))
        r.run(Q(FORGE_RO))
        a = r.run(Q("BEGIN"), Q("INSERT INTO public.open_data VALUES ('y')"))
        a += r.run(P("", "SELECT rb_run('DELETE FROM public.a20_victim')"), B("", ""), E(""), S())
        a += r.run(Q("COMMIT"))
    assert victim_rows(pg) == 1


def test_suspended_portal_runs_more_user_code(kt: Keyturn) -> None:
    """Execute with a row limit: the first partial Execute runs user code that does nothing;
    the read-back happens; the second partial Execute moves search_path; then a read."""
    q = ("SELECT rb_run(CASE WHEN g = 2 THEN 'SET search_path = a20_vault, public' "
         "ELSE 'SELECT 1' END) FROM generate_series(1, 3) g")
    with RawConn(kt.dsn("alice", dbname="a20read")) as r:
        a = r.run(Q("BEGIN"))
        a = r.run(P("", q), B("p1", ""), E("p1", 1), S())
        a = r.run(P("", "SELECT v FROM open_data"), B("", ""), E(""), S())
        a = r.run(E("p1", 1), S())
        a = r.run(P("", "SELECT s FROM secrets"), B("", ""), E(""), S())
        assert not leaked(a), a
        a = r.run(Q("SELECT s FROM secrets"))
        assert not leaked(a), a
