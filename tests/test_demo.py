"""`keyturn demo` end to end: the command a new user runs first.

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import running_demo

pytestmark = pytest.mark.integration


def test_demo_runs_holds_and_stops_cleanly(tmp_path: Path) -> None:
    with running_demo(tmp_path) as demo:
        banner = demo.banner
        psql_line = re.search(r"PGPASSWORD=(\S+) psql \"([^\"]+)\"", banner)
        assert psql_line, banner
        token, dsn = psql_line.groups()
        env = dict(os.environ, PGPASSWORD=token)
        read = subprocess.run(["psql", dsn, "-XAtc", "SELECT count(*) FROM customers"],
                              capture_output=True, text=True, env=env, timeout=30)
        assert read.returncode == 0 and int(read.stdout) == 200, read.stderr
        blocked = subprocess.run(["psql", dsn, "-XAtc", "DROP TABLE orders"],
                                 capture_output=True, text=True, env=env, timeout=30)
        assert "blocked by rule 'no-ddl'" in blocked.stderr
        held = subprocess.Popen(["psql", dsn, "-XAtc",
                                 "DELETE FROM orders WHERE status = 'cancelled'"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        approve = re.search(r"KEYTURN_TOKEN=(\S+) .*? -c (\S+) approve", banner)
        assert approve, banner
        bob, cfg = approve.groups()
        kt_env = dict(os.environ, KEYTURN_TOKEN=bob)
        deadline = time.monotonic() + 20
        listing = ""
        while "pending" not in listing and time.monotonic() < deadline:
            listing = subprocess.run([sys.executable, "-m", "keyturn.launch", "-c", cfg, "tickets"],
                                     capture_output=True, text=True, env=kt_env).stdout
            time.sleep(0.2)
        ticket = listing.split()[1] if listing.startswith("*") else listing.split()[0]
        subprocess.run([sys.executable, "-m", "keyturn.launch", "-c", cfg, "approve", ticket],
                       check=True, capture_output=True, env=kt_env)
        out, err = held.communicate(timeout=30)
        assert held.returncode == 0 and out.startswith("DELETE "), err

        # Masking: alice reads customers' PII masked; the audit records which columns.
        rows = subprocess.run(["psql", dsn, "-XAtc", "SELECT full_name, email, ssn, card_number "
                               "FROM customers ORDER BY id LIMIT 3"],
                              capture_output=True, text=True, env=env, timeout=30)
        assert rows.returncode == 0, rows.stderr
        for line in rows.stdout.splitlines():
            name, email, ssn, card = line.split("|")
            assert name and not re.fullmatch(r"\d{3}-\d{2}-\d{4}", ssn), line
            assert re.fullmatch(r"\D*\d{4}", card) and not re.fullmatch(r"[\d -]{13,}", card)
            assert "@" in email and not re.match(r"^[a-z]+\.[a-z]+\d*@", email), line
        # A change to a customer needs two approvers: one approval keeps it held.
        two = subprocess.Popen(["psql", dsn, "-XAtc",
                                "UPDATE customers SET city = 'Boston' WHERE id = 1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 20
        listing = ""
        while "pending" not in listing and time.monotonic() < deadline:
            listing = subprocess.run([sys.executable, "-m", "keyturn.launch", "-c", cfg, "tickets"],
                                     capture_output=True, text=True, env=kt_env).stdout
            time.sleep(0.2)
        second = listing.split()[1] if listing.startswith("*") else listing.split()[0]
        assert "UPDATE customers" in listing, listing
        subprocess.run([sys.executable, "-m", "keyturn.launch", "-c", cfg, "approve", second],
                       check=True, capture_output=True, env=kt_env)
        time.sleep(1)
        assert two.poll() is None, "one approval of two released it"
        dana = re.search(r"KEYTURN_TOKEN=(\S+) .*? approve <ticket>   -- the second", banner)
        assert dana, banner
        subprocess.run([sys.executable, "-m", "keyturn.launch", "-c", cfg, "approve", second],
                       check=True, capture_output=True,
                       env=dict(os.environ, KEYTURN_TOKEN=dana.group(1)))
        out, err = two.communicate(timeout=30)
        assert two.returncode == 0 and out.startswith("UPDATE 1"), err
    assert demo.proc.returncode == 0, demo.rest
    assert "stopping PostgreSQL" in demo.rest
