"""tickets keep protocol-specific values in one ``detail`` object

The SQL-only columns ``in_transaction`` and ``row_estimate`` move into ``detail`` (a JSON
object the protocol fills: PostgreSQL's {"in_transaction": …, "row_estimate": …}); what
approvers see of them is in ``facts`` since 0007.

Revision ID: 0009
Revises: 0008
"""
from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _json(bind: sa.engine.Connection) -> str:
    return "CAST(:d AS JSON)" if bind.dialect.name == "postgresql" else ":d"


def upgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.add_column(sa.Column("detail", sa.JSON(), nullable=True))
    bind = op.get_bind()
    rows = bind.execute(sa.text(
        "SELECT id, protocol, in_transaction, row_estimate FROM tickets")).fetchall()
    for tid, protocol, in_tx, estimate in rows:
        detail = {"in_transaction": bool(in_tx), "row_estimate": estimate} \
            if protocol == "postgres" else {}
        bind.execute(sa.text(f"UPDATE tickets SET detail = {_json(bind)} WHERE id = :i"),
                     {"d": json.dumps(detail), "i": tid})
    with op.batch_alter_table("tickets") as batch:
        batch.drop_column("in_transaction")
        batch.drop_column("row_estimate")


def downgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.add_column(sa.Column("in_transaction", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("row_estimate", sa.Integer(), nullable=True))
    bind = op.get_bind()
    for tid, detail in bind.execute(sa.text("SELECT id, detail FROM tickets")).fetchall():
        if isinstance(detail, str):
            detail = json.loads(detail or "{}")
        detail = detail or {}
        bind.execute(sa.text("UPDATE tickets SET in_transaction = :t, row_estimate = :r "
                             "WHERE id = :i"),
                     {"t": bool(detail.get("in_transaction")), "r": detail.get("row_estimate"),
                      "i": tid})
    with op.batch_alter_table("tickets") as batch:
        batch.drop_column("detail")
