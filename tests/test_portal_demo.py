"""`keyturn demo` sets portal passwords and prints the portal URL and logins."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import free_port, wait_port

pytestmark = pytest.mark.integration


def test_demo_prints_portal_logins_that_work(tmp_path: Path) -> None:
    gport, pport = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyturn.cli", "demo", "--dir", str(tmp_path / "demo"),
         "--port", str(gport), "--portal-port", str(pport)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(gport, timeout=60, proc=proc)
        banner = ""
        deadline = time.monotonic() + 30
        while "Ctrl-C stops the demo" not in banner and time.monotonic() < deadline:
            banner += proc.stdout.readline()  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{pport}/queue" in banner, banner
        m = re.search(r"password (\S+)\s+\(also in (\S+)\)", banner)
        assert m, banner
        password = m.group(1)
        assert Path(m.group(2)).read_text() == password
        http = requests.Session()
        base = f"http://127.0.0.1:{pport}"
        page = http.get(f"{base}/login", timeout=10).text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert csrf
        r = http.post(f"{base}/login", timeout=10, data={
            "username": "bob", "password": password, "csrf_token": csrf.group(1)})
        assert r.status_code == 200 and "Pending approvals" in r.text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
