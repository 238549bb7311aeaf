"""versioned audit records: each record's schema version, and its protocol

Rows written before this revision are version 1 (the column's default), whose hash
covers the fields it always did; keyturn.auditschema holds each version's field list.
Both columns are added in place (no table rebuild, on SQLite either): the audit table
is the largest one. Downgrading drops them, and with them the ability to verify the
records written in version 2.

Revision ID: 0008
Revises: 0007
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(sa.Column("v", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("protocol", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_records") as batch:
        batch.drop_column("protocol")
        batch.drop_column("v")
