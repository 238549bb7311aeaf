"""The session page's replay of a transcript (portal.replay, session.html): steps in
order with their time from the start, outcomes and result summaries, the recording's
SHA-256 and whether the file still matches it; an open session shows its transcript so
far. The transcripts are written by the real ingester from spooled records."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from portal_support import (  # noqa: F401 - fixtures
    Auth,
    app_fixture,
    record_session,
    svc_fixture,
)

from keyturn.recording import Recorder
from keyturn.services import Services

T0 = 1_750_000_000.0
WHO = {"user": "alice", "connection": "shop", "session_id": "a1b2c3", "client_addr": "10.0.3.14",
       "protocol": "postgres"}


def _session(end: bool = True) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = [
        {"kind": "connect", "at": T0, **WHO, "detail": {"application": "psql"}},
        {"kind": "statement", "at": T0 + 1.5, **WHO, "statement": "SELECT count(*) FROM orders",
         "classification": "read", "action": "allow", "rule": "reads", "outcome": "ok",
         "rows": 1, "duration_ms": 1.8},
        {"kind": "statement", "at": T0 + 4, **WHO, "statement": "DROP TABLE orders",
         "classification": "ddl", "action": "block", "rule": "no-ddl",
         "reason": "schema changes go through migrations", "outcome": "blocked"},
        {"kind": "statement", "at": T0 + 75, **WHO, "statement": "SELECT 1/0",
         "classification": "read", "action": "allow", "rule": "reads", "outcome": "error",
         "duration_ms": 0.3, "detail": {"sqlstate": "22012"}},
    ]
    if end:
        recs.append({"kind": "disconnect", "at": T0 + 80, **WHO, "duration_ms": 80_000.0})
    return recs


def _as(flask_app: Flask, user: str) -> Auth:
    a = Auth(flask_app.test_client())
    a.login(user)
    return a


def _steps(html: str) -> list[str]:
    return re.findall(r'<li data-t="([0-9.]+)"', html)


def test_the_session_page_replays_its_verified_transcript(app: Flask, svc: Services) -> None:
    record_session(svc, _session())
    [rec] = list(svc.audit.iter_records(kind="recording"))
    carol = _as(app, "carol")
    html = carol.client.get("/audit/sessions/a1b2c3").text
    assert "Replay" in html and "3 statements over 80.0 s" in html
    assert _steps(html) == ["0.0", "1.4982", "4.0", "74.9997", "80.0"]
    replay = re.sub(r"<[^>]+>", "", html[:html.index("Audit records")])
    assert replay.index("count(*)") < replay.index("DROP TABLE") < replay.index("1/0")
    for text in ("+1.498 s", "+1:15.0", "1 row<", "1.8 ms", 'class="badge oc-blocked"',
                 "schema changes go through migrations", "SQLSTATE 22012",
                 'class="badge act-block"', "replay.js", "data-replay-controls hidden"):
        assert text in html, text
    assert rec["detail"]["sha256"] in html and "verified" in html
    assert "does not verify" not in html
    chain = carol.client.get("/audit/chain").text
    assert "Recordings intact" in chain and "1 match" in chain

    path = Recorder(svc.config.gateway.recordings).path(rec["detail"])
    path.write_bytes(path.read_bytes().replace(b"orders", b"ORDERS"))
    html = carol.client.get("/audit/sessions/a1b2c3").text
    assert "does not verify" in html and "its SHA-256 is" in html
    assert "Recordings do not verify" in carol.client.get("/audit/chain").text
    path.unlink()
    html = carol.client.get("/audit/sessions/a1b2c3").text
    assert "does not verify" in html and "cannot read it" in html
    assert "replay.js" not in html  # nothing to play


def test_an_open_session_shows_its_transcript_so_far(app: Flask, svc: Services) -> None:
    spool = record_session(svc, _session(end=False)[:2], gateway_runs_on=True)
    try:
        html = _as(app, "carol").client.get("/audit/sessions/a1b2c3").text
        assert "still open" in html and "1 statement," in html
        assert _steps(html) == ["0.0", "1.4982"]
        assert "SHA-256" not in html
    finally:
        spool.close()


def test_a_session_cut_short_by_its_gateway_says_so(app: Flask, svc: Services) -> None:
    record_session(svc, _session(end=False))  # the gateway stopped: no disconnect
    html = _as(app, "carol").client.get("/audit/sessions/a1b2c3").text
    assert "verified" in html and "gateway stopped before" in html
    assert "gateway-gone" in html


def test_a_session_without_a_transcript_has_no_replay(app: Flask, svc: Services) -> None:
    svc.audit.append([{"kind": "statement", "session_id": "old", "statement": "SELECT 1"}])
    html = _as(app, "carol").client.get("/audit/sessions/old").text
    assert "SELECT" in html and "Replay" not in html and "replay.js" not in html
