"""What analysis may cost, against a real PostgreSQL and a real ``keyturn up``: no
message, however built, makes the gateway stop serving other sessions (views defined on
views, prepared names changed over and over, the shared analysis worker kept busy or
replaced, huge statements on masked connections), and a refused statement defines
nothing for anyone. Found by an independent attack run; each test failed before its fix.

These tests must not depend on a server a person started: PostgreSQL and Keyturn are
started here.
"""
from __future__ import annotations

import socket
import threading
import time

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from proxies.postgres import codec
from tests.conftest import Keyturn, make_keyturn
from tests.test_pg_limits import error_fields, logged_in, query_message, read_message

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory):
    k = make_keyturn(tmp_path_factory.mktemp("kt13"), pg)
    k.start()
    yield k
    k.stop()


def _view_dag(prefix: str, width: int, depth: int) -> str:
    """Blocked CREATE VIEWs whose definitions form a DAG: each view of level i reads
    every view of level i+1."""
    stmts = []
    for level in range(depth):
        names = ", ".join(f"{prefix}{level + 1}_{k}" for k in range(width))
        for k in range(width):
            stmts.append(f"CREATE VIEW {prefix}{level}_{k} AS SELECT 1 AS x FROM {names}")
    return "; ".join(stmts)


def _timed_query(sock: socket.socket, sql: str, timeout: float) -> tuple[float, list]:
    sock.settimeout(timeout)
    t0 = time.monotonic()
    sock.sendall(query_message(sql))
    got = []
    while True:
        kind, body = read_message(sock)
        got.append((kind, body[:200]))
        if kind == b"Z":
            return time.monotonic() - t0, got


def test_blocked_create_views_freeze_the_gateway_for_everyone(kt: Keyturn) -> None:
    """alice may not run DDL (rule no-ddl blocks it). A ~1 KiB message of
    16 blocked CREATE VIEWs whose definitions form a 2-wide DAG is 'noted' as defined
    before the policy blocks it (catalog._note runs inside _decide), and usercode's
    judgement of session-defined views re-parses their texts on every reference with no
    memo: exponential work on the event loop. Other sessions get no answer meanwhile
    (depth 8: ~10 s; depth 10: > 3 minutes)."""
    victim = psycopg.connect(kt.dsn("bob"), autocommit=True)
    victim.execute("SELECT 1")
    sock = logged_in(kt.gateway_port, "alice", kt.tokens["alice"])
    waits: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            victim.execute("SELECT 1").fetchone()
            waits.append(time.monotonic() - t0)
            time.sleep(0.05)

    th = threading.Thread(target=probe)
    th.start()
    time.sleep(0.3)
    dt, got = _timed_query(sock, _view_dag("frz_", 2, 8), 170)
    time.sleep(0.3)
    stop.set()
    th.join()
    assert got[0][0] == b"E" and b"no-ddl" in got[0][1]  # it was blocked...
    # ... yet the gateway served no one while it was being judged
    assert max(waits) < 1.0, f"victim's SELECT 1 waited {max(waits):.1f} s (attack took {dt:.1f} s)"


def test_blocked_create_view_poisons_other_users_reads(kt: Keyturn) -> None:
    """a *blocked* CREATE VIEW counts as a definition of that name for
    every session of the target while its session is not idle. alice opens a
    transaction and sends a refused CREATE VIEW customers AS <advisory lock>; bob's
    plain SELECT FROM customers is then judged as running it (lock class ->
    refused/held) for as long as alice keeps her transaction open."""
    with psycopg.connect(kt.dsn("alice")) as alice:  # not autocommit: BEGIN implicit
        with pytest.raises(psycopg.Error, match="no-ddl"):
            alice.execute("CREATE VIEW customers AS SELECT pg_advisory_lock(1) AS id")
        # alice's transaction stays open (aborted); she does nothing more.
        time.sleep(1.0)
        with psycopg.connect(kt.dsn("bob"), autocommit=True) as bob:
            err = None
            try:
                n = bob.execute("SELECT count(*) FROM customers").fetchone()
            except psycopg.Error as exc:
                err = str(exc)
            assert err is None, f"bob's ordinary read refused because of alice's blocked DDL: {err}"
            assert n[0] > 0


