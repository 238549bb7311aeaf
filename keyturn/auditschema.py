"""The audit event schema: the one definition of what an audit record holds.

Every audit record, whatever the protocol or surface that wrote it, has the
same common fields (``FIELDS``) and one protocol-specific object, ``detail``.
The schema is versioned. Each version has the ordered list of fields its hash
covers (``HASHED``); a record carries its version in ``v`` and its hash covers
exactly that version's fields, so adding a field (a new version) leaves every
record written before verifiable. Records written before versions existed
have no ``v`` (the store's column default says 1): they are version 1.

Spool lines (``keyturn.auditspool``) use the same names, plus ``n``, which
pairs a write-ahead intent with its outcome and is not stored. A line's ``v``
names the layout it was written in; a line without one is version 1. The
compiled PostgreSQL fast path writes its lines from the pieces built here
(``line_prefix``, ``fragment``, ``key``), so no field name is spelled in C.

This module must not change a released version's field list (add a version
instead: a version only adds fields), and must not import the store, protocol
or web code: everything that writes or verifies records imports it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class Field:
    """One field of an audit record: its name (also the store's column and the export's
    key), the JSON types it may hold, and what it means."""

    name: str
    types: tuple[type, ...]
    meaning: str


_NUMBER = (int, float)
_TEXT = (str, type(None))

# In the order exports and the docs list them: a version's new fields go at the end, so
# the columns of a CSV export keep their places.
COMMON: tuple[Field, ...] = (
    Field("seq", (int,), "the record's place in the chain, dense from 1 (set by the chain)"),
    Field("at", _NUMBER, "when, in seconds since the epoch"),
    Field("kind", (str,), "what happened: statement, connect, disconnect, auth_failed, held, "
          "ticket, vote, export, login, token, unreadable, audit-dropped, ..."),
    Field("user", _TEXT, "the person (or script) it is tied to"),
    Field("connection", _TEXT, "the connection name"),
    Field("session_id", _TEXT, "the client session"),
    Field("client_addr", _TEXT, "the client's address"),
    Field("statement", _TEXT, "the action's text: an SQL statement, a command line, a "
          "request line"),
    Field("classification", _TEXT, "the action's class, in its protocol's vocabulary"),
    Field("action", _TEXT, "the decision (allow, block, review, mask) or the workflow step"),
    Field("rule", _TEXT, "the policy rule that decided"),
    Field("reason", _TEXT, "why: the decision's reason, a rejection's comment, an error"),
    Field("ticket_id", (int, type(None)), "the approval ticket, when one was involved"),
    Field("outcome", _TEXT, "how it ended: ok, error, blocked, refused, approved, unknown, ..."),
    Field("duration_ms", (*_NUMBER, type(None)), "how long the action took"),
    Field("rows", (int, type(None)), "the count of items it affected or returned (rows, "
          "objects)"),
    Field("detail", (dict, type(None)), "the protocol-specific rest (parameters, "
          "SQLSTATE, masked columns, ...)"),
    Field("protocol", _TEXT, "the connection's protocol (postgres, mysql, ssh, http, "
          "kubernetes); none for events of the portal, the bots or the CLI"),
    Field("v", (int,), "the schema version the record was written (and hashed) in"),
)
BY_NAME: dict[str, Field] = {f.name: f for f in COMMON}

# The fields each version's hash covers, in order. Released versions never change.
_V1 = ("seq", "at", "kind", "user", "connection", "session_id", "client_addr", "statement",
       "classification", "action", "rule", "reason", "ticket_id", "outcome", "duration_ms",
       "rows", "detail")
HASHED: dict[int, tuple[str, ...]] = {
    1: _V1,
    # 2: the version and the protocol join the hash.
    2: tuple(f.name for f in COMMON),
}
VERSION = max(HASHED)
"""The version new records are written in."""
FIELDS = HASHED[VERSION]
"""The current version's fields: the store's columns (with prev_hash and hash)."""

# Fields a record of each version does not have: they must stay empty (None) in the
# store, where the column exists for newer records; verification checks that, since the
# hash cannot. ``v`` is not among them: it holds the version itself.
ABSENT: dict[int, tuple[str, ...]] = {
    v: tuple(f for f in FIELDS if f not in names and f != "v") for v, names in HASHED.items()}

SPOOL_ONLY = {"n": (int,)}
"""Keys a spool line may carry that are not stored: ``n`` numbers a write-ahead intent
record and the outcome record that completes it."""

GENESIS = "0" * 64
_CANONICAL = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


class UnknownVersion(ValueError):
    """A record of a schema version this Keyturn does not know (written by a newer one)."""

    def __init__(self, version: Any):
        super().__init__(f"audit schema version {version!r} is unknown to this Keyturn "
                         f"(it knows 1..{VERSION})")
        self.version = version


def version_of(rec: Mapping[str, Any]) -> int:
    """A record's version: its ``v``, or 1 for records written before versions existed."""
    return rec.get("v") or 1


