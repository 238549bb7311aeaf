"""The hold service: one request held in flight until a person decides.

Every gateway holds the same way. ``HoldService.hold()`` runs the whole workflow for one
request the policy sent to review: a time-boxed grant that already covers it (the seam
is here; ``Grants``), an approval of the identical request made earlier in ``defer``
mode, the ticket, its ``held`` audit record, the wait (any process may decide: the
decision bus wakes it), expiry, cancellation, and the single-use claim of an approval.
A requester who already has gateway.max_pending_per_user tickets pending gets no new
one: the request is refused at once (``REFUSED``, with a ``held`` audit record whose
outcome is ``refused``), nothing is held.
It returns an ``Outcome``; the protocol renders it natively (PostgreSQL: a NOTICE and
the result, or an ERROR with a SQLSTATE; an SSH exit status and stderr; an HTTP status).

The wording of what the client is told is here too, so every protocol says the same
thing the same way; the protocol names what was held (``noun``: "statement",
"command", "request").

This module must not import protocol or web code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from keyturn import wording
from keyturn.approvals import APPROVED, CANCELLED, EXPIRED, REJECTED, Approvals, TicketRequest
from keyturn.bus import DecisionWatcher
from keyturn.errors import AlreadyDecided, InvalidTransition, TooManyPending
from keyturn.models import Ticket

#: Outcome statuses besides a ticket's own (approved, rejected, expired, cancelled,
#: abandoned...): ``claimed`` (an earlier approval of the identical request in defer mode
#: was used), ``deferred`` (a ticket was made; the client must send the request again
#: once it is approved), ``granted`` (a grant covers it: no ticket), ``gone`` (the
#: client went away while it waited), ``refused`` (no ticket was opened: the requester
#: has too many pending already; the message says how many and the limit).
CLAIMED, DEFERRED, GRANTED, GONE, REFUSED = "claimed", "deferred", "granted", "gone", "refused"

#: Slack beyond the review timeout before the holder expires the ticket itself (the
#: decision watcher normally expires it on time, in any process).
EXPIRY_GRACE = 30.0


class Grants(Protocol):
    """Time-boxed access consulted before a ticket is made (none are configured yet):
    a description of the grant that covers the request, or None."""

    def covering(self, request: TicketRequest, binding: str) -> str | None: ...


class NoGrants:
    def covering(self, request: TicketRequest, binding: str) -> str | None:
        return None


@dataclass(frozen=True)
class Held:
    """The ticket exists and the wait begins: what the client is told now."""

    ticket_id: int
    url: str
    rule: str
    reason: str
    timeout: float
    mode: str

    @property
    def message(self) -> str:
        return (f"held for approval — ticket {self.ticket_id} (rule {self.rule}: "
                f"{self.reason}). Approve at {self.url}. Waiting up to "
                f"{human_duration(self.timeout)}.")


@dataclass(frozen=True)
class Outcome:
    """How a hold ended. ``run``: send the request to the target now. ``message``: one
    line for the client (without the gateway's name; the protocol adds its prefix)."""

    status: str
    run: bool
    message: str
    ticket_id: int | None = None
    decided_by: str | None = None
    comment: str | None = None


class HoldService:
    def __init__(self, approvals: Approvals, watcher: DecisionWatcher,
                 audit: Callable[..., None], *, public_url: str,
                 grants: Grants | None = None):
        self.approvals = approvals
        self.watcher = watcher
        self.audit = audit
        self.public_url = public_url.rstrip("/")
        self.grants: Grants = grants or NoGrants()

    def ticket_url(self, ticket_id: int) -> str:
        return f"{self.public_url}/tickets/{ticket_id}"

    async def hold(self, req: TicketRequest, *, binding: str, noun: str = "request",
                   on_held: Callable[[Held], None],
                   on_wait: Callable[[int | None], None] | None = None,
                   is_gone: Callable[[], bool] = lambda: False,
                   enrich: Callable[[TicketRequest], Awaitable[TicketRequest]] | None = None
                   ) -> Outcome:
        """Hold ``req`` (the policy's review settings are in it) until it is decided.

        ``binding``: what an approval is bound to (approvals.binding_of). ``on_held``:
        called once the ticket exists (and, in hold mode, the wait begins); ``on_wait``:
        called with the ticket id while the client waits and with None after (a cancel
        from the client finishes that ticket: ``cancel``). ``enrich``: the request with
        what costs work to find out (SQL: the EXPLAIN estimate and the facts built from
        it), asked only when a ticket is made."""
        approvals = self.approvals
        grant = self.grants.covering(req, binding)
        if grant is not None:
            return Outcome(GRANTED, True, f"allowed by {grant}")
        if req.mode == "defer":
            claimed = await asyncio.to_thread(approvals.claim_deferred, binding)
            if claimed is not None:
                return Outcome(CLAIMED, True, f"running ticket {claimed.id}, approved by "
                                              f"{claimed.decided_by}",
                               claimed.id, claimed.decided_by, claimed.decision_comment)
        try:
            # Before the work of enriching (an EXPLAIN on the target): a flood stays cheap.
            # create() counts again, in the transaction that adds the ticket.
            if approvals.max_pending > 0:
                await asyncio.to_thread(approvals.check_pending, req.requester)
            if enrich is not None:
                req = await enrich(req)
            ticket = await asyncio.to_thread(approvals.create, req)
        except TooManyPending as exc:
            return self.too_many(req, exc)
        url = self.ticket_url(ticket.id)
        self.audit(kind="held", user=req.requester, connection=req.connection,
                   session_id=req.session_id, client_addr=req.client_addr,
                   statement=req.statement, classification=req.classification,
                   action="review", rule=req.rule or None, reason=req.reason,
                   ticket_id=ticket.id, outcome="pending",
                   detail={"mode": req.mode, **req.detail})
        held = Held(ticket.id, url, req.rule, req.reason, req.timeout, req.mode)
        on_held(held)
        if req.mode == "defer":
            return Outcome(DEFERRED, False,
                           f"deferred for approval — ticket {ticket.id} (rule {req.rule}: "
                           f"{req.reason}). Run the identical {noun} again once it is "
                           f"approved: {url}", ticket.id)
        if on_wait is not None:
            on_wait(ticket.id)
        fut = self.watcher.wait(ticket.id)
        try:
            status = await asyncio.wait_for(fut, timeout=req.timeout + EXPIRY_GRACE)
        except TimeoutError:
            status = await asyncio.to_thread(self.expire, ticket.id)
        finally:
            self.watcher.forget(ticket.id, fut)
            if on_wait is not None:
                on_wait(None)
        if is_gone():
            return Outcome(GONE, False, f"ticket {ticket.id}: the client went away", ticket.id)
        t = await asyncio.to_thread(approvals.get, ticket.id)
        if status == APPROVED:
            if await asyncio.to_thread(approvals.claim, ticket.id, binding):
                said = f": “{t.decision_comment}”" if t.decision_comment else ""
                return Outcome(APPROVED, True, f"ticket {ticket.id} {wording.decision(t)}{said}",
                               ticket.id, t.decided_by, t.decision_comment)
            # Someone else (a replayed request, a second holder) used the approval first.
            status, t = CANCELLED, await asyncio.to_thread(approvals.get, ticket.id)
        return self.refusal(t, status, noun, req.timeout)

    def too_many(self, req: TicketRequest, exc: TooManyPending) -> Outcome:
        """The outcome of a request refused because its requester has too many tickets
        pending: audited here (no ticket, nothing held), rendered by the protocol."""
        self.audit(kind="held", user=req.requester, connection=req.connection,
                   session_id=req.session_id, client_addr=req.client_addr,
                   statement=req.statement, classification=req.classification,
                   action="review", rule=req.rule or None, reason=exc.message,
                   outcome=REFUSED,
                   detail={**req.detail, "mode": req.mode, "pending": exc.pending,
                           "limit": exc.limit})
        return Outcome(REFUSED, False, exc.message)

    def refusal(self, t: Ticket, status: str, noun: str, timeout: float) -> Outcome:
        """The outcome of a ticket that ended without running its request."""
        if status == REJECTED:
            text = f"ticket {t.id} {wording.decision(t)}: “{t.decision_comment}”"
        elif status == EXPIRED:
            text = (f"ticket {t.id} expired after {human_duration(timeout)} "
                    f"without a decision; the {noun} was not run")
        elif status == CANCELLED:
            text = f"ticket {t.id} cancelled" + \
                   (f": {t.decision_comment}" if t.decision_comment else "") + \
                   f"; the {noun} was not run"
        else:
            text = f"ticket {t.id} is {status}; the {noun} was not run"
        return Outcome(status, False, text, t.id, t.decided_by, t.decision_comment)

    def expire(self, ticket_id: int) -> str:
        """Expire a ticket whose wait ran out (blocking): its status after."""
        try:
            return self.approvals.finish(ticket_id, "expire",
                                         comment="no decision before the timeout").status
        except (AlreadyDecided, InvalidTransition):
            return self.approvals.get(ticket_id).status

    def cancel(self, ticket_id: int, actor: str, reason: str) -> None:
        """The client gave up on a held request (blocking)."""
        try:
            self.approvals.finish(ticket_id, "cancel", actor=actor, comment=reason)
        except (AlreadyDecided, InvalidTransition):
            pass


def human_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{int(seconds)}s"


__all__ = ["CLAIMED", "DEFERRED", "GONE", "GRANTED", "REFUSED", "Grants", "Held",
           "HoldService", "NoGrants", "Outcome", "human_duration"]
