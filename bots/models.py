"""Tables of the chat surfaces: the outbox, its cursor, message references and
identity links.

They live on ``keyturn.models.Base`` so one Alembic history covers the store;
migration ``0004`` creates them. Nothing here writes ticket rows: tickets
change only through ``keyturn.approvals``.

It must not hold behaviour: the surfaces' logic lives in their own modules.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from keyturn.models import Base


class ChatCursor(Base):
    """How far the bots have read ``ticket_events``; advanced in the same
    transaction that writes the outbox rows for those events."""

    __tablename__ = "chat_cursor"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_event_id: Mapped[int] = mapped_column(Integer)


class OutboxItem(Base):
    """One notification to deliver to one platform.

    Rows are never deleted by delivery: a sent row keeps ``sent_at``; a failing
    row keeps retrying with backoff (``next_attempt_at``) and shows its last
    error. ``dedupe`` makes scheduled notifications (reminders) idempotent.
    """

    __tablename__ = "chat_outbox"
    __table_args__ = (
        UniqueConstraint("platform", "dedupe", name="uq_chat_outbox_dedupe"),
        Index("ix_chat_outbox_due", "sent_at", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    ticket_id: Mapped[int] = mapped_column(Integer, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    dedupe: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class ChatMessage(Base):
    """Where a ticket's message lives on a platform, so it can be updated in place."""

    __tablename__ = "chat_messages"
    __table_args__ = (UniqueConstraint("platform", "ticket_id", "purpose",
                                       name="uq_chat_message"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    ticket_id: Mapped[int] = mapped_column(Integer, index=True)
    purpose: Mapped[str] = mapped_column(String(16), default="ticket")
    channel: Mapped[str] = mapped_column(String(200))
    ref: Mapped[str] = mapped_column(String(200))
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)


class IdentityLink(Base):
    """An explicit link from a chat account to a Keyturn user.

    ``platform_user`` is the Slack user id, or for Teams the AAD object id.
    ``address`` keeps what a platform needs to reach the person proactively
    (for Teams: the channel account id, service URL and tenant).
    """

    __tablename__ = "chat_identity_links"
    __table_args__ = (UniqueConstraint("platform", "platform_user", name="uq_chat_link"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    platform_user: Mapped[str] = mapped_column(String(200))
    user: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[str] = mapped_column(String(16), default="explicit")
    address: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str | None] = mapped_column(String(64), nullable=True)


class LinkCode(Base):
    """A one-time code that proves control of a chat account: the chat user asks
    for it (``/keyturn link``), the Keyturn user redeems it while signed in with
    their own token. Only its hash is stored; it expires in minutes."""

    __tablename__ = "chat_link_codes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    platform: Mapped[str] = mapped_column(String(16))
    platform_user: Mapped[str] = mapped_column(String(200))
    address: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
