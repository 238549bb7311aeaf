"""Throughput: pgbench -S through Keyturn, next to direct PostgreSQL and pgbouncer.

    .venv/bin/python bench/pgbench_compare.py [--duration 20] [--clients 8] [--keep]

Starts, under one temp directory: a throwaway PostgreSQL cluster (pgbench -i -s 10),
pgbouncer (session pooling, trust auth) and ``keyturn gateway`` with a SQLite store and a
policy that allows read/transaction/session and blocks everything else, so every statement
is classified, decided and audited. Then, for each protocol mode (simple, prepared), runs
``pgbench -S -M <mode> -c 8 -j 2 -T <duration> -n`` against each target in turn and prints
TPS side by side, plus Keyturn/pgbouncer. Finally stops the gateway (SIGTERM: it flushes its
audit queue) and runs ``keyturn audit verify`` to show every statement was audited.

pgbouncer comes from Debian (``apt-get install pgbouncer``; ``make bench`` installs it).
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

from _common import (
    POLICY_READS_ONLY,
    KeyturnProcess,
    Workspace,
    free_port,
    machine_line,
    print_table,
    progress,
    service_user,
    wait_port,
)

PGBOUNCER = "/usr/sbin/pgbouncer"
MODES = ("simple", "prepared")
TARGETS = ("postgres", "pgbouncer", "keyturn")
TPS = re.compile(r"^tps = ([\d.]+) \((?:without initial connection time|"
                 r"excluding connections establishing)\)", re.M)
PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


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


def pgbench(dsn: str, mode: str, args: argparse.Namespace) -> tuple[float, int, int]:
    """(tps, transactions, failed transactions) of one pgbench -S run."""
    cmd = ["pgbench", "-S", "-M", mode, "-c", str(args.clients), "-j", str(args.threads),
           "-T", str(args.duration), "-n", dsn]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 120)
    m = TPS.search(res.stdout)
    if res.returncode != 0 or m is None:
        raise RuntimeError(f"pgbench failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    failed = FAILED.search(res.stdout)
    return (float(m.group(1)), int(PROCESSED.search(res.stdout).group(1)),
            int(failed.group(1)) if failed else 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=20, help="seconds per pgbench run")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    args = ap.parse_args()
    ensure_pgbouncer()
    print(f"machine: {machine_line()}")
    results: dict[tuple[str, str], tuple[float, int, int]] = {}
    with Workspace("pgbench", keep=args.keep) as ws:
        progress("starting PostgreSQL")
        pg = ws.postgres("pg", max_connections="200")
        pg.create_database("bench")
        progress(f"pgbench -i -s {args.scale}")
        subprocess.run(["pgbench", "-i", "-q", "-s", str(args.scale), pg.dsn("bench")],
                       check=True, capture_output=True)
        progress("starting pgbouncer")
        bouncer_port = start_pgbouncer(ws, pg.port, args.clients)
        progress("starting keyturn gateway")
        kt = KeyturnProcess(ws, pg, "bench", POLICY_READS_ONLY, portal=False)
        kt.create_tokens("alice")
        kt.start("gateway")
        dsns = {
            "postgres": f"host=127.0.0.1 port={pg.port} dbname=bench user=postgres "
                        "sslmode=disable",
            "pgbouncer": f"host=127.0.0.1 port={bouncer_port} dbname=bench user=postgres "
                         "sslmode=disable",
            "keyturn": kt.dsn("alice", "bench"),
        }
        for mode in MODES:
            for target in TARGETS:
                progress(f"pgbench -S -M {mode} -c {args.clients} -j {args.threads} "
                         f"-T {args.duration} against {target}")
                results[target, mode] = pgbench(dsns[target], mode, args)
                tps, n, failed = results[target, mode]
                progress(f"  {tps:,.0f} tps ({n:,} transactions, {failed} failed)")
        progress("stopping the gateway (SIGTERM flushes the audit queue)")
        code = kt.stop()
        verify = kt.cli("audit", "verify", check=False)
        with sqlite3.connect(kt.dir / "keyturn.db") as db:
            by_kind = dict(db.execute("SELECT kind, count(*) FROM audit_records GROUP BY kind"))
            statement_outcomes = dict(db.execute(
                "SELECT outcome, count(*) FROM audit_records WHERE kind = 'statement' "
                "GROUP BY outcome"))
        kt.report_log()

        print()
        print(f"pgbench -S -c {args.clients} -j {args.threads} -T {args.duration} -n, "
              f"scale {args.scale}; TPS without initial connection time")
        rows = []
        for mode in MODES:
            pgb = results["pgbouncer", mode][0]
            rows.append([mode] + [f"{results[t, mode][0]:,.0f}" for t in TARGETS]
                        + [f"{results['keyturn', mode][0] / pgb:.2f}",
                           "yes" if results["keyturn", mode][0] >= 0.8 * pgb else "NO"])
        print_table(["mode", "postgres", "pgbouncer", "keyturn", "keyturn/pgbouncer",
                     ">= 0.8?"], rows)
        failed = {k: v[2] for k, v in results.items() if v[2]}
        if failed:
            print(f"failed transactions: {failed}")
        through_kt = sum(results["keyturn", m][1] for m in MODES)
        print()
        print(f"gateway exit code after SIGTERM: {code}")
        print(f"keyturn audit verify: {(verify.stdout + verify.stderr).strip()}")
        print(f"audit records by kind: {by_kind}; statement outcomes: {statement_outcomes}")
        print(f"pgbench transactions through keyturn: {through_kt:,}; statement records: "
              f"{by_kind.get('statement', 0):,} (pgbench also runs a few set-up queries per "
              f"run, each audited)")
        if args.keep:
            print(f"logs: {Path(kt.log_path)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
