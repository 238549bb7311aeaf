"""Values written in keyturn.yaml as people write them: durations (``90s``, ``10m``,
``1h``) and column names as PostgreSQL folds them.

Pure functions, shared by the validators and by the surfaces that read the same forms
from people (``keyturn token create --ttl 7d``, the portal's search filters). They must
not raise ConfigError (callers say where the value came from) or know any section.
"""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"90s"``, ``"10m"``, ``"1h"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 10m, 1h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def fold_identifiers(pattern: str) -> str:
    """``schema.table.column`` as PostgreSQL names it: unquoted parts folded to lower case,
    quoted parts kept as written without their quotes (``public."Staff".SSN`` ->
    ``public.Staff.ssn``)."""
    parts, buf, quoted = [], "", False
    for ch in pattern:
        if ch == '"':
            quoted = not quoted
            buf += ch
        elif ch == "." and not quoted:
            parts.append(buf)
            buf = ""
        else:
            buf += ch
    parts.append(buf)
    return ".".join(p[1:-1].replace('""', '"') if len(p) > 1 and p[0] == p[-1] == '"'
                    else p.lower() for p in parts)
