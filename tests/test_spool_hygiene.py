"""The audit spool's housekeeping: the ingester stops cleanly on SIGTERM, fully
ingested files of dead writers are removed, and an unwritable spool refuses new
work instead of growing memory.

These tests must not depend on a server a person started: the store is a SQLite file and
every process here is started by the tests themselves.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from keyturn.auditspool import AuditIngester, AuditSpool
from keyturn.config import parse_config
from keyturn.models import AuditSpoolCursor
from keyturn.services import Services, build_services
from tests.test_core import CONFIG as CORE_CONFIG

# The core tests' configuration, with the spool in the test's directory.
CONFIG = CORE_CONFIG + 'gateway: {audit_spool: "%(spool)s"}\n'


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "keyturn.yaml"
    path.write_text(CONFIG % {"db": tmp_path / "k.db", "spool": tmp_path / "spool"})
    subprocess.run([sys.executable, "-m", "keyturn.launch", "-c", str(path), "db", "upgrade"],
                   check=True, capture_output=True)
    return path


def _stored(db: Path) -> int:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT count(*) FROM audit_records").fetchone()[0]


def _spooled_lines(spool: Path, db: Path) -> int:
    """Records in the spool past the ingester's stored offsets."""
    with sqlite3.connect(db) as c:
        offsets = dict(c.execute('SELECT source, "offset" FROM audit_spool'))
    return sum(1 for p in spool.glob("*.jsonl")
               for line in p.read_bytes()[offsets.get(p.name, 0):].splitlines()
               if line != b'{"_eof":true}')


def _ingester(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "keyturn.launch", "-c", str(config), "audit",
                             "ingest", "--follow"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _wait_ingesting(proc: subprocess.Popen[bytes], db: Path, total: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0].decode()
        try:
            n = _stored(db)
        except sqlite3.OperationalError:
            n = 0
        if 0 < n < total:
            return n
        assert n < total, "the ingester finished before the test could signal it"
        time.sleep(0.005)
    raise TimeoutError("the ingester did not start")


def _fill(spool_dir: Path, n: int) -> None:
    spool = AuditSpool(spool_dir, "gw")
    for i in range(n):
        spool.record(kind="statement", statement=f"SELECT {i}", user="alice")
    spool.close()


def test_sigterm_while_ingesting_drains_and_exits(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _fill(tmp_path / "spool", 30_000)
    proc = _ingester(config)
    _wait_ingesting(proc, tmp_path / "k.db", 30_000)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()
    assert _stored(tmp_path / "k.db") == 30_000, "the first SIGTERM drains the spool"
    assert not list((tmp_path / "spool").glob("*.jsonl"))


def test_a_storm_of_signals_never_deadlocks_and_loses_nothing(tmp_path: Path) -> None:
    """Signals landing at any point of the ingester's work (the old handler deadlocked
    on the stop Event's lock): it exits within seconds; the second signal cuts the
    drain short and what is not ingested stays in the spool."""
    config = _config(tmp_path)
    _fill(tmp_path / "spool", 200_000)
    proc = _ingester(config)
    _wait_ingesting(proc, tmp_path / "k.db", 200_000)
    t0 = time.monotonic()
    for _ in range(300):
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGTERM if _ % 2 else signal.SIGINT)
        time.sleep(0.001)
    out, _ = proc.communicate(timeout=10)
    assert time.monotonic() - t0 < 10
    # 0, or a signal that arrived after the ingester had put back the default handlers
    assert proc.returncode in (0, -signal.SIGINT, -signal.SIGTERM), out.decode()
    stored = _stored(tmp_path / "k.db")
    assert stored + _spooled_lines(tmp_path / "spool", tmp_path / "k.db") == 200_000
    assert stored < 200_000, "the second signal ended the drain early"


def test_the_ingester_of_a_dead_gateway_stops(tmp_path: Path) -> None:
    """The gateway sets KEYTURN_INGEST_PARENT; when that process is gone the ingester
    drains and exits by itself, even without the kernel's parent-death signal."""
    config = _config(tmp_path)
    _fill(tmp_path / "spool", 100)
    # A short-lived middle process starts the ingester and exits: the ingester's parent
    # changes, as when a gateway dies before its PR_SET_PDEATHSIG took effect.
    code = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], "
            "env={**os.environ, 'KEYTURN_INGEST_PARENT': str(os.getpid())}); print(p.pid)")
    mid = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "keyturn.launch",
                          "-c", str(config), "audit", "ingest", "--follow"],
                         capture_output=True, text=True, check=True)
    pid = int(mid.stdout)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    alive = _alive(pid)
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the orphaned ingester kept running"
    assert _stored(tmp_path / "k.db") == 100


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- removing ingested files

