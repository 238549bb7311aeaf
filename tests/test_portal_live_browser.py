"""Live pages in a real browser (Playwright, Debian's chromium): the queue shows a ticket
another process held within a second, with no reload; what a person types on a ticket
page survives other people's votes and late chat notifications; a decision made
elsewhere disables the form and keeps the text; countdowns count without asking the
server; and with no event stream the pages fall back to polling.

The portal runs in this process on a real SQLite store; tickets are made the way the
gateway makes them (keyturn.approvals), from another process where it matters (no
in-process bus can help there).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from portal_support import CONFIG, make_services, make_ticket
from test_portal_browser import (  # noqa: F401 - fixtures
    LAPTOP,
    PHONE,
    _console_errors,
    _sign_in,
    browser_fixture,
    shots_fixture,
)

from keyturn.services import Services

TESTS = Path(__file__).resolve().parent
# Another process holding a ticket, as `keyturn gateway` beside `keyturn portal` does.
HOLD = """
import sys, time
from keyturn.launch.installed import install
install()
from keyturn.config import load_config
from keyturn.services import build_services
from portal_support import make_ticket
svc = build_services(load_config(sys.argv[1]), upgrade=False)
for line in sys.stdin:
    tid = make_ticket(svc, timeout=float(line))
    print(tid, time.time(), flush=True)
