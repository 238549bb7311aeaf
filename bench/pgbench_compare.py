"""Throughput: pgbench through Keyturn, next to direct PostgreSQL, pgbouncer and a bare relay.

``--builtin tpcb-like`` (or simple-update) runs pgbench's write workloads with a policy that
allows writes to the pgbench tables: every write then runs with the read-only guard's write
access and every read inside a transaction in its read-only savepoint
(docs/postgres-gateway.md); the default is select-only (-S).

    .venv/bin/python bench/pgbench_compare.py [--duration 20] [--rounds 1] [--clients 8]
                                              [--modes simple,extended,prepared]
                                              [--keep] [--profile]

Starts, under one temp directory: a throwaway PostgreSQL cluster (pgbench -i -s 10),
pgbouncer (session pooling, trust auth), a bare asyncio.Protocol relay on uvloop
(bench/_relay.py: forwards bytes both ways with transport.write and nothing else, the ceiling
of a Python relay on this machine) and ``keyturn gateway`` with a SQLite store and a policy
that allows read/transaction/session and blocks everything else, so every statement is
classified, decided and audited. Then, for each protocol mode (simple, prepared), runs
``pgbench -S -M <mode> -c 8 -j 2 -T <duration> -n`` against each target in turn and prints
TPS side by side, plus Keyturn/pgbouncer and Keyturn/relay, and the CPU each proxy used.
With ``--rounds N`` all of that is repeated N times, in alternating target order, and the
table shows each round and the median (runs on a shared 2-core VM drift by 20 % and more).

Before every measured run the script waits until Keyturn's audit ingester has caught up
with the spool (at most 180 s), so that no target, a baseline or Keyturn, is measured while
the ingester works off the previous Keyturn run's records; the ingester's own CPU is
reported per audited statement next to the table (the ingester defers its work while the
machine is busy, see docs/operations.md, so a 20 s run does not pay for it).

Audit check: the gateway appends audit records to a local spool that its lower-priority
child (``keyturn audit ingest --follow``) moves into the store. After the runs the script
stops the gateway with SIGTERM (it closes the spool and waits for the ingester to drain it),
checks that the spool directory is empty, counts per mode the pgbench statements audited as
``ok`` against the transactions pgbench reports, and runs ``keyturn audit verify``.

``--profile`` adds one more keyturn run in simple mode after the measured ones (not in the
table), with py-spy sampling the gateway (``--gil --nonblocking``, raw stacks kept in the work
directory), and prints where the gateway's GIL-held samples are: inside its two
``transport.write`` calls (to the client and to the target), framing, analysis, policy, the
audit spool, other session code, and the event loop itself.

pgbouncer comes from Debian (``apt-get install pgbouncer``; ``make bench`` installs it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    BENCH_DIR,
    CLK_TCK,
    POLICY_READS_ONLY,
    POLICY_WRITES_ALLOWED,
    KeyturnProcess,
    Workspace,
    child_pids,
    cpu_ticks,
    free_port,
    machine_cpu,
    machine_line,
    print_table,
    progress,
    service_user,
    wait_port,
)

PGBOUNCER = "/usr/sbin/pgbouncer"
MODES = ("simple", "extended", "prepared")
TARGETS = ("postgres", "pgbouncer", "relay", "keyturn")
HEADINGS = {"postgres": "postgres", "pgbouncer": "pgbouncer", "relay": "bare relay",
            "keyturn": "keyturn"}
TPS = re.compile(r"^tps = ([\d.]+) \((?:without initial connection time|"
                 r"excluding connections establishing)\)", re.M)
PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
# pgbench -S runs this one statement per transaction; -M prepared sends it with $1.
PGBENCH_SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = %"


def ensure_pgbouncer() -> None:
    if os.access(PGBOUNCER, os.X_OK):
        return
    if os.geteuid() != 0:
        sys.exit("pgbouncer is missing: run `sudo apt-get install -y pgbouncer` (or make bench)")
    progress("installing pgbouncer with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "pgbouncer"],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def start_pgbouncer(ws: Workspace, pg_port: int, clients: int) -> int:
    """pgbouncer in the foreground, as the postgres user when we are root."""
    d = ws.base / "pgbouncer"
    d.mkdir()
    port = free_port()
    (d / "userlist.txt").write_text('"postgres" ""\n')
    (d / "pgbouncer.ini").write_text(f"""\
