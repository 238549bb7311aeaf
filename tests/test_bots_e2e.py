"""ChatOps end to end: a real ``keyturn up`` (gateway, portal and bots in one
process), real PostgreSQL and psql, a Slack stand-in and a Teams stand-in.
Decisions are signed Slack interaction payloads and signed Teams invokes.

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after. Nothing reaches the
real Slack or Teams: the stand-ins answer on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from keyturn.launch.localpg import LocalPostgres
from tests.chat_standins import SlackStandIn, TeamsStandIn, block_action, slack_headers
from tests.conftest import Keyturn, free_port, make_keyturn

pytestmark = pytest.mark.integration

SECRET = "e2e-signing-secret"
CHANNEL = "CAPPROVALS"
CONV = "19:approvers@thread.tacv2"

INTEGRATIONS = """
integrations:
  listen: 127.0.0.1:{port}
  poll_interval: 0.1
  slack:
    bot_token_file: {base}/slack-bot-token
    signing_secret_file: {base}/slack-signing-secret
    channel: {channel}
    api_base_url: {slack}/api/
  teams:
    app_id: {app_id}
    app_password_file: {base}/teams-secret
    tenant_id: tenant-1
    service_url: {teams}
    conversation_id: "{conv}"
    openid_metadata_url: {teams}/openid
    token_url: {teams}/botframework/token
