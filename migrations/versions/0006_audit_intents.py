"""write-ahead audit: intent records waiting for their outcome, per spool file

Revision ID: 0006
Revises: 0005
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_spool") as batch:
        batch.add_column(sa.Column("pending", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_spool") as batch:
        batch.drop_column("pending")
