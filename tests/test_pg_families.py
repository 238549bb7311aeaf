"""Adversarial tests, family by family, through the live gateway with psql and psycopg
(simple and extended protocol), on a connection whose policy *allows by default*: every
family must still end blocked, never run. A direct connection checks that nothing
changed (rows, locks held by other sessions, settings).

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import Keyturn, direct_shop, make_keyturn
from tests.pg_raw import B, E, P, Q, RawConn, S, errors

LENIENT = """
  lenient:
    default: allow
    rules:
      - name: vault-is-off-limits
        match: {tables: ["vault.*"]}
        action: block
      - name: no-locks
        match: {class: lock}
        action: block
        reason: locks block other sessions' work
      - name: no-weakened-guards
        match: {class: safety}
        action: block
      - name: no-changes
        match: {class: [write, ddl, privilege, procedural, admin, file]}
        action: block
"""
LONG = "secret_" + "x" * 60  # 67 characters: the server keeps the first 63


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    kt = make_keyturn(tmp_path_factory.mktemp("families"), pg, extra=LENIENT,
                      shop_policy="lenient")
    with direct(pg) as c:
        c.execute("CREATE SCHEMA IF NOT EXISTS vault")
        c.execute(f'CREATE TABLE IF NOT EXISTS vault."{LONG[:63]}" (v text)')
        c.execute(f"""INSERT INTO vault."{LONG[:63]}" SELECT 'top secret'
                      WHERE NOT EXISTS (SELECT FROM vault."{LONG[:63]}")""")
        c.execute("DROP TABLE IF EXISTS fam_rows")
        c.execute("CREATE TABLE fam_rows (id int PRIMARY KEY)")
        c.execute("INSERT INTO fam_rows SELECT generate_series(1, 10)")
    kt.start()
    yield kt
    kt.stop()


direct = direct_shop


def psql(kt: Keyturn, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["psql", kt.dsn("alice"), "-X", "-At", "-v", "ON_ERROR_STOP=1",
                           "-c", sql], capture_output=True, text=True, timeout=60)


def assert_blocked_everywhere(kt: Keyturn, sql: str, params: tuple = (), *,
                              read_only_first: bool = False) -> None:
    """Blocked through psql (simple protocol) and psycopg (extended, with parameters
    when given), inside and outside a transaction. ``read_only_first``: outside a
    transaction the target's read-only guard may refuse it already at Bind (a FOR
    UPDATE is checked when its portal starts), before the gateway's refusal."""
    res = psql(kt, sql)
    assert res.returncode != 0 and "keyturn: blocked" in res.stderr, (sql, res.stderr)
    for autocommit in (True, False):
        with psycopg.connect(kt.dsn("alice"), autocommit=autocommit) as c:
            errors: tuple[type[Exception], ...] = (psycopg.errors.InsufficientPrivilege,)
            if read_only_first and autocommit:
                errors += (psycopg.errors.ReadOnlySqlTransaction,)
            with pytest.raises(errors) as err:
                c.execute(sql.replace("$1", "%s"), params or None)  # type: ignore[arg-type]
            assert "keyturn" in str(err.value) or "read-only transaction" in str(err.value)


@pytest.fixture()
def unchanged(pg: LocalPostgres) -> Iterator[None]:
    yield
    with direct(pg) as c:
        assert c.execute("SELECT count(*) FROM fam_rows").fetchone() == (10,)
        locks = c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                          "OR (relation = 'fam_rows'::regclass AND granted "
                          "AND mode <> 'AccessShareLock')").fetchone()
        assert locks == (0,), "a lock was taken"


# ---------------------------------------------------------------- locks

