"""The platform-neutral view of a ticket that Slack blocks and Teams cards share.

Everything a chat message shows is computed here from the ticket's CURRENT
state in the store, so a message rendered late (after an outage) is still
right. The statement goes through ``statement_excerpt`` and nowhere else, so
literal redaction can be added in one place.

It must not render from anything but the store's current state, nor do I/O.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from keyturn import wording
from keyturn.approvals import (
    ABANDONED,
    APPROVED,
    CANCELLED,
    EXECUTED,
    EXPIRED,
    FAILED,
    PENDING,
    REJECTED,
)

STATUS_WORDS = {
    PENDING: "Pending approval", APPROVED: "Approved", REJECTED: "Rejected",
    EXPIRED: "Expired", CANCELLED: "Cancelled", EXECUTED: "Approved and executed",
    FAILED: "Approved; execution failed", ABANDONED: "Abandoned",
}
# Why an abandoned ticket can no longer run, in the words approvers and requesters see.
SESSION_ENDED = "the requester's session ended (the gateway holding it stopped); nothing ran"


def full_text(ticket: dict[str, Any]) -> str:
    """Everything an approver must read before approving: the statement and, when the
    request carried them, its parameters (one per line, ``$1 = 'x'``)."""
    text = wording.reveal((ticket.get("statement") or "").strip())
    params = ticket.get("params")
    if params:
        text += "\n-- parameters:" + "".join(
            f"\n--   ${i} = {json.dumps(p, ensure_ascii=False, default=str)}"
            for i, p in enumerate(params, 1))
    return text


def statement_excerpt(ticket: dict[str, Any], limit: int) -> tuple[str, bool]:
    """The statement (with its parameters) as chat may show it: the one place to redact
    literals, shortened to ``limit`` characters. Returns (text, truncated)."""
    text = full_text(ticket)
    if len(text) <= limit:
        return text, False
    return text[: max(limit - 1, 1)].rstrip() + "…", True


def digest(text: str) -> str:
    """What an approval form carries of the text it showed, so an approval counts only
    for the text the approver could read."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_left(seconds: float) -> str:
    if seconds <= 0:
        return "expired"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m {s % 60}s"
    return f"{s}s"


#: What an action is called in chat, by its language (models.Ticket.language).
NOUNS = {"sql": "statement", "shell": "command", "": "statement", "text": "request"}


