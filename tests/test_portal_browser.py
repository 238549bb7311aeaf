"""The portal in a real browser (Playwright driving Debian's chromium, headless).

End to end: bob signs in, alice's DELETE held by the real gateway appears in
his queue without a reload, he approves it and alice's psql returns its
result; then he rejects another with a reason and alice's psql shows it.
The page must raise no console errors (a CSP violation would be one).

Screenshots of every page at laptop and phone widths are taken each run; set
KEYTURN_SCREENSHOTS=1 to also write them to docs/screenshots/.

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Keyturn, make_keyturn
from portal_support import (
    PASSWORD,
    make_services,
    make_ticket,
    record_session,
    set_portal_password,
)

from bots.links import Links
from keyturn.launch.localpg import LocalPostgres
from keyturn.services import Services

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright package is not installed")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (scripts/system-deps.sh installs it)",
                allow_module_level=True)

LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module", name="shots")
def shots_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("screenshots")
    yield out
    if os.environ.get("KEYTURN_SCREENSHOTS"):
        dest = ROOT / "docs" / "screenshots"
        dest.mkdir(parents=True, exist_ok=True)
        for png in out.glob("*.png"):
            shutil.copy(png, dest / png.name)


@pytest.fixture(scope="module")
def live(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    kt = make_keyturn(tmp_path_factory.mktemp("portal-browser"), pg)
    set_portal_password(kt, "bob")
    kt.start()
    yield kt
    kt.stop()


def _sign_in(page: Any, base: str, user: str) -> None:
    page.goto(f"{base}/login")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/login" not in url)


def _console_errors(page: Any) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def test_bob_approves_and_rejects_held_statements(browser: Any, live: Keyturn,
                                                  shots: Path) -> None:
    ctx = browser.new_context(viewport=LAPTOP)
    page = ctx.new_page()
    errors = _console_errors(page)
    _sign_in(page, live.url, "bob")
    page.goto(f"{live.url}/queue")
    page.get_by_text("Nothing waiting").wait_for()
    page.evaluate("window.__noReload = true")
    live.skip_pending()

    psql = live.psql("alice", "DELETE FROM orders WHERE id = 7")
    try:
        row = page.locator("li.ticket-row").first
        row.wait_for(timeout=20000)  # appears by itself (server push), no reload
        assert page.evaluate("window.__noReload") is True
        assert "DELETE FROM orders" in row.inner_text()
        assert "you can decide" in row.inner_text()
        page.screenshot(path=str(shots / "queue-live-laptop.png"), full_page=True)
        # Keyboard users keep their place: focus survives the list refreshing itself.
        link = row.locator("a")
        link.focus()
        focused = link.get_attribute("href")
        with page.expect_response(lambda r: "/queue" in r.url and
                                  r.request.headers.get("hx-request") == "true"):
            # the list refreshes when its event stream says so; ask as an event would
            page.evaluate("htmx.trigger(document.querySelector('[data-live-poll]'), "
                          "'live-poll')")
        page.wait_for_timeout(200)
        assert page.evaluate("document.activeElement.getAttribute('href')") == focused
        link.click()
        page.wait_for_url("**/tickets/*")
        page.get_by_label("Comment (optional)").fill("one row, checked")
        page.screenshot(path=str(shots / "ticket-live-laptop.png"), full_page=True)
        page.get_by_role("button", name="Approve").click()
        page.locator(".msg-ok").wait_for()
        assert "approved" in page.locator(".msg-ok").inner_text()
        out, err = psql.communicate(timeout=30)
        assert psql.returncode == 0, err
        assert out.strip() == "DELETE 1"
        page.get_by_text("executed", exact=True).first.wait_for(timeout=10000)
    finally:
        if psql.poll() is None:
            psql.kill()

    page.goto(f"{live.url}/queue")
    page.get_by_text("Nothing waiting").wait_for()
    psql = live.psql("alice", "UPDATE orders SET status = 'void' WHERE id = 8")
    try:
        page.locator("li.ticket-row a").first.click(timeout=20000)
        page.wait_for_url("**/tickets/*")
        page.get_by_role("button", name="Reject").click()
        # The browser itself refuses an empty reason (required); nothing was sent.
        assert psql.poll() is None
        page.get_by_label("Reason (required, shown to alice)").fill("use the admin tool")
        page.get_by_role("button", name="Reject").click()
        page.locator(".msg-ok").wait_for()
        out, err = psql.communicate(timeout=30)
        assert psql.returncode != 0
        assert "rejected by bob: “use the admin tool”" in err
    finally:
        if psql.poll() is None:
            psql.kill()
    assert errors == []
    ctx.close()


# ---------------------------------------------------------------- screenshots


def _seed(svc: Services) -> None:
    now = time.time()
    bob, dana = svc.identities.identity_of("bob"), svc.identities.identity_of("dana")
    stmts = ["DELETE FROM orders WHERE status = 'cancelled' AND created_at < now() - "
             "interval '90 days'",
             "UPDATE customers SET email = lower(email) WHERE id IN (SELECT customer_id "
             "FROM orders WHERE total > 1000)",
             "INSERT INTO refunds (order_id, amount) VALUES (1042, 19.99)"]
    for day in range(13, -1, -1):
        for k in range((day * 7) % 5 + 1):
            at = now - day * 86400 - k * 700 - 3600
            tid = make_ticket(svc, ("alice", "erin")[k % 2], statement=stmts[k % 3],
                              connection=("shop", "billing")[(day + k) % 2], now=at,
                              timeout=3600)
            if k % 4 == 3:
                svc.approvals.vote(tid, bob, "reject", "please batch this with the "
                                   "weekly cleanup", via="slack", now=at + 300)
            else:
                svc.approvals.vote(tid, (bob, dana)[k % 2], "approve", "ok",
                                   via=("portal", "slack", "teams")[k % 3],
                                   now=at + 60 * (k + 1) * (day % 3 + 1))
    for tid in (make_ticket(svc, "alice", statement=stmts[0], now=now - 420),
                make_ticket(svc, "erin", statement=stmts[1], connection="billing", now=now - 95),
                make_ticket(svc, "alice", statement=stmts[2], now=now - 20)):
        svc.approvals.note(tid, "notified", None, {"platform": "slack", "channel": "approvals"})
        svc.approvals.note(tid, "notified", None, {"platform": "teams",
                                                    "channel": "19:approvers@thread.tacv2"})
    links = Links(svc.config, svc.store)
    links.link("teams", "6f1c2a7e-0b7d-4c55-9a61-2f3d8e4b1c90", "dana", by="adam")
    links.claim(links.start_claim("slack", "U04DANA7QK"), "dana")
    who = {"user": "alice", "connection": "shop", "session_id": "a1b2c3d4e5",
           "client_addr": "10.0.3.14", "protocol": "postgres"}
    start = now - 900
    record_session(svc, [  # through the spool and the ingester: the session's transcript
        {"kind": "connect", "at": start, **who, "detail": {"application": "psql"}},
        {"kind": "statement", "at": start + 4.2, **who,
         "statement": "SELECT id, status, total FROM orders ORDER BY id DESC LIMIT 20",
         "action": "allow", "classification": "read", "rule": "reads", "outcome": "ok",
         "rows": 20, "duration_ms": 1.8},
        {"kind": "statement", "at": start + 9.0, **who, "statement": "DROP TABLE orders",
         "action": "block", "classification": "ddl", "rule": "no-ddl",
         "reason": "schema changes go through migrations", "outcome": "blocked"},
        {"kind": "statement", "at": start + 71.5, **who, "statement": stmts[0],
         "action": "review", "classification": "write", "rule": "writes", "ticket_id": 1,
         "outcome": "approved", "rows": 12, "duration_ms": 55_012.4},
        {"kind": "statement", "at": start + 80.1, **who, "statement": "SELECT 1/0",
         "action": "allow", "classification": "read", "rule": "reads", "outcome": "error",
         "duration_ms": 0.4, "detail": {"sqlstate": "22012"}},
        {"kind": "disconnect", "at": start + 84.0, **who, "duration_ms": 84_000.0},
    ])


@pytest.fixture(scope="module")
def seeded_portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from werkzeug.serving import make_server

    from portal import create_app

    svc = make_services(tmp_path_factory.mktemp("portal-shots"))
    _seed(svc)
    server = make_server("127.0.0.1", 0, create_app(svc), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.port}"
    server.shutdown()
    svc.store.dispose()


PAGES = [  # (name, user, path)
    ("login", None, "/login"),
    ("queue", "bob", "/queue"),
    ("ticket", "bob", "/tickets/{pending}"),
    ("mine", "alice", "/mine"),
    ("history", "carol", "/history"),
    ("audit", "carol", "/audit"),
    ("session", "carol", "/audit/sessions/a1b2c3d4e5"),
    ("export", "carol", "/export"),
    ("tokens", "alice", "/tokens"),
    ("chat-accounts", "dana", "/chat-accounts"),
    ("policies", "alice", "/policies"),
    ("dashboard", "mona", "/dashboard"),
    ("error-403", "alice", "/dashboard"),
]


@pytest.mark.parametrize("viewport_name", ["laptop", "phone"])
def test_screenshots_of_every_page(browser: Any, seeded_portal: str, shots: Path,
                                   viewport_name: str) -> None:
    viewport = LAPTOP if viewport_name == "laptop" else PHONE
    contexts: dict[str | None, Any] = {}
    for name, user, path in PAGES:
        if user not in contexts:
            ctx = browser.new_context(viewport=viewport)
            page = ctx.new_page()
            contexts[user] = (ctx, page, _console_errors(page))
            if user:
                _sign_in(page, seeded_portal, user)
        _, page, errors = contexts[user]
        if "{pending}" in path:
            page.goto(f"{seeded_portal}/queue")
            href = page.locator("li.ticket-row a").first.get_attribute("href")
            path = href
        resp = page.goto(f"{seeded_portal}{path}")
        assert resp is not None
        assert resp.status == (403 if name.startswith("error") else 200), name
        if name == "audit":
            page.locator(".chain-ok").wait_for()
        # Nothing overflows the viewport sideways (tables scroll inside their box).
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, (name, viewport_name, overflow)
        # Long lists: the first screenful says it all.
        page.screenshot(path=str(shots / f"{name}-{viewport_name}.png"),
                        full_page=name not in ("history", "audit", "mine"))
        if name.startswith("error"):  # the browser logs the page's own 403 status
            errors[:] = [e for e in errors if "status of 403" not in e]
        assert errors == [], (name, errors)
    for ctx, _, _ in contexts.values():
        ctx.close()
    assert len(list(shots.glob(f"*-{viewport_name}.png"))) >= len(PAGES)


@pytest.mark.parametrize("viewport_name", ["laptop", "phone"])
def test_the_session_replay_plays_and_steps(browser: Any, seeded_portal: str, shots: Path,
                                            viewport_name: str) -> None:
    """The replay's controls work in the browser alone: step, play to the end, show all;
    no request goes to the server while it plays."""
    ctx = browser.new_context(viewport=LAPTOP if viewport_name == "laptop" else PHONE)
    page = ctx.new_page()
    errors = _console_errors(page)
    _sign_in(page, seeded_portal, "carol")
    page.goto(f"{seeded_portal}/audit/sessions/a1b2c3d4e5")
    steps = page.locator("ol.replay > li")
    assert steps.count() == 6
    assert "verified" in page.locator(".digest").inner_text()
    pos = page.locator("[data-replay-pos]")
    assert pos.inner_text() == "all 6 steps"
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.get_by_role("button", name="Next step").click()
    assert pos.inner_text() == "step 1 of 6"
    assert page.locator("ol.replay > li:visible").count() == 1
    page.get_by_role("button", name="Next step").click()
    page.get_by_role("button", name="Next step").click()
    assert pos.inner_text() == "step 3 of 6"
    current = page.locator("ol.replay > li.current")
    assert "DROP TABLE orders" in current.inner_text() and "blocked" in current.inner_text()
    page.screenshot(path=str(shots / f"session-replay-step-{viewport_name}.png"),
                    full_page=True)
    page.get_by_role("button", name="Previous step").click()
    assert pos.inner_text() == "step 2 of 6"
    page.select_option("[data-act=speed]", "16")
    page.get_by_role("button", name="Play").click()
    assert page.get_by_role("button", name="Pause").is_visible()
    # (wait_for_function would evaluate a string: the portal's CSP forbids that)
    pos.get_by_text("all 6 steps").wait_for(timeout=15000)
    assert page.locator("ol.replay > li:visible").count() == 6
    assert page.get_by_role("button", name="Play").is_visible()
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, overflow
    page.screenshot(path=str(shots / f"session-replay-{viewport_name}.png"), full_page=True)
    assert requests == [], "the replay asked the server for something"
    assert errors == []
    ctx.close()
