"""Slack end to end against a local Slack Web API stand-in: the real Bolt app
served by the real bots server, driven by signed HTTP requests exactly as
Slack sends them; tickets made and decided through keyturn.approvals."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from sqlalchemy import select

from bots.models import ChatCursor, OutboxItem
from bots.server import start_in_thread
from keyturn.approvals import TicketRequest
from keyturn.config import load_config
from keyturn.models import AuditRecord, TicketEvent, Vote
from keyturn.services import Services, build_services
from proxies.postgres.holding import ticket_facts
from tests.chat_standins import (
    SlackStandIn,
    block_action,
    slack_headers,
    slash,
    view_submission,
)
from tests.conftest import KEYTURN, free_port

SECRET = "slack-signing-secret-1"
CHANNEL = "CAPPROVALS"

CONFIG = """
store: {{url: "sqlite:///{base}/keyturn.db"}}
portal: {{listen: 127.0.0.1:18080, public_url: "https://keyturn.example"}}
identity:
  users:
    alice: {{groups: [engineers], email: alice@example.com}}
    bob: {{groups: [approvers], email: bob@example.com}}
    dana: {{groups: [approvers], email: dana@example.com}}
    carol: {{groups: [auditors], email: carol@example.com}}
    frank: {{groups: [engineers], email: frank@example.com}}
connections:
  - name: shop
    type: postgres
    target: {{host: 127.0.0.1, port: 5432}}
    policy: shop
  - name: billing
    type: postgres
    target: {{host: 127.0.0.1, port: 5432}}
    policy: shop
policies:
  shop:
    rules:
      - name: writes-need-approval
        match: {{class: write}}
        action: review
        review: {{approvers: [approvers]}}
integrations:
  listen: 127.0.0.1:{port}
  poll_interval: 0.1
  slack:
    mode: {mode}
    bot_token_file: {base}/bot-token
    signing_secret_file: {base}/signing-secret
    app_token_file: {base}/app-token
    channel: {channel}
    channels: {{connections: {{billing: CBILLING}}}}
    reminders: [3s]
    api_base_url: {api}/api/
    statement_chars: 120
