"""The same approval flow with PostgreSQL as Keyturn's store: decisions travel
by LISTEN/NOTIFY from the deciding process to the holding gateway.

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import Keyturn, make_keyturn

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kt_pgstore(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    pg.execute("DROP DATABASE IF EXISTS keyturn_store")
    pg.create_database("keyturn_store")
    url = (f"postgresql://{pg.superuser}:{pg.superuser_password}@127.0.0.1:{pg.port}"
           "/keyturn_store")
    kt = make_keyturn(tmp_path_factory.mktemp("ktpg"), pg,
                      store_url_env={"KEYTURN_TEST_STORE": url})
    kt.start()
    yield kt
    kt.stop()


def test_tables_live_in_postgres(kt_pgstore: Keyturn) -> None:
    with psycopg.connect(kt_pgstore.pg.dsn("keyturn_store")) as c:
        names = {r[0] for r in c.execute("SELECT tablename FROM pg_tables "
                                         "WHERE schemaname = 'public'")}
    assert {"tickets", "ticket_votes", "audit_records", "tokens", "alembic_version"} <= names


def test_hold_released_across_processes_via_notify(kt_pgstore: Keyturn) -> None:
    kt = kt_pgstore
    p = kt.psql("alice", "UPDATE orders SET total = total + 0 WHERE id = 33")
    t = kt.wait_ticket()
    assert p.poll() is None
    t0 = time.monotonic()
    kt.cli("approve", str(t["id"]), token_of="dana")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.strip() == "UPDATE 1"
    assert time.monotonic() - t0 < 5
    assert "approved by dana" in err


def test_n_of_m_and_rejection_with_postgres_store(kt_pgstore: Keyturn) -> None:
    kt = kt_pgstore
    kt.pg.execute("CREATE TABLE IF NOT EXISTS big_events (id int); "
                  "ALTER TABLE big_events OWNER TO app", dbname="shop")
    p = kt.psql("alice", "DELETE FROM big_events")
    t = kt.wait_ticket()
    assert t["min_approvals"] == 2 and t["rule"] == "two-person-truncate"
    res = kt.cli("approve", str(t["id"]), token_of="bob")
    assert "1 of 2" in res.stdout
    time.sleep(0.5)
    assert p.poll() is None, "one approval of two must not release the statement"
    kt.cli("approve", str(t["id"]), token_of="dana")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "approved by bob, dana" in err
    p = kt.psql("alice", "DELETE FROM orders WHERE id = 31")
    t = kt.wait_ticket()
    kt.cli("reject", str(t["id"]), "--reason", "not now", token_of="bob")
    out, err = p.communicate(timeout=30)
    assert p.returncode != 0 and "rejected by bob: “not now”" in err


def test_audit_chain_in_postgres_store(kt_pgstore: Keyturn, tmp_path: Path) -> None:
    res = kt_pgstore.cli("audit", "verify")
    assert "audit chain OK" in res.stdout
    kt_pgstore.cli("audit", "export", "--format", "csv", "-o", str(tmp_path / "a.csv"))
    text = (tmp_path / "a.csv").read_text()
    assert text.startswith("seq,at,kind") and "UPDATE orders SET total" in text


def test_simultaneous_votes_on_postgres_store(kt_pgstore: Keyturn,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from keyturn.approvals import TicketRequest
    from keyturn.config import load_config
    from keyturn.errors import AlreadyDecided
    from keyturn.services import build_services

    monkeypatch.setenv("KEYTURN_TEST_STORE", kt_pgstore.env["KEYTURN_TEST_STORE"])
    svc = build_services(load_config(kt_pgstore.config))
    for n in (1, 2):
        t = svc.approvals.create(TicketRequest(
            requester="alice", requester_groups=("engineers",), connection="shop",
            statement="DELETE FROM orders", classification="write", rule="r", reason="r",
            approver_groups=("approvers",), min_approvals=n, timeout=600))
        outcomes: list[str] = []
        barrier = threading.Barrier(2)

        def vote(user: str, tid: int = t.id, barrier: threading.Barrier = barrier,
                 outcomes: list[str] = outcomes) -> None:
            barrier.wait()
            try:
                r = svc.approvals.vote(tid, svc.identities.identity_of(user), "approve")
                outcomes.append("decided" if r.decided else "counted")
            except AlreadyDecided:
                outcomes.append("late")

        threads = [threading.Thread(target=vote, args=(u,)) for u in ("bob", "dana")]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        final = svc.approvals.get(t.id)
        if n == 1:
            # Exactly one approval decides; the other approver is told it was decided.
            assert sorted(outcomes) == ["decided", "late"]
        else:
            # Two of two: the row lock serialises the votes, so the second one decides.
            assert sorted(outcomes) == ["counted", "decided"]
        assert final.status == "approved"
    svc.store.dispose()