@pytest.mark.parametrize("sql", [
    "SELECT * FROM fam_rows FOR UPDATE",
    "SELECT * FROM fam_rows WHERE id = 1 FOR NO KEY UPDATE",
    "SELECT * FROM fam_rows FOR SHARE SKIP LOCKED",
    "SELECT * FROM fam_rows FOR KEY SHARE",
    "SELECT * FROM (SELECT * FROM fam_rows FOR UPDATE) s",
    "WITH l AS (SELECT * FROM fam_rows FOR UPDATE) SELECT count(*) FROM l",
    "SELECT (SELECT id FROM fam_rows LIMIT 1 FOR UPDATE)",
    "LOCK TABLE fam_rows IN ACCESS EXCLUSIVE MODE",
    "SELECT pg_advisory_lock(42)",
    "SELECT pg_try_advisory_xact_lock(42)",
    "SELECT pg_catalog.pg_advisory_lock_shared(1, 2)",
])
def test_locks_are_their_own_class(kt: Keyturn, unchanged: None, sql: str) -> None:
    assert_blocked_everywhere(kt, sql)


def test_a_lock_with_a_bound_parameter(kt: Keyturn, unchanged: None) -> None:
    assert_blocked_everywhere(kt, "SELECT pg_advisory_lock($1)", (7,))
    assert_blocked_everywhere(kt, "SELECT * FROM fam_rows WHERE id = $1 FOR UPDATE", (1,),
                              read_only_first=True)


# ---------------------------------------------------------------- safety settings

@pytest.mark.parametrize("sql", [
    "SET statement_timeout = 0",
    "SET statement_timeout TO DEFAULT",
    "RESET statement_timeout",
    "SET lock_timeout = 0",
    "SET idle_in_transaction_session_timeout = 0",
    "SET session_replication_role = replica",
    "SET row_security = off",
    "SELECT set_config('statement_timeout', '0', false)",
    "SELECT 1; SET LOCAL statement_timeout = 0; SELECT 2",
    # spellings of 0 the server reads as no timeout
    "SET statement_timeout = '00'",
    "SET statement_timeout = 0.4",
    "SET statement_timeout = '400us'",
    "SET statement_timeout = '1e-9'",
    "SET lock_timeout = ' 0.0001 s '",
    "SET row_security = f",
    "SET row_security = 'FALSE'",
    "SELECT set_config('statement_timeout', '0.2', false)",
])
def test_weakening_a_guard_is_its_own_class(kt: Keyturn, unchanged: None, sql: str) -> None:
    assert_blocked_everywhere(kt, sql)


@pytest.mark.parametrize("sql", [
    "SELECT set_config('statement_timeoutX'::varchar(17), '0', false)",
    "SELECT set_config('lock_timeout', '05'::char(1), false)",
    "SELECT set_config('row_securityX'::varchar(12), 'off', false)",
    "SELECT set_config('roleX'::varchar(4), 'app', false)",
    "SELECT set_config('standard_conforming_stringsX'::varchar(27), 'off', false)",
    "SELECT set_config('client_encoding'::text, 'LATIN1', false)",
    "SELECT set_config('search_pathX'::varchar(11), 'vault', false)",
    "SELECT set_config('default_transaction_read_only', 'on'::char(1) || 'ff', false)",
])
def test_a_cast_setting_name_or_value_is_not_read_as_its_constant(
        kt: Keyturn, unchanged: None, sql: str) -> None:
    """A cast can make the server see another name or value than the constant inside it
    ('05'::char(1) is '0'): such a set_config() is judged as one whose name or value
    cannot be read — refused, or the riskiest class of its setting — and the settings
    the client sees afterwards are unchanged."""
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        c.execute("SET statement_timeout = '5s'")
        c.execute("SET lock_timeout = '5s'")
        before = c.execute("SELECT current_setting('statement_timeout'), "
                           "current_setting('lock_timeout'), current_user, "
                           "current_setting('search_path')").fetchone()
        for params in ((), (1,)):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                c.execute(sql + (" WHERE %s = 1" if params else ""), params or None)
            assert "keyturn" in str(err.value)
        after = c.execute("SELECT current_setting('statement_timeout'), "
                          "current_setting('lock_timeout'), current_user, "
                          "current_setting('search_path')").fetchone()
        assert after == before
        assert c.execute("SELECT current_setting('standard_conforming_strings'), "
                         "current_setting('row_security')").fetchone() == ("on", "on")


def test_a_bound_value_under_a_cast_is_not_read_as_its_constant(
        kt: Keyturn, unchanged: None) -> None:
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        c.execute("SET statement_timeout = '5s'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT set_config('statement_timeout', %s::char(1), false)", ("05",))
        assert c.execute("SELECT current_setting('statement_timeout')").fetchone() == ("5s",)


