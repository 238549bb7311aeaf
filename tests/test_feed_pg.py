"""The change feed on a PostgreSQL store: woken by LISTEN/NOTIFY alone (its poll is
set to a minute here), across connections that share nothing in this process, after
its LISTEN connection is killed, and when transactions commit out of id order.

These tests must not depend on a server a person started: the PostgreSQL here is the
test session's own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from portal_support import make_ticket
from sqlalchemy import text

from keyturn.approvals import Approvals
from keyturn.config import parse_config
from keyturn.feed import ChangeFeed
from keyturn.launch.localpg import LocalPostgres
from keyturn.models import TicketEvent
from keyturn.services import Services, build_services
from keyturn.store import Store

pytestmark = pytest.mark.integration

CONFIG = """
store: {url_env: KEYTURN_FEED_STORE}
identity:
  users:
    alice: {groups: [engineers]}
    bob: {groups: [approvers]}
connections:
  - {name: shop, type: postgres, target: {host: 127.0.0.1}, policy: p}
policies:
  p: {rules: [{name: writes, match: {class: write}, action: review,
               review: {approvers: [approvers]}}]}
"""


@pytest.fixture(scope="module")
def url(pg: LocalPostgres) -> str:
    pg.execute("DROP DATABASE IF EXISTS keyturn_feed")
    pg.create_database("keyturn_feed")
    return (f"postgresql://{pg.superuser}:{pg.superuser_password}@127.0.0.1:{pg.port}"
            "/keyturn_feed")


@pytest.fixture
def writer(url: str, monkeypatch: pytest.MonkeyPatch) -> Services:
    """Services on their own store (own engine, own connections): they never poke the
    feed, as a gateway in another process would not."""
    monkeypatch.setenv("KEYTURN_FEED_STORE", url)
    return build_services(parse_config(CONFIG, "keyturn.yaml"))


@pytest.fixture
def feed(url: str, writer: Services) -> Iterator[ChangeFeed]:
    f = ChangeFeed(Store(url), interval=60)   # the poll cannot be what wakes it
    f.start()
    deadline = time.monotonic() + 10
    while not _listening(writer) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f
    f.stop()


def _listening(svc: Services) -> list[int]:
    with svc.store.session() as s:
        return list(s.scalars(text(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN keyturn_ticket%' "
            "AND datname = current_database()")))


def _wait(feed: ChangeFeed, gen: int, want: int, timeout: float = 5) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += feed.wait(gen + len(got), deadline - time.monotonic()) or []
    return got


def test_listen_wakes_the_feed_within_a_second(feed: ChangeFeed, writer: Services) -> None:
    assert _listening(writer), "the feed is not LISTENing"
    gen = feed.gen
    t0 = time.monotonic()
    tid = make_ticket(writer)
    created = _wait(feed, gen, 1)
    assert [(c.ticket_id, c.kind, c.requester) for c in created] == [(tid, "created", "alice")]
    assert time.monotonic() - t0 < 1.0
    # A note changes no status: it travels on the events channel.
    gen = feed.gen
    t0 = time.monotonic()
    writer.approvals.note(tid, "notified", None, {"platform": "slack", "channel": "C1"})
    noted = _wait(feed, gen, 1)
    assert [(c.ticket_id, c.kind) for c in noted] == [(tid, "notified")]
    assert time.monotonic() - t0 < 1.0


def test_feed_reconnects_when_its_listen_connection_dies(feed: ChangeFeed,
                                                          writer: Services) -> None:
    pids = _listening(writer)
    assert pids
    gen = feed.gen
    with writer.store.write() as s:
        for pid in pids:
            s.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    tid = make_ticket(writer)   # made while the listener is down
    got = _wait(feed, gen, 1, timeout=8)
    assert (tid, "created") in [(c.ticket_id, c.kind) for c in got]
    deadline = time.monotonic() + 8
    while (not _listening(writer) or set(_listening(writer)) & set(pids)) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert _listening(writer) and not set(_listening(writer)) & set(pids)
    gen = feed.gen
    t0 = time.monotonic()
    later = make_ticket(writer)
    assert [c.ticket_id for c in _wait(feed, gen, 1)] == [later]
    assert time.monotonic() - t0 < 1.0


def test_out_of_order_commits_are_not_lost(feed: ChangeFeed, writer: Services,
                                           url: str) -> None:
    """PostgreSQL hands out ids at insert: a transaction that took a smaller id may
    commit after one with a larger id was read. The feed re-reads a window."""
    tid = make_ticket(writer)
    _wait(feed, feed.gen, 1)
    other = Approvals(Store(url))
    slow_in = threading.Event()
    release = threading.Event()

    def slow() -> None:
        with other.store.write() as s:
            s.add(TicketEvent(ticket_id=tid, at=time.time(), kind="slow", actor=None,
                              detail={}))
            s.flush()                 # takes its id now
            slow_in.set()
            release.wait(10)
            s.execute(text("SELECT pg_notify('keyturn_ticket_events', 'x')"))
    th = threading.Thread(target=slow)
    th.start()
    assert slow_in.wait(5)
    gen = feed.gen
    writer.approvals.note(tid, "fast", None, {})      # a larger id, committed first
    first = _wait(feed, gen, 1)
    assert [c.kind for c in first] == ["fast"]
    release.set()
    th.join(10)
    second = _wait(feed, gen + 1, 1)
    assert [c.kind for c in second] == ["slow"]
