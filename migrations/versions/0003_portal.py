"""portal: local accounts; indexes for history and audit search

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "portal_accounts",
        sa.Column("user", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("last_login_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("user"),
    )
    # History pages walk decided tickets newest first by (decided_at, id) keyset.
    op.create_index("ix_tickets_decided", "tickets", ["decided_at", "id"])
    op.create_index("ix_audit_kind_seq", "audit_records", ["kind", "seq"])


def downgrade() -> None:
    op.drop_index("ix_audit_kind_seq", table_name="audit_records")
    op.drop_index("ix_tickets_decided", table_name="tickets")
    op.drop_table("portal_accounts")
