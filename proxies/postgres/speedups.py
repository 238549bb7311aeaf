"""The gateway's compiled hot loops (``_speedups.c``), when they are available.

``compiled`` is the extension module, or None when it was not built or
``KEYTURN_NO_SPEEDUPS=1`` is set; everything then runs in Python (slower, same
behaviour). What it holds:

- ``RowMasker``: masks runs of DataRows (Python twin: ``rowmask.PyRowMasker``);
- ``FastPath``: the relay's common case per network chunk (allowed simple Queries,
  Bind/Execute/Sync of allowed prepared reads, and Parse of the unnamed statement with a
  text the session allowed as a read before, as drivers send parameterised queries; with
  their audit lines); the session falls back to Python for everything else
  (``ClientSession._take_fast``);
- ``fast_shape``: the twin of ``keyturn.analysis.postgres.fast_shape``;
- ``AuditBuffer``: the audit spool's pending lines (twin: ``keyturn.auditspool.LineBuffer``);
- ``Relay``: the protocol object of each side of a ready session (see session.py);
- ``WriteAhead``: group commit of the write-ahead audit (one spool write per event-loop
  turn for every fast-path chunk of the turn; see PostgresGateway.write_ahead);
- ``AUDIT_LAYOUT_KEYS``: how many key pieces ``FastPath`` takes for its audit lines (the
  session passes them, built by ``keyturn.auditschema``).

This module must not hand out an extension built from older source: one that lacks a
name in ``NAMES`` is not used.
"""

from __future__ import annotations

import os
from typing import Any

# What this source tree expects of the extension; a module built from older source
# (the C file changed, the project was not reinstalled) lacks some and is not used.
NAMES = ("RowMasker", "FastPath", "fast_shape", "AuditBuffer", "Relay", "WriteAhead",
         "AUDIT_LAYOUT_KEYS")
_stale: list[str] = []


def _load() -> Any:
    if os.environ.get("KEYTURN_NO_SPEEDUPS"):
        return None
    try:
        from proxies.postgres import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None
    _stale.extend(n for n in NAMES if not hasattr(_speedups, n))
    return None if _stale else _speedups


compiled = _load()


def state() -> str:
    """For the gateway's start-up log line."""
    if compiled is not None:
        return "on"
    if os.environ.get("KEYTURN_NO_SPEEDUPS"):
        return "off (KEYTURN_NO_SPEEDUPS is set)"
    if _stale:
        return (f"off (the built extension is older than proxies/postgres/_speedups.c, it "
                f"lacks {', '.join(_stale)}; reinstall: make deps)")
    return "off (proxies/postgres/_speedups.c is not built; reinstall with a C compiler)"
