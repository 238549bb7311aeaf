"""The PostgreSQL gateway process: listener, cancel keys, shared helpers.

One ``PostgresGateway`` serves every postgres connection in the config on
one listener; the client's ``dbname`` picks the connection. Each client gets
a ``ClientSession`` (session.py). This module holds what sessions share: the
TLS context, the analysers, the decision watcher (bus), the audit queue and
the map from the cancel keys we issue to live sessions.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from typing import TYPE_CHECKING, Any

from keyturn.analysis import Analyzer, StatementClass
from keyturn.auditspool import AuditSpool
from keyturn.bus import DecisionWatcher
from keyturn.config import Connection
from keyturn.masking.engine import MaskCatalog, derived_columns
from keyturn.policy import PolicyEngine
from keyturn.services import Services
from proxies.postgres import codec, speedups

if TYPE_CHECKING:
    from proxies.postgres.session import ClientSession

log = logging.getLogger(__name__)


class PostgresGateway:
    def __init__(self, services: Services, audit: AuditSpool):
        self.services = services
        self.config = services.config
        self.audit_spool = audit
        self.watcher = DecisionWatcher(services.approvals, services.store)
        self.sessions: dict[tuple[int, int], ClientSession] = {}
        self.tls: ssl.SSLContext | None = None
        gw = self.config.gateway
        if gw.tls_cert_file and gw.tls_key_file:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(gw.tls_cert_file, gw.tls_key_file)
            self.tls = ctx
        self._analyzers: dict[str, Analyzer] = {}
        self._origins: dict[str, MaskCatalog] = {}
        self.mask_key = _mask_key(self.config)
        self.policy = PolicyEngine(self.config)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle

    async def start(self) -> None:
        from proxies.postgres.session import ClientSession

        self.loop = asyncio.get_running_loop()
        loop = self.loop
        # Decisions taken in this process (expiry, cancel) release holds directly.
        def on_change(ticket_id: int, status: str) -> None:
            loop.call_soon_threadsafe(self.watcher.resolve, ticket_id, status)

        self.services.approvals.on_change = on_change
        self.watcher.start()
        listen = self.config.gateway.postgres
        assert listen is not None
        self._server = await loop.create_server(lambda: ClientSession(self), listen.host,
                                                listen.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("postgres gateway on %s:%d (%d connections, TLS %s, compiled fast path %s)",
                 listen.host, self.port,
                 sum(1 for c in self.config.connections.values() if c.type == "postgres"),
                 "on" if self.tls else "off", speedups.state())

    async def stop(self) -> None:
        if self._server:
            self._server.close()
        for session in list(self.sessions.values()):
            await session.shutdown("the gateway is shutting down")
        if self._server:
            await self._server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.watcher.stop()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Start a task and keep a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway task failed", exc_info=task.exception())

    # ---- shared helpers

    def analyzer(self, conn: Connection) -> Analyzer:
        a = self._analyzers.get(conn.unknown_function_class)
        if a is None:
            a = Analyzer(unknown_function_class=StatementClass(conn.unknown_function_class))
            self._analyzers[conn.unknown_function_class] = a
        return a

    def column_origins(self, conn: Connection) -> MaskCatalog:
        """(table oid, column number) -> ``schema.table.column`` for every user column of
        the connection's database, which RowDescription names as each field's origin.
        Cached per connection; ``forget_origins`` drops it after DDL (runs in a thread)."""
        cached = self._origins.get(conn.name)
        if cached is not None:
            return cached
        import psycopg

        t = conn.target
        password = t.password.resolve() if t.password else None
        with psycopg.connect(host=t.host, port=t.port, dbname=t.dbname, user=t.user,
                             password=password, connect_timeout=5,
                             sslmode="require" if t.sslmode != "disable" else "disable",
                             application_name="keyturn-catalog", autocommit=True) as c:
            rows = c.execute(
                "SELECT c.oid, a.attnum, n.nspname, c.relname, a.attname "
                "FROM pg_catalog.pg_attribute a "
                "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE a.attnum > 0 AND NOT a.attisdropped "
                "AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
                "AND n.nspname NOT IN ('pg_catalog', 'information_schema')").fetchall()
            # Columns that carry other columns' values: a view's columns (from its stored
            # definition) and an inheritance child's or partition's (its parent's).
            views = c.execute(
                "SELECT n.nspname || '.' || c.relname, pg_catalog.pg_get_viewdef(c.oid) "
                "FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('v', 'm') "
                "AND n.nspname NOT IN ('pg_catalog', 'information_schema')").fetchall()
            parents = c.execute(
                "SELECT cn.nspname || '.' || cc.relname, pn.nspname || '.' || pc.relname "
                "FROM pg_catalog.pg_inherits i "
                "JOIN pg_catalog.pg_class cc ON cc.oid = i.inhrelid "
                "JOIN pg_catalog.pg_namespace cn ON cn.oid = cc.relnamespace "
                "JOIN pg_catalog.pg_class pc ON pc.oid = i.inhparent "
                "JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace").fetchall()
        origins = {(int(oid), int(num)): f"{ns}.{rel}.{col}" for oid, num, ns, rel, col in rows}
        columns: dict[str, list[str]] = {}
        for (_oid, _num), full in sorted(origins.items()):
            table, _, col = full.rpartition(".")
            columns.setdefault(table, []).append(col)
        derived = derived_columns(views, parents, columns)
        catalog = MaskCatalog(origins, derived, columns)
        self._origins[conn.name] = catalog
        return catalog

    def forget_origins(self, conn: Connection) -> None:
        self._origins.pop(conn.name, None)

    def audit(self, **rec: Any) -> None:
        self.audit_spool.record(**rec)

    def new_key(self, session: ClientSession) -> tuple[int, int]:
        while True:
            key = (secrets.randbits(31) or 1, secrets.randbits(32))
            if key not in self.sessions:
                self.sessions[key] = session
                return key

    def drop_key(self, key: tuple[int, int] | None) -> None:
        if key is not None:
            self.sessions.pop(key, None)

    def cancel(self, pid: int, secret: int) -> None:
        session = self.sessions.get((pid, secret))
        if session is None:
            log.info("CancelRequest with an unknown key ignored")
            return
        self.spawn(session.on_cancel_request())

    async def send_target_cancel(self, conn: Connection, pid: int, secret: int) -> None:
        try:
            _, writer = await asyncio.open_connection(conn.target.host, conn.target.port)
            writer.write(codec.encode_cancel_request(pid, secret))
            await writer.drain()
            writer.close()
        except OSError:
            log.exception("could not forward a cancel request to %s", conn.name)

    def explain_rows(self, conn: Connection, sql: str, params: list[Any] | None) -> int | None:
        """The planner's row estimate for a DML statement (runs in a thread).

        Uses its own short connection so the held session's transaction state is
        never touched. Returns None if the target cannot plan it.
        """
        import psycopg

        t = conn.target
        try:
            password = t.password.resolve() if t.password else None
            with psycopg.connect(host=t.host, port=t.port, dbname=t.dbname, user=t.user,
                                 password=password, connect_timeout=3,
                                 sslmode="require" if t.sslmode != "disable" else "disable",
                                 options="-c statement_timeout=2000",
                                 application_name="keyturn-explain", autocommit=True) as c:
                with c.cursor() as cur:
                    if params:
                        cur.execute("PREPARE keyturn_explain AS " + sql)
                        lits = ", ".join(_literal(p) for p in params)
                        cur.execute(f"EXPLAIN (FORMAT JSON) EXECUTE keyturn_explain({lits})")
                    else:
                        cur.execute("EXPLAIN (FORMAT JSON) " + sql)
                    row = cur.fetchone()
        except Exception:
            log.info("no EXPLAIN estimate for a held statement on %s", conn.name, exc_info=True)
            return None
        if not row:
            return None
        plan = row[0][0]["Plan"]
        # ModifyTable reports 0 rows itself; the rows it will touch come from its input.
        while plan.get("Node Type") == "ModifyTable" and plan.get("Plans"):
            plan = plan["Plans"][0]
        return int(plan.get("Plan Rows", 0))


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    return "'" + str(value).replace("'", "''") + "'"


def _mask_key(config: Any) -> bytes:
    """The HMAC key of the ``hash`` masking style: configured (stable across restarts
    and gateways) or, failing that, random for this process."""
    ref = config.gateway.mask_key
    if ref is not None:
        return ref.resolve().encode()
    return secrets.token_bytes(32)
