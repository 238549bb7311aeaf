"""Write-ahead audit: every statement that reached the target has a record, even when
the gateway is killed (-9) or the client goes away while the statement runs.

The gateway writes an intent record (who, what, the decision) to its spool file before
it sends a statement, and completes it with the outcome later; the ingester holds an
intent back until its outcome is read and, when the writer died first, stores it with
the outcome ``unknown``.

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest

from keyturn import auditschema
from keyturn.auditspool import EOF_MARK, AuditIngester
from keyturn.config import parse_config
from keyturn.launch.localpg import LocalPostgres
from keyturn.services import build_services
from tests.conftest import APP_PASSWORD, Keyturn, direct_shop, make_keyturn, wait_port
from tests.test_core import CONFIG

WRITES = """
  writes:
    default: block
    rules:
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
      - name: log-writes
        match: {class: write, tables: ["public.wal_log"]}
        action: allow
"""


def line(**rec: object) -> str:
    return orjson.dumps(rec).decode() + "\n"


#: How intent lines are written: as the gateway writes them (its per-session prefix, the
#: number last), or as any JSON line.
INTENT_FORMATS = ("gateway", "plain")
_intent_format = {"now": "gateway"}


@pytest.fixture(params=INTENT_FORMATS)
def intent_format(request: pytest.FixtureRequest) -> Iterator[str]:
    _intent_format["now"] = request.param
    yield request.param
    _intent_format["now"] = "gateway"


def intent(n: int, sql: str, session: str = "s1") -> str:
    if _intent_format["now"] == "gateway":
        prefix = auditschema.line_prefix(kind="intent", user="alice", connection="db",
                                         protocol="postgres", session_id=session,
                                         client_addr="127.0.0.1")
        rest = orjson.dumps({"at": 1.0, "statement": sql, "classification": "write",
                             "action": "allow", "rule": "w", "reason": "r", "n": n})
        return (prefix + rest[1:] + b"\n").decode()
    return line(kind="intent", user="alice", connection="db", session_id=session,
                statement=sql, classification="write", action="allow", rule="w", reason="r",
                at=1.0, n=n)


def done(n: int, sql: str, session: str = "s1", outcome: str = "ok") -> str:
    return line(kind="statement", user="alice", connection="db", session_id=session,
                statement=sql, classification="write", action="allow", rule="w", reason="r",
                at=2.0, outcome=outcome, duration_ms=1.0, rows=1, n=n)


@pytest.fixture()
def audit(tmp_path: Path):  # type: ignore[no-untyped-def]
    cfg = parse_config(CONFIG % {"db": tmp_path / "k.db"}, str(tmp_path / "keyturn.yaml"))
    svc = build_services(cfg)
    yield svc.audit
    svc.store.dispose()


def spool_file(d: Path, name: str, text: str) -> Path:
    d.mkdir(exist_ok=True)
    f = d / name
    f.write_text(text)
    return f


# ---------------------------------------------------------------- the ingester

def test_an_intent_is_held_back_until_its_outcome(  # type: ignore[no-untyped-def]
        audit, tmp_path: Path, intent_format: str) -> None:
    d = tmp_path / "spool"
    d.mkdir()
    f = d / "gw-1-1.jsonl"
    with open(f, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # a live writer
        fh.write(intent(2, "INSERT 1") + intent(4, "INSERT 2") + done(2, "INSERT 1"))
        fh.flush()
        ing = AuditIngester(audit, d)
        assert ing.run_once() == 1  # INSERT 2 is still running
        # A restarted ingester knows INSERT 2 is still waiting (kept with the cursor).
        fh.write(done(4, "INSERT 2", outcome="error"))
        fh.flush()
        assert AuditIngester(audit, d).run_once() == 1
        fh.write(EOF_MARK)
    AuditIngester(audit, d).run_once()
    recs = list(audit.iter_records())
    assert [(r["statement"], r["outcome"]) for r in recs] == [("INSERT 1", "ok"),
                                                             ("INSERT 2", "error")]
    assert all(r["kind"] == "statement" for r in recs)
    assert not f.exists()


def test_a_dead_writers_unfinished_statements_are_stored_as_unknown(  # type: ignore[no-untyped-def]
        audit, tmp_path: Path, intent_format: str) -> None:
    d = tmp_path / "spool"
    spool_file(d, "gw-1-1.jsonl", intent(2, "INSERT 1") + intent(4, "UPDATE 2") +
               done(2, "INSERT 1"))  # no end marker, no lock: the writer was killed
    assert AuditIngester(audit, d).run_once() == 2
    recs = {r["statement"]: r for r in audit.iter_records()}
    assert recs["INSERT 1"]["outcome"] == "ok"
    assert recs["UPDATE 2"]["outcome"] == "unknown"
    assert "may have run" in recs["UPDATE 2"]["detail"]["note"]
    assert audit.verify().ok


def test_outcomes_written_after_a_rotation_complete_their_intents(  # type: ignore[no-untyped-def]
        audit, tmp_path: Path, intent_format: str) -> None:
    d = tmp_path / "spool"
    spool_file(d, "gw-1-7.jsonl", intent(2, "INSERT 1") + intent(4, "INSERT 2") +
               line(_eof=True, next="gw-2-7.jsonl"))
    spool_file(d, "gw-2-7.jsonl", done(4, "INSERT 2") + done(2, "INSERT 1") + EOF_MARK)
    assert AuditIngester(audit, d).run_once() == 2
    recs = list(audit.iter_records())
    assert sorted((r["statement"], r["outcome"]) for r in recs) == [("INSERT 1", "ok"),
                                                                   ("INSERT 2", "ok")]
    assert not list(d.glob("*.jsonl"))


def test_a_torn_intent_whose_outcome_never_came_is_kept_unreadable(audit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "spool"
    torn = intent(4, "UPDATE 2").replace('"statement"', '"statement', 1)  # not JSON now
    spool_file(d, "gw-1-1.jsonl", intent(2, "INSERT 1") + torn + done(2, "INSERT 1"))
    assert AuditIngester(audit, d).run_once() == 2
    recs = {r["kind"]: r for r in audit.iter_records()}
    assert sorted(recs) == ["statement", "unreadable"]
    assert '"statement:"UPDATE 2"' in recs["unreadable"]["detail"]["raw"]
    assert audit.verify().ok


# ---------------------------------------------------------------- through the gateway

@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    kt = make_keyturn(tmp_path_factory.mktemp("wal"), pg, extra=WRITES, shop_policy="writes")
    with direct_shop(pg) as c:
        c.execute("DROP TABLE IF EXISTS wal_log")
        c.execute("CREATE TABLE wal_log (v bigint PRIMARY KEY)")
    yield kt
    kt.stop()


def statements(kt: Keyturn) -> list[dict]:
    out = kt.cli("audit", "export", "--format", "jsonl").stdout
    return [r for r in map(orjson.loads, out.splitlines()) if r.get("kind") == "statement"]


def test_kill_9_under_load_loses_no_statement_that_reached_the_target(
        kt: Keyturn, pg: LocalPostgres, tmp_path: Path) -> None:
    script = tmp_path / "insert.sql"
    script.write_text("\\set v random(1, 1000000000000)\n"
                      "INSERT INTO wal_log VALUES (:v) ON CONFLICT DO NOTHING;\n")
    kt.start()
    env = dict(os.environ, PGPASSWORD=kt.tokens["alice"])
    bench = subprocess.Popen(
        ["pgbench", "-n", "-c", "4", "-j", "2", "-T", "30", "-f", str(script),
         "-h", "127.0.0.1", "-p", str(kt.gateway_port), "-U", "alice", "shop"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)
        assert kt.proc is not None
        os.kill(kt.proc.pid, signal.SIGKILL)  # mid-flight: statements sent, answers not
        kt.proc.wait(10)
        kt.proc = None
    finally:
        bench.wait(60)
    with psycopg.connect(pg.dsn("shop", user="app", password=APP_PASSWORD)) as c:
        written = {int(r[0]) for r in c.execute("SELECT v FROM wal_log")}
    assert len(written) > 500, "the load ran"
    kt.cli("audit", "ingest")
    recorded: dict[int, str] = {}
    for rec in statements(kt):
        text = rec["statement"] or ""
        if text.startswith("INSERT INTO wal_log VALUES ("):
            recorded[int(text.split("(", 1)[1].split(")", 1)[0])] = rec["outcome"]
    missing = written - set(recorded)
    assert not missing, f"{len(missing)} committed INSERTs have no audit record"
    assert kt.cli("audit", "verify").returncode == 0


def test_a_write_still_running_when_its_client_dies_is_recorded(
        kt: Keyturn, pg: LocalPostgres) -> None:
    if kt.proc is None:
        kt.start()
    wait_port(kt.gateway_port)
    sql = "INSERT INTO wal_log SELECT -1 FROM pg_sleep(2)"
    client = kt.psql("alice", sql)
    with psycopg.connect(pg.dsn("shop", user="app", password=APP_PASSWORD),
                         autocommit=True) as c:
        end = time.monotonic() + 30
        while not c.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                            "'%%wal_log SELECT -1 FROM pg_sleep(2)%%' AND state = 'active' "
                            "AND pid <> pg_backend_pid()").fetchone()[0]:
            assert time.monotonic() < end, "the INSERT never reached the target"
            time.sleep(0.05)
    client.kill()  # kill -9 of psql while the INSERT runs on the target
    client.wait(10)
    deadline = time.monotonic() + 10
    with psycopg.connect(pg.dsn("shop", user="app", password=APP_PASSWORD),
                         autocommit=True) as c:
        while c.execute("SELECT count(*) FROM wal_log WHERE v = -1").fetchone() != (1,):
            assert time.monotonic() < deadline, "the INSERT committed on the target"
            time.sleep(0.2)
    kt.stop()  # flushes the spool; the ingester drains it
    kt.cli("audit", "ingest")
    recs = [r for r in statements(kt) if r["statement"] == sql]
    assert [r["outcome"] for r in recs] == ["unknown"], recs
    assert "may have run" in recs[0]["detail"].get("note", "") or recs[0]["detail"]
