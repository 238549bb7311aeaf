"""The tamper-evident audit trail: append, verify and export on the store.

Every record carries ``prev_hash`` and ``hash = sha256(prev_hash || canonical
JSON of the record)``; ``seq`` is dense and ``audit_head`` holds the newest
seq and hash. ``verify`` therefore detects an edited record (hash mismatch),
a deleted one (seq gap / broken link / head mismatch) and reordering (broken
links). What a record holds, and which of its fields the hash covers in each
schema version, is defined once in ``keyturn.auditschema``: new records are
written in the current version, and each record is verified by its own
version's field list, so trails that mix versions verify.

The gateway must not spend its event loop on the database: it appends
records to a local spool that another process ingests (auditspool.py).

This module must not import protocol or web code, nor spell out the record's
fields itself (they come from ``keyturn.auditschema``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import operator
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from sqlalchemy import select

from keyturn.auditschema import (
    ABSENT,
    FIELDS,
    GENESIS,
    VERSION,
    UnknownVersion,
    record_hash,
    upgrade,
    version_of,
)
from keyturn.models import AuditHead, AuditRecord, AuditSpoolCursor
from keyturn.recording import Recorder
from keyturn.store import Store

log = logging.getLogger(__name__)

__all__ = ["FIELDS", "GENESIS", "AuditLog", "Chained", "VerifyResult", "chain", "record_hash"]

_CANONICAL = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
# A record of the current version with every field empty, which ``chain`` copies and
# fills: much cheaper than looking each field up. In sorted order, which orjson sorts
# fastest for the hash's canonical JSON.
_EMPTY = dict.fromkeys(sorted(FIELDS))


# Column order of the raw insert below (the table's columns, hash last).
_INSERT_COLUMNS = (*FIELDS, "prev_hash", "hash")
_insert_row = operator.itemgetter(*_INSERT_COLUMNS)  # a record's insert parameters, in order


def _copy_sql() -> str:
    cols = ", ".join(f'"{c}"' for c in _INSERT_COLUMNS)
    return f"COPY audit_records ({cols}) FROM STDIN"


_COPY_SQL = _copy_sql()


def _insert_sql(dialect: str) -> str:
    mark = "?" if dialect == "sqlite" else "%s"
    values = [f"CAST({mark} AS JSON)" if c == "detail" and dialect != "sqlite" else mark
              for c in _INSERT_COLUMNS]
    cols = ", ".join(f'"{c}"' for c in _INSERT_COLUMNS)
    return f"INSERT INTO audit_records ({cols}) VALUES ({', '.join(values)})"


def _row_dict(r: AuditRecord) -> dict[str, Any]:
    d = {k: getattr(r, k) for k in FIELDS}
    d["detail"] = d["detail"] or {}
    return d


def _content_problem(r: AuditRecord) -> str | None:
    """Why a stored record's content is not what was hashed, or None. Each record is
    hashed by its own version's field list; fields its version does not have are
    outside that hash, so they must be empty."""
    rec = _row_dict(r)
    v = version_of(rec)
    try:
        if record_hash(r.prev_hash, rec) != r.hash:
            return "content does not match its hash (edited)"
    except UnknownVersion:
        return (f"written in audit schema version {v}, which this Keyturn does not know: "
                "its content cannot be checked (a newer Keyturn can)")
    extra = [f for f in ABSENT[v] if rec[f] is not None]
    if extra:
        return (f"holds {', '.join(extra)}, which version {v} records do not have (edited)")
    return None


def _current(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` as a record of the current version: a line without a version (written
    before versions existed, or a direct append) or of another version, or one with keys
    that are not fields (dropped: tests hold every writer to the schema)."""
    up = upgrade(raw)
    rec = {k: up.get(k) for k in _EMPTY}
    rec["v"] = VERSION  # new records are always hashed in the current version
    return rec


@dataclass
class Chained:
    """A batch of records hashed onto the chain head ``after`` = (seq, hash)."""

    after: tuple[int, str]
    rows: list[tuple[Any, ...]]
    seq: int
    hash: str


