"""Read-only queries the portal pages need beyond keyturn.approvals' own.

Nothing here writes: every state change goes through keyturn.approvals.
History pages use keyset pagination on (decided_at, id) — an index from
migration 0003 — so page 5,000 costs what page 1 costs.

It must not write.
"""

from __future__ import annotations

import base64
import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, and_, func, or_, select

from keyturn.approvals import DECIDED, PENDING
from keyturn.config import parse_duration
from keyturn.errors import KeyturnError
from keyturn.models import AuditRecord, Ticket, TicketEvent, Vote
from keyturn.store import Store


class BadFilter(KeyturnError):
    code = "bad_filter"


def parse_age(value: str | None, field: str = "age") -> float | None:
    if not value:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise BadFilter(f"{field}: {exc}") from exc


def parse_day(value: str | None, field: str, *, end: bool = False) -> float | None:
    """A date (YYYY-MM-DD, whole day in UTC) or an ISO date-time, as epoch seconds."""
    if not value:
        return None
    try:
        if len(value) == 10:
            day = dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)
            return (day + dt.timedelta(days=1 if end else 0)).timestamp()
        when = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise BadFilter(f"{field}: expected a date like 2026-11-22, got {value!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


# ---------------------------------------------------------------- pending queue

@dataclass(frozen=True)
class QueueFilter:
    connection: str = ""
    requester: str = ""
    rule: str = ""
    min_age: float | None = None

    def args(self) -> dict[str, str]:
        return {k: v for k, v in (("connection", self.connection),
                                  ("requester", self.requester), ("rule", self.rule)) if v}


def pending(store: Store, f: QueueFilter, *, limit: int = 500) -> list[Ticket]:
    q = select(Ticket).where(Ticket.status == PENDING).order_by(Ticket.created_at, Ticket.id)
    if f.connection:
        q = q.where(Ticket.connection == f.connection)
    if f.requester:
        q = q.where(Ticket.requester == f.requester)
    if f.rule:
        q = q.where(Ticket.rule == f.rule)
    if f.min_age is not None:
        q = q.where(Ticket.created_at <= time.time() - f.min_age)
    with store.session() as s:
        return list(s.scalars(q.limit(limit)))


def voted_by(store: Store, user: str, ids: list[int]) -> set[int]:
    """Which of these tickets ``user`` already voted on (N-of-M tickets stay pending)."""
    if not ids:
        return set()
    with store.session() as s:
        return set(s.scalars(select(Vote.ticket_id).where(Vote.approver == user,
                                                          Vote.ticket_id.in_(ids))))


def mine(store: Store, user: str, *, limit: int = 100) -> list[Ticket]:
    with store.session() as s:
        return list(s.scalars(select(Ticket).where(Ticket.requester == user)
                              .order_by(Ticket.id.desc()).limit(limit)))


def distinct_values(store: Store, column: Any, *, limit: int = 200) -> list[str]:
    with store.session() as s:
        return [v for v in s.scalars(select(column).distinct().order_by(column).limit(limit))
                if v]


# ---------------------------------------------------------------- history

@dataclass(frozen=True)
class HistoryFilter:
    text: str = ""
    requester: str = ""
    approver: str = ""
    connection: str = ""
    outcome: str = ""
    since: float | None = None
    until: float | None = None

    def where(self) -> list[Any]:
        conds: list[Any] = [Ticket.status.in_(sorted(DECIDED)), Ticket.decided_at.is_not(None)]
        if self.requester:
            conds.append(Ticket.requester == self.requester)
        if self.approver:
            # decided_by lists the approvers of N-of-M tickets as "bob, dana".
            a = self.approver
            conds.append(or_(Ticket.decided_by == a,
                             Ticket.decided_by.startswith(f"{a}, ", autoescape=True),
                             Ticket.decided_by.endswith(f", {a}", autoescape=True),
                             Ticket.decided_by.contains(f", {a}, ", autoescape=True)))
        if self.connection:
            conds.append(Ticket.connection == self.connection)
        if self.outcome:
            conds.append(Ticket.status == self.outcome)
        if self.since is not None:
            conds.append(Ticket.decided_at >= self.since)
        if self.until is not None:
            conds.append(Ticket.decided_at < self.until)
        if self.text:
            t = self.text.lower()
            conds.append(or_(*(func.lower(c).contains(t, autoescape=True) for c in (
                Ticket.statement, Ticket.reason, Ticket.decision_comment))))
        return conds


def encode_cursor(decided_at: float, ticket_id: int) -> str:
    return base64.urlsafe_b64encode(f"{decided_at!r}:{ticket_id}".encode()).decode()


def decode_cursor(cursor: str | None) -> tuple[float, int] | None:
    if not cursor:
        return None
    try:
        at, _, tid = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        return float(at), int(tid)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadFilter("the page link is damaged; start from the first page") from exc


def history_query(f: HistoryFilter) -> Select[Any]:
    return select(Ticket).where(*f.where()).order_by(Ticket.decided_at.desc(),
                                                     Ticket.id.desc())


def history_page(store: Store, f: HistoryFilter, cursor: str | None, *,
                 size: int = 50) -> tuple[list[Ticket], str | None]:
    """One page, newest decisions first, and the cursor of the next page."""
    q = history_query(f)
    after = decode_cursor(cursor)
    if after is not None:
        at, tid = after
        q = q.where(or_(Ticket.decided_at < at, and_(Ticket.decided_at == at, Ticket.id < tid)))
    with store.session() as s:
        rows = list(s.scalars(q.limit(size + 1)))
    nxt = None
    if len(rows) > size:
        rows = rows[:size]
        last = rows[-1]
        nxt = encode_cursor(float(last.decided_at or 0), last.id)
    return rows, nxt


# ---------------------------------------------------------------- audit

@dataclass(frozen=True)
class AuditFilter:
    user: str = ""
    kind: str = ""
    action: str = ""
    connection: str = ""
    session_id: str = ""
    text: str = ""
    since: float | None = None
    until: float | None = None

    def where(self) -> list[Any]:
        conds: list[Any] = []
        for col, val in ((AuditRecord.user, self.user), (AuditRecord.kind, self.kind),
                         (AuditRecord.action, self.action),
                         (AuditRecord.connection, self.connection),
                         (AuditRecord.session_id, self.session_id)):
            if val:
                conds.append(col == val)
        if self.since is not None:
            conds.append(AuditRecord.at >= self.since)
        if self.until is not None:
            conds.append(AuditRecord.at < self.until)
        if self.text:
            t = self.text.lower()
            conds.append(or_(*(func.lower(c).contains(t, autoescape=True) for c in (
                AuditRecord.statement, AuditRecord.reason, AuditRecord.rule))))
        return conds


def audit_page(store: Store, f: AuditFilter, before_seq: int | None, *,
               size: int = 50) -> tuple[list[AuditRecord], int | None]:
    q = select(AuditRecord).where(*f.where()).order_by(AuditRecord.seq.desc())
    if before_seq is not None:
        q = q.where(AuditRecord.seq < before_seq)
    with store.session() as s:
        rows = list(s.scalars(q.limit(size + 1)))
    nxt = None
    if len(rows) > size:
        rows = rows[:size]
        nxt = rows[-1].seq
    return rows, nxt


def session_records(store: Store, session_id: str, *, limit: int = 5000) -> list[AuditRecord]:
    with store.session() as s:
        return list(s.scalars(select(AuditRecord).where(AuditRecord.session_id == session_id)
                              .order_by(AuditRecord.seq).limit(limit)))


def tickets_by_id(store: Store, ids: set[int]) -> dict[int, Ticket]:
    if not ids:
        return {}
    with store.session() as s:
        return {t.id: t for t in s.scalars(select(Ticket).where(Ticket.id.in_(sorted(ids))))}


def events_of(store: Store, ticket_id: int) -> list[TicketEvent]:
    with store.session() as s:
        return list(s.scalars(select(TicketEvent).where(TicketEvent.ticket_id == ticket_id)
                              .order_by(TicketEvent.id)))