@pytest.mark.parametrize("oid, value", [(18, "05"), (19, "0" * 63 + "5"), (1042, "05")])
def test_a_bound_value_of_a_declared_type_is_not_read_as_sent(
        kt: Keyturn, unchanged: None, oid: int, value: str) -> None:
    """Parse declares the parameter "char" / name / bpchar: the server converts '05' to
    '0' (or cuts at 63 bytes) before set_config sees it, so the bound text is not what
    runs and the worst-case verdict (safety) stands."""
    with RawConn(kt.dsn("alice")) as r:
        assert not errors(r.run(Q("SET statement_timeout = '5s'")))
        answers = r.run(P("", "SELECT set_config('statement_timeout', $1, false)", [oid]),
                        B("", "", [0], [value.encode()]), E(), S())
        assert [e["C"] for e in errors(answers)] == ["42501"], answers
        answers = r.run(Q("SHOW statement_timeout"))
        assert (b"D", b"\x00\x01\x00\x00\x00\x025s") in answers, answers


DURATIONS = ["0", "00", "0.4", "0.5", "0.6", "400us", "1499us", "1500us", "1e-9", "1e2",
             "0.0004s", "0.0006s", " 5 s ", "5s", "1min", "0d", "0.00001h", "-0", "+0",
             "1000", "2147483647"]


@pytest.mark.parametrize("value", DURATIONS)
def test_duration_values_are_read_like_the_server_reads_them(
        kt: Keyturn, pg: LocalPostgres, value: str) -> None:
    """For each value the server accepts, the gateway calls it safety exactly when the
    server ends up with no timeout (statement_timeout 0)."""
    with direct(pg) as c:
        c.execute("SELECT set_config('statement_timeout', %s, false)", (value,))
        server_off = c.execute("SELECT current_setting('statement_timeout')").fetchone() == ("0",)
    res = psql(kt, f"SET statement_timeout = '{value}'")
    gateway_off = res.returncode != 0 and "keyturn: blocked" in res.stderr
    assert gateway_off == server_off, (value, res.stderr)


def test_turning_read_only_off_is_refused(kt: Keyturn, unchanged: None) -> None:
    for sql in ("SET default_transaction_read_only = off",
                "SET transaction_read_only = off",
                "SELECT set_config('transaction_read_only', 'off', true)",
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE"):
        res = psql(kt, sql)
        assert res.returncode != 0 and "keyturn" in res.stderr, (sql, res.stderr)


# ---------------------------------------------------------------- fail closed

@pytest.mark.parametrize("sql", [
    "DELET FROM fam_rows",
    "SELECT 1; DELET FROM fam_rows",
    "DELETE FROM fam_rows WHERE",
])
def test_sql_that_does_not_parse_is_never_allowed_by_default(kt: Keyturn, unchanged: None,
                                                            sql: str) -> None:
    res = psql(kt, sql)
    assert res.returncode != 0 and "keyturn: blocked" in res.stderr, res.stderr
    assert "builtin:unparsed" in res.stderr or "unparsed" in res.stderr


# ---------------------------------------------------------------- names cut at 63 bytes

@pytest.mark.parametrize("name", [LONG, LONG[:63], LONG + "_and_more", LONG[:63] + "é"])
def test_identifiers_the_server_cuts_still_match_rules(kt: Keyturn, name: str) -> None:
    sql = f'SELECT * FROM vault."{name}"'
    res = psql(kt, sql)
    assert res.returncode != 0 and "vault-is-off-limits" in res.stderr, res.stderr
    assert "top secret" not in res.stdout


def test_reset_all_is_a_safety_change_like_resetting_each_timeout(kt: Keyturn) -> None:
    """RESET ALL puts statement_timeout, lock_timeout, ... back to their defaults at once:
    the same class as RESET statement_timeout (blocked here), not a plain session change."""
    assert_blocked_everywhere(kt, "RESET ALL")
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        c.execute("SET statement_timeout = '5s'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SET lock_timeout = '5s'; RESET ALL")
        assert c.execute("SHOW statement_timeout").fetchone() == ("5s",)