def chain(records: list[dict[str, Any]], seq: int, prev: str) -> Chained:
    """Number and hash ``records`` onto the head (seq, prev): insert-ready rows."""
    after = (seq, prev)
    rows = []
    dumps, sha256, now, version = orjson.dumps, hashlib.sha256, time.time(), VERSION
    empty, nfields = _EMPTY, len(_EMPTY)
    for raw in records:
        rec = empty.copy()
        rec.update(raw)
        rec.pop("n", None)  # spool-only: pairs an intent with its outcome
        if rec["v"] != version or len(rec) != nfields:
            rec = _current(raw)
        detail = rec["detail"] = rec["detail"] or {}
        at = rec["at"]
        rec["at"] = float(at) if at is not None else now
        seq += 1
        rec["seq"] = seq
        # record_hash(), inlined: rec holds exactly the current version's FIELDS here.
        h = sha256(prev.encode() + dumps(rec, default=str, option=_CANONICAL)).hexdigest()
        rec["detail"] = dumps(detail, default=str, option=orjson.OPT_NON_STR_KEYS).decode() \
            if detail else "{}"
        rec["prev_hash"], rec["hash"] = prev, h
        rows.append(_insert_row(rec))
        prev = h
    return Chained(after, rows, seq, prev)


@dataclass
class VerifyResult:
    ok: bool
    count: int
    head_seq: int
    head_hash: str
    problems: list[str] = field(default_factory=list)
    versions: dict[int, int] = field(default_factory=dict)  # records per schema version
    recordings: int | None = None  # recording records checked (None: not checked)
    recording_problems: list[str] = field(default_factory=list)

    @property
    def chain_ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "count": self.count, "head_seq": self.head_seq,
                "head_hash": self.head_hash, "problems": self.problems,
                "versions": {str(v): n for v, n in sorted(self.versions.items())},
                "recordings": self.recordings,
                "recording_problems": self.recording_problems}


