"""The PostgreSQL gateway end to end: real PostgreSQL, real clients, a real
``keyturn up`` process, decisions made by ``keyturn approve`` in another process."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time

import psycopg
import pytest

from tests.conftest import Keyturn

pytestmark = pytest.mark.integration


def count(kt: Keyturn, sql: str) -> int:
    with psycopg.connect(kt.pg.dsn("shop")) as c:
        return c.execute(sql).fetchone()[0]


def connect(kt: Keyturn, user: str = "alice", **kw: object) -> psycopg.Connection:
    return psycopg.connect(kt.dsn(user), autocommit=True, **kw)  # type: ignore[arg-type]


class InBackground:
    """Run one statement on a connection in a thread; keep its result or error."""

    def __init__(self, conn: psycopg.Connection, sql: str, params: tuple = ()):
        self.result: object = None
        self.error: Exception | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(conn, sql, params))
        self.thread.start()

    def _run(self, conn: psycopg.Connection, sql: str, params: tuple) -> None:
        try:
            self.result = conn.execute(sql, params or None).rowcount
        except Exception as exc:  # noqa: BLE001 - the error is what tests assert on
            self.error = exc
        self.done.set()

    def join(self, timeout: float = 20) -> InBackground:
        self.thread.join(timeout)
        assert self.done.is_set(), "the statement is still waiting"
        return self


# ---------------------------------------------------------------- basics

def test_psql_read_is_allowed(keyturn: Keyturn) -> None:
    p = keyturn.psql("alice", "SELECT count(*) FROM customers")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.strip() == "50"


def test_psql_over_tls(keyturn: Keyturn) -> None:
    p = keyturn.psql("alice", "SHOW ssl", sslmode="require")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    # The gateway terminates TLS; the target link is plain in this set-up.
    with psycopg.connect(keyturn.dsn("alice", sslmode="require")) as c:
        assert c.pgconn.ssl_in_use


def test_blocked_statement_names_rule_and_session_stays_usable(keyturn: Keyturn) -> None:
    with connect(keyturn) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
            c.execute("DROP TABLE orders")
        assert "blocked by rule 'no-ddl'" in str(exc.value)
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert count(keyturn, "SELECT count(*) FROM pg_tables WHERE tablename = 'orders'") == 1


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_a_refusal_aborts_the_transaction_like_an_error(keyturn: Keyturn, protocol: str) -> None:
    """A blocked statement inside BEGIN must not let a later COMMIT commit the work done
    before it: PostgreSQL aborts a transaction on any error, and so does the gateway."""
    cursor = psycopg.ClientCursor if protocol == "simple" else psycopg.Cursor
    with psycopg.connect(keyturn.dsn("alice"), cursor_factory=cursor) as c:
        before = c.execute("SHOW application_name").fetchone()[0]
        c.commit()
        c.execute("SET application_name = 'inside-the-transaction'")  # undone on rollback
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="blocked by rule"):
            c.execute("DROP TABLE orders")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.rollback()
        assert c.execute("SHOW application_name").fetchone()[0] == before
        # Outside a transaction block the session simply goes on.
        c.rollback()
        c.autocommit = True
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DROP TABLE orders")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert c.execute("SELECT 2").fetchone() == (2,)
    assert count(keyturn, "SELECT count(*) FROM pg_tables WHERE tablename = 'orders'") == 1


def test_psql_commit_after_a_refusal_rolls_back(keyturn: Keyturn) -> None:
    script = ("BEGIN;\nSET application_name = 'inside';\nDROP TABLE orders;\nCOMMIT;\n"
              "SHOW application_name;\n")
    p = subprocess.Popen(["psql", "-X", "-At", keyturn.dsn("alice")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(script, timeout=30)
    assert "blocked by rule 'no-ddl'" in err
    assert "ROLLBACK" in out.splitlines()  # psql reports the COMMIT of an aborted transaction
    assert out.splitlines()[-1] != "inside"


@pytest.fixture(scope="module")
def vault(keyturn: Keyturn) -> None:
    """A schema the policy blocks, holding a table with the same name as public.customers;
    the target role may read it, so only the gateway stands in the way."""
    with psycopg.connect(keyturn.pg.dsn("shop"), autocommit=True) as c:
        c.execute("CREATE SCHEMA IF NOT EXISTS vault")
        c.execute("CREATE TABLE IF NOT EXISTS vault.customers (secret text)")
        c.execute("INSERT INTO vault.customers VALUES ('the-crown-jewels')")
        c.execute("GRANT USAGE ON SCHEMA vault TO app")
        c.execute("GRANT SELECT ON ALL TABLES IN SCHEMA vault TO app")


@pytest.mark.parametrize("switch", [
    "SET search_path = vault",
    "SET search_path TO 'vault', public",
    "SELECT set_config('search_path', 'vault', false)",
    "SET LOCAL search_path = \"vault\"",
])
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_search_path_cannot_hide_a_blocked_schema(keyturn: Keyturn, vault: None, switch: str,
                                                  protocol: str) -> None:
    cursor = psycopg.ClientCursor if protocol == "simple" else psycopg.Cursor
    with psycopg.connect(keyturn.dsn("alice"), cursor_factory=cursor) as c:
        assert c.execute("SELECT count(*) FROM customers").fetchone() == (50,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="vault-is-off-limits"):
            c.execute("SELECT * FROM vault.customers")
        c.rollback()
        c.execute(switch)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="vault-is-off-limits"):
            c.execute("SELECT * FROM customers")  # would read vault.customers
        c.rollback()


def test_search_path_in_one_message_and_in_the_startup_packet(keyturn: Keyturn,
                                                              vault: None) -> None:
    p = keyturn.psql("alice", "SET search_path = vault; SELECT secret FROM customers")
    out, err = p.communicate(timeout=30)
    assert p.returncode != 0 and "vault-is-off-limits" in err
    assert "crown" not in out

    import asyncio

    import asyncpg

    async def startup_param() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=keyturn.gateway_port, user="alice",
                                     password=keyturn.tokens["alice"], database="shop",
                                     ssl=False, server_settings={"search_path": "vault"})
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="vault"):
                await conn.fetch("SELECT secret FROM customers")
        finally:
            await conn.close()

    asyncio.run(startup_param())


def test_wrong_or_revoked_token_is_refused(keyturn: Keyturn) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(keyturn.dsn("alice").replace(keyturn.tokens["alice"], "kt_wrong"))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(keyturn.dsn("alice").replace("user=alice", "user=nobody"))
    tok = keyturn.cli("token", "create", "--user", "alice", "-q").stdout.strip()
    dsn = keyturn.dsn("alice").replace(keyturn.tokens["alice"], tok)
    psycopg.connect(dsn).close()
    tid = [line.split()[0] for line in keyturn.cli("token", "list").stdout.splitlines()][-1]
    keyturn.cli("token", "revoke", tid)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn)


def test_target_credentials_never_reach_the_client(keyturn: Keyturn) -> None:
    p = keyturn.psql("alice", "SELECT current_user; SHOW ALL")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "app" in out.splitlines()[0]
    assert "app-secret" not in out + err


@pytest.mark.parametrize("options, needle", [
    ({"options": "-c role=postgres"}, "startup parameter 'options' is refused"),
    ({"options": "-c standard_conforming_strings=off"}, "'options' is refused"),
    ({"client_encoding": "SJIS"}, "client_encoding 'SJIS' is refused"),
    ({"dbname": "nosuch"}, 'connection "nosuch" does not exist'),
    ({"replication": "database"}, "replication connections are not allowed"),
])
def test_refused_startup_parameters(keyturn: Keyturn, options: dict, needle: str) -> None:
    with pytest.raises(psycopg.OperationalError, match=needle):
        psycopg.connect(keyturn.dsn("alice"), **options)


@pytest.mark.parametrize("sql", [
    "SET ROLE postgres",
    "SET SESSION AUTHORIZATION postgres",
    "SELECT set_config('role', 'postgres', false)",
    "SET standard_conforming_strings = off",
    "SET client_encoding = 'LATIN1'",
])
def test_refused_identity_changes(keyturn: Keyturn, sql: str) -> None:
    with connect(keyturn) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(sql)
        assert c.execute("SELECT current_user").fetchone() == ("app",)


def test_function_call_message_is_refused(keyturn: Keyturn) -> None:
    from proxies.postgres import codec

    # FunctionCall ('F') for oid 1598 (random()) with no arguments, result format text.
    body = struct.pack("!I", 1598) + struct.pack("!h", 0) + struct.pack("!h", 0) + \
        struct.pack("!h", 0)
    raw = _raw_session(keyturn, codec.encode_message(b"F", body))
    assert b"FunctionCall messages are refused" in raw and b"42501" in raw


def _raw_session(kt: Keyturn, payload: bytes) -> bytes:
    """Send raw bytes on a connection psycopg logged in (SCRAM) and read to ReadyForQuery."""
    c = psycopg.connect(kt.dsn("alice"), autocommit=True)
    sock = socket.socket(fileno=c.pgconn.socket)
    sock = sock.dup()
    try:
        sock.sendall(payload)
        sock.settimeout(5)
        data = b""
        while b"Z\x00\x00\x00\x05" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        sock.close()
        c.close()


# ---------------------------------------------------------------- holds

def test_held_delete_released_by_approve_in_another_process(keyturn: Keyturn) -> None:
    before = count(keyturn, "SELECT count(*) FROM orders WHERE status = 'cancelled'")
    assert before > 0
    p = keyturn.psql("alice", "DELETE FROM orders WHERE status = 'cancelled'")
    t = keyturn.wait_ticket()
    assert p.poll() is None, "psql must still be waiting"
    assert t["requester"] == "alice" and t["connection"] == "shop"
    assert t["classification"] == "write" and t["rule"] == "writes-need-approval"
    assert t["statement"] == "DELETE FROM orders WHERE status = 'cancelled'"
    estimate = t["detail"]["row_estimate"]
    assert estimate is not None and estimate > 0 and t["detail"]["in_transaction"] is False
    assert t["language"] == "sql" and t["facts"] == [
        ["Class", "write on public.orders"],
        ["Estimated rows", f"{estimate:,} (EXPLAIN)"], ["Transaction open", "no"]]
    assert t["application"] == "psql"
    assert count(keyturn, "SELECT count(*) FROM orders WHERE status = 'cancelled'") == before
    res = keyturn.cli("approve", str(t["id"]), "--comment", "looks fine", token_of="bob")
    assert f"ticket {t['id']} approved by bob" in res.stdout
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert f"held for approval — ticket {t['id']}" in err
    assert f"ticket {t['id']} approved by bob" in err
    assert out.strip() == f"DELETE {before}"
    assert count(keyturn, "SELECT count(*) FROM orders WHERE status = 'cancelled'") == 0
    detail = keyturn.cli("tickets", "--json", token_of="bob").stdout
    deadline = time.monotonic() + 10
    while '"executed"' not in detail and time.monotonic() < deadline:
        time.sleep(0.1)
        detail = keyturn.cli("tickets", "--json", token_of="bob").stdout
    assert '"executed"' in detail


def test_rejection_reaches_psql_with_approver_and_reason(keyturn: Keyturn) -> None:
    p = keyturn.psql("alice", "UPDATE customers SET email = 'x' WHERE id = 1")
    t = keyturn.wait_ticket()
    keyturn.cli("reject", str(t["id"]), "--reason", "use the admin tool", token_of="dana")
    out, err = p.communicate(timeout=30)
    assert p.returncode != 0
    assert f"ticket {t['id']} rejected by dana: “use the admin tool”" in err
    assert count(keyturn, "SELECT count(*) FROM customers WHERE email = 'x'") == 0


def test_separation_of_duties(keyturn: Keyturn) -> None:
    p = keyturn.psql("erin", "UPDATE customers SET name = 'erin' WHERE id = 2")
    t = keyturn.wait_ticket()
    res = keyturn.cli("approve", str(t["id"]), token_of="erin", check=False)
    assert res.returncode != 0 and "separation of duties" in res.stderr
    res = keyturn.cli("approve", str(t["id"]), token_of="alice", check=False)
    assert res.returncode != 0 and "not in an approver group" in res.stderr
    keyturn.cli("reject", str(t["id"]), "--reason", "no", token_of="bob")
    p.communicate(timeout=30)
    assert p.returncode != 0


def test_two_decisions_at_the_same_instant(keyturn: Keyturn) -> None:
    p = keyturn.psql("alice", "UPDATE orders SET total = total WHERE id = 3")
    t = keyturn.wait_ticket()
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def run(user: str, *args: str) -> None:
        results[user] = keyturn.cli(*args, token_of=user, check=False)

    threads = [threading.Thread(target=run, args=("bob", "approve", str(t["id"]))),
               threading.Thread(target=run, args=("dana", "reject", str(t["id"]),
                                                  "--reason", "race"))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    codes = sorted(r.returncode for r in results.values())
    assert codes == [0, 2], {u: (r.stdout, r.stderr) for u, r in results.items()}
    loser = next(r for r in results.values() if r.returncode)
    assert "already" in loser.stderr
    p.communicate(timeout=30)


def test_cancel_request_cancels_the_ticket(keyturn: Keyturn) -> None:
    c = connect(keyturn)
    bg = InBackground(c, "DELETE FROM orders WHERE id = 7")
    t = keyturn.wait_ticket()
    c.cancel_safe()
    bg.join()
    assert isinstance(bg.error, psycopg.errors.QueryCanceled)
    assert "cancelled" in str(bg.error)
    assert c.execute("SELECT 1").fetchone() == (1,)
    c.close()
    status = keyturn.cli("tickets", "--json", token_of="bob").stdout
    assert f'"id": {t["id"]}' in status
    assert count(keyturn, "SELECT count(*) FROM orders WHERE id = 7") == 1


def test_disconnect_cancels_the_ticket(keyturn: Keyturn) -> None:
    import requests

    p = keyturn.psql("alice", "DELETE FROM orders WHERE id = 8")
    t = keyturn.wait_ticket()
    p.kill()
    p.wait()
    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline:
        status = requests.get(f"{keyturn.url}/api/v1/tickets/{t['id']}", headers={
            "Authorization": f"Bearer {keyturn.tokens['bob']}"}, timeout=5).json()["status"]
        if status != "pending":
            break
        time.sleep(0.1)
    assert status == "cancelled"


def test_extended_protocol_hold_binds_parameters(keyturn: Keyturn) -> None:
    c = connect(keyturn)
    bg = InBackground(c, "UPDATE orders SET status = %s WHERE id = %s", ("refunded", 11))
    t = keyturn.wait_ticket()
    assert t["statement"] == "UPDATE orders SET status = $1 WHERE id = $2"
    assert t["params"] == ["refunded", "11"]
    keyturn.cli("approve", str(t["id"]), token_of="bob")
    assert bg.join().error is None and bg.result == 1
    assert count(keyturn, "SELECT count(*) FROM orders WHERE status = 'refunded'") == 1
    # The session goes on normally, with pipelined statements after the hold.
    assert c.execute("SELECT status FROM orders WHERE id = %s", (11,)).fetchone() == ("refunded",)
    c.close()


def test_defer_mode_runs_identical_statement_once(keyturn: Keyturn) -> None:
    keyturn.pg.execute("CREATE TABLE IF NOT EXISTS audit_requests (note text)", dbname="shop")
    keyturn.pg.execute("ALTER TABLE audit_requests OWNER TO app", dbname="shop")
    sql = "INSERT INTO audit_requests VALUES ('deferred')"
    with connect(keyturn) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="deferred for approval"):
            c.execute(sql)
    t = keyturn.wait_ticket()
    assert t["mode"] == "defer"
    keyturn.cli("approve", str(t["id"]), token_of="bob")
    with connect(keyturn) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="deferred"):
            c.execute(sql.replace("deferred", "other text"))
        c.execute(sql)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="deferred"):
            c.execute(sql)
    assert count(keyturn, "SELECT count(*) FROM audit_requests WHERE note = 'deferred'") == 1
    keyturn.skip_pending()  # the two new deferred tickets stay pending


def test_expiry(pg, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import make_keyturn

    kt = make_keyturn(tmp_path / "kt", pg, timeout="2s")
    kt.start()
    try:
        p = kt.psql("alice", "DELETE FROM orders WHERE id = 12")
        out, err = p.communicate(timeout=30)
        assert p.returncode != 0
        assert "expired after 2s without a decision" in err
        assert count(kt, "SELECT count(*) FROM orders WHERE id = 12") == 1
    finally:
        assert kt.stop() == 0


# ---------------------------------------------------------------- evasion

@pytest.mark.parametrize("sql", [
    "SELECT 1; DELETE FROM orders WHERE id = 21",
    "WITH gone AS (DELETE FROM orders WHERE id = 21 RETURNING *) SELECT count(*) FROM gone",
    "EXPLAIN ANALYZE DELETE FROM orders WHERE id = 21",
    "SELECT * FROM (SELECT 1) s; WITH x AS (UPDATE orders SET total = 0 WHERE id = 21 "
    "RETURNING 1) SELECT * FROM x",
    "/* nested /* comment */ */ DELETE FROM orders WHERE id = 21",
    "DELETE FROM U&\"\\006frders\" WHERE id = 21",
    "SELECT $q$ harmless $q$; DELETE FROM orders WHERE id = 21",
])
def test_evasions_of_write_detection_are_held(keyturn: Keyturn, sql: str) -> None:
    with connect(keyturn) as c:
        bg = InBackground(c, sql)
        t = keyturn.wait_ticket()
        assert not bg.done.is_set()
        keyturn.cli("reject", str(t["id"]), "--reason", "evasion test", token_of="bob")
        assert "rejected by bob" in str(bg.join().error)
    assert count(keyturn, "SELECT count(*) FROM orders WHERE id = 21 AND total <> 0") == 1


@pytest.mark.parametrize("sql, rule", [
    ("DO $$ BEGIN DELETE FROM orders; END $$", "no-file-access"),
    ("COPY orders TO PROGRAM 'cat > /tmp/x'", "no-file-access"),
    ("COPY orders FROM '/etc/passwd'", "no-file-access"),
    ("SELECT * FROM pg_read_file('/etc/passwd')", "no-file-access"),
    ("SELECT 1; SELECT pg_ls_dir('.')", "no-file-access"),
    ("PREPARE p AS DELETE FROM orders; EXECUTE p", "reads"),
    ("select U&\"pg\\005fread\\005ffile\"('/etc/passwd')", "no-file-access"),
    ("CREATE TABLE x (id int)", "no-ddl"),
    ("this is not sql", "no-file-access"),
])
def test_dangerous_statements_are_blocked(keyturn: Keyturn, sql: str, rule: str) -> None:
    with connect(keyturn) as c:
        if rule == "reads":
            # PREPARE itself runs nothing; the EXECUTE of a DELETE is held like the DELETE.
            c.execute(sql.split(";")[0])
            bg = InBackground(c, "EXECUTE p")
            t = keyturn.wait_ticket()
            assert t["statement"] == "EXECUTE p" and t["classification"] == "write"
            keyturn.cli("reject", str(t["id"]), "--reason", "no", token_of="bob")
            assert "rejected by bob" in str(bg.join().error)
            return
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
            c.execute(sql)
        assert f"rule '{rule}'" in str(exc.value)
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert count(keyturn, "SELECT count(*) FROM orders") > 100


# ---------------------------------------------------------------- protocol

def test_copy_in_and_out(keyturn: Keyturn) -> None:
    with connect(keyturn) as c:
        with c.cursor() as cur:
            with cur.copy("COPY (SELECT id, email FROM customers ORDER BY id LIMIT 5) "
                          "TO STDOUT") as copy:
                rows = [r for r in copy.rows()]
        assert len(rows) == 5 and rows[0][1] == "user1@example.com"


def test_cancel_of_a_running_query_is_forwarded(keyturn: Keyturn) -> None:
    c = connect(keyturn)
    t0 = time.monotonic()
    bg = InBackground(c, "SELECT pg_sleep(30)")
    time.sleep(0.5)
    c.cancel_safe()
    bg.join()
    assert time.monotonic() - t0 < 10
    assert isinstance(bg.error, psycopg.errors.QueryCanceled)
    c.close()


def test_asyncpg_prepared_statements(keyturn: Keyturn) -> None:
    import asyncio

    import asyncpg

    async def main() -> list:
        conn = await asyncpg.connect(host="127.0.0.1", port=keyturn.gateway_port, user="alice",
                                     password=keyturn.tokens["alice"], database="shop",
                                     ssl=False)
        stmt = await conn.prepare("SELECT id, email FROM customers WHERE id = $1")
        rows = [await stmt.fetchrow(i) for i in (1, 2, 3)]
        async with conn.transaction():
            n = await conn.fetchval("SELECT count(*) FROM orders")
        await conn.close()
        return [*rows, n]

    res = asyncio.run(main())
    assert res[0]["email"] == "user1@example.com" and res[2]["id"] == 3 and res[3] >= 150


def test_sqlalchemy_through_the_gateway(keyturn: Keyturn) -> None:
    from sqlalchemy import create_engine, text

    url = (f"postgresql+psycopg://alice:{keyturn.tokens['alice']}@127.0.0.1:"
           f"{keyturn.gateway_port}/shop")
    engine = create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM customers WHERE id < :n"), {"n": 10}).scalar()
    engine.dispose()
    assert n == 9


@pytest.mark.parametrize("payload, needle", [
    (struct.pack("!i", 4), b"08P01"),                                 # length < 8
    (struct.pack("!ii", 20000, 196608) + b"x" * 100, b"08P01"),       # oversized startup
    (struct.pack("!ii", 8, 1234), b"0A000"),                          # unknown version/code
    (struct.pack("!ii", 8, 80877103) + b"garbage", b"08P01"),         # plaintext after SSLRequest
])
def test_malformed_input_closes_only_that_connection(keyturn: Keyturn, payload: bytes,
                                                     needle: bytes) -> None:
    with socket.create_connection(("127.0.0.1", keyturn.gateway_port), timeout=5) as s:
        s.sendall(payload)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert needle in data or data in (b"", b"S"), data
    with connect(keyturn) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_gssenc_request_is_declined(keyturn: Keyturn) -> None:
    with socket.create_connection(("127.0.0.1", keyturn.gateway_port), timeout=5) as s:
        s.sendall(struct.pack("!ii", 8, 80877104))
        assert s.recv(1) == b"N"


def test_pgbench_select_only_through_gateway(keyturn: Keyturn) -> None:
    for mode in ("simple", "prepared"):
        res = subprocess.run(["pgbench", "-S", "-M", mode, "-c", "2", "-t", "300", "-n",
                              keyturn.dsn("alice", dbname="bench")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "number of transactions actually processed: 600/600" in res.stdout


def test_audit_trail_verifies_after_the_session(keyturn: Keyturn) -> None:
    res = keyturn.cli("audit", "verify")
    assert "audit chain OK" in res.stdout and "BROKEN" not in res.stdout
    export = keyturn.cli("audit", "export", "--format", "jsonl").stdout
    assert '"kind": "held"' in export and '"outcome": "blocked"' in export


def test_async_notifications_and_parameter_status_pass_through(keyturn: Keyturn) -> None:
    with connect(keyturn) as c:
        c.execute("SET application_name = 'renamed'")
        assert c.info.parameter_status("application_name") == "renamed"
        c.execute("LISTEN keyturn_test")
        with psycopg.connect(keyturn.pg.dsn("shop"), autocommit=True) as direct:
            direct.execute("NOTIFY keyturn_test, 'hello'")
        gen = c.notifies(timeout=5, stop_after=1)
        notes = list(gen)
        assert [n.payload for n in notes] == ["hello"]


def test_copy_from_stdin_is_held_then_streams(keyturn: Keyturn) -> None:
    keyturn.pg.execute("CREATE TABLE IF NOT EXISTS imports (id int, note text); "
                       "ALTER TABLE imports OWNER TO app", dbname="shop")
    p = subprocess.Popen(["psql", keyturn.dsn("alice"), "-X", "-v", "ON_ERROR_STOP=1", "-c",
                          "COPY imports FROM STDIN"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = keyturn.wait_ticket()
    assert t["statement"] == "COPY imports FROM STDIN" and t["classification"] == "write"
    keyturn.cli("approve", str(t["id"]), token_of="bob")
    out, err = p.communicate("1\tone\n2\ttwo\n3\tthree\n", timeout=30)
    assert p.returncode == 0, err
    assert out.strip() == "COPY 3"
    assert count(keyturn, "SELECT count(*) FROM imports") == 3


def test_asyncpg_binary_parameters_are_readable_in_the_ticket(keyturn: Keyturn) -> None:
    import asyncio

    import asyncpg

    async def main() -> str:
        conn = await asyncpg.connect(host="127.0.0.1", port=keyturn.gateway_port, user="alice",
                                     password=keyturn.tokens["alice"], database="shop",
                                     ssl=False)
        task = asyncio.ensure_future(conn.execute(
            "UPDATE orders SET total = total WHERE id = $1 AND status = $2", 13, "paid"))
        t = await asyncio.to_thread(keyturn.wait_ticket)
        assert t["params"] == ["13", "paid"], t["params"]
        assert t["detail"]["row_estimate"] is not None
        await asyncio.to_thread(keyturn.cli, "approve", str(t["id"]), token_of="bob")
        status = await asyncio.wait_for(task, 20)
        await conn.close()
        return status

    assert asyncio.run(main()) == "UPDATE 1"


def test_pipelined_messages_wait_behind_a_hold_in_order(keyturn: Keyturn) -> None:
    c = connect(keyturn)
    results: dict[str, object] = {}

    def run() -> None:
        with c.pipeline():
            upd = c.execute("UPDATE orders SET total = total + 1 WHERE id = %s", (14,))
            sel = c.execute("SELECT total FROM orders WHERE id = %s", (14,))
            sel2 = c.execute("SELECT count(*) FROM customers")
        results["upd"] = upd.rowcount
        results["sel"] = sel.fetchone()[0]
        results["sel2"] = sel2.fetchone()[0]

    before = count(keyturn, "SELECT total FROM orders WHERE id = 14")
    th = threading.Thread(target=run)
    th.start()
    t = keyturn.wait_ticket()
    time.sleep(0.3)
    assert "sel" not in results, "later pipelined statements must wait behind the hold"
    keyturn.cli("approve", str(t["id"]), token_of="bob")
    th.join(20)
    # The SELECT ran after the approved UPDATE, exactly in the order sent.
    assert results == {"upd": 1, "sel": before + 1, "sel2": 50}
    c.close()


@pytest.mark.parametrize("call", ["imm_wipe(1)", "stab_wipe()"])
def test_a_held_statement_runs_none_of_its_code_before_approval(keyturn: Keyturn,
                                                                 call: str) -> None:
    # The ticket's row estimate plans the statement, and the planner runs code while it
    # plans (immutable functions folded, stable ones for estimates): a statement that
    # may run user code is not planned, and the plan runs read-only, rolled back.
    keyturn.pg.execute(
        "CREATE TABLE IF NOT EXISTS held_victim (id int); "
        "CREATE TABLE IF NOT EXISTS held_scratch (id int); "
        "TRUNCATE held_victim; INSERT INTO held_victim SELECT generate_series(1, 10); "
        "CREATE OR REPLACE FUNCTION public.held_wipe() RETURNS int LANGUAGE plpgsql "
        "AS $$ BEGIN DELETE FROM held_victim; RETURN 1; END $$; "
        "CREATE OR REPLACE FUNCTION public.imm_wipe(int) RETURNS int LANGUAGE plpgsql "
        "IMMUTABLE AS $$ BEGIN PERFORM public.held_wipe(); RETURN $1; END $$; "
        "CREATE OR REPLACE FUNCTION public.stab_wipe() RETURNS int LANGUAGE plpgsql "
        "STABLE AS $$ BEGIN PERFORM public.held_wipe(); RETURN 1; END $$; "
        "ALTER TABLE held_victim OWNER TO app; ALTER TABLE held_scratch OWNER TO app; "
        "ALTER FUNCTION public.held_wipe() OWNER TO app; "
        "ALTER FUNCTION public.imm_wipe(int) OWNER TO app; "
        "ALTER FUNCTION public.stab_wipe() OWNER TO app", dbname="shop")
    p = keyturn.psql("alice", f"DELETE FROM held_scratch WHERE id = {call}")
    t = keyturn.wait_ticket()
    try:
        assert t["statement"].endswith(call)
        time.sleep(1)  # an estimate, had there been one, would have run by now
        assert count(keyturn, "SELECT count(*) FROM held_victim") == 10
        assert t["detail"]["row_estimate"] is None
    finally:
        keyturn.cli("reject", str(t["id"]), "--reason", "no", token_of="dana")
        p.communicate(timeout=30)
    assert count(keyturn, "SELECT count(*) FROM held_victim") == 10
