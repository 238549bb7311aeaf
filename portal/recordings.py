"""Recordings: terminal sessions (SSH exec and shells) found by who, where, when and what
was typed, and replayed with asciinema-player.

The list comes from the audit trail: each channel's completed record (kind ``statement``,
protocol ``ssh``) names its recording, and the ``recording`` record that sealed it holds its
SHA-256. A recording is served only when the file still matches that digest, so a replay
always shows what the trail vouches for. Auditors and admins see everyone's; everyone
else sees their own. A recording larger than ``WINDOW`` plays in parts cut at its
keyframes (``keyturn.recording.window``): the player loads one part at a time and starts
at any keyframe, so a session of hours opens at once.

It must not write or change recordings or records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, abort, current_app, render_template, request, send_file
from sqlalchemy import Text, cast, func, select

from keyturn.models import AuditRecord
from keyturn.recording import Recorder, parts, window
from keyturn.services import Services
from portal import queries
from portal.htmx import page_or_block
from portal.roles import ADMIN, AUDITOR, require, viewer

bp = Blueprint("recordings", __name__)
PAGE = 50
WINDOW = 8 << 20  # bytes of asciicast the player loads at once
#: The player decodes the terminal in WebAssembly: its page alone allows compiling it.
PLAYER_CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
              "img-src 'self' data:; object-src 'none'; base-uri 'none'; "
              "frame-ancestors 'none'; form-action 'self'")


def services() -> Services:
    return current_app.extensions["keyturn"]


def recorder() -> Recorder:
    return Recorder(services().config.gateway.recordings)


@dataclass
class Entry:
    record: AuditRecord  # the channel's completed record
    seal: AuditRecord | None  # the recording record with its digest

    @property
    def detail(self) -> dict[str, Any]:
        return self.record.detail or {}

    @property
    def lines(self) -> list[str]:
        return list(self.detail.get("lines") or [])


def _sees_all() -> bool:
    return viewer().has(AUDITOR, ADMIN)


def _base_query(args: dict[str, str]) -> Any:
    q = select(AuditRecord).where(AuditRecord.kind == "statement",
                                  AuditRecord.protocol == "ssh",
                                  cast(AuditRecord.detail, Text).contains('"recording"'))
    user = args.get("user", "").strip() if _sees_all() else viewer().user
    if user:
        q = q.where(AuditRecord.user == user)
    if args.get("connection"):
        q = q.where(AuditRecord.connection == args["connection"].strip())
    since = queries.parse_day(args.get("from", "").strip(), "from")
    until = queries.parse_day(args.get("to", "").strip(), "to", end=True)
    if since is not None:
        q = q.where(AuditRecord.at >= since)
    if until is not None:
        q = q.where(AuditRecord.at < until)
    text = args.get("q", "").strip()[:200].lower()
    if text:
        # The command of an exec, or a line typed in a shell (kept in the record's detail).
        q = q.where(func.lower(AuditRecord.statement).contains(text, autoescape=True)
                    | func.lower(cast(AuditRecord.detail, Text)).contains(text,
                                                                          autoescape=True))
    return q


def _seals(records: list[AuditRecord]) -> dict[str, AuditRecord]:
    sessions = {r.session_id for r in records if r.session_id}
    if not sessions:
        return {}
    with services().store.session() as s:
        rows = s.scalars(select(AuditRecord).where(AuditRecord.kind == "recording",
                                                   AuditRecord.session_id.in_(sorted(sessions))))
        return {str((r.detail or {}).get("path")): r for r in rows}


@bp.get("/recordings")
@require()
def index():  # type: ignore[no-untyped-def]
    args = {k: v for k, v in request.args.items()}
    before = args.get("before")
    if before and not before.isdigit():
        raise queries.BadFilter("the page link is damaged; start from the first page")
    q = _base_query(args).order_by(AuditRecord.seq.desc())
    if before:
        q = q.where(AuditRecord.seq < int(before))
    with services().store.session() as s:
        rows = list(s.scalars(q.limit(PAGE + 1)))
    nxt = rows[PAGE - 1].seq if len(rows) > PAGE else None
    rows = rows[:PAGE]
    seals = _seals(rows)
    entries = [Entry(r, seals.get(str((r.detail or {}).get("recording")))) for r in rows]
    keep = {k: v for k, v in args.items() if k != "before" and v}
    cfg = services().config
    return page_or_block("recordings.html", "recording_list", entries=entries, args=keep,
                         next_before=nxt, paged=bool(before), sees_all=_sees_all(),
                         connections=sorted(n for n, c in cfg.connections.items()
                                            if c.type == "ssh"),
                         users=sorted(cfg.users))


def _entry(seq: int) -> Entry:
    with services().store.session() as s:
        rec = s.get(AuditRecord, seq)
    if rec is None or rec.kind != "statement" or rec.protocol != "ssh" or \
            "recording" not in (rec.detail or {}):
        abort(404)
    if not _sees_all() and rec.user != viewer().user:
        abort(404)  # no way to learn that someone else's recording exists
    return Entry(rec, _seals([rec]).get(str(rec.detail["recording"])))


@bp.get("/recordings/<int:seq>")
@require()
def replay(seq: int):  # type: ignore[no-untyped-def]
    e = _entry(seq)
    problem = None
    if e.seal is None:
        problem = "its digest is not in the audit trail yet (the session may still be open)"
    else:
        problem = recorder().verify_file(e.seal.detail)
    keyframes: list[dict[str, Any]] = []
    windows: list[dict[str, Any]] = []
    if problem is None and e.seal is not None and int(e.seal.detail.get("bytes", 0)) > WINDOW:
        keyframes = recorder().keyframes(e.seal.detail)
        starts = parts(keyframes, WINDOW)
        duration = float(e.seal.detail.get("duration") or 0)
        windows = [{"from": i, "t": keyframes[i]["t"],
                    "to": keyframes[starts[n + 1]]["t"] if n + 1 < len(starts) else duration}
                   for n, i in enumerate(starts)]
    html = render_template("recording.html", e=e, problem=problem,
                           speeds=(0.5, 1, 2, 4, 8), windows=windows,
                           keyframes=[{"t": k["t"], "markers": k.get("markers", 0)}
                                      for k in keyframes])
    resp = Response(html)
    resp.headers["Content-Security-Policy"] = PLAYER_CSP
    return resp


@bp.get("/recordings/<int:seq>.cast")
@require()
def cast_file(seq: int):  # type: ignore[no-untyped-def]
    e = _entry(seq)
    if e.seal is None or recorder().verify_file(e.seal.detail) is not None:
        abort(409, "the recording does not match the digest in the audit trail")
    path = recorder().path(e.seal.detail)
    start = request.args.get("from", type=int)
    if start is None and int(e.seal.detail.get("bytes", 0)) <= WINDOW:
        return send_file(path, mimetype="application/x-asciicast", max_age=0,
                         download_name=path.name)
    keyframes = recorder().keyframes(e.seal.detail)
    start = start or 0
    if not 0 <= start < len(keyframes):
        abort(404)
    data, nxt = window(path, keyframes, start, WINDOW)
    resp = Response(data, mimetype="application/x-asciicast")
    resp.headers["Cache-Control"] = "no-store"
    if nxt is not None:
        resp.headers["X-Keyturn-Next-Keyframe"] = str(nxt)
    return resp
