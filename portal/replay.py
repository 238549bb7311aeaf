"""A session's transcript (keyturn.transcripts) as the steps of the portal's replay.

The session page shows each statement with its time from the session's start, its
decision and outcome and a summary of its result; ``static/replay.js`` plays them back in
the browser. The recording's SHA-256 comes from the audit trail's ``recording`` record
and the file is checked against it here, each time the page is shown.

It must not write recordings, nor trust a transcript's own claims over the trail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keyturn.recording import Recorder
from keyturn.transcripts import RECORDING_KIND, read_transcript, transcript_of


@dataclass
class Step:
    t: float
    kind: str  # "statement", or the event's kind (connect, disconnect, held, ...)
    request: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def offset(self) -> str:
        """``+1.234 s``, ``+2:03.5`` past a minute."""
        if self.t < 60:
            return f"+{self.t:.3f} s"
        minutes, seconds = divmod(self.t, 60)
        return f"+{int(minutes)}:{seconds:04.1f}"


@dataclass
class Replay:
    steps: list[Step]
    sealed: bool  # a recording record holds its digest (else: the session is still open)
    ref: dict[str, Any] | None = None  # the recording record's detail
    outcome: str | None = None  # ok, or incomplete (the gateway died)
    problem: str | None = None  # why the file does not verify

    @property
    def statements(self) -> int:
        return sum(1 for s in self.steps if s.kind == "statement")


def steps_of(events: list[dict[str, Any]]) -> list[Step]:
    """Pair each request line with the result line that follows it."""
    steps: list[Step] = []
    waiting: Step | None = None
    for e in events:
        d = e.get("d")
        t = float(e.get("t") or 0)
        if d == "i":
            waiting = Step(t, "statement", request=e)
            steps.append(waiting)
        elif d == "o" and waiting is not None:
            waiting.result = e
            waiting = None
        elif d == "e":
            steps.append(Step(t, str(e.get("kind") or "event"), result=e))
    return steps


def replay_of(recorder: Recorder, session_id: str, records: list[Any]) -> Replay | None:
    """The replay of a session from its records (the store's, in order), or None when it
    has no transcript."""
    sealed = [r for r in records if r.kind == RECORDING_KIND]
    if sealed:
        rec = sealed[-1]
        ref = rec.detail or {}
        try:
            problem = recorder.verify_file(ref)
            path = recorder.path(ref)
        except (KeyError, ValueError) as exc:
            return Replay([], True, ref, rec.outcome, f"its reference is damaged: {exc}")
        steps: list[Step] = []
        try:
            steps = steps_of(read_transcript(path)[1])
        except OSError:
            pass  # the problem says it: the file cannot be read
        return Replay(steps, True, ref, rec.outcome, problem)
    open_path = transcript_of(recorder, session_id)
    if open_path is None:
        return None
    try:
        return Replay(steps_of(read_transcript(open_path)[1]), False)
    except OSError:
        return None
