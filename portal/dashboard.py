"""Manager dashboard: load, speed and staleness of approvals.

Figures cover a window (default 30 days) of tickets; the chart is an SVG
drawn here on the server (no chart library, no script).

It must not write anything.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, current_app, render_template, request
from markupsafe import Markup, escape
from sqlalchemy import select

from keyturn.approvals import PENDING
from keyturn.models import Ticket
from keyturn.services import Services
from portal.roles import ADMIN, MANAGER, require

bp = Blueprint("dashboard", __name__)
WINDOWS = {"7d": 7, "30d": 30, "90d": 90}
STALE_FRACTION = 0.5  # pending for more than half its timeout


def services() -> Services:
    return current_app.extensions["keyturn"]


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of unsorted values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


@dataclass
class Speed:
    key: str
    count: int
    median: float | None
    p95: float | None


def _speeds(groups: dict[str, list[float]]) -> list[Speed]:
    return [Speed(k, len(v), percentile(v, 50), percentile(v, 95))
            for k, v in sorted(groups.items())]


def stats(svc: Services, days: int, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    since = now - days * 86400
    cols = (Ticket.id, Ticket.status, Ticket.connection, Ticket.requester, Ticket.rule,
            Ticket.approver_groups, Ticket.created_at, Ticket.decided_at, Ticket.decided_by,
            Ticket.expires_at, Ticket.statement)
    with svc.store.session() as s:
        pending = list(s.execute(select(*cols).where(Ticket.status == PENDING)
                                 .order_by(Ticket.created_at)))
        recent = list(s.execute(select(*cols).where(Ticket.created_at >= since)))
    by_conn: dict[str, list[float]] = defaultdict(list)
    by_group: dict[str, list[float]] = defaultdict(list)
    for r in recent:
        if r.decided_at is None or not r.decided_by:
            continue  # expired or cancelled: nobody decided
        took = r.decided_at - r.created_at
        by_conn[r.connection].append(took)
        for g in r.approver_groups or ():
            by_group[g].append(took)
    stale = [r for r in pending
             if now - r.created_at > STALE_FRACTION * max(r.expires_at - r.created_at, 1)]
    day0 = dt.datetime.fromtimestamp(now, dt.UTC).date() - dt.timedelta(days=13)
    per_day = Counter(dt.datetime.fromtimestamp(r.created_at, dt.UTC).date() for r in recent)
    series = [(day0 + dt.timedelta(days=i), per_day.get(day0 + dt.timedelta(days=i), 0))
              for i in range(14)]
    return {
        "pending_total": len(pending),
        "pending_by_connection": Counter(r.connection for r in pending).most_common(),
        "by_connection": _speeds(by_conn), "by_group": _speeds(by_group),
        "stale": stale, "top_requesters": Counter(r.requester for r in recent).most_common(5),
        "top_rules": Counter(r.rule for r in recent).most_common(5),
        "decided": sum(len(v) for v in by_conn.values()), "total": len(recent),
        "chart": bar_chart(series),
    }


def bar_chart(series: list[tuple[dt.date, int]], width: int = 560, height: int = 160) -> Markup:
    """Tickets per day as an accessible SVG bar chart (a title and a text per bar)."""
    top = max((n for _, n in series), default=0) or 1
    pad_l, pad_b, pad_t = 28, 22, 10
    bw = (width - pad_l) / max(len(series), 1)
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-labelledby="chart-title"><title id="chart-title">Tickets created per day, '
             f'last {len(series)} days</title>',
             f'<line class="axis" x1="{pad_l}" y1="{height - pad_b}" x2="{width}" '
             f'y2="{height - pad_b}"/>',
             f'<text class="tick" x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{top}</text>',
             f'<text class="tick" x="{pad_l - 4}" y="{height - pad_b}" text-anchor="end">0</text>']
    for i, (day, n) in enumerate(series):
        h = (height - pad_b - pad_t) * n / top
        x = pad_l + i * bw + 3
        y = height - pad_b - h
        label = escape(f"{day.isoformat()}: {n} tickets")
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bw - 6:.1f}" '
                     f'height="{h:.1f}"><title>{label}</title></rect>')
        if i % 2 == 0 or len(series) <= 7:
            parts.append(f'<text class="tick" x="{x + (bw - 6) / 2:.1f}" y="{height - 6}" '
                         f'text-anchor="middle">{day.strftime("%d %b")}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


@bp.get("/dashboard")
@require(MANAGER, ADMIN)
def index():  # type: ignore[no-untyped-def]
    window = request.args.get("window", "30d")
    if window not in WINDOWS:
        window = "30d"
    return render_template("dashboard.html", s=stats(services(), WINDOWS[window]),
                           window=window, windows=WINDOWS)
