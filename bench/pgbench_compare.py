"""Throughput: pgbench through Keyturn, next to direct PostgreSQL, pgbouncer and a bare relay.

    .venv/bin/python bench/pgbench_compare.py [--duration 20] [--rounds 1] [--clients 8]
        [--builtin select-only,simple-update,tpcb-like] [--modes simple,extended,prepared]
        [--targets postgres,pgbouncer,guarded,relay,keyturn] [--latency] [--sustained SECONDS]
        [--no-table] [--baseline DIR] [--profile] [--keep]

Starts, under one temp directory and for the whole run: a throwaway PostgreSQL cluster
(``pgbench -i -s 10``, once: the write built-ins change balances and grow pgbench_history,
which changes nothing another script measures, so nothing is re-initialised between
runs), pgbouncer (session pooling, trust auth), a bare asyncio.Protocol relay on uvloop
(bench/_relay.py: forwards bytes both ways with transport.write and nothing else, the
ceiling of a Python relay on this machine) and ``keyturn gateway`` with a SQLite store. Its
policy allows read, transaction and session statements and, when a write built-in is listed,
writes whose every table is a pgbench table (POLICY_WRITES_ALLOWED); it blocks everything
else, which a few probe statements through the gateway check first. So every statement is
classified, decided and audited; every write runs with the read-only guard's write access
and every read inside a transaction in its read-only savepoint (docs/postgres-gateway.md).

The table: for each built-in in the order given (default select-only), each protocol mode
and each target, ``pgbench -b <builtin> -M <mode> -c 8 -j 2 -T <duration> -n``. One row per
(built-in, mode): pgbouncer and Keyturn TPS, Keyturn/pgbouncer, the gateway's CPU in µs per
transaction (user + sys) and whether Keyturn reaches 0.9x pgbouncer; then every target's TPS
and CPU. With ``--rounds N`` all of that is repeated N times, in alternating target order,
and the median run counts (runs on a shared 2-core VM drift by 20 % and more).
``--targets pgbouncer,keyturn`` halves the time; those two are always measured.

The target ``guarded`` ("pgbouncer + guard statements") is the same pgbouncer running each
built-in as a custom script with the statements the gateway's read-only guard adds on the
target (``SET TRANSACTION READ WRITE`` after BEGIN, ``SAVEPOINT keyturn_ro; SET LOCAL
transaction_read_only = on`` before reads inside a transaction, ``RELEASE SAVEPOINT``
before the next write), planned by the gateway's own guard code (``Script.guarded``): in
simple mode in the client's Query as the gateway sends them, in the other modes pipelined.
pgbouncer/guarded is what enforcement on the target costs the server; keyturn/guarded is
what the gateway itself costs.

A table or latency run must not be measured while the audit ingester works off an earlier
Keyturn run's records, so before each of them the script waits until the ingester (and
the ``--baseline`` gateway's) has caught up with the spool (at most 180 s); the ingester's
CPU meanwhile is reported per record. (It defers its work while the machine is busy,
docs/operations.md, so a 20 s run does not pay for it; ``--sustained`` measures what it
costs when it cannot.)

``--latency``: after the table, one single-client run (``-c 1 -j 1 -T <duration>``) per
(built-in, mode) against pgbouncer and Keyturn: pgbench's latency average divided by the
script's statements per transaction, and what Keyturn adds per statement (goal: <= 40 µs).

``--sustained SECONDS``: last, one long run of the first built-in (mode simple, or the one
mode given) against pgbouncer and then Keyturn, the Keyturn run started right after
pgbouncer's without waiting for anything, with the ingester working alongside: sustained
load with audit ingest. Reports both TPS and their ratio, and the ingester's CPU per audit
record it ingested (the store's newest seq before and after), once for the run alone and
once including the drain after it, which the script waits for. ``--no-table`` skips the
table (``--sustained`` / ``--latency`` / ``--profile`` only).

Audit check: the gateway appends records to a local spool that its lower-priority child
(``keyturn audit ingest --follow``) moves into the store. After all runs the script stops
the gateway with SIGTERM (it closes the spool and waits for the ingester to drain it),
checks that the spool directory is empty and runs ``keyturn audit verify``. Then it counts,
per Keyturn run, the statement records whose ``at`` falls from the run's start to the next
Keyturn run's start (runs are at least 1 s apart, so a statement still in flight when -T
ends lands in its own run): ``ok`` records whose text is one of the built-in's statements
(``pgbench --show-script``, with literals or $n where it has variables) must number at least
transactions x statements per transaction (select-only 1, simple-update 5, tpcb-like 7:
BEGIN and END count) and at most that plus one transaction's statements per client (in
flight when -T ends). Other ``ok`` statements (pgbench's own set-up queries) and records of
other outcomes are shown, not counted. The exit status is 1 when any of it fails.

``--profile`` adds one more keyturn run of the first built-in in simple mode after the table
(not in it), with py-spy sampling the gateway (``--gil --nonblocking``, raw stacks kept in the
work directory), and prints where the gateway's GIL-held samples are: inside its two
``transport.write`` calls (to the client and to the target), framing, analysis, policy, the
audit spool, other session code, and the event loop itself. It needs ``pip install py-spy``.

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
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
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
    run_script,
    service_user,
    wait_port,
)

from keyturn.analysis import Analyzer
from proxies.postgres import guard

PGBOUNCER = "/usr/sbin/pgbouncer"
MODES = ("simple", "extended", "prepared")
BUILTINS = ("select-only", "simple-update", "tpcb-like")
TARGETS = ("postgres", "pgbouncer", "guarded", "relay", "keyturn")
HEADINGS = {"postgres": "postgres", "pgbouncer": "pgbouncer", "relay": "bare relay",
            "guarded": "pgbouncer + guard statements",
            "keyturn": "keyturn", "baseline": "keyturn (baseline)"}
TARGET_RATIO = 0.9  # Keyturn's TPS against pgbouncer's
LATENCY_GOAL_US = 40  # what Keyturn may add per statement, single client
WINDOW_GAP = 1.0  # seconds between the end of a Keyturn run and the start of the next
TPS = re.compile(r"^tps = ([\d.]+) \((?:without initial connection time|"
                 r"excluding connections establishing)\)", re.M)
PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
LATENCY = re.compile(r"^latency average = ([\d.]+) ms", re.M)


# ---------------------------------------------------------------- pgbench

@dataclass(frozen=True)
class Script:
    """A pgbench built-in script: its SQL statements as ``pgbench --show-script`` shows them,
    and a pattern that matches each as the gateway audits it (numbers inlined in simple mode,
    ``$n`` in extended and prepared)."""

    name: str
    statements: tuple[str, ...]
    pattern: re.Pattern[str]

    @classmethod
    def load(cls, name: str) -> Script:
        res = subprocess.run(["pgbench", f"--show-script={name}"], capture_output=True,
                             text=True, check=True)
        lines = [line.strip() for line in (res.stdout + res.stderr).splitlines()]
        statements = tuple(line for line in lines
                           if line and not line.startswith(("--", "\\")))
        variable = r"(?:-?\d+|\$\d+)"
        alternatives = (re.sub(r":\w+", lambda _: variable, re.escape(s)) for s in statements)
        return cls(name, statements, re.compile("|".join(alternatives)))

    @property
    def per_tx(self) -> int:
        return len(self.statements)

    def guarded(self, directory: Path, mode: str) -> Path:
        """This script as a custom pgbench script with the statements the gateway's
        read-only guard adds (proxies/postgres/guard.py, planned from the gateway's own
        analysis): write access for the transaction, the read-only savepoint around reads
        inside it. In simple mode the gateway sends them in the client's Query; in the
        other modes it pipelines them with the client's messages (``\\startpipeline``)."""
        path = directory / f"guarded-{self.name}-{mode}.sql"
        if path.exists():
            return path
        res = subprocess.run(["pgbench", f"--show-script={self.name}"], capture_output=True,
                             text=True, check=True)
        analyzer = Analyzer()
        state = guard.TxState()
        out: list[str] = []
        for raw in (res.stdout + res.stderr).splitlines():
            line = raw.strip()
            if not line or line.startswith("--"):
                continue
            if line.startswith("\\"):
                out.append(line)
                continue
            analysis = analyzer.analyze(re.sub(r":\w+", "1", line))
            plan = guard.plan_query(analysis.statements, state)
            state = plan.state
            parts = [line.rstrip(";") if isinstance(part, int) else part
                     for part in plan.parts]
            if len(parts) == 1:
                out.append(parts[0] + ";")
            elif mode == "simple":
                out.append(";".join(parts) + ";")
            else:
                out += ["\\startpipeline", *(p + ";" for p in parts), "\\endpipeline"]
        path.write_text("\n".join(out) + "\n")
        return path

    @property
    def writes(self) -> bool:
        return any(s.split()[0].upper() in ("INSERT", "UPDATE", "DELETE")
                   for s in self.statements)


