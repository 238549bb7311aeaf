"""Compliance export: approval histories and audit records for a filter.

One streamed ZIP: ``tickets.csv``, ``tickets.jsonl`` (with votes and the
timeline), ``audit.csv``, ``audit.jsonl`` and ``manifest.json`` (the filter,
time range, counts, the audit chain head the export stops at, and the
SHA-256 of each file). Rows go out in batches as they are read, so memory
stays flat however large the export. Starting an export is itself recorded in
the audit trail before anything is sent.

It must not send data before the export is in the audit trail.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request, stream_with_context
from sqlalchemy import select

from keyturn.approvals import ticket_json
from keyturn.audit import FIELDS as AUDIT_FIELDS
from keyturn.models import AuditHead, Ticket, TicketEvent, Vote
from keyturn.services import Services
from portal import queries
from portal.roles import ADMIN, AUDITOR, require, viewer

bp = Blueprint("export", __name__)
BATCH = 500
TICKET_FIELDS = ("id", "status", "requester", "requester_groups", "connection", "protocol",
                 "client_addr", "application", "session_id", "statement", "language", "facts",
                 "params",
                 "classification", "tables", "rule", "reason", "detail",
                 "approver_groups", "min_approvals", "mode", "created_at",
                 "expires_at", "decided_at", "decided_by", "decision_comment", "executed_at",
                 "result_rows", "result_error", "votes")
AUDIT_COLUMNS = (*AUDIT_FIELDS, "prev_hash", "hash")


def services() -> Services:
    return current_app.extensions["keyturn"]


class _Sink:
    """A write-only file for zipfile: collects bytes until the generator yields them."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def _iter_tickets(svc: Services, f: dict[str, Any]) -> Iterator[dict[str, Any]]:
    q = select(Ticket).order_by(Ticket.id)
    if f["since"] is not None:
        q = q.where(Ticket.created_at >= f["since"])
    if f["until"] is not None:
        q = q.where(Ticket.created_at < f["until"])
    if f["connection"]:
        q = q.where(Ticket.connection == f["connection"])
    if f["user"]:
        q = q.where(Ticket.requester == f["user"])
    last = 0
    while True:
        with svc.store.session() as s:
            batch = list(s.scalars(q.where(Ticket.id > last).limit(BATCH)))
            if not batch:
                return
            ids = [t.id for t in batch]
            votes: dict[int, list[Vote]] = {}
            for v in s.scalars(select(Vote).where(Vote.ticket_id.in_(ids)).order_by(Vote.id)):
                votes.setdefault(v.ticket_id, []).append(v)
            events: dict[int, list[TicketEvent]] = {}
            for e in s.scalars(select(TicketEvent).where(TicketEvent.ticket_id.in_(ids))
                               .order_by(TicketEvent.id)):
                events.setdefault(e.ticket_id, []).append(e)
        for t in batch:
            yield ticket_json(t, votes.get(t.id, []), events.get(t.id, []))
        last = batch[-1].id


def _iter_audit(svc: Services, f: dict[str, Any], head_seq: int) -> Iterator[dict[str, Any]]:
    for rec in svc.audit.iter_records(f["since"], f["until"], user=f["user"] or None,
                                      connection=f["connection"] or None):
        if rec["seq"] > head_seq:
            return
        yield rec


def _csv_cell(v: Any) -> Any:
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict)) else v


