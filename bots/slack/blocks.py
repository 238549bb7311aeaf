"""Block Kit builders for the ticket message, the approve and reject modals and the
``/keyturn`` answers. Pure functions of a TicketView: no I/O.

A statement cut to fit the message is never approved in one click: its Approve
button opens the approve modal, which shows the whole text (and says where it is too
long even for that), and the modal's submission counts only for the text it showed.

They must not do I/O or read anything but the TicketView.
"""

from __future__ import annotations

import json
from typing import Any

from bots.render import TicketView, fmt_time

APPROVE, REJECT, REJECT_MODAL = "kt_approve", "kt_reject", "kt_reject_modal"
APPROVE_COMMENT, APPROVE_MODAL = "kt_approve_comment", "kt_approve_modal"
# Slack's limits: 3000 characters of text in a section, 100 blocks in a modal.
SECTION_CHARS = 3000
MODAL_STATEMENT_BLOCKS = 90


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
            {"type": "mrkdwn", "text": f"*Approvals*\n{esc(view.approvals_line())}"},
        ]},
        {"type": "section", "text": {"type": "mrkdwn",
                                     "text": f"*Reason*\n{esc(view.reason or '-')}"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": code(view.statement) + (
            f"\n:scissors: *{esc(view.cut_note())}* <{view.portal_url}|Portal>"
            if view.truncated else "")}},
    ]
    if view.votes:
        lines = [f"{'✅' if v['vote'] == 'approve' else '❌'} {esc(v['approver'])}"
                 + (f": {esc(v['comment'])}" if v.get("comment") else "") for v in view.votes]
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": " · ".join(lines)}]})
    if view.pending:
        blocks.append(actions(view))
    else:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"{esc(view.outcome_line())} <{view.portal_url}|Portal>"}]})
    return blocks


def actions(view: TicketView) -> dict[str, Any]:
    """Approve, Approve with a comment, Reject. A cut statement has one Approve, which
    opens the whole text first (the listener checks again: an old message's button
    cannot approve what its message did not show)."""
    tid = str(view.id)
    approve = [{"type": "button", "action_id": APPROVE, "style": "primary", "value": tid,
                "text": {"type": "plain_text", "text": "Read all and approve…"}}] \
        if view.truncated else [
        {"type": "button", "action_id": APPROVE, "style": "primary", "value": tid,
         "text": {"type": "plain_text", "text": "Approve"}},
        {"type": "button", "action_id": APPROVE_COMMENT, "value": tid,
         "text": {"type": "plain_text", "text": "Approve with comment…"}}]
    return {"type": "actions", "block_id": f"kt_decide_{view.id}", "elements": [
        *approve,
        {"type": "button", "action_id": REJECT, "style": "danger", "value": tid,
         "text": {"type": "plain_text", "text": "Reject"}},
    ]}


def chunks(text: str, size: int = SECTION_CHARS - 10) -> list[str]:
    """``text`` in pieces whose code block (escaped, fenced) fits a section."""
    out: list[str] = []
    piece: list[str] = []
    n = 0
    for ch in text:
        w = len(esc(ch)) + (2 if ch == "`" else 0)
        if n + w > size - 6 and piece:
            out.append("".join(piece))
            piece, n = [], 0
        piece.append(ch)
        n += w
    if piece or not out:
        out.append("".join(piece))
    return out


def approve_modal(view: TicketView, *, channel: str | None) -> dict[str, Any]:
    """The whole statement and an optional comment; submitting approves exactly the text
    shown (its digest travels in ``private_metadata``). A statement too long even for a
    modal gets no submit button: it is approved in the portal."""
    pieces = chunks(view.full)
    head = {"type": "section", "text": {"type": "mrkdwn", "text": (
        f"*{esc(view.classification)}* on *{esc(view.connection)}* requested by "
        f"*{esc(view.requester)}* · rule {esc(view.rule)}\n{esc(view.reason or '')}")}}
    modal: dict[str, Any] = {
        "type": "modal", "callback_id": APPROVE_MODAL,
        "private_metadata": json.dumps({"ticket": view.id, "channel": channel,
                                        "digest": view.digest}),
        "title": {"type": "plain_text", "text": f"Approve #{view.id}"[:24]},
        "close": {"type": "plain_text", "text": "Cancel"},
    }
    if len(pieces) > MODAL_STATEMENT_BLOCKS:
        modal["blocks"] = [head, {"type": "section", "text": {"type": "mrkdwn", "text": (
            f"This {view.noun} has {len(view.full):,} characters: too long to show whole in "
            f"Slack, so it cannot be approved here. <{view.portal_url}|Read and decide it "
            "in the portal.>")}}]
        return modal
    modal["submit"] = {"type": "plain_text", "text": "Approve"}
    modal["blocks"] = [
        head,
        {"type": "context", "elements": [{"type": "mrkdwn", "text": (
            f"The whole {view.noun}, {len(view.full):,} characters:")}]},
        *({"type": "section", "text": {"type": "mrkdwn", "text": code(p)}} for p in pieces),
        {"type": "input", "block_id": "comment", "optional": True, "label": {
            "type": "plain_text", "text": "Comment (optional; the requester sees it)"},
         "element": {"type": "plain_text_input", "action_id": "comment", "multiline": True,
                     "max_length": 2000}},
    ]
    return modal


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
        out.append(actions(v))
    return out
