"""Core services on a real SQLite store: config, tokens, approvals, audit."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from keyturn.approvals import TRANSITIONS, TicketRequest
from keyturn.config import parse_config
from keyturn.errors import (
    AlreadyDecided,
    AlreadyVoted,
    ConfigError,
    InvalidTransition,
    NotAnApprover,
    SelfApproval,
    Unauthorized,
)
from keyturn.services import Services, build_services

CONFIG = """
store: {url: "sqlite:///%(db)s"}
identity:
  users:
    alice: {groups: [engineers]}
    bob: {groups: [approvers]}
    dana: {groups: [approvers]}
    erin: {groups: [approvers, engineers]}
connections:
  - name: shop
    type: postgres
    target: {host: 127.0.0.1, port: 5432, user: app, password_env: SHOP_PW}
    policy: p
policies:
  p:
    rules:
      - name: reads
        match: {class: read}
        action: allow
"""


@pytest.fixture()
def svc(tmp_path: Path) -> Services:
    cfg = parse_config(CONFIG % {"db": tmp_path / "k.db"}, str(tmp_path / "keyturn.yaml"))
    return build_services(cfg)


def ticket(svc: Services, requester: str = "alice", n: int = 1, timeout: float = 600) -> int:
    t = svc.approvals.create(TicketRequest(
        requester=requester, requester_groups=svc.config.groups_of(requester),
        connection="shop", statement="DELETE FROM orders", classification="write",
        rule="writes", reason="r", approver_groups=("approvers",), min_approvals=n,
        timeout=timeout))
    return t.id


def who(svc: Services, user: str):  # type: ignore[no-untyped-def]
    return svc.identities.identity_of(user)


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("snippet, line, needle", [
    ("connections:\n  - name: x\n    type: oracle\n", 3, "connections[0].type"),
    ("connections:\n  - name: x\n    type: postgres\n    target: {host: h, password: s}\n"
     "    policy: p\npolicies: {p: []}\n", 4, "secrets must not be inline"),
    ("policies:\n  p:\n    rules:\n      - name: r\n        action: maybe\n", 5,
     "policies.p.rules[0].action"),
    ("policies:\n  p:\n    rules:\n      - name: r\n        action: review\n", 4,
     "needs approver groups"),
    ("policies:\n  p:\n    rules:\n      - name: r\n        match: {class: writes}\n"
     "        action: allow\n", 5, "unknown class 'writes'"),
    ("identity:\n  users:\n    a: {groups: [x]}\n  bogus: 1\n", 4, "identity.bogus"),
    ("store: {url: mysql://x}\n", 1, "store.url"),
    ("a: [\n", 2, "invalid YAML"),
])
def test_config_errors_name_key_and_line(snippet: str, line: int, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(snippet, "k.yaml")
    msg = str(exc.value)
    assert msg.startswith(f"k.yaml:{line}:"), msg
    assert needle in msg


def test_config_secret_reference_resolves_from_env(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    cfg = parse_config(CONFIG % {"db": tmp_path / "k.db"}, "k.yaml")
    ref = cfg.connections["shop"].target.password
    assert ref is not None
    monkeypatch.delenv("SHOP_PW", raising=False)
    with pytest.raises(ConfigError, match="SHOP_PW is not set"):
        ref.resolve()
    monkeypatch.setenv("SHOP_PW", "s3cret")
    assert ref.resolve() == "s3cret"


# ---------------------------------------------------------------- tokens

def test_tokens_hashed_expire_and_revoke(svc: Services) -> None:
    issued = svc.identities.create_token("alice", ttl=3600)
    assert svc.identities.authenticate_token(issued.token).user == "alice"
    with svc.store.engine.connect() as c:
        stored = c.execute(text("SELECT * FROM tokens")).mappings().one()
    assert issued.token not in {str(v) for v in stored.values()}
    svc.identities.revoke_token(issued.id)
    with pytest.raises(Unauthorized):
        svc.identities.authenticate_token(issued.token)
    old = svc.identities.create_token("alice", ttl=1, now=time.time() - 10)
    with pytest.raises(Unauthorized):
        svc.identities.authenticate_token(old.token)
    creds = svc.identities.scram_credentials("alice")
    assert creds is not None and creds.candidates == ()


# ---------------------------------------------------------------- approvals

def test_transition_table_is_complete() -> None:
    for state, events in TRANSITIONS.items():
        for nxt in events.values():
            assert nxt in TRANSITIONS, (state, nxt)


def test_requester_can_never_approve_own_ticket(svc: Services) -> None:
    tid = ticket(svc, requester="erin")  # erin is also an approver
    with pytest.raises(SelfApproval):
        svc.approvals.vote(tid, who(svc, "erin"), "approve")
    assert svc.approvals.get(tid).status == "pending"


def test_non_approver_cannot_vote(svc: Services) -> None:
    tid = ticket(svc, requester="bob")
    with pytest.raises(NotAnApprover):
        svc.approvals.vote(tid, who(svc, "alice"), "approve")


def test_n_of_m_counts_each_approver_once(svc: Services) -> None:
    tid = ticket(svc, n=2)
    r = svc.approvals.vote(tid, who(svc, "bob"), "approve")
    assert not r.decided and r.approvals == 1
    with pytest.raises(AlreadyVoted):
        svc.approvals.vote(tid, who(svc, "bob"), "approve")
    assert svc.approvals.get(tid).status == "pending"
    r = svc.approvals.vote(tid, who(svc, "dana"), "approve")
    assert r.decided and r.ticket.status == "approved"
    assert r.ticket.decided_by == "bob, dana"


def test_reject_needs_reason_and_later_decider_is_told(svc: Services) -> None:
    tid = ticket(svc)
    with pytest.raises(InvalidTransition):
        svc.approvals.vote(tid, who(svc, "bob"), "reject", "  ")
    svc.approvals.vote(tid, who(svc, "bob"), "reject", "not today")
    with pytest.raises(AlreadyDecided) as exc:
        svc.approvals.vote(tid, who(svc, "dana"), "approve")
    assert "rejected by bob: not today" in exc.value.message


def test_simultaneous_decisions_have_exactly_one_outcome(svc: Services) -> None:
    for _ in range(5):
        tid = ticket(svc)
        results: list[str] = []
        barrier = threading.Barrier(2)

        def decide(user: str, vote: str, tid: int = tid, barrier: threading.Barrier = barrier,
                   results: list[str] = results) -> None:
            barrier.wait()
            try:
                svc.approvals.vote(tid, who(svc, user), vote, "reason")
                results.append(f"won:{vote}")
            except AlreadyDecided:
                results.append("late")

        threads = [threading.Thread(target=decide, args=("bob", "approve")),
                   threading.Thread(target=decide, args=("dana", "reject"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r.split(":")[0] for r in results) == ["late", "won"]
        final = svc.approvals.get(tid).status
        winner = next(r for r in results if r.startswith("won")).split(":")[1]
        assert final == {"approve": "approved", "reject": "rejected"}[winner]


def test_expiry_and_claim_once(svc: Services) -> None:
    tid = ticket(svc, timeout=0.01)
    time.sleep(0.05)
    assert svc.approvals.expire_due() == [tid]
    with pytest.raises(AlreadyDecided):
        svc.approvals.vote(tid, who(svc, "bob"), "approve")
    tid = ticket(svc)
    svc.approvals.vote(tid, who(svc, "bob"), "approve")
    t = svc.approvals.get(tid)
    assert not svc.approvals.claim(tid, "wrong-binding")
    assert svc.approvals.claim(tid, t.binding)
    assert not svc.approvals.claim(tid, t.binding)
    done = svc.approvals.finish(tid, "execute", rows=3)
    assert done.status == "executed" and done.result_rows == 3


# ---------------------------------------------------------------- audit

def _fill(svc: Services, n: int = 5) -> None:
    svc.audit.append([{"kind": "statement", "user": "alice", "statement": f"SELECT {i}",
                       "action": "allow", "at": 1000.0 + i} for i in range(n)])


def test_audit_chain_verifies(svc: Services) -> None:
    _fill(svc)
    _fill(svc)
    r = svc.audit.verify()
    assert r.ok and r.count == 10 and r.head_seq == 10


def test_a_batch_hashed_before_the_lock_is_rechained_if_the_head_moved(svc: Services) -> None:
    from keyturn.audit import chain

    _fill(svc, 2)
    batch = [{"kind": "statement", "user": "bob", "statement": f"SELECT {i}", "at": 2000.0 + i}
             for i in range(3)]
    stale = chain(batch, *svc.audit.head())
    _fill(svc, 2)  # another writer appends in between
    svc.audit.append(batch, prepared=stale)
    fresh = chain(batch[:1], *svc.audit.head())
    svc.audit.append(batch[:1], prepared=fresh)  # head unchanged: used as it is
    r = svc.audit.verify()
    assert r.ok and r.count == 8 and r.head_seq == 8 and r.head_hash == fresh.hash
    out = io.StringIO()
    svc.audit.export(out)
    users = [json.loads(line)["user"] for line in out.getvalue().splitlines()]
    assert users == ["alice"] * 4 + ["bob"] * 4


@pytest.mark.parametrize("tamper, expect", [
    ("UPDATE audit_records SET statement = 'SELECT 42' WHERE seq = 3", "record 3: content"),
    ("DELETE FROM audit_records WHERE seq = 2", "record 2 missing"),
    ("DELETE FROM audit_records WHERE seq = 5", "records at the end were removed"),
    ("UPDATE audit_records SET seq = CASE seq WHEN 2 THEN 3 ELSE 2 END WHERE seq IN (2, 3)",
     "link to previous record broken"),
])
def test_audit_verify_detects_tampering(svc: Services, tamper: str, expect: str) -> None:
    _fill(svc)
    with svc.store.engine.begin() as c:
        if "CASE" in tamper:
            c.execute(text("UPDATE audit_records SET seq = seq + 100 WHERE seq IN (2, 3)"))
            c.execute(text("UPDATE audit_records SET seq = 5 - (seq - 100) "
                           "WHERE seq IN (102, 103)"))
        else:
            c.execute(text(tamper))
    r = svc.audit.verify()
    assert not r.ok
    assert any(expect in p for p in r.problems), r.problems


def test_audit_spool_is_ingested_exactly_once(svc: Services, tmp_path: Path) -> None:
    from keyturn.auditspool import AuditIngester, AuditSpool

    spool = AuditSpool(tmp_path / "spool", "gw")
    for i in range(2500):
        spool.record(kind="statement", statement=f"SELECT {i}")
    spool.flush()
    ing = AuditIngester(svc.audit, tmp_path / "spool", batch=1000)
    first = ing.run_once()
    assert 0 < first <= 2500
    # A second ingester (e.g. an operator's `keyturn audit ingest`) never doubles records.
    AuditIngester(svc.audit, tmp_path / "spool").run_once()
    for i in range(2500, 3000):
        spool.record(kind="statement", statement=f"SELECT {i}")
    spool.close()
    ing.run_once()
    r = svc.audit.verify()
    assert r.ok and r.count == 3000
    statements = [rec["statement"] for rec in svc.audit.iter_records()]
    assert statements == [f"SELECT {i}" for i in range(3000)]
    assert not list((tmp_path / "spool").glob("*.jsonl")), "a finished spool file is removed"


@pytest.mark.skipif(not hasattr(__import__("os"), "SCHED_IDLE"), reason="Linux scheduling only")
def test_ingest_runs_idle_until_the_backlog_is_large(svc: Services, tmp_path: Path) -> None:
    """The ingest thread yields the CPU to traffic (SCHED_IDLE) but is moved back to
    normal scheduling while the backlog is above the bound, and drains everything."""
    import fcntl
    import os

    from keyturn.auditspool import AuditIngester, AuditSpool, IngestPriority

    if not IngestPriority.supported():
        pytest.skip("this process cannot leave SCHED_IDLE again")
    spool = AuditSpool(tmp_path / "spool", "gw")
    ing = AuditIngester(svc.audit, tmp_path / "spool", batch=200)
    stop = threading.Event()
    policies: list[int] = []
    prio = IngestPriority(ing, high=60_000, low=10_000, interval=0.05)
    ing_thread = threading.Thread(target=lambda: (prio.start(stop), _follow(ing, stop, policies)))

    def _follow(ing: AuditIngester, stop: threading.Event, seen: list[int]) -> None:
        while not stop.is_set():
            seen.append(os.sched_getscheduler(0))
            if ing.run_once() == 0:
                stop.wait(0.02)
        prio.normal()
        ing.run_once()

    def until(cond: Callable[[], bool]) -> bool:
        deadline = time.time() + 10
        while not cond() and time.time() < deadline:
            time.sleep(0.01)
        return cond()

    ing_thread.start()
    time.sleep(0.3)
    assert policies and set(policies) == {os.SCHED_IDLE}, "idle while nothing is pending"
    # Hold the ingesters' lock so the backlog stays until the watchdog has seen it (an idle
    # machine would otherwise ingest it between two of the watchdog's looks).
    with open(tmp_path / "spool" / ".ingest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for i in range(3000):  # ~0.25 MB: far above `high`
            spool.record(kind="statement", statement=f"SELECT {i}")
        spool.flush()
        assert until(lambda: not prio.idle), "a large backlog is ingested at normal priority"
        assert os.sched_getscheduler(prio.tid) == os.SCHED_OTHER
    assert until(lambda: ing.ingested == 3000)
    assert until(lambda: prio.idle), "idle again once the backlog is small"
    stop.set()
    ing_thread.join(10)
    spool.close()
    ing.run_once()
    assert prio.switches >= 3  # idle, normal, idle
    r = svc.audit.verify()
    assert r.ok and r.count == 3000


def test_ingest_waits_while_the_machine_is_busy_within_bounds(svc: Services,
                                                             tmp_path: Path) -> None:
    """Under load the ingester leaves the CPU alone (records wait in the spool), but
    not once the backlog is large or the store has lagged too long; then it ingests."""
    from keyturn.auditspool import AuditIngester, AuditSpool, IngestPriority

    spool = AuditSpool(tmp_path / "spool", "gw")
    ing = AuditIngester(svc.audit, tmp_path / "spool", batch=100)
    cpu = {"total": 0.0, "free": 0.0, "now": 0.0}
    prio = IngestPriority(ing, high=50_000, max_lag=60.0,
                          cpu_sample=lambda: (cpu["total"], cpu["free"]),
                          clock=lambda: cpu["now"])
    ing.priority = prio

    def tick(now: float, free_share: float) -> bool:
        """Half a second or more later, with this share of the CPU idle meanwhile."""
        cpu["now"] = now
        cpu["total"] += 2.0
        cpu["free"] += 2.0 * free_share
        return prio.defer()

    assert not tick(0.0, 0.05)  # first sample: nothing measured yet
    assert not tick(1.0, 0.9), "an idle machine: ingest"
    for i in range(300):
        spool.record(kind="statement", statement=f"SELECT {i}")
    spool.flush()
    assert tick(2.0, 0.05), "busy, small backlog, store fresh: wait"
    cpu["now"] = 2.2
    assert prio.defer(), "decided per half second, not per call"
    assert tick(30.0, 0.1) and prio.deferred == 3
    assert not tick(62.0, 0.1), "the store lagged a minute: ingest even though busy"
    # A busy machine stops an ingest between batches; nothing is lost or doubled.
    prio._caught_up = 62.0
    assert tick(63.0, 0.1)
    done = ing.run_once()
    assert done == 100, "one batch, then it waits"
    assert not tick(64.0, 0.8)
    ing.run_once()
    for i in range(300, 2000):  # ~120 KB: above `high`
        spool.record(kind="statement", statement=f"SELECT {i}")
    spool.close()
    assert not tick(65.0, 0.05), "a large backlog is ingested even on a busy machine"
    ing.run_once()
    r = svc.audit.verify()
    assert r.ok and r.count == 2000
    assert [x["statement"] for x in svc.audit.iter_records()] == \
        [f"SELECT {i}" for i in range(2000)]


def test_ingest_drains_everything_at_stop_even_on_a_busy_machine(svc: Services,
                                                                tmp_path: Path) -> None:
    from keyturn.auditspool import AuditIngester, AuditSpool, IngestPriority

    spool = AuditSpool(tmp_path / "spool", "gw")
    ing = AuditIngester(svc.audit, tmp_path / "spool", batch=100)
    clock = {"now": 0.0, "total": 0.0}

    def busy() -> tuple[float, float]:  # the machine never has idle CPU
        clock["total"] += 1.0
        return (clock["total"], 0.0)

    def ticking() -> float:
        clock["now"] += 1.0
        return clock["now"]

    prio = IngestPriority(ing, cpu_sample=busy, clock=ticking)
    stop = threading.Event()
    t = threading.Thread(target=ing.follow, args=(stop, 0.01), kwargs={"priority": prio})
    t.start()
    for i in range(1000):
        spool.record(kind="statement", statement=f"SELECT {i}")
    spool.close()
    time.sleep(0.3)
    assert prio.deferred > 0 and ing.ingested < 1000, "busy: the ingester waited"
    stop.set()
    t.join(10)
    assert ing.ingested == 1000
    assert not list((tmp_path / "spool").glob("*.jsonl")), "drained to the end marker"
    assert svc.audit.verify().count == 1000


def test_backlog_after_a_restart_counts_only_what_is_not_ingested(svc: Services,
                                                                  tmp_path: Path) -> None:
    from keyturn.auditspool import AuditIngester, AuditSpool

    spool = AuditSpool(tmp_path / "spool", "gw")
    for i in range(1000):
        spool.record(kind="statement", statement=f"SELECT {i}")
    spool.flush()
    (path,) = (tmp_path / "spool").glob("*.jsonl")
    assert AuditIngester(svc.audit, tmp_path / "spool", batch=400).run_once() == 1000
    spool.record(kind="statement", statement="SELECT 1000")
    spool.flush()
    restarted = AuditIngester(svc.audit, tmp_path / "spool")
    assert restarted.backlog_bytes() == path.stat().st_size, "unknown position: all of it"
    restarted.resume_position()
    assert 0 < restarted.backlog_bytes() < 100, "only the record written since"
    spool.close()


def test_audit_spool_partial_line_waits_and_garbage_is_kept(svc: Services,
                                                           tmp_path: Path) -> None:
    import fcntl

    from keyturn.auditspool import EOF_MARK, AuditIngester

    d = tmp_path / "spool"
    d.mkdir()
    f = d / "gw-1-1.jsonl"
    with open(f, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # a live writer holds its file's lock
        fh.write('{"kind":"statement","statement":"SELECT 1"}\nnot json\n123\n["a"]\n'
                 '{"kind":"stat')
        fh.flush()
        ing = AuditIngester(svc.audit, d)
        assert ing.run_once() == 4
        fh.write('ement","statement":"SELECT 2"}\n' + EOF_MARK)
    assert ing.run_once() == 1
    recs = list(svc.audit.iter_records())
    assert [r["kind"] for r in recs] == ["statement", "unreadable", "unreadable",
                                         "unreadable", "statement"]
    assert [r["detail"]["raw"] for r in recs[1:4]] == ["not json\n", "123\n", '["a"]\n']
    assert not f.exists()


def test_config_rejects_duplicate_keys() -> None:
    with pytest.raises(ConfigError, match=r"k.yaml:4: identity.users.alice: duplicate key"):
        parse_config("identity:\n  users:\n    alice: {}\n    alice: {}\n", "k.yaml")


def test_audit_export_filters_by_time_in_both_formats(svc: Services) -> None:
    import csv
    import io
    import json

    _fill(svc, 10)  # at = 1000 .. 1009
    buf = io.StringIO()
    assert svc.audit.export(buf, "jsonl", since=1003, until=1006) == 3
    rows = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [r["statement"] for r in rows] == ["SELECT 3", "SELECT 4", "SELECT 5"]
    assert all(len(r["hash"]) == 64 for r in rows)
    buf = io.StringIO()
    assert svc.audit.export(buf, "csv") == 10
    parsed = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert len(parsed) == 10 and parsed[0]["seq"] == "1" and parsed[9]["statement"] == "SELECT 9"


def test_sqlite_reads_do_not_wait_for_a_writer(svc: Services) -> None:
    """A login (a read) must not queue behind a long write, e.g. an audit ingest batch."""
    svc.identities.create_token("alice")
    holding, release = threading.Event(), threading.Event()

    def long_write() -> None:
        with svc.store.write() as s:
            s.execute(text("INSERT INTO audit_spool (source, \"offset\") VALUES ('x', 1)"))
            holding.set()
            release.wait(10)

    th = threading.Thread(target=long_write)
    th.start()
    holding.wait(5)
    t0 = time.monotonic()
    creds = svc.identities.scram_credentials("alice")
    elapsed = time.monotonic() - t0
    release.set()
    th.join()
    assert creds is not None and len(creds.candidates) == 1
    assert elapsed < 1.0


def _buffers() -> list:
    from keyturn.auditspool import LineBuffer
    from proxies.postgres.speedups import compiled

    return [LineBuffer] + ([compiled.AuditBuffer] if compiled is not None else [])


def test_write_ahead_sends_deferred_chunks_after_one_spool_write_in_order() -> None:
    """Group commit of the write-ahead audit (_speedups.WriteAhead): chunks deferred in a
    loop turn go out, in order, only after one spool write; a failed spool write sends
    none of them and tells each one's session; a write that fails tells its session and
    the others still go out; chunks deferred while it runs follow, after another write."""
    from proxies.postgres.speedups import compiled as _speedups

    if _speedups is None:
        pytest.skip("the compiled extension is not built or is turned off")
    log: list[tuple[str, ...]] = []
    scheduled: list[object] = []

    class Owner:
        def __init__(self, name: str) -> None:
            self.name = name

        def fast_failed(self, exc: BaseException) -> None:
            log.append(("failed", self.name, type(exc).__name__))

    def flush() -> None:
        log.append(("flush",))

    wa = _speedups.WriteAhead(flush, scheduled.append)
    a, b = Owner("a"), Owner("b")

    def sender(name: str):  # a target transport's write
        return lambda data: log.append(("sent", name, data))

    wa.defer(a, sender("a"), b"1")
    wa.defer(b, sender("b"), b"2")
    wa.defer(a, sender("a"), b"3")
    assert log == [] and wa.pending == 3 and scheduled == [wa], "once per turn"
    wa()  # the loop runs the callback
    assert log == [("flush",), ("sent", "a", b"1"), ("sent", "b", b"2"), ("sent", "a", b"3")]
    assert wa.pending == 0 and wa.stats == (1, 3)

    # Deferred while the callback sends: after the chunk that deferred it, after a write.
    log.clear()
    def chained(data: bytes) -> None:
        log.append(("sent", "a", data))
        wa.defer(b, sender("b"), b"5")
    wa.defer(a, chained, b"4")
    wa.drain()  # as Upstream.write does before anything else goes to a target
    assert log == [("flush",), ("sent", "a", b"4"), ("flush",), ("sent", "b", b"5")]

    # The spool cannot be written: nothing is sent, every session is told.
    log.clear()
    def full_disk() -> None:
        raise OSError(28, "No space left on device")
    wa_full = _speedups.WriteAhead(full_disk, scheduled.append)
    wa_full.defer(a, sender("a"), b"6")
    wa_full.defer(b, sender("b"), b"7")
    wa_full()
    assert log == [("failed", "a", "OSError"), ("failed", "b", "OSError")]
    assert wa_full.pending == 0

    # One target's transport is closed: its session is told, the others' chunks go out.
    log.clear()
    def closed(data: bytes) -> None:
        raise RuntimeError("transport is closed")
    wa.defer(a, closed, b"8")
    wa.defer(b, sender("b"), b"9")
    wa()
    assert log == [("flush",), ("failed", "a", "RuntimeError"), ("sent", "b", b"9")]
    with pytest.raises(TypeError):
        wa.defer(a, sender("a"), "not bytes")


@pytest.mark.parametrize("make", _buffers(), ids=lambda m: m.__name__)
def test_spool_buffers_hand_over_every_line_once_in_order(make) -> None:
    full: list[int] = []
    buf = make(limit=100, on_full=lambda: full.append(buf.size))
    lines = [f'{{"n":{i}}}\n'.encode() for i in range(50)]
    taken = b""
    for i, line in enumerate(lines):
        buf.append(line)
        if i % 20 == 19:
            taken += buf.take()
    taken += buf.take()
    assert taken == b"".join(lines)
    assert buf.lines == 50 and buf.size == 0 and buf.take() == b""
    # on_full is called each time an append leaves more than `limit` bytes pending
    assert full and all(size > 100 for size in full)
    with pytest.raises(TypeError):
        buf.append("not bytes")


@pytest.mark.parametrize("make", _buffers(), ids=lambda m: m.__name__)
def test_spool_writes_a_full_buffer_at_once_and_keeps_lines_a_failed_write_missed(
        tmp_path: Path, make, monkeypatch: pytest.MonkeyPatch) -> None:
    import keyturn.auditspool as auditspool

    monkeypatch.setattr(auditspool, "PENDING_LIMIT", 1000)
    spool = auditspool.AuditSpool(tmp_path, "gw", flush_interval=3600, buffer=make)
    line = b'{"kind":"statement","statement":"SELECT 1"}\n'
    for _ in range(30):  # > 1000 bytes: the writer flushes without waiting for the thread
        spool.write_line(line)
    assert spool.path.read_bytes().count(line) >= 22
    # A write that fails (a full disk) loses nothing: the next flush writes it, in order.
    real = spool._fh
    calls = []

    class Full:
        def write(self, data: bytes) -> int:
            calls.append(len(data))
            if len(calls) == 1:
                return real.write(bytes(data[:10]))  # a partial write first
            raise OSError(28, "No space left on device")

        closed = False

    spool._fh = Full()  # type: ignore[assignment]
    spool.write_line(b'{"n":1}\n')
    with pytest.raises(OSError):
        spool.flush()
    spool._fh = real
    spool.write_line(b'{"n":2}\n')
    spool.close()
    assert spool.records == 32
    data = spool.path.read_bytes()
    assert data.count(line) == 30
    assert data.endswith(b'{"n":1}\n{"n":2}\n' + auditspool._EOF_BYTES)


def test_spool_rotation_survives_a_failed_open_and_a_failed_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    import keyturn.auditspool as auditspool

    monkeypatch.setattr(auditspool, "ROTATE_BYTES", 200)
    spool = auditspool.AuditSpool(tmp_path, "gw", flush_interval=3600)
    first = spool.path
    lines = [f'{{"n":{i}}}\n'.encode() for i in range(60)]
    real_new = spool._new_file
    fails = {"open": 1}

    def new_file() -> tuple:
        if fails["open"]:
            fails["open"] -= 1
            raise OSError(24, "Too many open files")
        return real_new()

    monkeypatch.setattr(spool, "_new_file", new_file)
    real_fsync = auditspool.os.fsync
    monkeypatch.setattr(auditspool.os, "fsync",
                        lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    for i, line in enumerate(lines):
        spool.write_line(line)
        if i % 10 == 9:
            spool.flush()  # the first rotation fails to open: writing goes on in `first`
    monkeypatch.setattr(auditspool.os, "fsync", real_fsync)
    spool.close()
    assert "cannot open a new spool file" in caplog.text
    assert "fsync of a finished spool file failed" in caplog.text
    files = sorted(tmp_path.glob("gw-*.jsonl"), key=lambda p: p.name)
    assert files[0] == first and len(files) >= 2
    body = b""
    for i, f in enumerate(files):
        data = f.read_bytes()
        # Each file ends with one end marker; after a rotation it names the next file.
        marker = auditspool._EOF_BYTES if i == len(files) - 1 else \
            b'{"_eof":true,"next":"%s"}\n' % files[i + 1].name.encode()
        assert data.endswith(marker) and data.count(b'{"_eof":true') == 1
        body += data[: -len(marker)]
    assert body == b"".join(lines), "every line once, in order, none after an end marker"


def test_spool_close_with_unwritable_lines_reports_them_and_leaves_no_end_marker(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import keyturn.auditspool as auditspool

    spool = auditspool.AuditSpool(tmp_path, "gw", flush_interval=3600)
    spool.write_line(b'{"n":1}\n')
    spool.flush()
    real = spool._fh

    class Full:
        closed = False

        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

        def fileno(self) -> int:
            return real.fileno()

        def close(self) -> None:
            real.close()

    spool._fh = Full()
    spool.write_line(b'{"n":2}\n')
    spool.close()  # does not raise
    assert "could not be written at close" in caplog.text
    # no end marker: the ingester does not take the file as complete and keep it
    assert spool.path.read_bytes() == b'{"n":1}\n'


def test_a_stale_compiled_extension_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys
    import types

    from proxies.postgres import speedups

    old = types.ModuleType("proxies.postgres._speedups")
    old.RowMasker = old.FastPath = old.fast_shape = object  # type: ignore[attr-defined]
    import proxies.postgres

    monkeypatch.setitem(sys.modules, "proxies.postgres._speedups", old)
    monkeypatch.setattr(proxies.postgres, "_speedups", old, raising=False)
    monkeypatch.delenv("KEYTURN_NO_SPEEDUPS", raising=False)
    try:
        stale = importlib.reload(speedups)
        assert stale.compiled is None
        assert "older than proxies/postgres/_speedups.c" in stale.state()
        assert "AuditBuffer, Relay" in stale.state()
    finally:
        monkeypatch.undo()
        importlib.reload(speedups)


def test_a_ticket_for_undecodable_client_bytes_is_stored_escaped_and_bound_exactly(
        svc: Services) -> None:
    """Client bytes that are not UTF-8 reach the gateway as lone surrogates
    (surrogateescape); no store encodes them. The ticket shows them escaped and stays
    bound to the statement exactly as it was sent."""
    raw = "DELETE FROM orders WHERE note = '" + b"\xff\xfe".decode("utf-8", "surrogateescape")
    t = svc.approvals.create(TicketRequest(
        requester="alice", requester_groups=svc.config.groups_of("alice"),
        connection="shop", statement=raw + "\ud800'", classification="write",
        rule="writes", reason="r", approver_groups=("approvers",), min_approvals=1,
        timeout=600, params=["x\udcff"]))
    stored = svc.approvals.get(t.id)
    assert stored.statement == "DELETE FROM orders WHERE note = '\\xff\\xfe\\ud800'"
    assert stored.params == ["x\\xff"]
    other = svc.approvals.create(TicketRequest(
        requester="alice", requester_groups=svc.config.groups_of("alice"),
        connection="shop", statement="DELETE FROM orders WHERE note = '\\xff\\xfe\\ud800'",
        classification="write", rule="writes", reason="r", approver_groups=("approvers",),
        min_approvals=1, timeout=600, params=["x\\xff"]))
    assert stored.binding != svc.approvals.get(other.id).binding