def _write_file(zf: zipfile.ZipFile, sink: _Sink, name: str, rows: Iterator[dict[str, Any]],
                fmt: str, columns: tuple[str, ...], summary: dict[str, Any]) -> Iterator[bytes]:
    digest = hashlib.sha256()
    n = 0
    info = zipfile.ZipInfo(name, time.gmtime()[:6])
    info.compress_type = zipfile.ZIP_DEFLATED
    with zf.open(info, "w", force_zip64=True) as out:
        def put(text: str) -> None:
            data = text.encode()
            digest.update(data)
            out.write(data)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\r\n") if fmt == "csv" else None
        if writer:
            writer.writerow(columns)
        for row in rows:
            if writer:
                writer.writerow([_csv_cell(row.get(c)) for c in columns])
            else:
                buf.write(json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False,
                                     sort_keys=False, default=str) + "\n")
            n += 1
            if buf.tell() > 64 * 1024:
                put(buf.getvalue())
                buf.seek(0)
                buf.truncate()
                chunk = sink.take()
                if chunk:
                    yield chunk
        put(buf.getvalue())
    summary[name] = {"records": n, "sha256": digest.hexdigest()}
    chunk = sink.take()
    if chunk:
        yield chunk


def stream_export(svc: Services, f: dict[str, Any], who: str) -> Iterator[bytes]:
    with svc.store.session() as s:
        head = s.get(AuditHead, 1)
        head_seq, head_hash = (head.seq, head.hash) if head else (0, "0" * 64)
    sink = _Sink()
    files: dict[str, Any] = {}
    with zipfile.ZipFile(sink, "w") as zf:  # type: ignore[call-overload]
        makers: list[tuple[str, Callable[[], Iterator[dict[str, Any]]], str,
                           tuple[str, ...]]] = [
            ("tickets.csv", lambda: _iter_tickets(svc, f), "csv", TICKET_FIELDS),
            ("tickets.jsonl", lambda: _iter_tickets(svc, f), "jsonl", (*TICKET_FIELDS,
                                                                       "events")),
            ("audit.csv", lambda: _iter_audit(svc, f, head_seq), "csv", AUDIT_COLUMNS),
            ("audit.jsonl", lambda: _iter_audit(svc, f, head_seq), "jsonl", AUDIT_COLUMNS),
        ]
        for name, rows, fmt, cols in makers:
            yield from _write_file(zf, sink, name, rows(), fmt, cols, files)
        manifest = {
            "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "generated_by": who,
            "filter": {k: v for k, v in f.items() if k not in ("since", "until")},
            "time_range": {"from": _iso(f["since"]), "to": _iso(f["until"]),
                           "field": "tickets: created_at; audit: at"},
            "audit_chain_head": {"seq": head_seq, "hash": head_hash},
            "files": files,
        }
        zf.writestr("manifest.json", json.dumps(manifest, indent=2) + "\n")
    yield sink.take()


def _iso(ts: float | None) -> str | None:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat() if ts is not None else None


@bp.get("/export")
@require(AUDITOR, ADMIN)
def index():  # type: ignore[no-untyped-def]
    svc = services()
    return render_template("export.html", connections=sorted(svc.config.connections),
                           users=sorted(svc.config.users))


@bp.post("/export")
@require(AUDITOR, ADMIN)
def download():  # type: ignore[no-untyped-def]
    svc = services()
    form = request.form
    connection, user = form.get("connection", "").strip(), form.get("user", "").strip()
    if connection and connection not in svc.config.connections:
        raise queries.BadFilter(f"connection: unknown connection {connection!r}")
    if user and user not in svc.config.users:
        raise queries.BadFilter(f"user: unknown user {user!r}")
    f = {"connection": connection, "user": user,
         "since": queries.parse_day(form.get("from", "").strip(), "from"),
         "until": queries.parse_day(form.get("to", "").strip(), "to", end=True),
         "from": form.get("from", "").strip(), "to": form.get("to", "").strip()}
    who = viewer().user
    svc.record_audit(kind="export", user=who, action="portal-export",
                     client_addr=request.remote_addr,
                     detail={k: v for k, v in f.items() if k not in ("since", "until")})
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    resp = Response(stream_with_context(stream_export(svc, f, who)),
                    mimetype="application/zip")
    resp.headers["Content-Disposition"] = f'attachment; filename="keyturn-export-{stamp}.zip"'
    return resp
