"""The gateway's compiled hot loops (``_speedups.c``), when they are available.

``compiled`` is the extension module, or None when it was not built or
``KEYTURN_NO_SPEEDUPS=1`` is set; everything then runs in Python (slower, same
behaviour). What it holds:

- ``RowMasker``: masks runs of DataRows (Python twin: ``rowmask.PyRowMasker``);
- ``FastPath``: the relay's common case per network chunk (allowed simple Queries and
  Bind/Execute/Sync of allowed prepared reads, with their audit lines); the session falls
  back to Python for everything else (``ClientSession._take_fast``);
- ``fast_shape``: the twin of ``keyturn.analysis.postgres.fast_shape``.
"""

from __future__ import annotations

import os
from typing import Any


def _load() -> Any:
    if os.environ.get("KEYTURN_NO_SPEEDUPS"):
        return None
    try:
        from proxies.postgres import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _speedups


compiled = _load()


def state() -> str:
    """For the gateway's start-up log line."""
    if compiled is not None:
        return "on"
    if os.environ.get("KEYTURN_NO_SPEEDUPS"):
        return "off (KEYTURN_NO_SPEEDUPS is set)"
    return "off (proxies/postgres/_speedups.c is not built; reinstall with a C compiler)"