[databases]
bench = host=127.0.0.1 port={pg_port} dbname=bench user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {d / 'userlist.txt'}
pool_mode = session
max_client_conn = {clients * 4}
default_pool_size = {clients * 2}
logfile = {d / 'pgbouncer.log'}
pidfile = {d / 'pgbouncer.pid'}
""")
    user = service_user()
    kwargs: dict = {}
    if user is not None:  # pgbouncer refuses to run as root
        for path in [d, *d.iterdir()]:
            os.chown(path, user.pw_uid, user.pw_gid)
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    proc = ws.popen([PGBOUNCER, str(d / "pgbouncer.ini")], cwd="/",
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    wait_port(port, proc=proc, log=d / "pgbouncer.log")
    return port


def start_relay(ws: Workspace, pg_port: int) -> tuple[int, int]:
    """bench/_relay.py in front of the cluster; returns (port, pid)."""
    port = free_port()
    log = ws.base / "relay.log"
    with open(log, "wb") as out:
        proc = ws.popen([sys.executable, str(BENCH_DIR / "_relay.py"), str(port), "127.0.0.1",
                         str(pg_port)], stdout=out, stderr=subprocess.STDOUT)
    wait_port(port, proc=proc, log=log)
    return port, proc.pid


def pgbench(dsn: str, mode: str, args: argparse.Namespace, pids: list[int]) -> dict:
    """One pgbench -S run: tps, transactions, failed transactions, and the CPU used meanwhile
    by the processes ``pids`` (the proxy) and by the whole machine."""
    cmd = ["pgbench", "-b", args.builtin, "-M", mode, "-c", str(args.clients),
           "-j", str(args.threads), "-T", str(args.duration), "-n", dsn]
    before = [cpu_ticks(p) for p in pids]
    m0, t0 = machine_cpu(), time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 120)
    m1, wall = machine_cpu(), time.monotonic() - t0
    after = [cpu_ticks(p) for p in pids]
    m = TPS.search(res.stdout)
    if res.returncode != 0 or m is None:
        raise RuntimeError(f"pgbench failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    failed = FAILED.search(res.stdout)
    machine = [b - a for a, b in zip(m0, m1, strict=True)]
    total = sum(machine) or 1
    return {
        "tps": float(m.group(1)),
        "n": int(PROCESSED.search(res.stdout).group(1)),
        "failed": int(failed.group(1)) if failed else 0,
        # % of one core, user and system, of the proxy process(es) during the run
        "proxy_user": sum(b[0] - a[0] for a, b in zip(before, after, strict=True))
        / CLK_TCK / wall * 100,
        "proxy_sys": sum(b[1] - a[1] for a, b in zip(before, after, strict=True))
        / CLK_TCK / wall * 100,
        "machine": [x / total * 100 for x in machine],  # user, system, idle %
    }


def audit_counts(db_path: Path) -> tuple[dict, dict, dict]:
    """(records by kind, statement records by outcome, ok pgbench statements by mode)."""
    with sqlite3.connect(db_path) as db:
        by_kind = dict(db.execute("SELECT kind, count(*) FROM audit_records GROUP BY kind"))
        outcomes = dict(db.execute(
            "SELECT outcome, count(*) FROM audit_records WHERE kind = 'statement' "
            "GROUP BY outcome"))
        by_mode = dict(db.execute(
            "SELECT CASE WHEN statement LIKE '%$1%' THEN 'parameters' ELSE 'simple' END, "
            "count(*) "
            "FROM audit_records WHERE kind = 'statement' AND outcome = 'ok' "
            "AND statement LIKE ? GROUP BY 1", (PGBENCH_SELECT,)))
    return by_kind, outcomes, by_mode


# Where a py-spy sample is, by the innermost frame in Keyturn's own code (file suffix).
PROFILE_PARTS = (
    ("proxies/postgres/codec.py", "framing and message codec"),
    ("keyturn/analysis/", "statement analysis (cache lookup, parse)"),
    ("keyturn/policy.py", "policy decision"),
    ("keyturn/auditspool.py", "audit spool append"),
    ("proxies/postgres/session.py", "other session code"),
    ("proxies/postgres/state.py", "other session code"),
    ("proxies/postgres/startup.py", "other session code"),
    ("proxies/postgres/decisions.py", "other session code"),
    ("proxies/postgres/holding.py", "other session code"),
    ("proxies/postgres/enforce.py", "other session code"),
    ("proxies/postgres/masker.py", "other session code"),
    ("proxies/postgres/ordering.py", "other session code"),
    ("proxies/postgres/upstream.py", "other session code"),
    ("proxies/postgres/", "other gateway code"),
    ("keyturn/", "other keyturn code"),
)
FRAME = re.compile(r"^(.*) \((.*?)(?::(\d+))?\)$")


def profile_keyturn(ws: Workspace, pid: int, dsn: str, args: argparse.Namespace
                    ) -> tuple[dict, int]:
    """py-spy on the gateway during one extra keyturn pgbench run in simple mode."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = ws.base / "profile-keyturn-simple.txt"
    spy = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--gil", "--nonblocking",
                            "--rate", "100", "--format", "raw", "--output", str(out),
                            "--duration", str(args.duration)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    r = pgbench(dsn, "simple", args, [pid])
    _, err = spy.communicate(timeout=120)
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {err}")
    parts: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [FRAME.match(f) for f in stack.split(";")]
        frames = [m for m in frames if m]
        leaf = frames[-1] if frames else None
        if leaf:
            key = f"{leaf.group(1)} ({leaf.group(2)}:{leaf.group(3)})"
            leaves[key] = leaves.get(key, 0) + n
        part = "other (no Keyturn frame)"
        for m in reversed(frames):
            func, path = m.group(1), m.group(2)
            if "asyncio/" in path:  # uvloop's own C code, below asyncio.Runner.run
                part = "event loop (uvloop: polling, callbacks)"
                break
            if func.endswith("write") and path.endswith(("postgres/session.py",
                                                         "postgres/upstream.py")) and m is leaf:
                part = "transport.write (send to client / target)"
                break
            hit = next((name for suffix, name in PROFILE_PARTS if suffix in path), None)
            if hit:
                part = hit
                break
        parts[part] = parts.get(part, 0) + n
    r["profile"] = {"file": str(out), "samples": total, "parts": parts, "leaves": leaves}
    return r, r["n"]


