"""The audit ingester's CPU cost per record, without a gateway or a target.

Writes a spool file of statement records as the gateway's fast path writes them
(a write-ahead intent line and an outcome line per statement, in the layout of
``keyturn.auditschema``), ingests it into a fresh SQLite store (or, with ``--store
postgres``, a fresh database of a throwaway PostgreSQL cluster) and prints the
ingester's CPU time per stored record (best of ``--runs``). The ingester reads
both lines of a statement and stores one record, so this is the figure
docs/benchmarks.md reports as "µs of CPU per record".

This script must not be run as a test (it prints figures, asserts only that
everything was stored and verifies).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import orjson

from keyturn import auditschema
from keyturn.audit import AuditLog
from keyturn.auditspool import AuditIngester
from keyturn.launch.localpg import LocalPostgres
from keyturn.store import Store


def spool_lines(n: int) -> bytes:
    """``n`` statements: intent then outcome, numbered as the compiled path numbers them."""
    who = dict(user="alice", connection="bench", protocol="postgres",
               session_id="2f9c41d07e5a4b1f", client_addr="127.0.0.1")
    intent = auditschema.line_prefix(kind="intent", **who)
    done = auditschema.line_prefix(kind="statement", **who)
    decision = auditschema.fragment(classification="read", action="allow", rule="reads",
                                    reason="reads are allowed")
    out = []
    t = time.time()
    for i in range(n):
        sql = orjson.dumps(f"SELECT abalance FROM pgbench_accounts WHERE aid = {i * 7919 % 100000}")
        n_ = 2 * i + 1
        out.append(intent + b'"at":%.6f,"statement":%s,%s,"n":%d}\n' % (t, sql, decision, n_))
        out.append(done + b'"at":%.6f,"statement":%s,%s,"outcome":"ok","duration_ms":%.3f,'
                   b'"rows":1,"n":%d}\n' % (t + 0.0002, sql, decision, 0.113, n_))
        t += 0.0003
    return b"".join(out)


def run(n: int, base: Path, url: str | None = None) -> float:
    """CPU seconds the ingester spent storing ``n`` statements (``url``: the store, else
    SQLite under ``base``)."""
    store = Store(url or f"sqlite:///{base / 'k.db'}")
    store.upgrade()
    audit = AuditLog(store)
    spool = base / "spool"
    spool.mkdir()
    (spool / "gw-1700000000000000-1.jsonl").write_bytes(spool_lines(n))
    ing = AuditIngester(audit, spool)
    t0 = time.process_time()
    stored = ing.run_once()
    cpu = time.process_time() - t0
    assert stored == n, stored
    result = audit.verify()
    assert result.ok and result.count == n, result
    store.dispose()
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="statements (default 100,000)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    args = ap.parse_args()
    best = float("inf")
    cluster = None
    if args.store == "postgres":
        cluster = LocalPostgres(Path(tempfile.mkdtemp(prefix="kt-ingest-pg-")))
        cluster.start()
    try:
        for i in range(args.runs):
            base = Path(tempfile.mkdtemp(prefix="kt-ingest-"))
            url = None
            if cluster is not None:
                cluster.create_database(f"ingest{i}")
                url = (f"postgresql://{cluster.superuser}:{cluster.superuser_password}"
                       f"@127.0.0.1:{cluster.port}/ingest{i}")
            try:
                best = min(best, run(args.n, base, url))
            finally:
                shutil.rmtree(base)
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.base_dir, ignore_errors=True)
    print(f"{args.store} store, audit schema version {auditschema.VERSION}: {args.n} statements "
          f"({2 * args.n} spool lines) ingested in {best:.2f} s of CPU: "
          f"{best / args.n * 1e6:.1f} µs per record")


if __name__ == "__main__":
    main()
