"""Tickets outlive the process that held them: a dead gateway instance's tickets are
abandoned, expiry runs for every ticket, and nothing abandoned can run.

The first half drives ``Approvals`` and ``liveness`` on both store backends with
explicit clocks; the second kills real gateway processes holding real statements.

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests
from sqlalchemy import func, select

from keyturn.approvals import (
    ABANDONED,
    APPROVED,
    DECIDED,
    FAILED,
    PENDING,
    TRANSITIONS,
    Approvals,
    TicketRequest,
)
from keyturn.errors import AlreadyDecided
from keyturn.identity import Identity
from keyturn.launch.localpg import LocalPostgres
from keyturn.liveness import Instance, Sweeper
from keyturn.models import TicketEvent
from keyturn.store import Store
from tests.conftest import KEYTURN, Keyturn, free_port, make_keyturn, wait_port

T0 = 1_000_000.0
DANA = Identity("dana", ("approvers",))


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        st = Store(f"sqlite:///{tmp_path / 'k.db'}")
    else:
        pg: LocalPostgres = request.getfixturevalue("pg")
        pg.execute("DROP DATABASE IF EXISTS keyturn_abandon")
        pg.create_database("keyturn_abandon")
        st = Store(f"postgresql://{pg.superuser}:{pg.superuser_password}@127.0.0.1:{pg.port}"
                   "/keyturn_abandon")
    st.upgrade()
    yield st
    st.dispose()


def hold(approvals: Approvals, instance: Instance | None, *, mode: str = "hold",
         now: float = T0) -> int:
    approvals.instance_id = instance.id if instance else None
    return approvals.create(TicketRequest(
        requester="alice", requester_groups=("engineers",), connection="shop",
        statement="DELETE FROM orders", classification="write", rule="writes", reason="r",
        approver_groups=("approvers",), min_approvals=1, timeout=3600, mode=mode,
        gateway_id="gw"), now=now).id


def instance(store: Store, *, interval: float = 1.0, now: float = T0) -> Instance:
    inst = Instance(store, "gw", interval=interval)
    inst.register(now=now)
    return inst


def test_abandoned_is_terminal_and_reachable_only_from_open_states() -> None:
    assert TRANSITIONS[ABANDONED] == {} and ABANDONED in DECIDED
    assert [s for s, moves in TRANSITIONS.items() if "abandon" in moves] == [PENDING, APPROVED]


def test_a_dead_instances_tickets_are_abandoned_and_cannot_be_decided(store: Store) -> None:
    approvals = Approvals(store)
    dead, live = instance(store), instance(store)
    pending = hold(approvals, dead)
    approved = hold(approvals, dead)
    approvals.vote(approved, DANA, "approve", "ok", now=T0 + 1)
    claimed = hold(approvals, dead)
    approvals.vote(claimed, DANA, "approve", now=T0 + 1)
    assert approvals.claim(claimed, approvals.get(claimed).binding, now=T0 + 2)
    others = [hold(approvals, live), hold(approvals, dead, mode="defer"), hold(approvals, None)]

    live.beat(now=T0 + 10)
    # Two missed beats: not dead yet.
    assert approvals.abandon_orphans(now=T0 + 2.9) == []
    moved = approvals.abandon_orphans(now=T0 + 10)
    assert moved == [(pending, ABANDONED), (approved, ABANDONED), (claimed, FAILED)]
    assert approvals.abandon_orphans(now=T0 + 10) == []
    assert approvals.statuses(others) == {others[0]: PENDING, others[1]: PENDING,
                                          others[2]: PENDING}

    t = approvals.get(pending)
    assert t.decided_at == T0 + 10 and t.decided_by is None
    assert "session ended" in (t.decision_comment or "")
    assert approvals.get(approved).decided_by == "dana", "the approval stays on record"
    assert "outcome unknown" in (approvals.get(claimed).result_error or "")
    kinds = [e["kind"] for e in approvals.detail(pending)["events"]]
    assert kinds == ["created", "abandoned"]

    with pytest.raises(AlreadyDecided, match="abandoned: the requester's session ended"):
        approvals.vote(pending, DANA, "approve")
    assert not approvals.claim(approved, approvals.get(approved).binding)


def test_a_stopped_or_unknown_instance_is_dead_at_once(store: Store) -> None:
    approvals = Approvals(store)
    stopped = instance(store)
    tid = hold(approvals, stopped)
    stopped.stopped(now=T0 + 0.5)
    unregistered = Instance(store, "gw")  # a row deleted, or never written
    other = hold(approvals, unregistered)
    assert approvals.abandon_orphans(now=T0 + 1) == [(tid, ABANDONED), (other, ABANDONED)]


def test_a_beating_instance_keeps_its_tickets(store: Store) -> None:
    approvals = Approvals(store)
    inst = instance(store, interval=0.5)
    tid = hold(approvals, inst)
    for i in range(1, 20):
        inst.beat(now=T0 + i)  # one beat a second against a 0.5 s interval: 1.5 s bound
        assert approvals.abandon_orphans(now=T0 + i + 1.4) == []
    assert approvals.abandon_orphans(now=T0 + 19 + 1.6) == [(tid, ABANDONED)]


def test_sweepers_running_at_once_move_each_ticket_once(store: Store) -> None:
    approvals = Approvals(store)
    dead = instance(store)
    ids = [hold(approvals, dead) for _ in range(30)]
    due = [hold(approvals, None, now=T0 - 7200) for _ in range(10)]  # expired an hour ago
    results: list[list[tuple[int, str]]] = []
    start = threading.Barrier(4)

    def sweep() -> None:
        start.wait()
        results.append(Sweeper(Approvals(store), interval=1).sweep(now=T0 + 100))

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    moved = sorted(m for r in results for m in r)
    assert moved == sorted([(i, ABANDONED) for i in ids] + [(i, "expired") for i in due])
    with store.session() as s:
        n = s.scalar(select(func.count()).select_from(TicketEvent)
                     .where(TicketEvent.kind.in_(("abandoned", "expired"))))
    assert n == 40


def test_expiry_needs_no_waiting_gateway(store: Store) -> None:
    """The sweeper expires every due ticket, whichever process created it."""
    approvals = Approvals(store)
    tid = hold(approvals, None, now=T0)
    assert Sweeper(approvals).sweep(now=T0 + 3601) == [(tid, "expired")]


# ---------------------------------------------------------------- real gateway processes

def _gateway(kt: Keyturn, config: Path, beat: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ, **kt.env, KEYTURN_HEARTBEAT_INTERVAL=str(beat),
               KEYTURN_SWEEP_INTERVAL="0.1")
    log = open(config.with_suffix(".log"), "ab")  # noqa: SIM115 - the process keeps it
    return subprocess.Popen([*KEYTURN, "-c", str(config), "gateway"], cwd=kt.base,
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def _status(kt: Keyturn, tid: int) -> dict:
    r = requests.get(f"{kt.url}/api/v1/tickets/{tid}",
                     headers={"Authorization": f"Bearer {kt.tokens['bob']}"}, timeout=5)
    return r.json()


def _wait_status(kt: Keyturn, tid: int, status: str, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if _status(kt, tid)["status"] == status:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"ticket {tid} is {_status(kt, tid)['status']}, not {status}")


def _value(kt: Keyturn, row: int) -> int:
    with psycopg.connect(kt.pg.dsn("shop")) as c:
        return c.execute("SELECT v FROM abandon_probe WHERE id = %s", (row,)).fetchone()[0]


def _psql(kt: Keyturn, port: int, sql: str) -> subprocess.Popen[str]:
    dsn = kt.dsn("alice").replace(f"port={kt.gateway_port}", f"port={port}")
    return subprocess.Popen(["psql", dsn, "-X", "-At", "-c", sql], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PGCONNECT_TIMEOUT="10"))


def _ingesters_of(gateway_pid: int) -> list[int]:
    """Running processes started with KEYTURN_INGEST_PARENT=<gateway_pid>."""
    mark = f"KEYTURN_INGEST_PARENT={gateway_pid}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0") \
                    and (proc / "stat").read_text().split(") ", 1)[1][0] != "Z":
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _spool_files_of(kt: Keyturn, gateway_pid: int) -> list[Path]:
    return list((kt.base / "audit-spool").glob(f"*-{gateway_pid}.jsonl"))


@pytest.fixture(params=["sqlite", "postgres"])
def fleet(request: pytest.FixtureRequest, pg: LocalPostgres, tmp_path: Path
          ) -> Iterator[tuple[Keyturn, Path, int]]:
    """A portal process (it sweeps) and a second gateway config on another port, all on
    one store (SQLite, or PostgreSQL with LISTEN/NOTIFY); the test starts the gateways."""
    store_env = None
    if request.param == "postgres":
        pg.execute("DROP DATABASE IF EXISTS keyturn_fleet")
        pg.create_database("keyturn_fleet")
        store_env = {"KEYTURN_TEST_STORE": f"postgresql://{pg.superuser}:"
                     f"{pg.superuser_password}@127.0.0.1:{pg.port}/keyturn_fleet"}
    kt = make_keyturn(tmp_path / "kt", pg, store_url_env=store_env)
    pg.execute("DROP TABLE IF EXISTS abandon_probe; CREATE TABLE abandon_probe (id int, v int);"
               "INSERT INTO abandon_probe VALUES (1, 0), (2, 0), (3, 0);"
               "ALTER TABLE abandon_probe OWNER TO app", dbname="shop")
    port_b = free_port()
    config_b = kt.base / "keyturn-b.yaml"
    config_b.write_text(kt.config.read_text().replace(
        f"postgres: 127.0.0.1:{kt.gateway_port}", f"postgres: 127.0.0.1:{port_b}"))
    env = dict(os.environ, **kt.env, KEYTURN_SWEEP_INTERVAL="0.1")
    portal = subprocess.Popen([*KEYTURN, "-c", str(kt.config), "portal"], cwd=kt.base,
                              stdout=open(kt.base / "portal.log", "ab"),  # noqa: SIM115
                              stderr=subprocess.STDOUT, env=env)
    try:
        wait_port(kt.portal_port, proc=portal)
        yield kt, config_b, port_b
    finally:
        portal.send_signal(signal.SIGTERM)
        portal.wait(20)


@pytest.mark.integration
def test_killed_gateway_tickets_are_abandoned_and_never_run(
        fleet: tuple[Keyturn, Path, int]) -> None:
    kt, config_b, port_b = fleet
    beat = 0.2
    gw_a = _gateway(kt, kt.config, beat)
    gw_b = _gateway(kt, config_b, beat)
    clients: list[subprocess.Popen[str]] = []
    try:
        wait_port(kt.gateway_port, proc=gw_a)
        wait_port(port_b, proc=gw_b)
        clients.append(_psql(kt, kt.gateway_port, "UPDATE abandon_probe SET v = 1 WHERE id = 1"))
        held_a = kt.wait_ticket()["id"]
        clients.append(_psql(kt, port_b, "UPDATE abandon_probe SET v = 1 WHERE id = 2"))
        held_b = kt.wait_ticket()["id"]

        assert _ingesters_of(gw_a.pid), "the gateway runs its audit ingester"
        assert _spool_files_of(kt, gw_a.pid), "and writes its spool file"
        gw_a.send_signal(signal.SIGKILL)
        gw_a.wait(10)
        took = _wait_status(kt, held_a, ABANDONED, timeout=10)
        print(f"abandoned {took:.2f} s after the kill")
        # 3 missed beats of 0.2 s after the last one, plus a sweep, plus polling
        assert took < 3 * beat + 1.5, took
        detail = _status(kt, held_a)
        assert detail["events"][-1]["kind"] == "abandoned"
        res = kt.cli("approve", str(held_a), token_of="dana", check=False)
        assert res.returncode != 0
        assert "abandoned" in res.stderr + res.stdout
        assert _value(kt, 1) == 0, "nothing ran on the target"

        # Its ingester drained the dead gateway's spool file, removed it, and exited.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
                _ingesters_of(gw_a.pid) or _spool_files_of(kt, gw_a.pid)):
            time.sleep(0.1)
        assert not _ingesters_of(gw_a.pid), "no ingester outlives its gateway"
        assert not _spool_files_of(kt, gw_a.pid), "a dead gateway's spool file is removed"

        # The other gateway is alive: its ticket waited, and runs once approved.
        assert _status(kt, held_b)["status"] == PENDING
        kt.cli("approve", str(held_b), token_of="dana")
        out, err = clients[1].communicate(timeout=30)
        assert out.strip() == "UPDATE 1", err
        assert _value(kt, 2) == 1
    finally:
        for p in (gw_a, gw_b, *clients):
            if p.poll() is None:
                p.kill()
                p.wait()


def _stop_outside_a_write(kt: Keyturn, gw: subprocess.Popen[bytes]) -> None:
    """SIGSTOP the gateway at a moment it holds no lock on a SQLite store (stopped inside
    a transaction, it would keep every writer waiting, the approval too: the store's
    rollback journal lets no write commit while a reader holds the file, which is not
    what these tests are about)."""
    db = kt.base / "keyturn.db"
    for _ in range(50):
        gw.send_signal(signal.SIGSTOP)
        if not db.exists():
            return  # the PostgreSQL store
        probe = sqlite3.connect(db, timeout=0.5)
        try:
            probe.execute("BEGIN EXCLUSIVE")  # no other reader or writer now
            probe.rollback()
            return
        except sqlite3.OperationalError:
            gw.send_signal(signal.SIGCONT)  # stopped inside a transaction: let it end
            time.sleep(0.02)
        finally:
            probe.close()
    raise AssertionError("the gateway held a lock on the store at every try")


@pytest.mark.integration
def test_an_approved_ticket_of_a_dead_gateway_ends_abandoned(
        fleet: tuple[Keyturn, Path, int]) -> None:
    """Approved while its gateway could not claim it (stopped), then the gateway dies:
    the approval never runs anywhere."""
    kt, _, _ = fleet
    beat = 1.0  # room to approve while the gateway is stopped but not yet taken for dead
    gw = _gateway(kt, kt.config, beat)
    client = None
    try:
        wait_port(kt.gateway_port, proc=gw)
        client = _psql(kt, kt.gateway_port, "UPDATE abandon_probe SET v = 1 WHERE id = 3")
        tid = kt.wait_ticket()["id"]
        _stop_outside_a_write(kt, gw)
        kt.cli("approve", str(tid), token_of="dana")
        assert _status(kt, tid)["status"] == APPROVED
        gw.send_signal(signal.SIGKILL)
        gw.wait(10)
        _wait_status(kt, tid, ABANDONED, timeout=3 * beat + 5)
        assert _status(kt, tid)["decided_by"] == "dana"
        assert _value(kt, 3) == 0
    finally:
        for p in (gw, client):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
