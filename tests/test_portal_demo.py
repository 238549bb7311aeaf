"""`keyturn demo` sets portal passwords and prints the portal URL and logins."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import running_demo

pytestmark = pytest.mark.integration


def test_demo_prints_portal_logins_that_work(tmp_path: Path) -> None:
    with running_demo(tmp_path) as demo:
        banner, pport = demo.banner, demo.portal_port
        assert f"http://127.0.0.1:{pport}/queue" in banner, banner
        # Next to the psql line: where the portal is and which password opens it.
        lines = banner.splitlines()
        at = next(i for i, line in enumerate(lines) if " psql " in line)
        m = re.search(rf"Portal http://127.0.0.1:{pport}\s+password for every demo user: (\S+)",
                      lines[at + 1])
        assert m, banner
        password = m.group(1)
        also = re.search(r"also in (\S+portal\.password)", lines[at + 2])
        assert also and Path(also.group(1)).read_text() == password
        http = requests.Session()
        base = f"http://127.0.0.1:{pport}"
        page = http.get(f"{base}/login", timeout=10).text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert csrf
        r = http.post(f"{base}/login", timeout=10, data={
            "username": "bob", "password": password, "csrf_token": csrf.group(1)})
        assert r.status_code == 200 and "Pending approvals" in r.text

        # carol, the auditor, sees that alice's read was masked, and which columns.
        token, dsn = re.search(r"PGPASSWORD=(\S+) psql \"([^\"]+)\"", banner).groups()  # type: ignore[union-attr]
        read = subprocess.run(["psql", dsn, "-XAtc", "SELECT ssn FROM customers LIMIT 2"],
                              capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, PGPASSWORD=token))
        assert read.returncode == 0 and "-" not in read.stdout, read.stdout + read.stderr
        carol = requests.Session()
        page = carol.get(f"{base}/login", timeout=10).text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert csrf
        carol.post(f"{base}/login", timeout=10, data={
            "username": "carol", "password": password, "csrf_token": csrf.group(1)})
        deadline = time.monotonic() + 15    # the audit ingester writes it within a moment
        audit = ""
        while "SELECT ssn FROM customers" not in audit and time.monotonic() < deadline:
            audit = carol.get(f"{base}/audit", timeout=10).text
            time.sleep(0.2)
        assert "SELECT ssn FROM customers" in audit
        assert re.search(r'class="masked-cols">masked: [^<]*ssn \(2\)', audit), audit[-3000:]
    assert demo.proc.returncode == 0
