"""Compliance export: a streamed ZIP whose files reconcile with the database
and whose manifest verifies; the export itself is audited."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
import zipfile

from flask import Flask
from portal_support import (  # noqa: F401 - fixtures
    Auth,
    app_fixture,
    make_ticket,
    svc_fixture,
)
from sqlalchemy import func, select

from keyturn.models import AuditRecord, Ticket
from keyturn.services import Services


def _as(flask_app: Flask, user: str) -> Auth:
    a = Auth(flask_app.test_client())
    a.login(user)
    return a


def _history(svc: Services) -> dict[str, int]:
    bob = svc.identities.identity_of("bob")
    ids = {"approved": make_ticket(svc), "rejected": make_ticket(svc, "erin"),
           "pending": make_ticket(svc, connection="billing"),
           "two": make_ticket(svc, "alice", n=2)}
    svc.approvals.vote(ids["approved"], bob, "approve", "fine", via="portal")
    svc.approvals.vote(ids["rejected"], bob, "reject", "not, now \"quoted\"\nnewline",
                       via="slack")
    svc.approvals.vote(ids["two"], bob, "approve", None)
    svc.audit.append([{"kind": "statement", "user": "alice", "connection": "shop",
                       "statement": "DROP TABLE orders", "action": "block",
                       "detail": {"x": [1, 2]}}])
    return ids


def _export(a: Auth, data: dict[str, str]) -> tuple[zipfile.ZipFile, bool]:
    r = a.client.post("/export", data={**data, "csrf_token": a.csrf("/export")},
                      buffered=False)
    assert r.status_code == 200, r.text
    assert r.mimetype == "application/zip"
    assert "attachment; filename=\"keyturn-export-" in r.headers["Content-Disposition"]
    streamed = r.is_streamed
    return zipfile.ZipFile(io.BytesIO(b"".join(r.response))), streamed  # type: ignore[arg-type]


def test_export_reconciles_and_manifest_verifies(app: Flask, svc: Services) -> None:
    ids = _history(svc)
    carol = _as(app, "carol")
    zf, streamed = _export(carol, {})
    assert streamed
    assert sorted(zf.namelist()) == ["audit.csv", "audit.jsonl", "manifest.json",
                                     "tickets.csv", "tickets.jsonl"]
    manifest = json.loads(zf.read("manifest.json"))
    for name, info in manifest["files"].items():
        assert hashlib.sha256(zf.read(name)).hexdigest() == info["sha256"], name
    with svc.store.session() as s:
        n_tickets = s.scalar(select(func.count()).select_from(Ticket))
        head = manifest["audit_chain_head"]
        n_audit = s.scalar(select(func.count()).select_from(AuditRecord)
                           .where(AuditRecord.seq <= head["seq"]))
        head_hash = s.scalar(select(AuditRecord.hash).where(AuditRecord.seq == head["seq"]))
    assert head["hash"] == head_hash
    assert manifest["files"]["tickets.csv"]["records"] == n_tickets == 4
    assert manifest["files"]["tickets.jsonl"]["records"] == n_tickets
    assert manifest["files"]["audit.csv"]["records"] == n_audit
    assert manifest["files"]["audit.jsonl"]["records"] == n_audit
    assert manifest["generated_by"] == "carol"
    # CSV survives commas, quotes and newlines; JSONL carries votes and the timeline.
    rows = list(csv.DictReader(io.StringIO(zf.read("tickets.csv").decode())))
    by_id = {int(r["id"]): r for r in rows}
    assert by_id[ids["rejected"]]["decision_comment"] == "not, now \"quoted\"\nnewline"
    assert json.loads(by_id[ids["approved"]]["votes"])[0]["via"] == "portal"
    lines = [json.loads(x) for x in zf.read("tickets.jsonl").decode().splitlines()]
    two = next(t for t in lines if t["id"] == ids["two"])
    assert two["status"] == "pending" and [v["approver"] for v in two["votes"]] == ["bob"]
    assert [e["kind"] for e in two["events"]] == ["created", "vote:approve"]
    audit = [json.loads(x) for x in zf.read("audit.jsonl").decode().splitlines()]
    assert [a["seq"] for a in audit] == list(range(1, n_audit + 1))
    assert any(a["action"] == "block" and a["detail"] == {"x": [1, 2]} for a in audit)
    # The records chain as exported: each prev_hash is the hash before it.
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(audit, audit[1:], strict=False))
    # The export itself is in the audit trail, with its filter.
    exports = list(svc.audit.iter_records(kind="export"))
    assert len(exports) == 1 and exports[0]["user"] == "carol"
    assert exports[0]["action"] == "portal-export"


def test_export_filter_by_connection_and_dates(app: Flask, svc: Services) -> None:
    _history(svc)
    carol = _as(app, "carol")
    zf, _ = _export(carol, {"connection": "billing"})
    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["filter"]["connection"] == "billing"
    tickets = [json.loads(x) for x in zf.read("tickets.jsonl").decode().splitlines()]
    assert [t["connection"] for t in tickets] == ["billing"]
    today = time.strftime("%Y-%m-%d", time.gmtime())
    zf, _ = _export(carol, {"from": "2000-01-01", "to": "2000-01-02"})
    manifest = json.loads(zf.read("manifest.json"))
    assert manifest["files"]["tickets.csv"]["records"] == 0
    assert manifest["time_range"]["from"].startswith("2000-01-01")
    zf, _ = _export(carol, {"from": today, "to": today})
    assert json.loads(zf.read("manifest.json"))["files"]["tickets.csv"]["records"] == 4


def test_export_bad_input_and_authorization(app: Flask, svc: Services) -> None:
    carol = _as(app, "carol")
    r = carol.client.post("/export", data={"connection": "nope",
                                           "csrf_token": carol.csrf("/export")})
    assert r.status_code == 400 and "unknown connection" in r.text
    r = carol.client.post("/export", data={"from": "last week",
                                           "csrf_token": carol.csrf("/export")})
    assert r.status_code == 400 and "expected a date" in r.text
    assert carol.client.post("/export").status_code == 403  # no CSRF token
    for user in ("alice", "bob", "mona"):
        a = _as(app, user)
        r = a.client.post("/export", data={"csrf_token": a.csrf("/tokens")})
        assert r.status_code == 403, user
    assert list(svc.audit.iter_records(kind="export")) == []
