"""Masking throughput: a SELECT of 100,000 rows (3 masked columns, 3 plain ones)
fetched with psycopg, directly and through Keyturn without masking, with masking,
and with masking plus the content detectors, in one run.

    .venv/bin/python bench/masking_bench.py [--rows 100000] [--repeat 5]

Prints rows/s per path (best of --repeat) and masked / unmasked ratios. The issue's
target: masked throughput at least 0.5x Keyturn's unmasked throughput.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg  # noqa: E402
from _common import (  # noqa: E402
    POLICY_READS_ONLY,
    KeyturnProcess,
    Workspace,
    machine_line,
    print_table,
    progress,
)

MASKED_READS = """\
policies:
  bench:
    default: block
    rules:
      - name: masked-reads
        match: {class: [read, transaction, session]}
        action: mask
        mask: {tags: ["pii.*"], style: full, styles: {pii.email: email, pii.card: "partial:4"}}
"""
COLUMNS = """\
columns:
  public.people.email: [pii.email]
  public.people.ssn: [pii.ssn]
  public.people.card: [pii.card]
"""
QUERY = "SELECT id, email, ssn, card, city, amount FROM people"


def fetch_all(dsn: str) -> tuple[float, int, list]:
    with psycopg.connect(dsn, autocommit=True) as c:
        t0 = time.perf_counter()
        rows = c.execute(QUERY).fetchall()
        return time.perf_counter() - t0, len(rows), rows[:1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    print(f"machine: {machine_line()}")
    with Workspace("masking", keep=args.keep) as ws:
        progress("starting PostgreSQL")
        pg = ws.postgres("pg")
        pg.create_database("bench")
        pg.execute(
            "CREATE TABLE people (id int PRIMARY KEY, email text, ssn text, card text, "
            "city text, amount numeric); "
            f"INSERT INTO people SELECT g, 'user' || g || '@example.com', "
            "'219-09-' || lpad((g % 10000)::text, 4, '0'), "
            "'4111 1111 1111 ' || lpad((g % 10000)::text, 4, '0'), 'City ' || (g % 97), "
            f"g * 1.5 FROM generate_series(1, {args.rows}) g", dbname="bench")
        paths: list[tuple[str, str]] = [("direct", pg.dsn("bench"))]
        for name, policy, extra in (
                ("keyturn, no masking rule", POLICY_READS_ONLY, ""),
                ("keyturn, masking", MASKED_READS, COLUMNS + "detectors: []\n"),
                ("keyturn, masking + detectors", MASKED_READS, COLUMNS)):
            progress(f"starting keyturn gateway: {name}")
            kt = KeyturnProcess(ws, pg, "bench", policy, portal=False,
                                name=name.replace(" ", "").replace(",", "-").replace("+", ""),
                                connection_extra=extra)
            kt.create_tokens("alice")
            kt.start("gateway")
            paths.append((name, kt.dsn("alice", "bench")))
        results = {}
        for name, dsn in paths:
            best = None
            for _ in range(args.repeat):
                secs, n, sample = fetch_all(dsn)
                assert n == args.rows, (name, n)
                best = secs if best is None else min(best, secs)
            results[name] = best
            progress(f"{name}: best {best:.3f} s, first row {sample[0]}")
        base = results["keyturn, no masking rule"]
        rows = []
        for name, _ in paths:
            secs = results[name]
            rows.append([name, f"{secs:.3f}", f"{args.rows / secs:,.0f}",
                         f"{base / secs:.2f}" if name != "direct" else "-"])
        print()
        print(f"{QUERY} -- {args.rows:,} rows, 3 masked + 3 plain columns, psycopg (text), "
              f"best of {args.repeat}")
        print_table(["path", "seconds", "rows/s", "x keyturn unmasked"], rows)
        ok = results["keyturn, masking"] and base / results["keyturn, masking"] >= 0.5
        print(f"target masked >= 0.5x unmasked: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
