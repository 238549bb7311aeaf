"""The audit spool: an append-only local log, ingested into the store elsewhere.

The gateway records every statement. Chaining and inserting a record costs
tens of microseconds of Python, which on the gateway's event loop would cost
throughput, so the gateway only appends one JSON line per record to a local
spool file (``AuditSpool``, a few microseconds). A separate, lower-priority
process (``keyturn audit ingest``, started by the gateway) reads the spool,
hash-chains the records and inserts them in batches (``AuditIngester``).
It runs under SCHED_IDLE while its backlog is small, so on a busy machine
traffic comes first and ingestion catches up in idle time, with a bounded
backlog (``IngestPriority``).

Nothing is lost on the way:

* records wait in memory (``LineBuffer``, or the gateway's compiled twin)
  until a flusher thread writes them to the spool file, every 100 ms and at
  close; files are fsynced when closed. A gateway crash (kill -9) loses at
  most the last 100 ms of records, an OS crash what the OS had not written;
* the ingester stores its read offset per spool file in the same transaction
  as the records (table ``audit_spool``), so a crash never duplicates or
  skips a record;
* a spool file's writer holds an exclusive lock (flock) on it while it may
  append. A file whose lock the ingester can take is final (its writer closed
  it, or died: the kernel drops the lock with the process, even after kill -9);
  once ingested to its end it is deleted, so neither a clean stop nor a crash
  leaves files behind. A file that still has records past the stored offset
  is never deleted; a dead writer's torn last line is kept as an "unreadable"
  record. Files closed cleanly also end with an end marker.

Each line is one record in the layout of ``keyturn.auditschema`` (with its
version in ``v``), plus ``n`` on write-ahead records: an intent record (``kind:
intent``) and the record that completes it share ``session_id`` and ``n``.

Given a recordings directory, the ingester also writes each session's transcript from
its records and seals it into the chain with a ``recording`` record when the session
ends (``keyturn.transcripts``), so every path that writes records, the compiled fast
path included, is in the transcript.

This module must not import protocol or web code, nor decide what a record
holds (``keyturn.auditschema`` does).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select

from keyturn.audit import AuditLog, chain
from keyturn.auditschema import VERSION
from keyturn.models import AuditSpoolCursor
from keyturn.recording import Recorder
from keyturn.transcripts import Transcripts

log = logging.getLogger(__name__)

EOF_MARK = '{"_eof":true}\n'
NEW_SUFFIX = ".new"  # a spool file being created (see AuditSpool._new_file)
# A ``.new`` file this old was left by a writer that died while creating it.
STALE_NEW_FILE = 60.0
_EOF_BYTES = EOF_MARK.encode()
_EOF_START = b'{"_eof":true'  # the end marker; after a rotation it names the next file
ROTATE_BYTES = 64 * 1024 * 1024
_OPTS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


# Set by the gateway for its ingester child: the gateway's pid (see ``orphaned``).
PARENT_ENV = "KEYTURN_INGEST_PARENT"

# Bytes of records waiting in memory while the spool cannot be written before the gateway
# refuses new statements (AuditSpool.accepting); twice this is the most ever held.
MAX_PENDING = 64 << 20
PENDING_LIMIT = 1 << 20  # bytes of lines pending before a writer flushes them itself


class AuditUnwritable(Exception):
    """The write-ahead records of statements could not be written: they must not be sent
    (``AuditSpool.flush_ahead``). The message is the refusal the client gets."""


class LineBuffer:
    """The spool's pending lines: ``append`` from any thread, ``take`` by the flusher.

    The gateway uses the compiled twin, ``proxies.postgres._speedups.AuditBuffer``, which
    its fast path appends to without a Python call; this one serves everywhere else. When
    more than ``limit`` bytes are pending, ``append`` calls ``on_full`` (the spool writes
    them out at once), so a stalled flusher cannot grow memory without bound."""

    def __init__(self, limit: int = PENDING_LIMIT, on_full: Callable[[], None] | None = None):
        self.limit = limit
        self.on_full = on_full
        self.lines = 0
        self._parts: list[bytes] = []
        self._size = 0
        self._lock = threading.Lock()
        self._flushing = False

    def append(self, line: bytes) -> None:
        if not isinstance(line, bytes):  # refused here, not when take() joins them
            raise TypeError("line must be bytes")
        with self._lock:
            self._parts.append(line)
            self._size += len(line)
            self.lines += 1
            full = self._size > self.limit and self.on_full is not None and \
                not self._flushing
            if full:
                self._flushing = True
        if full and self.on_full is not None:
            try:
                self.on_full()
            finally:
                self._flushing = False

    def take(self) -> bytes:
        with self._lock:
            parts, self._parts, self._size = self._parts, [], 0
        return b"".join(parts)

    @property
    def size(self) -> int:
        return self._size


@dataclass
class WriteFailure:
    """One episode of spool writes failing, from the first failure to recovery."""

    error: str
    since: float = field(default_factory=time.monotonic)
    dropped: int = 0  # lines dropped since the last gap record was queued
    dropped_total: int = 0

    def gap_record(self) -> bytes:
        """The record that stands for the lines dropped in this episode."""
        return orjson.dumps({"v": VERSION, "kind": "audit-dropped", "at": time.time(),
                             "outcome": "lost",
                             "reason": f"the audit spool could not be written: {self.error}",
                             "detail": {"records": self.dropped}}, option=_OPTS)


def _try_lock(fh: Any) -> bool:
    """Take the spool file's writer lock if nobody holds it (kept until ``fh`` closes)."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class AuditSpool:
    """Gateway side: append records to ``<dir>/<name>-<time>-<pid>.jsonl``.

    ``write_line`` only adds the line to a buffer in memory (``LineBuffer`` or the
    ``buffer`` factory given, with the same interface); a flusher thread writes the
    buffer to the file every ``flush_interval`` seconds, in order, and rotates files.

    When the file cannot be written (a full disk, an I/O error, a size limit) the lines
    wait in memory and the flusher retries. Past ``max_pending`` bytes waiting, the spool
    stops ``accepting``: the gateway refuses new statements with ``refusal`` rather than
    run them unaudited. Past twice that, the newest lines are dropped, counted, and an
    ``audit-dropped`` record saying how many takes their place in the file, so memory
    stays bounded whatever the clients do. Each episode is logged when it starts, when
    the spool starts refusing and when it recovers, never per record."""

    def __init__(self, directory: str | os.PathLike[str], name: str = "gateway",
                 *, flush_interval: float = 0.1,
                 buffer: Callable[..., Any] | None = None,
                 max_pending: int = MAX_PENDING):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self._lock = threading.Lock()  # the file: flushes, rotation, close
        self._unwritten = b""  # taken from the buffer, not yet written (a full disk)
        self._closed = False
        self._last_error = -60.0
        self._failure: WriteFailure | None = None  # the current episode, if any
        self.accepting = True
        """False while records cannot be written and more than ``max_pending`` bytes of
        them wait in memory: new statements must be refused (``refusal`` says why)."""
        self._watchers: list[Callable[[bool], None]] = []
        self._buf = (buffer or LineBuffer)(limit=min(PENDING_LIMIT, max_pending),
                                           on_full=self._on_full)
        self.write_line: Callable[[bytes], None] = self._buf.append
        """Append one record already serialised as a JSON line (the gateway's hot path
        joins a per-session prefix to the per-statement fields)."""
        self._open()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flusher, name="audit-spool", daemon=True)
        self._thread.start()

    def watch(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(accepting)`` whenever ``accepting`` changes. It runs on the
        thread that noticed (the flusher, or one appending) with the spool's file lock
        held: it must only hand the news on (``loop.call_soon_threadsafe``), e.g. to
        disarm fast paths that append without asking."""
        self._watchers.append(callback)

    def _set_accepting(self, accepting: bool) -> None:
        self.accepting = accepting
        for callback in self._watchers:
            try:
                callback(accepting)
            except Exception:
                log.exception("audit spool: a watcher of its state failed")

    @property
    def refusal(self) -> str | None:
        """The error a refused statement gets while the spool is not accepting."""
        failure = self._failure
        if self.accepting or failure is None:
            return None
        return (f"keyturn: the audit trail cannot be written ({failure.error}); new "
                "statements are refused until it can")

    @property
    def pending_bytes(self) -> int:
        """Bytes of records in memory, not yet in the spool file."""
        return len(self._unwritten) + int(self._buf.size)

    @property
    def records(self) -> int:
        """Records appended by this process."""
        return int(self._buf.lines)

    def _open(self) -> None:
        self.path, self._fh = self._new_file()
        self._size = 0

    def _new_file(self) -> tuple[Path, Any]:
        """Open a new spool file, locked: the ingester takes a file whose lock it can get
        as finished (its writer closed it or died) and removes it once ingested. The
        file is created and locked under a name the ingester ignores, then renamed, so
        it is never seen unlocked."""
        stamp = f"{time.time():.6f}".replace(".", "")
        path = self.dir / f"{self.name}-{stamp}-{os.getpid()}.jsonl"
        fresh = path.with_name(path.name + NEW_SUFFIX)
        fh = open(fresh, "ab", buffering=0)  # noqa: SIM115 - kept open
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fresh.rename(path)
        except OSError:
            fh.close()
            fresh.unlink(missing_ok=True)
            raise
        return path, fh

    def record(self, **rec: Any) -> None:
        self.write(rec)

    def write(self, rec: dict[str, Any]) -> None:
        """Append one record (hot path: ~1 µs with orjson), in the current schema
        version unless it says otherwise."""
        if "at" not in rec:
            rec["at"] = time.time()
        if "v" not in rec:
            rec["v"] = VERSION
        self.write_line(orjson.dumps(rec, default=str, option=_OPTS))

    def flush(self) -> None:
        """Write every pending line to the spool file (in order) and hand it to the OS.
        Raises OSError when a write fails; the lines not written are kept, in order,
        for the next flush (within the bounds in the class docstring)."""
        with self._lock:
            if self._closed:
                if self._buf.size:
                    log.error("audit spool %s is closed: %d bytes of records appended after "
                              "close are not written", self.dir, self._buf.size)
                return
            failure = self._failure
            try:
                self._write_unwritten()  # what an earlier flush could not write comes first
                if failure is not None and failure.dropped:
                    # The gap goes where the lines were dropped: after those kept, before
                    # those appended since.
                    self._unwritten, failure.dropped = failure.gap_record(), 0
                    self._write_unwritten()
                self._unwritten = self._buf.take()
                self._write_unwritten()
                if self._size >= ROTATE_BYTES:
                    self._rotate()
            except OSError as exc:
                self._unwritten = self._bounded(self._unwritten, b"", exc)
                raise
            if failure is not None:
                self._recovered(failure)

    def flush_ahead(self) -> None:
        """Write-ahead: hand every pending line to the OS now, before the statements they
        record are sent. When that fails the statements must not be sent: this raises
        AuditUnwritable, and the spool refuses new statements until a write succeeds
        again (the lines wait in memory, bounded, and the flusher retries)."""
        lock = self._lock
        if lock.acquire(False):
            # The common case, cheaply (this runs before every statement sent): nothing
            # waits from before, nothing failed; one write of what was appended.
            try:
                if self._failure is None and not self._unwritten and not self._closed:
                    data = self._buf.take()
                    try:
                        written = self._fh.write(data) if data else 0  # unbuffered
                    except OSError:
                        written = 0  # the full path below retries, and reports it
                    self._size += written
                    if written == len(data) and self._size < ROTATE_BYTES:
                        return
                    self._unwritten = data[written:]  # written first by flush()
            finally:
                lock.release()
        try:
            self.flush()
        except OSError as exc:
            with self._lock:
                if self.accepting:
                    self._set_accepting(False)
            raise AuditUnwritable(self.refusal or "keyturn: the audit trail cannot be "
                                  f"written ({exc.strerror or exc}); the statement was "
                                  "not sent") from exc

    def _write_unwritten(self) -> None:
        """Write ``_unwritten``; on failure it keeps what was not written."""
        data = memoryview(self._unwritten)
        try:
            while data:  # an unbuffered file: each write says how much it took
                n = self._fh.write(data)
                self._size += n
                data = data[n:]
        finally:
            self._unwritten = bytes(data)

    def _on_full(self) -> None:
        """The buffer passed its limit (on the appending thread, e.g. the event loop):
        write it out now; while writes are failing, leave the retries to the flusher
        and only move the lines under the bounds."""
        if self._failure is None:
            try:
                self.flush()
            except OSError:
                pass  # recorded in the failure; the flusher retries
            return
        with self._lock:
            if not self._closed:
                self._unwritten = self._bounded(self._unwritten, self._buf.take(), None)

    def _bounded(self, kept: bytes, new: bytes, exc: OSError | None) -> bytes:
        """The lines to keep in memory after a failed write (``exc``) or while writes
        fail: ``kept`` (older) then ``new``. Over ``max_pending`` bytes the spool refuses
        new statements; over twice that the newest lines are dropped (whole lines,
        counted), and after a drop every new line is, until the spool recovers, so the
        gap is in one place."""
        failure = self._failure
        if failure is None:
            assert exc is not None
            failure = self._failure = WriteFailure(f"{exc.strerror or exc}")
            log.error("audit spool: writing to %s failed (%r); records wait in memory and "
                      "writes are retried; past %d bytes new statements are refused",
                      self.path, exc, self.max_pending)
        cap = 2 * self.max_pending
        data = kept + new if new else kept
        if failure.dropped and new:
            cut = len(kept)
        elif len(data) > cap:
            cut = data.rfind(b"\n", 0, cap) + 1
        else:
            cut = len(data)
        if cut < len(data):
            if not failure.dropped_total:
                log.error("audit spool: %d bytes of records wait in memory: dropping newer "
                          "records until %s can be written again", cut, self.path)
            n = data.count(b"\n", cut)
            failure.dropped += n
            failure.dropped_total += n
            data = data[:cut]
        if self.accepting and len(data) + self._buf.size > self.max_pending:
            self._set_accepting(False)
            log.error("audit spool: %d bytes of records cannot be written: refusing new "
                      "statements until %s can be written", len(data), self.path)
        return data

    def _recovered(self, failure: WriteFailure) -> None:
        self._failure = None
        if not self.accepting:
            self._set_accepting(True)
        log.warning("audit spool: %s is writable again after %.1f s; accepting statements"
                    "%s", self.path, time.monotonic() - failure.since,
                    f" ({failure.dropped_total} records were dropped)"
                    if failure.dropped_total else "")

    def _rotate(self) -> None:
        """Go on in a new file. The new one is opened before the old one gets its end
        marker, so a failure leaves the spool writing where it was."""
        try:
            path, fh = self._new_file()
        except OSError as exc:
            self._failed(f"cannot open a new spool file ({exc}); writing on to {self.path}")
            return
        try:
            fh_old = self._fh
            # The end marker names the file the writer goes on in: statements whose intent
            # is in the old file complete in the new one.
            self._write_all(fh_old, orjson.dumps({"_eof": True, "next": path.name}) + b"\n")
        except OSError:
            fh.close()
            path.unlink(missing_ok=True)
            raise
        self._fh, self.path, self._size = fh, path, 0
        self._sync_close(fh_old)

    @staticmethod
    def _write_all(fh: Any, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[fh.write(view):]

    def _sync_close(self, fh: Any) -> None:
        try:
            os.fsync(fh.fileno())
        except OSError as exc:  # the lines are in the OS's cache and the ingester reads them
            log.error("audit spool: fsync of a finished spool file failed: %s", exc)
        finally:
            fh.close()

    def _failed(self, message: str) -> None:
        """Log a spool failure: the first one, then at most one a minute."""
        now = time.monotonic()
        if now - self._last_error >= 60:
            self._last_error = now
            log.error("audit spool %s: %s", self.dir, message)

    def _flusher(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self.flush()
            except OSError:
                pass  # a full disk: logged once by _bounded; the lines are kept, try again
            except Exception:
                log.exception("audit spool: flushing %s failed", self.path)

    def close(self) -> None:
        """Write everything, end the file with its marker and fsync it. Never raises:
        records that cannot be written (a full disk) are reported in the log."""
        self._stop.set()
        self._thread.join(5)
        try:
            self.flush()
        except OSError as exc:
            failure = self._failure
            log.error("audit spool %s: %d bytes of records could not be written at close%s: "
                      "%s", self.path, len(self._unwritten),
                      f" ({failure.dropped_total} more were dropped before)"
                      if failure and failure.dropped_total else "", exc)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                # After a failed write the marker would follow a torn line; the file is
                # final anyway once closed (its lock goes with it).
                if not self._unwritten:
                    self._write_all(self._fh, _EOF_BYTES)
            except OSError as exc:
                log.error("audit spool %s: cannot write its end marker: %s", self.path, exc)
            self._sync_close(self._fh)


class AuditIngester:
    """Reads spool files in order and appends their records to the chain."""

    def __init__(self, audit: AuditLog, directory: str | os.PathLike[str], *,
                 batch: int = 5000, recordings: str | os.PathLike[str] | None = None):
        """``recordings``: where sessions' transcripts go (``keyturn.transcripts``); every
        ingester of a deployment must be given it, or the transcripts miss what an
        ingester without it took from the spool."""
        self.audit = audit
        self.dir = Path(directory)
        self.batch = batch
        self.transcripts = Transcripts(Recorder(recordings), audit) \
            if recordings is not None else None
        self.ingested = 0
        self.position: tuple[str, int] = ("", 0)  # last (spool file, offset) ingested
        self.priority: IngestPriority | None = None
        self._abort: threading.Event | None = None  # set: stop between batches

    def pending_files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob("*.jsonl"), key=lambda p: p.name.split("-", 1)[-1])

    def _offset(self, source: str) -> int:
        return self._cursor(source)[0]

    def _cursor(self, source: str) -> tuple[int, dict[str, Any]]:
        """How far ``source`` was ingested, and its intent records still waiting."""
        with self.audit.store.session() as s:
            row = s.get(AuditSpoolCursor, source)
            if row is None:
                return 0, {}
            return row.offset, orjson.loads(row.pending) if row.pending else {}

    def resume_position(self) -> None:
        """Start the backlog count where the store left off: after a restart the first
        spool file may be partly ingested already (its offset is in the store)."""
        files = self.pending_files()
        if files:
            self.position = (files[0].name, self._offset(files[0].name))

    def run_once(self) -> int:
        """Ingest everything complete in the spool now; returns records ingested.

        An exclusive lock on the spool directory keeps two ingesters (the
        gateway's child and an operator's ``keyturn audit ingest``) from reading
        the same lines twice.
        """
        if not self.dir.is_dir():
            return 0
        done = 0
        with open(self.dir / ".ingest.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.transcripts is not None:
                self.transcripts.sync()
            self._sweep_new_files()
            for path in self.pending_files():
                if self._abort is not None and self._abort.is_set():
                    break
                done += self._ingest_file(path)
        return done

    def _sweep_new_files(self) -> None:
        """Files a writer died while creating (before its rename): empty, so removed;
        one with content (never written by AuditSpool) is handed to ingestion."""
        for fresh in self.dir.glob("*.jsonl" + NEW_SUFFIX):
            try:
                if time.time() - fresh.stat().st_mtime < STALE_NEW_FILE:
                    continue
                with open(fresh, "rb") as fh:
                    if not _try_lock(fh):
                        continue
                    if fresh.stat().st_size:
                        fresh.rename(fresh.with_name(fresh.name[:-len(NEW_SUFFIX)]))
                    else:
                        fresh.unlink()
            except OSError:
                log.exception("audit spool: cannot clean up %s", fresh)

    def _ingest_file(self, path: Path) -> int:
        source = path.name
        offset, pending = self._cursor(source)
        done = 0
        finished = False
        next_file: str | None = None
        with open(path, "rb") as fh:
            # The writer holds an exclusive lock on its file while it may append to it.
            # Once we hold the lock (ours until this file is closed), nobody writes to the
            # file again: its end is final even without the end marker (a killed gateway).
            writer_gone = _try_lock(fh)
            fh.seek(offset)
            while True:
                records: list[dict[str, Any]] = []
                pos = offset
                at_end = True
                for raw in fh:
                    if not raw.endswith(b"\n") and not writer_gone:
                        at_end = False
                        break  # a partial line: the writer is mid-record
                    pos += len(raw)
                    if raw.startswith(_EOF_START):
                        finished = True
                        try:
                            marker = orjson.loads(raw)
                            next_file = marker.get("next") if isinstance(marker, dict) else None
                        except orjson.JSONDecodeError:
                            pass
                        break
                    try:
                        rec = orjson.loads(raw)
                        if not isinstance(rec, dict):
                            raise orjson.JSONDecodeError("not a record", raw.decode(
                                "utf-8", "replace"), 0)
                        kind = rec.get("kind")
                        if kind == "intent":
                            # Held back until its outcome is read (write-ahead audit).
                            pending[f"{rec.get('session_id')}:{rec.get('n')}"] = rec
                            continue
                        if "n" in rec:
                            pending.pop(f"{rec.get('session_id')}:{rec.get('n')}", None)
                        records.append(rec)
                    except orjson.JSONDecodeError:
                        # Never drop what we cannot read (a dead writer's torn last line
                        # too): keep it, marked, in the chain.
                        records.append({"kind": "unreadable", "detail": {
                            "raw": raw.decode("utf-8", "replace"), "spool": source}})
                    if len(records) >= self.batch:
                        at_end = False
                        break
                finished = finished or (writer_gone and at_end)
                carry: tuple[str, str] | None = None
                if finished and pending:
                    if next_file:
                        # The writer went on in another file: the outcomes are there.
                        carry, pending = (next_file, orjson.dumps(pending).decode()), {}
                    else:
                        # The writer is gone: these statements were sent and their outcome
                        # was never recorded.
                        records.extend(_outcome_unknown(rec) for rec in pending.values())
                        pending = {}
                transcripts = self.transcripts
                if transcripts is not None:
                    if records:
                        records = transcripts.feed(records, source)
                    if finished and next_file is None:
                        # The gateway process that wrote this file is gone and went on
                        # nowhere: its sessions that never got a disconnect end here.
                        records.extend(transcripts.writer_ended(source))
                if records or pos != offset or carry is not None:
                    # Hash the batch onto the head as it is now, still idle-scheduled; the
                    # store re-hashes it in the rare case another writer moved the head.
                    prepared = chain(records, *self.audit.head()) if records else None
                    # Never hold the store's write lock (SQLite) or the chain head's row
                    # lock while idle-scheduled: approvals and audit writes would wait on us.
                    if self.priority is not None:
                        self.priority.boost()
                    try:
                        self.audit.append(records, cursor=(source, pos), prepared=prepared,
                                          pending=orjson.dumps(pending).decode()
                                          if pending else None, carry=carry)
                    except BaseException:
                        if transcripts is not None:
                            transcripts.failed()  # rebuilt from the store next time
                        raise
                    finally:
                        if self.priority is not None:
                            self.priority.unboost()
                    if transcripts is not None:
                        transcripts.committed()
                    done += len(records)
                    offset = pos
                    self.position = (source, pos)
                    fh.seek(offset)
                if finished or len(records) < self.batch:
                    break
                if self._abort is not None and self._abort.is_set():
                    break  # told to stop now: the rest stays in the spool
                if self.priority is not None and self.priority.defer():
                    break  # the machine got busy: the rest waits, durable, in the spool
        if finished:
            # Removed before its cursor is forgotten: a crash in between leaves a stale
            # cursor row, never a file that would be ingested a second time from 0.
            path.unlink(missing_ok=True)
            self.audit.forget_cursor(source)
        self.ingested += done
        return done

    def backlog_bytes(self) -> int:
        """Spool bytes not yet ingested (no store access: for the priority watchdog)."""
        total = 0
        source, offset = self.position
        for path in self.pending_files():
            try:
                size = path.stat().st_size
            except OSError:
                continue
            total += max(0, size - offset) if path.name == source else size
        return total

    def follow(self, stop: threading.Event, interval: float = 0.2, *,
               idle_priority: bool = True, priority: IngestPriority | None = None,
               abort: threading.Event | None = None) -> None:
        """Ingest until ``stop`` is set, then drain what is complete and return.

        With ``idle_priority`` the ingest runs under SCHED_IDLE while the backlog
        is small and waits while the machine is busy (see ``IngestPriority``); it
        drains at normal priority. ``priority`` replaces the default policy (tests).
        ``abort`` cuts the final drain short between batches (a second SIGTERM): the
        rest stays, durable, in the spool for the next start.

        Called on the main thread (``keyturn audit ingest --follow``), the work runs in
        a worker thread, and SIGTERM / SIGINT only append to a list: the main thread,
        which does nothing but wait for the worker, turns the first into ``stop`` and a
        second into ``abort``. A handler that called ``stop.set()`` itself would take
        the Event's lock, and deadlock whenever the signal landed while the main thread
        held that lock (inside ``stop.wait``) or another one the handler needs.
        """
        if threading.current_thread() is not threading.main_thread():
            self._follow(stop, interval, idle_priority, priority, abort)
            return
        abort = abort or threading.Event()
        received: list[int] = []  # list.append takes no lock: safe in a handler
        previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            worker = threading.Thread(
                target=self._follow, args=(stop, interval, idle_priority, priority, abort),
                name="audit-ingest")
            worker.start()
            while worker.is_alive():
                worker.join(0.1)
                if received:
                    stop.set()
                if len(received) > 1 and not abort.is_set():
                    log.info("second stop signal: ending the drain; the rest stays in the "
                             "spool")
                    abort.set()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _follow(self, stop: threading.Event, interval: float, idle_priority: bool,
                priority: IngestPriority | None, abort: threading.Event | None) -> None:
        self.resume_position()
        self._abort = abort
        if priority is None and idle_priority:
            priority = IngestPriority(self)
        if priority:
            priority.start(stop)
            self.priority = priority
        while not stop.is_set():
            if self.orphaned():
                log.info("the gateway that started this ingester is gone: draining and "
                         "stopping")
                break
            try:
                if priority is not None and priority.defer():
                    stop.wait(interval)
                elif self.run_once() == 0:
                    stop.wait(interval)
            except Exception:
                log.exception("audit ingest failed; retrying")
                stop.wait(1.0)
        if priority:
            priority.normal()
            self.priority = None  # the final drain neither waits nor changes priority
        try:
            self.run_once()
        finally:
            self._abort = None
            if self.transcripts is not None:
                self.transcripts.suspend_all()

    @staticmethod
    def orphaned() -> bool:
        """True when the gateway that started this ingester (``PARENT_ENV``) is gone.
        The gateway also asks the kernel to SIGTERM us when it dies (PR_SET_PDEATHSIG);
        this covers a gateway that died before that request took effect."""
        parent = os.environ.get(PARENT_ENV, "")
        return parent.isdigit() and os.getppid() != int(parent)


class IngestPriority:
    """Keep audit ingestion off a busy machine's CPU, with a bounded backlog.

    The ingest thread runs under Linux's SCHED_IDLE policy: it gets CPU only
    when nothing else wants it, so under load the gateway, the target and the
    clients come first and the records wait, durable, in the spool. When the
    backlog passes ``high`` bytes (~750,000 records) a watchdog thread moves the
    ingest back to normal scheduling (at the process's nice level) until the
    backlog is below ``low``, so the store never falls behind by more than a
    bounded amount even under sustained load. Where SCHED_IDLE is unavailable,
    or the process could not leave it again (no privilege), nothing changes.
    """

    def __init__(self, ingester: AuditIngester, *, high: int = 256 << 20, low: int = 16 << 20,
                 interval: float = 1.0, idle_floor: float = 0.25, max_lag: float = 60.0,
                 cpu_sample: Callable[[], tuple[float, float]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.ingester = ingester
        self.high, self.low, self.interval = high, low, interval
        self.idle_floor, self.max_lag = idle_floor, max_lag
        self.tid = 0
        self.idle = False
        self.switches = 0
        self.deferred = 0  # times ingestion waited for a busy machine
        self._boosted = False
        self._cpu_sample = cpu_sample or _cpu_sample
        self._clock = clock
        self._last: tuple[float, float] | None = None
        self._checked = float("-inf")
        self._busy = False
        self._big = False
        self._caught_up = clock()

    @staticmethod
    def supported() -> bool:
        if not hasattr(os, "SCHED_IDLE"):
            return False
        result: list[bool] = []

        def probe() -> None:  # in a throwaway thread: idle and back again
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                result.append(True)
            except OSError:
                result.append(False)

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        return result == [True]

    def start(self, stop: threading.Event) -> None:
        if not self.supported():
            log.info("audit ingest runs at normal priority (SCHED_IDLE not available)")
            return
        self.tid = threading.get_native_id()
        # The watchdog is started first so it keeps normal scheduling.
        threading.Thread(target=self._watch, args=(stop,), name="ingest-priority",
                         daemon=True).start()
        self._set(idle=True)

    def _set(self, *, idle: bool) -> None:
        if not self.tid or idle == self.idle:
            return
        policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
        try:
            os.sched_setscheduler(self.tid, policy, os.sched_param(0))
        except OSError as exc:
            log.warning("cannot change the audit ingest priority: %s", exc)
            return
        self.idle = idle
        self.switches += 1

    def normal(self) -> None:
        self._set(idle=False)

    def boost(self) -> None:
        """Normal scheduling for a moment (while a store transaction is open)."""
        self._boosted = self.idle
        if self._boosted:
            self._set(idle=False)

    def unboost(self) -> None:
        if self._boosted:
            self._boosted = False
            self._set(idle=True)

    def defer(self) -> bool:
        """True while ingesting should wait: the machine is busy (under ``idle_floor``
        of its CPU idle, not counting this process), the backlog is under ``high`` and
        the store caught up with the spool less than ``max_lag`` seconds ago. SCHED_IDLE
        alone still lets the ingester fill every gap between the clients' round trips,
        which costs the gateway context switches and caches; this leaves them alone."""
        now = self._clock()
        if now - self._checked >= 0.5:
            self._checked = now
            sample = self._cpu_sample()
            if self._last is not None and sample[0] > self._last[0]:
                total = sample[0] - self._last[0]
                free = sample[1] - self._last[1]
                self._busy = free / total < self.idle_floor
            self._last = sample
            backlog = self.ingester.backlog_bytes()
            if backlog == 0:
                self._caught_up = now
            self._big = backlog >= self.high
        if not self._busy or self._big or \
                now - self._caught_up >= self.max_lag:
            return False
        self.deferred += 1
        return True

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            backlog = self.ingester.backlog_bytes()
            if self.idle and backlog > self.high:
                log.info("audit spool backlog %d MiB: ingesting at normal priority",
                         backlog >> 20)
                self._set(idle=False)
            elif not self.idle and backlog < self.low:
                self._set(idle=True)


def _cpu_sample() -> tuple[float, float]:
    """(all CPU time, idle CPU time + this process's CPU time) in seconds, machine-wide,
    from /proc/stat; (0, 0) where that is unavailable (never deferring)."""
    try:
        with open("/proc/stat", "rb") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return (0.0, 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    own = os.times()
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    total = sum(fields[:8]) / tick
    return (total, (fields[3] + fields[4]) / tick + own.user + own.system)


def _outcome_unknown(intent: dict[str, Any]) -> dict[str, Any]:
    """The record of a statement whose intent was written (it was sent to the target)
    but whose outcome never was: the gateway stopped or died first."""
    rec = dict(intent, kind="statement", outcome="unknown")
    rec["detail"] = {**(rec.get("detail") or {}),
                     "note": "the gateway stopped before the outcome was known: the "
                             "statement was sent to the target and may have run"}
    return rec


def spool_backlog(directory: str | os.PathLike[str], audit: AuditLog) -> int:
    """Bytes written to the spool but not yet ingested (for status output)."""
    total = 0
    ing = AuditIngester(audit, directory)
    for path in ing.pending_files():
        with audit.store.session() as s:
            row = s.scalars(select(AuditSpoolCursor).where(
                AuditSpoolCursor.source == path.name)).first()
        total += max(0, path.stat().st_size - (row.offset if row else 0))
    return total
