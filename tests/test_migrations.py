"""Schema migrations keep existing data meaningful, on both stores (SQLite and a real
PostgreSQL): a store made by the previous release is upgraded in place."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from keyturn.approvals import Approvals
from keyturn.launch.localpg import LocalPostgres
from keyturn.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'k.db'}"
        return
    pg: LocalPostgres = request.getfixturevalue("pg")
    pg.execute("DROP DATABASE IF EXISTS keyturn_migrations")
    pg.create_database("keyturn_migrations")
    yield (f"postgresql://{pg.superuser}:{pg.superuser_password}@127.0.0.1:{pg.port}"
           "/keyturn_migrations")


def test_tickets_from_before_facts_get_their_sql_facts(store_url: str) -> None:
    store = Store(store_url)
    store.upgrade("0006")
    with store.engine.begin() as c:
        for tid, estimate, in_tx, tables in ((1, 1234, True, ["public.orders"]),
                                             (2, None, False, [])):
            c.execute(text(
                "INSERT INTO tickets (id, status, requester, requester_groups, connection, "
                "protocol, client_addr, application, session_id, statement, binding, "
                "classification, tables, rule, reason, in_transaction, row_estimate, "
                "approver_groups, min_approvals, mode, gateway_id, created_at, expires_at) "
                "VALUES (:id, 'pending', 'alice', '[]', 'shop', 'postgres', '', '', '', "
                "'DELETE FROM orders', 'b', 'write', :tables, 'writes', 'r', :tx, :est, "
                "'[]', 1, 'hold', '', 0, 600)"),
                {"id": tid, "tables": json.dumps(tables), "tx": in_tx, "est": estimate})
    store.upgrade()
    approvals = Approvals(store)
    first, second = approvals.get(1), approvals.get(2)
    assert first.language == "sql" and second.language == "sql"
    assert first.facts == [["Class", "write on public.orders"],
                           ["Estimated rows", "1,234 (EXPLAIN)"],
                           ["Transaction open", "yes — the client holds a transaction"]]
    assert second.facts == [["Class", "write"], ["Estimated rows", "no estimate"],
                            ["Transaction open", "no"]]
    # 0009: the SQL-only columns live on in the ticket's protocol detail.
    assert first.detail == {"in_transaction": True, "row_estimate": 1234}
    assert second.detail == {"in_transaction": False, "row_estimate": None}
    store.dispose()


def test_ticket_detail_migrates_down_and_up_again(store_url: str) -> None:
    store = Store(store_url)
    store.upgrade("0008")
    with store.engine.begin() as c:
        c.execute(text(
            "INSERT INTO tickets (id, status, requester, requester_groups, connection, "
            "protocol, client_addr, application, session_id, statement, binding, "
            "classification, tables, rule, reason, in_transaction, row_estimate, "
            "approver_groups, min_approvals, mode, gateway_id, created_at, expires_at, "
            "language) VALUES (7, 'pending', 'alice', '[]', 'shop', 'postgres', '', '', '', "
            "'DELETE FROM orders', 'b', 'write', '[]', 'writes', 'r', true, 55, "
            "'[]', 1, 'hold', '', 0, 600, 'sql')"))
    store.upgrade()
    assert Approvals(store).get(7).detail == {"in_transaction": True, "row_estimate": 55}
    store.downgrade("0008")
    with store.engine.begin() as c:
        row = c.execute(text("SELECT in_transaction, row_estimate FROM tickets "
                             "WHERE id = 7")).one()
    assert (bool(row[0]), row[1]) == (True, 55)
    store.upgrade()
    assert Approvals(store).get(7).detail == {"in_transaction": True, "row_estimate": 55}
    store.dispose()
