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

Seeking in long terminal recordings: a writer may add *keyframes* to an asciicast
(``keyframe``). Each goes into an index next to the recording (``<name>.cast.idx``, one
JSON line: ``{"t", "offset", "events", "markers", "cols", "rows", "screen"}``): where
the next event starts in the file, how many markers came before it and, for a terminal,
the screen at that moment as the ANSI text that redraws it. ``window`` cuts a
self-contained asciicast out of a recording from one keyframe up to a later one (the
screen first, then the events, their times moved to start at 0), so a player loads a few
megabytes of a session of hours and starts at the right picture. The index's SHA-256 is
sealed with the recording's.

This module must not import protocol or web code.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

FORMATS = ("asciicast", "transcript")
#: How often (bytes written to one recording) the free space of its disk is looked at.
FREE_CHECK_BYTES = 1 << 20

log = logging.getLogger(__name__)


class RecordingFull(OSError):
    """The recordings' disk has less free space than the gateway keeps (or none): a
    session that cannot be recorded must not go on (or start)."""


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on ``directory``'s file system."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _check_free(directory: Path, keep: int, free: Any) -> None:
    if keep <= 0:
        return
    left = int(free(directory))
    if left < keep:
        raise RecordingFull(
            f"the recordings disk ({directory}) has {left >> 20} MiB free, less than the "
            f"{keep >> 20} MiB the gateway keeps free (gateway.recording_min_free_mib)")
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
    index: str | None = None  # the keyframe index, relative like ``path``
    index_sha256: str | None = None
    keyframes: int = 0
    # Why the file may lack its end (the disk failed, full, as it was sealed): its
    # sha256 is of everything written to it, which the file then does not hold whole.
    incomplete: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path, "format": self.format, "sha256": self.sha256,
            "bytes": self.bytes, "started": self.started, "duration": self.duration,
            "events": self.events}
        if self.index is not None:
            out.update(index=self.index, index_sha256=self.index_sha256,
                       keyframes=self.keyframes)
        if self.incomplete is not None:
            out["incomplete"] = self.incomplete
        return out


