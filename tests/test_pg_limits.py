"""The gateway cannot be exhausted or locked out, against a real PostgreSQL, a real
``keyturn up`` and real clients: login timeout, client caps (global, per user, not
yet logged in), thousands of idle sockets, login throttling with real SCRAM
exchanges from several source addresses, revoked tokens ending their sessions,
and a store outage that leaves the data plane running.

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import scramp

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import Keyturn, make_keyturn
from tests.pg_raw import B, E, P, S

pytestmark = pytest.mark.integration


def start_with_limits(base: Path, pg: LocalPostgres, limits: str, **kw: object) -> Keyturn:
    """``make_keyturn`` with ``gateway.limits`` set (a YAML flow mapping), started."""
    kt = make_keyturn(base, pg, **kw)  # type: ignore[arg-type]
    text = kt.config.read_text()
    kt.config.write_text(text.replace("  client_auth: scram\n",
                                      f"  client_auth: scram\n  limits: {limits}\n", 1))
    kt.start()
    return kt


@pytest.fixture
def kt_limited(pg: LocalPostgres, tmp_path: Path) -> Iterator[Keyturn]:
    kt = start_with_limits(tmp_path / "kt", pg, "{login_timeout: 1s, max_connections: 6, "
                           "max_connections_per_user: 2, max_pending_logins: 3}")
    yield kt
    kt.stop()


# ---------------------------------------------------------------- raw protocol helpers

def startup_packet(user: str, dbname: str = "shop") -> bytes:
    body = struct.pack("!i", 196608) + f"user\0{user}\0database\0{dbname}\0\0".encode()
    return struct.pack("!i", len(body) + 4) + body


def read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    head = _read_exactly(sock, 5)
    n = struct.unpack("!i", head[1:])[0]
    return head[:1], _read_exactly(sock, n - 4)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def error_fields(body: bytes) -> dict[str, str]:
    return {f[:1]: f[1:] for f in body.decode().split("\0") if f}


def read_to_eof(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def scram_login(port: int, user: str, token: str, *, source: str = "127.0.0.1"
                ) -> tuple[str, float]:
    """One SCRAM-SHA-256 login from ``source`` (any 127/8 address): "ok" or the error's
    SQLSTATE, and the seconds from sending the proof to the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30,
                                    source_address=(source, 0))
    try:
        sock.sendall(startup_packet(user))
        kind, body = read_message(sock)
        assert kind == b"R" and struct.unpack("!i", body[:4])[0] == 10, (kind, body)
        client = scramp.ScramClient(["SCRAM-SHA-256"], user, token)
        first = client.get_client_first().encode()
        mech = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
        sock.sendall(b"p" + struct.pack("!i", len(mech) + 4) + mech)
        kind, body = read_message(sock)
        assert kind == b"R" and struct.unpack("!i", body[:4])[0] == 11, (kind, body)
        client.set_server_first(body[4:].decode())
        final = client.get_client_final().encode()
        t0 = time.monotonic()
        sock.sendall(b"p" + struct.pack("!i", len(final) + 4) + final)
        kind, body = read_message(sock)
        elapsed = time.monotonic() - t0
        if kind == b"E":
            return error_fields(body)["C"], elapsed
        assert kind == b"R" and struct.unpack("!i", body[:4])[0] == 12, (kind, body)
        while kind != b"Z":
            kind, body = read_message(sock)
            if kind == b"E":
                return error_fields(body)["C"], elapsed
        return "ok", elapsed
    finally:
        sock.close()