"""


class Chat:
    def __init__(self, kt: Keyturn, slack: SlackStandIn, teams: TeamsStandIn, port: int):
        self.kt, self.slack, self.teams, self.port = kt, slack, teams, port

    def slack_click(self, user: str, action: str, ticket: int) -> int:
        body = urlencode({"payload": json.dumps(block_action(user, action, ticket))})
        return requests.post(f"http://127.0.0.1:{self.port}/slack/events", data=body,
                             headers=slack_headers(body, SECRET), timeout=10).status_code

    def teams_invoke(self, user_id: str, aad: str, verb: str, ticket: int,
                     reason: str | None = None) -> dict:
        data: dict = {"ticket": ticket, **({"reason": reason} if reason else {})}
        activity = {"type": "invoke", "name": "adaptiveCard/action", "channelId": "msteams",
                    "serviceUrl": self.teams.url, "from": {"id": user_id, "aadObjectId": aad},
                    "conversation": {"id": CONV, "tenantId": "tenant-1"},
                    "value": {"action": {"type": "Action.Execute", "verb": verb,
                                         "data": data}}}
        r = requests.post(f"http://127.0.0.1:{self.port}/api/messages", json=activity,
                          headers={"Authorization": f"Bearer {self.teams.sign()}"}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def slack_message(self, ticket: int, contains: str) -> dict:
        def probe() -> object:
            for (c, _), m in self.slack.messages.items():
                blob = json.dumps(m.get("blocks"), ensure_ascii=False)
                if c == CHANNEL and f"Ticket #{ticket}>" in blob and contains in blob:
                    return m
            return None
        return self.slack.wait_for(probe, 20, f"Slack message #{ticket} with {contains!r}")

    def teams_card(self, ticket: int, contains: str) -> dict:
        return self.teams.wait_for(
            lambda: next((c for c in self.teams.cards(CONV)
                          if f"Ticket #{ticket} " in repr(c) and contains in repr(c)), None),
            20, f"Teams card #{ticket} with {contains!r}")

    def slack_dm(self, slack_id: str, contains: str) -> str:
        return self.slack.wait_for(lambda: next((t for t in self.slack.dms(slack_id)
                                                 if contains in (t or "")), None),
                                   20, f"Slack DM to {slack_id} with {contains!r}")


@pytest.fixture(scope="module")
def chat(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chat]:
    slack = SlackStandIn().start()
    teams = TeamsStandIn().start()
    for name in ("alice", "bob", "dana"):
        teams.add_member(f"29:{name}", f"aad-{name}", f"{name}@example.com")
    base: Path = tmp_path_factory.mktemp("chat-e2e")
    base.mkdir(exist_ok=True)
    (base / "slack-bot-token").write_text(slack.token)
    (base / "slack-signing-secret").write_text(SECRET)
    (base / "teams-secret").write_text(teams.app_password)
    port = free_port()
    pg.execute("CREATE TABLE IF NOT EXISTS chat_jobs (id int PRIMARY KEY, note text);"
               "ALTER TABLE chat_jobs OWNER TO app;"
               "INSERT INTO chat_jobs SELECT g, 'job' FROM generate_series(1, 20) g "
               "ON CONFLICT DO NOTHING", dbname="shop")
    kt = make_keyturn(base, pg, extra=INTEGRATIONS.format(
        port=port, base=base, channel=CHANNEL, slack=slack.url, app_id=teams.app_id,
        teams=teams.url, conv=CONV))
    # The config file's users have no e-mail here: people are linked explicitly.
    for platform, pid, user in (("slack", "UALICE", "alice"), ("slack", "UBOB", "bob"),
                                ("slack", "UDANA", "dana"), ("teams", "aad-alice", "alice"),
                                ("teams", "aad-bob", "bob"), ("teams", "aad-dana", "dana")):
        kt.cli("bots", "link", "--platform", platform, "--id", pid, "--user", user)
    kt.start()
    try:
        yield Chat(kt, slack, teams, port)
    finally:
        kt.stop()
        slack.stop()
        teams.stop()


def test_held_delete_approved_by_slack_click_psql_returns(chat: Chat) -> None:
    kt = chat.kt
    kt.skip_pending()
    p = kt.psql("alice", "DELETE FROM chat_jobs WHERE id = 1")
    t = kt.wait_ticket()
    msg = chat.slack_message(t["id"], "Pending approval")
    assert "DELETE FROM chat_jobs WHERE id = 1" in json.dumps(msg["blocks"])
    assert "<@UALICE>" in json.dumps(msg["blocks"])
    chat.teams_card(t["id"], "Pending approval")
    assert p.poll() is None, "psql must still be waiting"

    assert chat.slack_click("UBOB", "kt_approve", t["id"]) == 200
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.strip() == "DELETE 1"
    chat.slack_message(t["id"], "Approved by bob")
    chat.teams_card(t["id"], "Approved by bob")
    chat.slack_message(t["id"], "Executed: 1 row.")       # executed, shown in place
    chat.slack_dm("UALICE", f"#{t['id']} on shop is waiting for approval")
    chat.slack_dm("UALICE", f"#{t['id']} on shop was approved by bob")
    chat.slack_dm("UALICE", f"#{t['id']} on shop was approved by bob, then executed: 1 row.")
    # Alice also got her proactive Teams 1:1 messages.
    chat.teams.wait_for(lambda: any(f"#{t['id']} on shop was approved by bob" in x
                                    for x in chat.teams.texts("a:1on1-29:alice")),
                        20, "Teams 1:1 to alice")


def test_reject_in_teams_reaches_psql_with_reason(chat: Chat) -> None:
    kt = chat.kt
    p = kt.psql("alice", "DELETE FROM chat_jobs WHERE id = 2")
    t = kt.wait_ticket()
    chat.teams_card(t["id"], "Pending approval")
    body = chat.teams_invoke("29:dana", "aad-dana", "reject", t["id"], reason="not on payday")
    assert "Rejected by dana" in repr(body["value"])
    out, err = p.communicate(timeout=30)
    assert p.returncode != 0
    assert f"ticket {t['id']} rejected by dana: “not on payday”" in err
    chat.slack_message(t["id"], "Rejected by dana")
    chat.slack_dm("UALICE", f"#{t['id']} on shop was rejected by dana: “not on payday”")


def test_same_ticket_clicked_in_slack_and_teams_at_once_gives_one_decision(chat: Chat) -> None:
    kt = chat.kt
    p = kt.psql("alice", "DELETE FROM chat_jobs WHERE id = 3")
    t = kt.wait_ticket()
    chat.slack_message(t["id"], "Pending approval")
    chat.teams_card(t["id"], "Pending approval")
    answers: dict[str, object] = {}
    go = threading.Barrier(2)

    def slack() -> None:
        go.wait()
        answers["slack"] = chat.slack_click("UBOB", "kt_approve", t["id"])

    def teams() -> None:
        go.wait()
        answers["teams"] = chat.teams_invoke("29:dana", "aad-dana", "approve", t["id"])

    threads = [threading.Thread(target=slack), threading.Thread(target=teams)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    out, err = p.communicate(timeout=30)
    assert out.strip() == "DELETE 1", err
    detail = requests.get(f"{kt.url}/api/v1/tickets/{t['id']}", timeout=5, headers={
        "Authorization": f"Bearer {kt.tokens['carol']}"}).json()
    assert len(detail["votes"]) == 1
    winner = detail["decided_by"]
    assert winner in ("bob", "dana")
    # The late clicker is told who decided first, even when the gateway has run the
    # statement by then.
    told = re.compile(rf"ticket {t['id']} was already approved by {winner}")
    if winner == "bob":
        assert told.search(answers["teams"]["value"]), answers  # type: ignore[index]
    else:
        chat.slack.wait_for(lambda: any(told.search(e) for e in chat.slack.ephemerals("UBOB")),
                            15, "late Slack clicker told")
    chat.slack_message(t["id"], f"Approved by {winner}")
    chat.teams_card(t["id"], f"Approved by {winner}")
