"""Cost per value of the masking primitives on the relay hot path.

    .venv/bin/python bench/detectors_bench.py [--repeat 5] [--seed 7]

No servers: this measures the functions the PostgreSQL relay calls per text value.

Content detectors, microseconds per value, for three kinds of values:

- short words: names, cities, statuses, phrases (no character any detector starts at);
- short no-hit values: the same mixed with dates, amounts, ids, hex digests, UUIDs;
- long no-hit text: ~2 KB log lines / notes with numbers, dates, times and "key: value";
- values with hits: emails, cards, SSNs, phones, IBANs, tokens, short and inside text;

each through

- combined: ``DetectorSet.build()``, one pattern: ``scan`` on str, ``redact_bytes`` on the
  UTF-8 bytes (the relay's call), and ``redact_bytes`` with the bytes pre-filter off
  (``prefilter=False``: every value decoded and scanned);
- naive: one regular expression per detector per value (each built-in compiled on its
  own, results merged), the approach the combined pass replaces.

The hit counts of all paths are printed too: they must agree (for the naive loop, as long
as no two detectors claim overlapping text in one value).

Masking styles, microseconds per value: each style's masker on str values and through
``mask_bytes`` on UTF-8 wire values.

Every figure is the best of ``--repeat`` timed runs over the whole corpus (the minimum is
the least disturbed by other work on the machine).
"""

from __future__ import annotations

import argparse
import platform
import random
import string
import time
from collections.abc import Callable, Sequence
from typing import Any

from _common import print_table

from keyturn.masking.detectors import BUILTIN_NAMES, DetectorSet, Hit
from keyturn.masking.styles import Masker, MaskStyle, mask_bytes, masker

FIRST = ["Alice", "Bob", "Chloé", "Dmitri", "Eve", "Fatima", "Gustav", "Hana", "Ines", "Jun"]
LAST = ["Smith", "Okafor", "Müller", "Tanaka", "Rossi", "García", "Nguyen", "Kowalski"]
CITY = ["London", "Paris", "São Paulo", "Osaka", "Lagos", "Berlin", "Austin", "Pune"]
STATUS = ["active", "suspended", "pending_review", "closed", "trial", "churned"]
WORDS = (
    "the order was shipped after review by support and the customer confirmed delivery "
    "of all items in good condition while billing noted a partial refund for one line"
).split()


def short_values(rng: random.Random, n: int) -> list[str]:
    makers: list[Callable[[], str]] = [
        lambda: rng.choice(FIRST),
        lambda: f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        lambda: rng.choice(CITY),
        lambda: rng.choice(STATUS),
        lambda: f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: str(rng.randint(1, 100_000)),
        lambda: f"{rng.randint(1, 9999)}.{rng.randint(0, 99):02d}",
        lambda: "".join(rng.choices(string.hexdigits.lower(), k=32)),
        lambda: (
            f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}-"
            f"a{rng.getrandbits(12):03x}-{rng.getrandbits(48):012x}"
        ),
        lambda: " ".join(rng.choices(WORDS, k=rng.randint(3, 8))),
    ]
    return [rng.choice(makers)() for _ in range(n)]


def long_text(rng: random.Random) -> str:
    parts: list[str] = []
    while sum(len(p) for p in parts) < 2000:
        kind = rng.randrange(4)
        if kind == 0:
            parts.append(" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) + ".")
        elif kind == 1:
            parts.append(
                f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
                f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} "
                f"order {rng.randint(1000, 999_999)} qty {rng.randint(1, 50)}"
            )
        elif kind == 2:
            parts.append(f"status: {rng.choice(STATUS)}; region: {rng.choice(CITY)}")
        else:
            parts.append(f"total {rng.randint(1, 9999)}.{rng.randint(0, 99):02d} EUR")
    return "\n".join(parts)


