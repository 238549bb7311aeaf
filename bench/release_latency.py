"""Release latency: from an approval decided in another process to the client's result.

    .venv/bin/python bench/release_latency.py [-n 50] [--stores sqlite,postgres]
                                              [--layout up|split|both] [--keep]

For each store (SQLite file; PostgreSQL database in the throwaway cluster, named by
``store: {url_env: ...}``) starts ``keyturn up`` (gateway + API) with a policy where writes
need one approver (hold mode). This process is the client: it runs N sequential
``UPDATE t SET v = v + 1 WHERE id = %s`` through the gateway (psycopg), each held. For each
one it waits until the ticket shows up in GET /api/v1/tickets?status=pending, then hands the
id to a separate approver process (bench/_approver.py, started once) that POSTs
/api/v1/tickets/<id>/approve and prints the wall-clock time right after the response.

latency = time the client got "UPDATE 1" - time the approve call returned (same clock).
The API answers after the decision has committed, and the gateway may learn of the commit
(PostgreSQL NOTIFY) before the HTTP response is back, so a latency can be negative. The
table also shows the time from sending the approve request, an upper bound.

With ``keyturn up`` the API and the gateway share one process, so the decision reaches the
held session in-process. ``--layout split`` runs ``keyturn gateway`` and ``keyturn portal`` as
two processes instead: then the decision travels through the store (SQLite: the gateway polls;
PostgreSQL: LISTEN/NOTIFY). ``both`` measures both layouts in the same run.

Targets (issue): p99 <= 50 ms with the PostgreSQL store, <= 250 ms with SQLite.
"""

from __future__ import annotations

import threading
import time

import psycopg
import requests
from _common import (
    POLICY_WRITES_REVIEWED,
    KeyturnProcess,
    Workspace,
    approver_worker,
    finish,
    machine_line,
    percentile,
    print_table,
    progress,
    run_script,
    store_arguments,
)

TARGET_P99_MS = {"postgres": 50.0, "sqlite": 250.0}


def wait_pending(kt: KeyturnProcess, api: requests.Session, after: int,
                 client: threading.Thread, timeout: float = 60) -> int:
    """The id of the first pending ticket newer than ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = api.get(f"{kt.url}/api/v1/tickets?status=pending&limit=10", timeout=10)
        r.raise_for_status()
        ids = [t["id"] for t in r.json()["tickets"] if t["id"] > after]
        if ids:
            return min(ids)
        if not client.is_alive():
            raise RuntimeError("the client finished without being held")
        time.sleep(0.005)
    raise TimeoutError(f"no pending ticket after {after} within {timeout}s")


def run_store(ws: Workspace, pg, store: str, layout: str, n: int) -> dict[str, list[float]]:
    store_url = None
    name = f"{store}-{layout}"
    if store == "postgres":
        pg.create_database(f"store_{layout}")
        store_url = f"postgresql://postgres@127.0.0.1:{pg.port}/store_{layout}"
    kt = KeyturnProcess(ws, pg, "app", POLICY_WRITES_REVIEWED, portal=True,
                        store_url=store_url, name=f"keyturn-{name}")
    kt.create_tokens("alice", "bob")
    kt.start(layout)
    progress(f"[{name}] keyturn {layout}: gateway :{kt.gateway_port}, API {kt.url}")
    worker = approver_worker(ws, kt, "bob")
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {kt.tokens['bob']}"
    lat_returned: list[float] = []
    lat_sent: list[float] = []
    last = 0
    with psycopg.connect(kt.dsn("alice", "app"), autocommit=True) as conn:
        conn.execute("SELECT 1")  # warm the session before measuring
        for i in range(1, n + 1):
            result: dict[str, object] = {}

            def client(i: int = i, result: dict = result) -> None:
                try:
                    cur = conn.execute("UPDATE t SET v = v + 1 WHERE id = %s", (i,))
                    result["done"] = time.time()
                    result["status"] = cur.statusmessage
                except Exception as exc:  # reported below
                    result["done"], result["error"] = time.time(), exc

            th = threading.Thread(target=client)
            th.start()
            last = wait_pending(kt, api, last, th)
            worker.stdin.write(f"{last}\n")
            worker.stdin.flush()
            tid, sent, returned, code = worker.stdout.readline().split()
            th.join(60)
            if th.is_alive() or "error" in result or result.get("status") != "UPDATE 1":
                raise RuntimeError(f"ticket {tid}: approve answered {code}, client got "
                                   f"{result.get('error') or result.get('status')}")
            lat_returned.append((result["done"] - float(returned)) * 1000)
            lat_sent.append((result["done"] - float(sent)) * 1000)
            if i % 10 == 0 or i == n:
                progress(f"[{name}] {i}/{n} released; last {lat_returned[-1]:.1f} ms after "
                         "the approve returned")
    finish(kt, worker)
    return {"returned": lat_returned, "sent": lat_sent}


def main() -> int:
    ap = store_arguments(__doc__, 50, "held statements per store")
    ap.add_argument("--layout", choices=("up", "split", "both"), default="up",
                    help="keyturn up (default), gateway and portal as two processes, or both")
    args = ap.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    print(f"machine: {machine_line()}")
    results = {}
    with Workspace("latency", keep=args.keep) as ws:
        progress("starting PostgreSQL (target and PostgreSQL store)")
        pg = ws.postgres("pg")
        pg.create_database("app")
        pg.execute("CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);"
                   f"INSERT INTO t (id) SELECT generate_series(1, {args.n})", dbname="app")
        layouts = ("up", "split") if args.layout == "both" else (args.layout,)
        for layout in layouts:
            for store in stores:
                pg.execute("UPDATE t SET v = 0", dbname="app")
                results[store, layout] = run_store(ws, pg, store, layout, args.n)

    print()
    print(f"release latency, {args.n} sequential held UPDATEs per store, approver in another "
          "process; ms")
    rows = []
    for (store, layout), lat in results.items():
        r, s = lat["returned"], lat["sent"]
        p99 = percentile(r, 99)
        rows.append([store, "keyturn up" if layout == "up" else "gateway + portal", len(r),
                     f"{percentile(r, 50):.1f}", f"{percentile(r, 95):.1f}",
                     f"{p99:.1f}", f"{max(r):.1f}", f"{min(r):.1f}",
                     f"{percentile(s, 50):.1f} / {percentile(s, 99):.1f}",
                     f"<= {TARGET_P99_MS[store]:.0f}",
                     "yes" if p99 <= TARGET_P99_MS[store] else "NO"])
    print_table(["store", "processes", "n", "p50", "p95", "p99", "max", "min",
                 "from sent p50 / p99", "target p99", "met?"], rows)
    return 0


if __name__ == "__main__":
    run_script(main)
