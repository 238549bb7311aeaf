"""Template filters: times as people read them (UTC, ages, time left).

They must not do I/O.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from flask import Flask

from portal.statements import one_line, render_statement


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


def age(ts: float | None) -> str:
    return span(time.time() - ts) if ts is not None else "—"


def left(ts: float | None) -> str:
    if ts is None:
        return "—"
    remaining = ts - time.time()
    return span(remaining) if remaining > 0 else "due"


PLATFORMS = {"slack": "Slack", "teams": "Teams"}


def chat_place(detail: dict[str, Any] | None) -> str:
    """Where a "notified" event went: ``Slack #approvals``, ``Teams 19:abc@thread``.
    Slack channels read with a ``#`` as people know them; Teams conversation ids
    are shown as they are (they have no short name we could know)."""
    detail = detail or {}
    platform = str(detail.get("platform") or "chat")
    channel = str(detail.get("channel") or "").strip()
    name = PLATFORMS.get(platform, platform)
    if platform == "slack" and channel and not channel.startswith("#"):
        channel = f"#{channel}"
    return f"{name} {channel}".strip()


def init_app(app: Flask) -> None:
    app.jinja_env.filters.update(when=when, iso=iso, age=age, left=left, span=span,
                                 sql=render_statement, one_line=one_line,
                                 chat_place=chat_place)