@dataclass(frozen=True)
class TicketView:
    """What every chat rendering of one ticket needs."""

    id: int
    status: str
    requester: str
    connection: str
    statement: str
    truncated: bool
    # The whole statement with its parameters, and how many of its characters
    # ``statement`` leaves out.
    full: str
    hidden: int
    classification: str
    rule: str
    reason: str
    # Labelled facts the protocol gave (models.Ticket.facts), minus Class (shown apart).
    facts: tuple[tuple[str, str], ...]
    time_left: str
    expires_at: float
    approvals: int
    required: int
    approver_groups: tuple[str, ...]
    votes: tuple[dict[str, Any], ...]
    decided_by: str | None
    decided_at: str
    comment: str | None
    result_rows: int | None
    result_error: str | None
    portal_url: str
    # What the action is called: statement (SQL), command (shell), request.
    noun: str = "statement"

    @property
    def pending(self) -> bool:
        return self.status == PENDING

    @property
    def status_word(self) -> str:
        return STATUS_WORDS.get(self.status, self.status)

    @property
    def digest(self) -> str:
        return digest(self.full)

    def approvals_line(self) -> str:
        """``0 of 1 (approvers)``: votes so far, and who may give them."""
        groups = f" ({', '.join(self.approver_groups)})" if self.approver_groups else ""
        return f"{self.approvals} of {self.required}{groups}"

    def cut_note(self) -> str:
        """Says plainly that the statement shown is cut, and by how much."""
        return (f"Cut for chat: {self.hidden:,} of {len(self.full):,} characters are not "
                f"shown. Read the whole {self.noun} before approving.")

    def outcome_line(self) -> str:
        """One sentence: who decided, when and why (empty while pending); the words
        come from ``keyturn.wording`` like every other surface's."""
        if self.pending:
            return ""
        if self.status == EXPIRED:
            return f"Expired at {self.decided_at}: no decision before the timeout."
        if self.status == CANCELLED:
            return f"Cancelled at {self.decided_at}" + (f": {self.comment}" if self.comment
                                                        else ".")
        if self.status == ABANDONED:
            if self.decided_by:  # approved first, and never claimed
                return (f"Approved by {self.decided_by} at {self.decided_at}, but "
                        f"{SESSION_ENDED}.")
            return f"Abandoned: {SESSION_ENDED}. No decision is needed any more."
        line = f"{_cap(wording.decision(self))} at {self.decided_at}"
        line += f": “{self.comment}”." if self.comment else "."
        ran = wording.execution(self)
        return line + (f" {_cap(ran)}." if ran else "")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def ticket_view(detail: dict[str, Any], *, portal_url: str, limit: int,
                now: float | None = None) -> TicketView:
    """Build the view from ``Approvals.detail`` output."""
    now = time.time() if now is None else now
    text, truncated = statement_excerpt(detail, limit)
    full = full_text(detail)
    votes = tuple(detail.get("votes") or ())
    return TicketView(
        id=detail["id"], status=detail["status"], requester=detail["requester"],
        connection=detail["connection"], statement=text, truncated=truncated,
        full=full, hidden=max(len(full) - len(text.rstrip("…")), 0) if truncated else 0,
        classification=detail["classification"], rule=detail["rule"],
        reason=detail["reason"], facts=tuple(
            (str(label), str(value)) for label, value in detail.get("facts") or ()
            if label != "Class"),
        time_left=fmt_left(detail["expires_at"] - now), expires_at=detail["expires_at"],
        approvals=sum(1 for v in votes if v["vote"] == "approve"),
        required=detail["min_approvals"],
        approver_groups=tuple(detail.get("approver_groups") or ()), votes=votes,
        decided_by=detail.get("decided_by"),
        decided_at=fmt_time(detail.get("decided_at")), comment=detail.get("decision_comment"),
        result_rows=detail.get("result_rows"), result_error=detail.get("result_error"),
        portal_url=f"{portal_url.rstrip('/')}/tickets/{detail['id']}",
        noun=NOUNS.get(str(detail.get("language") or ""), "request"),
    )


def requester_note(what: str, view: TicketView) -> str:
    """The text of a requester's direct message for one status change."""
    head = f"Your request #{view.id} on {view.connection}"
    if what == "created":
        return (f"{head} is waiting for approval ({view.required} needed; rule {view.rule}). "
                f"Follow it here: {view.portal_url}")
    if what == APPROVED:
        said = f": “{view.comment}”" if view.comment else ""
        return f"{head} was {wording.decision(view)}{said}."
    if what == REJECTED:
        return f"{head} was {wording.decision(view)}: “{view.comment}”"
    if what == EXPIRED:
        return f"{head} expired: no decision before the timeout."
    if what == CANCELLED:
        return f"{head} was cancelled."
    if what == ABANDONED:
        return (f"{head} was abandoned: your session ended before it could run, so nothing "
                f"ran. Run the {view.noun} again to ask anew.")
    if what in (EXECUTED, FAILED):
        return f"{head} was {wording.outcome(view)}."
    return f"{head} is now {view.status}."


def escalation_text(view: TicketView, groups: Any) -> str:
    who = ", ".join(str(g) for g in groups) or "more approvers"
    return (f"Escalated: ticket #{view.id} ({view.classification} on {view.connection} by "
            f"{view.requester}) is still pending with {view.approvals} of {view.required} "
            f"approvals; {who} may decide it now. It expires in {view.time_left}.")