def _probe(conn: psycopg.Connection, waits: list[float], stop: threading.Event) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        conn.execute("SELECT 1").fetchone()
        waits.append(time.monotonic() - t0)
        time.sleep(0.05)


def _probing(kt: Keyturn) -> tuple[psycopg.Connection, list[float], threading.Event,
                                  threading.Thread]:
    """bob's session running SELECT 1 over and over (``_probe``), its waits recorded."""
    victim = psycopg.connect(kt.dsn("bob"), autocommit=True)
    victim.execute("SELECT 1")
    waits: list[float] = []
    stop = threading.Event()
    th = threading.Thread(target=_probe, args=(victim, waits, stop))
    th.start()
    time.sleep(0.3)
    return victim, waits, stop, th


def _prepare_pileup(n_prep: int = 400, n_exec: int = 600) -> str:
    return ";".join(f"prepare p as table t{i}" for i in range(n_prep)) + ";" + \
        ";".join("execute p" for _ in range(n_exec))


def test_prepared_candidate_pileup_stalls_event_loop(kt: Keyturn) -> None:
    """a 15 KiB simple Query (under the 16 KiB per-turn budget, so it is
    analysed on the event loop) of 400 PREPAREs of one name and 600 EXECUTEs of it:
    every EXECUTE merges all pending candidates (PreparedStatements.lookup ->
    _merge_candidates, each re-uniquing growing tables/reasons tuples): cubic, ~14 s of
    event loop per message, during which no other session is served."""
    sql = _prepare_pileup()
    assert len(sql.encode()) < 16 * 1024
    victim, waits, stop, th = _probing(kt)
    sock = logged_in(kt.gateway_port, "alice", kt.tokens["alice"])
    dt, got = _timed_query(sock, sql, 170)
    time.sleep(0.3)
    stop.set()
    th.join()
    assert max(waits) < 1.0, \
        f"victim's SELECT 1 waited {max(waits):.1f} s (attack message took {dt:.1f} s)"


def _big_read(n: int = 3000) -> str:
    """An ordinary ~20 KiB read (an IN list an ORM might send)."""
    return "SELECT count(*) FROM orders WHERE id IN (" + \
        ",".join(str(i) for i in range(n, n + 4000)) + ")"


def test_one_session_denies_the_analysis_worker_to_everyone(kt: Keyturn) -> None:
    """the analysis worker is one process shared by every session, and its
    30 s timeout counts from submission. One ~27 KiB message of PREPARE/EXECUTE pile-up
    (cubic, > 30 s) occupies it; another user's ordinary 20 KiB SELECT queues behind it
    and is then refused (the worker is killed on the attacker's timeout; the victim's
    analysis fails -> UNKNOWN -> blocked), after waiting ~30 s."""
    sql = _prepare_pileup(700, 1000)
    assert len(sql) > 16 * 1024
    sock = logged_in(kt.gateway_port, "alice", kt.tokens["alice"])
    sock.sendall(query_message(sql))
    time.sleep(1.0)
    with psycopg.connect(kt.dsn("bob"), autocommit=True) as bob:
        t0 = time.monotonic()
        err = None
        try:
            bob.execute(_big_read()).fetchone()
        except psycopg.Error as exc:
            err = str(exc)
        dt = time.monotonic() - t0
    sock.close()
    assert err is None and dt < 5, f"victim's 20 KiB read: {dt:.1f} s, error: {err}"


