"""Escalation: a ticket still pending at a configured time (a fraction of its timeout,
or a duration) gains a second approver group, once; the timeline and chat say so.

Through the real gateway with psql: a write held for ``approvers`` cannot be approved
by an auditor until it escalates to ``auditors``; then the auditor's approval releases
the statement. These tests must not depend on a server a person started.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from keyturn.approvals import TicketRequest
from keyturn.config import load_config
from keyturn.errors import ConfigError
from keyturn.launch.localpg import LocalPostgres
from keyturn.services import build_services
from keyturn.wording import event_sentence
from tests.conftest import Keyturn, direct_shop, make_keyturn

ESCALATING = """
  escalating:
    default: block
    rules:
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
      - name: writes-escalate
        match: {class: write}
        action: review
        review:
          approvers: [approvers]
          timeout: 2m
          escalate: {after: 2s, to: [auditors]}
"""

BASE = """
store: {{url: "sqlite:///{base}/keyturn.db"}}
identity:
  users:
    alice: {{groups: [engineers]}}
connections:
  - {{name: shop, type: postgres, target: {{host: 127.0.0.1}}, policy: p}}
policies:
  p:
    rules:
      - name: r
        match: {{class: write}}
        action: review
        review: {review}
"""


def _config(tmp_path: Path, review: str):
    path = tmp_path / "keyturn.yaml"
    path.write_text(BASE.format(base=tmp_path, review=review))
    return load_config(path)


def test_escalation_settings_are_validated(tmp_path: Path) -> None:
    rv = _config(tmp_path, "{approvers: [a], timeout: 10m, escalate: {after: 50%, to: [b]}}"
                 ).policies["p"].rules[0].review
    assert rv is not None and rv.escalate_to == ("b",) and rv.escalation_delay() == 300
    rv = _config(tmp_path, "{approvers: [a], timeout: 10m, escalate: {after: 90s, to: [b]}}"
                 ).policies["p"].rules[0].review
    assert rv is not None and rv.escalation_delay() == 90
    for bad, says in (("{after: 50%}", "name the approver groups"),
                      ("{after: 150%, to: [b]}", "between 0% and 100%"),
                      ("{after: 20m, to: [b]}", "shorter than the review's timeout"),
                      ("{after: soon, to: [b]}", "escalate.after"),
                      ("{to: [b], whom: x}", "whom")):
        with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace("'", ".")):
            _config(tmp_path, f"{{approvers: [a], timeout: 10m, escalate: {bad}}}")


def test_escalate_due_widens_approvers_once(tmp_path: Path) -> None:
    svc = build_services(_config(tmp_path, "{approvers: [a]}"))

    def ticket(escalate: bool) -> int:
        return svc.approvals.create(TicketRequest(
            requester="alice", requester_groups=("engineers",), connection="shop",
            statement="DELETE FROM t", classification="write", rule="r", reason="",
            approver_groups=("approvers",), min_approvals=1, timeout=60,
            escalate_after=10 if escalate else None,
            escalate_to=("leads", "approvers") if escalate else ()), now=1000).id
    esc, plain = ticket(True), ticket(False)
    assert svc.approvals.escalate_due(now=1009) == []
    assert svc.approvals.escalate_due(now=1010) == [esc]
    assert svc.approvals.escalate_due(now=1020) == []           # once
    t = svc.approvals.get(esc)
    assert t.approver_groups == ["approvers", "leads"] and t.escalate_at is None
    assert svc.approvals.get(plain).approver_groups == ["approvers"]
    ev = [e for e in svc.approvals.detail(esc)["events"] if e["kind"] == "escalated"]
    assert len(ev) == 1 and ev[0]["detail"]["added"] == ["leads"]
    assert event_sentence("escalated", None, ev[0]["detail"]).plain() == \
        "escalated to leads, approvers: still pending"
    with pytest.raises(ValueError):      # not something a note can fake
        svc.approvals.note(plain, "escalated", None, {"to": ["leads"]})


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    kt = make_keyturn(tmp_path_factory.mktemp("esc"), pg, extra=ESCALATING,
                      shop_policy="escalating")
    kt.env["KEYTURN_SWEEP_INTERVAL"] = "0.3"
    with direct_shop(pg) as c:
        c.execute("CREATE TABLE IF NOT EXISTS esc_jobs (id int PRIMARY KEY)")
        c.execute("INSERT INTO esc_jobs VALUES (1), (2) ON CONFLICT DO NOTHING")
    kt.start()
    yield kt
    kt.stop()


def _vote(kt: Keyturn, user: str, tid: int, comment: str) -> requests.Response:
    return requests.post(f"{kt.url}/api/v1/tickets/{tid}/approve", json={"comment": comment},
                         headers={"Authorization": f"Bearer {kt.tokens[user]}"}, timeout=10)


def test_held_write_escalates_to_a_second_group_through_psql(kt: Keyturn, pg: LocalPostgres
                                                             ) -> None:
    p = kt.psql("alice", "DELETE FROM esc_jobs WHERE id = 1")
    t = kt.wait_ticket()
    early = _vote(kt, "carol", t["id"], "too early")
    assert early.status_code == 403, early.text       # carol is an auditor, not yet asked
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        detail = requests.get(f"{kt.url}/api/v1/tickets/{t['id']}", timeout=5, headers={
            "Authorization": f"Bearer {kt.tokens['bob']}"}).json()
        if "auditors" in detail["approver_groups"]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the ticket never escalated")
    assert p.poll() is None                           # still held
    ok = _vote(kt, "carol", t["id"], "covering for the on-call")
    assert ok.status_code == 200, ok.text
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    with direct_shop(pg) as c:
        assert c.execute("SELECT count(*) FROM esc_jobs WHERE id = 1").fetchone() == (0,)
    kinds = [e["kind"] for e in requests.get(
        f"{kt.url}/api/v1/tickets/{t['id']}", timeout=5,
        headers={"Authorization": f"Bearer {kt.tokens['bob']}"}).json()["events"]]
    assert kinds.index("escalated") < kinds.index("vote:approve")
