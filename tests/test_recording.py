"""Session recordings (keyturn.recording): the files are valid asciicast v2 / transcript
JSON lines, the digest in the reference is the file's, and any change to the file is
found by verify_file."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from keyturn.recording import FREE_CHECK_BYTES, Recorder, Recording, RecordingFull


def test_an_asciicast_recording_replays_and_verifies(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    r = rec.open("sess-1/../x", "asciicast", width=80, height=24, title="alice@web1")
    r.write("o", b"$ ")
    r.write("i", "ls\r")
    r.resize(120, 40)
    r.write("o", "caf\xe9 \x1b[1mbold\x1b[0m\r\n".encode())
    ref = r.close()
    path = rec.path(ref)
    assert path.parent.parent.parent.parent == tmp_path  # YYYY/MM/DD under the directory
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["version"] == 2 and lines[0]["width"] == 80 and lines[0]["title"]
    assert [e[1:] for e in lines[1:]] == [["o", "$ "], ["i", "ls\r"], ["r", "120x40"],
                                          ["o", "café \x1b[1mbold\x1b[0m\r\n"]]
    times = [e[0] for e in lines[1:]]
    assert times == sorted(times)
    assert ref.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ref.bytes == path.stat().st_size and ref.events == 4
    assert rec.verify_file(ref) is None
    assert rec.verify_file(ref.to_json()) is None
    path.write_bytes(path.read_bytes().replace(b"ls", b"rm"))
    assert "SHA-256" in (rec.verify_file(ref) or "")
    path.unlink()
    assert "cannot read" in (rec.verify_file(ref) or "")


def test_a_transcript_holds_requests_and_result_summaries(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    r = rec.open("s2", "transcript", protocol="postgres", user="alice", connection="shop")
    r.event("i", text="SELECT count(*) FROM orders", cls="read")
    r.event("o", tag="SELECT 1", rows=1, ms=0.4)
    with pytest.raises(ValueError):
        r.write("x", "")
    ref = r.close()
    lines = [json.loads(x) for x in rec.path(ref).read_text().splitlines()]
    assert lines[0]["format"] == "keyturn-transcript" and lines[0]["user"] == "alice"
    assert lines[1]["d"] == "i" and lines[1]["text"].startswith("SELECT")
    assert lines[2] == {"t": lines[2]["t"], "d": "o", "tag": "SELECT 1", "rows": 1, "ms": 0.4}
    assert rec.verify_file(ref) is None


def test_references_cannot_point_outside_the_directory(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "recordings")
    with pytest.raises(ValueError):
        rec.path({"path": "../../etc/passwd", "sha256": "0"})
    with pytest.raises(ValueError):
        rec.open("x", "mp4")


def _screen(width: int, height: int, events: list[list]):  # type: ignore[no-untyped-def]
    """A terminal emulator after the output and resizes of ``events``."""
    import pyte

    screen = pyte.Screen(width, height)
    stream = pyte.Stream(screen)
    for e in events:
        if e[1] == "o":
            stream.feed(e[2])
        elif e[1] == "r":
            cols, rows = map(int, e[2].split("x"))
            screen.resize(rows, cols)
    return screen


def _cells(screen) -> list:  # type: ignore[no-untyped-def]
    return [[screen.buffer[y][x] for x in range(screen.columns)] for y in range(screen.lines)]


def test_keyframes_let_a_player_start_anywhere_on_the_screen_it_would_have_reached(
        tmp_path: Path) -> None:
    """A recording made as the SSH gateway makes one (its terminal emulator's snapshot at
    each keyframe): every part cut at a keyframe opens on exactly the screen a player that
    replayed everything before would show, the parts together hold every event once, and
    a typed line's marker is found in the part the page loads for it."""
    from keyturn.recording import parts, window
    from proxies.ssh.terminal import TypedLines

    rec = Recorder(tmp_path)
    r = rec.open("long", "asciicast", width=40, height=8)
    typed = TypedLines(40, 8)
    size = (40, 8)
    colours = ["\x1b[31m", "\x1b[1;44m", "\x1b[38;5;208m", "\x1b[48;2;10;20;30m", "\x1b[7m",
               "\x1b[0m"]
    for i in range(120):
        if i % 7 == 3:
            r.keyframe(*size, typed.snapshot())
        if i == 50:
            size = (52, 10)
            r.resize(*size)
            typed.resize(*size)
        out = f"{colours[i % 6]}row {i} {'x' * (i % 37)}\x1b[0m\r\n$ ".encode()
        if i % 11 == 0:
            out += "\x1b[2;5H\x1b[K中文 overwritten".encode()
        typed.output(out)
        r.write("o", out)
        line = f"echo {i}\r".encode()
        r.write("i", line)
        for done in typed.input(line):
            r.marker(done)
    ref = r.close()
    assert ref.index and ref.keyframes == 17 and rec.verify_file(ref) is None

    path = rec.path(ref)
    lines = path.read_bytes().splitlines(keepends=True)
    full = [json.loads(x) for x in lines[1:]]
    kfs = rec.keyframes(ref)
    assert len(kfs) == 18 and kfs[0]["offset"] == len(lines[0])
    offsets = {sum(map(len, lines[:n])): n - 1 for n in range(1, len(lines) + 1)}
    for k, kf in enumerate(kfs):
        before = full[:offsets[kf["offset"]]]  # the events a player passed to get here
        cast, _ = window(path, kfs, k, max_bytes=1 << 30)
        head, *events = [json.loads(x) for x in cast.splitlines()]
        assert (head["width"], head["height"]) == (kf["cols"], kf["rows"])
        opening = events[:1] if kf["screen"] else []
        want = _screen(40, 8, before)
        got = _screen(head["width"], head["height"], opening)
        assert _cells(got) == _cells(want), k
        assert (got.cursor.x, got.cursor.y) == (want.cursor.x, want.cursor.y)
        rest = events[len(opening):]
        assert [e[1:] for e in rest] == [e[1:] for e in full[len(before):]]
        assert rest[0][0] == pytest.approx(full[len(before)][0] - kf["t"], abs=1e-5)

    starts = parts(kfs, max_bytes=2000)
    assert len(starts) > 3 and starts[0] == 0
    pieces: list[list] = []
    for n, k in enumerate(starts):
        cast, nxt = window(path, kfs, k, max_bytes=2000)
        assert nxt == (starts[n + 1] if n + 1 < len(starts) else None)
        events = [json.loads(x) for x in cast.splitlines()[1:]]
        pieces += [e[1:] for e in (events[1:] if kfs[k]["screen"] else events)]
    assert pieces == [e[1:] for e in full]

    labels = [e[2] for e in full if e[1] == "m"]
    assert labels[:2] == ["echo 0", "echo 1"] and len(labels) == 120
    for m in (0, 5, 64, 119):
        k = max(i for i, f in enumerate(kfs) if f["markers"] <= m)
        cast, _ = window(path, kfs, k, max_bytes=2000)
        local = [e[2] for e in map(json.loads, cast.splitlines()[1:]) if e[1] == "m"]
        assert local[m - kfs[k]["markers"]] == labels[m]

    index = rec.path({"path": ref.index})
    index.write_bytes(index.read_bytes().replace(b'"t":', b'"t": ', 1))
    assert "keyframe index" in (rec.verify_file(ref) or "")


