"""Chat in the portal: the "notified" timeline event the bots write, and the
Chat accounts page that redeems a bot's one-time link code for the signed-in
user (and lists and removes only that user's own links)."""

from __future__ import annotations

import time

import pytest
from flask import Flask
from portal_support import (  # noqa: F401 - fixtures
    Auth,
    app_fixture,
    auth_fixture,
    client_fixture,
    make_ticket,
    svc_fixture,
)
from sqlalchemy import select

from bots.links import Links
from keyturn.models import AuditRecord
from keyturn.services import Services


def _as(app: Flask, user: str) -> Auth:
    a = Auth(app.test_client())
    a.login(user)
    return a


def _audits(svc: Services, **where: object) -> list[AuditRecord]:
    with svc.store.session() as s:
        rows = list(s.scalars(select(AuditRecord).order_by(AuditRecord.seq)))
    return [r for r in rows if all(getattr(r, k) == v for k, v in where.items())]


# ---------------------------------------------------------------- "notified" on the timeline


def test_timeline_shows_where_the_ticket_was_notified(app: Flask, svc: Services) -> None:
    tid = make_ticket(svc)
    bob = _as(app, "bob")
    first = bob.client.get(f"/tickets/{tid}").text
    assert "notified" not in first
    version = f"pending.{len(svc.approvals.detail(tid)['events'])}"
    assert bob.client.get(f"/tickets/{tid}?v={version}",
                          headers={"HX-Request": "true"}).status_code == 204

    svc.approvals.note(tid, "notified", None, {"platform": "slack", "channel": "approvals",
                                                "channel_id": "C0APPROVALS", "ts": "1.2"})
    svc.approvals.note(tid, "notified", None, {"platform": "teams",
                                                "channel": "19:ops@thread.tacv2"})
    t = svc.approvals.get(tid)
    assert (t.status, t.decided_at) == ("pending", None)     # a note is not a transition

    # The open page's live update sees the change and swaps in the new timeline.
    live = bob.client.get(f"/tickets/{tid}?v={version}", headers={"HX-Request": "true"})
    assert live.status_code == 200
    assert "notified in Slack #approvals" in live.text
    # A Teams conversation id is not a name a person knows: the platform is named alone.
    assert "notified in Teams</span>" in live.text
    assert "19:ops@thread" not in live.text
    page = bob.client.get(f"/tickets/{tid}").text
    assert page.index("held for approval") < page.index("in Slack #approvals") \
        < page.index("notified in Teams")


def test_chat_places_read_as_names() -> None:
    from keyturn.wording import chat_place

    assert chat_place({"platform": "slack", "channel": "approvals"}) == "Slack #approvals"
    assert chat_place({"platform": "slack", "channel": "#ops"}) == "Slack #ops"
    assert chat_place({"platform": "slack", "channel": "C0APPROVALS"}) == "Slack"
    assert chat_place({"platform": "slack", "channel": "C0APPROVALS",
                       "channel_name": "approvals"}) == "Slack #approvals"
    assert chat_place({"platform": "teams", "channel": "19:ops@thread.tacv2"}) == "Teams"
    assert chat_place({"platform": "teams", "channel": "19:ops@thread.tacv2",
                       "channel_name": "Ops approvals"}) == "Teams Ops approvals"


def test_note_refuses_transition_kinds_and_unknown_tickets(svc: Services) -> None:
    from keyturn.errors import NotFound

    tid = make_ticket(svc)
    for kind in ("created", "decided", "approved", "executed", "vote:approve"):
        with pytest.raises(ValueError):
            svc.approvals.note(tid, kind)
    with pytest.raises(NotFound):
        svc.approvals.note(tid + 1000, "notified")
    assert [e["kind"] for e in svc.approvals.detail(tid)["events"]] == ["created"]


# ---------------------------------------------------------------- Chat accounts page