def _luhn(prefix: str) -> str:
    for check in "0123456789":
        digits = prefix + check
        total = sum(
            (d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 else d
            for i, d in enumerate(int(c) for c in reversed(digits))
        )
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


def hit_values(rng: random.Random, n: int) -> list[str]:
    def card() -> str:
        digits = _luhn("4" + "".join(rng.choices(string.digits, k=14)))
        return " ".join(digits[i : i + 4] for i in range(0, 16, 4))

    makers: list[Callable[[], str]] = [
        lambda: f"{rng.choice(FIRST).lower()}.{rng.choice(LAST).lower()}@example.com",
        card,
        lambda: f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
        lambda: f"+1 415 555 {rng.randint(1000, 9999)}",
        lambda: "DE89370400440532013000",
        lambda: "AKIA" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=16)),
        lambda: (
            f"customer {rng.choice(FIRST)} wrote from {rng.choice(FIRST).lower()}@example.org "
            f"about card {card()} and asked for a callback"
        ),
    ]
    return [rng.choice(makers)() for _ in range(n)]


def best_us_per_value(
    fn: Callable[[Any], object], values: Sequence[Any], repeat: int
) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for v in values:
            fn(v)
        best = min(best, time.perf_counter() - t0)
    return best / len(values) * 1e6


def naive_scanner() -> Callable[[str], list[Hit]]:
    """One regex per detector per value: what the combined pass replaces."""
    sets = [DetectorSet.build(enabled=[name], prefilter=False) for name in BUILTIN_NAMES]

    def scan(text: str) -> list[Hit]:
        hits = [h for ds in sets for h in ds.scan(text)]
        hits.sort(key=lambda h: h.start)
        return hits

    return scan


def bench_detectors(rng: random.Random, repeat: int) -> None:
    combined = DetectorSet.build()
    no_prefilter = DetectorSet.build(prefilter=False)
    naive = naive_scanner()
    plain = [v for v in short_values(rng, 20000) if not any(c in v for c in "0123456789-:_@")]
    corpora = {
        "short words (no digit, @, -, :)": plain[:5000],
        "short, no hit": short_values(rng, 5000),
        "long (~2 KB), no hit": [long_text(rng) for _ in range(100)],
        "with hits": hit_values(rng, 2000),
    }
    rows = []
    for label, values in corpora.items():
        as_bytes = [v.encode() for v in values]
        counts = [
            sum(len(combined.scan(v)) for v in values),
            sum(sum(combined.redact_bytes(v)[1].values()) for v in as_bytes),
            sum(sum(no_prefilter.redact_bytes(v)[1].values()) for v in as_bytes),
            sum(len(naive(v)) for v in values),
        ]
        rows.append(
            [
                label,
                len(values),
                f"{sum(map(len, values)) / len(values):.0f}",
                f"{best_us_per_value(combined.scan, values, repeat):.2f}",
                f"{best_us_per_value(combined.redact_bytes, as_bytes, repeat):.2f}",
                f"{best_us_per_value(no_prefilter.redact_bytes, as_bytes, repeat):.2f}",
                f"{best_us_per_value(naive, values, repeat):.2f}",
                " / ".join(map(str, counts)),
            ]
        )
    print("\nContent detectors, µs per value (all built-ins)\n")
    print_table(
        [
            "values",
            "n",
            "avg chars",
            "combined scan",
            "combined redact_bytes",
            "redact_bytes, no pre-filter",
            "naive: 1 regex/detector",
            "hits (scan / bytes / bytes no-pf / naive)",
        ],
        rows,
    )


def bench_styles(rng: random.Random, repeat: int) -> None:
    values = short_values(rng, 5000) + hit_values(rng, 1000)
    as_bytes = [v.encode() for v in values]
    rows = []
    for spec in ("full", "partial:4", "email", "null", "hash"):
        fn = masker(MaskStyle.parse(spec), b"benchmark-key-0123456789")

        def on_wire(b: bytes, fn: Masker = fn) -> bytes | None:
            return mask_bytes(fn, b)

        rows.append(
            [
                spec,
                f"{best_us_per_value(fn, values, repeat):.3f}",
                f"{best_us_per_value(on_wire, as_bytes, repeat):.3f}",
            ]
        )
    print(f"\nMasking styles, µs per value ({len(values)} values, avg "
          f"{sum(map(len, values)) / len(values):.0f} chars)\n")
    print_table(["style", "masker(str)", "mask_bytes(UTF-8)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs; the best counts")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(f"Python {platform.python_version()} on {platform.machine()}, "
          f"best of {args.repeat} runs")
    bench_detectors(random.Random(args.seed), args.repeat)
    bench_styles(random.Random(args.seed + 1), args.repeat)


if __name__ == "__main__":
    main()