@pytest.fixture()
def svc(tmp_path: Path) -> Services:
    return build_services(parse_config(CONFIG % {"db": tmp_path / "k.db",
                                                 "spool": tmp_path / "spool"},
                                       str(tmp_path / "keyturn.yaml")))


WRITER = """
import sys, time
from sqlalchemy import func, select

from keyturn.auditspool import AuditIngester, AuditSpool
from keyturn.config import parse_config
from keyturn.models import AuditSpoolCursor
from keyturn.services import Services, build_services
spool = AuditSpool(sys.argv[1], "gw")
for i in range(int(sys.argv[2])):
    spool.record(kind="statement", statement=f"SELECT {i}")
spool.flush()
print("written", flush=True)
time.sleep(600)
"""


def test_a_killed_writers_file_is_ingested_to_its_end_and_removed(svc: Services,
                                                                   tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(spool_dir), "1000"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "written\n"
        ing = AuditIngester(svc.audit, spool_dir, batch=300)
        assert ing.run_once() == 1000
        assert len(list(spool_dir.glob("*.jsonl"))) == 1, "a live writer's file stays"
    finally:
        writer.kill()  # SIGKILL: no end marker, no close
        writer.wait()
    assert ing.run_once() == 0
    assert not list(spool_dir.glob("*.jsonl")), "a dead writer's ingested file is removed"
    assert [r["statement"] for r in svc.audit.iter_records()] == \
        [f"SELECT {i}" for i in range(1000)]
    with svc.store.session() as s:
        assert s.scalar(select(func.count()).select_from(AuditSpoolCursor)) == 0


def test_a_file_with_records_left_is_never_removed(svc: Services, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead writer's file (no lock, no end marker, a torn last line) whose ingestion
    fails half-way stays until every record is in the store; the torn line is kept."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    path = spool_dir / "gw-1-1.jsonl"
    lines = b"".join(b'{"kind":"statement","statement":"SELECT %d"}\n' % i for i in range(50))
    path.write_bytes(lines + b'{"kind":"statement","stat')
    ing = AuditIngester(svc.audit, spool_dir, batch=20)
    real_append = svc.audit.append
    calls = {"n": 0}

    def failing_append(*args: object, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the store went away")
        real_append(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(svc.audit, "append", failing_append)
    with pytest.raises(RuntimeError):
        ing.run_once()
    assert path.exists(), "30 records are not ingested yet: the file stays"
    monkeypatch.setattr(svc.audit, "append", real_append)
    assert ing.run_once() == 31
    assert not path.exists()
    records = list(svc.audit.iter_records())
    assert [r["statement"] for r in records[:50]] == [f"SELECT {i}" for i in range(50)]
    assert records[50]["kind"] == "unreadable"
    assert records[50]["detail"]["raw"] == '{"kind":"statement","stat'
    assert svc.audit.verify().ok


def test_a_half_created_spool_file_is_cleaned_up(svc: Services, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    empty = spool_dir / "gw-1-1.jsonl.new"
    empty.write_bytes(b"")
    young = spool_dir / "gw-2-2.jsonl.new"
    young.write_bytes(b"")
    written = spool_dir / "gw-3-3.jsonl.new"
    written.write_bytes(b'{"kind":"statement","statement":"SELECT 1"}\n')
    old = time.time() - 3600
    for p in (empty, written):
        os.utime(p, (old, old))
    assert AuditIngester(svc.audit, spool_dir).run_once() == 1
    assert sorted(p.name for p in spool_dir.iterdir() if not p.name.startswith(".")) == \
        ["gw-2-2.jsonl.new"]


# ---------------------------------------------------------------- an unwritable spool

UNWRITABLE = """
import json, logging, resource, signal, sys, time
from keyturn.auditspool import AuditSpool

logging.basicConfig(format="%(levelname)s %(message)s")

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
BOUND = 100_000
spool = AuditSpool(sys.argv[1], "gw", flush_interval=0.02, max_pending=BOUND)
out = {"changes": []}
spool.watch(out["changes"].append)
def wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()

for i in range(100):
    spool.record(kind="statement", statement=f"SELECT {i}")
assert wait(lambda: spool.pending_bytes == 0)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
# The file may grow by half a line more: the next write is torn, then writes fail.
resource.setrlimit(resource.RLIMIT_FSIZE, (spool.path.stat().st_size + 20, hard))
i = 100
while spool.accepting and i < 100_000:
    spool.record(kind="statement", statement=f"SELECT {i}")
    i += 1
out["refused_after"] = i - 100
out["refusal"] = spool.refusal
# Clients keep going (refused statements are audited too): memory stays bounded.
peak = 0
for _ in range(50_000):
    spool.record(kind="statement", statement=f"SELECT {i}")
    i += 1
    peak = max(peak, spool.pending_bytes)
out["peak"] = peak
time.sleep(0.3)  # the flusher retries meanwhile
out["still_refusing"] = not spool.accepting
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
out["recovered"] = wait(lambda: spool.accepting)
out["refusal_after"] = spool.refusal
for j in range(10):
    spool.record(kind="statement", statement=f"AFTER {j}")
spool.close()
out["appended"] = i
print(json.dumps(out))
"""


def test_an_unwritable_spool_refuses_with_bounded_memory_and_recovers(tmp_path: Path) -> None:
    """A real spool file whose writes fail (RLIMIT_FSIZE: EFBIG, as a full disk gives
    ENOSPC): past the bound the spool stops accepting, memory stays under twice the
    bound however many records arrive, the log says it once, and once writes work again
    it accepts again, with a record of how many records were dropped in between."""
    spool_dir = tmp_path / "spool"
    res = subprocess.run([sys.executable, "-c", UNWRITABLE, str(spool_dir)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    bound = 100_000
    assert 0 < out["refused_after"] * 40 < 3 * bound
    assert out["refusal"].startswith("keyturn: the audit trail cannot be written (File too "
                                     "large)")
    # kept lines (twice the bound) + the buffer's own limit (the bound) + one line
    assert 2 * bound < out["peak"] <= 3 * bound + 100
    assert out["still_refusing"] and out["recovered"] and out["refusal_after"] is None
    assert out["changes"] == [False, True]
    errors = [line for line in res.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 3, res.stderr  # failed, refusing, dropping: once each
    assert "writable again" in res.stderr and "records were dropped" in res.stderr

    (path,) = spool_dir.glob("*.jsonl")
    raw = path.read_bytes().splitlines()
    assert raw[-1] == b'{"_eof":true}'
    records, torn = [], 0
    for line in raw[:-1]:
        try:
            records.append(json.loads(line))
        except ValueError:
            torn += 1  # the write that hit the limit half-way
    assert torn <= 1
    statements = [r["statement"] for r in records if r["kind"] == "statement"]
    assert statements[:100] == [f"SELECT {i}" for i in range(100)]
    assert statements[-10:] == [f"AFTER {j}" for j in range(10)]
    numbers = [int(s.split()[1]) for s in statements[:-10]]
    assert numbers == sorted(set(numbers)), "kept in order, never doubled"
    (gap,) = [r for r in records if r["kind"] == "audit-dropped"]
    assert len(numbers) + torn + gap["detail"]["records"] == out["appended"]
