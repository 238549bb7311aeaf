"""History and audit pages: search, keyset pagination at 100,000 tickets,
chain status, per-session view."""

from __future__ import annotations

import random
import re
import time

from flask import Flask
from portal_support import (  # noqa: F401 - fixtures
    Auth,
    app_fixture,
    make_ticket,
    svc_fixture,
)
from sqlalchemy import insert, update

from keyturn.models import AuditRecord, Ticket
from keyturn.services import Services


def _as(flask_app: Flask, user: str) -> Auth:
    a = Auth(flask_app.test_client())
    a.login(user)
    return a


def _ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'href="/tickets/(\d+)">#', html)]


def _next(html: str) -> str | None:
    m = re.search(r'rel="next" href="([^"]+)"', html)
    return m.group(1).replace("&amp;", "&") if m else None


def seed_decided(svc: Services, n: int, *, base: float, ties: bool = False) -> None:
    """Bulk insert decided tickets (as the store would hold them after decisions)."""
    rng = random.Random(7)
    people = ["alice", "erin"]
    rows = []
    for i in range(n):
        decided = base + (i // 3 if ties else i) * 10.0
        status = rng.choice(["approved", "rejected", "executed", "expired"])
        rows.append({
            "status": status, "requester": people[i % 2], "requester_groups": ["engineers"],
            "connection": "shop" if i % 4 else "billing", "protocol": "postgres",
            "client_addr": "10.0.0.1", "application": "psql", "session_id": f"s{i % 50}",
            "statement": f"UPDATE orders SET note = 'n{i}' WHERE id = {i}", "params": None,
            "binding": f"{i:064x}", "classification": "write", "tables": ["public.orders"],
            "rule": "writes", "reason": "r", "detail": {"in_transaction": False, "row_estimate": 1},
            "approver_groups": ["approvers"], "min_approvals": 1, "mode": "hold",
            "gateway_id": "g", "created_at": decided - 30, "expires_at": decided + 600,
            "decided_at": decided, "decided_by": None if status == "expired" else "bob",
            "decision_comment": "ok" if status != "rejected" else "not now"})
    with svc.store.write() as s:
        s.connection().execute(insert(Ticket.__table__), rows)  # type: ignore[arg-type]


def test_keyset_pages_cover_every_ticket_once_in_order(app: Flask, svc: Services) -> None:
    seed_decided(svc, 137, base=1_700_000_000, ties=True)  # equal decided_at on purpose
    make_ticket(svc)  # pending: not history
    carol = _as(app, "carol")
    url: str | None = "/history"
    seen: list[int] = []
    pages = 0
    while url:
        html = carol.client.get(url).text
        seen += _ids(html)
        url = _next(html)
        pages += 1
    assert pages == 3
    assert len(seen) == len(set(seen)) == 137
    with svc.store.session() as s:
        order = [t.id for t in s.query(Ticket).filter(Ticket.decided_at.is_not(None))
                 .order_by(Ticket.decided_at.desc(), Ticket.id.desc())]
    assert seen == order


def test_history_search_filters(app: Flask, svc: Services) -> None:
    seed_decided(svc, 40, base=1_700_000_000)
    carol = _as(app, "carol")
    html = carol.client.get("/history?q=n17'").text
    assert _ids(html) and all("n17" in s for s in re.findall(r"n\d+'", html))
    html = carol.client.get("/history?outcome=rejected").text
    with svc.store.session() as s:
        rejected = {t.id for t in s.query(Ticket).filter(Ticket.status == "rejected")}
    assert set(_ids(html)) == rejected
    html = carol.client.get("/history?requester=erin&connection=billing").text
    assert set(_ids(html)) == {i + 1 for i in range(40) if i % 2 == 1 and i % 4 == 0}
    assert _ids(carol.client.get("/history?approver=bob&outcome=expired").text) == []
    # 1_700_000_000 is 2023-11-14T22:13:20Z; the 40 decisions span 400 s that day
    assert len(_ids(carol.client.get("/history?from=2023-11-14&to=2023-11-14").text)) == 40
    assert _ids(carol.client.get("/history?from=2023-11-15").text) == []
    r = carol.client.get("/history?from=yesterday")
    assert r.status_code == 400 and "expected a date like 2026-11-22" in r.text
    r = carol.client.get("/history?after=garbage!!")
    assert r.status_code == 400 and "page link is damaged" in r.text
    assert "No decided tickets" in carol.client.get("/history?q=no-such-text").text


def test_history_stays_fast_at_100k_tickets(app: Flask, svc: Services) -> None:
    t0 = time.perf_counter()
    seed_decided(svc, 100_000, base=1_600_000_000)
    seeded = time.perf_counter() - t0
    carol = _as(app, "carol")
    timings = []
    html = carol.client.get("/history").text  # warm up
    # First page, then jump deep: the cursor of a page near the end.
    with svc.store.session() as s:
        deep = s.query(Ticket).filter(Ticket.id == 150).one()
    from portal.queries import encode_cursor

    for url in ("/history", f"/history?after={encode_cursor(deep.decided_at, deep.id)}",
                "/history?requester=erin", "/history?outcome=rejected&connection=billing",
                "/history?q=n99999'"):
        t0 = time.perf_counter()
        html = carol.client.get(url).text
        timings.append(time.perf_counter() - t0)
        assert len(_ids(html)) >= (1 if "q=" in url else 50) or \
            url.startswith("/history?after"), url
    print(f"seeded 100k in {seeded:.1f}s; page times {[f'{t * 1000:.0f}ms' for t in timings]}")
    # The deep page is as cheap as the first (keyset), and every page is interactive.
    assert max(timings) < 1.0, timings


# ---------------------------------------------------------------- audit


def _audit(svc: Services) -> None:
    base = time.time() - 60
    svc.audit.append([
        {"at": base, "kind": "connect", "user": "alice", "connection": "shop",
         "session_id": "sess-1", "client_addr": "10.1.1.1"},
        {"at": base + 1, "kind": "statement", "user": "alice", "connection": "shop",
         "session_id": "sess-1", "statement": "SELECT * FROM orders", "action": "allow",
         "classification": "read", "rule": "reads", "outcome": "ok", "rows": 3},
        {"at": base + 2, "kind": "statement", "user": "alice", "connection": "shop",
         "session_id": "sess-1", "statement": "DROP TABLE orders", "action": "block",
         "classification": "ddl", "rule": "no-ddl", "reason": "schema changes go elsewhere",
         "outcome": "blocked"},
        {"at": base + 3, "kind": "statement", "user": "erin", "connection": "billing",
         "session_id": "sess-2", "statement": "SELECT 1", "action": "allow",
         "classification": "read", "rule": "reads", "outcome": "ok"},
    ])


def test_audit_search_includes_blocked_and_chain_status(app: Flask, svc: Services) -> None:
    _audit(svc)
    carol = _as(app, "carol")
    html = carol.client.get("/audit?action=block").text
    assert "DROP TABLE orders" in html and "no-ddl" in html and "SELECT 1" not in html
    html = carol.client.get("/audit?q=orders&user=alice").text
    assert "DROP TABLE orders" in html and "SELECT * FROM orders" in html
    assert "SELECT 1" not in carol.client.get("/audit?connection=shop").text
    chain = carol.client.get("/audit/chain").text
    assert "Chain intact" in chain and "5 records" in chain  # 4 + carol's sign-in
    with svc.store.write() as s:  # someone edits a record behind Keyturn's back
        s.execute(update(AuditRecord).where(AuditRecord.seq == 3)
                  .values(statement="SELECT harmless"))
    chain = carol.client.get("/audit/chain").text
    assert "Chain broken" in chain and "record 3: content does not match its hash" in chain


def test_audit_pagination(app: Flask, svc: Services) -> None:
    svc.audit.append([{"kind": "statement", "user": "alice", "statement": f"SELECT {i}",
                       "action": "allow"} for i in range(120)])
    carol = _as(app, "carol")
    url: str | None = "/audit"
    seqs: list[int] = []
    while url:
        html = carol.client.get(url).text
        seqs += [int(x) for x in re.findall(r"<tr class=\"\">\s*<td>(\d+)</td>", html)]
        url = _next(html)
    assert seqs == list(range(121, 0, -1))  # 120 + carol's sign-in


def test_session_view_in_order_with_decisions(app: Flask, svc: Services) -> None:
    _audit(svc)
    tid = make_ticket(svc)
    svc.approvals.vote(tid, svc.identities.identity_of("bob"), "reject", "wrong table")
    svc.audit.append([{"kind": "statement", "user": "alice", "connection": "shop",
                       "session_id": "sess-1", "statement": "DELETE FROM orders",
                       "action": "review", "ticket_id": tid, "outcome": "rejected"}])
    html = _as(app, "carol").client.get("/audit/sessions/sess-1").text
    order = [html.index(s) for s in ("<b>connect</b>", "orders</span>", "DROP",
                                     "DELETE")]
    assert order == sorted(order)
    assert "SELECT 1" not in html  # another session
    assert f"ticket #{tid}" in html and "rejected" in html and "wrong table" in html
    assert "No records for this session" in _as(app, "carol").client.get(
        "/audit/sessions/nope").text


def test_history_approver_and_wildcards_match_exactly(app: Flask, svc: Services) -> None:
    bob, dana = svc.identities.identity_of("bob"), svc.identities.identity_of("dana")
    both = make_ticket(svc, n=2, statement="UPDATE t SET pct = '100%'")
    svc.approvals.vote(both, bob, "approve", None)
    svc.approvals.vote(both, dana, "approve", None)
    only_dana = make_ticket(svc, statement="UPDATE t SET a_b = 1")
    svc.approvals.vote(only_dana, dana, "approve", None)
    carol = _as(app, "carol")
    assert _ids(carol.client.get("/history?approver=bob").text) == [both]
    assert set(_ids(carol.client.get("/history?approver=dana").text)) == {both, only_dana}
    assert _ids(carol.client.get("/history?approver=da").text) == []
    # % and _ are text to search for, not wildcards
    assert _ids(carol.client.get("/history?q=100%25").text) == [both]
    assert _ids(carol.client.get("/history?q=a_b").text) == [only_dana]
    assert _ids(carol.client.get("/history?q=%25").text) == [both]
