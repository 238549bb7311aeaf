"""tickets can escalate: at ``escalate_at`` a still-pending ticket's approver groups
grow by ``escalate_to`` (once; ``escalate_at`` is cleared when it happens)

Revision ID: 0010
Revises: 0009
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.add_column(sa.Column("escalate_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("escalate_to", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.drop_column("escalate_to")
        batch.drop_column("escalate_at")
