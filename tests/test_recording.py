"""Session recordings (keyturn.recording): the files are valid asciicast v2 / transcript
JSON lines, the digest in the reference is the file's, and any change to the file is
found by verify_file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from keyturn.recording import Recorder


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
