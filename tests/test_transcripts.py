"""Session transcripts written by the audit ingester (keyturn.transcripts): the spool
lines a gateway writes go through a real AuditIngester into a real store; each session's
transcript holds what its records say, is sealed by its disconnect with a ``recording``
record in the chain, survives ingester restarts and failed commits without losing or
doubling a line, and a session whose gateway died is sealed as incomplete."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keyturn.auditspool import AuditIngester, AuditSpool
from keyturn.config import parse_config
from keyturn.recording import Recorder
from keyturn.services import Services, build_services
from keyturn.transcripts import OPEN_DIR, read_transcript, writer_of
from tests.test_core import CONFIG as CORE_CONFIG

CONFIG = CORE_CONFIG + 'gateway: {audit_spool: "%(spool)s"}\n'
T0 = 1_700_000_000.0


@pytest.fixture()
def svc(tmp_path: Path) -> Services:
    return build_services(parse_config(CONFIG % {"db": tmp_path / "k.db",
                                                 "spool": tmp_path / "spool"},
                                       str(tmp_path / "keyturn.yaml")))


def _session(spool: AuditSpool, sid: str, *, statements: range, connect: bool = True,
             disconnect: bool = True) -> None:
    """What the PostgreSQL session writes: connect, statements, disconnect."""
    who = {"user": "alice", "connection": "shop", "session_id": sid,
           "client_addr": "10.0.0.7", "protocol": "postgres"}
    if connect:
        spool.record(kind="connect", at=T0, **who, detail={"application": "psql"})
    for i in statements:
        spool.record(kind="statement", at=T0 + i + 0.5, **who, statement=f"SELECT {i}",
                     classification="read", action="allow", rule="reads", outcome="ok",
                     rows=1, duration_ms=2.0)
    if disconnect:
        spool.record(kind="disconnect", at=T0 + 100, **who, duration_ms=100_000.0)


def _ingester(svc: Services, tmp_path: Path, **kw: Any) -> AuditIngester:
    return AuditIngester(svc.audit, tmp_path / "spool", recordings=tmp_path / "rec", **kw)


def _recording_records(svc: Services) -> list[dict[str, Any]]:
    return list(svc.audit.iter_records(kind="recording"))


def _statements(path: Path) -> list[str]:
    return [e["text"] for e in read_transcript(path)[1] if e["d"] == "i"]


def test_a_session_becomes_a_transcript_sealed_in_the_chain(svc: Services,
                                                            tmp_path: Path) -> None:
    spool = AuditSpool(tmp_path / "spool", "gw")
    _session(spool, "s1", statements=range(3))
    spool.record(kind="statement", at=T0 + 5, user="alice", session_id="s1",
                 statement="DROP TABLE orders", classification="ddl", action="block",
                 rule="no-ddl", reason="schema changes go through migrations",
                 outcome="blocked")  # after the disconnect: not in the sealed transcript
    spool.close()
    _ingester(svc, tmp_path).run_once()
    [rec] = _recording_records(svc)
    kinds = [r["kind"] for r in svc.audit.iter_records(session_id="s1")]
    assert kinds[-3:] == ["disconnect", "recording", "statement"], \
        "the recording record follows its disconnect"
    ref = rec["detail"]
    assert rec["outcome"] == "ok" and rec["user"] == "alice" and rec["protocol"] == "postgres"
    assert ref["format"] == "transcript" and ref["duration"] == 100.0
    path = Recorder(tmp_path / "rec").path(ref)
    assert ref["name"] == path.name == "s1.jsonl"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref["sha256"]
    assert path.stat().st_size == ref["bytes"]
    header, events = read_transcript(path)
    assert header["session_id"] == "s1" and header["started"] == T0
    assert header["user"] == "alice" and header["application"] == "psql"
    assert [(e["d"], e.get("kind"), e.get("text")) for e in events] == \
        [("e", "connect", None)] + \
        [x for i in range(3) for x in (("i", None, f"SELECT {i}"), ("o", None, None))] + \
        [("e", "disconnect", None)]
    first_in, first_out = events[1], events[2]
    assert first_in == {"t": 0.498, "d": "i", "text": "SELECT 0", "cls": "read",
                        "decision": "allow", "rule": "reads"}
    assert first_out == {"t": 0.5, "d": "o", "outcome": "ok", "rows": 1, "ms": 2.0}
    assert not list((tmp_path / "rec" / OPEN_DIR).glob("*.json")), "the marker is gone"
    result = svc.audit.verify(Recorder(tmp_path / "rec"))
    assert result.ok and result.recordings == 1
    path.write_bytes(path.read_bytes().replace(b"SELECT 1", b"SELECT 9"))
    result = svc.audit.verify(Recorder(tmp_path / "rec"))
    assert not result.ok and result.chain_ok
    assert "session s1" in result.recording_problems[0]
    assert "SHA-256" in result.recording_problems[0]


def test_an_ingester_restart_mid_session_loses_and_doubles_nothing(svc: Services,
                                                                   tmp_path: Path) -> None:
    spool = AuditSpool(tmp_path / "spool", "gw")
    _session(spool, "s2", statements=range(0, 4), disconnect=False)
    spool.flush()
    first = _ingester(svc, tmp_path, batch=3)
    first.run_once()
    assert _recording_records(svc) == []
    [marker] = (tmp_path / "rec" / OPEN_DIR).glob("*.json")
    assert marker.name == "s2.json"
    # The first ingester is gone (no suspend, no goodbye); another takes over.
    del first
    _session(spool, "s2", statements=range(4, 6), connect=False)
    spool.close()
    second = _ingester(svc, tmp_path)
    second.run_once()
    [rec] = _recording_records(svc)
    path = Recorder(tmp_path / "rec").path(rec["detail"])
    assert _statements(path) == [f"SELECT {i}" for i in range(6)]
    assert svc.audit.verify(Recorder(tmp_path / "rec")).ok


def test_a_failed_commit_is_rebuilt_from_the_store(svc: Services, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spool = AuditSpool(tmp_path / "spool", "gw")
    _session(spool, "s3", statements=range(0, 2), disconnect=False)
    spool.flush()
    ing = _ingester(svc, tmp_path)
    ing.run_once()
    _session(spool, "s3", statements=range(2, 4), connect=False)
    spool.close()
    append = svc.audit.append
    calls = []

    def failing(*args: Any, **kw: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the store went away")
        append(*args, **kw)

    monkeypatch.setattr(svc.audit, "append", failing)
    with pytest.raises(RuntimeError):
        ing.run_once()  # the transcript got the lines, the store did not
    ing.run_once()
    [rec] = _recording_records(svc)
    path = Recorder(tmp_path / "rec").path(rec["detail"])
    assert _statements(path) == [f"SELECT {i}" for i in range(4)]
    assert svc.audit.verify(Recorder(tmp_path / "rec")).ok


def test_another_ingester_in_between_is_noticed(svc: Services, tmp_path: Path) -> None:
    """The gateway's ingester and an operator's ``keyturn audit verify`` take turns."""
    spool = AuditSpool(tmp_path / "spool", "gw")
    _session(spool, "s4", statements=range(0, 2), disconnect=False)
    spool.flush()
    child = _ingester(svc, tmp_path)
    child.run_once()
    _session(spool, "s4", statements=range(2, 3), connect=False, disconnect=False)
    spool.flush()
    _ingester(svc, tmp_path).run_once()  # the operator's
    _session(spool, "s4", statements=range(3, 5), connect=False)
    spool.close()
    child.run_once()
    [rec] = _recording_records(svc)
    path = Recorder(tmp_path / "rec").path(rec["detail"])
    assert _statements(path) == [f"SELECT {i}" for i in range(5)]
    assert svc.audit.verify(Recorder(tmp_path / "rec")).ok


KILLED = """
import sys, time
from keyturn.auditspool import AuditSpool
from tests.test_transcripts import _session
spool = AuditSpool(sys.argv[1], "gw")
_session(spool, "s5", statements=range(3), disconnect=False)
spool.flush()
print("written", flush=True)
time.sleep(600)
"""


def test_a_session_whose_gateway_died_is_sealed_incomplete(svc: Services,
                                                           tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    writer = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path / "spool")],
                              stdout=subprocess.PIPE, text=True, cwd=root)
    ing = _ingester(svc, tmp_path)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "written\n"
        ing.run_once()
        assert _recording_records(svc) == [], "the gateway still runs: the session is open"
    finally:
        writer.kill()  # no disconnect, no end marker
        writer.wait()
    ing.run_once()
    [rec] = _recording_records(svc)
    assert rec["outcome"] == "incomplete" and "gateway stopped" in rec["reason"]
    path = Recorder(tmp_path / "rec").path(rec["detail"])
    _, events = read_transcript(path)
    assert _statements(path) == ["SELECT 0", "SELECT 1", "SELECT 2"]
    assert events[-1]["kind"] == "gateway-gone"
    assert rec["detail"]["duration"] == 2.5
    assert svc.audit.verify(Recorder(tmp_path / "rec")).ok


def test_more_sessions_than_open_files(svc: Services, tmp_path: Path) -> None:
    spool = AuditSpool(tmp_path / "spool", "gw")
    for n in range(6):
        _session(spool, f"m{n}", statements=range(1), disconnect=False)
    for n in range(6):
        _session(spool, f"m{n}", statements=range(1, 3), connect=False)
    spool.close()
    ing = _ingester(svc, tmp_path)
    assert ing.transcripts is not None
    ing.transcripts.max_open = 2
    ing.run_once()
    recs = _recording_records(svc)
    assert sorted(r["session_id"] for r in recs) == [f"m{n}" for n in range(6)]
    for rec in recs:
        path = Recorder(tmp_path / "rec").path(rec["detail"])
        assert _statements(path) == ["SELECT 0", "SELECT 1", "SELECT 2"]
    assert svc.audit.verify(Recorder(tmp_path / "rec")).ok


def test_writer_names() -> None:
    assert writer_of("gateway-1700000000123456-4242.jsonl") == "gateway-4242"
    assert writer_of("eu-west-gw-1700000000123456-7.jsonl") == "eu-west-gw-7"
    assert json.dumps(writer_of("x.jsonl")) == '"x"'


# ---------------------------------------------------------------- through a live gateway


def test_statements_through_a_live_gateway_are_in_its_transcript(pg: Any,
                                                                 tmp_path: Path) -> None:
    """Real psycopg and psql sessions through ``keyturn up``: each session's transcript
    holds its statements in the order they ran (the compiled fast path's too) with their
    outcomes; its recording record is in the chain with the file's SHA-256; ``keyturn
    audit verify`` passes, and reports the file once it is edited or gone."""
    import psycopg
    from conftest import direct_shop, make_keyturn

    kt = make_keyturn(tmp_path / "kt", pg)
    kt.start()
    try:
        with direct_shop(pg) as d:  # other tests share the database: count it now
            orders = d.execute("SELECT count(*) FROM orders").fetchone()
            ids = [r[0] for r in d.execute("SELECT id FROM orders ORDER BY id LIMIT 5")]
        with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM orders").fetchone() == orders
            for i in ids:  # repeated: the fast path takes over
                assert c.execute("SELECT id FROM orders WHERE id = %s", (i,)).fetchone() == (i,)
            with pytest.raises(psycopg.Error, match="migrations"):
                c.execute("DROP TABLE orders")
            with pytest.raises(psycopg.errors.DivisionByZero):
                c.execute("SELECT 1/0")
            c.execute("SELECT name FROM customers ORDER BY id LIMIT 3").fetchall()
        psql = kt.psql("carol", "SELECT 42")
        out, err = psql.communicate(timeout=30)
        assert psql.returncode == 0 and out.strip() == "42", err
    finally:
        assert kt.stop() == 0
    records = [json.loads(line) for line in kt.cli("audit", "export").stdout.splitlines()]
    recordings = {r["session_id"]: r for r in records if r["kind"] == "recording"}
    sessions = {r["session_id"]: r["user"] for r in records if r["kind"] == "connect"}
    assert set(recordings) == set(sessions) and len(sessions) == 2
    recorder = Recorder(kt.base / "recordings")
    for sid, rec in recordings.items():
        ref = rec["detail"]
        path = recorder.path(ref)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == ref["sha256"]
        stmts = [r for r in records if r["session_id"] == sid and r["kind"] == "statement"]
        header, events = read_transcript(path)
        assert header["user"] == sessions[sid] == rec["user"]
        ins = [e for e in events if e["d"] == "i"]
        outs = [e for e in events if e["d"] == "o"]
        assert [e["text"] for e in ins] == [r["statement"] for r in stmts]
        assert [(e["outcome"], e.get("rows")) for e in outs] == \
            [(r["outcome"], r["rows"]) for r in stmts]
        times = [e["t"] for e in outs]
        assert times == sorted(times) and 0 <= times[0] <= times[-1] <= ref["duration"]
        kinds = [r["kind"] for r in records if r["session_id"] == sid]
        assert kinds[-2:] == ["disconnect", "recording"]
    alice = next(s for s, u in sessions.items() if u == "alice")
    _, events = read_transcript(recorder.path(recordings[alice]["detail"]))
    texts = [e["text"] for e in events if e["d"] == "i"]
    assert texts[0] == "SELECT count(*) FROM orders"
    assert texts.count("SELECT id FROM orders WHERE id = $1") == 5
    assert texts[-3:] == ["DROP TABLE orders", "SELECT 1/0",
                          "SELECT name FROM customers ORDER BY id LIMIT 3"]
    by_text = {e["text"]: o for e, o in zip(
        [e for e in events if e["d"] == "i"], [e for e in events if e["d"] == "o"],
        strict=True)}
    assert by_text["DROP TABLE orders"]["outcome"] == "blocked"
    assert "migrations" in by_text["DROP TABLE orders"]["reason"]
    assert by_text["SELECT 1/0"] | {"t": 0, "ms": 0} == \
        {"t": 0, "d": "o", "outcome": "error", "error": "22012", "ms": 0}
    assert by_text["SELECT name FROM customers ORDER BY id LIMIT 3"]["rows"] == 3

    ok = kt.cli("audit", "verify")
    assert "audit chain OK" in ok.stdout and "recordings OK: 2 match" in ok.stdout
    path = recorder.path(recordings[alice]["detail"])
    path.write_bytes(path.read_bytes().replace(b"LIMIT 3", b"LIMIT 9"))
    bad = kt.cli("audit", "verify", check=False)
    assert bad.returncode == 1, bad.stdout
    assert "audit chain OK" in bad.stdout and "recordings BROKEN: 1 of 2" in bad.stdout
    assert f"session {alice}" in bad.stdout and "SHA-256" in bad.stdout
    path.unlink()
    gone = kt.cli("audit", "verify", "--json", check=False)
    assert gone.returncode == 1
    assert "cannot read it" in json.loads(gone.stdout)["recording_problems"][0]
