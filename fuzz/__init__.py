"""Coverage-guided fuzz targets for the gateway's compiled code (proxies/postgres/_speedups.c).

Each target feeds the same fuzzer-made input to a compiled entry point and to its
pure-Python twin and fails on any difference, and on any AddressSanitizer or UBSan
report from the C. ``make fuzz`` builds the sanitized extension (fuzz/build.sh) and runs
every target for a bounded time (fuzz/run.py); docs/design-choices.md, "Fuzzing the
compiled code", says why it is done this way.

Nothing here is part of the gateway: this package must not be imported by keyturn,
proxies, portal or bots, and it must not load the extension built into the source tree.
"""
