"""Session transcripts made from the audit trail, sealed into it with their digest.

Every gateway path that runs a statement writes an audit record (the PostgreSQL
session in Python, its compiled fast path in C), and every record passes through the
audit ingester. So the ingester, not the gateway, writes each session's transcript
(``keyturn.recording``, format ``transcript``): one file per session id under the
recordings directory, opened by the session's ``connect`` record and appended to by each
of its records: a statement as a request line (``d: "i"``: text, class, decision, rule,
ticket, parameters) and a result line (``d: "o"``: outcome, rows, duration, command
tags, SQLSTATE, masked columns); anything else the session did (held, ended, guard lost,
...) as an event line (``d: "e"``). Times (``t``) are seconds from the session's start,
taken from the records, so the same records always make the same bytes.

When the session's ``disconnect`` record is ingested the transcript is sealed and a
``recording`` record (kind ``recording``, its ``detail`` the ``RecordingRef``: path,
format, sha256, bytes, duration, events) goes into the same batch, right after the
disconnect, so the hash chain covers the transcript's digest (``AuditLog.verify`` checks
the files against it).

Crash safety. The store, not the files, is the truth: the records and the spool cursor
commit together, while transcript lines are written around that commit. Each open
transcript has a marker (``.open/<session>.json``: its path, start and the gateway
process that writes its records). When an ingester starts, after a failed commit, or
when another ingester process (an operator's ``keyturn audit verify``) took the spool in
between, every marked transcript is rebuilt from the session's stored records: nothing
is lost and no line is written twice. A marker whose session already has its
``recording`` record (sealed, committed, marker not yet removed) is removed; one whose
session has no stored ``connect`` (that batch never committed) goes with its file.

A session that never gets a ``disconnect`` record (its gateway was killed, or the
machine went down) is sealed when its gateway's last spool file is ingested to its end
with no successor: that gateway process is gone, so nothing more of the session can
come. The recording record then has outcome ``incomplete`` and says why. This happens
at the latest when the ingester next starts, since a dead writer's spool file is
final.

The ingester's cost per record is a dict lookup, one orjson line and a buffered write;
files are flushed once per batch, at most ``max_open`` stay open (least recently used
are suspended and reopened to append).

This module must not import protocol or web code, and must not decide what a record
holds (``keyturn.auditschema``) or how a recording is written (``keyturn.recording``).
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from keyturn.audit import AuditLog
from keyturn.auditschema import VERSION
from keyturn.recording import Recorder, Recording, safe_name

log = logging.getLogger(__name__)

RECORDING_KIND = "recording"
OPEN_DIR = ".open"  # markers of transcripts not sealed yet
OWNER_FILE = ".ingester"  # which ingester process wrote the transcripts last
TRANSCRIPT_BUFFER = 8192  # per open file; many sessions may be open at once
GATEWAY_GONE = ("the gateway stopped before the end of the session was recorded (it was "
                "killed or its machine went down); the transcript ends with its last record")


def writer_of(spool_file: str) -> str:
    """The gateway process a spool file belongs to: ``<name>-<time>-<pid>.jsonl`` ->
    ``<name>-<pid>`` (a process keeps its name and pid across rotations)."""
    stem = spool_file.rsplit(".jsonl", 1)[0]
    name, _, rest = stem.rpartition("-")
    head, _, _stamp = name.rpartition("-")
    return f"{head}-{rest}" if head else stem


def _some(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None and v != {} and v != []}


def write_record(rec_file: Recording, rec: dict[str, Any]) -> None:
    """One audit record of the session as transcript lines (see the module docstring)."""
    kind = rec.get("kind")
    at = rec.get("at")
    at = float(at) if at is not None else rec_file.started
    detail = rec.get("detail") or {}
    ms = rec.get("duration_ms")
    ms = round(float(ms), 3) if ms is not None else None
    if kind == "statement":
        begun = at - float(ms) / 1000 if ms else at
        rec_file.event("i", at=begun, **_some(
            text=rec.get("statement"), cls=rec.get("classification"),
            decision=rec.get("action"), rule=rec.get("rule"), ticket=rec.get("ticket_id"),
            params=detail.get("params")))
        outcome = rec.get("outcome")
        rec_file.event("o", at=at, **_some(
            outcome=outcome, rows=rec.get("rows"), ms=ms, tags=detail.get("tags"),
            error=detail.get("sqlstate"), masked=detail.get("masked"),
            # Why it was refused; an error's reason would only repeat the decision's.
            reason=rec.get("reason") if outcome not in ("ok", "error", None) else None,
            note=detail.get("note")))
    else:
        rec_file.event("e", at=at, **_some(
            kind=kind, text=rec.get("statement"), decision=rec.get("action"),
            outcome=rec.get("outcome"), reason=rec.get("reason"),
            ticket=rec.get("ticket_id"), ms=ms))


@dataclass
class _Open:
    recording: Recording
    writer: str
    connect: dict[str, Any]  # who: user, connection, client_addr, protocol


class Transcripts:
    """The open transcripts of one ingester (see the module docstring)."""

    def __init__(self, recorder: Recorder, audit: AuditLog, *, max_open: int = 128):
        self.recorder = recorder
        self.audit = audit
        self.max_open = max_open
        self.token = secrets.token_hex(8)
        self._active: dict[str, _Open] = {}
        self._lru: OrderedDict[str, Recording] = OrderedDict()  # files held open
        self._touched: set[str] = set()
        self._sealed: list[str] = []  # markers to remove once the batch is committed
        self._loaded = False
        self.markers = recorder.directory / OPEN_DIR

    # ---- the ingester's calls

    def sync(self) -> None:
        """Before ingesting (under the spool's ingest lock): load the open transcripts if
        this process has not, or if another ingester wrote them since it did."""
        owner = self.recorder.directory / OWNER_FILE
        if self._loaded:
            try:
                if owner.read_text() == self.token:
                    return
            except OSError:
                pass
            log.info("another audit ingester ran: reloading open transcripts")
        self.resume()
        owner.parent.mkdir(parents=True, exist_ok=True)
        owner.write_text(self.token)

    def feed(self, records: list[dict[str, Any]], spool_file: str) -> list[dict[str, Any]]:
        """Append ``records`` (about to be chained) to their sessions' transcripts; returns
        the batch with a ``recording`` record after each disconnect that sealed one."""
        active = self._active
        sealed: list[tuple[int, dict[str, Any]]] = []
        writer: str | None = None
        for i, rec in enumerate(records):
            sid = rec.get("session_id")
            if sid is None:
                continue
            entry = active.get(sid)
            kind = rec.get("kind")
            if entry is None:
                if kind == "connect" and rec.get("outcome") is None:
                    if writer is None:
                        writer = writer_of(spool_file)
                    self._start(sid, rec, writer)
                continue
            self._touch(sid, entry.recording)
            write_record(entry.recording, rec)
            if kind == "disconnect":
                sealed.append((i + 1, self._seal(sid, rec.get("at"))))
        if not sealed:
            return records
        out = list(records)
        for shift, (index, event) in enumerate(sealed):
            out.insert(index + shift, event)
        return out

    def writer_ended(self, spool_file: str) -> list[dict[str, Any]]:
        """The gateway process that wrote ``spool_file`` is gone (its last file is
        ingested to the end): seal its sessions that never got a disconnect record."""
        writer = writer_of(spool_file)
        out = []
        for sid in [s for s, e in self._active.items() if e.writer == writer]:
            entry = self._active[sid]
            entry.recording.event("e", kind="gateway-gone", reason=GATEWAY_GONE,
                                  at=entry.recording.last_at or entry.recording.started)
            out.append(self._seal(sid, None, incomplete=True))
        return out

    def committed(self) -> None:
        """The batch is in the store: hand the lines written to the OS, forget the
        markers of transcripts it sealed."""
        for sid in self._touched:
            entry = self._active.get(sid)
            if entry is not None:
                entry.recording.flush()
        self._touched.clear()
        for sid in self._sealed:
            self._marker(sid).unlink(missing_ok=True)
        self._sealed.clear()

    def failed(self) -> None:
        """The batch was not stored: what was written for it is rebuilt at the next
        ``sync``."""
        for entry in self._active.values():
            entry.recording.suspend()
        self._active.clear()
        self._lru.clear()
        self._touched.clear()
        self._sealed.clear()
        self._loaded = False

    def suspend_all(self) -> None:
        for recording in self._lru.values():
            recording.suspend()
        self._lru.clear()

    @property
    def open_sessions(self) -> list[str]:
        return sorted(self._active)

    # ---- inside

    def _marker(self, sid: str) -> Path:
        return self.markers / f"{safe_name(sid)}.json"

    def _start(self, sid: str, connect: dict[str, Any], writer: str, *,
               replace: bool = False) -> _Open:
        detail = connect.get("detail") or {}
        who = _some(protocol=connect.get("protocol"), session_id=sid,
                    user=connect.get("user"), connection=connect.get("connection"),
                    client_addr=connect.get("client_addr"),
                    application=detail.get("application"))
        at = connect.get("at")
        recording = self.recorder.open(sid, "transcript", started=at, replace=replace,
                                       buffering=TRANSCRIPT_BUFFER, **who)
        self.markers.mkdir(parents=True, exist_ok=True)
        self._marker(sid).write_bytes(orjson.dumps(
            {"session_id": sid, "path": recording.relpath, "writer": writer,
             "started": recording.started}))
        entry = self._active[sid] = _Open(recording, writer, who)
        self._touch(sid, recording)
        write_record(recording, connect)
        return entry

    def _touch(self, sid: str, recording: Recording) -> None:
        self._touched.add(sid)
        lru = self._lru
        if sid in lru:
            lru.move_to_end(sid)
            return
        lru[sid] = recording
        if len(lru) > self.max_open:
            _, oldest = lru.popitem(last=False)
            oldest.suspend()

    def _seal(self, sid: str, at: Any, *, incomplete: bool = False) -> dict[str, Any]:
        entry = self._active.pop(sid)
        self._lru.pop(sid, None)
        self._touched.discard(sid)
        ref = entry.recording.close(at=float(at) if at is not None else None)
        self._sealed.append(sid)
        who = entry.connect
        end = entry.recording.started + ref.duration
        return {"v": VERSION, "kind": RECORDING_KIND, "at": end, "user": who.get("user"),
                "connection": who.get("connection"), "session_id": sid,
                "client_addr": who.get("client_addr"), "protocol": who.get("protocol"),
                "outcome": "incomplete" if incomplete else "ok",
                "reason": GATEWAY_GONE if incomplete else None,
                "detail": {**ref.to_json(), "name": Path(ref.path).name}}

    def resume(self) -> None:
        """Rebuild every marked transcript from the store (see the module docstring)."""
        self.suspend_all()
        self._active.clear()
        self._touched.clear()
        self._sealed.clear()
        self._loaded = False
        if not self.markers.is_dir():
            self._loaded = True
            return
        for marker in sorted(self.markers.glob("*.json")):
            try:
                mark = orjson.loads(marker.read_bytes())
                self._rebuild(marker, mark)
            except (OSError, KeyError, TypeError, ValueError):
                # A damaged marker or file must not stop the audit trail; a store that
                # cannot be read does (it raises): nothing can be ingested then anyway.
                log.exception("transcripts: cannot resume %s; left for the next start",
                              marker)
        self.suspend_all()  # reopened on their next record
        self._loaded = True

    def _rebuild(self, marker: Path, mark: dict[str, Any]) -> None:
        sid = str(mark["session_id"])
        records = list(self.audit.iter_records(session_id=sid))
        if any(r["kind"] == RECORDING_KIND for r in records):
            marker.unlink(missing_ok=True)  # sealed and committed already
            return
        start = next((i for i, r in enumerate(records)
                      if r["kind"] == "connect" and r.get("outcome") is None), None)
        if start is None:  # its connect never reached the store: made again when it does
            try:
                self.recorder.path({"path": mark["path"]}).unlink(missing_ok=True)
            except ValueError:
                log.error("transcripts: marker %s names a path outside the directory", marker)
            marker.unlink(missing_ok=True)
            return
        entry = self._start(sid, records[start], str(mark.get("writer") or ""),
                            replace=True)
        for rec in records[start + 1:]:
            write_record(entry.recording, rec)
        entry.recording.flush()
        self._touched.discard(sid)


def transcript_of(recorder: Recorder, session_id: str) -> Path | None:
    """The file of a session's transcript that is not sealed yet, if there is one."""
    marker = recorder.directory / OPEN_DIR / f"{safe_name(session_id)}.json"
    try:
        return recorder.path(orjson.loads(marker.read_bytes()))
    except (OSError, ValueError, KeyError, orjson.JSONDecodeError):
        return None


def read_transcript(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A transcript's header and events (a torn last line, from a writer that died, is
    left out)."""
    header: dict[str, Any] = {}
    events: list[dict[str, Any]] = []
    with open(path, "rb") as fh:
        for n, line in enumerate(fh):
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if n == 0:
                header = item
            elif isinstance(item, dict):
                events.append(item)
    return header, events


__all__ = ["RECORDING_KIND", "Transcripts", "read_transcript", "transcript_of",
           "write_record", "writer_of"]
