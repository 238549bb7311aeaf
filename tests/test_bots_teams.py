"""Teams end to end against a local Bot Framework stand-in: Adaptive Card
invokes signed with a test key (served from a local JWKS) are POSTed into the
real messaging endpoint of the real bots server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey
from sqlalchemy import select

from bots.links import Links
from bots.models import ChatCursor, OutboxItem
from bots.server import start_in_thread
from keyturn.approvals import TicketRequest
from keyturn.config import load_config
from keyturn.models import AuditRecord, TicketEvent
from keyturn.services import build_services
from proxies.postgres.holding import ticket_facts
from tests.chat_standins import TeamsStandIn
from tests.conftest import free_port

CONV = "19:approvers@thread.tacv2"
TENANT = "tenant-1"

CONFIG = """
store: {{url: "sqlite:///{base}/keyturn.db"}}
portal: {{public_url: "https://keyturn.example"}}
identity:
  users:
    alice: {{groups: [engineers], email: alice@example.com}}
    bob: {{groups: [approvers], email: bob@example.com}}
    dana: {{groups: [approvers], email: dana@example.com}}
    carol: {{groups: [auditors], email: carol@example.com}}
connections:
  - {{name: shop, type: postgres, target: {{host: 127.0.0.1}}, policy: shop}}
policies:
  shop:
    rules:
      - {{name: writes-need-approval, match: {{class: write}}, action: review,
          review: {{approvers: [approvers]}}}}
integrations:
  listen: 127.0.0.1:{port}
  poll_interval: 0.1
  teams:
    app_id: {app_id}
    app_password_file: {base}/teams-secret
    tenant_id: {tenant}
    service_url: {api}
    conversation_id: "{conv}"
    conversations: {{names: {{"{conv}": ops-approvals}}}}
    reminders: [3s]
    openid_metadata_url: {api}/openid
    token_url: {api}/botframework/token
