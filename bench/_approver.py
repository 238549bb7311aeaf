"""Approver worker for the benchmarks: a separate process that approves tickets.

    KEYTURN_TOKEN=<approver's token> python bench/_approver.py URL [--bulk --threads N]

Line mode (default): reads one ticket id per line on stdin, POSTs
/api/v1/tickets/<id>/approve, and prints ``<id> <t_sent> <t_returned> <http status>``
(wall-clock time.time(), taken right before the request and right after the
response returned) for each, flushing at once.

Bulk mode: reads ids until EOF, approves them all with N threads, prints the
same line per ticket, then ``done``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

_local = threading.local()


def approve(base: str, token: str, ticket_id: int) -> str:
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
    sent = time.time()
    resp = session.post(f"{base}/api/v1/tickets/{ticket_id}/approve",
                        json={"comment": "bench"}, timeout=60)
    returned = time.time()
    return f"{ticket_id} {sent:.6f} {returned:.6f} {resp.status_code}"


def main() -> int:
    base = sys.argv[1].rstrip("/")
    bulk = "--bulk" in sys.argv
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 16
    token = os.environ["KEYTURN_TOKEN"]
    if not bulk:
        for line in sys.stdin:
            if line.strip():
                print(approve(base, token, int(line)), flush=True)
        return 0
    ids = [int(line) for line in sys.stdin if line.strip()]
    with ThreadPoolExecutor(threads) as pool:
        for out in pool.map(lambda i: approve(base, token, i), ids):
            print(out)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
