"""Template filters: times as people read them (UTC, ages, time left), and the
ticket's words from keyturn.wording (the same on every surface).

They must not do I/O.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from flask import Flask

from keyturn.wording import Sentence, chat_place, decision, event_sentence, execution, outcome
from portal.statements import one_line, render_command, render_statement


def when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def span(seconds: float | None) -> str:
    """``2h 05m``, ``4m 10s``, ``12s``."""
    if seconds is None:
        return "—"
    s = int(max(seconds, 0))
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def clock(seconds: float | None) -> str:
    """A position in a recording: ``4:05``, ``1:02:03``."""
    s = int(max(seconds or 0, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60}:{s % 60:02d}"


def age(ts: float | None) -> str:
    return span(time.time() - ts) if ts is not None else "—"


def left(ts: float | None) -> str:
    if ts is None:
        return "—"
    remaining = ts - time.time()
    return span(remaining) if remaining > 0 else "due"


def sentence(event: dict[str, Any]) -> Sentence:
    """A timeline event (``Approvals.detail``'s ``events``) as a sentence."""
    return event_sentence(event["kind"], event.get("actor"), event.get("detail"))


def capitalize_first(text: str) -> str:
    """"approved by dana" -> "Approved by dana" (Jinja's capitalize lowers the rest)."""
    return text[:1].upper() + text[1:]


def init_app(app: Flask) -> None:
    app.jinja_env.filters.update(when=when, iso=iso, age=age, clock=clock, left=left, span=span,
                                 sql=render_statement, shell=render_command, one_line=one_line,
                                 chat_place=chat_place, sentence=sentence, outcome=outcome,
                                 decision=decision, execution=execution,
                                 capitalize_first=capitalize_first)
    # The server's clock, for the pages' countdowns (static/live.js).
    app.jinja_env.globals["server_now"] = time.time