def pgbench(dsn: str, script: Script, mode: str, *, clients: int, threads: int,
            duration: int, pids: Sequence[int], file: Path | None = None) -> dict[str, Any]:
    """One pgbench run: tps, transactions, failed transactions, latency average, and the CPU
    used meanwhile by the processes ``pids`` (the proxy) and by the whole machine.
    ``file``: a custom script to run instead of the built-in."""
    which = ["-f", str(file)] if file is not None else ["-b", script.name]
    cmd = ["pgbench", *which, "-M", mode, "-c", str(clients), "-j", str(threads),
           "-T", str(duration), "-n", dsn]
    before = [cpu_ticks(p) for p in pids]
    m0, t0 = machine_cpu(), time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    m1, wall = machine_cpu(), time.monotonic() - t0
    after = [cpu_ticks(p) for p in pids]
    m = TPS.search(res.stdout)
    processed = PROCESSED.search(res.stdout)
    if res.returncode != 0 or m is None or processed is None:
        raise RuntimeError(f"pgbench failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    failed = FAILED.search(res.stdout)
    latency = LATENCY.search(res.stdout)
    machine = [b - a for a, b in zip(m0, m1, strict=True)]
    total = sum(machine) or 1
    user, system = (sum(b[k] - a[k] for a, b in zip(before, after, strict=True)) / CLK_TCK
                    for k in (0, 1))
    return {
        "tps": float(m.group(1)),
        "n": int(processed.group(1)),
        "failed": int(failed.group(1)) if failed else 0,
        "latency_ms": float(latency.group(1)) if latency else float("nan"),
        "cpu_s": (user, system),  # the proxy's CPU seconds, user and system
        # % of one core, user and system, of the proxy process(es) during the run
        "proxy_user": user / wall * 100,
        "proxy_sys": system / wall * 100,
        "machine": [x / total * 100 for x in machine],  # user, system, idle %
    }


def us_per_tx(r: dict[str, Any]) -> tuple[float, float]:
    """The proxy's CPU per transaction in µs, user and system."""
    n = r["n"] or 1
    return r["cpu_s"][0] / n * 1e6, r["cpu_s"][1] / n * 1e6


# ---------------------------------------------------------------- servers

def ensure_pgbouncer() -> None:
    if os.access(PGBOUNCER, os.X_OK):
        return
    if os.geteuid() != 0:
        sys.exit("pgbouncer is missing: run `sudo apt-get install -y pgbouncer` (or make bench)")
    progress("installing pgbouncer with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    wait = ["-o", "DPkg::Lock::Timeout=300"]  # another apt-get may hold the lock a while
    subprocess.run(["apt-get", *wait, "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", *wait, "install", "-y", "-qq", "--no-install-recommends",
                    "pgbouncer"], check=True, env=env, stdout=subprocess.DEVNULL)


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


# What the bench policy must do with a few statements: (statement, allowed?). The first is
# allowed only under POLICY_WRITES_ALLOWED; bench_probe is a table outside pgbench's.
PROBES = (
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 1", True),
    ("UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 0", None),
    ("INSERT INTO bench_probe SELECT aid FROM pgbench_accounts LIMIT 0", False),
    ("TRUNCATE pgbench_history", False),
    ("CREATE TABLE bench_probe2 (x int)", False),
    ("LOCK TABLE pgbench_accounts", False),
)


def probe_policy(dsn: str, writes: bool) -> list[str]:
    """Run PROBES through the gateway; the lines to print, failures starting with 'FAIL'."""
    out = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql, allowed in PROBES:
            want = writes if allowed is None else allowed
            try:
                conn.execute(sql)
                got, why = True, "allowed"
            except psycopg.Error as exc:
                got, why = False, str(exc).strip().splitlines()[0]
                # Refused, but by the server, not the policy: not what the probe is about.
                if "keyturn: blocked" not in why:
                    got = None
            verdict = "ok" if got is want else "FAIL"
            out.append(f"{verdict}: {sql} -> {why} (want {'allowed' if want else 'blocked'})")
    return out


# ---------------------------------------------------------------- the audit store

def max_seq(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT coalesce(max(seq), 0) FROM audit_records").fetchone()[0])


def ingest_snapshot(db_path: Path, spool: Path) -> tuple[int, int]:
    """(audit records in the store, i.e. its newest seq, bytes of spool past the ingester's
    offsets), the two read in one transaction (the ingester stores its offsets with the
    records)."""
    db = sqlite3.connect(db_path)
    try:
        db.execute("BEGIN")
        records = max_seq(db)
        offsets = dict(db.execute('SELECT source, "offset" FROM audit_spool'))
        db.execute("COMMIT")
    finally:
        db.close()
    return records, sum(max(0, f.stat().st_size - offsets.get(f.name, 0))
                        for f in spool.glob("*.jsonl"))


def settle(db_path: Path, spool: Path, ingesters: list[int], timeout: float = 180
           ) -> tuple[float, float, int]:
    """Wait until the ingester has moved the whole spool into the store.
    (seconds waited, ingester CPU seconds meanwhile, records ingested meanwhile)"""
    t0 = time.monotonic()
    c0 = sum(sum(cpu_ticks(p)) for p in ingesters)
    records0, backlog = ingest_snapshot(db_path, spool)
    said = False
    while backlog > 0 and time.monotonic() - t0 < timeout:
        if not said:
            progress(f"  waiting for the audit ingester: {backlog:,} bytes of spool to ingest")
            said = True
        time.sleep(0.5)
        _, backlog = ingest_snapshot(db_path, spool)
    records1, backlog = ingest_snapshot(db_path, spool)
    if backlog:
        progress(f"  the ingester is still {backlog:,} bytes behind after {timeout:.0f}s")
    cpu = (sum(sum(cpu_ticks(p)) for p in ingesters) - c0) / CLK_TCK
    return time.monotonic() - t0, cpu, records1 - records0


@dataclass
class Window:
    """One pgbench run through Keyturn, and the statement records it left in the store: those
    whose ``at`` is from ``start`` up to the next Keyturn run's start."""

    phase: str  # table, profile, latency, sustained
    script: Script
    mode: str
    start: float  # time.time(), the clock the gateway stamps ``at`` with
    transactions: int
    clients: int
    audited: int = 0  # ok records of the script's statements
    other: int = 0  # ok records of other statements (pgbench's set-up queries)
    not_ok: Counter[str] = field(default_factory=Counter)  # other outcomes
    classes: Counter[str] = field(default_factory=Counter)  # "class/rule" of ``audited``


def count_windows(db_path: Path, windows: list[Window]) -> int:
    """Sort every statement record from the first window on into its window; returns how many
    records came before the first (the policy probes)."""
    starts = [w.start for w in windows]
    with sqlite3.connect(db_path) as db:
        before = db.execute("SELECT count(*) FROM audit_records WHERE kind = 'statement' "
                            "AND at < ?", (starts[0],)).fetchone()[0]
        rows = db.execute("SELECT at, statement, outcome, classification, rule "
                          "FROM audit_records WHERE kind = 'statement' AND at >= ?",
                          (starts[0],))
        for at, text, outcome, cls, rule in rows:
            w = windows[bisect_right(starts, at) - 1]
            if outcome != "ok":
                w.not_ok[str(outcome)] += 1
            elif text and w.script.pattern.fullmatch(text):
                w.audited += 1
                w.classes[f"{cls}/{rule}"] += 1
            else:
                w.other += 1
    return int(before)


def audit_counts(db_path: Path) -> tuple[dict, dict]:
    """(records by kind, statement records by outcome)."""
    with sqlite3.connect(db_path) as db:
        by_kind = dict(db.execute("SELECT kind, count(*) FROM audit_records GROUP BY kind"))
        outcomes = dict(db.execute(
            "SELECT outcome, count(*) FROM audit_records WHERE kind = 'statement' "
            "GROUP BY outcome"))
    return by_kind, outcomes


# ---------------------------------------------------------------- profile

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


def profile_keyturn(pid: int, out: Path, duration: int, run: Callable[[], dict]) -> dict:
    """py-spy on the gateway while ``run()`` runs pgbench against it; its result plus
    "profile"."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spy = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--gil", "--nonblocking",
                            "--rate", "100", "--format", "raw", "--output", str(out),
                            "--duration", str(duration)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    r = run()
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
        frames = [m for m in (FRAME.match(f) for f in stack.split(";")) if m]
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
    return r


# ---------------------------------------------------------------- the runs

class Bench:
    """The servers of one benchmark run, and every measurement taken against them."""

    def __init__(self, ws: Workspace, args: argparse.Namespace, scripts: list[Script],
                 modes: tuple[str, ...], targets: tuple[str, ...]):
        self.ws, self.args, self.scripts, self.modes = ws, args, scripts, modes
        self.targets = targets
        self.writes = any(s.writes for s in scripts)
        progress("starting PostgreSQL")
        self.pg = ws.postgres("pg", max_connections="200")
        self.pg.create_database("bench")
        progress(f"pgbench -i -s {args.scale} (once for every run)")
        subprocess.run(["pgbench", "-i", "-q", "-s", str(args.scale), self.pg.dsn("bench")],
                       check=True, capture_output=True)
        self.pg.execute("CREATE TABLE bench_probe (x int)", "bench")
        plain = "dbname=bench user=postgres sslmode=disable"
        self.dsns = {"postgres": f"host=127.0.0.1 port={self.pg.port} {plain}"}
        self.pids: dict[str, list[int]] = {"postgres": []}
        progress("starting pgbouncer")
        port = start_pgbouncer(ws, self.pg.port, args.clients)
        self.dsns["pgbouncer"] = f"host=127.0.0.1 port={port} {plain}"
        self.pids["pgbouncer"] = [ws.procs[-1].pid]
        # The same pgbouncer running the statements the gateway's read-only guard adds:
        # what enforcement on the target costs the server, apart from the gateway.
        self.dsns["guarded"], self.pids["guarded"] = self.dsns["pgbouncer"], []
        if "relay" in targets:
            progress("starting the bare relay (bench/_relay.py)")
            port, pid = start_relay(ws, self.pg.port)
            self.dsns["relay"] = f"host=127.0.0.1 port={port} {plain}"
            self.pids["relay"] = [pid]
        self.policy = POLICY_WRITES_ALLOWED if self.writes else POLICY_READS_ONLY
        progress("starting keyturn gateway (policy: reads"
                 + (" and writes to the pgbench tables)" if self.writes else " only)"))
        self.kt = self._gateway("keyturn", None)
        assert self.kt.proc is not None
        time.sleep(1)  # let the gateway start its audit ingester child
        self.ingesters = child_pids(self.kt.proc.pid)
        progress(f"gateway pid {self.kt.proc.pid}, audit ingester pid(s) {self.ingesters}")
        self.db_path = self.kt.dir / "keyturn.db"
        self.spool = self.kt.dir / "audit-spool"
        self.base: KeyturnProcess | None = None
        self.base_ingesters: list[int] = []
        self.base_commit = ""
        if "baseline" in targets:
            checkout = Path(args.baseline).resolve()
            self.base_commit = subprocess.run(
                ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"],
                capture_output=True, text=True).stdout.strip()
            progress(f"starting the baseline keyturn gateway from {checkout} "
                     f"({self.base_commit})")
            self.base = self._gateway("baseline", checkout)
            assert self.base.proc is not None
            time.sleep(1)
            self.base_ingesters = child_pids(self.base.proc.pid)
        progress("policy probes through the gateway:")
        self.probes = probe_policy(self.dsns["keyturn"], self.writes)
        for line in self.probes:
            print(f"    {line}")
        self.runs: dict[tuple[str, str, str], list[dict]] = {}  # (target, builtin, mode)
        self.windows: list[Window] = []
        self.last_keyturn_end = 0.0
        self.catch_up = [0.0, 0.0, 0]  # seconds waited, ingester CPU seconds, records
        self.profile: dict | None = None
        self.latency: dict[tuple[str, str, str], dict] = {}  # (target, builtin, mode)
        self.sustained: dict[str, Any] = {}

    def _gateway(self, target: str, checkout: Path | None) -> KeyturnProcess:
        kt = KeyturnProcess(self.ws, self.pg, "bench", self.policy, portal=False,
                            name=target, checkout=checkout)
        kt.create_tokens("alice")
        kt.start("gateway")
        assert kt.proc is not None
        self.dsns[target] = kt.dsn("alice", "bench")
        self.pids[target] = [kt.proc.pid]
        return kt

    def _ingester_ticks(self) -> tuple[int, int]:
        ticks = [cpu_ticks(p) for p in self.ingesters]
        return sum(t[0] for t in ticks), sum(t[1] for t in ticks)

    def settle(self, timeout: float = 180) -> tuple[float, float, int]:
        return settle(self.db_path, self.spool, self.ingesters, timeout)

    def run(self, label: str, target: str, script: Script, mode: str, *, phase: str,
            clients: int | None = None, threads: int | None = None,
            duration: int | None = None, wait_for_ingester: bool = True,
            around: Callable[[Callable[[], dict]], dict] | None = None) -> dict:
        """One pgbench run against ``target``; a Keyturn run opens an audit window.
        ``around``: runs the pgbench run itself (the profiler wraps it)."""
        a = self.args
        clients, threads = clients or a.clients, threads or a.threads
        duration = duration or a.duration
        progress(f"{label}: pgbench -b {script.name} -M {mode} -c {clients} -j {threads} "
                 f"-T {duration} -n against {HEADINGS[target]}")
        if wait_for_ingester:
            for i, v in enumerate(self.settle()):
                self.catch_up[i] += v
            if self.base is not None and (self.base.dir / "audit-spool").is_dir():
                # The baseline's ingester must not work during a measured run either.
                settle(self.base.dir / "keyturn.db", self.base.dir / "audit-spool",
                       self.base_ingesters)
        if target == "keyturn":
            # Statements still in flight when the previous run's -T ended land in it.
            time.sleep(max(0.0, self.last_keyturn_end + WINDOW_GAP - time.time()))
        ing0 = self._ingester_ticks() if target == "keyturn" else (0, 0)
        t0, start = time.monotonic(), time.time()

        file = script.guarded(self.ws.base, mode) if target == "guarded" else None

        def measure() -> dict:
            return pgbench(self.dsns[target], script, mode, clients=clients, threads=threads,
                           duration=duration, pids=self.pids[target], file=file)

        r = around(measure) if around else measure()
        if target == "keyturn":
            self.last_keyturn_end = time.time()
            self.windows.append(Window(phase, script, mode, start, r["n"], clients))
            wall = time.monotonic() - t0
            ing1 = self._ingester_ticks()
            r["ingester_cpu_s"] = tuple((b - x) / CLK_TCK for x, b in zip(ing0, ing1,
                                                                        strict=True))
            r["ingester"] = tuple(s / wall * 100 for s in r["ingester_cpu_s"])
        u, k = us_per_tx(r)
        progress(f"  {r['tps']:,.0f} tps ({r['n']:,} transactions, {r['failed']} failed, "
                 f"latency average {r['latency_ms']:.3f} ms)"
                 + (f"; proxy CPU {r['proxy_user']:.0f}% + {r['proxy_sys']:.0f}% of a core, "
                    f"{u:.0f} + {k:.0f} µs/transaction" if self.pids[target] else "")
                 + "; machine user/sys/idle " + "/".join(f"{x:.0f}%" for x in r["machine"]))
        return r

    # ---- phases

    def table(self) -> None:
        a = self.args
        total = a.rounds * len(self.scripts) * len(self.modes) * len(self.targets)
        i = 0
        for rnd in range(a.rounds):
            # Alternate the order so a drifting machine favours no target.
            order = self.targets if rnd % 2 == 0 else tuple(reversed(self.targets))
            for script in self.scripts:
                for mode in self.modes:
                    for target in order:
                        i += 1
                        label = f"table {i}/{total}" + (f" (round {rnd + 1}/{a.rounds})"
                                                       if a.rounds > 1 else "")
                        r = self.run(label, target, script, mode, phase="table")
                        self.runs.setdefault((target, script.name, mode), []).append(r)

    def median(self, target: str, builtin: str, mode: str) -> dict:
        """The median run (by TPS) stands for the target; transactions are summed."""
        rs = self.runs[target, builtin, mode]
        med = dict(sorted(rs, key=lambda r: r["tps"])[len(rs) // 2])
        med["n_all"] = sum(r["n"] for r in rs)
        med["failed_all"] = sum(r["failed"] for r in rs)
        return med

    def profile_run(self) -> None:
        assert self.kt.proc is not None
        script = self.scripts[0]
        out = self.ws.base / f"profile-keyturn-{script.name}-simple.txt"
        pid, duration = self.kt.proc.pid, self.args.duration
        self.profile = self.run(
            "profile (py-spy on the gateway, not in the table)", "keyturn", script, "simple",
            phase="profile",
            around=lambda measure: profile_keyturn(pid, out, duration, measure))

    def latency_runs(self) -> None:
        total, i = len(self.scripts) * len(self.modes) * 2, 0
        for script in self.scripts:
            for mode in self.modes:
                for target in ("pgbouncer", "keyturn"):
                    i += 1
                    self.latency[target, script.name, mode] = self.run(
                        f"latency {i}/{total}", target, script, mode, phase="latency",
                        clients=1, threads=1)

    def sustained_runs(self, seconds: int) -> None:
        script = self.scripts[0]
        mode = self.modes[0] if len(self.modes) == 1 else "simple"
        s = self.sustained
        s.update(script=script, mode=mode, seconds=seconds)
        s["pgbouncer"] = self.run("sustained 1/2", "pgbouncer", script, mode,
                                  phase="sustained", duration=seconds)
        with sqlite3.connect(self.db_path) as db:
            records0 = max_seq(db)
        progress("  (no wait for the audit ingester before the keyturn run)")
        s["keyturn"] = r = self.run("sustained 2/2", "keyturn", script, mode,
                                    phase="sustained", duration=seconds,
                                    wait_for_ingester=False)
        records1, s["backlog"] = ingest_snapshot(self.db_path, self.spool)
        s["during"] = (records1 - records0, sum(r["ingester_cpu_s"]))
        progress(f"  during the run the ingester stored {records1 - records0:,} records with "
                 f"{sum(r['ingester_cpu_s']):.1f}s of CPU; {s['backlog']:,} bytes of spool "
                 "left; waiting for the drain")
        waited, cpu, records = self.settle(timeout=1800)
        s["drain"] = (waited, records, cpu)

    # ---- the end

    def stop_and_check(self) -> dict[str, Any]:
        """Stop the gateway (SIGTERM drains the spool), verify the chain, count the windows."""
        c: dict[str, Any] = {}
        c["before_stop"] = ingest_snapshot(self.db_path, self.spool)
        progress(f"before SIGTERM: {c['before_stop'][0]:,} audit records in the store, "
                 f"{c['before_stop'][1]:,} bytes of spool not ingested yet")
        progress("stopping the gateway (SIGTERM: closes the spool, the ingester drains it)")
        t0 = time.monotonic()
        c["code"] = self.kt.stop(timeout=900)
        c["stop_s"] = time.monotonic() - t0
        c["left"] = sorted(f.name for f in self.spool.glob("*.jsonl"))
        progress(f"gateway exited with {c['code']} after {c['stop_s']:.1f}s; spool files "
                 f"left: {c['left'] or 'none'}")
        progress("keyturn audit verify")
        c["verify"] = self.kt.cli("audit", "verify", check=False)
        progress("counting the audit records of every keyturn run")
        c["by_kind"], c["outcomes"] = audit_counts(self.db_path)
        c["before_runs"] = count_windows(self.db_path, self.windows) if self.windows else 0
        self.kt.report_log()
        if self.base is not None:
            self.base.stop(timeout=900)
        return c


# ---------------------------------------------------------------- report

def report_table(b: Bench) -> None:
    a = b.args
    if a.rounds > 1:
        print()
        print("each round (TPS; keyturn/pgbouncer):")
        rows = []
        for rnd in range(a.rounds):
            for s in b.scripts:
                for mode in b.modes:
                    tps = {t: b.runs[t, s.name, mode][rnd]["tps"] for t in b.targets}
                    rows.append([str(rnd + 1), s.name, mode]
                                + [f"{tps[t]:,.0f}" for t in b.targets]
                                + [f"{tps['keyturn'] / tps['pgbouncer']:.2f}"])
        print_table(["round", "builtin", "mode"] + [HEADINGS[t] for t in b.targets]
                    + ["keyturn/pgbouncer"], rows)
    print()
    print(f"pgbench -c {a.clients} -j {a.threads} -T {a.duration} -n, scale {a.scale}; TPS "
          "without initial connection time"
          + (f"; median of {a.rounds} rounds" if a.rounds > 1 else "")
          + "; keyturn CPU: the gateway process (not its audit ingester)")
    rows = []
    for s in b.scripts:
        for mode in b.modes:
            pgb, kt = b.median("pgbouncer", s.name, mode), b.median("keyturn", s.name, mode)
            u, k = us_per_tx(kt)
            rows.append([s.name, mode, f"{pgb['tps']:,.0f}", f"{kt['tps']:,.0f}",
                         f"{kt['tps'] / pgb['tps']:.2f}", f"{u:.0f} + {k:.0f} = {u + k:.0f}",
                         "yes" if kt["tps"] >= TARGET_RATIO * pgb["tps"] else "NO"])
    print_table(["builtin", "mode", "pgbouncer TPS", "keyturn TPS", "keyturn/pgbouncer",
                 "keyturn CPU µs/transaction (user + sys)",
                 f"≥ {TARGET_RATIO}× pgbouncer?"], rows)
    failed = {f"{t}/{s}/{m}": v for (t, s, m) in b.runs
              if (v := b.median(t, s, m)["failed_all"])}
    print(f"failed transactions: {failed or 'none'}")

    others = [t for t in b.targets if t not in ("pgbouncer", "keyturn")]
    if others:
        print()
        print("every target (TPS)")
        rows = []
        for s in b.scripts:
            for mode in b.modes:
                tps = {t: b.median(t, s.name, mode)["tps"] for t in b.targets}
                rows.append([s.name, mode] + [f"{tps[t]:,.0f}" for t in b.targets]
                            + [f"{tps['keyturn'] / tps[t]:.2f}" for t in others])
        print_table(["builtin", "mode"] + [HEADINGS[t] for t in b.targets]
                    + [f"keyturn/{HEADINGS[t]}" for t in others], rows)
        if "baseline" in b.targets:
            print(f"baseline: {a.baseline} ({b.base_commit})")

    print()
    print("CPU during each run: the proxy process as % of one core and in µs per pgbench "
          "transaction (user + sys), and the whole machine (2 cores) user / sys / idle")
    rows = []
    for s in b.scripts:
        for mode in b.modes:
            for t in b.targets:
                r = b.median(t, s.name, mode)
                proxy = per_tx = ingester = "-"
                if b.pids[t]:
                    u, k = us_per_tx(r)
                    proxy = f"{r['proxy_user']:.0f} + {r['proxy_sys']:.0f}"
                    per_tx = f"{u:.0f} + {k:.0f}"
                if "ingester" in r:
                    iu, ik = r["ingester"]
                    n = r["n"] or 1
                    cu, ck = (x / n * 1e6 for x in r["ingester_cpu_s"])
                    ingester = f"{iu:.0f} + {ik:.0f} ({cu:.0f} + {ck:.0f} µs)"
                rows.append([s.name, mode, HEADINGS[t], proxy, per_tx, ingester,
                             " / ".join(f"{x:.0f}" for x in r["machine"])])
    print_table(["builtin", "mode", "target", "proxy % of a core", "proxy µs / transaction",
                 "keyturn audit ingester % (µs / transaction)", "machine user / sys / idle %"],
                rows)


def report_profile(profile: dict) -> None:
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


def report_latency(b: Bench) -> None:
    print()
    print(f"latency, one client (pgbench -c 1 -j 1 -T {b.args.duration} -n): pgbench's "
          "latency average / statements per transaction")
    rows = []
    for s in b.scripts:
        for mode in b.modes:
            pgb, kt = (b.latency[t, s.name, mode]["latency_ms"] * 1000 / s.per_tx
                       for t in ("pgbouncer", "keyturn"))
            rows.append([s.name, mode, str(s.per_tx), f"{pgb:.0f}", f"{kt:.0f}",
                         f"{kt - pgb:+.0f}", "yes" if kt - pgb <= LATENCY_GOAL_US else "NO"])
    print_table(["builtin", "mode", "statements / transaction", "pgbouncer µs / statement",
                 "keyturn µs / statement", "added by keyturn µs / statement",
                 f"≤ {LATENCY_GOAL_US} µs?"], rows)


def report_sustained(b: Bench) -> None:
    s, a = b.sustained, b.args
    pgb, kt = s["pgbouncer"], s["keyturn"]
    print()
    print(f"sustained load: pgbench -b {s['script'].name} -M {s['mode']} -c {a.clients} "
          f"-j {a.threads} -T {s['seconds']} -n against pgbouncer, then right away against "
          "keyturn, its audit ingester working alongside (no wait for it before the run)")
    rows = []
    for name, r in (("pgbouncer", pgb), ("keyturn", kt)):
        u, k = us_per_tx(r)
        rows.append([name, f"{r['tps']:,.0f}", f"{r['n']:,}", f"{u:.0f} + {k:.0f}"])
    print_table(["target", "TPS", "transactions", "proxy CPU µs/transaction (user + sys)"],
                rows)
    reached = "yes" if kt["tps"] >= TARGET_RATIO * pgb["tps"] else "NO"
    print(f"keyturn/pgbouncer: {kt['tps'] / pgb['tps']:.2f} (≥ {TARGET_RATIO}× pgbouncer? "
          f"{reached})")
    records, cpu = s["during"]
    iu, ik = kt["ingester"]
    print(f"audit ingester during the keyturn run: {records:,} records ingested, "
          f"{cpu:.1f}s of CPU ({iu:.0f}% + {ik:.0f}% of a core)"
          + (f" = {cpu / records * 1e6:.0f} µs per record" if records else "")
          + f"; {s['backlog']:,} bytes of spool not ingested when the run ended")
    waited, drained, drain_cpu = s["drain"]
    total, total_cpu = records + drained, cpu + drain_cpu
    print(f"including the drain after the run ({waited:.1f}s, {drained:,} more records, "
          f"{drain_cpu:.1f}s of CPU): {total:,} records, {total_cpu:.1f}s of CPU"
          + (f" = {total_cpu / total * 1e6:.0f} µs per record" if total else ""))


def report_audit(b: Bench, c: dict[str, Any]) -> bool:
    """Print the audit check; True when it passed."""
    before_records, spool_bytes = c["before_stop"]
    verify = c["verify"]
    print()
    print("audit check")
    print(f"  before SIGTERM: {before_records:,} audit records in the store, "
          f"{spool_bytes:,} bytes of spool not ingested yet")
    print(f"  gateway exit code after SIGTERM: {c['code']} ({c['stop_s']:.1f}s to drain and "
          f"exit); spool files left: {c['left'] or 'none'}")
    said = "; ".join(line.strip() for line in (verify.stdout + verify.stderr).splitlines())
    print(f"  keyturn audit verify (exit {verify.returncode}): {said}")
    print(f"  audit records by kind: {c['by_kind']}; statement outcomes: {c['outcomes']}")
    print(f"  statement records before the first run (policy probes): {c['before_runs']}")
    ok = verify.returncode == 0 and not c["left"] and c["code"] == 0
    # One row per (phase, builtin, mode); rounds add up.
    groups: dict[tuple[str, str, str], list[Window]] = {}
    for w in b.windows:
        groups.setdefault((w.phase, w.script.name, w.mode), []).append(w)
    rows = []
    for (phase, name, mode), ws in groups.items():
        per_tx = ws[0].script.per_tx
        n = sum(w.transactions for w in ws)
        expected = n * per_tx
        # pgbench counts the transactions it finished; a client's transaction in flight when
        # -T ends may have some or all of its statements audited too.
        allowance = sum(w.clients for w in ws) * per_tx
        audited = sum(w.audited for w in ws)
        good = expected <= audited <= expected + allowance
        ok &= good
        not_ok = sum((w.not_ok for w in ws), Counter())
        classes = sum((w.classes for w in ws), Counter())
        rows.append([phase, name, mode, f"{n:,}", str(per_tx),
                     f"{expected:,} .. {expected + allowance:,}", f"{audited:,}",
                     f"{audited - expected:+,}", str(sum(w.other for w in ws)),
                     ", ".join(f"{k} {v}" for k, v in not_ok.items()) or "-",
                     "PASS" if good else "MISMATCH",
                     ", ".join(f"{k} {v:,}" for k, v in sorted(classes.items()))])
    if rows:
        print_table(["phase", "builtin", "mode", "transactions", "statements / tx",
                     "expected ok records", "audited ok", "extra", "other ok statements",
                     "not ok", "result", "audited by class/rule"], rows)
    probes_ok = all(line.startswith("ok") for line in b.probes)
    print(f"  policy probes: {'PASS' if probes_ok else 'FAIL'}; keyturn audit verify: "
          f"{'PASS' if verify.returncode == 0 else 'FAIL'}")
    ok &= probes_ok
    print(f"  audit check: {'PASS' if ok else 'FAIL'}")
    return ok


# ---------------------------------------------------------------- main

def split_list(value: str, allowed: Sequence[str], what: str,
               ap: argparse.ArgumentParser) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not items or set(items) - set(allowed):
        ap.error(f"{what}: a comma-separated list of {', '.join(allowed)}")
    return items


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
                    help="one extra keyturn run (first built-in, simple) under py-spy, not in "
                         "the table")
    ap.add_argument("--builtin", default="select-only",
                    help="comma-separated pgbench built-in scripts, run in this order: "
                         f"{', '.join(BUILTINS)} (with a write script the policy allows "
                         "writes to the pgbench tables)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma-separated protocol modes (default: simple,extended,prepared)")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help="comma-separated targets of the table (pgbouncer and keyturn are "
                         f"always measured; default: {','.join(TARGETS)})")
    ap.add_argument("--baseline", metavar="DIR",
                    help="another checkout of Keyturn (a git worktree at the commit before a "
                         "change, its extension built in place with `python setup.py "
                         "build_ext --inplace`), measured as one more target in the table")
    ap.add_argument("--latency", action="store_true",
                    help="single-client runs per (built-in, mode) against pgbouncer and "
                         "keyturn: latency per statement and what keyturn adds")
    ap.add_argument("--sustained", type=int, metavar="SECONDS", default=0,
                    help="last, one long run against pgbouncer and keyturn with the audit "
                         "ingester working alongside")
    ap.add_argument("--no-table", dest="table", action="store_false",
                    help="skip the table runs (for --sustained / --latency / --profile)")
    args = ap.parse_args()
    builtins = split_list(args.builtin, BUILTINS, "--builtin", ap)
    modes = split_list(args.modes, MODES, "--modes", ap)
    targets = split_list(args.targets, TARGETS, "--targets", ap)
    targets = tuple(t for t in TARGETS if t in {*targets, "pgbouncer", "keyturn"})
    if args.baseline:
        if not args.table:
            ap.error("--baseline is measured in the table: drop --no-table")
        targets = (*targets, "baseline")
    if not (args.table or args.latency or args.sustained or args.profile):
        ap.error("--no-table without --sustained, --latency or --profile runs nothing")
    if args.threads > args.clients:
        ap.error("--threads must not exceed --clients")
    scripts = [Script.load(name) for name in builtins]
    ensure_pgbouncer()
    print(f"machine: {machine_line()}")
    print("pgbench statements per transaction: "
          + ", ".join(f"{s.name} {s.per_tx}" for s in scripts))
    with Workspace("pgbench", keep=args.keep) as ws:
        b = Bench(ws, args, scripts, modes, targets if args.table else ())
        if args.table:
            b.table()
        if args.profile:
            b.profile_run()
        if args.latency:
            b.latency_runs()
        if args.sustained:
            b.sustained_runs(args.sustained)
        checked = b.stop_and_check()

        if args.table:
            report_table(b)
            waited, cpu, records = b.catch_up
            print(f"keyturn's audit ingester between the runs (waited for before each run): "
                  f"{records:,} records in {waited:.1f}s, {cpu:.1f}s of CPU"
                  + (f" = {cpu / records * 1e6:.0f} µs per record" if records else ""))
        if b.profile:
            report_profile(b.profile)
        if args.latency:
            report_latency(b)
        if args.sustained:
            report_sustained(b)
        ok = report_audit(b, checked)
        if args.keep:
            print(f"logs: {b.kt.log_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    run_script(main)
