"""An abandoned ticket as people see it: the portal's ticket page, history filter and
decision form, and the chat messages approvers and the requester get."""

from __future__ import annotations

from flask import Flask
from portal_support import (  # noqa: F401 - fixtures
    Auth,
    app_fixture,
    make_ticket,
    svc_fixture,
)

from bots.outbox import ticket_plan
from bots.render import requester_note, ticket_view
from keyturn.approvals import ABANDONED, ABANDONED_COMMENT
from keyturn.models import TicketEvent
from keyturn.services import Services


def _abandon(svc: Services, *, approved: bool = False) -> int:
    tid = make_ticket(svc)
    if approved:
        svc.approvals.vote(tid, svc.identities.identity_of("bob"), "approve", "fine")
    svc.approvals.finish(tid, "abandon", comment=ABANDONED_COMMENT)
    return tid


def test_the_ticket_page_says_the_session_ended_and_refuses_votes(app: Flask,
                                                                  svc: Services) -> None:
    tid = _abandon(svc)
    dana = Auth(app.test_client())
    dana.login("dana")
    html = dana.client.get(f"/tickets/{tid}").text
    assert '<span class="badge st-abandoned">abandoned</span>' in html
    assert "The requester's session ended" in html.replace("&#39;", "'")
    assert "abandoned: the requester&#39;s session ended, nothing ran" in html  # timeline
    assert f'action="/tickets/{tid}/approve"' not in html
    r = dana.post(f"/tickets/{tid}/approve", {"comment": "ok"}, htmx=True,
                  page=f"/tickets/{tid}")
    assert r.status_code == 409
    assert "session ended before this ticket could run" in r.text.replace("&#39;", "'")
    assert svc.approvals.get(tid).status == ABANDONED
    carol = Auth(app.test_client())  # an auditor
    carol.login("carol")
    history = carol.client.get("/history?outcome=abandoned").text
    assert f"/tickets/{tid}" in history and '<option value="abandoned" selected>' in history


def test_chat_tells_approvers_and_the_requester(svc: Services) -> None:
    pending, approved = _abandon(svc), _abandon(svc, approved=True)
    for tid, line in ((pending, "Abandoned: the requester's session ended"),
                      (approved, "Approved by bob at ")):
        view = ticket_view(svc.approvals.detail(tid), portal_url="http://p", limit=500)
        assert view.status_word == "Abandoned" and not view.pending
        assert view.outcome_line().startswith(line)
        assert "the requester's session ended" in view.outcome_line()
        assert "nothing ran" in view.outcome_line()
        assert "your session ended" in requester_note(ABANDONED, view)
    with svc.store.session() as s:
        ev = s.query(TicketEvent).filter_by(ticket_id=pending, kind="abandoned").one()
        plan = ticket_plan(ev, svc.approvals.get(pending), [])
    assert [(p.kind, p.payload) for p in plan] == [("update", {}),
                                                  ("dm", {"what": ABANDONED})]