def test_a_flood_of_output_does_not_hold_the_terminal_emulator() -> None:
    """`cat` of a big log in a recorded shell: the emulator is fed within its budget and
    rebuilds the screen from the output's tail, which shows what the client's terminal
    shows."""
    from proxies.ssh.terminal import TypedLines

    t = TypedLines(80, 24)
    t.output(b"\x1b[1mprompt\x1b[0m$ cat big.log\r\n")
    data = b"".join(b"line %d of the log\r\n" % i for i in range(600_000))
    for i in range(0, len(data), 32768):
        t.output(data[i:i + 32768])
    t.output(b"$ ")
    lines = t.input(b"uptime\r")
    assert t.skipped > len(data) * 0.95  # not emulated byte by byte
    assert lines == ["uptime"]
    assert t.screen.display[-2].rstrip() == "line 599999 of the log"
    assert [row.rstrip() for row in t.screen.display[:23]] == \
        [f"line {i} of the log" for i in range(599977, 600000)]


def test_a_recording_does_not_start_on_a_disk_below_what_it_keeps_free(
        tmp_path: Path) -> None:
    rec = Recorder(tmp_path, keep_free_mib=1 << 30)  # 1 PiB: more than this disk has
    with pytest.raises(RecordingFull, match="recording_min_free_mib"):
        rec.open("s1", "asciicast", width=80, height=24)
    assert not list(tmp_path.rglob("*.cast"))
    # 0 keeps nothing free: it opens
    Recorder(tmp_path, keep_free_mib=0).open("s2", "asciicast", width=80, height=24).close()


def test_a_recording_stops_when_the_disk_falls_below_what_it_keeps_free(
        tmp_path: Path) -> None:
    """Looked at every FREE_CHECK_BYTES written; what was written stays sealed whole."""
    left = [64 << 20]

    def free(_: Path) -> int:
        return left[0]

    r = Recording(tmp_path, "s", "asciicast", {"width": 80, "height": 24},
                  keep_free=32 << 20, free=free)
    chunk = b"x" * 4096
    r.write("o", chunk)
    left[0] = 16 << 20  # another writer filled the disk
    with pytest.raises(RecordingFull, match="16 MiB free"):
        for _ in range(2 * FREE_CHECK_BYTES // len(chunk)):
            r.write("o", chunk)
    ref = r.close()
    data = (tmp_path / ref.path).read_bytes()
    assert hashlib.sha256(data).hexdigest() == ref.sha256
    assert ref.bytes == len(data) > FREE_CHECK_BYTES


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_disk_that_fails_as_the_recording_is_sealed_is_said_not_raised(
        tmp_path: Path) -> None:
    """The kernel's /dev/full answers every write with ENOSPC: the buffered end of the
    recording cannot reach the disk when it is sealed. Closing does not raise (the
    session's end and its audit record must not be lost with it); the reference says
    the file is incomplete."""
    started = 1_800_000_000.0
    day = time.strftime("%Y/%m/%d", time.gmtime(started))
    (tmp_path / day).mkdir(parents=True)
    (tmp_path / day / "s.cast").symlink_to("/dev/full")
    r = Recording(tmp_path, "s", "asciicast", {"width": 80, "height": 24},
                  started=started, replace=True)
    r.write("o", b"$ rm -rf /tmp/x\r\n")
    ref = r.close()
    assert ref.incomplete is not None and "disk is full" in ref.incomplete
    assert ref.to_json()["incomplete"] == ref.incomplete
    assert ref.events == 1 and ref.bytes > 0
    # a healthy recording says nothing of the kind
    ok = Recording(tmp_path, "t", "asciicast", {"width": 80, "height": 24}).close()
    assert ok.incomplete is None and "incomplete" not in ok.to_json()
