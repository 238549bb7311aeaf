"""Session recordings: one interface for every protocol.

A gateway opens a ``Recording`` for a session, writes what passes (direction ``i``
client to target, ``o`` target to client, or ``r`` a terminal resize), and closes it into
a ``RecordingRef``: where it is, its format, its size and its SHA-256. The reference goes
into the audit trail (an event of kind ``recording``), so the hash chain covers the
recording's digest: a recording that was edited, cut or swapped no longer matches it
(``verify``).

Formats:

- ``asciicast`` (asciicast v2, one JSON header line, then ``[seconds, "o"|"i"|"r",
  data]`` lines): terminals — SSH shells and exec, ``kubectl exec``. Replayed in the
  portal with asciinema-player.
- ``transcript`` (keyturn transcript v1: a JSON header line, then one JSON object per
  event: ``{"t": seconds, "d": "i"|"o", ...fields}``): request/response protocols, for
  example a PostgreSQL session's statements and result summaries.

Writes are buffered (a 64 KiB file buffer unless told otherwise) and the digest is
updated as bytes are written, so closing never re-reads the file. A writer that keeps many
recordings open at once (the audit ingester's transcripts) may ``suspend`` one: its file is
flushed and closed, its digest kept, and the next write reopens it to append. A recording
built from events that happened earlier (a transcript made from audit records) gives each
event's time (``at``) and the recording's start (``started``), so the same events always
make the same bytes. A recording that was never closed (the
process died) is still a valid prefix of its format; ``verify_file`` tells whether a file
still matches its reference.

This module must not import protocol or web code.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

FORMATS = ("asciicast", "transcript")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(name: str) -> str:
    """``name`` as a file name: anything but letters, digits, ``_.-`` becomes ``_``."""
    return _SAFE.sub("_", name)


@dataclass(frozen=True)
class RecordingRef:
    """Where a closed recording is and what it must hash to."""

    path: str  # relative to the recordings directory
    format: str
    sha256: str
    bytes: int
    started: float
    duration: float
    events: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "sha256": self.sha256,
                "bytes": self.bytes, "started": self.started, "duration": self.duration,
                "events": self.events}


class Recording:
    """One session's recording, open for writing (see the module docstring)."""

    def __init__(self, directory: Path, name: str, fmt: str, header: dict[str, Any],
                 *, clock: Any = time.time, started: float | None = None,
                 replace: bool = False, buffering: int = 65536):
        """``started``: when the recorded session began (default now); ``replace``: write
        over a file of the same name (rebuilding it) instead of refusing to."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown recording format {fmt!r}")
        self.format = fmt
        self._clock = clock
        self.started = clock() if started is None else float(started)
        self._mono = time.monotonic()
        day = time.strftime("%Y/%m/%d", time.gmtime(self.started))
        ext = "cast" if fmt == "asciicast" else "jsonl"
        self.relpath = f"{day}/{safe_name(name)}.{ext}"
        self.path = directory / self.relpath
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._buffering = buffering
        self._file: IO[bytes] | None = open(  # noqa: SIM115 - kept open
            self.path, "wb" if replace else "xb", buffering=buffering)
        self._closed = False
        self._last_at: float | None = None
        self._digest = hashlib.sha256()
        self._size = 0
        self.events = 0
        first = {"version": 2, "timestamp": int(self.started), **header} \
            if fmt == "asciicast" else \
            {"format": "keyturn-transcript", "version": 1, "started": self.started, **header}
        self._line(orjson.dumps(first))

    def _line(self, data: bytes) -> None:
        assert not self._closed, "the recording is closed"
        if self._file is None:  # suspended: go on appending where it stopped
            self._file = open(self.path, "ab", buffering=self._buffering)  # noqa: SIM115
        data += b"\n"
        self._file.write(data)
        self._digest.update(data)
        self._size += len(data)

    @property
    def last_at(self) -> float | None:
        """The latest ``at`` of the events given one (None: none was)."""
        return self._last_at

    def elapsed(self) -> float:
        return round(time.monotonic() - self._mono, 6)

    def write(self, direction: str, data: bytes | str) -> None:
        """Terminal output (``o``) or input (``i``), as it passed (asciicast)."""
        if direction not in ("i", "o"):
            raise ValueError("direction is i or o")
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        if self.format == "asciicast":
            self._line(orjson.dumps([self.elapsed(), direction, text]))
        else:
            self._line(orjson.dumps({"t": self.elapsed(), "d": direction, "data": text}))
        self.events += 1

    def event(self, direction: str, *, at: float | None = None, **fields: Any) -> None:
        """One request or response of a transcript (``{"t", "d", ...fields}``): ``t`` is
        seconds since the start, now or at the time ``at`` (seconds since the epoch)."""
        if self.format != "transcript":
            raise ValueError("structured events go into transcripts")
        if at is None:
            t = self.elapsed()
        else:
            t = round(at - self.started, 6)
            self._last_at = at if self._last_at is None else max(self._last_at, at)
        self._line(orjson.dumps({"t": t, "d": direction, **fields}, default=str))
        self.events += 1

    def marker(self, label: str) -> None:
        """A named point in an asciicast (a command line typed in a shell): players list
        markers and jump to them."""
        if self.format == "asciicast":
            self._line(orjson.dumps([self.elapsed(), "m", label]))
            self.events += 1

    def resize(self, cols: int, rows: int) -> None:
        if self.format == "asciicast":
            self._line(orjson.dumps([self.elapsed(), "r", f"{int(cols)}x{int(rows)}"]))
            self.events += 1

    def flush(self) -> None:
        """Hand what is buffered to the OS (readers see it; no fsync)."""
        if self._file is not None:
            self._file.flush()

    def suspend(self) -> None:
        """Flush and close the file but keep the recording open: the next write reopens
        it to append (a writer with more recordings than it keeps files open)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self, *, at: float | None = None) -> RecordingRef:
        """Seal the recording (fsync) and return its reference. ``at``: when the session
        ended (default: now, or the last event's ``at`` for a recording built from them)."""
        if not self._closed:
            if self._file is None:
                self._file = open(self.path, "ab")  # noqa: SIM115 - closed just below
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self._closed = True
        end = at if at is not None else self._last_at
        duration = round(end - self.started, 6) if end is not None else self.elapsed()
        return RecordingRef(self.relpath, self.format, self._digest.hexdigest(), self._size,
                            self.started, duration, self.events)


