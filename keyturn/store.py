"""The store: a SQLAlchemy engine plus schema upgrades through Alembic.

SQLite (with a rollback journal, see ``_sqlite_pragmas``) is the embedded
default; PostgreSQL is supported for multi-host deployments and gives the bus
LISTEN/NOTIFY. This module must not know about tickets or audit semantics; it
only opens and migrates the database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def normalize_url(url: str) -> str:
    # Plain postgresql:// would pick psycopg2, which we do not ship.
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class Store:
    """Engine + session factory for one store URL."""

    def __init__(self, url: str):
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        # JSON columns (audit detail, ticket params) serialised with orjson: the audit
        # ingester writes one per record.
        kwargs: dict = {"future": True, "json_serializer": _json_dumps}
        if self.is_sqlite:
            path = self.url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        """A session for reading (with SQLite a deferred transaction, which WAL
        lets run alongside a writer)."""
        return self.sessions()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in a write transaction, committed on exit.

        With SQLite the write lock is taken at BEGIN (``BEGIN IMMEDIATE``) so
        read-then-write sections (votes, the audit chain) serialise instead of
        failing on a stale snapshot; with PostgreSQL the callers lock rows.
        """
        with self.sessions() as s, s.begin():
            s.connection(execution_options={"keyturn_write": True})
            yield s

    def upgrade(self, revision: str = "heads") -> None:
        """Bring the schema to the newest revision (``keyturn db upgrade``), or to
        ``revision``."""
        self._migrate("upgrade", revision)

    def downgrade(self, revision: str) -> None:
        """Take the schema back to ``revision`` (its data moved back where it can)."""
        self._migrate("downgrade", revision)

    def _migrate(self, direction: str, revision: str) -> None:
        from alembic import command
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            getattr(command, direction)(cfg, revision)

    def dispose(self) -> None:
        self.engine.dispose()


def _json_dumps(value: object) -> str:
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
    # pysqlite issues no BEGIN of its own (isolation_level None); we do.
    if conn.get_execution_options().get("keyturn_write"):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    # Python's sqlite3 opens its own transactions; we issue BEGIN ourselves.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # A rollback journal, not WAL: WAL's shared-memory index (-shm) is memory-mapped, and
    # a store that becomes unwritable under it kills the whole process with SIGBUS. With a
    # rollback journal a failed write is an ordinary error (sessions keep running).
    cur.execute("PRAGMA journal_mode=TRUNCATE")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
