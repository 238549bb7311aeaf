"""The per-user cap on pending tickets (gateway.max_pending_per_user): a requester who
already has that many tickets waiting for a decision gets no new one; the request is
refused at once, with the reason, and audited (refused, not held).

First the core on real stores (SQLite, and PostgreSQL for creations that race in two
"gateway processes"), then end to end through a running ``keyturn up`` with the cap set
to 2: PostgreSQL clients get ERROR 53400 and keep their session, SSH clients get the
reason on stderr and exit status 126; another user is still held, and a decision makes
room again. The count is the store's, so it spans protocols and processes."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from keyturn import holds
from keyturn.approvals import TicketRequest, binding_of
from keyturn.bus import DecisionWatcher
from keyturn.config import parse_config
from keyturn.errors import ConfigError, TooManyPending
from keyturn.services import Services, build_services
from tests.conftest import Keyturn, LocalPostgres
from tests.ssh_attack_support import _argv, ssh, sshd, start_gateway  # noqa: F401
from tests.ssh_support import LocalSSHD
from tests.test_holds import CONFIG as HOLDS_CONFIG


def config_text(tmp_path: Path, gateway: str = "", store: str = "") -> str:
    """tests/test_holds.py's config, with more gateway settings, or another store."""
    text = HOLDS_CONFIG % {"db": tmp_path / "k.db"}
    if store:
        text = re.sub(r"(?m)^store: .*$", f"store: {{{store}}}", text)
    return text + gateway


def services(tmp_path: Path, limit: int | None = 2, store: str = "") -> Services:
    gateway = "" if limit is None else f"gateway:\n  max_pending_per_user: {limit}\n"
    text = config_text(tmp_path, gateway, store)
    return build_services(parse_config(text, str(tmp_path / "keyturn.yaml")))


def request(user: str = "alice", text: str = "DELETE FROM orders", *,
            timeout: float = 600, mode: str = "hold") -> TicketRequest:
    return TicketRequest(
        requester=user, requester_groups=("engineers",), connection="web1",
        statement=text, classification="write", rule="writes", reason="changes",
        approver_groups=("approvers",), min_approvals=1, timeout=timeout, mode=mode,
        binding=binding_of(user, "web1", text, None))


def pending(svc: Services, user: str) -> int:
    return len(svc.approvals.find(status="pending", requester=user))


# ---------------------------------------------------------------- the setting

def test_the_setting_defaults_to_20_and_0_means_no_limit(tmp_path: Path) -> None:
    assert services(tmp_path, None).config.gateway.max_pending_per_user == 20
    svc = services(tmp_path, 0)
    assert svc.approvals.max_pending == 0
    for n in range(25):
        svc.approvals.create(request(text=f"DELETE FROM t{n}"))
    assert pending(svc, "alice") == 25


@pytest.mark.parametrize("value", ["-1", "many", "true", "1.5"])
def test_a_bad_setting_is_refused_with_its_place(tmp_path: Path, value: str) -> None:
    text = config_text(tmp_path, f"gateway:\n  max_pending_per_user: {value}\n")
    with pytest.raises(ConfigError) as err:
        parse_config(text, str(tmp_path / "keyturn.yaml"))
    assert "gateway.max_pending_per_user: expected the pending tickets" in str(err.value)


# ---------------------------------------------------------------- the core, real store

def test_one_ticket_too_many_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    svc = services(tmp_path)
    first = svc.approvals.create(request(text="DELETE FROM a"))
    svc.approvals.create(request(text="DELETE FROM b"))
    with pytest.raises(TooManyPending) as err:
        svc.approvals.create(request(text="DELETE FROM c"))
    assert err.value.message == ("you have 2 requests waiting for approval (limit 2); "
                                 "wait for a decision or cancel one")
    assert (err.value.pending, err.value.limit, err.value.status) == (2, 2, 429)
    assert pending(svc, "alice") == 2
    assert [t.statement for t in svc.approvals.find(requester="alice")] == [
        "DELETE FROM b", "DELETE FROM a"]
    # Others are not limited by alice's tickets.
    svc.approvals.create(request("erin"))
    # A decision (here the client's cancel) makes room.
    svc.approvals.finish(first.id, "cancel", actor="alice", comment="changed my mind")
    svc.approvals.create(request(text="DELETE FROM c"))
    assert pending(svc, "alice") == 2


def test_only_tickets_still_waiting_count(tmp_path: Path) -> None:
    svc = services(tmp_path, 1)
    # Past its expiry, not yet swept: nobody can decide it any more.
    svc.approvals.create(request(timeout=30), now=time.time() - 3600)
    t = svc.approvals.create(request(text="DELETE FROM x"))
    svc.approvals.vote(t.id, svc.identities.identity_of("dana"), "approve")
    # Approved (not yet run) is decided: it no longer waits for approvers.
    svc.approvals.create(request(text="DELETE FROM y"))
    with pytest.raises(TooManyPending, match="you have 1 request waiting for approval "
                                             r"\(limit 1\)"):
        svc.approvals.create(request(text="DELETE FROM z"))


