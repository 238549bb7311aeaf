"""How a ticket's facts read to people: its outcome, and its timeline as sentences.

One place for the words, so the same fact reads the same on every surface that uses
it: "approved by dana", "bob rejected: “use the admin tool”", "executed: 63 rows",
"notified in Slack #approvals". Internal names (``vote:approve``, ``decided``, a
chat channel's id) never reach a person.

It must not format for a medium (no HTML, no Block Kit): it returns plain text and the
quoted part separately, and each surface marks them up its own way.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Protocol

from keyturn import approvals as states

_HIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def reveal(text: str) -> str:
    """A statement or command as approvers may see it: control characters other than
    newline and tab, and Unicode format characters (bidirectional overrides and
    isolates, zero-width characters: a page or a chat message could show the text in
    another order than the one that runs) written as ``⟨U+202E⟩``."""
    if text.isascii():
        return _HIDDEN.sub(lambda m: f"⟨U+{ord(m.group()):04X}⟩", text)
    return "".join(f"⟨U+{ord(c):04X}⟩" if (c not in "\n\t" and (
        unicodedata.category(c) in ("Cc", "Cf"))) else c for c in text)


class Decided(Protocol):
    """What the outcome phrases read of a ticket (a stored ticket or a chat view)."""

    @property
    def status(self) -> str: ...
    @property
    def decided_by(self) -> str | None: ...
    @property
    def result_rows(self) -> int | None: ...
    @property
    def result_error(self) -> str | None: ...

PLATFORMS = {"slack": "Slack", "teams": "Teams"}
#: Where a vote was cast (``Vote.via``), as the end of "… in Slack".
SURFACES = {**PLATFORMS, "portal": "the portal", "api": "the API", "cli": "the CLI"}
#: What a Slack channel or Teams conversation id looks like (not a name a person knows).
_CHAT_ID = re.compile(r"^(?:[CGD][A-Z0-9]{6,}|\d+:.+@thread\..+|a:.+|19:.+)$")


@dataclass(frozen=True)
class Sentence:
    """``text`` then, when there is one, ``quote`` (a person's own words, shown quoted);
    ``note`` is secondary detail (which surface a vote came from)."""

    text: str
    quote: str | None = None
    note: str | None = None

    def plain(self) -> str:
        out = self.text + (f": “{self.quote}”" if self.quote else "")
        return out + (f" ({self.note})" if self.note else "")


def via(surface: str | None) -> str | None:
    return f"in {SURFACES.get(surface, surface)}" if surface else None


def chat_place(detail: dict[str, Any] | None) -> str:
    """Where a "notified" event went, as people know it: ``Slack #approvals``,
    ``Teams ops-approvals``. A bare channel or conversation id is not a name, so
    without a ``channel_name`` it reads just ``Slack`` / ``Teams``."""
    detail = detail or {}
    platform = str(detail.get("platform") or "chat")
    name = PLATFORMS.get(platform, platform)
    channel = str(detail.get("channel_name") or detail.get("channel") or "").strip()
    if not channel or _CHAT_ID.match(channel):
        return name
    if platform == "slack" and not channel.startswith("#"):
        channel = f"#{channel}"
    return f"{name} {channel}"


def rows(n: Any) -> str:
    if n is None:
        return "rows unknown"
    return f"{n} row" if n == 1 else f"{n} rows"


def event_sentence(kind: str, actor: str | None, detail: dict[str, Any] | None
                   ) -> Sentence:
    """One timeline entry as a sentence."""
    d = detail or {}
    comment = d.get("comment") or None
    if kind == "created":
        rule = d.get("rule")
        return Sentence(f"{actor or 'someone'}'s request held for approval"
                        + (f" by rule {rule}" if rule else ""))
    if kind.startswith("vote:"):
        verb = {"approve": "approved", "reject": "rejected"}.get(kind[5:], kind[5:])
        return Sentence(f"{actor} {verb}", comment, via(d.get("via")))
    if kind == "decided":
        status = d.get("status")
        if status == states.APPROVED:
            return Sentence("approved: enough approvals to run it")
        if status == states.REJECTED:
            return Sentence("rejected: it will not run")
        return Sentence(f"decided: {status}" if status else "decided")
    if kind == "notified":
        return Sentence(f"notified in {chat_place(d)}")
    if kind == "reminded":
        left = f" (expires in about {d['left']})" if d.get("left") else ""
        return Sentence(f"reminder sent in {chat_place(d)}{left}")
    if kind == "escalated":
        groups = ", ".join(d.get("to") or ()) or "more approvers"
        return Sentence(f"escalated to {groups}: still pending")
    if kind == states.EXECUTED:
        return Sentence(f"executed: {rows(d.get('rows'))}")
    if kind == states.FAILED:
        return Sentence("failed", d.get("error"))
    if kind == states.EXPIRED:
        return Sentence("expired: no decision before the timeout")
    if kind == states.CANCELLED:
        who = f" by {actor}" if actor else ""
        return Sentence(f"cancelled{who}", comment)
    if kind == states.ABANDONED:
        return Sentence("abandoned: the requester's session ended, nothing ran")
    return Sentence(kind.replace("_", " ").replace(":", " "), comment)


def decision(t: Decided) -> str:
    """Who decided what, in one phrase: "waiting for approval", "approved by dana",
    "rejected by bob", "expired: no decision before the timeout"."""
    by = f" by {t.decided_by}" if t.decided_by else ""
    if t.status == states.PENDING:
        return "waiting for approval"
    if t.status in (states.APPROVED, states.EXECUTED, states.FAILED):
        return f"approved{by}"
    if t.status == states.REJECTED:
        return f"rejected{by}"
    if t.status == states.EXPIRED:
        return "expired: no decision before the timeout"
    if t.status == states.ABANDONED:
        return "abandoned: the requester's session ended, nothing ran"
    if t.status == states.CANCELLED:
        return f"cancelled{by}"
    return t.status


def execution(t: Decided) -> str | None:
    """What running it gave, once it ran: "executed: 63 rows", "failed: <error>"."""
    if t.status == states.EXECUTED:
        return f"executed: {rows(t.result_rows)}"
    if t.status == states.FAILED:
        return f"failed: {t.result_error}" if t.result_error else "failed"
    return None


def outcome(t: Decided) -> str:
    """The ticket's state in one phrase: the decision, then what running it gave
    ("approved by dana, then executed: 63 rows")."""
    ran = execution(t)
    return f"{decision(t)}, then {ran}" if ran else decision(t)
