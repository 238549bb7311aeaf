"""`keyturn demo` sets portal passwords and prints the portal URL and logins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests

from tests.conftest import running_demo

pytestmark = pytest.mark.integration


def test_demo_prints_portal_logins_that_work(tmp_path: Path) -> None:
    with running_demo(tmp_path) as demo:
        banner, pport = demo.banner, demo.portal_port
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
    assert demo.proc.returncode == 0