"""


@dataclass
class Portal:
    url: str
    svc: Services
    config: Path


def _serve(tmp: Path, extra: str = "") -> Iterator[Portal]:
    from werkzeug.serving import make_server

    from portal import create_app

    svc = make_services(tmp, extra)
    config = tmp / "keyturn.yaml"
    config.write_text(CONFIG % {"db": tmp / "k.db", "portal_extra": extra})
    app = create_app(svc)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Portal(f"http://127.0.0.1:{server.port}", svc, config)
    app.extensions["keyturn_live"].feed.stop()
    server.shutdown()
    svc.store.dispose()


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    yield from _serve(tmp_path_factory.mktemp("portal-live"))


class Holder:
    """A second process that holds tickets on the same store when asked."""

    def __init__(self, config: Path):
        env = dict(os.environ, PYTHONPATH=f"{TESTS.parent}:{TESTS}")
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(config)], cwd=TESTS,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)

    def hold(self, timeout: float = 600) -> tuple[int, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{timeout}\n")
        self.proc.stdin.flush()
        tid, at = self.proc.stdout.readline().split()
        return int(tid), float(at)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _page(chromium: Any, base: str, user: str, viewport: dict[str, int] = LAPTOP
          ) -> tuple[Any, Any, list[str]]:
    ctx = chromium.new_context(viewport=viewport)
    page = ctx.new_page()
    errors = _console_errors(page)
    _sign_in(page, base, user)
    return ctx, page, errors


def _wait_open(page: Any) -> None:
    page.locator('[sse-connect][data-live-state="open"]').wait_for(state="attached",
                                                                   timeout=5000)


def test_the_queue_shows_a_ticket_held_by_another_process_within_a_second(
        browser: Any, portal: Portal, shots: Path) -> None:
    ctx, page, errors = _page(browser, portal.url, "bob")
    page.goto(f"{portal.url}/queue")
    _wait_open(page)
    page.evaluate("window.__noReload = true")
    holder = Holder(portal.config)
    latencies = []
    try:
        for _ in range(8):
            tid, held_at = holder.hold()
            page.locator(f'li.ticket-row[data-ticket="{tid}"]').wait_for(timeout=5000)
            latencies.append(time.time() - held_at)
    finally:
        holder.close()
    assert page.evaluate("window.__noReload") is True       # no reload, no navigation
    assert max(latencies) < 1.0, latencies
    # A decision anywhere takes it off the queue as quickly.
    t0 = time.time()
    portal.svc.approvals.vote(tid, portal.svc.identities.identity_of("dana"), "approve", None,
                              via="slack")
    page.locator(f'li.ticket-row[data-ticket="{tid}"]').wait_for(state="detached",
                                                                 timeout=5000)
    assert time.time() - t0 < 1.0
    page.screenshot(path=str(shots / "queue-live-sse-laptop.png"), full_page=True)
    assert errors == []
    ctx.close()


def test_countdowns_count_in_the_browser_without_asking_the_server(
        browser: Any, portal: Portal) -> None:
    tid = make_ticket(portal.svc, timeout=600)
    ctx, page, errors = _page(browser, portal.url, "bob")
    for path, sel in (("/queue", f'li[data-ticket="{tid}"] .left'),
                      (f"/tickets/{tid}", "#ticket-state .left")):
        page.goto(f"{portal.url}{path}")
        _wait_open(page)
        left = page.locator(sel)
        first = left.inner_text()
        requests: list[str] = []

        def seen(r: Any, requests: list[str] = requests) -> None:
            requests.append(r.url)

        page.on("request", seen)
        page.wait_for_timeout(2100)
        second = left.inner_text()
        assert first != second, (path, first, second)
        # the server's words ("9m 58s"), recomputed in the browser
        assert re.fullmatch(r"\d+m \d\ds", first) and re.fullmatch(r"\d+m \d\ds", second)
        page.remove_listener("request", seen)
        assert [u for u in requests if "/live/" not in u] == [], requests
    assert errors == []
    ctx.close()


def _type_slowly(page: Any) -> None:
    page.get_by_label("Comment (optional)").fill("looked at the plan, 42 rows")
    reason = page.get_by_label("Reason (required, shown to alice)")
    reason.click()
    reason.press_sequentially("only if the nightly job is done", delay=5)
    reason.press("Home")  # the caret somewhere a swap would lose it


@pytest.mark.parametrize("viewport_name", ["laptop", "phone"])
def test_typing_survives_another_approver_s_vote_and_a_late_notification(
        browser: Any, portal: Portal, shots: Path, viewport_name: str) -> None:
    svc = portal.svc
    tid = make_ticket(svc, n=2)  # two approvals: dana's vote does not decide it
    ctx, page, errors = _page(browser, portal.url, "bob",
                              LAPTOP if viewport_name == "laptop" else PHONE)
    page.goto(f"{portal.url}/tickets/{tid}")
    _wait_open(page)
    _type_slowly(page)
    page.evaluate("document.getElementById('decide').__kept = true")
    # a late "notified" from the chat bot, then dana approves in Slack
    svc.approvals.note(tid, "notified", None, {"platform": "slack", "channel": "approvals"})
    page.get_by_text("notified in Slack #approvals").wait_for(timeout=2000)
    svc.approvals.vote(tid, svc.identities.identity_of("dana"), "approve", "fine by me",
                       via="slack")
    page.get_by_text("dana approved").wait_for(timeout=2000)
    assert page.locator("#ticket-state .approvals").inner_text() == "1 of 2"
    # the form was never replaced: same element, same text, same focus and caret
    assert page.evaluate("document.getElementById('decide').__kept") is True
    assert page.get_by_label("Comment (optional)").input_value() == \
        "looked at the plan, 42 rows"
    assert page.get_by_label("Reason (required, shown to alice)").input_value() == \
        "only if the nightly job is done"
    assert page.evaluate("document.activeElement.id") == "reason"
    assert page.evaluate("document.activeElement.selectionStart") == 0
    page.screenshot(path=str(shots / f"ticket-typing-{viewport_name}.png"), full_page=True)
    # bob's own approval now decides it, with his comment
    page.get_by_role("button", name="Approve").click()
    page.locator(".msg-ok").wait_for()
    assert svc.approvals.get(tid).status == "approved"
    assert svc.approvals.get(tid).decision_comment == "looked at the plan, 42 rows"
    assert errors == []
    ctx.close()


@pytest.mark.parametrize("viewport_name", ["laptop", "phone"])
def test_a_decision_elsewhere_disables_the_form_and_keeps_the_text(
        browser: Any, portal: Portal, shots: Path, viewport_name: str) -> None:
    svc = portal.svc
    tid = make_ticket(svc)
    ctx, page, errors = _page(browser, portal.url, "bob",
                              LAPTOP if viewport_name == "laptop" else PHONE)
    page.goto(f"{portal.url}/tickets/{tid}")
    _wait_open(page)
    _type_slowly(page)
    t0 = time.time()
    svc.approvals.vote(tid, svc.identities.identity_of("dana"), "reject",
                       "use the admin tool", via="teams")
    warn = page.locator("#decide .msg-warn")
    warn.wait_for(timeout=2000)
    assert time.time() - t0 < 1.0
    assert "rejected by dana" in warn.inner_text()
    assert "Nothing you typed below was sent" in warn.inner_text()
    comment = page.get_by_label("Comment (optional)")
    reason = page.get_by_label("Reason (required, shown to alice)")
    assert comment.is_disabled() and reason.is_disabled()
    assert comment.input_value() == "looked at the plan, 42 rows"
    assert reason.input_value() == "only if the nightly job is done"
    assert page.get_by_role("button", name="Approve").is_disabled()
    assert page.get_by_role("button", name="Reject").is_disabled()
    state = page.locator("#ticket-state").inner_text()
    assert "rejected" in state and "Rejected by dana" in state
    timeline = page.locator("#ticket-timeline").inner_text()
    assert "dana rejected: use the admin tool in Teams" in timeline  # <q> adds the quotes
    assert "vote:" not in timeline
    # the ticket is final: its stream was closed and nothing polls
    page.locator('[sse-connect][data-live-state="closed"]').wait_for(state="attached",
                                                                     timeout=3000)
    page.screenshot(path=str(shots / f"ticket-decided-elsewhere-{viewport_name}.png"),
                    full_page=True)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, overflow
    assert errors == []
    ctx.close()


def test_without_event_streams_the_pages_poll(browser: Any,
                                              tmp_path_factory: pytest.TempPathFactory
                                              ) -> None:
    """A portal process at its stream limit (here 0) answers 503; pages poll instead."""
    for p in _serve(tmp_path_factory.mktemp("portal-nolive"), "  live_clients: 0\n"):
        ctx, page, _errors = _page(browser, p.url, "bob")
        page.goto(f"{p.url}/queue")
        page.locator('[sse-connect][data-live-state="down"]').wait_for(state="attached",
                                                                       timeout=5000)
        tid = make_ticket(p.svc)
        page.locator(f'li.ticket-row[data-ticket="{tid}"]').wait_for(timeout=6000)
        page.goto(f"{p.url}/tickets/{tid}")
        page.get_by_label("Comment (optional)").fill("still here")
        p.svc.approvals.vote(tid, p.svc.identities.identity_of("dana"), "approve", None)
        page.locator("#decide .msg-warn").wait_for(timeout=6000)
        assert page.get_by_label("Comment (optional)").input_value() == "still here"
        ctx.close()
