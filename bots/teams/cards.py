"""Adaptive Card builders: the same content as the Slack message.

Pending cards carry ``Action.Execute`` Approve and Reject (with a reason
input) and a ``refresh`` action, so Teams re-fetches the current state
whenever the card is shown; decided cards show who, when and why and no
buttons. Pure functions of a TicketView.

A statement cut to fit the card is not approved in one click: its Approve asks for
the review card (verb ``review``), which shows the whole text and approves with the
text's digest; the bot refuses an approval whose digest is not the ticket's.

They must not do I/O or read anything but the TicketView.
"""

from __future__ import annotations

from typing import Any

from bots.render import TicketView

CARD_TYPE = "application/vnd.microsoft.card.adaptive"
# Teams refuses cards over about 28 KB; the statement gets this much of it.
REVIEW_CHARS = 20_000


def ticket_card(view: TicketView, *, refresh_users: list[str] | None = None) -> dict[str, Any]:
    facts = [
        {"title": "Requester", "value": view.requester},
        {"title": "Connection", "value": view.connection},
        {"title": "Class", "value": view.classification},
        {"title": "Rule", "value": view.rule},
        {"title": "Reason", "value": view.reason or "-"},
        *({"title": label, "value": value} for label, value in view.facts),
        {"title": "Approvals", "value": view.approvals_line()},
        ({"title": "Time left", "value": view.time_left} if view.pending else
         {"title": "Decided", "value": view.decided_at}),
    ]
    body: list[dict[str, Any]] = [
        {"type": "TextBlock", "size": "Medium", "weight": "Bolder", "wrap": True,
         "text": f"Ticket #{view.id} · {view.status_word}"},
        {"type": "FactSet", "facts": facts},
        {"type": "TextBlock", "text": view.statement, "fontType": "Monospace", "wrap": True},
    ]
    if view.truncated:
        body.append({"type": "TextBlock", "wrap": True, "weight": "Bolder",
                     "color": "Warning", "text": f"✂ {view.cut_note()}"})
    for v in view.votes:
        body.append({"type": "TextBlock", "wrap": True, "isSubtle": True, "text": (
            f"{'Approved' if v['vote'] == 'approve' else 'Rejected'} by {v['approver']}"
            + (f": {v['comment']}" if v.get("comment") else ""))})
    card: dict[str, Any] = {
        "type": "AdaptiveCard", "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.5", "body": body,
    }
    data = {"ticket": view.id}
    if view.pending:
        # Without userIds Teams refreshes for everyone in conversations of up to 60
        # people; an explicit list names who (at most 60) in bigger ones.
        card["refresh"] = {"action": {"type": "Action.Execute", "verb": "refresh",
                                      "data": data}}
        if refresh_users:
            card["refresh"]["userIds"] = refresh_users[:60]
        seen = {**data, "seen": view.digest}
        approve: list[dict[str, Any]] = [
            {"type": "Action.Execute", "title": "Read all and approve…", "verb": "review",
             "data": data, "style": "positive"}] if view.truncated else [
            {"type": "Action.Execute", "title": "Approve", "verb": "approve", "data": seen,
             "style": "positive"},
            {"type": "Action.ShowCard", "title": "Approve with comment", "card": {
                "type": "AdaptiveCard", "body": [_comment()],
                "actions": [{"type": "Action.Execute", "title": "Approve", "verb": "approve",
                             "data": seen, "style": "positive"}]}}]
        card["actions"] = [
            *approve,
            {"type": "Action.ShowCard", "title": "Reject", "card": {
                "type": "AdaptiveCard", "body": [
                    {"type": "Input.Text", "id": "reason", "isMultiline": True,
                     "isRequired": True, "label": "Why? The requester sees this.",
                     "errorMessage": "Give a reason."}],
                "actions": [{"type": "Action.Execute", "title": "Reject", "verb": "reject",
                             "data": data, "style": "destructive"}]}},
            {"type": "Action.OpenUrl", "title": "Portal", "url": view.portal_url},
        ]
    else:
        body.append({"type": "TextBlock", "wrap": True, "weight": "Bolder",
                     "text": view.outcome_line()})
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Portal",
                            "url": view.portal_url}]
    return card


def _comment() -> dict[str, Any]:
    return {"type": "Input.Text", "id": "comment", "isMultiline": True, "maxLength": 2000,
            "label": "Comment (optional; the requester sees it)"}


def review_card(view: TicketView) -> dict[str, Any]:
    """The whole statement (scrollable in Teams), an optional comment, and Approve with
    the digest of the text shown; Back returns to the ticket card. Too long for a card:
    no Approve, the portal decides it."""
    data = {"ticket": view.id}
    body: list[dict[str, Any]] = [
        {"type": "TextBlock", "size": "Medium", "weight": "Bolder", "wrap": True,
         "text": f"Approve #{view.id}? Read the whole {view.noun}"},
        {"type": "FactSet", "facts": [
            {"title": "Requester", "value": view.requester},
            {"title": "Connection", "value": view.connection},
            {"title": "Class", "value": view.classification},
            {"title": "Length", "value": f"{len(view.full):,} characters"}]},
    ]
    actions: list[dict[str, Any]] = []
    if len(view.full) > REVIEW_CHARS:
        body.append({"type": "TextBlock", "wrap": True, "weight": "Bolder", "text": (
            f"This {view.noun} has {len(view.full):,} characters: too long to show whole in "
            "Teams, so it cannot be approved here. Read and decide it in the portal.")})
    else:
        body += [{"type": "Container", "style": "emphasis", "items": [
                     {"type": "TextBlock", "text": view.full, "fontType": "Monospace",
                      "wrap": True}]},
                 _comment()]
        actions.append({"type": "Action.Execute", "title": "Approve", "verb": "approve",
                        "data": {**data, "seen": view.digest}, "style": "positive"})
    actions += [{"type": "Action.Execute", "title": "Back", "verb": "refresh", "data": data},
                {"type": "Action.OpenUrl", "title": "Portal", "url": view.portal_url}]
    return {"type": "AdaptiveCard", "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "version": "1.5", "body": body, "actions": actions}


def attachment(card: dict[str, Any]) -> dict[str, Any]:
    return {"contentType": CARD_TYPE, "content": card}
