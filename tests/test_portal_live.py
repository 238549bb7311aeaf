"""The portal of a real ``keyturn up`` process over real HTTP, with statements
held by the real gateway from a real psql: the queue updates live (the same
HTMX requests a browser makes), a decision in the portal releases or rejects
the held statement, and alice's psql sees the result or the reason.

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import KEYTURN, Keyturn, make_keyturn
from portal_support import PASSWORD, set_portal_password

from keyturn.launch.localpg import LocalPostgres


@pytest.fixture(scope="module")
def live(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    kt = make_keyturn(tmp_path_factory.mktemp("portal-live"), pg)
    for user in ("alice", "bob", "erin", "carol"):
        set_portal_password(kt, user)
    kt.start()
    yield kt
    kt.stop()


class Browserless:
    """What the portal's pages do, over HTTP: sign in, then HTMX requests."""

    def __init__(self, kt: Keyturn, user: str):
        self.base = kt.url
        self.http = requests.Session()
        page = self.http.get(f"{self.base}/login", timeout=10)
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token
        r = self.http.post(f"{self.base}/login", data={
            "username": user, "password": PASSWORD, "csrf_token": token.group(1)},
            allow_redirects=False, timeout=10)
        assert r.status_code == 303, r.text
        body = self.http.get(f"{self.base}/queue", timeout=10).text
        m = re.search(r'<body hx-ext="sse" hx-headers=\'\{"X-CSRF-Token": "([^"]+)"\}\'>', body)
        assert m, "the page carries the CSRF token for HTMX"
        self.csrf = m.group(1)

    def fragment(self, path: str) -> str:
        r = self.http.get(f"{self.base}{path}", headers={"HX-Request": "true"}, timeout=10)
        assert r.status_code == 200
        return r.text

    def decide(self, ticket: int, vote: str, **form: str) -> requests.Response:
        return self.http.post(f"{self.base}/tickets/{ticket}/{vote}", data=form, timeout=10,
                              headers={"HX-Request": "true", "X-CSRF-Token": self.csrf})


def _wait_in_queue(bob: Browserless, kt: Keyturn, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = [int(i) for i in re.findall(r'data-ticket="(\d+)"', bob.fragment("/queue"))]
        new = [i for i in ids if i > kt.last_ticket]
        if new:
            kt.last_ticket = max(new)
            return min(new)
        time.sleep(0.2)
    raise TimeoutError(f"no ticket appeared in the queue\n{kt.log()[-3000:]}")


def test_queue_updates_live_and_approval_releases_psql(live: Keyturn) -> None:
    bob = Browserless(live, "bob")
    live.skip_pending()
    before = bob.fragment("/queue")
    psql = live.psql("alice", "DELETE FROM orders WHERE id = 3")
    try:
        tid = _wait_in_queue(bob, live)
        assert f'data-ticket="{tid}"' not in before
        row = bob.fragment("/queue").split(f'data-ticket="{tid}"')[1].split("</li>")[0]
        assert "● you can decide" in row and "alice" in row and "DELETE FROM orders" in row
        page = bob.http.get(f"{live.url}/tickets/{tid}", timeout=10).text
        assert "10m" in page or "9m" in page  # time left
        r = bob.decide(tid, "approve", comment="one row, fine")
        assert r.status_code == 200 and f"Ticket {tid} approved." in r.text
        out, err = psql.communicate(timeout=30)
        assert psql.returncode == 0, err
        assert out.strip() == "DELETE 1"
    finally:
        if psql.poll() is None:
            psql.kill()
    assert f'data-ticket="{tid}"' not in bob.fragment("/queue")
    # The timeline shows the execution the gateway reported.
    deadline = time.monotonic() + 10
    while "executed" not in bob.fragment(f"/tickets/{tid}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "executed: 1 row<" in bob.fragment(f"/tickets/{tid}")


def test_rejection_reason_reaches_psql_and_my_requests(live: Keyturn) -> None:
    bob = Browserless(live, "bob")
    alice = Browserless(live, "alice")
    live.skip_pending()
    psql = live.psql("alice", "UPDATE orders SET status = 'x' WHERE id = 4")
    try:
        tid = _wait_in_queue(bob, live)
        assert f"#{tid}" in alice.fragment("/mine")  # alice sees her held request
        r = bob.decide(tid, "reject", reason="")
        assert r.status_code == 400  # a reason is required; nothing was decided
        r = bob.decide(tid, "reject", reason="use the admin tool")
        assert r.status_code == 200
        out, err = psql.communicate(timeout=30)
        assert psql.returncode != 0
        assert f"ticket {tid} rejected by bob: “use the admin tool”" in err
    finally:
        if psql.poll() is None:
            psql.kill()
    mine = alice.fragment("/mine")
    assert "rejected" in mine and "use the admin tool" in mine


def test_requester_cannot_approve_own_held_statement(live: Keyturn) -> None:
    erin = Browserless(live, "erin")  # approver and engineer
    bob = Browserless(live, "bob")
    live.skip_pending()
    psql = live.psql("erin", "DELETE FROM orders WHERE id = 5")
    try:
        tid = _wait_in_queue(bob, live)
        r = erin.decide(tid, "approve")
        assert r.status_code == 403 and "separation of duties" in r.text
        carol = Browserless(live, "carol")  # auditor: read-only
        r = carol.decide(tid, "approve")
        assert r.status_code == 403
        r = erin.http.post(f"{live.url}/tickets/{tid}/approve", timeout=10,
                           headers={"HX-Request": "true"})  # no CSRF token
        assert r.status_code == 403
        assert bob.decide(tid, "reject", reason="cleanup later").status_code == 200
        psql.communicate(timeout=30)
    finally:
        if psql.poll() is None:
            psql.kill()


def test_set_password_cli_refuses_bad_input(live: Keyturn) -> None:
    for user, password, needle in (("zed", "long-enough-pw", "unknown user 'zed'"),
                                   ("bob", "short", "at least 10 characters")):
        res = subprocess.run([*KEYTURN, "-c", str(live.config), "user", "set-password", user,
                              "--password-stdin"], input=password + "\n", text=True,
                             capture_output=True, timeout=60)
        assert res.returncode == 2 and needle in res.stderr
    # bob's password is unchanged
    Browserless(live, "bob")
    assert Path(sys.executable).exists()