def logged_in(port: int, user: str, token: str, dbname: str = "shop") -> socket.socket:
    """A raw socket logged in through the gateway (SCRAM), after its first ReadyForQuery."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(startup_packet(user, dbname))
    kind, body = read_message(sock)
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, token)
    first = client.get_client_first().encode()
    mech = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
    sock.sendall(b"p" + struct.pack("!i", len(mech) + 4) + mech)
    kind, body = read_message(sock)
    client.set_server_first(body[4:].decode())
    final = client.get_client_final().encode()
    sock.sendall(b"p" + struct.pack("!i", len(final) + 4) + final)
    while kind != b"Z":
        kind, body = read_message(sock)
        assert kind != b"E", error_fields(body)
    return sock


def query_message(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


def gateway_fds(kt: Keyturn) -> int:
    assert kt.proc is not None
    return len(os.listdir(f"/proc/{kt.proc.pid}/fd"))


def audit_export(kt: Keyturn) -> str:
    """The whole audit trail, after the gateway stopped (SIGTERM flushes the spool)."""
    assert kt.stop() == 0
    return kt.cli("audit", "export").stdout


# ---------------------------------------------------------------- login messages

def test_a_client_that_has_not_logged_in_cannot_make_the_gateway_buffer_megabytes(
        kt_limited: Keyturn) -> None:
    """PostgreSQL reads at most 65535 bytes of a password or SASL message: so does the
    gateway, and it answers a longer one with FATAL 08P01 before reading its body."""
    sock = socket.create_connection(("127.0.0.1", kt_limited.gateway_port), timeout=10)
    try:
        sock.sendall(startup_packet("alice"))
        kind, _ = read_message(sock)
        assert kind == b"R"  # the SASL request
        sock.sendall(b"p" + struct.pack("!i", 64 * 1024 * 1024 - 16))
        kind, body = read_message(sock)
        assert kind == b"E" and error_fields(body)["C"] == "08P01"
        assert "too large" in error_fields(body)["M"]
    finally:
        sock.close()
    # Others are served meanwhile and after.
    with psycopg.connect(kt_limited.dsn("alice"), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------- login timeout

def test_login_timeout_closes_silent_and_half_logged_in_sockets(kt_limited: Keyturn) -> None:
    port = kt_limited.gateway_port
    silent = socket.create_connection(("127.0.0.1", port))
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(startup_packet("alice"))  # then never answers the SASL request
    tls = socket.create_connection(("127.0.0.1", port))
    tls.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest, then no handshake
    assert tls.recv(1) == b"S"
    t0 = time.monotonic()
    for sock in (silent, half):
        data = read_to_eof(sock, 10)
        fatal = data[data.index(b"E"):]
        fields = error_fields(fatal[5:])
        assert fields["S"] == "FATAL" and fields["C"] == "57014", fields
        assert fields["M"].startswith("canceling authentication due to timeout"), fields
    assert read_to_eof(tls, 10) == b""  # closed mid-handshake: nothing to say it on
    assert 0.5 < time.monotonic() - t0 < 5
    # A client that logs in within the timeout is not affected, and stays on past it.
    with psycopg.connect(kt_limited.dsn("alice"), autocommit=True) as c:
        time.sleep(1.5)
        assert c.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------- connection caps

def test_caps_per_user_and_in_all_answer_53300(kt_limited: Keyturn) -> None:
    kt = kt_limited
    open_: list[psycopg.Connection] = []
    try:
        open_ += [psycopg.connect(kt.dsn("alice"), autocommit=True) for _ in range(2)]
        with pytest.raises(psycopg.OperationalError, match='too many connections for role "alice"'):
            psycopg.connect(kt.dsn("alice"))
        assert scram_login(kt.gateway_port, "alice", kt.tokens["alice"])[0] == "53300"
        # psql says it too.
        psql = kt.psql("alice", "SELECT 1")
        _, err = psql.communicate(timeout=30)
        assert psql.returncode != 0 and 'too many connections for role "alice"' in err, err
        # Other users are not affected by alice's cap; the gateway fills up at 6.
        open_ += [psycopg.connect(kt.dsn(u), autocommit=True)
                  for u in ("bob", "bob", "dana", "dana")]
        with pytest.raises(psycopg.OperationalError, match="sorry, too many clients"):
            psycopg.connect(kt.dsn("erin"))
        with socket.create_connection(("127.0.0.1", kt.gateway_port)) as s:
            assert b"C53300" in read_to_eof(s, 5)
        for c in open_:
            assert c.execute("SELECT 1").fetchone() == (1,)
        open_.pop().close()
        time.sleep(0.2)
        with psycopg.connect(kt.dsn("erin"), autocommit=True) as c:
            assert c.execute("SELECT 2").fetchone() == (2,)
    finally:
        for c in open_:
            c.close()
    refused = [line for line in audit_export(kt).splitlines() if '"refused"' in line]
    assert refused and all("too many connections for role" in line for line in refused)


def test_sockets_that_never_log_in_cannot_crowd_out_a_user(kt_limited: Keyturn) -> None:
    kt = kt_limited  # at most 3 sockets not logged in, 6 in all
    idle = [socket.create_connection(("127.0.0.1", kt.gateway_port)) for _ in range(20)]
    try:
        # The oldest were shed to make room, each told why.
        shed = read_to_eof(idle[0], 5)
        assert b"53300" in shed and b"too many connections are logging in" in shed
        with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        for s in idle:
            s.close()


def _raise_own_fd_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, want) if hard != resource.RLIM_INFINITY else want
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_eleven_thousand_idle_sockets_do_not_lock_out_real_users(
        pg: LocalPostgres, tmp_path: Path) -> None:
    limit = _raise_own_fd_limit(12_000)
    count = min(11_000, limit - 500)
    if count < 2_000:
        pytest.skip(f"only {limit} file descriptors here")
    kt = start_with_limits(tmp_path / "kt", pg, "{login_timeout: 60s}")  # default caps
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        t0 = time.monotonic()
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", kt.gateway_port), timeout=10))
        # Keep opening idle sockets while people log in.
        def flood() -> None:
            while not stop.is_set():
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", kt.gateway_port))
                socks.append(s)
                time.sleep(0.002)
        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        opened = time.monotonic() - t0
        for _ in range(3):
            psql = kt.psql("alice", "SELECT 'served ' || 6 * 7")
            out, err = psql.communicate(timeout=60)
            assert psql.returncode == 0 and out.strip() == "served 42", err
        with psycopg.connect(kt.dsn("bob"), autocommit=True, connect_timeout=10) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        # The gateway keeps a bounded number of descriptors, whatever the flood.
        assert gateway_fds(kt) < 600, gateway_fds(kt)
        stop.set()
        flooder.join()
        assert kt.proc is not None and kt.proc.poll() is None
        print(f"{len(socks)} idle sockets ({count} opened in {opened:.1f} s)")
    finally:
        stop.set()
        for s in socks:
            s.close()
        kt.stop()
    log = kt.log()
    assert "Traceback" not in log
    # Summarised, not one line per socket.
    summaries = re.findall(r"closed connections that had not logged in: (\d+) shed", log)
    assert 1 <= len(summaries) < 10 and sum(map(int, summaries)) >= count - 300, summaries


# ---------------------------------------------------------------- throttling

def test_failed_logins_back_off_per_user_and_address_without_locking_out(
        pg: LocalPostgres, tmp_path: Path) -> None:
    kt = start_with_limits(tmp_path / "kt", pg, "{auth_throttle: {free_attempts: 2, "
                           "base_delay: 300ms, max_delay: 1200ms}}")
    port, good = kt.gateway_port, kt.tokens["alice"]
    try:
        # Sequential wrong tokens from one address: free, free, then 0.3, 0.6, 1.2, 1.2 s.
        times = []
        for _ in range(6):
            code, elapsed = scram_login(port, "alice", "kt_wrong-guess", source="127.0.0.1")
            assert code == "28P01"
            times.append(elapsed)
        assert times[0] < 0.25 and times[1] < 0.25, times
        assert 0.25 < times[2] < 0.8 and 0.5 < times[3] < 1.1, times
        assert 1.1 < times[4] < 1.8 and 1.1 < times[5] < 1.8, times
        # psycopg sees the same answer, as late.
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(kt.dsn("alice").replace(good, "kt_wrong"))
        assert time.monotonic() - t0 > 1.0
        # The right token from another address is answered at once: no lock-out.
        code, elapsed = scram_login(port, "alice", good, source="127.0.0.2")
        assert code == "ok" and elapsed < 0.25, elapsed
        # From the guessing address it waits out that address's back-off, then logs in.
        code, elapsed = scram_login(port, "alice", good, source="127.0.0.1")
        assert code == "ok" and elapsed > 0.5, elapsed
        # Another user from a clean address is not slowed; alice's failures are, anywhere.
        assert scram_login(port, "bob", "kt_wrong", source="127.0.0.3")[1] < 0.25
        assert scram_login(port, "alice", "kt_wrong", source="127.0.0.4")[1] > 1.0
        # Guesses sent at once queue behind each other: parallel guessing is no faster.
        results: list[float] = []
        threads = [threading.Thread(target=lambda: results.append(
            scram_login(port, "dana", "kt_wrong", source="127.0.0.5")[1])) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results)[-1] > 1.8, results
    finally:
        export = audit_export(kt)
    failed = [line for line in export.splitlines() if '"auth_failed"' in line]
    assert len(failed) >= 14
    assert any('"throttle_ms"' in line for line in failed)
    throttled = [line for line in export.splitlines() if '"auth_throttled"' in line]
    assert throttled and any('"alice"' in line for line in throttled)


# ---------------------------------------------------------------- revocation

def _new_token(kt: Keyturn, user: str) -> tuple[int, str]:
    out = kt.cli("token", "create", "--user", user).stdout.splitlines()
    return int(out[0].split()[1]), out[-1].strip()


def test_revoking_a_token_ends_its_sessions_within_seconds(pg: LocalPostgres,
                                                          tmp_path: Path) -> None:
    kt = start_with_limits(tmp_path / "kt", pg, "{revocation_check: 500ms}")
    tid, token = _new_token(kt, "alice")
    dsn = kt.dsn("alice").replace(kt.tokens["alice"], token)
    busy = psycopg.connect(dsn, autocommit=True)
    idle = psycopg.connect(dsn, autocommit=True)
    other = psycopg.connect(kt.dsn("alice"), autocommit=True)  # alice's other token
    psql = subprocess.Popen(["psql", dsn, "-X", "-At", "-c", "SELECT pg_sleep(30)"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[BaseException] = []

    def sleep() -> None:
        try:
            busy.execute("SELECT pg_sleep(30)")
        except psycopg.Error as exc:
            errors.append(exc)

    sleeper = threading.Thread(target=sleep)
    try:
        assert idle.execute("SELECT 1").fetchone() == (1,)
        sleeper.start()
        time.sleep(0.5)
        kt.cli("token", "revoke", str(tid))
        t0 = time.monotonic()
        sleeper.join(10)
        assert time.monotonic() - t0 < 5
        assert errors and "your access token was revoked" in str(errors[0]), errors
        # An idle session is told too (libpq reports it with its next statement).
        raw = socket.socket(fileno=idle.pgconn.socket).dup()
        said = read_to_eof(raw, 5)
        raw.close()
        assert b"C57P01" in said and b"your access token was revoked" in said, said
        # psql, in the middle of a statement, sees it.
        _, err = psql.communicate(timeout=10)
        assert psql.returncode != 0 and "your access token was revoked" in err, err
        assert other.execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(dsn)
    finally:
        psql.kill()
        for c in (busy, idle, other):
            c.close()
        kt.stop()
    ended = [line for line in audit_export(kt).splitlines() if '"session_ended"' in line]
    assert len(ended) == 3 and all(f"access token {tid} was revoked" in e for e in ended)


# ---------------------------------------------------------------- store outage

def test_store_outage_keeps_the_data_plane_running(pg: LocalPostgres, tmp_path: Path) -> None:
    store = LocalPostgres(tmp_path / "store", auth="scram-sha-256")
    store.start()
    store.create_database("keyturn_store")
    url = (f"postgresql://{store.superuser}:{store.superuser_password}@127.0.0.1:"
           f"{store.port}/keyturn_store")
    kt = start_with_limits(tmp_path / "kt", pg, "{revocation_check: 500ms}",
                           store_url_env={"KEYTURN_TEST_STORE": url})
    try:
        open_ = psycopg.connect(kt.dsn("alice"), autocommit=True)
        store.stop()
        time.sleep(1)
        # The open session keeps working (reads need no store).
        for i in range(20):
            assert open_.execute(f"SELECT {i}").fetchone() == (i,)
        # New logins are told why, every time; the log says it once.
        for _ in range(10):
            with pytest.raises(psycopg.OperationalError) as exc:
                psycopg.connect(kt.dsn("bob"), connect_timeout=20)
            assert "the Keyturn store is unavailable" in str(exc.value), exc.value
            assert "internal error" not in str(exc.value)
        with socket.create_connection(("127.0.0.1", kt.gateway_port)) as s:
            s.sendall(startup_packet("bob"))
            kind, body = read_message(s)
            assert kind == b"E" and error_fields(body)["C"] == "57P03", body
        assert open_.execute("SELECT 'still here'").fetchone() == ("still here",)
        assert kt.proc is not None and kt.proc.poll() is None
        # One ERROR line for the episode (each refused login is one INFO line, as usual).
        errors = [line for line in kt.log().splitlines()
                  if " ERROR proxies.postgres" in line]
        assert len(errors) == 1 and "the Keyturn store is unavailable" in errors[0], errors
        assert "internal error" not in kt.log()
        # It recovers by itself.
        store.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(kt.dsn("bob"), connect_timeout=10) as c:
                    assert c.execute("SELECT 1").fetchone() == (1,)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert "the Keyturn store is available again" in kt.log()
        open_.close()
    finally:
        kt.stop()
        store.stop()


def test_unwritable_sqlite_store_keeps_the_gateway_alive(pg: LocalPostgres,
                                                         tmp_path: Path) -> None:
    """The SQLite store's files made immutable (``chattr +i``: root cannot write them
    either) while sessions run."""
    import shutil

    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr")
    kt = start_with_limits(tmp_path / "kt", pg, "{revocation_check: 500ms}")
    frozen = [*kt.base.glob("keyturn.db*"), kt.base]
    if subprocess.run(["chattr", "+i", str(frozen[0])], capture_output=True).returncode:
        kt.stop()
        pytest.skip("this file system has no immutable flag")
    try:
        open_ = psycopg.connect(kt.dsn("alice"), autocommit=True)
        for p in frozen:
            subprocess.run(["chattr", "+i", str(p)], check=True)
        for i in range(5):
            assert open_.execute(f"SELECT {i}").fetchone() == (i,)
            # Logins read the store: they work, or are told why they cannot.
            try:
                with psycopg.connect(kt.dsn("bob"), connect_timeout=20) as c:
                    assert c.execute("SELECT 1").fetchone() == (1,)
            except psycopg.OperationalError as exc:
                assert "the Keyturn store is unavailable" in str(exc), exc
            time.sleep(1)
        assert kt.proc is not None and kt.proc.poll() is None
        assert "internal error" not in kt.log()
        open_.close()
        rc = kt.stop()
    finally:
        for p in frozen:
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)
        kt.stop()
    # No SIGBUS (the store uses a rollback journal, nothing of it is memory-mapped).
    assert rc == 0, rc


# ---------------------------------------------------------------- analysis cost

def _huge_select(n: int) -> str:
    """A read of about 250 KiB whose parse tree takes the analyser over half a second
    (an expression per IN element), cheap for the server."""
    return "SELECT count(*) FROM orders WHERE id IN (" + \
        ",".join(f"{n + i}+1*2" for i in range(25_000)) + ")"


def victim_waits(kt: Keyturn, user: str, attackers: list[threading.Thread]) -> list[float]:
    """Run ``attackers`` while another session of ``user`` sends SELECT 1 every 50 ms:
    how long each of its answers took."""
    waits = []
    with psycopg.connect(kt.dsn(user), autocommit=True) as victim:
        victim.execute("SELECT 1")
        for a in attackers:
            a.start()
        while any(a.is_alive() for a in attackers):
            t0 = time.monotonic()
            assert victim.execute("SELECT 1").fetchone() == (1,)
            waits.append(time.monotonic() - t0)
            time.sleep(0.05)
        for a in attackers:
            a.join()
    return waits


def pipelines_beside_a_victim(pg: LocalPostgres, tmp_path: Path,
                              texts: list[list[str]]) -> None:
    """One session of alice per list of ``texts`` pipelines them as simple Queries in one
    write while bob's session sends SELECT 1 every 50 ms: bob never waits a second, and
    every text is judged (a read) and answered."""
    kt = make_keyturn(tmp_path / "kt", pg)
    kt.start()
    got: dict[int, list[bytes]] = {}

    def pipeline(j: int) -> None:
        sock = logged_in(kt.gateway_port, "alice", kt.tokens["alice"])
        sock.sendall(b"".join(query_message(t) for t in texts[j]))
        kinds: list[bytes] = []
        while kinds.count(b"Z") < len(texts[j]):
            kind, _ = read_message(sock)
            kinds.append(kind)
        got[j] = [k for k in kinds if k in (b"C", b"E", b"Z")]
        sock.close()

    try:
        waits = victim_waits(kt, "bob", [threading.Thread(target=pipeline, args=(j,))
                                         for j in range(len(texts))])
        assert len(waits) > 5 and max(waits) < 1.0, (max(waits), len(waits))
        assert got == {j: [b"C", b"Z"] * len(t) for j, t in enumerate(texts)}, got
    finally:
        kt.stop()


@pytest.mark.parametrize("kind", ["same", "distinct", "simple"])
def test_thousands_of_pipelined_small_batches_do_not_stall_other_sessions(
        pg: LocalPostgres, tmp_path: Path, kind: str) -> None:
    """24,000 tiny batches in one write (Parse/Bind/Execute/Sync of the same or of
    distinct statements, or simple Queries) once held the event loop for seconds: a
    session handles a bounded number of messages per turn and reads no more from its
    client while it has many waiting. Every batch is still answered, in order."""
    n = 24000
    if kind == "same":
        data = (P("", "SELECT 1") + B("", "") + E("") + S()) * n
    elif kind == "distinct":
        data = b"".join(P("", f"SELECT {i}") + B("", "") + E("") + S() for i in range(n))
    else:
        data = b"".join(query_message(f"SELECT {i}") for i in range(n))
    kt = make_keyturn(tmp_path / "kt", pg)
    kt.start()
    tags: list[bytes] = []

    def pipeline() -> None:
        sock = logged_in(kt.gateway_port, "alice", kt.tokens["alice"])
        sock.settimeout(120)
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        ready = 0
        while ready < n:
            kind_, body = read_message(sock)
            if kind_ == b"Z":
                ready += 1
            elif kind_ in (b"C", b"E"):
                tags.append(body[:-1] if kind_ == b"C" else b"error")
        sender.join()
        sock.close()

    try:
        waits = victim_waits(kt, "bob", [threading.Thread(target=pipeline)])
        assert len(waits) > 5 and max(waits) < 1.0, (max(waits), len(waits))
        assert tags == [b"SELECT 1"] * n, [t for t in tags if t != b"SELECT 1"][:3]
    finally:
        kt.stop()


def test_a_client_pipelining_huge_statements_does_not_stall_other_sessions(
        pg: LocalPostgres, tmp_path: Path) -> None:
    """Twelve pipelined ~250 KiB statements took the gateway's event loop for seconds
    while it analysed them; now each session analyses a bounded amount per turn and the
    rest goes to the analysis worker, so another session's SELECT 1 keeps its pace. The
    pipelining clients still get every answer, in order, each statement judged."""
    kt = make_keyturn(tmp_path / "kt", pg)
    kt.start()
    port, token = kt.gateway_port, kt.tokens["alice"]
    answers: dict[str, list[bytes]] = {}
    done: dict[str, float] = {}

    def simple_pipeline() -> None:
        sock = logged_in(port, "alice", token)
        t0 = time.monotonic()
        sock.sendall(b"".join(query_message(_huge_select(n)) for n in range(12)) +
                     query_message("CREATE TABLE copied AS " + _huge_select(0)))
        got: list[bytes] = []
        while len([k for k in got if k == b"Z"]) < 13:
            kind, body = read_message(sock)
            if kind in (b"C", b"E", b"Z"):
                got.append(kind if kind != b"E" else b"E" + body)
        done["simple"] = time.monotonic() - t0
        answers["simple"] = got
        sock.close()

    def extended_pipeline() -> None:
        with psycopg.connect(kt.dsn("alice"), autocommit=True) as conn:
            t0 = time.monotonic()
            with conn.pipeline():
                curs = [conn.execute(_huge_select(1000 + n).replace("1*2", "%s*2", 1), (1,))
                        for n in range(12)]
            answers["extended"] = [c.fetchone() for c in curs]  # type: ignore[misc]
            done["extended"] = time.monotonic() - t0

    try:
        waits = victim_waits(kt, "alice", [threading.Thread(target=simple_pipeline),
                                           threading.Thread(target=extended_pipeline)])
        # The analysis alone is over 0.5 s per statement (12 s of it on the loop before).
        assert done["simple"] > 3 and done["extended"] > 3, done
        assert len(waits) > 20 and max(waits) < 1.0, (max(waits), len(waits))
        simple = answers["simple"]
        # Twelve reads answered (C, Z), then the schema change refused by policy (E, Z).
        assert simple[:24] == [b"C", b"Z"] * 12, simple[:24]
        assert simple[24].startswith(b"E") and b"schema changes go through migrations" \
            in simple[24], simple[24]
        assert answers["extended"] == [(0,)] * 12, answers["extended"]
    finally:
        records = audit_export(kt)
    reads = [line for line in records.splitlines() if '"SELECT count(*) FROM orders WHERE' in line
             and '"statement"' in line]
    assert len(reads) >= 24, len(reads)


def test_short_deeply_nested_statements_do_not_stall_other_sessions(
        pg: LocalPostgres, tmp_path: Path) -> None:
    """Short texts of nested subqueries cost far more to analyse than their length says
    (7 KiB at depth 800: about as much as 200 KiB of flat SQL). Ten sessions pipelining
    them took the loop for seconds when only length counted; now cost counts (length times
    nesting) against one budget for the whole loop, and the rest goes to the worker.
    Every statement is still judged (a read) and answered."""
    texts = [["SELECT " + "(SELECT " * 800 + f"{j * 10 + k}" + ")" * 800 for k in range(2)]
             for j in range(10)]
    pipelines_beside_a_victim(pg, tmp_path, texts)


def test_many_sessions_of_cheap_looking_slow_statements_do_not_stall_others(
        pg: LocalPostgres, tmp_path: Path) -> None:
    """A 4 KiB sum of 2,000 terms has no parentheses but nests 2,000 levels deep (about
    20 ms to analyse): operators count in its cost, and cheap texts stop at twice the
    loop's budget however many sessions send them. Twenty sessions pipelining eight each
    kept another session waiting seconds when each could spend its own share."""
    texts = [["SELECT " + "+".join(["1"] * 1990) + f"+{j}{k}" for k in range(8)]
             for j in range(20)]
    pipelines_beside_a_victim(pg, tmp_path, texts)


def test_statements_analysed_elsewhere_keep_the_session_namespace(
        pg: LocalPostgres, tmp_path: Path) -> None:
    """A large message analysed by the worker changes the session's prepared names as it
    would have here: the write it PREPAREs is known as a write when EXECUTEd (held for
    approval), not lost as an unknown name and not mistaken for a read."""
    kt = make_keyturn(tmp_path / "kt", pg)
    kt.start()
    try:
        sock = logged_in(kt.gateway_port, "alice", kt.tokens["alice"])
        sock.sendall(query_message("PREPARE r AS SELECT 1") +
                     query_message("DEALLOCATE r; PREPARE r AS UPDATE orders SET status = "
                                   "status WHERE id < 0; " + _huge_select(0)) +
                     query_message("EXECUTE r"))
        seen: list[tuple[bytes, bytes]] = []
        while True:
            kind, body = read_message(sock)
            seen.append((kind, body))
            if kind == b"N" or kind == b"E":
                break
        tags = [body.rstrip(b"\0") for kind, body in seen if kind == b"C"]
        assert tags == [b"PREPARE", b"DEALLOCATE", b"PREPARE", b"SELECT 1"], tags
        assert seen[-1][0] == b"N" and b"held for approval" in seen[-1][1], seen[-1]
        sock.close()
    finally:
        records = audit_export(kt)
    held = [line for line in records.splitlines() if '"statement": "EXECUTE r"' in line]
    assert held and all('"classification": "write"' in line for line in held), held


def test_the_loop_analysis_budget_is_shared_and_starts_over_each_iteration() -> None:
    from keyturn.analysis.elsewhere import LoopBudget
    from keyturn.analysis.postgres import analysis_cost

    assert analysis_cost("SELECT 1") == 200 + 8
    assert analysis_cost("SELECT f((1))") == 200 + 13 * 3
    assert analysis_cost("SELECT ')'") == 200 + 10 * 1  # a ) alone never lowers below 0
    assert analysis_cost("SELECT 1+2*3") == 200 + 12 + 2 * 12  # operators nest the tree

    async def main() -> list[bool]:
        budget = LoopBudget(100, cheap=10, own=20)
        taken = [budget.take(95, 0), budget.take(60, 0),  # the second is over the budget
                 budget.take(10, 0), budget.take(10, 15), budget.take(10, 25)]
        await asyncio.sleep(0)  # the next iteration: the budget starts over
        return [*taken, budget.take(90, 0)]

    # (A cheap text still goes while its session spent little: the 3rd and 4th.)
    assert asyncio.run(main()) == [True, False, True, True, False, True]

    async def many_sessions() -> list[bool]:
        budget = LoopBudget(100, cheap=10, own=20)
        return [budget.take(10, 0) for _ in range(25)]  # 25 sessions, one cheap text each

    # Cheap texts stop at twice the budget, however many sessions send them.
    assert asyncio.run(many_sessions()) == [True] * 20 + [False] * 5