def canonical(rec: Mapping[str, Any], version: int | None = None) -> bytes:
    """The bytes a record's hash covers: its version's fields (absent ones as null) as
    JSON with sorted keys, no spaces, UTF-8 (orjson)."""
    v = version_of(rec) if version is None else version
    try:
        names = HASHED[v]
    except (KeyError, TypeError):
        raise UnknownVersion(v) from None
    return orjson.dumps({k: rec.get(k) for k in names}, default=str, option=_CANONICAL)


def record_hash(prev_hash: str, rec: Mapping[str, Any]) -> str:
    """sha256(prev_hash || canonical(rec)), hex: the hash of a record of any version."""
    return hashlib.sha256(prev_hash.encode() + canonical(rec)).hexdigest()


def upgrade(rec: dict[str, Any]) -> dict[str, Any]:
    """A spool line or record of another version, in the current version's layout.

    Older versions only lack fields (each version only adds), so they pass unchanged.
    A line of a newer version (a newer gateway's spool read after a downgrade) keeps the
    fields this version knows and carries the others in ``detail``, never dropped."""
    v = version_of(rec)
    if isinstance(v, int) and v <= VERSION:
        return rec
    out = {k: val for k, val in rec.items() if k in BY_NAME or k in SPOOL_ONLY}
    extra = {k: val for k, val in rec.items() if k not in out}
    detail = rec.get("detail")
    out["detail"] = {**(detail if isinstance(detail, dict) else {}),
                     "written_in_version": v, "fields_unknown": extra}
    out["v"] = VERSION
    return out


def check_line(rec: Mapping[str, Any]) -> list[str]:
    """What is wrong with one spool line (parsed) against the current version: unknown
    keys, values of the wrong type. Empty when it is a valid line (for tests and tools;
    the ingester does not pay for this)."""
    problems = []
    for k, value in rec.items():
        if k == "seq":
            problems.append("seq is set by the chain, not by writers")
            continue
        types = BY_NAME[k].types if k in BY_NAME else SPOOL_ONLY.get(k)
        if types is None:
            problems.append(f"{k}: not a field of audit schema version {VERSION}")
        elif not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            problems.append(f"{k}: {type(value).__name__} {value!r} is not "
                            f"{' or '.join(t.__name__ for t in types)}")
    if rec.get("v", 1) != VERSION:
        problems.append(f"v: {rec.get('v')!r}, not the current version {VERSION}")
    if "kind" not in rec:
        problems.append("kind: missing")
    return problems


def _checked(name: str) -> str:
    if name not in BY_NAME and name not in SPOOL_ONLY:
        raise KeyError(f"{name!r} is not a field of audit schema version {VERSION}")
    return name


def key(name: str) -> bytes:
    """``"name":``, the JSON key of a field (or spool-only key), checked against the
    schema: for writers that put lines together from pieces (the compiled fast path)."""
    return orjson.dumps(_checked(name)) + b":"


def fragment(**fields: Any) -> bytes:
    """``"a":1,"b":2``: fields as a piece of a JSON object (no braces), names checked."""
    for name in fields:
        _checked(name)
    return orjson.dumps(fields, default=str)[1:-1]


def line_prefix(**fields: Any) -> bytes:
    """The start of a spool line of the current version: ``{"v":N,`` then ``fields`` and a
    comma, so a writer appends the rest of a record's fields and the closing brace."""
    head = b'{"v":%d,' % VERSION
    return head + fragment(**fields) + b"," if fields else head
