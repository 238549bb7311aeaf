"""A policy reload (SIGHUP) starts a new generation of decisions: sessions that are already
open, and the compiled fast path that answers their repeated statements without asking
Python, decide with the new policies from the next statement on. A reload that would
change more than policies is refused and the policies in force stay."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import Keyturn, make_keyturn

NO_ORDERS = """
      - name: orders-closed-for-audit
        match: {tables: ["public.orders"]}
        action: block
        reason: orders are frozen for the audit
"""


@pytest.fixture()
def kt(pg: LocalPostgres, tmp_path: Path) -> Iterator[Keyturn]:
    kt = make_keyturn(tmp_path / "reload", pg)
    kt.start()
    yield kt
    kt.stop()


def reload(kt: Keyturn, text: str) -> None:
    kt.config.write_text(text)
    assert kt.proc is not None
    kt.proc.send_signal(signal.SIGHUP)


def log_says(kt: Keyturn, needle: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in (kt.base / "keyturn.log").read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False


def blocked(c: psycopg.Connection, sql: str, params: tuple = ()) -> bool:
    try:
        c.execute(sql, params or None)
        return False
    except psycopg.errors.InsufficientPrivilege as exc:
        assert "orders are frozen" in str(exc)
        return True


def test_open_sessions_and_the_fast_path_follow_a_reload(kt: Keyturn) -> None:
    original = kt.config.read_text()
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        for i in range(50):  # simple protocol, and a prepared statement
            c.execute(f"SELECT count(*) FROM orders WHERE id > {i}").fetchone()
            c.execute("SELECT count(*) FROM orders WHERE id > %s", (i,), prepare=True)
        assert "rules:\n      - name: no-file-access" in original
        reload(kt, original.replace("rules:\n      - name: no-file-access",
                                    "rules:" + NO_ORDERS + "      - name: no-file-access", 1))
        assert log_says(kt, "policies reloaded from")
        assert blocked(c, "SELECT count(*) FROM orders WHERE id > 7")
        assert blocked(c, "SELECT count(*) FROM orders WHERE id > %s", (7,))
        assert c.execute("SELECT 1").fetchone() == (1,)  # the rest of the policy stands
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        assert blocked(c, "SELECT count(*) FROM orders")
    # And back: the block goes away again for everyone.
    reload(kt, original)
    deadline = time.monotonic() + 10
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        while time.monotonic() < deadline:
            if not blocked(c, "SELECT count(*) FROM orders"):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the second reload did not take effect")
    deadline = time.monotonic() + 15
    while kt.cli("audit", "export").stdout.count('"policy_reload"') < 2:
        assert time.monotonic() < deadline, "the reloads were not audited"
        time.sleep(0.2)


def test_a_reload_that_changes_more_than_policies_is_refused(kt: Keyturn) -> None:
    original = kt.config.read_text()
    changed = original.replace("rules:\n      - name: no-file-access",
                               "rules:" + NO_ORDERS + "      - name: no-file-access", 1)
    alice = "    alice: {groups: [engineers]}"
    changed = changed.replace(alice, alice + "\n    mallory: {groups: [engineers]}", 1)
    assert "mallory" in changed
    reload(kt, changed)
    assert log_says(kt, "config reload refused")
    assert "users changed" in (kt.base / "keyturn.log").read_text()
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        assert not blocked(c, "SELECT count(*) FROM orders")
    reload(kt, "store: [not valid")
    assert log_says(kt, "config reload refused, the policies in force stay: ")
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        assert not blocked(c, "SELECT count(*) FROM orders")