class Recording:
    """One session's recording, open for writing (see the module docstring)."""

    def __init__(self, directory: Path, name: str, fmt: str, header: dict[str, Any],
                 *, clock: Any = time.time, started: float | None = None,
                 replace: bool = False, buffering: int = 65536, keep_free: int = 0,
                 free: Any = free_bytes):
        """``started``: when the recorded session began (default now); ``replace``: write
        over a file of the same name (rebuilding it) instead of refusing to;
        ``keep_free``: bytes the disk keeps free, looked at (with ``free``) when it opens
        and every FREE_CHECK_BYTES written: below, RecordingFull (a full disk raises it
        too)."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown recording format {fmt!r}")
        directory.mkdir(parents=True, exist_ok=True)
        _check_free(directory, keep_free, free)
        self._keep_free, self._free, self._dir = keep_free, free, directory
        self._unchecked = 0
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
        self.incomplete: str | None = None  # see RecordingRef.incomplete
        self._last_at: float | None = None
        self._digest = hashlib.sha256()
        self._size = 0
        self.events = 0
        self._index: IO[bytes] | None = None
        self._index_digest = hashlib.sha256()
        self.keyframes = 0
        self.markers = 0
        self._decoders: dict[str, Any] = {}
        first = {"version": 2, "timestamp": int(self.started), **header} \
            if fmt == "asciicast" else \
            {"format": "keyturn-transcript", "version": 1, "started": self.started, **header}
        self._line(orjson.dumps(first))

    def _line(self, data: bytes) -> None:
        assert not self._closed, "the recording is closed"
        if self._file is None:  # suspended: go on appending where it stopped
            self._file = open(self.path, "ab", buffering=self._buffering)  # noqa: SIM115
        data += b"\n"
        try:
            self._file.write(data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise RecordingFull(f"the recordings disk ({self._dir}) is full") from exc
            raise
        self._digest.update(data)
        self._size += len(data)
        self._unchecked += len(data)
        if self._unchecked >= FREE_CHECK_BYTES:
            self._unchecked = 0
            _check_free(self._dir, self._keep_free, self._free)

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
        if isinstance(data, bytes):
            # One decoder per stream: a character split between two reads stays whole.
            decoder = self._decoders.get(direction)
            if decoder is None:
                decoder = self._decoders[direction] = codecs.getincrementaldecoder(
                    "utf-8")("replace")
            text = decoder.decode(data)
            if not text:
                return
        else:
            text = data
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
            self.markers += 1

    def resize(self, cols: int, rows: int) -> None:
        if self.format == "asciicast":
            self._line(orjson.dumps([self.elapsed(), "r", f"{int(cols)}x{int(rows)}"]))
            self.events += 1

    def keyframe(self, cols: int, rows: int, screen: str | None = None) -> None:
        """A point a player may start from (asciicast): the next event's place in the file
        and ``screen``, the ANSI text that redraws the terminal as it is now (None: a
        stream without a screen, such as a command's output without a terminal)."""
        if self.format != "asciicast":
            raise ValueError("keyframes index asciicasts")
        if self._index is None:
            self._index = open(  # noqa: SIM115 - kept open until close
                self.path.with_name(self.path.name + ".idx"), "xb", buffering=8192)
        line = orjson.dumps({"t": self.elapsed(), "offset": self._size,
                             "events": self.events, "markers": self.markers,
                             "cols": int(cols), "rows": int(rows),
                             "screen": screen}) + b"\n"
        self._index.write(line)
        self._index_digest.update(line)
        self.keyframes += 1

    def flush(self) -> None:
        """Hand what is buffered to the OS (readers see it; no fsync)."""
        if self._file is not None:
            self._file.flush()
        if self._index is not None:
            self._index.flush()

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
            self._closed = True
            for name, f in (("recording", self._file), ("index", self._index)):
                if f is None and name == "recording":
                    try:
                        f = open(self.path, "ab")  # noqa: SIM115 - closed just below
                    except OSError as exc:
                        self._failed(name, exc)
                        continue
                if f is None:
                    continue
                try:
                    f.flush()
                    os.fsync(f.fileno())
                except OSError as exc:
                    self._failed(name, exc)
                finally:
                    try:
                        f.close()
                    except OSError as exc:  # (the buffer's flush, once more)
                        self._failed(name, exc)
            self._file = self._index = None
        end = at if at is not None else self._last_at
        duration = round(end - self.started, 6) if end is not None else self.elapsed()
        indexed = self.keyframes > 0
        return RecordingRef(self.relpath, self.format, self._digest.hexdigest(), self._size,
                            self.started, duration, self.events,
                            index=self.relpath + ".idx" if indexed else None,
                            index_sha256=self._index_digest.hexdigest() if indexed else None,
                            keyframes=self.keyframes, incomplete=self.incomplete)

    def _failed(self, name: str, exc: OSError) -> None:
        """Sealing failed (a full or failing disk): said on the reference, never raised,
        so that the session's end and its audit record are not lost with it."""
        why = "the disk is full" if exc.errno == errno.ENOSPC else str(exc)
        log.error("recording %s: its %s could not be written whole as it was sealed: %s",
                  self.relpath, name, why)
        if self.incomplete is None:
            self.incomplete = f"its {name} could not be written whole as it was sealed ({why})"


class Recorder:
    """Opens recordings under one directory (``<data dir>/recordings``)."""

    def __init__(self, directory: str | os.PathLike[str], *, keep_free_mib: int = 0):
        """``keep_free_mib``: recordings stop (RecordingFull) rather than fill the disk
        below this many MiB free (0: only a full disk stops them)."""
        self.directory = Path(directory)
        self.keep_free = keep_free_mib << 20

    def open(self, name: str, fmt: str, *, started: float | None = None,
             replace: bool = False, buffering: int = 65536, **header: Any) -> Recording:
        """``name``: unique per session (its id); header fields go into the first line
        (asciicast: width, height, title, env; transcript: protocol, user, connection).
        ``started``, ``replace``, ``buffering``: see ``Recording``."""
        return Recording(self.directory, name, fmt, header, started=started,
                         replace=replace, buffering=buffering, keep_free=self.keep_free)

    def path(self, ref: RecordingRef | dict[str, Any]) -> Path:
        rel = ref.path if isinstance(ref, RecordingRef) else str(ref["path"])
        full = (self.directory / rel).resolve()
        if self.directory.resolve() not in full.parents:
            raise ValueError("a recording path outside the recordings directory")
        return full

    def verify_file(self, ref: RecordingRef | dict[str, Any]) -> str | None:
        """None when the file (and its keyframe index, if it has one) matches its
        reference, else what is wrong."""
        d = ref.to_json() if isinstance(ref, RecordingRef) else ref
        problem = _check(self.path(d), str(d["sha256"]))
        if problem is None and d.get("index"):
            problem = _check(self.path({"path": d["index"]}), str(d.get("index_sha256")))
            if problem is not None:
                problem = f"its keyframe index: {problem}"
        return problem

    def keyframes(self, ref: RecordingRef | dict[str, Any]) -> list[dict[str, Any]]:
        """Where a player can start an asciicast: its beginning, then the keyframes of
        its index (if it has one). Check the files with ``verify_file`` first."""
        d = ref.to_json() if isinstance(ref, RecordingRef) else ref
        with open(self.path(d), "rb") as f:
            first = f.readline()
        header = orjson.loads(first)
        out = [{"t": 0.0, "offset": len(first), "events": 0, "markers": 0,
                "cols": header.get("width", 80), "rows": header.get("height", 24),
                "screen": None}]
        if d.get("index"):
            with open(self.path({"path": d["index"]}), "rb") as f:
                out += [orjson.loads(line) for line in f if line.strip()]
        return out


def _check(path: Path, want: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    got = digest.hexdigest()
    return None if got == want else f"its SHA-256 is {got}, the audit trail says {want}"


def window_end(keyframes: list[dict[str, Any]], start: int, max_bytes: int) -> int | None:
    """The keyframe a window from ``start`` ends at (None: the end of the recording)."""
    base = keyframes[start]["offset"]
    return next((i for i in range(start + 1, len(keyframes))
                 if keyframes[i]["offset"] - base >= max_bytes), None)


def parts(keyframes: list[dict[str, Any]], max_bytes: int = 8 << 20) -> list[int]:
    """The keyframes consecutive windows start at, the first at the beginning."""
    out: list[int] = []
    i: int | None = 0
    while i is not None and keyframes:
        out.append(i)
        i = window_end(keyframes, i, max_bytes)
    return out


def window(path: Path, keyframes: list[dict[str, Any]], start: int,
           max_bytes: int = 8 << 20) -> tuple[bytes, int | None]:
    """A self-contained asciicast cut from the recording at ``path``: from keyframe
    ``start`` (an index into ``keyframes``) up to the first later keyframe at least
    ``max_bytes`` further into the file (or its end). Its header is the recording's with
    the keyframe's size; a keyframe's screen comes first, as output at time 0; then the
    events, their times moved back by the keyframe's. Returns the cast and the index of
    the keyframe the next window starts at (None: this one reaches the end)."""
    kf = keyframes[start]
    nxt = window_end(keyframes, start, max_bytes)
    end = None if nxt is None else keyframes[nxt]["offset"]
    t0 = float(kf["t"])
    with open(path, "rb") as f:
        header = orjson.loads(f.readline())
        header.update(width=kf["cols"], height=kf["rows"],
                      keyturn_window={"from": t0, "keyframe": start})
        out = [orjson.dumps(header)]
        if kf.get("screen"):
            out.append(orjson.dumps([0.0, "o", kf["screen"]]))
        f.seek(kf["offset"])
        left = None if end is None else end - kf["offset"]
        data = f.read() if left is None else f.read(left)
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            ev = orjson.loads(line)
        except orjson.JSONDecodeError:
            break  # a recording cut short by a crash ends at its last whole line
        ev[0] = round(max(0.0, float(ev[0]) - t0), 6)
        out.append(orjson.dumps(ev))
    return b"\n".join(out) + b"\n", nxt


__all__ = ["FORMATS", "Recorder", "Recording", "RecordingRef", "parts", "safe_name", "window",
           "window_end"]
