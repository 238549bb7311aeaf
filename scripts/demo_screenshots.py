"""Screenshots of the demo as a new user meets it, for the README.

Runs ``keyturn demo`` in a throwaway directory, plays the banner's first minutes
(alice's masked read, a write held for one approver, a customer change held for two,
a blocked DROP) with the real psql, then drives the portal in Debian's chromium as bob,
dana and carol and writes ``docs/screenshots/demo-*.png`` at laptop and phone widths.

    .venv/bin/python scripts/demo_screenshots.py [--out docs/screenshots]

It must not touch anything but its own throwaway directory and the output folder.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_demo(base: Path) -> tuple[subprocess.Popen[str], str, int]:
    gport, pport = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "keyturn.launch", "demo", "--dir",
                             str(base), "--port", str(gport), "--portal-port", str(pport)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = ""
    deadline = time.monotonic() + 120
    while "Ctrl-C stops the demo" not in banner:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"the demo did not start:\n{banner}")
        banner += proc.stdout.readline()  # type: ignore[union-attr]
    return proc, banner, pport


def psql(dsn: str, token: str, sql: str, *, wait: bool = True) -> Any:
    cmd = ["psql", dsn, "-X", "-P", "pager=off", "-c", sql]
    env = dict(os.environ, PGPASSWORD=token)
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def terminal_page(lines: list[tuple[str, str]]) -> str:
    """A terminal-looking page of (prompt+command, output) pairs."""
    body = "".join(f'<div class="cmd">shop=&gt; {html.escape(c)}</div>'
                   f'<pre>{html.escape(o)}</pre>' for c, o in lines)
    return ("<!doctype html><meta charset=utf-8><style>body{margin:0;background:#1e1f24;"
            "color:#e6e6e6;font:14px/1.45 'DejaVu Sans Mono',monospace;padding:18px}"
            ".cmd{color:#8fd18f;margin-top:10px}pre{margin:2px 0 0;white-space:pre-wrap}"
            f"</style><body><div>alice$ psql \"…user=alice…\"</div>{body}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="keyturn-demo-shots-") as tmp:
        proc, banner, pport = start_demo(Path(tmp) / "demo")
        try:
            m = re.search(r"PGPASSWORD=(\S+) psql \"([^\"]+)\"", banner)
            pw = re.search(r"password for every demo user: (\S+)", banner)
            assert m and pw, banner
            token, dsn = m.groups()
            password = pw.group(1)
            base = f"http://127.0.0.1:{pport}"
            read = "SELECT full_name, email, ssn, card_number FROM customers LIMIT 3;"
            shown = [(read, psql(dsn, token, read).stdout)]
            drop = psql(dsn, token, "DROP TABLE orders;")
            held = psql(dsn, token, "DELETE FROM orders WHERE status = 'cancelled';",
                        wait=False)
            two = psql(dsn, token, "UPDATE customers SET city = 'Boston' WHERE id = 1;",
                       wait=False)
            time.sleep(1.5)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                            args=["--no-sandbox", "--disable-dev-shm-usage"])

                def page_as(user: str | None, viewport: dict[str, int]) -> Any:
                    page = browser.new_context(viewport=viewport).new_page()
                    if user:
                        page.goto(f"{base}/login")
                        page.get_by_label("User name").fill(user)
                        page.get_by_label("Password").fill(password)
                        page.get_by_role("button", name="Sign in").click()
                        page.wait_for_url(lambda url: "/login" not in url)
                    return page

                def shoot(page: Any, name: str, tag: str) -> None:
                    page.screenshot(path=str(out / f"demo-{name}-{tag}.png"), full_page=True)

                for tag, vp in (("laptop", LAPTOP), ("phone", PHONE)):
                    bob = page_as("bob", vp)
                    bob.goto(f"{base}/queue")
                    bob.locator("li.ticket-row").nth(1).wait_for(timeout=20000)
                    shoot(bob, "queue", tag)
                    bob.locator("li.ticket-row", has_text="UPDATE customers").locator(
                        "a").first.click()
                    bob.wait_for_load_state("networkidle")
                    shoot(bob, "ticket-two-approvers", tag)
                    bob.context.close()
                # Decide: the DELETE by bob; the customer change by bob and dana.
                tickets = re.findall(r"/tickets/(\d+)", page_as("bob", LAPTOP).goto(
                    f"{base}/queue").text())
                ids = sorted({int(t) for t in tickets})
                bob = page_as("bob", LAPTOP)
                for tid in ids:
                    bob.goto(f"{base}/tickets/{tid}")
                    bob.get_by_label("Comment").fill("checked with alice")
                    bob.get_by_role("button", name="Approve").click()
                    bob.wait_for_load_state("networkidle")
                held.communicate(timeout=30)
                dana = page_as("dana", LAPTOP)
                dana.goto(f"{base}/tickets/{ids[-1]}")
                dana.get_by_role("button", name="Approve").click()
                dana.wait_for_load_state("networkidle")
                two_out, two_err = two.communicate(timeout=30)
                for tag, vp in (("laptop", LAPTOP), ("phone", PHONE)):
                    d = page_as("dana", vp)
                    d.goto(f"{base}/tickets/{ids[-1]}")
                    shoot(d, "ticket-executed", tag)
                    carol = page_as("carol", vp)
                    carol.goto(f"{base}/audit")
                    shoot(carol, "audit", tag)
                    carol.context.close()
                    d.context.close()
                shown += [("DROP TABLE orders;", drop.stderr),
                          ("UPDATE customers SET city = 'Boston' WHERE id = 1;",
                           two_err + two_out)]
                term = page_as(None, {"width": 1000, "height": 600})
                term.set_content(terminal_page(shown))
                term.screenshot(path=str(out / "demo-psql.png"), full_page=True)
                browser.close()
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    for png in sorted(out.glob("demo-*.png")):
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
