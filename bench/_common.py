"""Helpers shared by the benchmark scripts in bench/.

Every benchmark starts its own servers under one temporary directory and
tears them down at the end, also on Ctrl-C or SIGTERM (``Workspace``).
Keyturn runs as a real ``keyturn`` subprocess with its own config, store and
free ports (``KeyturnProcess``), exactly as an operator would run it.

What these helpers start must not outlive its benchmark, nor listen anywhere
but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from keyturn.launch.localpg import LocalPostgres

BENCH_DIR = Path(__file__).resolve().parent
KEYTURN = [sys.executable, "-m", "keyturn.launch"]
_T0 = time.monotonic()


# ---------------------------------------------------------------- output

def progress(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", flush=True)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
    sys.stdout.flush()


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def machine_line() -> str:
    return (f"nproc {len(os.sched_getaffinity(0))}, kernel {os.uname().release}, "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}")


# ---------------------------------------------------------------- processes and ports

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} "
                               f"opened\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process in clock ticks (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (scans /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def machine_cpu() -> tuple[int, int, int]:
    """Whole-machine (user + nice, system + irq + softirq, idle + iowait) ticks."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return v[0] + v[1], v[2] + v[5] + v[6], v[3] + v[4]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def stop_process(proc: subprocess.Popen | None, timeout: float = 30) -> int | None:
    """SIGTERM, wait, then SIGKILL; returns the exit code."""
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def service_user() -> pwd.struct_passwd | None:
    """The unprivileged user servers run as when we are root (None when we are not)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", "postgres"], check=True)
        return pwd.getpwnam("postgres")


class Workspace:
    """A temp directory plus everything started in it; ``close()`` undoes it all.

    Use as a context manager. SIGTERM is turned into KeyboardInterrupt so the
    same clean-up runs for Ctrl-C, ``kill`` and normal exit.
    """

    def __init__(self, name: str, keep: bool = False):
        self.base = Path(tempfile.mkdtemp(prefix=f"keyturn-{name}-"))
        # Servers that run as the postgres user must be able to walk into it.
        os.chmod(self.base, 0o711)
        self.keep = keep
        self.procs: list[subprocess.Popen] = []
        self.clusters: list[LocalPostgres] = []
        self.keyturns: list[KeyturnProcess] = []

    def __enter__(self) -> Workspace:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        progress(f"work directory {self.base}")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is KeyboardInterrupt:
            progress("interrupted; cleaning up")
        self.close()

    def postgres(self, name: str, **settings: str) -> LocalPostgres:
        pg = LocalPostgres(self.base / name, settings=settings or None)
        self.clusters.append(pg)
        pg.start()
        return pg

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        # Own session: a terminal Ctrl-C reaches only us; we stop children in order.
        proc = subprocess.Popen(list(args), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for kt in self.keyturns:
            kt.stop()
        for proc in reversed(self.procs):
            stop_process(proc, timeout=15)
        for pg in self.clusters:
            try:
                pg.stop()
            except Exception as exc:  # keep cleaning up the rest
                print(f"could not stop {pg}: {exc}", file=sys.stderr)
        if self.keep:
            progress(f"kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------- Keyturn

USERS = """\
identity:
  users:
    alice: {groups: [engineers]}
    bob: {groups: [approvers]}
"""

POLICY_READS_ONLY = """\
policies:
  bench:
    default: block
    rules:
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
"""

POLICY_WRITES_ALLOWED = """\
policies:
  bench:
    default: block
    rules:
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
      - name: pgbench-writes
        match: {class: write, tables: ["public.pgbench_*"]}
        action: allow
"""

POLICY_WRITES_REVIEWED = """\
policies:
  bench:
    default: block
    rules:
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
      - name: writes-need-approval
        match: {class: write}
        action: review
        reason: benchmark
        review: {approvers: [approvers], min_approvals: 1, timeout: 10m, mode: hold}
