"""Live pages' event streams (portal.live) and the change feed under them (keyturn.feed),
through the real app and a real SQLite store: who may listen, what a stream says and
when, heartbeats, the bound on streams, and a change made by ANOTHER process (no
in-process bus) reaching a stream.

Streams are read with the test client unbuffered, chunk by chunk; heartbeats are made
short so nothing here waits long.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from portal_support import (  # noqa: F401 - fixtures
    CONFIG,
    Auth,
    make_services,
    make_ticket,
    svc_fixture,
)

from keyturn.feed import ChangeFeed
from keyturn.services import Services
from keyturn.store import Store
from portal import create_app

HEARTBEAT = 0.3


@pytest.fixture(name="app")
def live_app(svc: Services) -> Iterator[Flask]:
    app = create_app(svc, {"TESTING": True, "KEYTURN_LIVE_HEARTBEAT": HEARTBEAT})
    yield app
    app.extensions["keyturn_live"].feed.stop()
    svc.store.dispose()


def _as(app: Flask, user: str) -> Auth:
    a = Auth(app.test_client())
    a.login(user)
    return a


class Stream:
    """An open event stream, read one event (or comment) at a time."""

    def __init__(self, resp: Any):
        self.resp = resp
        self.chunks = iter(resp.response)
        self.buf = ""

    def next(self) -> str:
        while "\n\n" not in self.buf:
            chunk = next(self.chunks)
            self.buf += chunk.decode() if isinstance(chunk, bytes) else chunk
        block, self.buf = self.buf.split("\n\n", 1)
        return block

    def event(self) -> dict[str, str]:
        """The next event, skipping heartbeats; its fields as a dict."""
        while True:
            block = self.next()
            if not block.startswith(":"):
                return dict(line.split(": ", 1) for line in block.splitlines())

    def close(self) -> None:
        self.resp.close()


def _open(a: Auth, path: str, **headers: str) -> Stream:
    resp = a.client.get(path, buffered=False, headers=headers)
    assert resp.status_code == 200, (resp.status_code, resp.get_data(as_text=True)[:200])
    assert resp.mimetype == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-store"
    return Stream(resp)


def _since(a: Auth, page: str) -> str:
    html = a.client.get(page).text
    start = html.index("since=") + len("since=")
    return html[start:html.index('"', start)]


# ---------------------------------------------------------------- who may listen


def test_streams_need_sign_in_and_the_page_s_role(app: Flask, svc: Services) -> None:
    tid = make_ticket(svc)
    other = make_ticket(svc, approvers=("dbas",))  # bob may not see it
    anon = app.test_client()
    for path in ("/live/queue", "/live/mine", f"/live/tickets/{tid}"):
        r = anon.get(path)
        assert r.status_code == 401, path          # not a redirect to a form
        assert r.mimetype == "text/plain"
    alice = _as(app, "alice")                        # an engineer: no queue
    assert alice.client.get("/live/queue").status_code == 403
    bob = _as(app, "bob")
    assert bob.client.get(f"/live/tickets/{other}").status_code == 403
    assert bob.client.get("/live/tickets/999999").status_code == 404
    # the requester follows her own ticket and her requests
    for path in (f"/live/tickets/{tid}", "/live/mine"):
        _open(alice, path).close()


# ---------------------------------------------------------------- what a stream says


def test_stream_format_changes_and_heartbeats(app: Flask, svc: Services) -> None:
    bob = _as(app, "bob")
    since = _since(bob, "/queue")
    s = _open(bob, f"/live/queue?since={since}")
    assert s.next() == "retry: 1000"                 # reconnect after a second
    t0 = time.monotonic()
    assert s.next() == ": keep-alive"                 # nothing happened: a heartbeat
    assert time.monotonic() - t0 < HEARTBEAT * 3
    tid = make_ticket(svc)
    ev = s.event()
    assert ev["event"] == "changed" and ev["data"] == "changed"
    boot, _, gen = ev["id"].partition(".")
    assert boot == since.split(".")[0] and int(gen) >= 1
    # a "notified" note changes nothing a list shows: only heartbeats follow
    svc.approvals.note(tid, "notified", None, {"platform": "slack", "channel": "approvals"})
    assert s.next() == ": keep-alive"
    svc.approvals.vote(tid, svc.identities.identity_of("dana"), "approve", "ok", via="slack")
    assert s.event()["event"] == "changed"
    s.close()


def test_a_change_between_render_and_connect_is_not_missed(app: Flask,
                                                           svc: Services) -> None:
    bob = _as(app, "bob")
    since = _since(bob, "/queue")
    make_ticket(svc)
    live = app.extensions["keyturn_live"]
    deadline = time.monotonic() + 5
    while live.feed.token() == since and time.monotonic() < deadline:
        time.sleep(0.02)
    s = _open(bob, f"/live/queue?since={since}")
    assert s.next() == "retry: 1000"
    assert s.event()["event"] == "changed"          # at once, not at the next change
    s.close()
    # A reconnecting browser sends the last id it saw, which wins over ``since``;
    # so does a token from another process or an earlier run: refresh once.
    s = _open(bob, f"/live/queue?since={since}", **{"Last-Event-ID": live.feed.token()})
    s.next()
    assert s.next() == ": keep-alive"
    s.close()
    s = _open(bob, "/live/queue?since=0a0a0a0a.0")
    s.next()
    assert s.event()["event"] == "changed"
    s.close()


def test_a_ticket_stream_follows_one_ticket_and_closes_when_final(app: Flask,
                                                                   svc: Services) -> None:
    tid = make_ticket(svc)
    bob = _as(app, "bob")
    s = _open(bob, f"/live/tickets/{tid}?since={_since(bob, f'/tickets/{tid}')}")
    s.next()
    make_ticket(svc)                                  # another ticket: not this stream's
    assert s.next() == ": keep-alive"
    svc.approvals.note(tid, "notified", None, {"platform": "slack", "channel": "approvals"})
    assert s.event()["event"] == "changed"            # its timeline changed
    svc.approvals.vote(tid, svc.identities.identity_of("dana"), "reject", "no", via="slack")
    rest = []
    with pytest.raises(StopIteration):                # the stream ends by itself
        while True:
            rest.append(s.event()["event"])
    # (the test client reads lazily: the note's "changed" was still being sent when
    # the vote came, so one "changed" may stand for both)
    assert rest[-1] == "closed" and set(rest[:-1]) <= {"changed"}


def test_my_requests_stream_only_tells_me_of_mine(app: Flask, svc: Services) -> None:
    alice = _as(app, "alice")
    s = _open(alice, f"/live/mine?since={_since(alice, '/mine')}")
    s.next()
    make_ticket(svc, "erin")
    assert s.next() == ": keep-alive"
    make_ticket(svc, "alice")
    assert s.event()["event"] == "changed"
    s.close()


# ---------------------------------------------------------------- cost


def test_streams_are_bounded_and_give_their_place_back(tmp_path: Path) -> None:
    svc = make_services(tmp_path, "  live_clients: 2\n")
    app = create_app(svc, {"TESTING": True, "KEYTURN_LIVE_HEARTBEAT": HEARTBEAT})
    live = app.extensions["keyturn_live"]
    try:
        bob = _as(app, "bob")
        first, second = _open(bob, "/live/queue"), _open(bob, "/live/queue")
        r = bob.client.get("/live/queue")
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert "refreshes itself" in r.text
        first.close()                                 # the browser went away
        assert live.clients == 1
        third = _open(bob, "/live/queue")
        second.close()
        third.close()
        # a stream the server never started still gives its place back when closed
        bob.client.get("/live/queue", buffered=False).close()
        assert live.clients == 0
        # and the feed's stop ends open streams (the portal shutting down)
        s = _open(bob, f"/live/queue?since={live.feed.token()}")
        s.next()
        live.feed.stop()
        with pytest.raises(StopIteration):
            s.next()
    finally:
        live.feed.stop()
        svc.store.dispose()


# ---------------------------------------------------------------- the feed


def test_feed_sees_a_ticket_made_by_another_process(svc: Services, tmp_path: Path) -> None:
    """``keyturn portal`` beside ``keyturn gateway`` on SQLite: no bus between them."""
    config = tmp_path / "keyturn.yaml"
    config.write_text(CONFIG % {"db": tmp_path / "k.db", "portal_extra": ""})
    feed = ChangeFeed(Store(svc.config.store_url))
    feed.start()
    try:
        gen = feed.gen
        code = ("import sys, time\n"
                "from keyturn.launch.installed import install\n"
                "install()\n"
                "from keyturn.config import load_config\n"
                "from keyturn.services import build_services\n"
                "from portal_support import make_ticket\n"
                "svc = build_services(load_config(sys.argv[1]), upgrade=False)\n"
                "print(make_ticket(svc), time.time(), flush=True)\n"
                "time.sleep(5)\n")
        tests = str(Path(__file__).parent)
        proc = subprocess.Popen([sys.executable, "-c", code, str(config)], cwd=tests,
                                stdout=subprocess.PIPE, text=True,
                                env={"PYTHONPATH": f"{Path(tests).parent}:{tests}",
                                     "PATH": "/usr/bin:/bin"})
        try:
            assert proc.stdout is not None
            tid, made_at = proc.stdout.readline().split()
            changes = feed.wait(gen, 5)
            seen_at = time.time()
        finally:
            proc.kill()
            proc.wait()
        assert changes and [(c.ticket_id, c.kind, c.requester) for c in changes] == [
            (int(tid), "created", "alice")]
        assert seen_at - float(made_at) < 1.0
    finally:
        feed.stop()


def test_feed_wait_says_when_a_client_is_too_far_behind(svc: Services) -> None:
    from keyturn import feed as feedmod

    feed = ChangeFeed(svc.store)
    feed.start()
    try:
        assert feed.wait(feed.gen, 0.05) == []        # nothing new: a timeout
        feed.recent = feedmod.deque(maxlen=2)
        for _ in range(3):
            make_ticket(svc)
        deadline = time.monotonic() + 5
        while feed.gen < 3 and time.monotonic() < deadline:
            feed.wait(feed.gen, 0.2)
        assert feed.wait(0, 0.1) is None              # the first change is forgotten
        assert [c.gen for c in feed.wait(1, 0.1) or []] == [2, 3]
        assert feed.position(feed.token()) == feed.gen
        assert feed.position("other.1") is None and feed.position(None) is None
    finally:
        feed.stop()


def test_observers_never_break_a_write(svc: Services) -> None:
    seen: list[tuple[int, str]] = []

    def broken(_tid: int, _kind: str) -> None:
        raise RuntimeError("a display failed")

    svc.approvals.observers[:] = [broken, lambda tid, kind: seen.append((tid, kind))]
    tid = make_ticket(svc)
    svc.approvals.note(tid, "notified", None, {"platform": "slack", "channel": "x"})
    svc.approvals.vote(tid, svc.identities.identity_of("bob"), "approve", None)
    assert seen == [(tid, "created"), (tid, "notified"), (tid, "vote:approve")]
    assert svc.approvals.get(tid).status == "approved"
