"""What reaches the target besides statement text, through a real ``keyturn up`` and a
real PostgreSQL: startup-packet settings (judged as the SET they amount to), the client
encoding (one rule for startup and SQL), values bound to set_config(), and the backend
pid the client is told (the target's own, with a cancel secret of the gateway's).

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import Keyturn, make_keyturn

pytestmark = pytest.mark.integration

# Everything but unknown statements allowed (NOTIFY is a write), on connection "bench".
OPEN_POLICY = """
  open: {default: allow}
"""


@pytest.fixture(scope="module")
def open_keyturn(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Keyturn]:
    kt = make_keyturn(tmp_path_factory.mktemp("kt-open"), pg, extra=OPEN_POLICY)
    kt.config.write_text(kt.config.read_text().replace("policy: readonly", "policy: open"))
    kt.start()
    yield kt
    kt.stop()


def connect(kt: Keyturn, user: str = "alice", **kw: Any) -> psycopg.Connection:
    return psycopg.connect(kt.dsn(user), **{"autocommit": True, **kw})


def direct(kt: Keyturn, **kw: Any) -> psycopg.Connection:
    """A connection straight to the target as the superuser (what really happened)."""
    return psycopg.connect(kt.pg.dsn("shop"), autocommit=True, **kw)


def asyncpg_login(kt: Keyturn, server_settings: dict[str, str]) -> dict[str, str]:
    """Log in with asyncpg (it sends any startup setting) and read back each setting as the
    target has it; raises what the login raised."""
    import asyncpg

    async def main() -> dict[str, str]:
        conn = await asyncpg.connect(host="127.0.0.1", port=kt.gateway_port, user="alice",
                                     password=kt.tokens["alice"], database="shop", ssl=False,
                                     server_settings=server_settings)
        try:
            return {name: await conn.fetchval("SELECT current_setting($1)", name)
                    for name in server_settings}
        finally:
            await conn.close()

    return asyncio.run(main())


def target_sessions(kt: Keyturn, application: str) -> int:
    with direct(kt) as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                         [application]).fetchone()[0]


# ---------------------------------------------------------------- startup settings

# (name, value, what the refusal says): each is refused at login, and the same SET in SQL
# is refused by the gateway too.
REFUSED = [
    ("default_transaction_read_only", "off", "write access"),
    ("transaction_read_only", "off", "write access"),
    ("session_replication_role", "replica", "safety"),
    ("statement_timeout", "0", "safety"),
    ("row_security", "off", "safety"),
    ("standard_conforming_strings", "off", "string literals"),
]


@pytest.mark.parametrize("name, value, why", REFUSED)
def test_a_startup_setting_is_refused_like_its_set(keyturn: Keyturn, name: str, value: str,
                                                   why: str) -> None:
    import asyncpg

    app = f"refused-{name}"
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as exc:
        asyncpg_login(keyturn, {"application_name": app, name: value})
    assert f"startup parameter {name!r} is refused" in str(exc.value)
    assert why in str(exc.value)
    assert target_sessions(keyturn, app) == 0  # the target was never asked
    with connect(keyturn) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"SET {name} TO '{value}'")


def test_allowed_startup_settings_reach_the_target(keyturn: Keyturn) -> None:
    wanted = {"statement_timeout": "7s", "default_transaction_isolation": "serializable",
              "search_path": "public", "myapp.tenant": "it's 42", "DateStyle": "ISO, DMY",
              "default_transaction_read_only": "on"}
    got = asyncpg_login(keyturn, wanted)
    assert got == wanted


def test_a_setting_a_masking_rule_lets_run_is_accepted(keyturn: Keyturn) -> None:
    # On a masked connection SET is decided "mask" (it runs; it has no rows to mask).
    dsn = keyturn.dsn("alice", dbname="shopmask")
    with psycopg.connect(dsn, application_name="masked-app", client_encoding="utf_8") as c:
        assert c.execute("SHOW application_name").fetchone() == ("masked-app",)


def test_a_setting_name_that_is_not_one_is_refused(keyturn: Keyturn) -> None:
    import asyncpg

    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not the name of a setting"):
        asyncpg_login(keyturn, {"search_path TO public; SET role": "postgres"})


def test_a_value_cannot_break_out_of_its_literal(keyturn: Keyturn) -> None:
    # If the value were pasted into SQL unquoted, the analyser would read a harmless SET
    # and a second statement; quoted, it is one value of a custom setting.
    value = "x'; SET default_transaction_read_only TO 'off"
    assert asyncpg_login(keyturn, {"myapp.note": value}) == {"myapp.note": value}


def _connect_records(kt: Keyturn, match: Any) -> list[dict]:
    deadline = time.monotonic() + 10
    while True:  # records reach the store through the spool and its ingester
        records = [json.loads(line) for line in kt.cli(
            "audit", "export", "--format", "jsonl").stdout.splitlines() if line.strip()]
        mine = [r for r in records if r.get("kind") == "connect" and match(r)]
        if mine or time.monotonic() > deadline:
            return mine
        time.sleep(0.2)


def test_startup_settings_are_audited(keyturn: Keyturn) -> None:
    import asyncpg

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        asyncpg_login(keyturn, {"session_replication_role": "replica"})
    refused = _connect_records(keyturn, lambda r: (r.get("detail") or {}).get("setting")
                               == "session_replication_role")
    assert refused and refused[-1]["outcome"] == "refused" and refused[-1]["user"] == "alice"
    assert "startup parameter 'session_replication_role'" in refused[-1]["reason"]
    asyncpg_login(keyturn, {"myapp.audited": "yes"})
    allowed = _connect_records(keyturn, lambda r: ((r.get("detail") or {}).get("settings")
                                                   or {}).get("myapp.audited") == "yes")
    assert allowed and allowed[-1]["user"] == "alice"


# ---------------------------------------------------------------- client_encoding

UTF8_SPELLINGS = ["utf_8", "UTF-8", "Unicode", "utf8", "'utf-8'"]


@pytest.mark.parametrize("spelling", UTF8_SPELLINGS)
def test_every_spelling_of_utf8_is_accepted_on_both_paths(keyturn: Keyturn,
                                                          spelling: str) -> None:
    # The real server reads it as UTF8 too.
    with direct(keyturn, client_encoding=spelling) as d:
        assert d.execute("SHOW client_encoding").fetchone() == ("UTF8",)
    with connect(keyturn, client_encoding=spelling) as c:
        assert c.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        c.execute(f"SET client_encoding TO {psycopg.sql.quote(spelling)}")
        c.execute("SELECT set_config('client_encoding', %s, false)", [spelling])
        assert c.execute("SELECT 'é'").fetchone() == ("é",)


@pytest.mark.parametrize("encoding, why", [("SQL_ASCII", "SQL_ASCII is refused"),
                                           ("sql-ascii", "SQL_ASCII is refused"),
                                           ("LATIN1", "'LATIN1' is refused")])
def test_other_encodings_are_refused_on_both_paths(keyturn: Keyturn, encoding: str,
                                                   why: str) -> None:
    with direct(keyturn, client_encoding=encoding) as d:  # the server would take it
        assert d.execute("SHOW client_encoding").fetchone()[0] != "UTF8"
    with pytest.raises(psycopg.OperationalError, match=why):
        connect(keyturn, client_encoding=encoding)
    with connect(keyturn) as c:
        for sql in (f"SET client_encoding TO '{encoding}'",
                    f"SELECT set_config('client_encoding', '{encoding}', false)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=why):
                c.execute(sql)
        assert c.execute("SHOW client_encoding").fetchone() == ("UTF8",)


# ---------------------------------------------------------------- bound set_config values

@pytest.mark.parametrize("prepare", [False, True])
def test_set_config_judges_the_bound_value(keyturn: Keyturn, prepare: bool) -> None:
    sql = "SELECT set_config('client_encoding', %s, false)"
    with connect(keyturn) as c:
        assert c.execute(sql, ["UTF8"], prepare=prepare).fetchone() == ("UTF8",)
        # The same statement (named and prepared, with prepare=True) with another value.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="LATIN1"):
            c.execute(sql, ["LATIN1"], prepare=prepare)
        assert c.execute(sql, ["unicode"], prepare=prepare).fetchone() == ("UTF8",)
        assert c.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        timeout = "SELECT set_config('statement_timeout', %s, false)"
        assert c.execute(timeout, ["5s"], prepare=prepare).fetchone() == ("5s",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="safety"):
            c.execute(timeout, ["0"], prepare=prepare)
        assert c.execute("SHOW statement_timeout").fetchone() == ("5s",)


def test_a_bound_value_is_read_as_the_server_reads_it(keyturn: Keyturn) -> None:
    # A value with quotes stays one value: not a way to smuggle in another setting.
    with connect(keyturn) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT set_config('client_encoding', %s, false)", ["LATIN1' --"])
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT set_config(%s, %s, false)", ["role", "postgres"])
        assert c.execute("SELECT current_user").fetchone() == ("app",)


# ---------------------------------------------------------------- backend pid and cancel

def test_the_client_sees_the_targets_pid(open_keyturn: Keyturn) -> None:
    kt = open_keyturn

    def bench() -> psycopg.Connection:
        return psycopg.connect(kt.dsn("alice", dbname="bench"), autocommit=True)

    with bench() as c, bench() as other:
        pid = c.info.backend_pid
        assert c.execute("SELECT pg_backend_pid()").fetchone() == (pid,)
        assert other.info.backend_pid != pid
        c.execute("LISTEN keyturn_pid")
        c.execute("NOTIFY keyturn_pid, 'self'")
        other.execute("NOTIFY keyturn_pid, 'other'")
        got = {}
        for n in c.notifies(timeout=5, stop_after=2):
            got[n.payload] = n.pid
        assert got == {"self": pid, "other": other.info.backend_pid}


@pytest.mark.parametrize("autocommit", [True, False])
def test_pg_terminate_backend_of_the_shown_pid_ends_that_session(keyturn: Keyturn,
                                                                 autocommit: bool) -> None:
    c = connect(keyturn, autocommit=autocommit)
    with direct(keyturn) as d:
        assert d.execute("SELECT pg_terminate_backend(%s)", [c.info.backend_pid]).fetchone() \
            == (True,)
    time.sleep(0.5)  # the target's FATAL reaches the client before its next statement
    # One error, the target's own (not a second result of the gateway's for BEGIN).
    with pytest.raises(psycopg.OperationalError, match="administrator command"):
        c.execute("SELECT 1")
    c.close()


def test_a_cancel_is_delivered_before_the_client_goes_on(keyturn: Keyturn) -> None:
    # libpq's cancel returns when the server has the request; a cancel the gateway still
    # had in flight would hit the next statement instead.
    with connect(keyturn) as c:
        for _ in range(10):
            c.cancel()
            assert c.execute("SELECT pg_sleep(0.05), 1").fetchone() == ("", 1)


def _send_cancel(kt: Keyturn, pid: int, secret: int) -> None:
    from proxies.postgres import codec

    with socket.create_connection(("127.0.0.1", kt.gateway_port), timeout=5) as s:
        s.sendall(codec.encode_cancel_request(pid, secret))
        s.recv(1)  # the gateway closes the socket once it has read the request


def test_cancel_is_keyed_by_pid_and_secret(keyturn: Keyturn) -> None:
    with connect(keyturn) as c:
        result: dict[str, Any] = {}

        def sleep() -> None:
            t0 = time.monotonic()
            try:
                c.execute("SELECT pg_sleep(20)")
            except psycopg.Error as exc:
                result["error"] = exc
            result["seconds"] = time.monotonic() - t0

        thread = threading.Thread(target=sleep)
        thread.start()
        time.sleep(0.5)
        # The right pid with a wrong secret cancels nothing.
        _send_cancel(keyturn, c.info.backend_pid, 12345)
        time.sleep(1.0)
        assert thread.is_alive()
        c.cancel()
        thread.join(15)
        assert isinstance(result.get("error"), psycopg.errors.QueryCanceled)
        assert result["seconds"] < 10
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_same_pid_on_two_targets_gets_two_keys() -> None:
    from types import SimpleNamespace

    from proxies.postgres.gateway import PostgresGateway

    gw: Any = SimpleNamespace(sessions={})
    a, b = object(), object()
    ka = PostgresGateway.new_key(gw, a, 4242)  # type: ignore[arg-type]
    kb = PostgresGateway.new_key(gw, b, 4242)  # type: ignore[arg-type]
    assert ka[0] == kb[0] == 4242 and ka != kb
    assert gw.sessions == {ka: a, kb: b}


def test_bound_values_are_written_in_as_literals_where_the_parameters_are() -> None:
    from proxies.postgres.settings import with_values

    sql = "SELECT set_config('x', $1, false) WHERE '$1' = $2 -- $1\n AND $1::text <> ''"
    assert with_values(sql, ["a'b", None]) == \
        "SELECT set_config('x', 'a''b', false) WHERE '$1' = NULL -- $1\n AND 'a''b'::text <> ''"
    assert with_values("SELECT $2", ["only one"]) is None
    assert with_values("SELECT 'é', $1", ["ü"]) == "SELECT 'é', 'ü'"