def ingest_snapshot(db_path: Path, spool: Path) -> tuple[int, int]:
    """(ok statement records in the store, bytes of spool past the ingester's offsets), the
    two read in one transaction (the ingester stores its offsets with the records)."""
    with sqlite3.connect(db_path) as db:
        db.execute("BEGIN")
        ok = db.execute("SELECT count(*) FROM audit_records WHERE kind = 'statement' "
                        "AND outcome = 'ok'").fetchone()[0]
        offsets = dict(db.execute('SELECT source, "offset" FROM audit_spool'))
        db.execute("COMMIT")
    return ok, sum(max(0, f.stat().st_size - offsets.get(f.name, 0))
                   for f in spool.glob("*.jsonl"))


def settle(db_path: Path, spool: Path, ingesters: list[int], timeout: float = 180
           ) -> tuple[float, float, int]:
    """Wait until the ingester has moved the whole spool into the store.
    (seconds waited, ingester CPU seconds meanwhile, statement records ingested meanwhile)"""
    t0 = time.monotonic()
    c0 = sum(sum(cpu_ticks(p)) for p in ingesters)
    ok0, backlog = ingest_snapshot(db_path, spool)
    said = False
    while backlog > 0 and time.monotonic() - t0 < timeout:
        if not said:
            progress(f"  waiting for the audit ingester: {backlog:,} bytes of spool to ingest")
            said = True
        time.sleep(0.5)
        _, backlog = ingest_snapshot(db_path, spool)
    ok1, backlog = ingest_snapshot(db_path, spool)
    if backlog:
        progress(f"  the ingester is still {backlog:,} bytes behind after {timeout:.0f}s")
    cpu = (sum(sum(cpu_ticks(p)) for p in ingesters) - c0) / CLK_TCK
    return time.monotonic() - t0, cpu, ok1 - ok0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=20, help="seconds per pgbench run")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every target this many times, in alternating order, and "
                         "report the median (the machine drifts between runs)")
    ap.add_argument("--profile", action="store_true",
                    help="one extra keyturn simple run under py-spy (not in the table)")
    ap.add_argument("--builtin", default="select-only",
                    choices=("select-only", "simple-update", "tpcb-like"),
                    help="pgbench built-in script (writes are allowed by the policy for "
                         "the pgbench tables, so every statement is audited and guarded)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="another checkout of Keyturn (a git worktree at the commit before a "
                         "change, its extension built in place with `python setup.py "
                         "build_ext --inplace`), measured as one more target in the same run")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma-separated protocol modes (default: simple,extended,prepared)")
    args = ap.parse_args()
    global TARGETS
    if args.baseline:
        TARGETS = (*TARGETS, "baseline")
        HEADINGS["baseline"] = "keyturn (baseline)"
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - set(MODES):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    ensure_pgbouncer()
    print(f"machine: {machine_line()}")
    results: dict[tuple[str, str], dict] = {}
    runs: dict[tuple[str, str], list[dict]] = {}
    with Workspace("pgbench", keep=args.keep) as ws:
        progress("starting PostgreSQL")
        pg = ws.postgres("pg", max_connections="200")
        pg.create_database("bench")
        progress(f"pgbench -i -s {args.scale}")
        subprocess.run(["pgbench", "-i", "-q", "-s", str(args.scale), pg.dsn("bench")],
                       check=True, capture_output=True)
        progress("starting pgbouncer")
        bouncer_port = start_pgbouncer(ws, pg.port, args.clients)
        bouncer_pid = ws.procs[-1].pid
        progress("starting the bare relay (bench/_relay.py)")
        relay_port, relay_pid = start_relay(ws, pg.port)
        progress("starting keyturn gateway")
        policy = POLICY_READS_ONLY if args.builtin == "select-only" else POLICY_WRITES_ALLOWED
        kt = KeyturnProcess(ws, pg, "bench", policy, portal=False)
        kt.create_tokens("alice")
        kt.start("gateway")
        assert kt.proc is not None
        time.sleep(1)  # let the gateway start its audit ingester child
        ingesters = child_pids(kt.proc.pid)
        progress(f"gateway pid {kt.proc.pid}, audit ingester pid(s) {ingesters}")
        plain = "dbname=bench user=postgres sslmode=disable"
        dsns = {
            "postgres": f"host=127.0.0.1 port={pg.port} {plain}",
            "pgbouncer": f"host=127.0.0.1 port={bouncer_port} {plain}",
            "relay": f"host=127.0.0.1 port={relay_port} {plain}",
            "keyturn": kt.dsn("alice", "bench"),
        }
        pids = {"postgres": [], "pgbouncer": [bouncer_pid], "relay": [relay_pid],
                "keyturn": [kt.proc.pid]}
        base = None
        if args.baseline:
            checkout = Path(args.baseline).resolve()
            commit = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"],
                                    capture_output=True, text=True).stdout.strip()
            progress(f"starting the baseline keyturn gateway from {checkout} ({commit})")
            base = KeyturnProcess(ws, pg, "bench", policy, portal=False, name="keyturn-base",
                                  checkout=checkout)
            base.create_tokens("alice")
            base.start("gateway")
            assert base.proc is not None
            dsns["baseline"] = base.dsn("alice", "bench")
            pids["baseline"] = [base.proc.pid]
        ingest_cpu: dict[str, tuple[float, float]] = {}
        db_path = kt.dir / "keyturn.db"
        spool = kt.dir / "audit-spool"
        catch_up = [0.0, 0.0, 0]  # seconds waited, ingester CPU seconds, records ingested
        for rnd in range(args.rounds):
            # Alternate the order so a drifting machine favours no target.
            order = TARGETS if rnd % 2 == 0 else tuple(reversed(TARGETS))
            for mode in modes:
                for target in order:
                    progress(f"{f'round {rnd + 1}/{args.rounds}: ' if args.rounds > 1 else ''}"
                             f"pgbench -b {args.builtin} -M {mode} -c {args.clients} "
                             f"-j {args.threads} -T {args.duration} against {target}")
                    waited, cpu, ingested = settle(db_path, spool, ingesters)
                    for i, v in enumerate((waited, cpu, ingested)):
                        catch_up[i] += v
                    if target == "keyturn":
                        ing0 = [cpu_ticks(p) for p in ingesters]
                        t0 = time.monotonic()
                    r = pgbench(dsns[target], mode, args, pids[target])
                    runs.setdefault((target, mode), []).append(r)
                    if target == "keyturn":
                        wall = time.monotonic() - t0
                        ing1 = [cpu_ticks(p) for p in ingesters]
                        ingest_cpu[mode] = tuple(  # type: ignore[assignment]
                            sum(b[k] - a[k] for a, b in zip(ing0, ing1, strict=True))
                            / CLK_TCK / wall * 100 for k in (0, 1))
                    progress(f"  {r['tps']:,.0f} tps ({r['n']:,} transactions, {r['failed']} "
                             f"failed); proxy CPU user {r['proxy_user']:.0f}% sys "
                             f"{r['proxy_sys']:.0f}% of a core; machine user/sys/idle "
                             + "/".join(f"{x:.0f}%" for x in r["machine"]))
        for key, rs in runs.items():
            # The median run (by TPS) stands for the target; transactions are summed.
            med = dict(sorted(rs, key=lambda r: r["tps"])[len(rs) // 2])
            med["n"] = sum(r["n"] for r in rs)
            med["failed"] = sum(r["failed"] for r in rs)
            results[key] = med

        extra = dict.fromkeys(MODES, 0)  # audited statements outside the table
        profile = None
        if args.profile:
            progress(f"extra run for the profile: pgbench -S -M simple -T {args.duration} "
                     "against keyturn with py-spy on the gateway")
            profile, extra["simple"] = profile_keyturn(ws, kt.proc.pid, dsns["keyturn"], args)
            progress(f"  {profile['tps']:,.0f} tps under py-spy ({profile['n']:,} "
                     "transactions)")

        # ---- audit: stop (SIGTERM drains the spool), then check and verify
        before_stop, spool_bytes = ingest_snapshot(db_path, spool)
        progress(f"before SIGTERM: {before_stop:,} ok statement records in the store, "
                 f"{spool_bytes:,} bytes of spool not ingested yet")
        progress("stopping the gateway (SIGTERM: closes the spool, the ingester drains it)")
        t0 = time.monotonic()
        code = kt.stop(timeout=900)
        stop_s = time.monotonic() - t0
        left = sorted(f.name for f in spool.glob("*.jsonl"))
        after_stop = audit_counts(db_path)
        progress(f"gateway exited with {code} after {stop_s:.1f}s; spool files left: "
                 f"{left or 'none'}")
        verify = kt.cli("audit", "verify", check=False)
        by_kind, outcomes, by_mode = audit_counts(db_path)
        kt.report_log()

        if args.rounds > 1:
            print()
            print("each round (TPS; keyturn/pgbouncer and keyturn/relay):")
            rows = []
            for rnd in range(args.rounds):
                for mode in modes:
                    tps = {t: runs[t, mode][rnd]["tps"] for t in TARGETS}
                    rows.append([str(rnd + 1), mode] + [f"{tps[t]:,.0f}" for t in TARGETS]
                                + [f"{tps['keyturn'] / tps['pgbouncer']:.2f}",
                                   f"{tps['keyturn'] / tps['relay']:.2f}"])
            print_table(["round", "mode"] + [HEADINGS[t] for t in TARGETS]
                        + ["keyturn/pgbouncer", "keyturn/relay"], rows)
        print()
        print(f"pgbench -b {args.builtin} -c {args.clients} -j {args.threads} "
              f"-T {args.duration} -n, scale {args.scale}; TPS without initial connection time"
              + (f"; median of {args.rounds} rounds" if args.rounds > 1 else ""))
        rows = []
        for mode in modes:
            pgb = results["pgbouncer", mode]["tps"]
            kt_tps = results["keyturn", mode]["tps"]
            rows.append([mode] + [f"{results[t, mode]['tps']:,.0f}" for t in TARGETS]
                        + [f"{kt_tps / pgb:.2f}", f"{kt_tps / results['relay', mode]['tps']:.2f}",
                           "yes" if kt_tps >= 0.8 * pgb else "NO"])
        print_table(["mode"] + [HEADINGS[t] for t in TARGETS]
                    + ["keyturn/pgbouncer", "keyturn/relay", "keyturn >= 0.8 x pgbouncer?"],
                    rows)
        failed = {f"{t}/{m}": v["failed"] for (t, m), v in results.items() if v["failed"]}
        print(f"failed transactions: {failed or 'none'}")
        if base is not None:
            print(f"keyturn / baseline ({args.baseline}: {commit}): " + ", ".join(
                f"{m} {results['keyturn', m]['tps'] / results['baseline', m]['tps']:.2f}"
                for m in modes))
            base.stop(timeout=900)

        print()
        print("CPU during each run: the proxy process as % of one core and in µs per pgbench "
              "transaction (user + sys), and the whole machine (2 cores) user / sys / idle")
        rows = []
        for mode in modes:
            for t in TARGETS:
                r = results[t, mode]
                per_tx = 1e4 / r["tps"]  # µs per transaction for 1 % of a core
                proxy = per_tx_s = ingester = ""
                if pids[t]:
                    proxy = f"{r['proxy_user']:.0f} + {r['proxy_sys']:.0f}"
                    per_tx_s = (f"{r['proxy_user'] * per_tx:.0f} + "
                                f"{r['proxy_sys'] * per_tx:.0f}")
                if t == "keyturn" and mode in ingest_cpu:
                    u, k = ingest_cpu[mode]
                    ingester = f"{u:.0f} + {k:.0f} ({u * per_tx:.0f} + {k * per_tx:.0f} µs)"
                rows.append([mode, HEADINGS[t], proxy or "-", per_tx_s or "-", ingester,
                             " / ".join(f"{x:.0f}" for x in r["machine"])])
        print_table(["mode", "target", "proxy % of a core", "proxy µs / transaction",
                     "keyturn audit ingester %", "machine user / sys / idle %"], rows)
        waited, cpu, ingested = catch_up
        print(f"keyturn's audit ingester between the runs (waited for before each run): "
              f"{ingested:,} statement records in {waited:.1f}s, {cpu:.1f}s of CPU"
              + (f" = {cpu / ingested * 1e6:.0f} µs per record" if ingested else ""))

        if profile:
            prof = profile["profile"]
            total = prof["samples"] or 1
            print()
            print(f"py-spy on the gateway during an extra keyturn simple run "
                  f"({profile['tps']:,.0f} tps under the profiler; gateway CPU "
                  f"{profile['proxy_user']:.0f}% user + {profile['proxy_sys']:.0f}% sys of a "
                  f"core): {prof['samples']:,} GIL-held samples; raw stacks {prof['file']}")
            print_table(["where (innermost Keyturn frame)", "% of GIL-held samples"],
                        [[k, f"{v / total * 100:.1f}"] for k, v in
                         sorted(prof["parts"].items(), key=lambda kv: -kv[1])])
            print()
            print_table(["top innermost frames", "%"],
                        [[k, f"{v / total * 100:.1f}"] for k, v in
                         sorted(prof["leaves"].items(), key=lambda kv: -kv[1])[:12]])

        print()
        print("audit check")
        print(f"  before SIGTERM: {before_stop:,} ok statement records ingested, "
              f"{spool_bytes:,} bytes of spool not ingested yet")
        print(f"  gateway exit code after SIGTERM: {code} ({stop_s:.1f}s to drain and exit); "
              f"spool files left: {left or 'none'}; ok statement records after the drain: "
              f"{after_stop[1].get('ok', 0):,}")
        print(f"  keyturn audit verify: {(verify.stdout + verify.stderr).strip()}")
        print(f"  audit records by kind: {by_kind}; statement outcomes: {outcomes}")
        ok = verify.returncode == 0 and not left and code == 0
        # The audited text tells simple mode apart; extended and prepared both send $1.
        groups: dict[str, list[str]] = {}
        for mode in modes:
            groups.setdefault("simple" if mode == "simple" else "parameters", []).append(mode)
        for group, members in groups.items():
            mode = "+".join(members)
            n = sum(results["keyturn", m]["n"] + extra[m] for m in members)
            extra[mode] = sum(extra[m] for m in members)
            audited = by_mode.get(group, 0)
            # pgbench counts only transactions it finished; a statement still in flight when
            # -T ends is audited but not counted, so up to one per client more is expected.
            good = n <= audited <= n + args.clients * (2 if extra[mode] else 1)
            ok &= good
            print(f"  {mode}: pgbench transactions through keyturn {n:,}"
                  + (f" (incl. {extra[mode]:,} in the profiled run)" if extra[mode] else "")
                  + "; pgbench SELECTs "
                  f"audited ok {audited:,} -> {'every statement audited' if good else 'MISMATCH'}")
        print(f"  audit check: {'PASS' if ok else 'FAIL'}")
        if args.keep:
            print(f"logs: {Path(kt.log_path)}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
