"""psycopg 3's own test suite through the gateway and directly, compared (``make compat``).

Starts a throwaway PostgreSQL (keyturn.launch.localpg) and a ``keyturn gateway`` in front of it
under an allow-all policy, runs psycopg's tests/ once against the server directly and once
through the gateway, and prints the counts of both runs and the tests that fail only
through the gateway, grouped by reason. Nothing is committed: the test suite, its virtual
environment and the runs live under --work (default /tmp/keyturn-compat).

Where the tests come from: psycopg's releases on PyPI ship no tests/ (their sdists are
built from the package directory alone), so the runner looks, in order, at --source (or
PSYCOPG_SOURCE): a psycopg source tree, a git repository of psycopg (the tag of the
installed version, else the nearest earlier release tag) or a source tarball; then at the
PyPI sdist of the installed version, then at Debian's source package (apt-get source
psycopg3, where deb-src is configured). The tests run with the psycopg version installed
in this project's environment, in a separate virtual environment with their own test
dependencies.

    python bench/psycopg_compat.py --source ~/src/psycopg [--timeout 60] [-k EXPR]

It must not install into the project's own environment, and it is not part of ``make
test``.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import KeyturnProcess, Workspace  # noqa: E402

# What psycopg's tests import beyond psycopg itself (pytest-timeout bounds each test).
TEST_DEPS = ["pytest", "pytest-timeout", "anyio>=4", "pproxy", "packaging", "dnspython"]
# Every class allowed (the default allows all but unknown, which only a rule naming it may).
POLICY_ALLOW_ALL = """\
policies:
  bench:
    default: allow
    rules:
      - name: even-unknown
        match: {class: unknown}
        action: allow
"""


def log(message: str) -> None:
    print(f"[compat] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the test suite

def _version_key(tag: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", tag)
    return tuple(int(p) for p in m.groups()) if m else None


def _from_git(repo: Path, version: str, dest: Path) -> str:
    tags = subprocess.run(["git", "--git-dir", str(repo), "tag"], check=True,
                          capture_output=True, text=True).stdout.split()
    want = _version_key(version)
    releases = sorted((k, t) for t in tags if (k := _version_key(t)) is not None
                      and (want is None or k <= want))
    if version in tags:
        tag = version
    elif releases:
        tag = releases[-1][1]
    else:
        raise SystemExit(f"{repo}: no release tag at or before {version}")
    archive = subprocess.run(["git", "--git-dir", str(repo), "archive", tag, "tests",
                              "pyproject.toml"], check=True, capture_output=True).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return f"git tag {tag} of {repo}"


def _git_dir(path: Path) -> Path | None:
    if (path / ".git").exists():
        return path / ".git"
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        return path
    return None


def _from_tree(tree: Path, dest: Path) -> None:
    shutil.copytree(tree / "tests", dest / "tests")
    if (tree / "pyproject.toml").exists():
        shutil.copy(tree / "pyproject.toml", dest / "pyproject.toml")


def _from_tarball(tarball: Path, dest: Path) -> bool:
    unpacked = dest.with_name(dest.name + "-unpacked")
    shutil.rmtree(unpacked, ignore_errors=True)
    unpacked.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(unpacked, filter="data")
    for tests in sorted(unpacked.glob("*/tests")) + sorted(unpacked.glob("tests")):
        if (tests / "conftest.py").exists():
            _from_tree(tests.parent, dest)
            return True
    return False


def fetch_tests(version: str, source: str | None, work: Path, python: Path) -> tuple[Path, str]:
    """A directory holding psycopg's tests/ (and its pytest settings), and where it came
    from."""
    dest = work / "suite"
    shutil.rmtree(dest, ignore_errors=True)
    if source:
        path = Path(source).expanduser().resolve()
        if (git := _git_dir(path)) is not None:
            return dest, _from_git(git, version, dest)
        if (path / "tests" / "conftest.py").exists():
            _from_tree(path, dest)
            return dest, f"source tree {path}"
        if path.is_file() and _from_tarball(path, dest):
            return dest, f"tarball {path}"
        raise SystemExit(f"{path}: not a psycopg source tree, git repository or tarball "
                         "with tests/")
    tried = []
    sdists = work / "sdist"
    shutil.rmtree(sdists, ignore_errors=True)
    got = subprocess.run([str(python), "-m", "pip", "download", "-q", "--no-deps",
                          "--no-binary", ":all:", "-d", str(sdists),
                          f"psycopg=={version}"], capture_output=True, text=True)
    for tarball in sorted(sdists.glob("psycopg-*.tar.gz")):
        if _from_tarball(tarball, dest):
            return dest, f"PyPI sdist {tarball.name}"
        tried.append(f"PyPI sdist {tarball.name} has no tests/")
    if not tried:
        tried.append(f"PyPI sdist psycopg=={version} not downloaded: "
                     f"{(got.stderr.strip().splitlines() or ['?'])[-1]}")
    debian = work / "debian"
    shutil.rmtree(debian, ignore_errors=True)
    debian.mkdir(parents=True)
    apt = subprocess.run(["apt-get", "source", "--download-only", "psycopg3"], cwd=debian,
                         capture_output=True, text=True)
    for tarball in sorted(debian.glob("psycopg3_*.orig.tar.*")):
        if _from_tarball(tarball, dest):
            return dest, f"Debian source package {tarball.name}"
    tried.append("Debian source package psycopg3 not available: "
                 f"{(apt.stderr.strip().splitlines() or ['?'])[-1]}")
    raise SystemExit("psycopg's tests/ could not be obtained:\n  " + "\n  ".join(tried) +
                     "\nPass --source (or PSYCOPG_SOURCE) with a psycopg source tree, git "
                     "repository or source tarball.")


def test_venv(work: Path, version: str) -> Path:
    """A virtual environment with the project's psycopg version and the tests' needs."""
    venv = work / "venv"
    python = venv / "bin" / "python"
    stamp = venv / f".installed-{version}"
    if not stamp.exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q",
                        f"psycopg[binary,pool]=={version}", *TEST_DEPS], check=True)
        stamp.touch()
    return python


# ---------------------------------------------------------------- runs and comparison

@dataclass
class Outcome:
    state: str  # passed, failed, error, skipped
    message: str


def run_suite(python: Path, suite: Path, dsn: str, name: str, work: Path, timeout: int,
              select: str | None) -> tuple[dict[str, Outcome], float]:
    report = work / f"{name}.xml"
    # (psycopg's conftest needs pytest's cache: it keeps it in the work directory.)
    cmd = [str(python), "-m", "pytest", "tests", "-q", "-o", f"cache_dir={work / 'cache'}",
           "-p", "no:randomly", f"--timeout={timeout}", "--junitxml", str(report),
           "-o", "junit_logging=no", "--test-dsn", dsn]
    if select:
        cmd += ["-k", select]
    log(f"{name}: {' '.join(cmd[:4])} ... (log in {work / (name + '.log')})")
    t0 = time.monotonic()
    with open(work / f"{name}.log", "w") as out:
        subprocess.run(cmd, cwd=suite, stdout=out, stderr=subprocess.STDOUT,
                       env=dict(os.environ, PSYCOPG_TEST_DSN=dsn))
    return parse_junit(report), time.monotonic() - t0


def parse_junit(report: Path) -> dict[str, Outcome]:
    results: dict[str, Outcome] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        state, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                state = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "") + "\n" + (child.text or "")
                break
        if state == "error" and results.get(test, Outcome("", "")).state == "failed":
            continue  # a teardown error after a failure: the failure says more
        results[test] = Outcome(state, message)
    return results


_KEYTURN = re.compile(r"keyturn: ([^\n]*)")


def reason_of(message: str) -> str:
    """A short, groupable reason for a failure: the gateway's own message when there is
    one (values and names blanked), else the exception's first line."""
    m = _KEYTURN.search(message)
    if m is not None:
        text = m.group(1)
        text = re.sub(r"'[^']*'", "'…'", text)
        text = re.sub(r"\"[^\"]*\"", '"…"', text)
        return "keyturn: " + re.sub(r"\d+", "N", text)[:160]
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return re.sub(r"\d+", "N", first)[:160]


