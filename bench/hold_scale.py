"""Scale: 1,000 statements held at once on one gateway, then approved in bulk.

    .venv/bin/python bench/hold_scale.py [-n 1000] [--store sqlite|postgres] [--threads 16]
                                         [--keep]

Starts a throwaway PostgreSQL cluster (max_connections >= n + 150: every held client keeps
its own target connection) with a table of n rows, and ``keyturn up`` (gateway + API) with a
policy where writes need one approver. Then, from one asyncio event loop, opens n client
connections with asyncpg as alice and has each run ``UPDATE t SET v = v + 1 WHERE id = $1``
for its own row: all of them are held. Once the API lists n pending tickets, a separate
process approves them all with concurrent HTTP calls as bob (bench/_approver.py --bulk).
Reports the time to hold all, the time from the first approve to the last release, the
gateway's RSS (VmRSS) before / while holding / after, and checks in the database that every
row was updated exactly once. It also checks what approvers see on the held tickets: asyncpg
sends int4 parameters in binary with unspecified types in Parse, so each ticket's ``params``
must read as its row id (not hex) and ``detail.row_estimate`` (the planner's EXPLAIN estimate) must
be set.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time

import asyncpg
import psycopg
import requests
from _common import (
    POLICY_WRITES_REVIEWED,
    KeyturnProcess,
    Workspace,
    approver_worker,
    machine_line,
    print_table,
    progress,
    rss_kib,
    stop_process,
)


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        progress(f"RLIMIT_NOFILE soft limit raised from {soft} to {new}")


def tickets(kt: KeyturnProcess, status: str = "pending") -> list[dict]:
    r = requests.get(f"{kt.url}/api/v1/tickets?status={status}&limit=1000",
                     headers={"Authorization": f"Bearer {kt.tokens['bob']}"}, timeout=60)
    r.raise_for_status()
    return r.json()["tickets"]


def pending_ids(kt: KeyturnProcess, status: str = "pending") -> list[int]:
    return [t["id"] for t in tickets(kt, status)]


def check_tickets(held: list[dict], n: int) -> dict:
    """What approvers see: readable params (the row ids 1..n, once each) and row estimates."""
    params = [t.get("params") for t in held]
    readable = sorted(p[0] for p in params if isinstance(p, list) and len(p) == 1
                      and isinstance(p[0], str) and p[0].isdigit())
    return {
        "params_ok": readable == sorted(str(i) for i in range(1, n + 1)),
        "params_readable": len(readable),
        "params_hex": sum(1 for p in params if p and any(str(v).startswith("\\x") for v in p)),
        "params_example": params[0] if params else None,
        "estimates": sum(1 for t in held if t["detail"].get("row_estimate") is not None),
        "estimate_values": sorted({t["detail"].get("row_estimate") for t in held}, key=str),
    }


async def run_clients(kt: KeyturnProcess, ws: Workspace, n: int, threads: int) -> dict:
    out: dict = {}
    sem = asyncio.Semaphore(32)

    async def connect() -> asyncpg.Connection:
        async with sem:
            return await asyncpg.connect(host="127.0.0.1", port=kt.gateway_port, user="alice",
                                         password=kt.tokens["alice"], database="app", ssl=False,
                                         timeout=120)

    progress(f"opening {n} client connections through the gateway")
    t0 = time.monotonic()
    conns = await asyncio.gather(*(connect() for _ in range(n)))
    out["connect_s"] = time.monotonic() - t0
    progress(f"  {n} connected in {out['connect_s']:.1f}s; RSS {rss_kib(kt.proc.pid)} KiB")
    out["rss_connected"] = rss_kib(kt.proc.pid)

    try:
        return await hold_and_release(kt, ws, n, threads, conns, out)
    finally:
        # Also on Ctrl-C: drop the sockets at once rather than sending 1000 cancel requests.
        for c in conns:
            c.terminate()


async def hold_and_release(kt: KeyturnProcess, ws: Workspace, n: int, threads: int,
                           conns: list[asyncpg.Connection], out: dict) -> dict:
    done: dict[int, float] = {}
    statuses: dict[int, str] = {}

    async def update(i: int, conn: asyncpg.Connection) -> None:
        try:
            statuses[i] = await conn.execute("UPDATE t SET v = v + 1 WHERE id = $1", i)
        except Exception as exc:  # counted as a failure below
            statuses[i] = f"{type(exc).__name__}: {exc}"
        done[i] = time.time()

    progress(f"sending {n} UPDATEs (each is held)")
    t_send = time.monotonic()
    tasks = [asyncio.create_task(update(i, c)) for i, c in enumerate(conns, start=1)]
    ids: list[int] = []
    held: list[dict] = []
    while len(ids) < n:
        await asyncio.sleep(0.25)
        held = await asyncio.to_thread(tickets, kt)
        ids = [t["id"] for t in held]
        if done:
            raise RuntimeError(f"{len(done)} clients finished before approval, e.g. "
                               f"{next(iter(statuses.values()))}")
        if time.monotonic() - t_send > 600:
            raise TimeoutError(f"only {len(ids)} of {n} tickets pending after 600 s")
    out["hold_s"] = time.monotonic() - t_send
    progress(f"  {n} pending tickets after {out['hold_s']:.1f}s")
    out["tickets"] = check_tickets(held, n)
    progress(f"  tickets: {out['tickets']}")
    await asyncio.sleep(1)
    out["rss_holding"] = rss_kib(kt.proc.pid)
    progress(f"  gateway RSS while holding: {out['rss_holding']} KiB")

    progress(f"approving all {n} from another process ({threads} threads, as bob)")
    worker = approver_worker(ws, kt, "bob", "--bulk", "--threads", str(threads))
    worker.stdin.write("".join(f"{i}\n" for i in sorted(ids)))
    worker.stdin.close()
    lines = (await asyncio.to_thread(worker.stdout.read)).split("\n")
    stop_process(worker)
    approvals = [ln.split() for ln in lines if ln and ln != "done"]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)
    first_sent = min(float(a[1]) for a in approvals)
    out["approve_codes"] = sorted({a[3] for a in approvals})
    out["approve_s"] = max(float(a[2]) for a in approvals) - first_sent
    out["release_s"] = max(done.values()) - first_sent
    out["ok"] = sum(1 for s in statuses.values() if s == "UPDATE 1")
    out["errors"] = [s for s in statuses.values() if s != "UPDATE 1"][:5]
    progress(f"  last client released {out['release_s']:.1f}s after the first approve; "
             f"{out['ok']}/{n} got UPDATE 1")
    await asyncio.sleep(1)
    out["rss_after"] = rss_kib(kt.proc.pid)
    await asyncio.gather(*(c.close() for c in conns))
    await asyncio.sleep(1)
    out["rss_closed"] = rss_kib(kt.proc.pid)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=1000, help="statements held at once (<= 1000)")
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--threads", type=int, default=16, help="approver threads")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    args = ap.parse_args()
    n = args.n
    if not 0 < n <= 1000:
        ap.error("-n must be 1..1000 (the API lists at most 1000 tickets per call)")
    # Client side: n sockets here; gateway (inherits the limit): 2 per held client + store.
    raise_nofile(4 * n + 1024)
    print(f"machine: {machine_line()}")
    with Workspace("holds", keep=args.keep) as ws:
        progress("starting PostgreSQL")
        pg = ws.postgres("pg", max_connections=str(max(200, n + 150)))
        pg.create_database("app")
        pg.execute("CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);"
                   f"INSERT INTO t (id) SELECT generate_series(1, {n})", dbname="app")
        store_url = None
        if args.store == "postgres":
            pg.create_database("keyturn_store")
            store_url = f"postgresql://postgres@127.0.0.1:{pg.port}/keyturn_store"
        kt = KeyturnProcess(ws, pg, "app", POLICY_WRITES_REVIEWED, portal=True,
                            store_url=store_url)
        kt.create_tokens("alice", "bob")
        kt.start("up")
        time.sleep(1)
        rss_before = rss_kib(kt.proc.pid)
        progress(f"keyturn up ({args.store} store), RSS {rss_before} KiB")
        res = asyncio.run(run_clients(kt, ws, n, args.threads))
        with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
            once, other = c.execute("SELECT count(*) FILTER (WHERE v = 1), "
                                    "count(*) FILTER (WHERE v <> 1) FROM t").fetchone()
        deadline = time.monotonic() + 30
        while len(executed := pending_ids(kt, "executed")) < n and time.monotonic() < deadline:
            time.sleep(0.5)
        kt.stop()
        kt.report_log()
        problems = len(kt.log_problems())

    print()
    print(f"{n} statements held at once, {args.store} store, approved by one process with "
          f"{args.threads} threads")
    mib = 1024.0
    print_table(["measure", "value"], [
        ["connect n clients through the gateway", f"{res['connect_s']:.1f} s"],
        ["time to hold all (first UPDATE sent -> API lists n pending)", f"{res['hold_s']:.1f} s"],
        ["approve calls (first sent -> last returned)",
         f"{res['approve_s']:.1f} s (HTTP {', '.join(res['approve_codes'])})"],
        ["first approve sent -> last client released", f"{res['release_s']:.1f} s"],
        ["gateway RSS before", f"{rss_before / mib:.0f} MiB"],
        ["gateway RSS with n clients connected", f"{res['rss_connected'] / mib:.0f} MiB"],
        ["gateway RSS while holding n", f"{res['rss_holding'] / mib:.0f} MiB"],
        ["gateway RSS after release", f"{res['rss_after'] / mib:.0f} MiB"],
        ["gateway RSS after clients disconnected", f"{res['rss_closed'] / mib:.0f} MiB"],
        ["clients that got UPDATE 1", f"{res['ok']}/{n}"],
        ["rows updated exactly once (v = 1) / otherwise", f"{once}/{n} / {other}"],
        ["tickets in status executed", f"{len(executed)}/{n}"],
        ["held tickets whose params read as their row id (e.g. " +
         f"{res['tickets']['params_example']})",
         f"{res['tickets']['params_readable']}/{n} (hex: {res['tickets']['params_hex']})"],
        ["held tickets with a row_estimate (values)",
         f"{res['tickets']['estimates']}/{n} ({res['tickets']['estimate_values']})"],
        ["gateway log: ERROR lines / tracebacks", f"{problems}"],
    ])
    if res["errors"]:
        print(f"client errors (first {len(res['errors'])}): {res['errors']}")
    good = (res["ok"] == n and once == n and other == 0 and len(executed) == n
            and res["tickets"]["params_ok"] and res["tickets"]["estimates"] == n
            and problems == 0)
    print(f"checks: {'PASS' if good else 'FAIL'}")
    return 0 if good else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