"""


class TeamsHarness:
    def __init__(self, base: Path, teams: TeamsStandIn):
        (base / "teams-secret").write_text(teams.app_password)
        self.port = free_port()
        path = base / "keyturn.yaml"
        path.write_text(CONFIG.format(base=base, port=self.port, app_id=teams.app_id,
                                      tenant=TENANT, api=teams.url, conv=CONV))
        self.config = load_config(path)
        self.svc = build_services(self.config)
        self.links = Links(self.config, self.svc.store)
        self.teams = teams
        self.stop = start_in_thread(self.config)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/messages"

    def ticket(self, *, requester: str = "alice", min_approvals: int = 1,
               statement: str = "UPDATE orders SET status = 'void' WHERE id = 3",
               timeout: float = 600) -> int:
        return self.svc.approvals.create(TicketRequest(
            requester=requester, requester_groups=("engineers",), connection="shop",
            statement=statement, classification="write",
            rule="writes-need-approval", reason="data changes need a second pair of eyes",
            approver_groups=("approvers",), min_approvals=min_approvals, timeout=timeout,
            language="sql", facts=ticket_facts("write", (), 1, False))).id

    def invoke(self, user_id: str, aad: str, verb: str, ticket: int, *,
               reason: str | None = None, token: str | None = None,
               **inputs: Any) -> requests.Response:
        """An Action.Execute invoke as Teams sends it: the action's data with the card's
        input values merged in."""
        data: dict[str, Any] = {"ticket": ticket, **inputs}
        if reason is not None:
            data["reason"] = reason
        activity = {
            "type": "invoke", "name": "adaptiveCard/action", "id": f"inv-{time.time()}",
            "channelId": "msteams", "serviceUrl": self.teams.url,
            "from": {"id": user_id, "aadObjectId": aad},
            "recipient": {"id": f"28:{self.teams.app_id}"},
            "conversation": {"id": CONV, "tenantId": TENANT, "conversationType": "channel"},
            "channelData": {"tenant": {"id": TENANT}},
            "value": {"action": {"type": "Action.Execute", "verb": verb, "data": data}},
        }
        token = self.teams.sign() if token is None else token
        return requests.post(self.url, json=activity, timeout=10,
                             headers={"Authorization": f"Bearer {token}"})

    def card(self, ticket: int, contains: str, timeout: float = 15) -> dict[str, Any]:
        def probe() -> Any:
            for c in self.teams.cards(CONV):
                blob = repr(c)
                if f"Ticket #{ticket} " in blob and contains in blob:
                    return c
            return None
        return self.teams.wait_for(probe, timeout, f"card #{ticket} with {contains!r}")

    def personal(self, user_id: str, contains: str, timeout: float = 15) -> str:
        conv = f"a:1on1-{user_id}"
        return self.teams.wait_for(lambda: next((t for t in self.teams.texts(conv)
                                                 if contains in t), None),
                                   timeout, f"1:1 to {user_id} with {contains!r}")

    def notified(self, ticket: int) -> list[TicketEvent]:
        with self.svc.store.session() as s:
            return list(s.scalars(select(TicketEvent).where(
                TicketEvent.ticket_id == ticket, TicketEvent.kind == "notified")))

    def audits(self, **where: Any) -> list[AuditRecord]:
        with self.svc.store.session() as s:
            rows = list(s.scalars(select(AuditRecord).order_by(AuditRecord.seq)))
        return [r for r in rows if all(getattr(r, k) == v for k, v in where.items())]


@pytest.fixture(scope="module")
def teams() -> Iterator[TeamsStandIn]:
    t = TeamsStandIn().start()
    t.add_member("29:alice", "aad-alice", "alice@example.com")
    t.add_member("29:bob", "aad-bob", "bob@example.com")
    t.add_member("29:dana", "aad-dana", "dana@example.com")
    t.add_member("29:carol", "aad-carol", "carol@example.com")
    t.add_member("29:stranger", "aad-stranger", "stranger@elsewhere.example")
    yield t
    t.stop()


@pytest.fixture(scope="module")
def th(teams: TeamsStandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamsHarness]:
    h = TeamsHarness(tmp_path_factory.mktemp("teams"), teams)
    yield h
    h.stop()


def test_card_posted_and_approve_invoke_decides(th: TeamsHarness) -> None:
    tid = th.ticket()
    card = th.card(tid, "Pending approval")
    blob = repr(card)
    for part in ("alice", "shop", "writes-need-approval", "1 (EXPLAIN)", "Transaction open",
                 "0 of 1",
                 "UPDATE orders SET status = 'void' WHERE id = 3", "Time left"):
        assert part in blob, part
    verbs = [a.get("verb") for a in card["actions"] if a["type"] == "Action.Execute"]
    reject = next(a for a in card["actions"] if a["title"] == "Reject")
    commented = next(a for a in card["actions"] if a["title"] == "Approve with comment")
    assert verbs == ["approve"] and reject["card"]["actions"][0]["verb"] == "reject"
    assert commented["card"]["body"][0]["id"] == "comment"
    assert commented["card"]["actions"][0]["verb"] == "approve"
    assert reject["card"]["body"][0]["id"] == "reason"
    assert card["refresh"]["action"]["verb"] == "refresh"
    th.personal("29:alice", f"#{tid} on shop is waiting for approval")

    r = th.invoke("29:bob", "aad-bob", "approve", tid)
    assert r.status_code == 200
    body = r.json()
    assert body["type"] == "application/vnd.microsoft.card.adaptive"
    assert "Approved by bob" in repr(body["value"]) and "refresh" not in body["value"]
    final = th.card(tid, "Approved by bob")
    assert not [a for a in final["actions"] if a["type"] != "Action.OpenUrl"]
    th.personal("29:alice", f"#{tid} on shop was approved by bob")
    assert th.svc.approvals.get(tid).decided_by == "bob"
    # The outbound calls carried the token from the token endpoint.
    assert th.teams.calls_to("token")


def test_reject_needs_a_reason_and_refresh_shows_current_state(th: TeamsHarness) -> None:
    tid = th.ticket()
    th.card(tid, "Pending approval")
    body = th.invoke("29:dana", "aad-dana", "reject", tid, reason="  ").json()
    assert body["type"] == "application/vnd.microsoft.activity.message"
    assert "needs a reason" in body["value"]
    assert th.svc.approvals.get(tid).status == "pending"
    body = th.invoke("29:dana", "aad-dana", "reject", tid, reason="wrong order id").json()
    assert "Rejected by dana" in repr(body["value"]) and "wrong order id" in repr(body["value"])
    th.card(tid, "wrong order id")
    th.personal("29:alice", f"#{tid} on shop was rejected by dana: “wrong order id”")
    refreshed = th.invoke("29:carol", "aad-carol", "refresh", tid).json()
    assert "Rejected by dana" in repr(refreshed["value"])


def test_unmapped_wrong_group_and_self_approval_are_refused(th: TeamsHarness) -> None:
    tid = th.ticket(requester="alice")
    th.card(tid, "Pending approval")
    th.links.link("teams", "aad-alice", "alice", by="test")       # explicit AAD link
    for uid, aad, expect in (("29:stranger", "aad-stranger", "does not know who you are"),
                             ("29:ghost", "aad-ghost", "does not know who you are"),
                             ("29:carol", "aad-carol", "not in an approver group"),
                             ("29:alice", "aad-alice", "separation of duties")):
        body = th.invoke(uid, aad, "approve", tid).json()
        assert body["type"] == "application/vnd.microsoft.activity.message", uid
        assert expect in body["value"], (uid, body)
    # A member lookup that returns someone else's AAD id does not borrow their e-mail.
    body = th.invoke("29:bob", "aad-not-bob", "approve", tid).json()
    assert "does not know who you are" in body["value"]
    assert th.svc.approvals.get(tid).status == "pending"
    assert th.svc.approvals.detail(tid)["votes"] == []
    assert len(th.audits(kind="chat", ticket_id=tid, outcome="refused")) == 5


def test_bad_tokens_get_401_and_are_audited(th: TeamsHarness) -> None:
    tid = th.ticket()
    th.card(tid, "Pending approval")
    now = int(time.time())
    foreign = RSAKey.generate_key(2048, parameters={"kid": th.teams.kid})
    bad = {
        "expired": th.teams.sign({"exp": now - 3600, "iat": now - 7200, "nbf": now - 7200}),
        "audience": th.teams.sign({"aud": "someone-else"}),
        "issuer": th.teams.sign({"iss": "https://evil.example"}),
        "signature": th.teams.sign(key=foreign),
        "service url": th.teams.sign({"serviceurl": "https://evil.example"}),
        "no service url": th.teams.sign({"serviceurl": None}),
        "hs256": jwt.encode({"alg": "HS256", "kid": th.teams.kid},
                            {"iss": th.teams.issuer, "aud": th.teams.app_id, "exp": now + 600},
                            OctKey.import_key("x" * 32)),
        "garbage": "not.a.jwt",
    }
    before = len(th.audits(kind="chat", outcome="unauthorized"))
    for name, token in bad.items():
        r = th.invoke("29:bob", "aad-bob", "approve", tid, token=token)
        assert r.status_code == 401, name
    r = requests.post(th.url, json={"type": "invoke"}, timeout=10)
    assert r.status_code == 401
    assert th.svc.approvals.get(tid).status == "pending"
    assert len(th.audits(kind="chat", outcome="unauthorized")) - before == len(bad) + 1


def test_posted_card_is_notified_on_the_timeline_and_sends_nothing_more(
        th: TeamsHarness) -> None:
    tid = th.ticket()
    th.card(tid, "Pending approval")
    th.personal("29:alice", f"#{tid} on shop is waiting for approval")
    ev = th.teams.wait_for(lambda: th.notified(tid), what="notified event")
    assert len(ev) == 1 and ev[0].detail["platform"] == "teams"
    assert ev[0].detail["channel"] == CONV
    from keyturn.wording import event_sentence
    assert event_sentence("notified", None, ev[0].detail).plain() == \
        "notified in Teams ops-approvals"
    with th.teams.lock:
        assert f"Ticket #{tid} " in repr(th.teams.activities[(CONV, ev[0].detail["activity_id"])])
    assert th.svc.approvals.get(tid).status == "pending"

    def pumped() -> bool:
        with th.svc.store.session() as s:
            cur = s.get(ChatCursor, "ticket_events")
            return cur is not None and cur.last_event_id >= ev[0].id
    th.teams.wait_for(pumped, what="bots cursor past the notified event")
    time.sleep(0.5)      # a few more delivery passes: nothing may follow
    with th.svc.store.session() as s:
        rows = list(s.scalars(select(OutboxItem).where(OutboxItem.ticket_id == tid)))
    assert sorted(r.kind for r in rows) == ["dm", "post"]
    assert all(r.sent_at for r in rows)
    card_calls = [c for c in th.teams.calls if c.method in ("post_activity", "put_activity")
                  and c.args.get("conversation") == CONV and f"Ticket #{tid} " in repr(c.args)]
    assert [c.method for c in card_calls] == ["post_activity"]


def test_teams_outage_and_429_then_cards_end_right(th: TeamsHarness) -> None:
    th.teams.down()
    tid = th.ticket()
    th.svc.approvals.vote(tid, th.svc.identities.identity_of("dana"), "approve", via="portal")
    time.sleep(2)
    th.teams.fail("post_activity", 429, count=1, retry_after=1)
    th.teams.up()
    th.card(tid, "Approved by dana", timeout=40)
    th.personal("29:alice", f"#{tid} on shop was approved by dana", timeout=40)
    cards = [c for c in th.teams.cards(CONV) if f"Ticket #{tid} " in repr(c)]
    assert len(cards) == 1
    th.teams.wait_for(lambda: th.notified(tid), what="notified event")
    assert [e.detail["channel"] for e in th.notified(tid)] == [CONV]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with th.svc.store.session() as s:
            if not s.scalars(select(OutboxItem).where(OutboxItem.sent_at.is_(None))).all():
                break
        time.sleep(0.1)
    else:
        raise AssertionError("Teams outbox did not drain")


def test_link_code_only_in_a_personal_chat(th: TeamsHarness) -> None:
    import re

    def message(conv_type: str, conv: str) -> None:
        activity = {"type": "message", "id": f"m-{time.time()}", "text": "link",
                    "channelId": "msteams", "serviceUrl": th.teams.url,
                    "from": {"id": "29:newbie", "aadObjectId": "aad-newbie"},
                    "conversation": {"id": conv, "tenantId": TENANT,
                                     "conversationType": conv_type}}
        r = requests.post(th.url, json=activity, timeout=10,
                          headers={"Authorization": f"Bearer {th.teams.sign()}"})
        assert r.status_code == 200

    message("channel", CONV)
    th.teams.wait_for(lambda: any("1:1 chat, not in a channel" in t
                                  for t in th.teams.texts(CONV)), what="channel refusal")
    message("personal", "a:newbie-1on1")
    text = th.teams.wait_for(lambda: next((t for t in th.teams.texts("a:newbie-1on1")
                                           if "keyturn bots claim" in t), None), what="code")
    code = re.search(r"claim ([A-Z0-9]{5}-[A-Z0-9]{5})", text).group(1)
    assert f"the code {code} on the portal's Chat accounts page " \
        "(https://keyturn.example/chat-accounts)" in text
    r = requests.post(f"http://127.0.0.1:{th.port}/links/claim", json={"code": code},
                      timeout=5, headers={"Authorization":
                                          f"Bearer {th.svc.identities.create_token('bob').token}"})
    assert r.status_code == 200 and r.json()["user"] == "bob"
    tid = th.ticket()
    th.card(tid, "Pending approval")
    body = th.invoke("29:newbie", "aad-newbie", "approve", tid).json()
    assert "Approved by bob" in repr(body["value"])


def test_signing_key_rotation_is_picked_up_and_old_keys_stop_working() -> None:
    """InboundAuth against the stand-in's real OpenID metadata and JWKS over HTTP."""
    import asyncio

    import aiohttp

    from bots.teams.auth import AuthError, InboundAuth
    from keyturn.config import SecretRef, TeamsSettings

    teams = TeamsStandIn().start()
    settings = TeamsSettings(app_id=teams.app_id, app_password=SecretRef(env="UNUSED"),
                             tenant_id=TENANT, service_url=teams.url, conversation_id=CONV,
                             openid_metadata_url=f"{teams.url}/openid")

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            auth = InboundAuth(settings, session, refetch_interval=0)
            old = teams.sign()
            assert (await auth.validate(f"Bearer {old}", teams.url))["aud"] == teams.app_id
            teams.rotate_key()
            new = teams.sign()
            assert (await auth.validate(f"Bearer {new}", teams.url))["aud"] == teams.app_id
            with pytest.raises(AuthError):     # the retired key is no longer published
                await auth.validate(f"Bearer {old}", teams.url)

    try:
        asyncio.run(go())
        assert len(teams.calls_to("jwks")) >= 2
    finally:
        teams.stop()


