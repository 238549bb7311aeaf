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

Writes are buffered (a 64 KiB file buffer) and the digest is updated as bytes are
written, so closing never re-reads the file. A recording that was never closed (the
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
                 *, clock: Any = time.time):
        if fmt not in FORMATS:
            raise ValueError(f"unknown recording format {fmt!r}")
        self.format = fmt
        self._clock = clock
        self.started = clock()
        self._mono = time.monotonic()
        day = time.strftime("%Y/%m/%d", time.gmtime(self.started))
        ext = "cast" if fmt == "asciicast" else "jsonl"
        self.relpath = f"{day}/{_SAFE.sub('_', name)}.{ext}"
        path = directory / self.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] | None = open(path, "xb", buffering=65536)  # noqa: SIM115
        self._digest = hashlib.sha256()
        self._size = 0
        self.events = 0
        first = {"version": 2, "timestamp": int(self.started), **header} \
            if fmt == "asciicast" else \
            {"format": "keyturn-transcript", "version": 1, "started": self.started, **header}
        self._line(orjson.dumps(first))

    def _line(self, data: bytes) -> None:
        assert self._file is not None, "the recording is closed"
        data += b"\n"
        self._file.write(data)
        self._digest.update(data)
        self._size += len(data)

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

    def event(self, direction: str, **fields: Any) -> None:
        """One request or response of a transcript (``{"t", "d", ...fields}``)."""
        if self.format != "transcript":
            raise ValueError("structured events go into transcripts")
        self._line(orjson.dumps({"t": self.elapsed(), "d": direction, **fields},
                                default=str))
        self.events += 1

    def resize(self, cols: int, rows: int) -> None:
        if self.format == "asciicast":
            self._line(orjson.dumps([self.elapsed(), "r", f"{int(cols)}x{int(rows)}"]))
            self.events += 1

    def close(self) -> RecordingRef:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        return RecordingRef(self.relpath, self.format, self._digest.hexdigest(), self._size,
                            self.started, self.elapsed(), self.events)


class Recorder:
    """Opens recordings under one directory (``<data dir>/recordings``)."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)

    def open(self, name: str, fmt: str, **header: Any) -> Recording:
        """``name``: unique per session (its id); header fields go into the first line
        (asciicast: width, height, title, env; transcript: protocol, user, connection)."""
        return Recording(self.directory, name, fmt, header)

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


__all__ = ["FORMATS", "Recorder", "Recording", "RecordingRef"]