def test_claim_a_code_see_the_link_and_unlink(app: Flask, svc: Services) -> None:
    links = Links(svc.config, svc.store)
    code = links.start_claim("slack", "UDANA42")
    dana = _as(app, "dana")
    page = dana.client.get("/chat-accounts")
    assert page.status_code == 200
    assert "No linked chat accounts" in page.text and "/keyturn link" in page.text
    assert 'href="/chat-accounts" aria-current="page"' in page.text     # in the nav

    # Typed in lower case with spaces: still the same code.
    r = dana.post("/chat-accounts/claim", {"code": f"  {code.lower()} "}, page="/chat-accounts")
    assert r.status_code == 200
    assert "Your Slack account UDANA42 is now linked to dana." in r.text
    assert links.user_of("slack", "UDANA42") == "dana"
    listed = dana.client.get("/chat-accounts").text
    assert "<b>Slack</b> <code>UDANA42</code>" in listed and "No linked chat accounts" not in listed
    ok = _audits(svc, kind="chat", action="link-claim", outcome="ok")
    assert [(a.user, a.detail) for a in ok] == [
        ("dana", {"by": "portal", "platform": "slack", "platform_user": "UDANA42"})]

    # The code worked once.
    again = dana.post("/chat-accounts/claim", {"code": code}, page="/chat-accounts")
    assert again.status_code == 400 and "unknown, already used or expired" in again.text
    assert f'value="{code}"' in again.text                    # what was typed is kept

    (link,) = links.of_user("dana")
    r = dana.post(f"/chat-accounts/{link.id}/unlink", htmx=True, page="/chat-accounts")
    assert r.status_code == 200 and "<html" not in r.text     # the HTMX fragment
    assert "Your Slack account UDANA42 is no longer linked." in r.text
    assert "No linked chat accounts" in r.text
    assert links.user_of("slack", "UDANA42") is None
    assert [a.user for a in _audits(svc, kind="chat", action="unlink", outcome="ok")] == ["dana"]


def test_wrong_expired_and_empty_codes_are_refused(app: Flask, svc: Services) -> None:
    links = Links(svc.config, svc.store)
    expired = links.start_claim("teams", "aad-late", now=time.time() - 3600)
    dana = _as(app, "dana")
    for code in ("AAAAA-BBBBB", expired, "'; DROP TABLE chat_link_codes; --"):
        r = dana.post("/chat-accounts/claim", {"code": code}, page="/chat-accounts")
        assert r.status_code == 400
        assert "unknown, already used or expired" in r.text
        assert "ask the bot for a new one" in r.text
    r = dana.post("/chat-accounts/claim", {"code": "   "}, page="/chat-accounts")
    assert r.status_code == 400 and "Enter the code the Keyturn bot sent you" in r.text
    assert links.of_user("dana") == [] and links.user_of("teams", "aad-late") is None
    refused = _audits(svc, kind="chat", action="link-claim", outcome="unauthorized")
    assert len(refused) == 3 and {a.user for a in refused} == {"dana"}


def test_missing_or_forged_csrf_links_and_unlinks_nothing(app: Flask, svc: Services) -> None:
    links = Links(svc.config, svc.store)
    code = links.start_claim("slack", "UVICTIM")
    own = links.link("slack", "UDANA", "dana", by="adam")
    dana = _as(app, "dana")
    for headers, data in (({}, {"code": code}),
                          ({}, {"code": code, "csrf_token": "forged"}),
                          ({"X-CSRF-Token": "forged", "HX-Request": "true"}, {"code": code})):
        r = dana.client.post("/chat-accounts/claim", data=data, headers=headers)
        assert r.status_code == 403
    assert links.user_of("slack", "UVICTIM") is None
    r = dana.client.post(f"/chat-accounts/{own.id}/unlink", data={})
    assert r.status_code == 403
    assert links.user_of("slack", "UDANA") == "dana"
    # The code is still good for its owner: the refused requests did not burn it.
    r = dana.post("/chat-accounts/claim", {"code": code}, page="/chat-accounts")
    assert r.status_code == 200 and links.user_of("slack", "UVICTIM") == "dana"


def test_cannot_see_or_unlink_someone_elses_link(app: Flask, svc: Services) -> None:
    links = Links(svc.config, svc.store)
    bobs = links.link("slack", "UBOB", "bob", by="adam")
    links.link("teams", "aad-dana", "dana", by="adam")
    dana = _as(app, "dana")
    page = dana.client.get("/chat-accounts").text
    assert "aad-dana" in page and "UBOB" not in page
    assert "an operator" not in page and "by adam</small>" in page
    r = dana.post(f"/chat-accounts/{bobs.id}/unlink", page="/chat-accounts")
    assert r.status_code == 404 and f"You have no chat account link {bobs.id}." in r.text
    assert links.user_of("slack", "UBOB") == "bob"
    r = dana.post("/chat-accounts/99999/unlink", page="/chat-accounts")
    assert r.status_code == 404 and "You have no chat account link 99999." in r.text
    assert len(_audits(svc, kind="chat", action="unlink", outcome="refused")) == 2
    # Signed out: no page, no claim.
    anon = app.test_client()
    assert anon.get("/chat-accounts").status_code == 302