"""


class KeyturnProcess:
    """A config file, tokens, and a running ``keyturn gateway`` or ``keyturn up``.

    ``store_url`` None means SQLite in the work dir; otherwise it is passed in
    the environment variable KEYTURN_BENCH_STORE_URL (``store: {url_env: ...}``),
    never written into the config file.
    """

    STORE_ENV = "KEYTURN_BENCH_STORE_URL"

    def __init__(self, ws: Workspace, pg: LocalPostgres, dbname: str, policy: str, *,
                 portal: bool, store_url: str | None = None, name: str = "keyturn",
                 connection_extra: str = "", checkout: Path | None = None,
                 portal_extra: str = ""):
        """``checkout``: run the Keyturn of another source tree (a worktree at another
        commit, its extension built in place) instead of this one. ``portal_extra``: more
        lines for the ``portal:`` section (indented by two spaces)."""
        self.ws = ws
        self.dir = ws.base / name
        self.dir.mkdir()
        self.gateway_port = free_port()
        self.portal_port = free_port() if portal else None
        self.env = dict(os.environ)
        self.cmd = KEYTURN
        if checkout is not None:
            self.env["PYTHONPATH"] = str(checkout)
            # Older trees had the launcher at keyturn.cli.
            launcher = "keyturn.launch" if (checkout / "keyturn" / "launch").is_dir() \
                else "keyturn.cli"
            self.cmd = [sys.executable, "-m", launcher]
        if store_url:
            self.env[self.STORE_ENV] = store_url
        store = f"url_env: {self.STORE_ENV}" if store_url else "url: sqlite:///keyturn.db"
        portal_cfg = (f"portal:\n  listen: 127.0.0.1:{self.portal_port}\n{portal_extra}"
                      if portal else "")
        self.config = self.dir / "keyturn.yaml"
        self.config.write_text(textwrap.dedent(f"""\
            store:
              {store}
            gateway:
              postgres: 127.0.0.1:{self.gateway_port}
            """) + portal_cfg + USERS + textwrap.dedent(f"""\
            connections:
              - name: {dbname}
                type: postgres
                target: {{host: 127.0.0.1, port: {pg.port}, dbname: {dbname}, user: postgres}}
                policy: bench
            """) + textwrap.indent(textwrap.dedent(connection_extra), "    ") + policy)
        self.log_path = self.dir / "keyturn.log"
        self.proc: subprocess.Popen | None = None
        self.portal_proc: subprocess.Popen | None = None
        self.tokens: dict[str, str] = {}
        ws.keyturns.append(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.portal_port}"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*self.cmd, "-c", str(self.config), *args], capture_output=True,
                             text=True, env=self.env, cwd=self.dir, timeout=600)
        if check and res.returncode != 0:
            raise RuntimeError(f"keyturn {' '.join(args)} failed ({res.returncode}):\n"
                               f"{res.stdout}\n{res.stderr}")
        return res

    def create_tokens(self, *users: str) -> None:
        self.cli("db", "upgrade")
        for user in users:
            self.tokens[user] = self.cli("token", "create", "--user", user, "-q").stdout.strip()

    def start(self, command: str) -> None:
        """``command`` is ``gateway``, ``up`` (gateway + API in one process) or ``split``
        (``keyturn gateway`` and ``keyturn portal`` as two processes sharing the store)."""
        with open(self.log_path, "ab") as log:
            self.proc = self.ws.popen(
                [*self.cmd, "-c", str(self.config), "gateway" if command == "split" else command],
                cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, env=self.env)
            if command == "split":
                self.portal_proc = self.ws.popen(
                    [*self.cmd, "-c", str(self.config), "portal"], cwd=self.dir, stdout=log,
                    stderr=subprocess.STDOUT, env=self.env)
        wait_port(self.gateway_port, proc=self.proc, log=self.log_path)
        if self.portal_port and command in ("up", "split"):
            wait_port(self.portal_port, proc=self.portal_proc or self.proc, log=self.log_path)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM, wait for the exit. The gateway closes its audit spool and waits for its
        ingester child to drain it, which takes a while after a heavy run: ``timeout``."""
        code = stop_process(self.proc, timeout=timeout)
        stop_process(self.portal_proc, timeout=timeout)
        self.proc = self.portal_proc = None
        return code

    def dsn(self, user: str, dbname: str) -> str:
        return (f"host=127.0.0.1 port={self.gateway_port} dbname={dbname} user={user} "
                f"password={self.tokens[user]} sslmode=disable")

    def log_problems(self) -> list[str]:
        """Tracebacks and ERROR/CRITICAL lines from the gateway's log."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text(errors="replace")
        out = [m.group(0) for m in re.finditer(r"^.* (ERROR|CRITICAL) .*$", text, re.M)]
        out += [f"Traceback ... {m.group(1)}" for m in
                re.finditer(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n)*(.*)$",
                            text, re.M)]
        return out

    def report_log(self) -> None:
        """Print the gateway log's problems, grouped (numbers and hex masked)."""
        problems = self.log_problems()
        if not problems:
            progress(f"gateway log {self.log_path}: no errors or tracebacks")
            return
        groups: dict[str, int] = {}
        for p in problems:
            key = re.sub(r"^\d{4}-\d\d-\d\d \S+ ", "", p)  # drop the timestamp
            key = re.sub(r"\\x[0-9a-f]+|\b\d+\b", "#", key)
            groups[key] = groups.get(key, 0) + 1
        progress(f"gateway log {self.log_path}: {len(problems)} error lines/tracebacks:")
        for key, count in sorted(groups.items(), key=lambda kv: -kv[1])[:10]:
            print(f"    {count:>6} x {key[:250]}")


def run_script(main: Callable[[], int]) -> None:
    """A benchmark's entry point: its exit status; Ctrl-C exits 130 (Workspace cleans up)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)


def store_arguments(doc: str, n: int, n_help: str) -> argparse.ArgumentParser:
    """The options the per-store latency benchmarks share: -n, --stores, --keep."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("-n", type=int, default=n, help=n_help)
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    return ap


def finish(kt: KeyturnProcess, *workers: subprocess.Popen) -> None:
    """End a store's run: the helper processes (their stdin closed: they exit at EOF), then
    Keyturn, then its log's problems."""
    for worker in workers:
        if worker.stdin is not None:
            worker.stdin.close()
        stop_process(worker)
    kt.stop()
    kt.report_log()


def approver_worker(ws: Workspace, kt: KeyturnProcess, user: str, *extra: str
                    ) -> subprocess.Popen:
    """Start bench/_approver.py: approves ticket ids it reads on stdin (see there)."""
    env = dict(os.environ, KEYTURN_TOKEN=kt.tokens[user])
    return ws.popen([sys.executable, str(BENCH_DIR / "_approver.py"), kt.url, *extra],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
