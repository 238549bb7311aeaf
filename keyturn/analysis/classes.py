"""PostgreSQL's class vocabulary: how risky a statement is, and how rules name tables and
functions (keyturn.request.Vocabulary, registered when this module is imported).

Kept apart from the analyser (no parser import) so config validation and policy matching
can know the classes without loading it. It must not import protocol or web code.
"""

from __future__ import annotations

import enum

from keyturn.request import Vocabulary, register


class StatementClass(enum.StrEnum):
    """How risky a statement is; members are listed from least to most risky.

    A ``str`` enum (``StatementClass.READ == "read"``), so it serialises as its value.
    """

    TRANSACTION = "transaction"
    SESSION = "session"
    READ = "read"
    # Row locks (SELECT ... FOR UPDATE/SHARE), table locks and advisory locks: they read or
    # change nothing, but block other sessions' work.
    LOCK = "lock"
    WRITE = "write"
    # Turns off a safety setting (timeouts, session_replication_role, row_security...).
    SAFETY = "safety"
    DDL = "ddl"
    PRIVILEGE = "privilege"
    PROCEDURAL = "procedural"
    ADMIN = "admin"
    FILE = "file"
    UNKNOWN = "unknown"

    @property
    def risk(self) -> int:
        return _RISK[self]


_RISK: dict[StatementClass, int] = {cls: i for i, cls in enumerate(StatementClass)}

#: Classes that need write access on the target; the others run read-only there (the
#: PostgreSQL gateway's read-only guard) or are transaction control.
WRITE_CLASSES = frozenset({"lock", "write", "ddl", "privilege", "procedural", "admin", "file"})


def server_name(name: str) -> str:
    """An identifier as the server keeps it: cut at 63 bytes."""
    raw = name.encode("utf-8")
    return name if len(raw) <= 63 else raw[:63].decode("utf-8", "ignore")


def rule_glob(kind: str, glob: str) -> str:
    """A rule's table or function glob as the analyser reports names: lowercased (a table
    glob with a double quote is kept as written), in ``public`` when unqualified, each
    part cut like the server cuts identifiers."""
    if kind == "functions" or '"' not in glob:
        glob = glob.lower()
    glob = glob if "." in glob else f"public.{glob}"
    return ".".join(server_name(part) for part in glob.split("."))


POSTGRES = register(Vocabulary(
    protocol="postgres", classes=tuple(c.value for c in StatementClass),
    write_classes=WRITE_CLASSES, resources=("tables", "functions"), normalize=rule_glob,
    code_kind="functions"))