"""


class Harness:
    def __init__(self, base: Path, slack: SlackStandIn, *, mode: str = "http",
                 start: bool = True):
        base.mkdir(parents=True, exist_ok=True)
        (base / "bot-token").write_text(slack.token)
        (base / "signing-secret").write_text(SECRET)
        (base / "app-token").write_text(slack.app_token)
        self.port = free_port()
        self.path = base / "keyturn.yaml"
        self.path.write_text(CONFIG.format(base=base, port=self.port, mode=mode,
                                           channel=CHANNEL, api=slack.url))
        self.config = load_config(self.path)
        self.svc: Services = build_services(self.config)
        self.slack = slack
        self.stop = start_in_thread(self.config) if start else (lambda: None)

    def start(self) -> None:
        self.stop = start_in_thread(self.config)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/slack/events"

    def ticket(self, *, requester: str = "alice", statement: str = "DELETE FROM orders WHERE "
               "id < 10", connection: str = "shop", min_approvals: int = 1,
               timeout: float = 600, params: list[Any] | None = None,
               escalate_to: tuple[str, ...] = ()) -> int:
        t = self.svc.approvals.create(TicketRequest(
            requester=requester, requester_groups=("engineers",), connection=connection,
            statement=statement, classification="write", rule="writes-need-approval",
            reason="data changes need a second pair of eyes", approver_groups=("approvers",),
            min_approvals=min_approvals, timeout=timeout, tables=("orders",), params=params,
            escalate_after=60 if escalate_to else None, escalate_to=escalate_to,
            language="sql", facts=ticket_facts("write", ("orders",), 9, False)))
        return t.id

    def post(self, body: str, *, ts: int | None = None, secret: str = SECRET,
             content_type: str = "application/x-www-form-urlencoded") -> requests.Response:
        return requests.post(self.url, data=body.encode(), timeout=10,
                             headers=slack_headers(body, secret, ts=ts,
                                                   content_type=content_type))

    def interact(self, payload: dict[str, Any], **kw: Any) -> requests.Response:
        return self.post(urlencode({"payload": json.dumps(payload)}), **kw)

    def command(self, user: str, text: str) -> requests.Response:
        return self.post(urlencode(slash(user, text)))

    def message(self, ticket: int, channel: str = CHANNEL) -> dict[str, Any]:
        """The ticket's channel message as the stand-in holds it now."""
        mine = [m for m in self.slack.channel_messages(channel)
                if f"Ticket #{ticket}>" in json.dumps(m.get("blocks"))]
        assert len(mine) == 1, f"expected one message for #{ticket}, found {len(mine)}"
        return mine[0]

    def wait_message(self, ticket: int, contains: str, channel: str = CHANNEL,
                     timeout: float = 15) -> dict[str, Any]:
        def probe() -> Any:
            for (c, _), m in self.slack.messages.items():
                blob = json.dumps(m.get("blocks"))
                if c == channel and f"Ticket #{ticket}>" in blob and contains in blob:
                    return m
            return None
        return self.slack.wait_for(probe, timeout, f"message #{ticket} with {contains!r}")

    def wait_dm(self, slack_id: str, contains: str, timeout: float = 15) -> str:
        def probe() -> Any:
            return next((t for (c, _), m in self.slack.messages.items() if c == slack_id
                         for t in [m["text"] or ""] if contains in t), None)
        return self.slack.wait_for(probe, timeout, f"DM to {slack_id} with {contains!r}")

    def wait_ephemeral(self, slack_id: str, contains: str, timeout: float = 10) -> str:
        def probe() -> Any:
            return next((c.args.get("text") for c in self.slack.calls
                         if c.method == "chat.postEphemeral" and c.args.get("user") == slack_id
                         and contains in (c.args.get("text") or "")), None)
        return self.slack.wait_for(probe, timeout, f"ephemeral to {slack_id}: {contains!r}")

    def audits(self, **where: Any) -> list[AuditRecord]:
        with self.svc.store.session() as s:
            rows = list(s.scalars(select(AuditRecord).order_by(AuditRecord.seq)))
        return [r for r in rows if all(getattr(r, k) == v for k, v in where.items())]

    def notified(self, ticket: int) -> list[TicketEvent]:
        with self.svc.store.session() as s:
            return list(s.scalars(select(TicketEvent).where(
                TicketEvent.ticket_id == ticket, TicketEvent.kind == "notified")))

    def wait_pumped(self, event_id: int, timeout: float = 15) -> None:
        """Until the bots' cursor has read past ``event_id``."""
        def probe() -> Any:
            with self.svc.store.session() as s:
                cur = s.get(ChatCursor, "ticket_events")
                return cur is not None and cur.last_event_id >= event_id
        self.slack.wait_for(probe, timeout, f"bots cursor past event {event_id}")

    def wait_drained(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.svc.store.session() as s:
                left = s.scalars(select(OutboxItem).where(OutboxItem.sent_at.is_(None))).all()
            if not left:
                return
            time.sleep(0.1)
        raise AssertionError(f"outbox not drained: {[(r.kind, r.last_error) for r in left]}")


@pytest.fixture(scope="module")
def slack() -> Iterator[SlackStandIn]:
    s = SlackStandIn().start()
    s.add_user("UALICE", "alice@example.com")
    s.add_user("UBOB", "bob@example.com")
    s.add_user("UDANA", "dana@example.com")
    s.add_user("UCAROL", "carol@example.com")
    s.add_user("UFRANK", "frank@example.com")
    s.add_user("UNOBODY", "nobody@elsewhere.example")
    s.add_user("UFAKEBOB", "bob@example.com", confirmed=False)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def h(slack: SlackStandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    harness = Harness(tmp_path_factory.mktemp("slack"), slack)
    yield harness
    harness.stop()


def _texts(blocks: list[dict[str, Any]]) -> str:
    return json.dumps(blocks, ensure_ascii=False)


# ---------------------------------------------------------------- the ticket message

def test_ticket_message_shows_context_and_approve_click_decides(h: Harness) -> None:
    tid = h.ticket(statement="DELETE FROM orders WHERE id < 10")
    msg = h.wait_message(tid, "Pending approval")
    blob = _texts(msg["blocks"])
    assert "<@UALICE>" in blob                       # requester mentioned (mapped by e-mail)
    assert "shop" in blob and "writes-need-approval" in blob
    assert "data changes need a second pair of eyes" in blob
    assert "```DELETE FROM orders WHERE id &lt; 10```" in blob   # code block, escaped
    assert "9 (EXPLAIN)" in blob                     # the estimate, as a fact
    assert "0 of 1" in blob and "Time left" in blob
    expires = int(h.svc.approvals.get(tid).expires_at)
    assert f"<!date^{expires}^{{date_short_pretty}} {{time}}|" in blob   # reader's time zone
    buttons = [e["action_id"] for b in msg["blocks"] if b["type"] == "actions"
               for e in b["elements"]]
    assert buttons == ["kt_approve", "kt_approve_comment", "kt_reject"]
    h.wait_dm("UALICE", f"#{tid} on shop is waiting for approval")
    assert f"https://keyturn.example/tickets/{tid}" in h.wait_dm("UALICE", f"#{tid}")

    r = h.interact(block_action("UBOB", "kt_approve", tid, ts=msg["ts"]))
    assert r.status_code == 200
    final = h.wait_message(tid, "Approved by bob")
    assert not [b for b in final["blocks"] if b["type"] == "actions"], "buttons must go"
    t = h.svc.approvals.get(tid)
    assert (t.status, t.decided_by) == ("approved", "bob")
    with h.svc.store.session() as s:
        assert s.scalars(select(Vote.via).where(Vote.ticket_id == tid)).all() == ["slack"]
    h.wait_dm("UALICE", f"#{tid} on shop was approved by bob")
    h.wait_ephemeral("UBOB", f"You approved ticket #{tid}")


def _opened(h: Harness, tid: int, callback: str) -> dict[str, Any]:
    """The modal the bot opened for ticket ``tid`` (the last one)."""
    opened = h.slack.wait_for(lambda: [c.args["view"] for c in h.slack.calls
                                       if c.method == "views.open"
                                       and c.args["view"]["callback_id"] == callback
                                       and f'"ticket": {tid}' in c.args["view"]
                                       ["private_metadata"]], what=f"views.open {callback}")
    return opened[-1]


def _statement_in(view: dict[str, Any]) -> str:
    """The statement as the modal's code blocks show it, unescaped."""
    text = "".join(b["text"]["text"].removeprefix("```").removesuffix("```")
                   for b in view["blocks"] if b["type"] == "section"
                   and b["text"]["text"].startswith("```"))
    return text.replace("`\u200b``", "```").replace("&lt;", "<").replace(
        "&gt;", ">").replace("&amp;", "&")


def test_long_statement_cannot_be_approved_in_one_click(h: Harness) -> None:
    """What the message cannot show whole is never approved by one click: the message
    says how much is cut, Approve opens the whole text, and the modal's approval counts
    only for the text it showed."""
    stmt = ("DELETE FROM orders WHERE id IN (" + ", ".join(map(str, range(200)))
            + ") OR status <> 'x'")
    tid = h.ticket(statement=stmt)
    msg = h.wait_message(tid, "Pending approval")
    blob = _texts(msg["blocks"])
    assert stmt not in blob and "…```" in blob and "OR status" not in blob
    assert f"{len(stmt) - 119:,} of {len(stmt):,} characters are not shown" in blob
    buttons = [(e["action_id"], e["text"]["text"]) for b in msg["blocks"]
               if b["type"] == "actions" for e in b["elements"]]
    assert buttons == [("kt_approve", "Read all and approve…"), ("kt_reject", "Reject")]

    h.interact(block_action("UBOB", "kt_approve", tid, ts=msg["ts"]))
    modal = _opened(h, tid, "kt_approve_modal")
    assert h.svc.approvals.get(tid).status == "pending"     # the click decided nothing
    assert _statement_in(modal) == stmt                      # the whole text, OR included
    assert modal["submit"]["text"] == "Approve"

    meta = json.loads(modal["private_metadata"])
    forged = view_submission("UBOB", tid, "", callback="kt_approve_modal",
                             meta={**meta, "digest": "0" * 32}, block="comment")
    r = h.interact(forged)
    assert r.json()["response_action"] == "errors"
    assert "different text" in r.json()["errors"]["comment"]
    assert h.svc.approvals.get(tid).status == "pending"

    r = h.interact(view_submission("UBOB", tid, "checked the ids with the requester",
                                   callback="kt_approve_modal", meta=meta, block="comment"))
    assert r.status_code == 200 and not r.content.strip(), r.text
    t = h.svc.approvals.get(tid)
    assert (t.status, t.decided_by, t.decision_comment) == (
        "approved", "bob", "checked the ids with the requester")
    final = h.wait_message(tid, "Approved by bob")
    assert "checked the ids with the requester" in _texts(final["blocks"])
    h.wait_dm("UALICE", f"#{tid} on shop was approved by bob: “checked the ids with the "
                        "requester”")


def test_an_old_approve_button_on_a_cut_statement_opens_the_text(h: Harness) -> None:
    """The listener decides from the ticket, not from the button: an Approve drawn as
    one click (an old message, a forged payload) still only opens the modal."""
    tid = h.ticket(statement="UPDATE orders SET note = '" + "n" * 300 + "' WHERE id = 1")
    msg = h.wait_message(tid, "Pending approval")
    h.interact(block_action("UDANA", "kt_approve", tid, ts=msg["ts"]))
    _opened(h, tid, "kt_approve_modal")
    time.sleep(0.3)
    assert h.svc.approvals.get(tid).status == "pending"


def test_parameters_count_as_statement_and_comment_is_optional(h: Harness) -> None:
    tid = h.ticket(statement="DELETE FROM orders WHERE id = $1 OR note = $2",
                   params=[7, "x" * 150])
    msg = h.wait_message(tid, "Pending approval")
    blob = _texts(msg["blocks"])
    assert "-- parameters:" in blob and "$1 = 7" in blob and "characters are not shown" in blob
    h.interact(block_action("UDANA", "kt_approve", tid, ts=msg["ts"]))
    modal = _opened(h, tid, "kt_approve_modal")
    assert f'$2 = "{"x" * 150}"' in _statement_in(modal)
    r = h.interact(view_submission("UDANA", tid, "", callback="kt_approve_modal",
                                   meta=json.loads(modal["private_metadata"]), block="comment"))
    assert r.status_code == 200
    t = h.svc.approvals.get(tid)
    assert (t.status, t.decided_by, t.decision_comment) == ("approved", "dana", None)


def test_approve_with_comment_on_a_short_statement(h: Harness) -> None:
    tid = h.ticket()
    msg = h.wait_message(tid, "Pending approval")
    h.interact(block_action("UALICE", "kt_approve_comment", tid, ts=msg["ts"]))
    h.wait_ephemeral("UALICE", "cannot decide it (separation of duties)")  # no form for her
    h.interact(block_action("UDANA", "kt_approve_comment", tid, ts=msg["ts"]))
    modal = _opened(h, tid, "kt_approve_modal")
    assert _statement_in(modal) == "DELETE FROM orders WHERE id < 10"
    h.interact(view_submission("UDANA", tid, "ok for the cleanup", callback="kt_approve_modal",
                               meta=json.loads(modal["private_metadata"]), block="comment"))
    h.wait_message(tid, "ok for the cleanup")
    assert h.svc.approvals.get(tid).decision_comment == "ok for the cleanup"
    h.wait_ephemeral("UDANA", f"You approved ticket #{tid}")


def test_statement_too_long_for_a_modal_is_decided_in_the_portal(h: Harness) -> None:
    stmt = "SELECT 1 -- " + "y" * 400_000
    tid = h.ticket(statement=stmt)
    msg = h.wait_message(tid, "Pending approval")
    h.interact(block_action("UBOB", "kt_approve", tid, ts=msg["ts"]))
    modal = _opened(h, tid, "kt_approve_modal")
    assert "submit" not in modal and len(modal["blocks"]) <= 100
    assert "cannot be approved here" in _texts(modal["blocks"])
    assert f"https://keyturn.example/tickets/{tid}" in _texts(modal["blocks"])
    assert h.svc.approvals.get(tid).status == "pending"


def test_connection_channel_overrides_default(h: Harness) -> None:
    tid = h.ticket(connection="billing")
    h.wait_message(tid, "Pending approval", channel="CBILLING")
    assert not [m for m in h.slack.channel_messages(CHANNEL)
                if f"Ticket #{tid}>" in json.dumps(m["blocks"])]


def test_delivered_message_is_notified_on_the_timeline_and_sends_nothing_more(
        h: Harness) -> None:
    tid = h.ticket(connection="billing")
    msg = h.wait_message(tid, "Pending approval", channel="CBILLING")
    ev = h.slack.wait_for(lambda: h.notified(tid), what="notified event")
    assert len(ev) == 1
    assert ev[0].actor is None
    assert ev[0].detail == {"platform": "slack", "channel": "CBILLING",
                            "channel_id": "CBILLING", "ts": msg["ts"],
                            "channel_name": "billing-approvals"}   # asked of Slack
    from keyturn.wording import event_sentence
    assert event_sentence("notified", None, ev[0].detail).plain() == \
        "notified in Slack #billing-approvals"
    t = h.svc.approvals.get(tid)
    assert t.status == "pending" and t.decided_at is None      # a note, not a transition
    h.wait_pumped(ev[0].id)
    h.wait_drained()
    # The bots read their own event back and planned nothing for it: the create
    # planned one post and one DM, and those are all Slack ever got for this ticket.
    with h.svc.store.session() as s:
        kinds = sorted(s.scalars(select(OutboxItem.kind).where(OutboxItem.ticket_id == tid)))
    assert kinds == ["dm", "post"]
    posts = [c for c in h.slack.calls_to("chat.postMessage")
             if re.search(rf"#{tid}\b", json.dumps(c.args))]
    assert [c.args["channel"] for c in posts] == ["CBILLING", "UALICE"]
    assert not [c for c in h.slack.calls_to("chat.update") if c.args.get("ts") == msg["ts"]]


def test_reject_opens_modal_and_reason_reaches_message_and_requester(h: Harness) -> None:
    tid = h.ticket()
    msg = h.wait_message(tid, "Pending approval")
    h.interact(block_action("UDANA", "kt_reject", tid, ts=msg["ts"]))
    opened = h.slack.wait_for(lambda: [c for c in h.slack.calls if c.method == "views.open"
                                       and f'"ticket": {tid}' in c.args["view"]
                                       ["private_metadata"]], what="views.open")
    assert opened[0].args["view"]["callback_id"] == "kt_reject_modal"
    assert h.svc.approvals.get(tid).status == "pending"     # opening the modal decides nothing

    # An empty reason is refused inside the modal.
    r = h.interact(view_submission("UDANA", tid, "   "))
    assert r.status_code == 200 and r.json()["response_action"] == "errors"
    assert h.svc.approvals.get(tid).status == "pending"

    r = h.interact(view_submission("UDANA", tid, "not during the sale"))
    assert r.status_code == 200
    final = h.wait_message(tid, "Rejected by dana")
    assert "not during the sale" in _texts(final["blocks"])
    t = h.svc.approvals.get(tid)
    assert (t.status, t.decided_by, t.decision_comment) == ("rejected", "dana",
                                                             "not during the sale")
    h.wait_dm("UALICE", f"#{tid} on shop was rejected by dana: “not during the sale”")


# ---------------------------------------------------------------- who may click

def test_unmapped_clicker_is_refused_and_nothing_changes(h: Harness) -> None:
    tid = h.ticket()
    h.wait_message(tid, "Pending approval")
    for user in ("UNOBODY", "UFAKEBOB", "UUNKNOWN"):   # foreign e-mail, unconfirmed, no user
        assert h.interact(block_action(user, "kt_approve", tid)).status_code == 200
        h.wait_ephemeral(user, "Keyturn does not know who you are")
    h.interact(block_action("UNOBODY", "kt_reject", tid))
    # The listener answers after the ack: wait for the second refusal.
    h.slack.wait_for(lambda: len(h.slack.ephemerals("UNOBODY")) == 2, what="reject refusal")
    assert not [c for c in h.slack.calls if c.method == "views.open"
                and f'"ticket": {tid}' in c.args["view"]["private_metadata"]]
    assert h.svc.approvals.detail(tid)["votes"] == []
    assert h.svc.approvals.get(tid).status == "pending"
    refused = h.audits(kind="chat", ticket_id=tid, outcome="refused")
    assert {r.detail["platform_user"] for r in refused} >= {"UNOBODY", "UFAKEBOB", "UUNKNOWN"}


def test_wrong_group_and_self_approval_are_refused(h: Harness) -> None:
    tid = h.ticket(requester="alice")
    h.wait_message(tid, "Pending approval")
    h.interact(block_action("UCAROL", "kt_approve", tid))
    h.wait_ephemeral("UCAROL", "carol is not in an approver group")
    # alice, requester, is linked explicitly too (CLI) and gets approver rights nowhere.
    h.interact(block_action("UALICE", "kt_approve", tid))
    h.wait_ephemeral("UALICE", f"requested ticket {tid} and cannot decide it (separation")
    h.interact(block_action("UALICE", "kt_reject", tid))
    h.slack.wait_for(lambda: len([e for e in h.slack.ephemerals("UALICE")
                                  if f"requested ticket {tid} and cannot" in e]) == 2,
                     what="second refusal")
    assert h.svc.approvals.get(tid).status == "pending"
    assert h.svc.approvals.detail(tid)["votes"] == []


def test_explicit_link_made_by_cli_maps_a_slack_user(h: Harness) -> None:
    import subprocess

    h.slack.add_user("UDANA2", None)   # no e-mail at all: only a link can map this account
    tid = h.ticket()
    h.wait_message(tid, "Pending approval")
    h.interact(block_action("UDANA2", "kt_approve", tid))
    h.wait_ephemeral("UDANA2", "does not know who you are")
    res = subprocess.run([*KEYTURN, "-c", str(h.path), "bots", "link", "--platform", "slack",
                          "--id", "UDANA2", "--user", "dana"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    bad = subprocess.run([*KEYTURN, "-c", str(h.path), "bots", "link", "--platform", "slack",
                          "--id", "UX", "--user", "mallory"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown user 'mallory'" in bad.stderr
    h.interact(block_action("UDANA2", "kt_approve", tid))
    h.wait_message(tid, "Approved by dana")


def test_double_click_gives_one_decision_and_late_clicker_learns_who(h: Harness) -> None:
    tid = h.ticket()
    h.wait_message(tid, "Pending approval")
    results: list[int] = []
    threads = [threading.Thread(target=lambda u=u: results.append(
        h.interact(block_action(u, "kt_approve", tid)).status_code))
        for u in ("UBOB", "UDANA", "UBOB")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200, 200]
    final = h.wait_message(tid, "Approved by")
    t = h.svc.approvals.get(tid)
    assert t.status == "approved" and t.decided_by in ("bob", "dana")
    assert len(h.svc.approvals.detail(tid)["votes"]) == 1
    late = "dana" if t.decided_by == "bob" else "bob"
    h.wait_ephemeral(f"U{late.upper()}", f"already approved by {t.decided_by}")
    assert f"Approved by {t.decided_by}" in _texts(final["blocks"])


def test_two_of_three_posts_a_thread_reply_per_vote(h: Harness) -> None:
    tid = h.ticket(min_approvals=2)
    msg = h.wait_message(tid, "0 of 2")
    h.interact(block_action("UBOB", "kt_approve", tid))
    h.wait_message(tid, "1 of 2")
    h.slack.wait_for(lambda: [m for m in h.slack.replies(CHANNEL, msg["ts"])
                              if "bob approved (1 of 2 approvals)" in m["text"]],
                     what="thread reply for bob")
    h.wait_ephemeral("UBOB", "recorded (1 of 2)")
    assert h.svc.approvals.get(tid).status == "pending"
    h.interact(block_action("UBOB", "kt_approve", tid))      # counts once
    h.wait_ephemeral("UBOB", "already voted")
    h.interact(block_action("UDANA", "kt_approve", tid))
    final = h.wait_message(tid, "Approved by bob, dana")
    assert not [b for b in final["blocks"] if b["type"] == "actions"]
    h.slack.wait_for(lambda: len(h.slack.replies(CHANNEL, msg["ts"])) == 2, what="two replies")


def test_decision_made_elsewhere_updates_the_message(h: Harness) -> None:
    tid = h.ticket()
    h.wait_message(tid, "Pending approval")
    h.svc.approvals.vote(tid, h.svc.identities.identity_of("dana"), "approve", via="portal")
    h.wait_message(tid, "Approved by dana")
    h.svc.approvals.finish(tid, "execute", rows=7)
    h.wait_message(tid, "Executed: 7 rows")
    h.wait_dm("UALICE", f"#{tid} on shop was approved by dana, then executed: 7 rows")


def test_expiry_updates_message_and_reminder_is_posted_once(h: Harness) -> None:
    tid = h.ticket(timeout=5)          # reminders: [3s] before expiry
    h.wait_message(tid, "Pending approval")
    h.slack.wait_for(lambda: [c for c in h.slack.calls_to("chat.postMessage")
                              if f"Reminder: ticket #{tid}" in (c.args.get("text") or "")],
                     timeout=10, what="reminder")
    time.sleep(max(0.0, h.svc.approvals.get(tid).expires_at - time.time()) + 0.1)
    assert h.svc.approvals.expire_due() == [tid]
    h.wait_message(tid, "Expired at")
    h.wait_dm("UALICE", f"#{tid} on shop expired")
    reminders = [c for c in h.slack.calls_to("chat.postMessage")
                 if f"Reminder: ticket #{tid}" in (c.args.get("text") or "")]
    assert len(reminders) == 1
    msg = h.message(tid)
    # In the request's thread, broadcast to the channel, and on the timeline.
    assert reminders[0].args["thread_ts"] == msg["ts"]
    assert str(reminders[0].args["reply_broadcast"]).lower() in ("true", "1")
    from keyturn.wording import event_sentence
    events = [e for e in h.svc.approvals.detail(tid)["events"] if e["kind"] == "reminded"]
    assert len(events) == 1
    assert event_sentence("reminded", None, events[0]["detail"]).plain().startswith(
        "reminder sent in Slack #approvals (expires in about ")


def test_escalation_replies_in_the_thread_and_shows_the_new_approvers(h: Harness) -> None:
    tid = h.ticket(escalate_to=("leads",))
    msg = h.wait_message(tid, "Pending approval")
    assert "0 of 1 (approvers)" in _texts(msg["blocks"])
    assert h.svc.approvals.escalate_due(now=time.time() + 61) == [tid]
    h.wait_message(tid, "0 of 1 (approvers, leads)")
    reply = h.slack.wait_for(lambda: [m for m in h.slack.replies(CHANNEL, msg["ts"])
                                      if f"Escalated: ticket #{tid} " in (m["text"] or "")],
                             what="escalation reply")
    assert "leads may decide it now" in reply[0]["text"]


# ---------------------------------------------------------------- /keyturn

def test_slash_commands_answer_ephemerally(h: Harness) -> None:
    mine = h.ticket(requester="alice")
    h.wait_message(mine, "Pending approval")
    r = h.command("UALICE", "mine")
    assert r.status_code == 200
    body = r.json()
    assert body["response_type"] == "ephemeral" and f"*#{mine}* pending" in body["text"]

    body = h.command("UBOB", "pending").json()
    assert body["response_type"] == "ephemeral"
    ids = [e["value"] for b in body["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert str(mine) in ids
    assert h.command("UALICE", "pending").json()["blocks"][0]["text"]["text"] == \
        "Nothing is waiting for you."

    body = h.command("UBOB", f"status {mine}").json()
    assert body["response_type"] == "ephemeral" and f"*#{mine}* Pending approval" in body["text"]
    assert "does not know who you are" in h.command("UNOBODY", f"status {mine}").json()["text"]
    assert f"You may not see ticket #{mine}" in h.command("UFRANK", f"status {mine}").json()[
        "text"]                                      # another engineer
    assert f"*#{mine}*" in h.command("UCAROL", f"status {mine}").json()["text"]   # auditor
    assert "no ticket #99999" in h.command("UBOB", "status 99999").json()["text"].lower()
    assert "/keyturn mine" in h.command("UBOB", "help").json()["text"]
    assert "/keyturn mine" in h.command("UBOB", "").json()["text"]


# ---------------------------------------------------------------- forged and replayed

def test_forged_and_replayed_requests_get_401_and_are_audited(h: Harness) -> None:
    tid = h.ticket()
    h.wait_message(tid, "Pending approval")
    body = urlencode({"payload": json.dumps(block_action("UBOB", "kt_approve", tid))})
    forged = h.post(body, secret="not-the-secret")
    replayed = h.post(body, ts=int(time.time()) - 600)       # validly signed, 10 minutes old
    unsigned = requests.post(h.url, data=body, timeout=10,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert [forged.status_code, replayed.status_code, unsigned.status_code] == [401, 401, 401]
    time.sleep(0.5)
    assert h.svc.approvals.get(tid).status == "pending"
    reasons = [r.reason for r in h.audits(kind="chat", outcome="unauthorized")]
    assert "bad signature" in reasons
    assert any("old (replay?)" in r for r in reasons)
    assert any("missing" in r for r in reasons)


# ---------------------------------------------------------------- delivery that loses nothing

def test_outage_and_rate_limit_then_every_message_ends_right(h: Harness) -> None:
    h.wait_drained()
    h.slack.down()
    approved, rejected, pending = h.ticket(), h.ticket(), h.ticket()
    bob, dana = (h.svc.identities.identity_of(u) for u in ("bob", "dana"))
    # Decisions arrive (portal, CLI) while the create messages still wait to go out.
    h.svc.approvals.vote(approved, bob, "approve", via="portal")
    h.svc.approvals.vote(rejected, dana, "reject", "wrong table", via="api")
    time.sleep(2.5)
    with h.svc.store.session() as s:
        failing = s.scalars(select(OutboxItem).where(OutboxItem.sent_at.is_(None),
                                                     OutboxItem.attempts > 0)).all()
    assert failing and all(r.last_error for r in failing)
    # Nothing was lost or skipped while Slack was away: every row waits.
    assert {r.ticket_id for r in failing} <= {approved, rejected, pending}
    import subprocess

    shown = subprocess.run([*KEYTURN, "-c", str(h.path), "bots", "outbox"], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0 and "undelivered" in shown.stdout
    assert f"ticket {approved:<6} post" in shown.stdout and "Slack unreachable" in shown.stdout

    h.slack.fail("chat.postMessage", 429, count=1, retry_after=1)
    h.slack.up()
    h.wait_drained(timeout=40)
    assert "Approved by bob" in _texts(h.message(approved)["blocks"])
    assert "Rejected by dana" in _texts(h.message(rejected)["blocks"])
    assert "wrong table" in _texts(h.message(rejected)["blocks"])
    assert "Pending approval" in _texts(h.message(pending)["blocks"])
    # Each ticket reached the channel once, after the outage, and says so once.
    for tid in (approved, rejected, pending):
        assert [e.detail["channel"] for e in h.notified(tid)] == [CHANNEL]
    h.wait_dm("UALICE", f"#{approved} on shop was approved by bob")
    h.wait_dm("UALICE", f"#{rejected} on shop was rejected by dana: “wrong table”")
    for tid in (approved, rejected, pending):
        h.wait_dm("UALICE", f"#{tid} on shop is waiting for approval")
    # Retry-After was honoured: nothing went to Slack within a second of the 429.
    limited = next(c for c in h.slack.calls if c.status == 429)
    after = [c for c in h.slack.calls if c.at > limited.at and c.method != "auth.test"]
    assert after and after[0].at - limited.at >= 0.95


# ---------------------------------------------------------------- Socket Mode

def test_socket_mode_click_and_command(tmp_path: Path) -> None:
    slack = SlackStandIn().start()
    slack.add_user("UALICE", "alice@example.com")
    slack.add_user("UBOB", "bob@example.com")
    h = Harness(tmp_path, slack, mode="socket")
    try:
        tid = h.ticket()
        h.wait_message(tid, "Pending approval")
        # No HTTP endpoint in Socket Mode: the route does not exist.
        assert requests.post(h.url, data="x", timeout=5).status_code == 404
        eid = slack.socket_send("slash_commands", slash("UBOB", f"status {tid}"))
        reply = slack.wait_for(lambda: slack.socket_replies.get(eid), what="command ack")
        assert f"*#{tid}* Pending approval" in reply["payload"]["text"]
        assert reply["payload"]["response_type"] == "ephemeral"
        eid = slack.socket_send("interactive", block_action("UBOB", "kt_approve", tid))
        slack.wait_for(lambda: slack.socket_replies.get(eid), what="click ack")
        h.wait_message(tid, "Approved by bob")
        assert h.svc.approvals.get(tid).decided_by == "bob"
        opened = [c for c in slack.calls if c.method == "apps.connections.open"]
        assert opened and opened[0].headers["Authorization"] == f"Bearer {slack.app_token}"
    finally:
        h.stop()
        slack.stop()


# ---------------------------------------------------------------- self-service links

def test_link_code_from_slack_redeemed_with_own_token(h: Harness) -> None:
    import os
    import subprocess

    h.slack.add_user("UNEWDANA", None)
    body = h.command("UNEWDANA", "link").json()
    assert body["response_type"] == "ephemeral"
    code = re.search(r"keyturn bots claim ([A-Z0-9]{5}-[A-Z0-9]{5})", body["text"]).group(1)
    claim_url = f"http://127.0.0.1:{h.port}/links/claim"

    # Somebody else's token and a made-up token: refused, audited, nothing linked.
    assert requests.post(claim_url, json={"code": code}, timeout=5,
                         headers={"Authorization": "Bearer kt_forged"}).status_code == 401
    assert requests.post(claim_url, json={"code": "AAAAA-BBBBB"}, timeout=5, headers={
        "Authorization": f"Bearer {h.svc.identities.create_token('bob').token}"}
    ).status_code == 401
    assert len(h.audits(action="link-claim", outcome="unauthorized")) >= 2

    token = h.svc.identities.create_token("dana").token
    res = subprocess.run([*KEYTURN, "-c", str(h.path), "bots", "claim", code.lower()],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, KEYTURN_TOKEN=token))
    assert res.returncode == 0, res.stderr
    assert "slack account UNEWDANA is now linked to dana" in res.stdout
    again = subprocess.run([*KEYTURN, "-c", str(h.path), "bots", "claim", code],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, KEYTURN_TOKEN=token))
    assert again.returncode == 2 and "unknown, used or expired" in again.stderr

    tid = h.ticket()
    h.wait_message(tid, "Pending approval")
    h.interact(block_action("UNEWDANA", "kt_approve", tid))
    h.wait_message(tid, "Approved by dana")


def test_link_code_from_slack_redeemed_on_the_portal(h: Harness) -> None:
    from portal import create_app
    from portal.accounts import set_password
    from tests.portal_support import Auth

    h.slack.add_user("UPORTALBOB", None)          # no e-mail: only a link can map it
    tid = h.ticket()
    msg = h.wait_message(tid, "Pending approval")
    h.interact(block_action("UPORTALBOB", "kt_approve", tid, ts=msg["ts"]))
    h.wait_ephemeral("UPORTALBOB", "Keyturn does not know who you are")

    body = h.command("UPORTALBOB", "link").json()
    assert body["response_type"] == "ephemeral"
    assert "<https://keyturn.example/chat-accounts>" in body["text"]
    code = re.search(r"the code `([A-Z0-9]{5}-[A-Z0-9]{5})`", body["text"]).group(1)

    set_password(h.config, h.svc.store, "bob", "portal-password-for-bob")
    app = create_app(h.svc)
    bob = Auth(app.test_client())
    assert bob.login("bob", "portal-password-for-bob").status_code == 303
    r = bob.post("/chat-accounts/claim", {"code": code}, page="/chat-accounts")
    assert r.status_code == 200 and "Your Slack account UPORTALBOB is now linked to bob" in r.text

    h.interact(block_action("UPORTALBOB", "kt_approve", tid, ts=msg["ts"]))
    h.wait_message(tid, "Approved by bob")


def test_expired_link_code_is_refused(h: Harness) -> None:
    from bots.links import Links

    links = Links(h.config, h.svc.store)
    code = links.start_claim("slack", "ULATE", now=time.time() - 3600)
    r = requests.post(f"http://127.0.0.1:{h.port}/links/claim", json={"code": code}, timeout=5,
                      headers={"Authorization":
                               f"Bearer {h.svc.identities.create_token('bob').token}"})
    assert r.status_code == 401 and "expired" in r.json()["message"]
    assert links.user_of("slack", "ULATE") is None


def test_first_start_announces_pending_tickets_not_history(tmp_path: Path) -> None:
    slack = SlackStandIn().start()
    h = Harness(tmp_path, slack, start=False)
    try:
        old = h.ticket()
        h.svc.approvals.vote(old, h.svc.identities.identity_of("bob"), "approve")
        waiting = h.ticket()
        h.start()
        h.wait_message(waiting, "Pending approval")
        h.wait_drained()
        assert not [m for m in slack.channel_messages(CHANNEL)
                    if f"Ticket #{old}>" in json.dumps(m["blocks"])]
        # A restart continues from the stored cursor: nothing is announced twice.
        h.stop()
        h.start()
        later = h.ticket()
        h.wait_message(later, "Pending approval")
        h.wait_drained()
        assert len([m for m in slack.channel_messages(CHANNEL)
                    if f"Ticket #{waiting}>" in json.dumps(m["blocks"])]) == 1
    finally:
        h.stop()
        slack.stop()


def test_keyturn_bots_runs_alone_and_stops_cleanly(tmp_path: Path) -> None:
    """The Procfile's ``bots: keyturn bots`` process."""
    import signal
    import subprocess

    from tests.conftest import wait_port

    slack = SlackStandIn().start()
    slack.add_user("UBOB", "bob@example.com")
    h = Harness(tmp_path, slack, start=False)
    proc = subprocess.Popen([*KEYTURN, "-c", str(h.path), "bots"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(h.port, proc=proc)
        health = requests.get(f"http://127.0.0.1:{h.port}/healthz", timeout=5).json()
        assert health == {"ok": True, "outbox_backlog": 0}
        tid = h.ticket()
        h.wait_message(tid, "Pending approval")
        h.interact(block_action("UBOB", "kt_approve", tid))
        h.wait_message(tid, "Approved by bob")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        slack.stop()
    assert proc.returncode == 0, out
