"""SSH gateway benchmarks: scp throughput, added latency per command, many recorded shells.

Starts a throwaway OpenSSH server (keyturn.launch.localssh) and ``keyturn gateway`` with
one ssh connection to it, then measures, each next to its baseline in the same run:

1. **scp of a file** (default 1 GiB of random bytes, upload and download): directly to
   the OpenSSH server, through an OpenSSH jump host (``scp -J``, the same server), and
   through Keyturn (every SFTP operation judged and audited).
2. **added latency per command**: ``ssh HOST true`` N times directly and through Keyturn
   (policy evaluation, write-ahead audit, a recording, a new upstream login per command);
   p50 and p95 of the wall time of each run of the client.
3. **concurrent recorded shells**: S interactive sessions (``ssh -tt``) open at once,
   each typing a command every second for D seconds, all recorded: the gateway's CPU
   (user + system) and RSS, and that every session got every answer.

Usage: .venv/bin/python bench/ssh_bench.py [--size-mib 1024] [--execs 100] [--shells 200]
       [--shell-seconds 30] [--parts scp,exec,shells] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import textwrap
import threading
import time
from pathlib import Path

from _common import (
    CLK_TCK,
    KEYTURN,
    Workspace,
    cpu_ticks,
    free_port,
    machine_line,
    percentile,
    print_table,
    progress,
    rss_kib,
    run_script,
    stop_process,
    wait_port,
)

from keyturn.launch.localssh import TARGET_USER, LocalSSHD, keygen

SSH_OPTS = ["-F", "none", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR"]


def start_keyturn(ws: Workspace, sshd: LocalSSHD) -> tuple[subprocess.Popen, int, Path]:
    d = ws.base / "keyturn"
    d.mkdir()
    keygen(d / "target_key", "keyturn -> target")
    sshd.authorize(d / "target_key.pub")
    keygen(d / "alice_key", "alice")
    port = free_port()
    (d / "keyturn.yaml").write_text(textwrap.dedent(f"""\
        store: {{url: "sqlite:///keyturn.db"}}
        gateway:
          ssh: 127.0.0.1:{port}
        identity:
          users:
            alice: {{groups: [engineers]}}
        connections:
          - name: host
            type: ssh
            target: {{host: 127.0.0.1, port: {sshd.port}, user: {TARGET_USER},
                      key_file: {d / 'target_key'}, host_key: "{sshd.host_fingerprint}"}}
            policy: bench
        policies:
          bench:
            default: block
            rules:
              - name: shells
                match: {{class: shell}}
                action: allow
              - name: everything-known
                match: {{class: [read, write]}}
                action: allow
        """))
    cli = [*KEYTURN, "-c", str(d / "keyturn.yaml")]
    subprocess.run([*cli, "db", "upgrade"], cwd=d, check=True, capture_output=True)
    subprocess.run([*cli, "key", "add", "--user", "alice", str(d / "alice_key.pub")], cwd=d,
                   check=True, capture_output=True)
    log = open(d / "keyturn.log", "ab")  # noqa: SIM115 - the process keeps it
    proc = ws.popen([*cli, "gateway"], cwd=d, stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, proc=proc, log=d / "keyturn.log")
    return proc, port, d


def timed(argv: list[str], **kw: object) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=3600, **kw)  # type: ignore[call-overload]
    return time.monotonic() - t0


def bench_scp(ws: Workspace, sshd: LocalSSHD, port: int, kdir: Path, size_mib: int) -> None:
    src = ws.base / "payload.bin"
    progress(f"writing {size_mib} MiB of random bytes")
    with open(src, "wb") as fh:
        for _ in range(size_mib):
            fh.write(os.urandom(1 << 20))
    dest = f"/tmp/ktbench-{os.getpid()}"
    os.makedirs(dest, exist_ok=True)
    os.chmod(dest, 0o777)
    direct_key = ["-i", str(kdir / "target_key")]
    routes = {
        "direct OpenSSH": (["-P", str(sshd.port), *direct_key], f"{TARGET_USER}@127.0.0.1"),
        "OpenSSH jump host (-J)": (
            ["-P", str(sshd.port), *direct_key, "-o",
             f"ProxyCommand=ssh {' '.join(SSH_OPTS)} -i {kdir / 'target_key'} -p {sshd.port} "
             f"-W %h:%p {TARGET_USER}@127.0.0.1"], f"{TARGET_USER}@127.0.0.1"),
        "keyturn": (["-P", str(port), "-i", str(kdir / "alice_key")], "alice+host@127.0.0.1"),
    }
    rows = []
    base_up = base_down = 0.0
    for name, (opts, who) in routes.items():
        progress(f"scp through {name}")
        up = timed(["scp", *SSH_OPTS, *opts, str(src), f"{who}:{dest}/up.bin"])
        down = timed(["scp", *SSH_OPTS, *opts, f"{who}:{dest}/up.bin", str(ws.base / "d.bin")])
        same = subprocess.run(["cmp", str(src), str(ws.base / "d.bin")]).returncode == 0
        os.unlink(ws.base / "d.bin")
        os.unlink(f"{dest}/up.bin")
        if name == "direct OpenSSH":
            base_up, base_down = up, down
        rows.append([name, f"{size_mib / up:.0f}", f"{base_up / up:.2f}",
                     f"{size_mib / down:.0f}", f"{base_down / down:.2f}",
                     "yes" if same else "NO"])
    shutil.rmtree(dest, ignore_errors=True)
    print()
    print(f"scp of {size_mib} MiB ({machine_line()})")
    print_table(["route", "upload MiB/s", "× direct", "download MiB/s", "× direct",
                 "bytes identical"], rows)


def bench_exec(sshd: LocalSSHD, port: int, kdir: Path, n: int) -> None:
    runs = {
        "direct OpenSSH": ["ssh", *SSH_OPTS, "-i", str(kdir / "target_key"), "-p",
                           str(sshd.port), f"{TARGET_USER}@127.0.0.1", "true"],
        # What the client and keyturn agree on: OpenSSH 9's default post-quantum key
        # exchange (sntrup761) is not offered by asyncssh, and costs tens of ms here.
        "direct, curve25519 kex": ["ssh", *SSH_OPTS, "-o", "KexAlgorithms=curve25519-sha256",
                                   "-i", str(kdir / "target_key"), "-p", str(sshd.port),
                                   f"{TARGET_USER}@127.0.0.1", "true"],
        "keyturn": ["ssh", *SSH_OPTS, "-i", str(kdir / "alice_key"), "-p", str(port),
                    "alice:host@127.0.0.1", "true"],
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    progress(f"ssh HOST true x{n}, alternating direct and keyturn")
    for _ in range(n):
        for name, argv in runs.items():
            times[name].append(timed(argv) * 1000)
    d, k = times["direct, curve25519 kex"], times["keyturn"]
    print()
    print(f"ssh HOST true, {n} runs each ({machine_line()})")
    print_table(["route", "p50 ms", "p95 ms", "max ms"],
                [[name, f"{percentile(v, 50):.1f}", f"{percentile(v, 95):.1f}",
                  f"{max(v):.1f}"] for name, v in times.items()])
    print(f"added by keyturn over direct with the same key exchange: p50 "
          f"{percentile(k, 50) - percentile(d, 50):.1f} ms, p95 "
          f"{percentile(k, 95) - percentile(d, 95):.1f} ms")


def bench_shells(ws: Workspace, gw: subprocess.Popen, port: int, kdir: Path, count: int,
                 seconds: int) -> None:
    progress(f"opening {count} recorded shells")
    argv = ["ssh", *SSH_OPTS, "-tt", "-i", str(kdir / "alice_key"), "-p", str(port),
            "alice:host@127.0.0.1"]
    procs = []
    for _ in range(count):
        procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL))
        time.sleep(0.02)
    outputs: list[bytes] = [b""] * count

    def reader(i: int, p: subprocess.Popen) -> None:
        assert p.stdout is not None
        outputs[i] = p.stdout.read()

    threads = [threading.Thread(target=reader, args=(i, p), daemon=True)
               for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    time.sleep(5)  # logins settle
    u0, s0 = cpu_ticks(gw.pid)
    t0 = time.monotonic()
    peak = rss_kib(gw.pid)
    for second in range(seconds):
        for i, p in enumerate(procs):
            assert p.stdin is not None
            try:
                p.stdin.write(f"echo s{i}-t{second}-$((6*7))\n".encode())
                p.stdin.flush()
            except BrokenPipeError:
                pass
        peak = max(peak, rss_kib(gw.pid))
        time.sleep(max(0.0, t0 + second + 1 - time.monotonic()))
    u1, s1 = cpu_ticks(gw.pid)
    wall = time.monotonic() - t0
    for p in procs:
        assert p.stdin is not None
        try:
            p.stdin.write(b"exit\n")
            p.stdin.close()
        except BrokenPipeError:
            pass
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
    for t in threads:
        t.join(10)
    answered = sum(all(f"s{i}-t{s}-42".encode() in out for s in range(seconds))
                   for i, out in enumerate(outputs))
    cpu = (u1 - u0 + s1 - s0) / CLK_TCK
    print()
    print(f"{count} recorded interactive sessions, one command each per second for "
          f"{seconds} s ({machine_line()})")
    print_table(["sessions", "commands", "gateway CPU", "CPU per command", "gateway RSS peak",
                 "sessions with every answer"],
                [[count, count * seconds, f"{100 * cpu / wall:.0f} % of a core",
                  f"{1e3 * cpu / (count * seconds):.2f} ms", f"{peak / 1024:.0f} MiB",
                  f"{answered}/{count}"]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--execs", type=int, default=100)
    ap.add_argument("--shells", type=int, default=200)
    ap.add_argument("--shell-seconds", type=int, default=30)
    ap.add_argument("--parts", default="scp,exec,shells")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    with Workspace("ssh-bench", keep=args.keep) as ws:
        sshd = LocalSSHD(ws.base / "sshd")
        sshd.start()
        try:
            gw, port, kdir = start_keyturn(ws, sshd)
            if "exec" in parts:
                bench_exec(sshd, port, kdir, args.execs)
            if "scp" in parts:
                bench_scp(ws, sshd, port, kdir, args.size_mib)
            if "shells" in parts:
                bench_shells(ws, gw, port, kdir, args.shells, args.shell_seconds)
            stop_process(gw, timeout=120)
            log = (kdir / "keyturn.log").read_text(errors="replace")
            problems = [ln for ln in log.splitlines() if " ERROR " in ln or "Traceback" in ln]
            progress(f"gateway log: {len(problems)} error lines/tracebacks")
            for ln in problems[:10]:
                print("   ", ln[:200])
        finally:
            sshd.stop()
    return 0


if __name__ == "__main__":
    run_script(main)