class AuditLog:
    """Synchronous append / verify / export on the store."""

    def __init__(self, store: Store):
        self.store = store

    def append(self, records: list[dict[str, Any]],
               cursor: tuple[str, int] | None = None, *,
               prepared: Chained | None = None, pending: str | None = None,
               carry: tuple[str, str] | None = None) -> None:
        """Chain and insert a batch in one transaction (Core executemany: the ORM
        costs ~100 µs a row). ``cursor`` = (spool file, offset) is stored in the
        same transaction by the spool ingester, with ``pending`` (intent records still
        waiting for their outcome, JSON); ``carry`` = (next spool file, pending JSON)
        hands them on to the file the writer went on in. ``prepared`` is the batch already
        chained onto the head read earlier (``chain``): used when the head is still
        that one, so the hashing can happen before the store is locked."""
        if not records and cursor is None:
            return
        with self.store.write() as s:
            head = s.scalars(select(AuditHead).where(AuditHead.id == 1).with_for_update()).one()
            if prepared is None or prepared.after != (head.seq, head.hash):
                prepared = chain(records, head.seq, head.hash)
            if prepared.rows:
                conn = s.connection()
                if conn.dialect.name == "postgresql":
                    # COPY in the same transaction: a quarter of executemany's client
                    # CPU per row (docs/benchmarks.md, "Audit ingester alone").
                    raw = conn.connection.driver_connection
                    assert raw is not None
                    with raw.cursor() as cur, cur.copy(_COPY_SQL) as copy:
                        for values in prepared.rows:
                            copy.write_row(values)
                else:
                    # A driver-level executemany: SQLAlchemy's per-row parameter
                    # processing costs more than the hashing and the insert together.
                    conn.exec_driver_sql(_insert_sql(conn.dialect.name), prepared.rows)
                head.seq, head.hash = prepared.seq, prepared.hash
            if cursor is not None:
                row = s.get(AuditSpoolCursor, cursor[0])
                if row is None:
                    s.add(AuditSpoolCursor(source=cursor[0], offset=cursor[1],
                                           pending=pending))
                else:
                    row.offset, row.pending = cursor[1], pending
            if carry is not None:
                row = s.get(AuditSpoolCursor, carry[0])
                if row is None:
                    s.add(AuditSpoolCursor(source=carry[0], offset=0, pending=carry[1]))
                else:
                    merged = {**json.loads(row.pending or "{}"), **json.loads(carry[1])}
                    row.pending = json.dumps(merged)

    def head(self) -> tuple[int, str]:
        """The chain's head (seq, hash) as of now, without locking it."""
        with self.store.session() as s:
            head = s.get(AuditHead, 1)
            return (head.seq, head.hash) if head is not None else (0, GENESIS)

    def forget_cursor(self, source: str) -> None:
        with self.store.write() as s:
            row = s.get(AuditSpoolCursor, source)
            if row is not None:
                s.delete(row)

    def verify(self, recordings: Recorder | None = None) -> VerifyResult:
        """Walk the chain; with ``recordings`` (the recordings directory) also check that
        every recording a ``recording`` record names is there and has its SHA-256."""
        problems: list[str] = []
        versions: Counter[int] = Counter()
        prev, expected_seq, count = GENESIS, 1, 0
        with self.store.session() as s:
            head = s.get(AuditHead, 1)
            for r in s.scalars(select(AuditRecord).order_by(AuditRecord.seq)
                               .execution_options(yield_per=2000)):
                count += 1
                if r.seq != expected_seq:
                    problems.append(f"record {expected_seq}"
                                    + (f"..{r.seq - 1}" if r.seq - 1 > expected_seq else "")
                                    + " missing (deleted?)")
                if r.prev_hash != prev:
                    problems.append(f"record {r.seq}: link to previous record broken "
                                    "(deleted or reordered records)")
                problem = _content_problem(r)
                if problem:
                    problems.append(f"record {r.seq}: {problem}")
                versions[r.v or 1] += 1
                prev, expected_seq = r.hash, r.seq + 1
                if len(problems) > 100:
                    problems.append("too many problems; stopped")
                    break
            head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
            if not problems and (head_seq != expected_seq - 1 or head_hash != prev):
                problems.append(f"chain ends at record {expected_seq - 1} but the head says "
                                f"{head_seq}: records at the end were removed or the head edited")
        result = VerifyResult(not problems, count, head_seq, head_hash, problems,
                              dict(versions))
        if recordings is not None:
            result.recordings, result.recording_problems = self.verify_recordings(recordings)
            result.ok = result.ok and not result.recording_problems
        return result

    def verify_recordings(self, recordings: Recorder) -> tuple[int, list[str]]:
        """(recording records checked, what is wrong with their files)."""
        problems: list[str] = []
        count = 0
        for rec in self.iter_records(kind="recording"):
            count += 1
            ref = rec["detail"]
            if not isinstance(ref.get("path"), str) or not isinstance(ref.get("sha256"), str):
                problems.append(f"record {rec['seq']}: a recording record without a path "
                                "and a SHA-256")
                continue
            try:
                problem = recordings.verify_file(ref)
            except ValueError as exc:
                problem = str(exc)
            if problem:
                problems.append(f"record {rec['seq']}: the recording of session "
                                f"{rec['session_id']} ({ref['path']}): {problem}")
        return count, problems

    def iter_records(self, since: float | None = None, until: float | None = None,
                     **filters: Any) -> Iterator[dict[str, Any]]:
        with self.store.session() as s:
            q = select(AuditRecord).order_by(AuditRecord.seq)
            if since is not None:
                q = q.where(AuditRecord.at >= since)
            if until is not None:
                q = q.where(AuditRecord.at < until)
            for key, value in filters.items():
                if value not in (None, ""):
                    q = q.where(getattr(AuditRecord, key) == value)
            for r in s.scalars(q.execution_options(yield_per=2000)):
                d = _row_dict(r)
                d["prev_hash"], d["hash"] = r.prev_hash, r.hash
                yield d

    def export(self, out: IO[str], fmt: str = "jsonl", since: float | None = None,
               until: float | None = None) -> int:
        """Stream records to ``out``; returns how many were written."""
        n = 0
        cols = (*FIELDS, "prev_hash", "hash")
        writer = csv.DictWriter(out, fieldnames=cols) if fmt == "csv" else None
        if writer:
            writer.writeheader()
        for rec in self.iter_records(since, until):
            if writer:
                rec = dict(rec, detail=json.dumps(rec["detail"], sort_keys=True))
                writer.writerow(rec)
            else:
                out.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
            n += 1
        return n