def compare(direct: dict[str, Outcome], gateway: dict[str, Outcome]) -> str:
    lines = []
    for name, res in (("direct", direct), ("gateway", gateway)):
        c = Counter(o.state for o in res.values())
        lines.append(f"{name:8} {len(res):5} tests: {c['passed']:5} passed, "
                     f"{c['failed'] + c['error']:4} failed, {c['skipped']:4} skipped")
    bad = ("failed", "error")
    only = sorted(t for t, o in gateway.items()
                  if o.state in bad and direct.get(t, Outcome("passed", "")).state not in bad)
    fixed = sorted(t for t, o in direct.items()
                   if o.state in bad and gateway.get(t, Outcome("passed", "")).state == "passed")
    lines.append(f"fail only through the gateway: {len(only)}; fail only directly: "
                 f"{len(fixed)}")
    groups: dict[str, list[str]] = defaultdict(list)
    for test in only:
        groups[reason_of(gateway[test].message)].append(test)
    for reason, tests in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"\n{len(tests):4}  {reason}")
        lines += [f"        {t}" for t in tests]
    if fixed:
        lines.append("\nfail only directly:")
        lines += [f"        {t}" for t in fixed]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=os.environ.get("PSYCOPG_SOURCE"),
                    help="psycopg source tree, git repository or tarball (default: PyPI sdist,"
                         " then Debian source package)")
    ap.add_argument("--work", default=os.environ.get("KEYTURN_COMPAT_DIR",
                                                     "/tmp/keyturn-compat"))
    ap.add_argument("--timeout", type=int, default=60, help="seconds per test (default 60)")
    ap.add_argument("-k", dest="select", help="only tests matching this pytest -k expression")
    ap.add_argument("--only", choices=("direct", "gateway"), help="run one side only")
    args = ap.parse_args()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    version = metadata.version("psycopg")
    python = test_venv(work, version)
    suite, origin = fetch_tests(version, args.source, work, python)
    log(f"psycopg {version}; tests from {origin}")

    results: dict[str, dict[str, Outcome]] = {}
    with Workspace("compat") as ws:
        # The same server, database and role for both runs; the gateway logs in as that
        # role (postgres, a superuser, so that privileges fail no test on either side).
        pg = ws.postgres("pg")
        pg.create_database("compat")
        server = subprocess.run(["psql", pg.dsn("compat"), "-Atc", "SHOW server_version"],
                                capture_output=True, text=True).stdout.strip()
        kt = KeyturnProcess(ws, pg, "compat", POLICY_ALLOW_ALL, portal=False)
        kt.create_tokens("alice")
        kt.start("gateway")
        dsns = {"direct": pg.dsn("compat"), "gateway": kt.dsn("alice", "compat")}
        for name, dsn in dsns.items():
            if args.only and name != args.only:
                continue
            results[name], seconds = run_suite(python, suite, dsn, name, work, args.timeout,
                                               args.select)
            log(f"{name}: {len(results[name])} tests in {seconds:.0f} s")
        kt.report_log()
    print(f"psycopg {version}, tests from {origin}, PostgreSQL {server}; "
          f"per-test timeout {args.timeout} s\n")
    if len(results) == 2:
        print(compare(results["direct"], results["gateway"]))
    else:
        for name, res in results.items():
            print(name, Counter(o.state for o in res.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
