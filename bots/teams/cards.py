"""Adaptive Card builders: the same content as the Slack message.

Pending cards carry ``Action.Execute`` Approve and Reject (with a reason
input) and a ``refresh`` action, so Teams re-fetches the current state
whenever the card is shown; decided cards show who, when and why and no
buttons. Pure functions of a TicketView.

They must not do I/O or read anything but the TicketView.
"""

from __future__ import annotations

from typing import Any

from bots.render import TicketView

CARD_TYPE = "application/vnd.microsoft.card.adaptive"


def ticket_card(view: TicketView, *, refresh_users: list[str] | None = None) -> dict[str, Any]:
    facts = [
        {"title": "Requester", "value": view.requester},
        {"title": "Connection", "value": view.connection},
        {"title": "Class", "value": view.classification},
        {"title": "Rule", "value": view.rule},
        {"title": "Reason", "value": view.reason or "-"},
        *({"title": label, "value": value} for label, value in view.facts),
        {"title": "Approvals", "value": f"{view.approvals} of {view.required}"},
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
        body.append({"type": "TextBlock", "wrap": True, "isSubtle": True,
                     "text": f"Statement truncated: [view in portal]({view.portal_url})"})
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
        card["actions"] = [
            {"type": "Action.Execute", "title": "Approve", "verb": "approve", "data": data,
             "style": "positive"},
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


def attachment(card: dict[str, Any]) -> dict[str, Any]:
    return {"contentType": CARD_TYPE, "content": card}
