"""What every chat listener needs: services, identity links, settings, and the
one way a chat click becomes a vote.

Refusals (unmapped person, wrong group, own ticket, already decided) are
returned as a message for the clicker alone and audited; the ticket is not
touched. Separation of duties is enforced by ``keyturn.approvals``, exactly
as for the portal.

It must not change a ticket except through ``keyturn.approvals``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from bots.links import Links
from bots.settings import ChatSettings
from keyturn.approvals import APPROVED, EXECUTED, FAILED
from keyturn.errors import AlreadyDecided, KeyturnError
from keyturn.services import Services
from portal.settings import PORTAL

log = logging.getLogger(__name__)

# The timeline event the bots themselves write (see BotContext.notified).
NOTIFIED = "notified"
REMINDED = "reminded"

UNMAPPED = ("Keyturn does not know who you are. Ask an operator to link your account "
            "(`keyturn bots link`) or use the e-mail address Keyturn knows you by.")


@dataclass(frozen=True)
class VoteOutcome:
    ok: bool
    message: str
    decided: bool = False
    status: str | None = None


@dataclass
class BotContext:
    services: Services
    links: Links
    chat: ChatSettings

    @property
    def portal_url(self) -> str:
        return PORTAL.of(self.services.config).public_url

    def policy_of(self, connection: str) -> str | None:
        conn = self.services.config.connections.get(connection)
        return conn.policy if conn else None

    def audit_refusal(self, *, platform: str, user: str | None, platform_user: str,
                      ticket_id: int | None, reason: str, action: str) -> None:
        try:
            self.services.record_audit(
                kind="chat", user=user, ticket_id=ticket_id, action=action, outcome="refused",
                reason=reason, detail={"platform": platform, "platform_user": platform_user})
        except Exception:
            log.exception("could not audit a refused chat action")

    def vote(self, *, platform: str, platform_user: str, user: str | None, ticket_id: int,
             vote: str, comment: str | None) -> VoteOutcome:
        """Synchronous: run it in a thread from async code."""
        if user is None:
            self.audit_refusal(platform=platform, user=None, platform_user=platform_user,
                               ticket_id=ticket_id, reason="unmapped chat user", action=vote)
            return VoteOutcome(False, UNMAPPED)
        try:
            ident = self.services.identities.identity_of(user)
            res = self.services.approvals.vote(ticket_id, ident, vote, comment, via=platform)
        except AlreadyDecided as exc:
            message = self.decided_first(ticket_id) or exc.message
            self.audit_refusal(platform=platform, user=user, platform_user=platform_user,
                               ticket_id=ticket_id, reason=message, action=vote)
            return VoteOutcome(False, message)
        except KeyturnError as exc:
            self.audit_refusal(platform=platform, user=user, platform_user=platform_user,
                               ticket_id=ticket_id, reason=exc.message, action=vote)
            return VoteOutcome(False, exc.message)
        t = res.ticket
        if res.decided:
            verb = "approved" if vote == "approve" else "rejected"
            return VoteOutcome(True, f"You {verb} ticket #{t.id}.", True, t.status)
        return VoteOutcome(True, f"Your approval of ticket #{t.id} is recorded "
                                 f"({res.approvals} of {res.required}).", False, t.status)

    def decided_first(self, ticket_id: int) -> str | None:
        """Who decided before this click, in the words of the decision (a ticket that
        has since run was still *approved* by its approvers)."""
        try:
            t = self.services.approvals.get(ticket_id)
        except KeyturnError:
            return None
        state = APPROVED if t.status in (APPROVED, EXECUTED, FAILED) else t.status
        who = f" by {t.decided_by}" if t.decided_by else ""
        why = f": {t.decision_comment}" if t.decision_comment and state != APPROVED else ""
        return f"ticket {t.id} was already {state}{who}{why}"

    def precheck(self, *, platform: str, platform_user: str, user: str | None,
                 ticket_id: int, action: str = "reject") -> str | None:
        """Why this person cannot decide this ticket now, or None. Used before
        opening a form (a rejection reason, the whole statement to approve); the vote
        itself checks again."""
        reason = None
        if user is None:
            reason, message = "unmapped chat user", UNMAPPED
        else:
            try:
                t = self.services.approvals.get(ticket_id)
                ident = self.services.identities.identity_of(user)
            except KeyturnError as exc:
                reason = message = exc.message
            else:
                if t.status != "pending":
                    reason = message = self.decided_first(ticket_id) or "already decided"
                elif t.requester == user:
                    reason = message = (f"{user} requested ticket {t.id} and cannot decide it "
                                        "(separation of duties)")
                elif not self.services.approvals.can_decide(ident, t):
                    reason = message = (f"{user} is not in an approver group of ticket {t.id} "
                                        f"({', '.join(t.approver_groups)})")
        if reason is None:
            return None
        self.audit_refusal(platform=platform, user=user, platform_user=platform_user,
                           ticket_id=ticket_id, reason=reason, action=action)
        return message

    async def precheck_async(self, **kw: Any) -> str | None:
        return await asyncio.to_thread(lambda: self.precheck(**kw))

    async def avote(self, **kw: Any) -> VoteOutcome:
        return await asyncio.to_thread(lambda: self.vote(**kw))

    def notified(self, ticket_id: int, platform: str, channel: str,
                 **extra: Any) -> None:
        """Put "notified" on the ticket's timeline once the ticket message reached a
        chat channel. Once per platform: a retried post (message already out, note
        not yet written) records it then. The outbox never plans deliveries for
        this event kind (``bots.outbox.OWN_EVENTS``)."""
        events = self.services.approvals.detail(ticket_id).get("events", [])
        if any(e["kind"] == NOTIFIED and (e["detail"] or {}).get("platform") == platform
               for e in events):
            return
        self.services.approvals.note(ticket_id, NOTIFIED, None,
                                     {"platform": platform, "channel": channel, **extra})

    def reminded(self, ticket_id: int, platform: str, channel: str, **extra: Any) -> None:
        """Put "reminded" on the ticket's timeline once a reminder went out."""
        self.services.approvals.note(ticket_id, REMINDED, None,
                                     {"platform": platform, "channel": channel, **extra})