def test_cancelled_analysis_leaves_victim_session_hanging(kt: Keyturn) -> None:
    """when the worker is replaced (attacker's message over the 30 s timeout),
    AnalysisPool._replace shuts the pool down with cancel_futures=True: other sessions'
    texts still queued get their futures *cancelled*; awaiting them raises
    asyncio.CancelledError (a BaseException), which neither AnalysisPool.analyze nor
    _analyse_elsewhere ('except Exception') catches, so _replay_backlog never runs: the
    victim's statement sits in its backlog and the client waits forever."""
    sql = _prepare_pileup(700, 1000)
    att = logged_in(kt.gateway_port, "alice", kt.tokens["alice"])
    att.sendall(query_message(sql))
    time.sleep(1.0)
    victims = [logged_in(kt.gateway_port, "bob", kt.tokens["bob"]) for _ in range(4)]
    for i, v in enumerate(victims):
        v.sendall(query_message(_big_read(5000 + i)))
        time.sleep(0.2)
    outcomes: list = [None] * len(victims)

    def read(i: int, v: socket.socket) -> None:
        v.settimeout(70)
        got = []
        try:
            while True:
                kind, body = read_message(v)
                got.append(kind if kind != b"E" else error_fields(body).get("M", "")[:80])
                if kind == b"Z":
                    break
            outcomes[i] = got
        except TimeoutError:
            outcomes[i] = "NO ANSWER after 70 s"

    ths = [threading.Thread(target=read, args=(i, v)) for i, v in enumerate(victims)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    att.close()
    assert all(o != "NO ANSWER after 70 s" for o in outcomes), outcomes


def test_masked_connection_traces_huge_statements_on_the_event_loop(kt: Keyturn) -> None:
    """analysis elsewhere moves the *analysis* of large texts to the worker, but
    on a masked connection every read is then traced for lineage (masker._mask_setup ->
    lineage.trace, which parses and walks the whole text again) on the event loop, with
    no budget. Twelve pipelined ~250 KiB reads on shopmask stall every other session."""
    from tests.test_pg_limits import _huge_select

    victim, waits, stop, th = _probing(kt)
    s = logged_in(kt.gateway_port, "alice", kt.tokens["alice"], "shopmask")
    s.settimeout(120)
    t0 = time.monotonic()
    s.sendall(b"".join(query_message(_huge_select(n)) for n in range(12)))
    zs, errs = 0, []
    while zs < 12:
        kind, b = read_message(s)
        if kind == b"Z":
            zs += 1
        if kind == b"E":
            errs.append(error_fields(b).get("M", "")[:100])
    dt = time.monotonic() - t0
    time.sleep(0.3)
    stop.set()
    th.join()
    s.close()
    assert max(waits) < 1.0, (f"victim's SELECT 1 waited {max(waits):.1f} s (12 masked "
                              f"reads took {dt:.1f} s; errors: {errs[:2]})")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_a_batch_of_huge_parses_cannot_make_the_gateway_hold_hundreds_of_megabytes(
        kt: Keyturn) -> None:
    """A batch is judged as a whole, so the analyses of all its Parses are held at once
    (about 4.7 MB for a 176 KB text of 11,000 calls). 100 such Parses before one Sync
    grew the gateway by 530 MB; past 4 MiB of SQL per batch a Parse's text is now
    UNKNOWN unanalysed (an Execute of it would be refused by the policy)."""
    assert kt.proc is not None
    before = _rss_mb(kt.proc.pid)
    sock = logged_in(kt.gateway_port, "alice", kt.tokens["alice"])
    texts = ["SELECT " + ",".join(f"f{k}_{i}(c{i})" for i in range(11000)) for k in range(100)]
    peak = before
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_mb(kt.proc.pid))  # type: ignore[union-attr]
            time.sleep(0.2)

    w = threading.Thread(target=watch)
    w.start()
    sock.sendall(b"".join(codec.encode_parse("", sql) for sql in texts) + codec.encode_sync())
    sock.settimeout(170)
    errors = []
    try:
        while True:
            kind, body = read_message(sock)
            if kind == b"E":
                errors.append(error_fields(body).get("M", ""))
            if kind == b"Z":
                break
        sock.sendall(query_message("SELECT 1"))  # the session goes on
        rows = []
        while True:
            kind, body = read_message(sock)
            rows.append(kind)
            if kind == b"Z":
                break
    finally:
        done.set()
        w.join()
        sock.close()
    assert peak - before < 200, f"gateway RSS grew {peak - before:.0f} MB"
    assert errors, "the Parses name functions that do not exist"
    assert b"D" in rows, rows
