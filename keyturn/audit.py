"""The tamper-evident audit trail.

Every record carries ``prev_hash`` and ``hash = sha256(prev_hash || canonical
JSON of the record)``; ``seq`` is dense and ``audit_head`` holds the newest
seq and hash. ``verify`` therefore detects an edited record (hash mismatch),
a deleted one (seq gap / broken link / head mismatch) and reordering (broken
links).

The gateway must not wait for the database per statement: ``AuditWriter``
queues records in memory and a background thread appends them in batches,
one transaction per batch. ``close()`` (called on SIGTERM / shutdown) drains
the queue so nothing is lost.

This module must not import protocol or web code.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from sqlalchemy import select

from keyturn.models import AuditHead, AuditRecord
from keyturn.store import Store

log = logging.getLogger(__name__)

GENESIS = "0" * 64
FIELDS = ("seq", "at", "kind", "user", "connection", "session_id", "client_addr", "statement",
          "classification", "action", "rule", "reason", "ticket_id", "outcome", "duration_ms",
          "rows", "detail")
_RECORD_KEYS = set(FIELDS) - {"seq"}


def record_hash(prev_hash: str, rec: dict[str, Any]) -> str:
    body = json.dumps({k: rec.get(k) for k in FIELDS}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=str)
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def _row_dict(r: AuditRecord) -> dict[str, Any]:
    d = {k: getattr(r, k) for k in FIELDS}
    d["detail"] = d["detail"] or {}
    return d


@dataclass
class VerifyResult:
    ok: bool
    count: int
    head_seq: int
    head_hash: str
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "count": self.count, "head_seq": self.head_seq,
                "head_hash": self.head_hash, "problems": self.problems}


class AuditLog:
    """Synchronous append / verify / export on the store."""

    def __init__(self, store: Store):
        self.store = store

    def append(self, records: list[dict[str, Any]]) -> None:
        """Chain and insert a batch in one transaction (Core executemany: the ORM
        costs ~100 µs a row, which the gateway's audit volume cannot afford)."""
        if not records:
            return
        table = AuditRecord.__table__
        with self.store.session() as s, s.begin():
            head = s.scalars(select(AuditHead).where(AuditHead.id == 1).with_for_update()).one()
            seq, prev = head.seq, head.hash
            rows = []
            for raw in records:
                rec = {k: raw.get(k) for k in _RECORD_KEYS}
                rec["detail"] = rec["detail"] or {}
                at = rec["at"]
                rec["at"] = float(at) if at is not None else time.time()
                seq += 1
                rec["seq"] = seq
                h = record_hash(prev, rec)
                rec["prev_hash"], rec["hash"] = prev, h
                rows.append(rec)
                prev = h
            s.execute(table.insert(), rows)
            head.seq, head.hash = seq, prev

    def verify(self) -> VerifyResult:
        problems: list[str] = []
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
                if record_hash(r.prev_hash, _row_dict(r)) != r.hash:
                    problems.append(f"record {r.seq}: content does not match its hash (edited)")
                prev, expected_seq = r.hash, r.seq + 1
                if len(problems) > 100:
                    problems.append("too many problems; stopped")
                    break
            head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
            if not problems and (head_seq != expected_seq - 1 or head_hash != prev):
                problems.append(f"chain ends at record {expected_seq - 1} but the head says "
                                f"{head_seq}: records at the end were removed or the head edited")
        return VerifyResult(not problems, count, head_seq, head_hash, problems)

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


class AuditWriter:
    """Batches records off the hot path; a thread writes them to the store.

    ``record()`` costs one deque append. Records are never dropped: a failed
    batch is kept and retried (with the error logged) until it lands or
    ``close()`` gives up after its deadline, in which case the records are
    written as JSON lines to ``spill_path`` so an operator can re-ingest them.
    """

    def __init__(self, log_: AuditLog, *, interval: float = 0.05, batch: int = 2000,
                 spill_path: str | None = None):
        self.log = log_
        self.interval = interval
        self.batch = batch
        self.spill_path = spill_path
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.written = 0

    def start(self) -> AuditWriter:
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        return self

    def record(self, **rec: Any) -> None:
        if "at" not in rec:
            rec["at"] = time.time()
        self._queue.append(rec)

    def pending(self) -> int:
        return len(self._queue)

    def _take(self) -> list[dict[str, Any]]:
        out = []
        q = self._queue
        while q and len(out) < self.batch:
            out.append(q.popleft())
        return out

    def _write(self, batch: list[dict[str, Any]]) -> bool:
        try:
            self.log.append(batch)
        except Exception:
            log.exception("audit batch of %d records failed; will retry", len(batch))
            self._queue.extendleft(reversed(batch))
            return False
        self.written += len(batch)
        return True

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.interval)
            self._wake.clear()
            while self._queue and not self._stop:
                if not self._write(self._take()):
                    time.sleep(0.5)
                    break

    def flush(self, timeout: float = 10.0) -> bool:
        """Write everything queued so far (from the caller's thread)."""
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            if not self._write(self._take()):
                time.sleep(0.2)
        return not self._queue

    def close(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        if not self.flush(timeout):
            self._spill()

    def _spill(self) -> None:
        records = list(self._queue)
        self._queue.clear()
        if not self.spill_path:
            log.error("audit store unreachable; %d records could not be written", len(records))
            return
        with open(self.spill_path, "a", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, default=str) + "\n")
        log.error("audit store unreachable; %d records spilled to %s", len(records),
                  self.spill_path)


def export_string(log_: AuditLog, fmt: str = "jsonl") -> str:
    buf = io.StringIO()
    log_.export(buf, fmt)
    return buf.getvalue()
