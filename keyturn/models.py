"""SQLAlchemy 2 table definitions for Keyturn's store.

The schema is owned by Alembic (migrations/); these classes mirror it. Times
are stored as UTC epoch seconds (floats) so that SQLite and PostgreSQL compare
and sort them identically and the audit hash chain is byte-stable.

These classes must not change a table without a migration, nor carry
behaviour; the audit record's columns are the fields of ``keyturn.auditschema``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class UserSalt(Base):
    """One SCRAM salt per user: every token of the user is derived with it, so
    the gateway can check a SCRAM proof against all of the user's tokens."""

    __tablename__ = "user_salts"
    user: Mapped[str] = mapped_column(String(64), primary_key=True)
    salt: Mapped[bytes] = mapped_column()
    iterations: Mapped[int] = mapped_column(Integer)


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    description: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    lookup_hash: Mapped[str] = mapped_column(String(64), unique=True)
    stored_key: Mapped[bytes] = mapped_column()
    server_key: Mapped[bytes] = mapped_column()
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class PublicKey(Base):
    """A person's SSH public key: logging in with its private key is logging in as them
    (keyturn key add, the portal's Keys page)."""

    __tablename__ = "public_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    #: ``SHA256:...`` as ``ssh-keygen -l`` prints it; one key belongs to one person.
    fingerprint: Mapped[str] = mapped_column(String(128), unique=True)
    algorithm: Mapped[str] = mapped_column(String(64))
    #: The key in OpenSSH's one-line form (``ssh-ed25519 AAAA... comment``).
    openssh: Mapped[str] = mapped_column(Text)
    comment: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[float] = mapped_column(Float)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Ticket(Base):
    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    requester: Mapped[str] = mapped_column(String(64), index=True)
    requester_groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    connection: Mapped[str] = mapped_column(String(128), index=True)
    protocol: Mapped[str] = mapped_column(String(16), default="postgres")
    client_addr: Mapped[str] = mapped_column(String(64), default="")
    application: Mapped[str] = mapped_column(String(200), default="")
    session_id: Mapped[str] = mapped_column(String(64), default="")
    statement: Mapped[str] = mapped_column(Text)  # the held action's text, any protocol
    # How to show it: the language of ``statement`` for highlighting (sql, shell, http...)
    # and labelled facts the protocol gives, in order: [[label, value], ...]. Surfaces
    # render these without knowing the protocol.
    language: Mapped[str] = mapped_column(String(16), default="text")
    facts: Mapped[list[list[str]]] = mapped_column(JSON, default=list)
    params: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    binding: Mapped[str] = mapped_column(String(64), index=True)
    classification: Mapped[str] = mapped_column(String(16))
    tables: Mapped[list[str]] = mapped_column(JSON, default=list)
    rule: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    # Values only its protocol knows, for exports and the audit trail (PostgreSQL:
    # in_transaction, row_estimate); approvers see them as ``facts``.
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    approver_groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Escalation: when a ticket is still pending at ``escalate_at``, ``escalate_to`` join
    # its approver groups (once: ``escalate_at`` is then cleared).
    escalate_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    escalate_to: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    min_approvals: Mapped[int] = mapped_column(Integer, default=1)
    mode: Mapped[str] = mapped_column(String(8), default="hold")
    gateway_id: Mapped[str] = mapped_column(String(64), default="")
    # The gateway process that holds the client waiting for this ticket (GatewayInstance.id);
    # None for tickets no gateway process holds (created by the CLI, tests, demo seeds).
    instance_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    expires_at: Mapped[float] = mapped_column(Float)
    decided_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    decision_comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    claimed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    executed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    result_rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    result_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class GatewayInstance(Base):
    """One run of a gateway process and its heartbeat. ``gateway_id`` is the configured
    name, shared by every run; ``id`` is this run's own, so a restarted gateway is a new
    instance. It counts as dead once ``beat_at`` is ``DEAD_AFTER_BEATS`` intervals old
    (or ``stopped_at`` is set); tickets it held are then abandoned (keyturn.liveness)."""

    __tablename__ = "gateway_instances"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    gateway_id: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    beat_at: Mapped[float] = mapped_column(Float)
    beat_interval: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Vote(Base):
    """One approver's vote. The unique key makes each approver count once."""

    __tablename__ = "ticket_votes"
    __table_args__ = (UniqueConstraint("ticket_id", "approver", name="uq_vote_once"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    approver: Mapped[str] = mapped_column(String(64))
    vote: Mapped[str] = mapped_column(String(8))
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    via: Mapped[str] = mapped_column(String(16), default="api")
    at: Mapped[float] = mapped_column(Float)


class TicketEvent(Base):
    """The ticket's timeline: created, notified, each vote, decided, executed."""

    __tablename__ = "ticket_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AuditRecord(Base):
    """One hash-chained audit record. ``seq`` is dense: a gap means deletion. Its
    columns are the fields of ``keyturn.auditschema`` (a test holds them equal); ``v``
    is the schema version it was hashed in (rows from before versions: 1)."""

    __tablename__ = "audit_records"
    __table_args__ = (Index("ix_audit_at", "at"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    user: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    connection: Mapped[str | None] = mapped_column(String(128), nullable=True)
    session_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    client_addr: Mapped[str | None] = mapped_column(String(64), nullable=True)
    statement: Mapped[str | None] = mapped_column(Text, nullable=True)
    classification: Mapped[str | None] = mapped_column(String(16), nullable=True)
    action: Mapped[str | None] = mapped_column(String(16), nullable=True)
    rule: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    ticket_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    duration_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    protocol: Mapped[str | None] = mapped_column(String(16), nullable=True)
    v: Mapped[int] = mapped_column(Integer, server_default=text("1"))


class AuditSpoolCursor(Base):
    """How far the ingester has read each gateway spool file; updated in the same
    transaction as the records it ingested, so nothing is skipped or doubled."""

    __tablename__ = "audit_spool"
    source: Mapped[str] = mapped_column(String(200), primary_key=True)
    offset: Mapped[int] = mapped_column(Integer)
    # Intent records read from the file (or carried over from the writer's previous
    # file) whose outcome has not been read yet: {"session:n": record} as JSON.
    pending: Mapped[str | None] = mapped_column(Text, nullable=True)


class AuditHead(Base):
    """The chain's newest seq and hash, so that deleting the tail is detected."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))
