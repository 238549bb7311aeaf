"""tickets speak any protocol: the action's language and labelled facts

Existing PostgreSQL tickets get language sql and the facts their SQL-specific columns
held (class and tables, the EXPLAIN estimate, whether a transaction was open), worded as
the PostgreSQL gateway words them for new tickets (proxies/postgres/session.py).

Revision ID: 0007
Revises: 0006
"""
from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def sql_facts(classification: str, tables: list[str], row_estimate: int | None,
              in_transaction: bool) -> list[list[str]]:
    """The facts of a PostgreSQL ticket (kept in step with the gateway's own wording)."""
    cls = classification + (f" on {', '.join(tables)}" if tables else "")
    rows = f"{row_estimate:,} (EXPLAIN)" if row_estimate is not None else "no estimate"
    tx = "yes — the client holds a transaction" if in_transaction else "no"
    return [["Class", cls], ["Estimated rows", rows], ["Transaction open", tx]]


def upgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.add_column(sa.Column("language", sa.String(16), nullable=False,
                                   server_default="text"))
        batch.add_column(sa.Column("facts", sa.JSON(), nullable=True))
    bind = op.get_bind()
    rows = bind.execute(sa.text(
        "SELECT id, protocol, classification, tables, row_estimate, in_transaction "
        "FROM tickets")).fetchall()
    for tid, protocol, classification, tables, estimate, in_tx in rows:
        if isinstance(tables, str):
            tables = json.loads(tables or "[]")
        if protocol == "postgres":
            facts = sql_facts(classification, list(tables or []), estimate, bool(in_tx))
            language = "sql"
        else:
            facts, language = [["Class", classification]], "text"
        value = "CAST(:f AS JSON)" if bind.dialect.name == "postgresql" else ":f"
        bind.execute(sa.text(f"UPDATE tickets SET language = :l, facts = {value} WHERE id = :i"),
                     {"l": language, "f": json.dumps(facts), "i": tid})


def downgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.drop_column("facts")
        batch.drop_column("language")
