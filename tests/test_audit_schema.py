"""The versioned audit event schema: trails that mix records written before versions
existed (version 1, hashed the way Keyturn always hashed them) with records of the
current version verify, export and re-verify from the export, on SQLite and on
PostgreSQL, and tampering with either kind, or with a record's version, is found."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from sqlalchemy import text

from keyturn import auditschema
from keyturn.audit import AuditLog
from keyturn.auditspool import AuditIngester, AuditSpool
from keyturn.launch.localpg import LocalPostgres
from keyturn.models import AuditRecord
from keyturn.store import Store

# What Keyturn hashed before the schema had versions, frozen here as that code had it
# (keyturn/audit.py FIELDS and record_hash up to the revision that added versions): old
# trails must verify as version 1 however the schema grows.
PRE_VERSION_FIELDS = ("seq", "at", "kind", "user", "connection", "session_id", "client_addr",
                      "statement", "classification", "action", "rule", "reason", "ticket_id",
                      "outcome", "duration_ms", "rows", "detail")
PRE_VERSION_REVISION = "0006"  # the store's schema before the version column


def pre_version_hash(prev: str, rec: dict) -> str:
    body = orjson.dumps({k: rec.get(k) for k in PRE_VERSION_FIELDS}, default=str,
                        option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(prev.encode() + body).hexdigest()


def append_pre_version(store: Store, records: list[dict]) -> None:
    """Append records as Keyturn did before versions: its columns, its hash."""
    cols = (*PRE_VERSION_FIELDS, "prev_hash", "hash")
    names = ", ".join(f'"{c}"' for c in cols)
    detail = ":detail" if store.is_sqlite else "CAST(:detail AS JSON)"
    values = ", ".join(detail if c == "detail" else f":{c}" for c in cols)
    sql = text(f"INSERT INTO audit_records ({names}) VALUES ({values})")
    with store.write() as s:
        seq, prev = s.execute(text("SELECT seq, hash FROM audit_head WHERE id = 1")).one()
        for raw in records:
            seq += 1
            rec = {k: raw.get(k) for k in PRE_VERSION_FIELDS}
            rec.update(seq=seq, detail=rec["detail"] or {}, at=float(rec["at"]))
            h = pre_version_hash(prev, rec)
            s.execute(sql, {**rec, "detail": json.dumps(rec["detail"]), "prev_hash": prev,
                            "hash": h})
            prev = h
        s.execute(text("UPDATE audit_head SET seq = :seq, hash = :hash WHERE id = 1"),
                  {"seq": seq, "hash": prev})


OLD = [{"kind": "statement", "user": "alice", "connection": "shop", "session_id": "s1",
        "client_addr": "10.0.0.1", "statement": f"SELECT {i}", "classification": "read",
        "action": "allow", "rule": "reads", "reason": "reads are allowed", "outcome": "ok",
        "duration_ms": 0.5, "rows": i, "at": 1000.0 + i,
        "detail": {"params": [str(i)]} if i % 2 else None} for i in range(4)] + [
       {"kind": "vote", "user": "bob", "connection": "shop", "ticket_id": 7, "action": "approve",
        "outcome": "approved", "statement": "DELETE FROM t", "at": 1010.0,
        "detail": {"via": "slack"}}]
NEW = [{"kind": "statement", "user": "carol", "connection": "shop", "protocol": "postgres",
        "session_id": "s2", "statement": "UPDATE t SET a = 1", "classification": "write",
        "action": "review", "rule": "writes", "reason": "writes are reviewed", "ticket_id": 8,
        "outcome": "ok", "duration_ms": 12.25, "rows": 3, "at": 2000.0,
        "detail": {"params": ["x", None]}},
       {"kind": "export", "user": "dana", "action": "audit-export", "at": 2001.0,
        "detail": {"format": "jsonl"}}]


def mixed_trail(store: Store) -> AuditLog:
    """A store that was written before versions, upgraded, then written on."""
    store.upgrade(PRE_VERSION_REVISION)
    append_pre_version(store, OLD)
    store.upgrade()
    audit = AuditLog(store)
    audit.append(NEW)
    return audit


@pytest.fixture()
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'k.db'}")
    yield store
    store.dispose()


@pytest.fixture()
def postgres_store(pg: LocalPostgres) -> Iterator[Store]:
    pg.execute("DROP DATABASE IF EXISTS keyturn_audit_schema")
    pg.create_database("keyturn_audit_schema")
    store = Store(f"postgresql://{pg.superuser}:{pg.superuser_password}@127.0.0.1:{pg.port}"
                  "/keyturn_audit_schema")
    yield store
    store.dispose()
    pg.execute("DROP DATABASE IF EXISTS keyturn_audit_schema")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest) -> Store:
    return request.getfixturevalue(f"{request.param}_store")


# ---------------------------------------------------------------- the definition

def test_each_version_hashes_its_own_fields_and_version_one_is_what_keyturn_hashed() -> None:
    assert auditschema.HASHED[1] == PRE_VERSION_FIELDS
    assert auditschema.VERSION == max(auditschema.HASHED) == 2
    # Version 2 adds the protocol and the version itself, at the end (CSV columns stay).
    assert auditschema.FIELDS == auditschema.HASHED[2] == (*PRE_VERSION_FIELDS, "protocol", "v")
    for older, newer in zip(auditschema.HASHED.values(), list(auditschema.HASHED.values())[1:],
                            strict=False):
        assert set(older) < set(newer), "a version only adds fields"
    rec = {**OLD[0], "seq": 1, "detail": {}}
    assert auditschema.record_hash("0" * 64, rec) == pre_version_hash("0" * 64, rec)
    # The version is inside the hash: the same content in another version hashes apart.
    assert auditschema.record_hash("0" * 64, {**rec, "v": 2}) != \
        auditschema.record_hash("0" * 64, rec)
    with pytest.raises(auditschema.UnknownVersion):
        auditschema.record_hash("0" * 64, {**rec, "v": 99})


def test_the_store_s_columns_are_the_schema_s_fields() -> None:
    columns = [c.name for c in AuditRecord.__table__.columns]
    assert set(columns) == {*auditschema.FIELDS, "prev_hash", "hash"}


def test_the_operations_guide_lists_every_field() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    assert all(f"| `{name}` |" in doc for name in auditschema.FIELDS)


def test_line_pieces_are_checked_against_the_schema() -> None:
    assert auditschema.line_prefix(kind="statement", user="a") == \
        b'{"v":%d,"kind":"statement","user":"a",' % auditschema.VERSION
    assert auditschema.key("rows") == b'"rows":'
    assert auditschema.fragment(outcome="ok", n=3) == b'"outcome":"ok","n":3'
    for bad in (lambda: auditschema.key("text"), lambda: auditschema.line_prefix(txt="x"),
                lambda: auditschema.fragment(statment="x")):
        with pytest.raises(KeyError):
            bad()
    line = orjson.loads(auditschema.line_prefix(kind="statement") + b'"rows":true,"x":1}')
    assert auditschema.check_line(line) == ["rows: bool True is not int or NoneType",
                                            "x: not a field of audit schema version 2"]


def test_a_line_of_a_newer_version_keeps_what_this_one_does_not_know() -> None:
    rec = {"v": 9, "kind": "statement", "statement": "x", "colour": "red", "detail": {"a": 1}}
    up = auditschema.upgrade(rec)
    assert up["v"] == auditschema.VERSION and up["statement"] == "x" and "colour" not in up
    assert up["detail"] == {"a": 1, "written_in_version": 9, "fields_unknown": {"colour": "red"}}
    old = {"kind": "statement"}
    assert auditschema.upgrade(old) is old


# ---------------------------------------------------------------- mixed trails

def test_a_trail_written_before_versions_verifies_and_goes_on_in_the_current_one(
        store: Store) -> None:
    audit = mixed_trail(store)
    r = audit.verify()
    assert r.ok, r.problems
    assert (r.count, r.head_seq, r.versions) == (7, 7, {1: 5, 2: 2})
    assert r.to_json()["versions"] == {"1": 5, "2": 2}
    recs = list(audit.iter_records())
    assert [(x["v"], x["protocol"]) for x in recs] == [(1, None)] * 5 + [(2, "postgres"),
                                                                          (2, None)]
    assert recs[1]["detail"] == {"params": ["1"]} and recs[0]["detail"] == {}


def test_an_export_of_a_mixed_trail_verifies_on_its_own(store: Store) -> None:
    """Everything needed to check an export is in it: each record's version names the
    fields its hash covers."""
    audit = mixed_trail(store)
    out = io.StringIO()
    assert audit.export(out) == 7
    prev = auditschema.GENESIS
    for line in out.getvalue().splitlines():
        rec = json.loads(line)
        assert rec["prev_hash"] == prev
        assert auditschema.record_hash(prev, rec) == rec["hash"]
        prev = rec["hash"]
    out = io.StringIO()
    audit.export(out, "csv")
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(rows[0]) == [*auditschema.FIELDS, "prev_hash", "hash"]
    assert [(row["v"], row["protocol"]) for row in rows][4:6] == [("1", ""), ("2", "postgres")]


def test_records_are_stored_as_they_were_hashed_whatever_they_hold(store: Store) -> None:
    """The PostgreSQL store takes records with COPY (text format), SQLite with inserts:
    text that COPY escapes (tabs, newlines, backslashes, \\N), quotes, other scripts,
    empty and missing fields and nested details come back as they went in, and verify."""
    store.upgrade()
    audit = AuditLog(store)
    tricky = ["SELECT 'a\tb'\nFROM t -- \\ \\N", "\\N", "", "Ünïcödé ✓ 漢字 'q' \"dq\"",
              "line\r\nbreak", "x" * 20_000]
    records = [{"kind": "statement", "user": "alice", "connection": "c", "session_id": "s",
                "statement": sql, "classification": "read", "action": "allow",
                "outcome": "ok", "rows": i, "duration_ms": 0.5, "protocol": "postgres",
                "detail": {"params": [sql, None, 1.5], "nested": {"k\tv": [sql]}},
                "v": auditschema.VERSION} for i, sql in enumerate(tricky)]
    records.append({"kind": "connect", "user": None, "detail": {}, "v": auditschema.VERSION})
    audit.append(records)
    assert audit.verify().ok
    out = io.StringIO()
    audit.export(out)
    back = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["statement"] for r in back] == [*tricky, None]
    assert [r["detail"] for r in back] == [r["detail"] for r in records]
    assert back[-1]["user"] is None and back[0]["rows"] == 0


@pytest.mark.parametrize("tamper, expect", [
    # a record written before versions, and one written in the current version
    ("UPDATE audit_records SET statement = 'SELECT 42' WHERE seq = 2", "record 2: content"),
    ("UPDATE audit_records SET rows = 9 WHERE seq = 6", "record 6: content"),
    ("UPDATE audit_records SET protocol = 'ssh' WHERE seq = 6", "record 6: content"),
    # a field its version does not have, set on an old record, is outside its hash
    ("UPDATE audit_records SET protocol = 'ssh' WHERE seq = 3",
     "record 3: holds protocol, which version 1 records do not have"),
    # moving a record to another version
    ("UPDATE audit_records SET v = 2 WHERE seq = 1", "record 1: content"),
    ("UPDATE audit_records SET v = 1 WHERE seq = 7", "record 7: content"),
    ("UPDATE audit_records SET v = 99 WHERE seq = 7", "record 7: written in audit schema "
     "version 99, which this Keyturn does not know"),
    # deleting across the boundary between the versions
    ("DELETE FROM audit_records WHERE seq = 5", "record 5 missing"),
    ("DELETE FROM audit_records WHERE seq = 7", "records at the end were removed"),
])
def test_tampering_is_found_in_records_of_either_version(store: Store, tamper: str,
                                                         expect: str) -> None:
    audit = mixed_trail(store)
    with store.engine.begin() as c:
        c.execute(text(tamper))
    r = audit.verify()
    assert not r.ok
    assert any(expect in p for p in r.problems), r.problems


def test_spool_lines_from_before_versions_are_stored_in_the_current_one(
        sqlite_store: Store, tmp_path: Path) -> None:
    """A gateway upgraded with spool files still to ingest: their lines (no ``v``, no
    ``protocol``) are chained as current-version records; intents still pair with their
    outcomes by ``n``."""
    audit = mixed_trail(sqlite_store)
    d = tmp_path / "spool"
    d.mkdir()
    old_lines = [
        {"kind": "intent", "user": "alice", "connection": "shop", "session_id": "s9",
         "statement": "DELETE FROM t", "action": "allow", "at": 3000.0, "n": 2},
        {"kind": "statement", "user": "alice", "connection": "shop", "session_id": "s9",
         "statement": "DELETE FROM t", "action": "allow", "at": 3000.5, "outcome": "ok",
         "rows": 2, "n": 2},
    ]
    (d / "gw-1700000000000000-1.jsonl").write_bytes(
        b"".join(orjson.dumps(x) + b"\n" for x in old_lines))
    spool = AuditSpool(d, "gw")
    spool.record(kind="connect", user="bob", connection="shop", protocol="postgres")
    spool.close()
    assert AuditIngester(audit, d).run_once() == 2
    r = audit.verify()
    assert r.ok and r.versions == {1: 5, 2: 4}, r
    tail = list(audit.iter_records())[-2:]
    assert [(x["kind"], x["v"], x["protocol"], x["rows"]) for x in tail] == [
        ("statement", 2, None, 2), ("connect", 2, "postgres", None)]


def test_what_the_spool_writes_itself_is_a_line_of_the_schema(tmp_path: Path) -> None:
    from keyturn.auditspool import WriteFailure

    spool = AuditSpool(tmp_path, "gw")
    spool.record(kind="connect", user="bob", connection="shop", protocol="postgres",
                 session_id="s1", client_addr="10.0.0.2", outcome="ok")
    spool.close()
    lines = [orjson.loads(x) for x in spool.path.read_bytes().splitlines()[:-1]]
    lines.append(orjson.loads(WriteFailure("disk full", dropped=3).gap_record()))
    assert [auditschema.check_line(x) for x in lines] == [[], []]