class Recorder:
    """Opens recordings under one directory (``<data dir>/recordings``)."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)

    def open(self, name: str, fmt: str, *, started: float | None = None,
             replace: bool = False, buffering: int = 65536, **header: Any) -> Recording:
        """``name``: unique per session (its id); header fields go into the first line
        (asciicast: width, height, title, env; transcript: protocol, user, connection).
        ``started``, ``replace``, ``buffering``: see ``Recording``."""
        return Recording(self.directory, name, fmt, header, started=started,
                         replace=replace, buffering=buffering)

    def path(self, ref: RecordingRef | dict[str, Any]) -> Path:
        rel = ref.path if isinstance(ref, RecordingRef) else str(ref["path"])
        full = (self.directory / rel).resolve()
        if self.directory.resolve() not in full.parents:
            raise ValueError("a recording path outside the recordings directory")
        return full

    def verify_file(self, ref: RecordingRef | dict[str, Any]) -> str | None:
        """None when the file matches its reference, else what is wrong."""
        want = ref.sha256 if isinstance(ref, RecordingRef) else str(ref["sha256"])
        try:
            data = self.path(ref).read_bytes()
        except OSError as exc:
            return f"cannot read it: {exc.strerror or exc}"
        got = hashlib.sha256(data).hexdigest()
        return None if got == want else f"its SHA-256 is {got}, the audit trail says {want}"


__all__ = ["FORMATS", "Recorder", "Recording", "RecordingRef", "safe_name"]
