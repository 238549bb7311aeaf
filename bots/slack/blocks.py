"""Block Kit builders for the ticket message, the reject modal and the
``/keyturn`` answers. Pure functions of a TicketView: no I/O.

They must not do I/O or read anything but the TicketView.
"""

from __future__ import annotations

import json
from typing import Any

from bots.render import TicketView, fmt_time

APPROVE, REJECT, REJECT_MODAL = "kt_approve", "kt_reject", "kt_reject_modal"


def esc(text: str) -> str:
    """Slack mrkdwn control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def code(text: str) -> str:
    # A ``` inside the statement would close the block early.
    return "```" + esc(text).replace("```", "`\u200b``") + "```"


def who(user: str, slack_id: str | None) -> str:
    return f"<@{slack_id}>" if slack_id else esc(user)


def expires(view: TicketView) -> str:
    """The expiry in each reader's own time zone: stays right while the message
    sits in the channel, unlike the countdown next to it."""
    return (f"until <!date^{int(view.expires_at)}^{{date_short_pretty}} {{time}}|"
            f"{fmt_time(view.expires_at)}>")


def summary(view: TicketView) -> str:
    """The notification text (also what screen readers and push previews show)."""
    return (f"#{view.id} {view.status_word}: {view.classification} on {view.connection} "
            f"requested by {view.requester}")


def ticket_blocks(view: TicketView, *, requester_slack: str | None) -> list[dict[str, Any]]:
    state = view.status_word if view.pending else f"{view.status_word} — {view.outcome_line()}"
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": (
            f"*<{view.portal_url}|Ticket #{view.id}>* · *{esc(state)}*")}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Requester*\n{who(view.requester, requester_slack)}"},
            {"type": "mrkdwn", "text": f"*Connection*\n{esc(view.connection)}"},
            {"type": "mrkdwn", "text": f"*Class*\n{esc(view.classification)}"},
            {"type": "mrkdwn", "text": f"*Rule*\n{esc(view.rule)}"},
            *({"type": "mrkdwn", "text": f"*{esc(label)}*\n{esc(value)}"}
              for label, value in view.facts[:4]),  # a section holds at most 10 fields
            {"type": "mrkdwn", "text": (f"*Time left*\n{view.time_left} ({expires(view)})"
                                        if view.pending else f"*Decided*\n{view.decided_at}")},
            {"type": "mrkdwn", "text": f"*Approvals*\n{view.approvals} of {view.required}"},
        ]},
        {"type": "section", "text": {"type": "mrkdwn",
                                     "text": f"*Reason*\n{esc(view.reason or '-')}"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": code(view.statement) + (
            f"\n<{view.portal_url}|Statement truncated: view in portal>" if view.truncated
            else "")}},
    ]
    if view.votes:
        lines = [f"{'✅' if v['vote'] == 'approve' else '❌'} {esc(v['approver'])}"
                 + (f": {esc(v['comment'])}" if v.get("comment") else "") for v in view.votes]
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": " · ".join(lines)}]})
    if view.pending:
        blocks.append(actions(view.id))
    else:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"{esc(view.outcome_line())} <{view.portal_url}|Portal>"}]})
    return blocks


def actions(ticket_id: int) -> dict[str, Any]:
    return {"type": "actions", "block_id": f"kt_decide_{ticket_id}", "elements": [
        {"type": "button", "action_id": APPROVE, "style": "primary", "value": str(ticket_id),
         "text": {"type": "plain_text", "text": "Approve"}},
        {"type": "button", "action_id": REJECT, "style": "danger", "value": str(ticket_id),
         "text": {"type": "plain_text", "text": "Reject"}},
    ]}


def reject_modal(ticket_id: int, *, channel: str | None) -> dict[str, Any]:
    return {
        "type": "modal", "callback_id": REJECT_MODAL,
        "private_metadata": json.dumps({"ticket": ticket_id, "channel": channel}),
        "title": {"type": "plain_text", "text": f"Reject #{ticket_id}"},
        "submit": {"type": "plain_text", "text": "Reject"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [{"type": "input", "block_id": "reason", "label": {
            "type": "plain_text", "text": "Why? The requester sees this."},
            "element": {"type": "plain_text_input", "action_id": "reason", "multiline": True,
                        "min_length": 1, "max_length": 2000}}],
    }


def pending_blocks(views: list[TicketView]) -> list[dict[str, Any]]:
    if not views:
        return [{"type": "section", "text": {"type": "mrkdwn",
                                             "text": "Nothing is waiting for you."}}]
    out: list[dict[str, Any]] = []
    for v in views[:15]:
        out.append({"type": "section", "text": {"type": "mrkdwn", "text": (
            f"*<{v.portal_url}|#{v.id}>* {esc(v.classification)} on {esc(v.connection)} by "
            f"{esc(v.requester)} · {v.approvals} of {v.required} · {v.time_left} left\n"
            + code(v.statement))}})
        out.append(actions(v.id))
    return out
