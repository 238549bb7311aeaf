"""Approval tickets: the state machine, votes and separation of duties.

Everything that affects a ticket's state lives here. States and the events
that move between them are a table (``TRANSITIONS``); every change is a
conditional UPDATE (``WHERE status = <from>``) inside a transaction that
first locks the ticket row, so when two surfaces decide at the same instant
exactly one wins and the other gets ``AlreadyDecided`` naming the outcome.

Rules enforced here and nowhere else:

* a requester can never vote on their own ticket, whatever their groups;
* only members of the ticket's approver groups may vote; each counts once;
* N-of-M: the ticket is approved when ``min_approvals`` distinct approvers
  approved; one rejection rejects it;
* an approval binds to the statement text, bind parameters, connection and
  requester (``binding``) and is claimed to run exactly once;
* a requester has at most ``max_pending`` tickets pending at once, counted in the
  store (so across every gateway process) in the transaction that adds one
  (``TooManyPending``; gateway.max_pending_per_user).

This module must not know about sockets or protocols. Decisions are
announced through ``on_change`` (the bus), called after commit; every timeline
event (votes and notes too) is told to ``observers`` after commit (the live
change feed, keyturn.feed) and, with PostgreSQL, NOTIFYed on
``keyturn_ticket_events`` when no status change announces it already.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exists, func, select, text, update
from sqlalchemy.exc import IntegrityError

from keyturn.errors import (
    AlreadyDecided,
    AlreadyVoted,
    InvalidTransition,
    NotAnApprover,
    NotFound,
    SelfApproval,
    TooManyPending,
)
from keyturn.identity import Identity
from keyturn.models import GatewayInstance, Ticket, TicketEvent, Vote
from keyturn.store import Store

log = logging.getLogger(__name__)

PENDING, APPROVED, REJECTED, EXPIRED, CANCELLED, EXECUTED, FAILED, ABANDONED = (
    "pending", "approved", "rejected", "expired", "cancelled", "executed", "failed",
    "abandoned")

# state -> {event: next state}
TRANSITIONS: dict[str, dict[str, str]] = {
    PENDING: {"approve": APPROVED, "reject": REJECTED, "expire": EXPIRED, "cancel": CANCELLED,
              "abandon": ABANDONED},
    # "abandon" only while unclaimed: a claimed ticket's statement may be running.
    APPROVED: {"execute": EXECUTED, "fail": FAILED, "cancel": CANCELLED, "expire": EXPIRED,
               "abandon": ABANDONED},
    REJECTED: {},
    EXPIRED: {},
    CANCELLED: {},
    EXECUTED: {},
    FAILED: {},
    # The gateway process holding the requester's session died (keyturn.liveness).
    ABANDONED: {},
}
DECIDED = {APPROVED, REJECTED, EXPIRED, CANCELLED, EXECUTED, FAILED, ABANDONED}
# Event kinds only transitions write; ``Approvals.note`` refuses them.
NOTE_KINDS_RESERVED = {"created", "decided", "escalated", *DECIDED}

# How long an approved defer-mode ticket may wait for its re-run.
DEFER_WINDOW = 3600.0

# A gateway instance whose heartbeat is this many of its own intervals old is dead, and
# the tickets it held are abandoned (keyturn.liveness beats and sweeps).
DEAD_AFTER_BEATS = 3
ABANDONED_COMMENT = "the requester's session ended (the gateway holding it stopped)"
OUTCOME_UNKNOWN = ("outcome unknown: the gateway running the statement stopped before it "
                   "reported the result; see the audit trail")


def binding_of(requester: str, connection: str, statement: str, params: Any) -> str:
    """What an approval is bound to: change any part and it no longer applies."""
    blob = json.dumps([requester, connection, statement, params], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class TicketRequest:
    requester: str
    requester_groups: tuple[str, ...]
    connection: str
    statement: str
    classification: str
    rule: str
    reason: str
    approver_groups: tuple[str, ...]
    min_approvals: int
    timeout: float
    mode: str = "hold"
    params: list[Any] | None = None
    tables: tuple[str, ...] = ()
    # Still pending this many seconds after creation: ``escalate_to`` may decide it too.
    escalate_after: float | None = None
    escalate_to: tuple[str, ...] = ()
    client_addr: str = ""
    application: str = ""
    session_id: str = ""
    protocol: str = "postgres"
    gateway_id: str = ""
    # How surfaces show the action (see models.Ticket.language / facts).
    language: str = "text"
    facts: tuple[tuple[str, str], ...] = ()
    # Values only the protocol knows, kept with the ticket (models.Ticket.detail).
    detail: dict[str, Any] = field(default_factory=dict)
    # The binding of what runs when ``statement``/``params`` are shown redacted (masking);
    # None: computed from them.
    binding: str | None = None


@dataclass
class VoteResult:
    ticket: Ticket
    decided: bool
    approvals: int
    required: int
    votes: list[dict[str, Any]] = field(default_factory=list)


def ticket_json(t: Ticket, votes: list[Vote] | None = None,
                events: list[TicketEvent] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        c: getattr(t, c) for c in (
            "id", "status", "requester", "requester_groups", "connection", "protocol",
            "client_addr", "application", "session_id", "statement", "language", "facts",
            "params", "classification",
            "tables", "rule", "reason", "detail", "approver_groups", "escalate_at",
            "escalate_to",
            "min_approvals", "mode", "created_at", "expires_at", "decided_at", "decided_by",
            "decision_comment", "executed_at", "result_rows", "result_error")
    }
    if votes is not None:
        out["votes"] = [{"approver": v.approver, "vote": v.vote, "comment": v.comment,
                         "via": v.via, "at": v.at} for v in votes]
        out["approvals"] = sum(1 for v in votes if v.vote == "approve")
    if events is not None:
        out["events"] = [{"at": e.at, "kind": e.kind, "actor": e.actor, "detail": e.detail}
                         for e in events]
    return out


class Approvals:
    def __init__(self, store: Store, *, on_change: Callable[[int, str], None] | None = None,
                 audit: Callable[..., None] | None = None):
        self.store = store
        self.on_change = on_change or (lambda _id, _status: None)
        self.audit = audit or (lambda **_: None)
        # Told (ticket id, event kind) after commit of every timeline event: live surfaces.
        self.observers: list[Callable[[int, str], None]] = []
        # This process's gateway instance (keyturn.liveness), stamped on the tickets it
        # creates: when the instance dies, they are abandoned. None: not a gateway.
        self.instance_id: str | None = None
        # Pending tickets one requester may have at once (gateway.max_pending_per_user,
        # set by build_services); 0: no limit.
        self.max_pending = 0

    # ---- reading

    def get(self, ticket_id: int) -> Ticket:
        with self.store.session() as s:
            t = s.get(Ticket, ticket_id)
            if t is None:
                raise NotFound(f"no ticket {ticket_id}")
            return t

    def detail(self, ticket_id: int) -> dict[str, Any]:
        with self.store.session() as s:
            t = s.get(Ticket, ticket_id)
            if t is None:
                raise NotFound(f"no ticket {ticket_id}")
            votes = list(s.scalars(select(Vote).where(Vote.ticket_id == t.id).order_by(Vote.id)))
            events = list(s.scalars(select(TicketEvent).where(TicketEvent.ticket_id == t.id)
                                    .order_by(TicketEvent.id)))
            return ticket_json(t, votes, events)

    def find(self, *, status: str | None = None, requester: str | None = None,
             limit: int = 100) -> list[Ticket]:
        with self.store.session() as s:
            q = select(Ticket).order_by(Ticket.id.desc()).limit(limit)
            if status:
                q = q.where(Ticket.status == status)
            if requester:
                q = q.where(Ticket.requester == requester)
            return list(s.scalars(q))

    def statuses(self, ids: list[int]) -> dict[int, str]:
        if not ids:
            return {}
        with self.store.session() as s:
            rows = s.execute(select(Ticket.id, Ticket.status).where(Ticket.id.in_(ids)))
            return {i: st for i, st in rows}

    def pending_of(self, requester: str, *, now: float | None = None,
                   session: Any = None) -> int:
        """How many tickets of ``requester`` wait for a decision now (one past its expiry
        that the sweeper has not reached yet no longer does)."""
        now = time.time() if now is None else now
        q = select(func.count()).select_from(Ticket).where(
            Ticket.requester == requester, Ticket.status == PENDING, Ticket.expires_at > now)
        if session is not None:
            return session.scalar(q) or 0
        with self.store.session() as s:
            return s.scalar(q) or 0

    def check_pending(self, requester: str, *, now: float | None = None,
                      session: Any = None) -> None:
        """Raise ``TooManyPending`` when ``requester`` may not have one more ticket
        pending (``max_pending``; 0: never)."""
        limit = self.max_pending
        if limit > 0:
            pending = self.pending_of(requester, now=now, session=session)
            if pending >= limit:
                raise TooManyPending(requester, pending, limit)

    def can_decide(self, ident: Identity, t: Ticket) -> bool:
        return ident.user != t.requester and bool(set(ident.groups) & set(t.approver_groups))

    # ---- writing

    def create(self, req: TicketRequest, *, now: float | None = None) -> Ticket:
        now = time.time() if now is None else now
        # Bound to the request exactly as sent; stored and shown with any lone
        # surrogate (undecodable client bytes) escaped, which no store encodes.
        binding = req.binding or binding_of(req.requester, req.connection, req.statement,
                                            req.params)
        req = _storable(req)
        t = Ticket(
            status=PENDING, requester=req.requester, requester_groups=list(req.requester_groups),
            connection=req.connection, protocol=req.protocol, client_addr=req.client_addr,
            application=req.application, session_id=req.session_id, statement=req.statement,
            language=req.language, facts=[[label, value] for label, value in req.facts],
            params=req.params, binding=binding, classification=req.classification,
            tables=list(req.tables), rule=req.rule, reason=req.reason, detail=dict(req.detail),
            approver_groups=list(req.approver_groups), min_approvals=req.min_approvals,
            escalate_at=now + req.escalate_after if req.escalate_to and req.escalate_after
            else None, escalate_to=list(req.escalate_to) or None,
            mode=req.mode, gateway_id=req.gateway_id, instance_id=self.instance_id,
            created_at=now,
            expires_at=now + req.timeout,
        )
        with self.store.write() as s:
            if self.max_pending > 0:
                # Counted and added in one transaction: with SQLite the write lock is
                # taken at BEGIN; with PostgreSQL two creates for one requester take
                # turns on an advisory lock of its name (no row to lock).
                if not self.store.is_sqlite:
                    s.execute(text("SELECT pg_catalog.pg_advisory_xact_lock(:ns, :key)"),
                              {"ns": _PENDING_LOCK, "key": _lock_key(req.requester)})
                self.check_pending(req.requester, now=now, session=s)
            s.add(t)
            s.flush()
            s.add(TicketEvent(ticket_id=t.id, at=now, kind="created", actor=req.requester,
                              detail={"rule": req.rule, "mode": req.mode}))
            self._announce(s, t.id, PENDING)
        self.on_change(t.id, PENDING)
        self._observed(t.id, "created")
        return t

    def _lock(self, s: Any, ticket_id: int) -> Ticket:
        t = s.scalars(select(Ticket).where(Ticket.id == ticket_id).with_for_update()).first()
        if t is None:
            raise NotFound(f"no ticket {ticket_id}")
        return t

    def _observed(self, ticket_id: int, kind: str) -> None:
        for observer in self.observers:
            try:
                observer(ticket_id, kind)
            except Exception:  # a display must never undo or fail a committed change
                log.exception("ticket observer %r failed", observer)

    def _announce_event(self, s: Any, ticket_id: int, kind: str) -> None:
        # Votes and notes change no status, so the decision bus's channel stays quiet.
        if not self.store.is_sqlite:
            s.execute(text("SELECT pg_notify('keyturn_ticket_events', :p)"),
                      {"p": f"{ticket_id}:{kind}"})

    def _announce(self, s: Any, ticket_id: int, status: str) -> None:
        # With PostgreSQL the notification is delivered at commit, atomically with the change.
        if not self.store.is_sqlite:
            s.execute(text("SELECT pg_notify('keyturn_tickets', :p)"),
                      {"p": f"{ticket_id}:{status}"})

    def _move(self, s: Any, t: Ticket, event: str, now: float, **values: Any) -> str:
        nxt = TRANSITIONS[t.status].get(event)
        if nxt is None or (event == "abandon" and t.claimed_at is not None):
            raise InvalidTransition(f"ticket {t.id} is {t.status}"
                                    f"{' and claimed' if nxt else ''}; cannot {event}",
                                    ticket=t.id, status=t.status)
        where = [Ticket.id == t.id, Ticket.status == t.status]
        if event == "abandon":  # never under a claim made since we read the row
            where.append(Ticket.claimed_at.is_(None))
        res = s.execute(update(Ticket).where(*where).values(status=nxt, **values))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            raise AlreadyDecided(f"ticket {t.id} changed concurrently", ticket=t.id)
        return nxt

    def _already(self, t: Ticket) -> AlreadyDecided:
        if t.status == ABANDONED:  # whoever approved it, nobody abandoned it
            return AlreadyDecided(f"ticket {t.id} was abandoned: {ABANDONED_COMMENT}; "
                                  "nothing ran", ticket=t.id, status=t.status,
                                  decided_by=None)
        who = f" by {t.decided_by}" if t.decided_by else ""
        why = f": {t.decision_comment}" if t.decision_comment else ""
        return AlreadyDecided(f"ticket {t.id} was already {t.status}{who}{why}", ticket=t.id,
                              status=t.status, decided_by=t.decided_by)

    def vote(self, ticket_id: int, ident: Identity, vote: str, comment: str | None = None,
             *, via: str = "api", now: float | None = None) -> VoteResult:
        if vote not in ("approve", "reject"):
            raise ValueError("vote must be approve or reject")
        if vote == "reject" and not (comment and comment.strip()):
            raise InvalidTransition("a rejection needs a reason")
        now = time.time() if now is None else now
        expired = False
        with self.store.write() as s:
            t = self._lock(s, ticket_id)
            if t.status != PENDING:
                raise self._already(t)
            if now >= t.expires_at:
                self._move(s, t, "expire", now, decided_at=now, decided_by=None,
                           decision_comment="no decision before the timeout")
                s.add(TicketEvent(ticket_id=t.id, at=now, kind="expired", actor=None, detail={}))
                self._announce(s, t.id, EXPIRED)
                expired = True
            else:
                if ident.user == t.requester:
                    raise SelfApproval(f"{ident.user} requested ticket {t.id} and cannot decide it"
                                       " (separation of duties)", ticket=t.id)
                if not set(ident.groups) & set(t.approver_groups):
                    raise NotAnApprover(
                        f"{ident.user} is not in an approver group of ticket {t.id} "
                        f"({', '.join(t.approver_groups)})", ticket=t.id)
                try:
                    with s.begin_nested():
                        s.add(Vote(ticket_id=t.id, approver=ident.user, vote=vote,
                                   comment=comment, via=via, at=now))
                except IntegrityError:
                    raise AlreadyVoted(f"{ident.user} already voted on ticket {t.id}",
                                       ticket=t.id) from None
                s.add(TicketEvent(ticket_id=t.id, at=now, kind=f"vote:{vote}", actor=ident.user,
                                  detail={"comment": comment, "via": via}))
                self._announce_event(s, t.id, f"vote:{vote}")
                approvals = s.scalar(select(func.count()).select_from(Vote).where(
                    Vote.ticket_id == t.id, Vote.vote == "approve")) or 0
                decided = False
                if vote == "reject":
                    self._move(s, t, "reject", now, decided_at=now, decided_by=ident.user,
                               decision_comment=comment)
                    decided = True
                elif approvals >= t.min_approvals:
                    approvers = list(s.scalars(select(Vote.approver).where(
                        Vote.ticket_id == t.id, Vote.vote == "approve").order_by(Vote.id)))
                    self._move(s, t, "approve", now, decided_at=now,
                               decided_by=", ".join(approvers), decision_comment=comment)
                    decided = True
                if decided:
                    s.add(TicketEvent(ticket_id=t.id, at=now, kind="decided", actor=ident.user,
                                      detail={"status": APPROVED if vote == "approve"
                                              else REJECTED}))
                    self._announce(s, t.id, APPROVED if vote == "approve" else REJECTED)
        t = self.get(ticket_id)
        if expired:
            self.on_change(t.id, t.status)
            self._observed(t.id, EXPIRED)
            self.audit(kind="ticket", user=None, connection=t.connection,
                       protocol=t.protocol, ticket_id=t.id, outcome=EXPIRED,
                       statement=t.statement)
            raise self._already(t)
        self.audit(kind="vote", user=ident.user, connection=t.connection, protocol=t.protocol,
                   ticket_id=t.id, action=vote, outcome=t.status, reason=comment,
                   statement=t.statement, detail={"via": via})
        if decided:
            self.on_change(t.id, t.status)
        self._observed(t.id, f"vote:{vote}")
        return VoteResult(t, decided, approvals, t.min_approvals)

    def finish(self, ticket_id: int, event: str, *, actor: str | None = None,
               comment: str | None = None, rows: int | None = None, error: str | None = None,
               now: float | None = None) -> Ticket:
        """Non-vote transitions: expire, cancel, abandon, execute, fail."""
        now = time.time() if now is None else now
        with self.store.write() as s:
            t = self._lock(s, ticket_id)
            if event not in TRANSITIONS[t.status]:
                if t.status in DECIDED:
                    raise self._already(t)
                raise InvalidTransition(f"ticket {t.id} is {t.status}; cannot {event}")
            values: dict[str, Any] = {}
            if event in ("expire", "cancel", "abandon") and t.status == PENDING:
                values = {"decided_at": now, "decided_by": actor, "decision_comment": comment}
            if event in ("execute", "fail"):
                values = {"executed_at": now, "result_rows": rows, "result_error": error}
            nxt = self._move(s, t, event, now, **values)
            s.add(TicketEvent(ticket_id=t.id, at=now, kind=nxt, actor=actor,
                              detail={k: v for k, v in (("comment", comment), ("rows", rows),
                                                        ("error", error)) if v is not None}))
            self._announce(s, t.id, nxt)
        self.on_change(ticket_id, nxt)
        self._observed(ticket_id, nxt)
        return self.get(ticket_id)

    def note(self, ticket_id: int, kind: str, actor: str | None = None,
             detail: dict[str, Any] | None = None, *, now: float | None = None) -> TicketEvent:
        """Add a timeline event that is not a transition (e.g. "notified": the ticket
        reached a chat channel). The ticket's status is untouched and no hold is
        woken (waiters care about status changes only); live surfaces are told."""
        if kind in NOTE_KINDS_RESERVED or kind.startswith("vote:"):
            raise ValueError(f"{kind!r} is a ticket transition, not a note")
        now = time.time() if now is None else now
        with self.store.write() as s:
            if s.get(Ticket, ticket_id) is None:
                raise NotFound(f"no ticket {ticket_id}")
            ev = TicketEvent(ticket_id=ticket_id, at=now, kind=kind, actor=actor,
                             detail=dict(detail or {}))
            s.add(ev)
            s.flush()
            self._announce_event(s, ticket_id, kind)
        self._observed(ticket_id, kind)
        return ev

    def claim(self, ticket_id: int, binding: str, *, now: float | None = None) -> bool:
        """Take an approved ticket to run its statement exactly once."""
        now = time.time() if now is None else now
        with self.store.write() as s:
            res = s.execute(update(Ticket).where(
                Ticket.id == ticket_id, Ticket.status == APPROVED, Ticket.binding == binding,
                Ticket.claimed_at.is_(None)).values(claimed_at=now))
            return res.rowcount == 1  # type: ignore[attr-defined]

    def claim_deferred(self, binding: str, *, now: float | None = None) -> Ticket | None:
        """An approved, unclaimed defer-mode ticket for exactly this request."""
        now = time.time() if now is None else now
        with self.store.session() as s:
            ids = list(s.scalars(select(Ticket.id).where(
                Ticket.binding == binding, Ticket.status == APPROVED, Ticket.mode == "defer",
                Ticket.claimed_at.is_(None), Ticket.decided_at > now - DEFER_WINDOW)
                .order_by(Ticket.id)))
        for tid in ids:
            if self.claim(tid, binding, now=now):
                return self.get(tid)
        return None

    def expire_due(self, *, now: float | None = None) -> list[int]:
        now = time.time() if now is None else now
        with self.store.session() as s:
            due = list(s.scalars(select(Ticket.id).where(Ticket.status == PENDING,
                                                         Ticket.expires_at <= now)))
        done = []
        for tid in due:
            try:
                t = self.finish(tid, "expire", comment="no decision before the timeout", now=now)
            except (AlreadyDecided, InvalidTransition):
                continue
            self.audit(kind="ticket", connection=t.connection, protocol=t.protocol,
                       ticket_id=t.id, outcome=EXPIRED, statement=t.statement,
                       user=t.requester)
            done.append(tid)
        return done

    def escalate_due(self, *, now: float | None = None) -> list[int]:
        """Widen the approvers of pending tickets whose escalation time has come: their
        ``escalate_to`` groups may decide them too, an "escalated" event says so (chat
        re-notifies). Once per ticket, safe with several sweepers (conditional update)."""
        now = time.time() if now is None else now
        with self.store.session() as s:
            due = list(s.scalars(select(Ticket.id).where(
                Ticket.status == PENDING, Ticket.escalate_at.is_not(None),
                Ticket.escalate_at <= now)))
        done = []
        for tid in due:
            with self.store.write() as s:
                t = self._lock(s, tid)
                if t.status != PENDING or t.escalate_at is None or t.escalate_at > now:
                    continue
                added = [g for g in (t.escalate_to or []) if g not in t.approver_groups]
                t.approver_groups = [*t.approver_groups, *added]
                t.escalate_at = None
                s.add(TicketEvent(ticket_id=tid, at=now, kind="escalated", actor=None,
                                  detail={"to": list(t.escalate_to or []), "added": added}))
                self._announce_event(s, tid, "escalated")
            self._observed(tid, "escalated")
            done.append(tid)
        return done

    def abandon_orphans(self, *, now: float | None = None) -> list[tuple[int, str]]:
        """End the open tickets whose gateway instance is dead: pending and approved but
        unclaimed ones become ``abandoned`` (nobody waits for them any more, so their
        statement can never run); a claimed one, whose statement may have run, becomes
        ``failed`` with an unknown outcome. Safe with several sweepers at once: every
        change is conditional and a lost race is skipped. Returns (id, new status)."""
        now = time.time() if now is None else now
        alive = exists().where(
            GatewayInstance.id == Ticket.instance_id, GatewayInstance.stopped_at.is_(None),
            GatewayInstance.beat_at + DEAD_AFTER_BEATS * GatewayInstance.beat_interval >= now)
        with self.store.session() as s:
            orphans = list(s.execute(select(Ticket.id, Ticket.claimed_at).where(
                Ticket.status.in_((PENDING, APPROVED)), Ticket.mode == "hold",
                Ticket.instance_id.is_not(None), ~alive).order_by(Ticket.id)))
        done = []
        for tid, claimed_at in orphans:
            try:
                if claimed_at is None:
                    t = self.finish(tid, "abandon", comment=ABANDONED_COMMENT, now=now)
                else:
                    t = self.finish(tid, "fail", error=OUTCOME_UNKNOWN, now=now)
            except (AlreadyDecided, InvalidTransition):
                continue  # decided, claimed or swept elsewhere meanwhile
            self.audit(kind="ticket", connection=t.connection, protocol=t.protocol,
                       ticket_id=t.id, outcome=t.status, statement=t.statement,
                       user=t.requester,
                       reason=ABANDONED_COMMENT if claimed_at is None else OUTCOME_UNKNOWN)
            done.append((tid, t.status))
        return done


# The class of the store's advisory locks that serialise one requester's ticket
# creations (the other key is _lock_key of the requester).
_PENDING_LOCK = 0x4B54_7001


def _lock_key(requester: str) -> int:
    """A requester's name as a signed 32-bit advisory lock key."""
    return int.from_bytes(hashlib.sha256(requester.encode("utf-8", "surrogatepass"))
                          .digest()[:4], "big", signed=True)


def _escaped(value: Any) -> Any:
    """``value`` with lone surrogates in its strings written as \\xNN (bytes decoded
    with surrogateescape) or \\uNNNN (any other)."""
    if isinstance(value, str):
        if not any("\ud800" <= c <= "\udfff" for c in value):
            return value
        return "".join(c if not "\ud800" <= c <= "\udfff" else
                       f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else
                       f"\\u{ord(c):04x}" for c in value)
    if isinstance(value, (list, tuple)):
        return type(value)(_escaped(v) for v in value)
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    return value


def _storable(req: TicketRequest) -> TicketRequest:
    """What of a request is stored, with lone surrogates escaped (see _escaped)."""
    return dataclasses.replace(req, **{f.name: _escaped(getattr(req, f.name))
                                       for f in dataclasses.fields(req)
                                       if f.name != "binding"})