def _race(stores: list[Services], attempts: int) -> list[str]:
    """``attempts`` creations for alice at once, spread over ``stores`` (one per gateway
    process): what each got."""
    barrier = threading.Barrier(attempts)
    got: list[str] = []

    def create(n: int) -> None:
        barrier.wait()
        try:
            stores[n % len(stores)].approvals.create(request(text=f"DELETE FROM r{n}"))
            got.append("created")
        except TooManyPending:
            got.append("refused")

    threads = [threading.Thread(target=create, args=(n,)) for n in range(attempts)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    return sorted(got)


def test_two_gateway_processes_share_one_count_sqlite(tmp_path: Path) -> None:
    a, b = services(tmp_path), services(tmp_path)  # two engines on one store file
    assert _race([a, b], 8) == ["created"] * 2 + ["refused"] * 6
    assert pending(a, "alice") == 2


def test_two_gateway_processes_share_one_count_postgres(
        pg: LocalPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pg.execute("DROP DATABASE IF EXISTS keyturn_cap_store")
    pg.create_database("keyturn_cap_store")
    monkeypatch.setenv("KT_CAP_STORE", f"postgresql://{pg.superuser}:"
                       f"{pg.superuser_password}@127.0.0.1:{pg.port}/keyturn_cap_store")
    a = services(tmp_path, store="url_env: KT_CAP_STORE")
    b = services(tmp_path, store="url_env: KT_CAP_STORE")
    try:
        for _ in range(3):
            assert _race([a, b], 8) == ["created"] * 2 + ["refused"] * 6
            assert pending(a, "alice") == 2
            for t in a.approvals.find(status="pending", requester="alice"):
                a.approvals.finish(t.id, "cancel", actor="alice")
    finally:
        a.store.dispose()
        b.store.dispose()


def test_the_hold_service_refuses_at_once_and_audits(tmp_path: Path) -> None:
    svc = services(tmp_path, 1)
    # Pending already (made by this or another gateway process).
    svc.approvals.create(request(text="DELETE FROM first"))
    audit: list[dict[str, Any]] = []
    seen: list[Any] = []
    enriched: list[TicketRequest] = []

    async def enrich(req: TicketRequest) -> TicketRequest:
        enriched.append(req)
        return req

    async def main() -> holds.Outcome:
        service = holds.HoldService(svc.approvals, DecisionWatcher(svc.approvals, svc.store),
                                    lambda **r: audit.append(r),
                                    public_url="https://keyturn.example/")
        req = request(text="DELETE FROM second")
        return await asyncio.wait_for(service.hold(
            req, binding=req.binding or "", noun="statement", on_held=seen.append,
            on_wait=seen.append, enrich=enrich), 10)

    outcome = asyncio.run(main())
    assert outcome == holds.Outcome(
        holds.REFUSED, False, "you have 1 request waiting for approval (limit 1); wait for "
        "a decision or cancel one")
    assert seen == [] and enriched == []  # no ticket, no wait, no EXPLAIN
    assert pending(svc, "alice") == 1
    assert len(audit) == 1
    rec = audit[0]
    assert (rec["kind"], rec["action"], rec["outcome"], rec["ticket_id"] if "ticket_id"
            in rec else None) == ("held", "review", "refused", None)
    assert rec["user"] == "alice" and rec["statement"] == "DELETE FROM second"
    assert rec["reason"] == outcome.message
    assert rec["detail"] == {"mode": "hold", "pending": 1, "limit": 1}


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, sshd: LocalSSHD,  # noqa: F811
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    # One gateway, both protocols: the cap counts alice's tickets whatever held them.
    k = start_gateway(pg, sshd, tmp_path_factory.mktemp("kt-cap"),
                      gateway="  max_pending_per_user: 2\n",
                      edit=lambda text: text.replace("timeout: 4s", "timeout: 10m"))
    yield k
    k.stop()


def _decide_all(kt: Keyturn) -> None:
    """Reject whatever is still pending (dana approves nobody's own tickets)."""
    r = requests.get(f"{kt.url}/api/v1/tickets?status=pending", timeout=5,
                     headers={"Authorization": f"Bearer {kt.tokens['dana']}"})
    for t in r.json()["tickets"]:
        requests.post(f"{kt.url}/api/v1/tickets/{t['id']}/reject", timeout=5,
                      json={"reason": "test over"},
                      headers={"Authorization": f"Bearer {kt.tokens['dana']}"})
    kt.skip_pending()


def _reject(kt: Keyturn, ticket_id: int) -> None:
    r = requests.post(f"{kt.url}/api/v1/tickets/{ticket_id}/reject", timeout=5,
                      json={"reason": "not now"},
                      headers={"Authorization": f"Bearer {kt.tokens['dana']}"})
    assert r.status_code == 200, r.text


def _audited(kt: Keyturn, where: str, timeout: float = 15) -> list[tuple]:
    """Audit records matching ``where`` once the ingester stored them."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(kt.base / "keyturn.db") as db:
            rows = db.execute("SELECT kind, user, outcome, reason, statement, detail "
                              f"FROM audit_records WHERE {where}").fetchall()
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


class Held:
    """One statement through the gateway (a session of ``user``'s, or ``conn``) in a
    thread of its own: it waits while held."""

    def __init__(self, kt: Keyturn, user: str, sql: str,
                 conn: psycopg.Connection | None = None):
        self.conn = conn or psycopg.connect(kt.dsn(user), autocommit=True)
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(sql,))
        self.thread.start()

    def _run(self, sql: str) -> None:
        try:
            self.conn.execute(sql)
        except Exception as exc:  # noqa: BLE001 - what the test asserts on
            self.error = exc

    def end(self) -> Exception | None:
        self.thread.join(30)
        assert not self.thread.is_alive(), "the statement is still waiting"
        self.conn.close()
        return self.error


def test_postgres_third_held_statement_gets_53400_and_the_session_goes_on(
        kt: Keyturn) -> None:
    _decide_all(kt)
    first = Held(kt, "alice", "UPDATE customers SET name = 'cap1' WHERE id = 1")
    t1 = kt.wait_ticket()
    second = Held(kt, "alice", "UPDATE customers SET name = 'cap2' WHERE id = 2")
    kt.wait_ticket()
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as third:
        started = time.monotonic()
        with pytest.raises(psycopg.Error) as err:
            third.execute("UPDATE customers SET name = 'cap3' WHERE id = 3")
        assert time.monotonic() - started < 5, "refused at once, not held"
        assert err.value.sqlstate == "53400"
        assert err.value.diag.message_primary == (
            "keyturn: you have 2 requests waiting for approval (limit 2); wait for a "
            "decision or cancel one")
        assert third.execute("SELECT 1").fetchone() == (1,)
        # The simple protocol too (psql), in a session of its own.
        p = kt.psql("alice", "UPDATE customers SET name = 'cap4' WHERE id = 4")
        out, stderr = p.communicate(timeout=20)
        assert p.returncode != 0 and "(limit 2)" in stderr and "held" not in stderr
        # Another user is held as usual.
        other = Held(kt, "erin", "UPDATE customers SET name = 'erin' WHERE id = 5")
        assert kt.wait_ticket()["requester"] == "erin"
        # One decision makes room: alice is held again, in the same session.
        _reject(kt, t1["id"])
        assert "rejected by dana" in str(first.end())
        again = Held(kt, "alice", "UPDATE customers SET name = 'cap3' WHERE id = 3", third)
        t4 = kt.wait_ticket()
        assert (t4["requester"], t4["statement"]) == (
            "alice", "UPDATE customers SET name = 'cap3' WHERE id = 3")
        _decide_all(kt)
        assert "rejected by dana" in str(again.end())
    assert "rejected by dana" in str(second.end())
    assert "rejected by dana" in str(other.end())
    with psycopg.connect(kt.pg.dsn("shop")) as c:
        assert c.execute("SELECT count(*) FROM customers WHERE name LIKE 'cap%'"
                         ).fetchone() == (0,)
    # Each refusal: the hold service's record and the statement's, both refused.
    rows = _audited(kt, "outcome = 'refused' AND user = 'alice' AND statement LIKE "
                        "'%cap3%' AND kind IN ('held', 'statement')")
    assert sorted(r[0] for r in rows) == ["held", "statement"], rows
    held = next(r for r in rows if r[0] == "held")
    assert "(limit 2)" in held[3] and '"pending":2' in held[5].replace(" ", "")


def test_ssh_third_held_command_is_refused_with_its_reason(kt: Keyturn) -> None:
    _decide_all(kt)
    waiting, tickets = [], []
    for n in (1, 2):  # one after the other: wait_ticket takes the newest it sees as seen
        waiting.append(subprocess.Popen(_argv(kt, "alice", "web1", f"touch /tmp/ktcap-{n}"),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))
        tickets.append(kt.wait_ticket())
    assert {t["requester"] for t in tickets} == {"alice"}
    started = time.monotonic()
    res = ssh(kt, "touch /tmp/ktcap-3", timeout=30)
    assert time.monotonic() - started < 15
    assert res.returncode == 126, res
    assert ("keyturn: you have 2 requests waiting for approval (limit 2); wait for a "
            "decision or cancel one") in res.stderr
    assert "held for approval" not in res.stderr
    # bob is held; after one decision alice is held again.
    bob = subprocess.Popen(_argv(kt, "bob", "web1", "touch /tmp/ktcap-bob"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert kt.wait_ticket()["requester"] == "bob"
    _reject(kt, tickets[0]["id"])
    again = subprocess.Popen(_argv(kt, "alice", "web1", "touch /tmp/ktcap-3"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert kt.wait_ticket()["statement"] == "touch /tmp/ktcap-3"
    _decide_all(kt)
    for p in [*waiting, bob, again]:
        p.communicate(timeout=30)
        assert p.returncode == 126
    rows = _audited(kt, "outcome = 'refused' AND kind = 'statement' AND "
                        "statement = 'touch /tmp/ktcap-3'")
    assert rows and "(limit 2)" in rows[0][3]
