"""Run every fuzz target for a bounded time, or replay one input (``make fuzz``).

    python -m fuzz.run [--seconds 60] [--only fast_shape,rowmask]
    python -m fuzz.run --repro rowmask build/fuzz/crashers/rowmask/crash-...

Each target (fuzz/target_<name>.py) runs in its own process under atheris, with
atheris's ASan + libFuzzer runtime preloaded (the sanitized extension needs it), every
sanitizer report fatal, and CPython's small-object allocator off (PYTHONMALLOC=malloc) so
that ASan sees the Python objects the C reads, bytes included. New corpus entries go
to build/fuzz/corpus/<name>/ (the seeds in fuzz/corpus/<name>/ are read, never
written); an input that crashes, trips a sanitizer or makes the two twins differ is
written to build/fuzz/crashers/<name>/. Prints per target the executions, the coverage
libFuzzer reports (cov: edges, ft: features) and the seconds; exits 1 if any target
failed. Logs: build/fuzz/logs/<name>.log.

This runner must not build anything (fuzz/build.sh does) and must not be run as part of
the ordinary test suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "fuzz"
TARGETS = ("fast_shape", "rowmask", "auditbuffer", "fastpath")
#: libFuzzer flags per target (the default input size is 4096 bytes).
FLAGS: dict[str, list[str]] = {"fastpath": ["-max_len=8192"]}
#: A single input taking longer than this is a hang (a failure).
INPUT_TIMEOUT = 60


def sanitizer_env() -> dict[str, str]:
    import atheris

    runtime = Path(atheris.path()) / "asan_with_fuzzer.so"
    if not runtime.exists():
        raise SystemExit(f"atheris has no {runtime.name} (reinstall atheris: pip install "
                         "--force-reinstall atheris)")
    env = dict(os.environ)
    env.pop("KEYTURN_NO_SPEEDUPS", None)
    env.update({
        "LD_PRELOAD": str(runtime),
        # CPython leaks by design; everything else ASan finds ends the run.
        "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1:"
                        "detect_stack_use_after_return=0:handle_abort=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "PYTHONMALLOC": "malloc",
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    for symbolizer in ("/usr/bin/llvm-symbolizer",):
        if Path(symbolizer).exists():
            env.setdefault("ASAN_SYMBOLIZER_PATH", symbolizer)
    return env


@dataclass
class Result:
    name: str
    ok: bool
    runs: int = 0
    per_second: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    seconds: float = 0.0
    problem: str = ""
    artifact: str = ""


def parse(name: str, log: str, code: int, seconds: float) -> Result:
    r = Result(name, ok=code == 0, seconds=seconds)
    if m := re.search(r"stat::number_of_executed_units:\s+(\d+)", log):
        r.runs = int(m.group(1))
    elif m := re.search(r"Done (\d+) runs", log):
        r.runs = int(m.group(1))
    if m := re.search(r"stat::average_exec_per_sec:\s+(\d+)", log):
        r.per_second = int(m.group(1))
    stats = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    if stats:
        r.cov, r.ft, r.corpus = (int(x) for x in stats[-1])
    for marker in ("ERROR: AddressSanitizer", "runtime error:", "Uncaught Python exception",
                   "ERROR: libFuzzer", "SUMMARY: "):
        if marker in log:
            r.ok = False
            r.problem = r.problem or marker
    if m := re.search(r"Test unit written to (\S+)", log):
        r.artifact = m.group(1)
        r.ok = False
    if not r.ok and not r.problem:
        r.problem = f"exit status {code}"
    return r


def run_target(name: str, seconds: int, env: dict[str, str]) -> Result:
    crashers = BUILD / "crashers" / name
    corpus = BUILD / "corpus" / name
    logs = BUILD / "logs"
    for d in (crashers, corpus, logs):
        d.mkdir(parents=True, exist_ok=True)
    seeds = ROOT / "fuzz" / "corpus" / name
    cmd = [sys.executable, "-m", f"fuzz.target_{name}", f"-max_total_time={seconds}",
           f"-timeout={INPUT_TIMEOUT}", "-rss_limit_mb=6144", "-print_final_stats=1",
           f"-artifact_prefix={crashers}/", *FLAGS.get(name, []), str(corpus)]
    if seeds.is_dir():
        cmd.append(str(seeds))
    log_path = logs / f"{name}.log"
    print(f"fuzz {name}: {seconds} s (log {log_path.relative_to(ROOT)}, crashers "
          f"{crashers.relative_to(ROOT)}/)", flush=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=seconds + 180).returncode
        except subprocess.TimeoutExpired:
            code = -1
    text = log_path.read_text(errors="replace")
    result = parse(name, text, code, time.monotonic() - start)
    if code == -1:
        result.ok, result.problem = False, "did not stop within its time (hang?)"
    if not result.ok:
        print(f"--- {name} failed ({result.problem}); the end of its log:")
        print("\n".join(text.splitlines()[-60:]))
        report_failure(text, result.artifact)
        print("---")
    return result


def report_failure(log: str, artifact: str) -> None:
    """Print what a remote log must keep to reproduce a failure: the Python traceback
    (it comes before the sanitizer's stack, beyond the log's end shown) and the input
    itself, base64-encoded (a clean clone's build/ directory does not survive its run)."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if "Uncaught Python exception" in line:
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].startswith("==") and "ERROR" in lines[j]), len(lines))
            print("--- the Python exception:")
            print("\n".join(lines[i:min(end, i + 80)]))
            break
    if artifact and Path(artifact).is_file():
        data = Path(artifact).read_bytes()
        print(f"--- the input ({len(data)} bytes, base64; decode with base64 -d > FILE):")
        print(base64.b64encode(data).decode())


def summary(results: list[Result]) -> None:
    print(f"{'target':<12} {'result':<7} {'runs':>9} {'exec/s':>7} {'cov':>6} {'ft':>7} "
          f"{'corpus':>6} {'seconds':>8}")
    for r in results:
        print(f"{r.name:<12} {'ok' if r.ok else 'FAILED':<7} {r.runs:>9} {r.per_second:>7} "
              f"{r.cov:>6} {r.ft:>7} {r.corpus:>6} {r.seconds:>8.1f}"
              + (f"  {r.problem}" + (f", input {r.artifact}" if r.artifact else "")
                 if not r.ok else ""))
    failed = [r for r in results if not r.ok]
    print(f"fuzz: {len(results) - len(failed)} passed, {len(failed)} failed")
    for r in failed:
        if r.artifact:
            print(f"replay: {sys.executable} -m fuzz.run --repro {r.name} {r.artifact}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    ap.add_argument("--only", default="", help="comma-separated targets (default: all)")
    ap.add_argument("--repro", nargs=2, metavar=("TARGET", "INPUT"),
                    help="run one target on one input and show what happens")
    args = ap.parse_args(argv)
    env = sanitizer_env()
    if args.repro:
        name, path = args.repro
        cmd = [sys.executable, "-m", f"fuzz.target_{name}", f"-timeout={INPUT_TIMEOUT}",
               "-rss_limit_mb=6144", str(Path(path).resolve())]
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode
    names = [n for n in args.only.split(",") if n] or list(TARGETS)
    unknown = set(names) - set(TARGETS)
    if unknown:
        ap.error(f"unknown target(s) {', '.join(sorted(unknown))}: {', '.join(TARGETS)}")
    results = [run_target(name, args.seconds, env) for name in names]
    summary(results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
