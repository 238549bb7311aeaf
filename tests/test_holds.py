"""The protocol-neutral hold service (keyturn.holds) on a real SQLite store, driven with
no protocol at all: a request is held, a person decides in another thread (as the
portal or a bot would), and the outcome says whether to run it and what to tell the
client. The decision reaches the waiting hold through the real decision watcher."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keyturn import holds
from keyturn.approvals import TicketRequest, binding_of
from keyturn.bus import DecisionWatcher
from keyturn.config import parse_config
from keyturn.services import Services, build_services

CONFIG = """
store: {url: "sqlite:///%(db)s"}
identity:
  users:
    alice: {groups: [engineers]}
    dana: {groups: [approvers]}
connections:
  - name: web1
    type: postgres
    target: {host: 127.0.0.1, port: 5432, user: app, password_env: SHOP_PW}
    policy: p
policies:
  p:
    rules: []
"""


@pytest.fixture()
def svc(tmp_path: Path) -> Services:
    cfg = parse_config(CONFIG % {"db": tmp_path / "k.db"}, str(tmp_path / "keyturn.yaml"))
    return build_services(cfg)


def request(svc: Services, *, mode: str = "hold", timeout: float = 30) -> TicketRequest:
    text = "systemctl restart nginx"
    return TicketRequest(
        requester="alice", requester_groups=("engineers",), connection="web1",
        statement=text, classification="admin", rule="restarts", reason="services",
        approver_groups=("approvers",), min_approvals=1, timeout=timeout, mode=mode,
        protocol="ssh", binding=binding_of("alice", "web1", text, None))


def run_hold(svc: Services, req: TicketRequest, decide: Callable[[int], None] | None,
             **kw: Any) -> tuple[holds.Outcome, list[Any], list[dict[str, Any]]]:
    """Hold ``req``; once it is held, ``decide(ticket_id)`` runs in a thread."""
    audit: list[dict[str, Any]] = []
    seen: list[Any] = []

    async def main() -> holds.Outcome:
        loop = asyncio.get_running_loop()
        watcher = DecisionWatcher(svc.approvals, svc.store)
        svc.approvals.on_change = lambda tid, status: loop.call_soon_threadsafe(
            watcher.resolve, tid, status)
        watcher.start()
        service = holds.HoldService(svc.approvals, watcher, lambda **r: audit.append(r),
                                    public_url="https://keyturn.example/")

        def on_held(held: holds.Held) -> None:
            seen.append(held)
            if decide is not None:
                threading.Thread(target=decide, args=(held.ticket_id,)).start()

        try:
            return await service.hold(req, binding=req.binding or "", noun="command",
                                      on_held=on_held, on_wait=seen.append, **kw)
        finally:
            await watcher.stop()
            svc.approvals.on_change = lambda _id, _status: None

    return asyncio.run(main()), seen, audit


def test_an_approval_releases_the_held_request_once(svc: Services) -> None:
    req = request(svc)

    def approve(tid: int) -> None:
        svc.approvals.vote(tid, svc.identities.identity_of("dana"), "approve", "go ahead")

    outcome, seen, audit = run_hold(svc, req, approve)
    held = seen[0]
    assert isinstance(held, holds.Held)
    assert held.url == f"https://keyturn.example/tickets/{held.ticket_id}"
    assert "held for approval" in held.message and "Waiting up to 30s" in held.message
    assert seen[1:] == [held.ticket_id, None]  # waiting, then not any more
    assert outcome.run and outcome.status == "approved"
    assert outcome.message == f"ticket {held.ticket_id} approved by dana: “go ahead”"
    assert [r["kind"] for r in audit] == ["held"]
    assert audit[0]["ticket_id"] == held.ticket_id and audit[0]["outcome"] == "pending"
    # The approval was claimed: it cannot run a second time.
    assert not svc.approvals.claim(held.ticket_id, req.binding or "")


def test_a_rejection_says_who_and_why(svc: Services) -> None:
    def reject(tid: int) -> None:
        svc.approvals.vote(tid, svc.identities.identity_of("dana"), "reject", "not during the sale")

    outcome, seen, _ = run_hold(svc, request(svc), reject)
    assert not outcome.run and outcome.status == "rejected"
    assert outcome.message == f"ticket {seen[0].ticket_id} rejected by dana: “not during the sale”"


def test_no_decision_expires_with_the_protocols_noun(svc: Services) -> None:
    outcome, _, _ = run_hold(svc, request(svc, timeout=1), None)
    assert not outcome.run and outcome.status == "expired"
    assert outcome.message.endswith("expired after 1s without a decision; "
                                    "the command was not run")


def test_a_cancel_from_the_client_ends_the_wait(svc: Services) -> None:

    def cancel(tid: int) -> None:
        svc.approvals.finish(tid, "cancel", actor="alice", comment="Ctrl-C")

    outcome, _, _ = run_hold(svc, request(svc), cancel)
    assert not outcome.run and outcome.status == "cancelled"
    assert outcome.message.endswith(": Ctrl-C; the command was not run")


def test_defer_mode_makes_a_ticket_then_runs_the_identical_request_once(
        svc: Services) -> None:
    req = request(svc, mode="defer")
    outcome, seen, _ = run_hold(svc, req, None)
    assert outcome.status == "deferred" and not outcome.run
    assert "Run the identical command again once it is approved" in outcome.message
    tid = seen[0].ticket_id
    svc.approvals.vote(tid, svc.identities.identity_of("dana"), "approve")
    again, seen2, audit2 = run_hold(svc, req, None)
    assert again.status == "claimed" and again.run and again.ticket_id == tid
    assert not seen2 and not audit2  # no new ticket
    third, _, _ = run_hold(svc, req, None)
    assert third.status == "deferred" and third.ticket_id != tid  # used up: a new ticket


def test_a_grant_covering_the_request_needs_no_ticket(svc: Services) -> None:
    class Window:
        def covering(self, request: TicketRequest, binding: str) -> str | None:
            return "grant 7 (restarts until 18:00)" if request.connection == "web1" else None

    async def main() -> holds.Outcome:
        watcher = DecisionWatcher(svc.approvals, svc.store)
        service = holds.HoldService(svc.approvals, watcher, lambda **r: None,
                                    public_url="http://x", grants=Window())
        return await service.hold(request(svc), binding="b", on_held=lambda h: None)

    outcome = asyncio.run(main())
    assert outcome.run and outcome.status == "granted" and outcome.ticket_id is None
    assert svc.approvals.find() == []  # no ticket was made