def _card_text(card: dict[str, Any]) -> str:
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "TextBlock":
                out.append(node["text"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(card)
    return "\n".join(out)


def test_long_statement_is_read_whole_before_approval(th: TeamsHarness) -> None:
    stmt = ("DELETE FROM orders WHERE id IN (" + ", ".join(map(str, range(300)))
            + ") OR status <> 'x'")
    tid = th.ticket(statement=stmt)
    card = th.card(tid, "Pending approval")
    assert stmt not in _card_text(card) and "OR status" not in _card_text(card)
    assert "characters are not shown" in _card_text(card)
    verbs = [a.get("verb") for a in card["actions"] if a["type"] == "Action.Execute"]
    assert verbs == ["review"]

    # An approve without the digest of the whole text (an old card, a forged invoke)
    # is answered with the whole text, not counted.
    body = th.invoke("29:bob", "aad-bob", "approve", tid).json()
    assert body["type"] == "application/vnd.microsoft.card.adaptive"
    assert stmt in _card_text(body["value"])
    assert th.svc.approvals.get(tid).status == "pending"
    review = th.invoke("29:bob", "aad-bob", "review", tid).json()["value"]
    assert stmt in _card_text(review)
    approve = next(a for a in review["actions"] if a.get("verb") == "approve")
    assert any(b.get("id") == "comment" for b in review["body"])
    body = th.invoke("29:bob", "aad-bob", "approve", tid, seen="0" * 32).json()
    assert th.svc.approvals.get(tid).status == "pending"
    body = th.invoke("29:bob", "aad-bob", "approve", tid, seen=approve["data"]["seen"],
                     comment="ids checked").json()
    assert "Approved by bob" in _card_text(body["value"])
    t = th.svc.approvals.get(tid)
    assert (t.status, t.decision_comment) == ("approved", "ids checked")
    th.personal("29:alice", f"#{tid} on shop was approved by bob: “ids checked”")
    # The requester cannot open the approval form of their own ticket.
    tid2 = th.ticket(statement=stmt)
    th.card(tid2, "Pending approval")
    body = th.invoke("29:alice", "aad-alice", "review", tid2).json()
    assert body["type"] == "application/vnd.microsoft.activity.message"
    assert "separation of duties" in body["value"]


def test_statement_too_long_for_a_card_goes_to_the_portal(th: TeamsHarness) -> None:
    tid = th.ticket(statement="SELECT 1 -- " + "z" * 30_000)
    th.card(tid, "Pending approval")
    review = th.invoke("29:dana", "aad-dana", "review", tid).json()["value"]
    assert "cannot be approved here" in _card_text(review)
    assert not [a for a in review["actions"] if a.get("verb") == "approve"]
    assert th.svc.approvals.get(tid).status == "pending"


def test_approve_with_comment_on_a_short_statement(th: TeamsHarness) -> None:
    tid = th.ticket()
    card = th.card(tid, "Pending approval")
    seen = next(a for a in card["actions"] if a.get("verb") == "approve")["data"]["seen"]
    body = th.invoke("29:dana", "aad-dana", "approve", tid, seen=seen,
                     comment="fine after the backup").json()
    assert "fine after the backup" in _card_text(body["value"])
    assert th.svc.approvals.get(tid).decision_comment == "fine after the backup"


def test_reminder_updates_the_card_and_replies_under_it(th: TeamsHarness) -> None:
    tid = th.ticket(timeout=6)          # reminders: [3s] before expiry
    th.card(tid, "Pending approval")
    ev = th.teams.wait_for(lambda: th.notified(tid), what="notified event")
    aid = ev[0].detail["activity_id"]
    reply = th.teams.wait_for(lambda: [a for a in th.teams.texts(CONV)
                                       if f"Reminder: ticket #{tid} " in a], timeout=10,
                              what="reminder reply")
    assert len(reply) == 1
    posted = [c for c in th.teams.calls if c.method == "reply_activity"
              and f"Reminder: ticket #{tid} " in repr(c.args)]
    assert posted[0].args["parent"] == aid and posted[0].args["replyToId"] == aid
    updates = [c for c in th.teams.calls if c.method == "put_activity"
               and c.args.get("activity") == aid]
    assert updates, "the card's countdown is updated with the reminder"
    # The timeline's "reminded" is recorded once the reply went out (just after it).
    events = th.teams.wait_for(lambda: [e for e in th.svc.approvals.detail(tid)["events"]
                                        if e["kind"] == "reminded"], what="reminded event")
    assert len(events) == 1
    from keyturn.wording import event_sentence
    assert event_sentence("reminded", None, events[0]["detail"]).plain().startswith(
        "reminder sent in Teams ops-approvals")
