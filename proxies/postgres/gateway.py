"""The PostgreSQL gateway process: listener, cancel keys, shared helpers.

One ``PostgresGateway`` serves every postgres connection in the config on
one listener; the client's ``dbname`` picks the connection. Each client gets
a ``ClientSession`` (session.py). This module holds what sessions share: the
TLS context, the analysers, the decision watcher (bus), the audit queue,
the map from the cancel keys we issue to live sessions, and the limits that
keep one client from exhausting the gateway or locking others out (client
counts, login timeout, login throttling, ending the sessions of revoked
tokens; see "Limits and lock-out protection" in docs/postgres-gateway.md).

It must not decide what a statement may do (``keyturn.policy`` does) nor what
an audit record holds (``keyturn.auditschema``): its records only name their
protocol.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import secrets
import signal
import ssl
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from keyturn.analysis import Analyzer, StatementClass
from keyturn.analysis.elsewhere import AnalysisPool, LoopBudget
from keyturn.auditspool import AuditSpool
from keyturn.bus import DecisionWatcher
from keyturn.config import Config, Connection, load_config
from keyturn.errors import ConfigError, StoreUnavailable
from keyturn.holds import HoldService
from keyturn.identity import LoginThrottle
from keyturn.masking.engine import MaskCatalog, derived_columns
from keyturn.policy import PolicyEngine, masks_in
from keyturn.services import Services
from portal.settings import PORTAL
from proxies.postgres import codec, speedups
from proxies.postgres.catalog import Catalogs, connect_target, read_catalog
from proxies.postgres.session import (
    CHEAP_ANALYSIS,
    LOOP_ANALYSIS_BUDGET,
    PROTOCOL,
    SESSION_CHEAP_BUDGET,
)
from proxies.postgres.upstream import LARGE_ROW

if TYPE_CHECKING:
    from proxies.postgres.session import ClientSession
    from proxies.postgres.upstream import Upstream

log = logging.getLogger(__name__)


class PostgresGateway:
    #: The audit spool's line buffer (keyturn.launch.runner): the compiled one lets the
    #: fast path append audit lines in C.
    audit_buffer = speedups.compiled.AuditBuffer if speedups.compiled is not None else None

    def __init__(self, services: Services, audit: AuditSpool, *,
                 catalog_reader: Callable[[Connection], Any] = read_catalog):
        """``catalog_reader``: reads a connection's user code from its target (blocking,
        run in a thread); the transcript harness (tests/pg_playbook.py) gives its own."""
        self.services = services
        self.config = services.config
        self.audit_spool = audit
        #: Group commit of the write-ahead audit for the compiled fast path (set in
        #: prepare()): every write to a target drains it first (Upstream.write).
        self.write_ahead: Any = None
        self.watcher = DecisionWatcher(services.approvals, services.store)
        self.holds = HoldService(services.approvals, self.watcher, self.audit,
                                 public_url=PORTAL.of(self.config).public_url)
        self.sessions: dict[tuple[int, int], ClientSession] = {}
        self.tls: ssl.SSLContext | None = None
        gw = self.config.gateway
        if gw.tls_cert_file and gw.tls_key_file:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(gw.tls_cert_file, gw.tls_key_file)
            self.tls = ctx
        self._analyzers: dict[str, Analyzer] = {}
        # Large texts are analysed in a worker process, off the event loop (started on
        # first use; the loop's analysis budget decides what goes there).
        self.analysis_pool: AnalysisPool | None = AnalysisPool()
        self.analysis_budget = LoopBudget(LOOP_ANALYSIS_BUDGET, cheap=CHEAP_ANALYSIS,
                                          own=SESSION_CHEAP_BUDGET)
        self._origins: dict[str, MaskCatalog] = {}
        # Reads of column origins (masked connections) run on threads of their own, one
        # per connection at a time: a read that waits for a lock (a view over a table
        # someone locked) must not take the threads logins and checks need.
        self._origin_pool = ThreadPoolExecutor(max_workers=2,
                                               thread_name_prefix="keyturn-origins")
        self._origin_locks: dict[str, asyncio.Lock] = {}
        # Each connection's user-defined code, judged into every decision (catalog.py).
        self.catalogs = Catalogs(self, read=catalog_reader)
        self.mask_key = _mask_key(self.config)
        self.policy = PolicyEngine(self.config)
        self.policy.listen(self._decisions_outdated)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.limits = self.config.gateway.limits
        self.throttle = LoginThrottle(self.limits.auth_throttle)
        # Sockets not logged in yet, oldest first, with their login timers.
        self.pending: dict[ClientSession, asyncio.TimerHandle] = {}
        self.active: set[ClientSession] = set()  # logged in (counted per user)
        # Bytes of partly received messages from targets, per session holding over
        # LARGE_ROW bytes (a row is relayed once whole): see large_row.
        self.row_buffers: dict[ClientSession, int] = {}
        self.per_user: Counter[str] = Counter()
        self._shed: Counter[str] = Counter()  # sockets closed before login, not yet logged
        self._shed_logged = -10.0
        self._shed_timer: asyncio.TimerHandle | None = None
        self._store_down: str | None = None
        self._revocations: asyncio.Task[None] | None = None

    # ---- lifecycle

    async def start(self) -> None:
        """Serve: everything sessions need (``prepare``), then the listener."""
        await self.prepare()
        listen = self.config.gateway.listener("postgres")  # register.py: gateway.postgres
        assert listen is not None and self.loop is not None
        # A deep accept queue: a burst of sockets is accepted (and shed if need be) instead
        # of dropped SYNs leaving real clients to retry after a second.
        self._server = await self.loop.create_server(self.new_session, listen.host,
                                                     listen.port, reuse_address=True,
                                                     backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("postgres gateway on %s:%d (%d connections, TLS %s, compiled fast path %s)",
                 listen.host, self.port,
                 sum(1 for c in self.config.connections.values() if c.type == "postgres"),
                 "on" if self.tls else "off", speedups.state())

    def new_session(self) -> ClientSession:
        """A client session as the listener makes one for each socket (counted against
        the gateway's caps from connection_made)."""
        return _SESSION_CLASS[0](self)

    async def open_target(self, factory: Callable[[], Upstream], host: str, port: int
                          ) -> tuple[asyncio.BaseTransport, Upstream]:
        """The connection to a target (Upstream.connect); the transcript harness gives
        the session a target of its own here, without a socket."""
        assert self.loop is not None
        return await self.loop.create_connection(factory, host, port)

    async def prepare(self) -> None:
        """Everything but the listener: the decision watcher, the catalogs, the
        revocation watch, signal handling."""
        if not _SESSION_CLASS:
            _SESSION_CLASS.append(_counted_session_class())
        self.loop = asyncio.get_running_loop()
        loop = self.loop
        self.watcher.hear_local_decisions(loop)

        def spool_changed(accepting: bool) -> None:
            loop.call_soon_threadsafe(self._spool_changed, accepting)

        self.audit_spool.watch(spool_changed)
        flush = getattr(self.audit_spool, "flush_ahead", None)
        if speedups.compiled is not None and flush is not None:
            self.write_ahead = speedups.compiled.WriteAhead(flush, loop.call_soon)
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload()))
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests that embed the gateway)
        self.watcher.start()
        self.catalogs.start()
        for conn in self.config.connections.values():
            if conn.type == "postgres":
                self.catalogs.refresh(conn)  # read before the first session needs it
        _raise_fd_limit(self.limits.max_connections)
        self._revocations = loop.create_task(self._end_revoked_sessions())

    def _decisions_outdated(self, generation: int) -> None:
        """A new policy generation: no session may use a decision it memoised before
        (the compiled fast path reads the same dictionaries, cleared in place)."""
        for session in list(self.sessions.values()):
            session.forget_verdicts()

    async def reload(self) -> str:
        """Read the config file again (SIGHUP) and decide with its policies from now on,
        in every session, open ones included. Only policies may change this way; what
        else changed needs a restart, and the reload is refused (the old policies stay)."""
        try:
            new = await asyncio.to_thread(load_config, self.config.path)
        except ConfigError as exc:
            log.error("config reload refused, the policies in force stay: %s", exc)
            return f"refused: {exc}"
        problem = reload_problem(self.config, new)
        if problem is not None:
            log.error("config reload refused, the policies in force stay: %s", problem)
            return f"refused: {problem}"
        self.config = dataclasses.replace(self.config, policies=new.policies)
        self.policy.replace(self.config, "policies reloaded from " + self.config.path)
        self.audit(kind="policy_reload", outcome="ok",
                   detail={"policies": sorted(new.policies), "generation":
                           self.policy.generation})
        return "reloaded"

    def _spool_changed(self, accepting: bool) -> None:
        """The audit spool stopped (or resumed) accepting records: compiled fast paths
        append without asking, so each goes back through the session, which refuses
        statements while the spool cannot take their records."""
        if not accepting:
            for session in list(self.sessions.values()):
                fast = getattr(session, "fast", None)
                if fast is not None:
                    fast.disarm()

    async def stop(self) -> None:
        if self._server:
            self._server.close()
        if self._revocations is not None:
            self._revocations.cancel()
            await asyncio.gather(self._revocations, return_exceptions=True)
        if self._shed_timer is not None:
            self._shed_timer.cancel()
        self._log_shed_now()
        for session in list(self.sessions.values()):
            await session.shutdown("the gateway is shutting down")
        if self._server:
            await self._server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.catalogs.stop()
        await self.watcher.stop()
        self._origin_pool.shutdown(wait=False, cancel_futures=True)
        if self.analysis_pool is not None:
            self.analysis_pool.close()
        if self.write_ahead is not None:
            writes, chunks = self.write_ahead.stats
            log.info("write-ahead audit: %d chunks of the fast path sent after %d spool "
                     "writes", chunks, writes)

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

    # ---- limits: client counts, login timeout, throttling, revoked tokens

    def admit(self, session: ClientSession) -> None:
        """A new client socket (connection_made): count it against the caps and start
        its login timer. Sockets that have not logged in are shed oldest first to make
        room, so idle or slow ones can never keep a real user out; only logged-in
        sessions can fill the gateway, and then the new socket is refused as
        PostgreSQL does (53300)."""
        limits = self.limits
        while self.pending and (len(self.pending) >= limits.max_pending_logins or
                                len(self.pending) + len(self.active) >= limits.max_connections):
            self._close_before_login(next(iter(self.pending)), "53300",
                                     "keyturn: too many connections are logging in; "
                                     "this one had waited longest", "shed")
        if len(self.active) >= limits.max_connections:
            self._shed["refused"] += 1
            self._log_shed()
            session.write(codec.encode_error("FATAL", "53300", "sorry, too many clients already"))
            if session.transport is not None:
                session.transport.close()
            return
        assert self.loop is not None
        self.pending[session] = self.loop.call_later(limits.login_timeout,
                                                     self._login_timeout, session)

    def logged_in(self, session: ClientSession) -> str | None:
        """The session's user authenticated: count it per user. Returns why it is refused
        (too many sessions of that user), or None."""
        timer = self.pending.pop(session, None)
        if timer is not None:
            timer.cancel()
        if self.per_user[session.user] >= self.limits.max_connections_per_user:
            return f'too many connections for role "{session.user}"'
        self.active.add(session)
        self.per_user[session.user] += 1
        return None

    def large_row(self, session: ClientSession, buffered: int) -> str | None:
        """``session`` holds ``buffered`` bytes of a message the target has not finished
        sending (a large row). Returns why it may not hold more (the user's or the
        gateway's budget for large rows is spent), or None."""
        if buffered <= LARGE_ROW:
            self.row_buffers.pop(session, None)
            return None
        self.row_buffers[session] = buffered
        mib = 1024 * 1024
        mine = sum(n for s, n in self.row_buffers.items() if s.user == session.user)
        if mine > self.limits.large_rows_mib_per_user * mib:
            return (f"keyturn: your sessions hold {mine // mib} MiB of large rows at once, "
                    f"over gateway.limits.large_rows_mib_per_user "
                    f"({self.limits.large_rows_mib_per_user} MiB); this result is refused")
        total = sum(self.row_buffers.values())
        if total > self.limits.large_rows_mib * mib:
            return (f"keyturn: the gateway holds {total // mib} MiB of large rows at once, "
                    f"over gateway.limits.large_rows_mib ({self.limits.large_rows_mib} MiB); "
                    "this result is refused, try again")
        return None

    def release(self, session: ClientSession) -> None:
        """The socket closed (connection_lost; safe to call more than once)."""
        self.row_buffers.pop(session, None)
        timer = self.pending.pop(session, None)
        if timer is not None:
            timer.cancel()
        if session in self.active:
            self.active.discard(session)
            self.per_user[session.user] -= 1
            if self.per_user[session.user] <= 0:
                del self.per_user[session.user]

    def _login_timeout(self, session: ClientSession) -> None:
        if session in self.pending and not session.closed:
            self._close_before_login(session, "57014", "canceling authentication due to "
                                     f"timeout (keyturn login_timeout {self.limits.login_timeout:g}"
                                     " s)", "timed out")

    def _close_before_login(self, session: ClientSession, sqlstate: str, message: str,
                            why: str) -> None:
        """Close a socket that never logged in. Counted and logged in summary: there may be
        thousands, and none of them is a person yet."""
        timer = self.pending.pop(session, None)
        if timer is not None:
            timer.cancel()
        if session.phase != "tls":  # mid-handshake there is no channel to write on
            session.write(codec.encode_error("FATAL", sqlstate, message))
        session.closed = True
        if session.transport is not None:
            session.transport.close()
        self._shed[why] += 1
        self._log_shed()

    def _log_shed(self) -> None:
        """At most one line every 10 s, the first one at once."""
        if self._shed_timer is not None:
            return
        wait = self._shed_logged + 10 - time.monotonic()
        if wait > 0:
            assert self.loop is not None
            self._shed_timer = self.loop.call_later(wait, self._log_shed_now)
        else:
            self._log_shed_now()

    def _log_shed_now(self) -> None:
        self._shed_timer = None
        if self._shed:
            self._shed_logged = time.monotonic()
            log.warning("closed connections that had not logged in: %s (%d waiting, %d logged "
                        "in; limits: %d pending, %d in all, login_timeout %g s)",
                        ", ".join(f"{n} {why}" for why, n in sorted(self._shed.items())),
                        len(self.pending), len(self.active), self.limits.max_pending_logins,
                        self.limits.max_connections, self.limits.login_timeout)
            self._shed.clear()

    def store_failed(self, exc: StoreUnavailable, session: ClientSession | None = None) -> None:
        """The store failed for the data plane: log the episode once, not per login, and
        tell a client that was logging in why it cannot."""
        if self._store_down is None:
            log.error("%s: new logins are refused with this reason, open sessions keep "
                      "running, statements that need a review fail; logged again when it "
                      "recovers", exc.message)
        self._store_down = exc.reason
        if session is not None:
            session.fatal("57P03", f"keyturn: cannot check your access token: {exc.message}",
                          detail="Sessions already open keep working; try again when the "
                                 "store is back.")

    def store_ok(self) -> None:
        if self._store_down is not None:
            log.warning("the Keyturn store is available again (it failed with: %s)",
                        self._store_down)
            self._store_down = None

    async def _end_revoked_sessions(self) -> None:
        """Every ``revocation_check`` seconds, end the sessions whose token was revoked or
        deleted, or whose user left the config, with a FATAL that says so. While the store
        is unavailable open sessions keep running (an outage must not end the data plane)."""
        while True:
            await asyncio.sleep(self.limits.revocation_check)
            by_token: dict[int, list[ClientSession]] = {}
            for s in self.active:
                tid = s.identity.token_id if s.identity is not None else None
                if tid is not None and not s.closed:
                    by_token.setdefault(tid, []).append(s)
            if not by_token:
                continue
            try:
                gone = await asyncio.to_thread(self.services.identities.revoked, by_token)
            except StoreUnavailable as exc:
                self.store_failed(exc)
                continue
            except Exception:
                log.exception("checking for revoked tokens failed")
                continue
            self.store_ok()
            for tid, why in gone.items():
                for s in by_token[tid]:
                    if s.closed:
                        continue
                    reason = f"your access token {why}"
                    log.info("session %s of %s ended: token %d %s", s.session_id, s.user, tid,
                             why)
                    self.audit(kind="session_ended", user=s.user, connection=s.conn_name,
                               session_id=s.session_id, client_addr=s.client_addr,
                               reason=f"access token {tid} {why}", outcome="terminated",
                               detail={"token_id": tid})
                    self.spawn(s.shutdown(reason))

    # ---- shared helpers

    def analyzer(self, conn: Connection) -> Analyzer:
        a = self._analyzers.get(conn.unknown_function_class)
        if a is None:
            a = Analyzer(unknown_function_class=StatementClass(conn.unknown_function_class))
            self._analyzers[conn.unknown_function_class] = a
        return a

    async def origins(self, conn: Connection) -> MaskCatalog:
        """column_origins off the event loop, one read per connection at a time (the
        others wait for its result, not for a thread)."""
        cached = self._origins.get(conn.name)
        if cached is not None:
            return cached
        lock = self._origin_locks.setdefault(conn.name, asyncio.Lock())
        async with lock:
            return await asyncio.get_running_loop().run_in_executor(
                self._origin_pool, self.column_origins, conn)

    def column_origins(self, conn: Connection) -> MaskCatalog:
        """(table oid, column number) -> ``schema.table.column`` for every user column of
        the connection's database, which RowDescription names as each field's origin.
        Cached per connection; ``forget_origins`` drops it after DDL (runs in a thread)."""
        cached = self._origins.get(conn.name)
        if cached is not None:
            return cached
        # Printing a view locks the tables it reads: bounded waits, as read_catalog's.
        with connect_target(conn, "keyturn-catalog", timeout=5,
                            options="-c lock_timeout=2000 -c statement_timeout=20000 "
                                    f"{OWN_PATH}") as c:
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
        rec.setdefault("protocol", PROTOCOL)
        self.audit_spool.record(**rec)

    def new_key(self, session: ClientSession, pid: int | None = None) -> tuple[int, int]:
        """The BackendKeyData the client gets: the target's pid when it told one (so
        NOTIFY and pg_terminate_backend agree with it) and a secret of our own. Two
        targets may use the same pid, so sessions are keyed by the pair."""
        while True:
            key = (pid if pid is not None else secrets.randbits(31) or 1,
                   secrets.randbits(32))
            if key not in self.sessions:
                self.sessions[key] = session
                return key

    def drop_key(self, key: tuple[int, int] | None) -> None:
        if key is not None:
            self.sessions.pop(key, None)

    def cancel(self, pid: int, secret: int, then: Callable[[], None] | None = None) -> None:
        """Act on a CancelRequest; ``then`` (closing the requester's socket) runs once the
        cancel has been delivered: like PostgreSQL, whose clients (libpq's PQcancel) wait
        for that close, so a late cancel cannot hit the client's next statement."""
        session = self.sessions.get((pid, secret))
        if session is None:
            log.info("CancelRequest with an unknown key ignored")
            if then is not None:
                then()
            return
        task = self.spawn(session.on_cancel_request())
        if then is not None:
            task.add_done_callback(lambda _: then())

    async def send_target_cancel(self, conn: Connection, pid: int, secret: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(conn.target.host, conn.target.port)
            writer.write(codec.encode_cancel_request(pid, secret))
            await writer.drain()
            try:
                # The server closes the connection once it has signalled the backend.
                await asyncio.wait_for(reader.read(), 5)
            except TimeoutError:
                log.info("the target %s did not close a cancel connection in 5 s", conn.name)
            writer.close()
        except OSError:
            log.exception("could not forward a cancel request to %s", conn.name)

    def code_digest(self, conn: Connection, tables: list[str]) -> str:
        """A digest of every piece of user code stored on the target (see
        ``release_facts``), read on a short connection of its own (runs in a thread): a
        held statement runs after approval only while it still matches. Raises when the
        target cannot be read (the caller refuses then)."""
        return self.release_facts(conn, tables)[0]

    def release_facts(self, conn: Connection, tables: list[str], *,
                      exclusive: bool = False) -> tuple[str, list[str]]:
        """What an approved statement is checked against before it runs, on one short
        connection (runs in a thread; raises when the target cannot be read):

        - a digest of all the user code the target stores and of what decides when it
          runs (``USER_CODE_SQL``): functions (bodies, settings, owners), triggers with
          their arguments, rules, views, defaults, constraints and referential actions,
          policies, operators, casts, aggregates, event triggers, types, inheritance,
          indexes (expressions, predicates, operator classes), role and database settings.
          Code reaches code the catalog does not link (a function's body calls another
          by name), so any change, anywhere, counts. Objects of temporary schemas count
          only when the statement names a temporary table (other sessions' temporary
          tables come and go all the time);
        - of ``tables`` (schema.name), those another transaction holds a lock on that a
          write would wait behind and that schema changes take (CREATE TRIGGER, ALTER
          TABLE, CREATE INDEX...), or any lock at all when the statement takes an
          exclusive one (``exclusive``: TRUNCATE, REFRESH, ALTER, DROP, LOCK...): waiting
          behind it, the statement would run only after that transaction commits, and
          what it changed becomes visible only then, after any check;
        - catalogs another transaction is changing right now (its old rows carry the
          number of a transaction still running: a function replaced, a table altered,
          not committed yet), named "catalog pg_proc" and so on."""
        # schema.name as written ("public.t.x" for a quoted name holding a dot): compared
        # with nspname || '.' || relname, which is spelled the same way.
        rels = sorted({t for t in tables if "." in t and "*" not in t})
        temp = any(t.startswith("pg_temp") for t in tables)
        busy: list[str] = []
        with connect_target(conn, "keyturn-recheck", timeout=5,
                            options=f"-c statement_timeout=5000 {OWN_PATH}") as c:
            row = c.execute(USER_CODE_SQL, {"temp": temp}).fetchone()
            digest = str(row[0]) if row else ""
            if rels:
                modes = ["ShareLock", "ShareRowExclusiveLock", "ExclusiveLock",
                         "AccessExclusiveLock"]
                if exclusive:
                    modes += ["AccessShareLock", "RowShareLock", "RowExclusiveLock",
                              "ShareUpdateExclusiveLock"]
                busy = sorted(str(r[0]) for r in c.execute(
                    "SELECT DISTINCT n.nspname || '.' || c.relname FROM pg_catalog.pg_locks l "
                    "JOIN pg_catalog.pg_class c ON c.oid = l.relation "
                    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE l.granted AND l.pid <> pg_catalog.pg_backend_pid() AND "
                    "l.mode = ANY(%s) AND n.nspname || '.' || c.relname = ANY(%s)",
                    (modes, rels)).fetchall())
            busy += [f"catalog {r[0]}" for r in c.execute(CATALOG_CHANGES_SQL).fetchall()]
        return digest, busy

    # The check after an approved statement ran (holding.py _post_check): the session's
    # own last statement waits for an advisory lock this connection of the gateway's holds.

    def post_check_open(self, conn: Connection, key: int) -> Any:
        """A connection of the gateway's own holding advisory lock ``key`` (runs in a
        thread; raises when the target cannot be reached)."""
        c = connect_target(conn, "keyturn-postcheck", timeout=5,
                           options=f"-c statement_timeout=20000 {OWN_PATH}")
        try:
            # It waits idle for as long as the approved statement runs: a role's own idle
            # timeout must not end it (that would roll the statement back).
            for name in ("idle_session_timeout", "idle_in_transaction_session_timeout"):
                try:
                    c.execute(f"SET {name} = 0")
                except Exception:  # noqa: BLE001 - a server without the setting
                    log.debug("the target has no %s", name)
            c.execute("SELECT pg_catalog.pg_advisory_lock(%s::pg_catalog.int8)", (key,))
        except Exception:
            c.close()
            raise
        return c

    @staticmethod
    def post_check_state(c: Any, pid: int, key: int) -> str:
        """Where backend ``pid`` is: "waiting" for lock ``key``, "gone", or "busy"."""
        row = c.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l WHERE l.pid = a.pid "
            "AND l.locktype = 'advisory' AND NOT l.granted AND l.classid = %s "
            "AND l.objid = %s AND l.objsubid = 1) FROM pg_catalog.pg_stat_activity a "
            "WHERE a.pid = %s", (key >> 32, key & 0xFFFFFFFF, pid)).fetchone()
        if row is None:
            return "gone"
        return "waiting" if row[0] else "busy"

    @staticmethod
    def post_check_pass(c: Any, key: int, name: str) -> None:
        """The check passed: say so (application_name, which the waiting session reads
        once it has the lock) and release the lock."""
        c.execute("SELECT pg_catalog.set_config('application_name', %s, false)", (name,))
        c.execute("SELECT pg_catalog.pg_advisory_unlock(%s::pg_catalog.int8)", (key,))

    @staticmethod
    def post_check_close(c: Any) -> None:
        """Close, which releases the lock (unless post_check_pass named the connection
        first, the waiting statement then fails and its transaction rolls back)."""
        try:
            c.close()
        except Exception:  # noqa: BLE001 - closing releases the lock either way
            log.info("closing a post-check connection failed", exc_info=True)

    def explain_rows(self, conn: Connection, sql: str, params: list[Any] | None) -> int | None:
        """The planner's row estimate for a DML statement (runs in a thread).

        Uses its own short connection so the held session's transaction state is
        never touched, in a read-only transaction that is rolled back (the caller plans
        only statements without user code; this is the second line). Returns None if the
        target cannot plan it.
        """
        try:
            with connect_target(conn, "keyturn-explain", timeout=3,
                                options="-c statement_timeout=2000") as c:
                with c.cursor() as cur:
                    cur.execute("BEGIN READ ONLY")
                    if params:
                        cur.execute("PREPARE keyturn_explain AS " + sql)
                        lits = ", ".join(_literal(p) for p in params)
                        cur.execute(f"EXPLAIN (FORMAT JSON) EXECUTE keyturn_explain({lits})")
                    else:
                        cur.execute("EXPLAIN (FORMAT JSON) " + sql)
                    row = cur.fetchone()
                    cur.execute("ROLLBACK")
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


#: The gateway's own reading connections resolve names in pg_catalog alone (a startup
#: option outranks the role's and the database's own search_path, which the target role
#: may set to a schema of its own that shadows md5, string_agg or =).
OWN_PATH = "-c search_path=pg_catalog"

#: The digest of the user code a target stores (release_facts): one md5 per catalog row
#: that holds code or decides when code runs, then one of them all. OIDs below 16384 are
#: the system's own. %(temp)s: include objects of temporary schemas. Functions, triggers
#: and rules count with their row's version (xmin): one replaced and put back again, in
#: between two reads, counts as changed.
USER_CODE_SQL = """
WITH ns AS (
  SELECT oid FROM pg_catalog.pg_namespace
  WHERE nspname NOT IN ('pg_catalog', 'information_schema')
    AND (%(temp)s OR (nspname NOT LIKE 'pg\\_temp\\_%%'
                      AND nspname NOT LIKE 'pg\\_toast\\_temp\\_%%'))),
rel AS (SELECT c.oid FROM pg_catalog.pg_class c JOIN ns ON ns.oid = c.relnamespace),
rows AS (
  SELECT 'f' || p.oid || md5(concat_ws('|', p.xmin, p.pronamespace, p.proname, p.prosrc,
         p.probin, p.proconfig::text, p.prosecdef, p.provolatile, p.proowner, p.prolang,
         p.proargtypes::text, p.prorettype, p.proisstrict, p.prokind, p.proleakproof,
         p.prosupport)) AS x
    FROM pg_catalog.pg_proc p JOIN ns ON ns.oid = p.pronamespace
  UNION ALL SELECT 't' || t.oid || md5(concat_ws('|', t.xmin, t.tgrelid, t.tgname,
         t.tgfoid, t.tgtype, t.tgenabled, encode(t.tgargs, 'hex'), t.tgattr::text, t.tgqual::text,
         t.tgdeferrable, t.tginitdeferred, t.tgoldtable, t.tgnewtable))
    FROM pg_catalog.pg_trigger t JOIN rel ON rel.oid = t.tgrelid
  UNION ALL SELECT 'r' || r.oid || md5(concat_ws('|', r.xmin, r.ev_class, r.rulename,
         r.ev_type, r.ev_enabled, r.is_instead, r.ev_qual::text, r.ev_action::text))
    FROM pg_catalog.pg_rewrite r JOIN rel ON rel.oid = r.ev_class
  UNION ALL SELECT 'd' || a.oid || md5(concat_ws('|', a.xmin, a.adrelid, a.adnum,
         a.adbin::text))
    FROM pg_catalog.pg_attrdef a JOIN rel ON rel.oid = a.adrelid
  UNION ALL SELECT 'c' || k.oid || md5(concat_ws('|', k.xmin, k.conrelid, k.contypid,
         k.contype,
         k.conbin::text, k.confrelid, k.confupdtype, k.confdeltype, k.confmatchtype,
         k.conkey::text, k.confkey::text, k.convalidated, k.condeferrable,
         k.condeferred))
    FROM pg_catalog.pg_constraint k JOIN ns ON ns.oid = k.connamespace
  UNION ALL SELECT 'p' || y.oid || md5(concat_ws('|', y.xmin, y.polrelid, y.polname,
         y.polcmd,
         y.polpermissive, y.polroles::text, y.polqual::text, y.polwithcheck::text))
    FROM pg_catalog.pg_policy y JOIN rel ON rel.oid = y.polrelid
  UNION ALL SELECT 'x' || c.oid || md5(concat_ws('|', c.xmin, c.relname, c.relnamespace,
         c.relkind, c.relowner, c.relrowsecurity, c.relforcerowsecurity, c.relispartition,
         c.relpartbound::text, c.reloptions::text))
    FROM pg_catalog.pg_class c JOIN rel ON rel.oid = c.oid
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c', 'S')
  UNION ALL SELECT 'i' || i.inhrelid || '.' || i.inhparent || '.' || i.inhseqno
    FROM pg_catalog.pg_inherits i JOIN rel ON rel.oid = i.inhrelid
  UNION ALL SELECT 'o' || o.oid || md5(concat_ws('|', o.xmin, o.oprname, o.oprnamespace,
         o.oprleft, o.oprright, o.oprcode, o.oprowner))
    FROM pg_catalog.pg_operator o WHERE o.oid >= 16384
  UNION ALL SELECT 'k' || k.oid || md5(concat_ws('|', k.xmin, k.castsource, k.casttarget,
         k.castfunc, k.castcontext, k.castmethod))
    FROM pg_catalog.pg_cast k WHERE k.oid >= 16384
  UNION ALL SELECT 'a' || g.aggfnoid::oid || md5(concat_ws('|', g.xmin, g.aggtransfn::oid,
         g.aggfinalfn::oid, g.aggcombinefn::oid, g.aggmtransfn::oid, g.agginitval))
    FROM pg_catalog.pg_aggregate g WHERE g.aggfnoid::oid >= 16384
  UNION ALL SELECT 'e' || e.oid || md5(concat_ws('|', e.xmin, e.evtname, e.evtevent,
         e.evtfoid,
         e.evtenabled, e.evttags::text))
    FROM pg_catalog.pg_event_trigger e
  UNION ALL SELECT 'n' || i.indexrelid || md5(concat_ws('|', i.xmin, i.indrelid,
         i.indkey::text,
         i.indclass::text, i.indexprs::text, i.indpred::text, i.indisunique))
    FROM pg_catalog.pg_index i JOIN rel ON rel.oid = i.indrelid
  UNION ALL SELECT 's' || md5(concat_ws('|', s.xmin, s.setdatabase, s.setrole,
         s.setconfig::text))
    FROM pg_catalog.pg_db_role_setting s
  UNION ALL SELECT 'y' || t.oid || md5(concat_ws('|', t.xmin, t.typname, t.typnamespace,
         t.typinput, t.typoutput, t.typreceive, t.typsend, t.typbasetype, t.typnotnull,
         t.typdefaultbin::text))
    FROM pg_catalog.pg_type t JOIN ns ON ns.oid = t.typnamespace
  -- Names stored code resolves when it runs: schemas (two swapped by ALTER SCHEMA
  -- RENAME swap every function in them; USAGE decides which a search_path reaches),
  -- columns and composite types' attributes (two swapped by RENAME), enum labels.
  -- Every row with its row version: changed and changed back counts as changed.
  UNION ALL SELECT 'N' || n.oid || md5(concat_ws('|', n.xmin, n.nspname, n.nspowner,
         n.nspacl::text))
    FROM pg_catalog.pg_namespace n JOIN ns ON ns.oid = n.oid
  UNION ALL SELECT 'A' || a.attrelid || '.' || a.attnum || md5(concat_ws('|', a.xmin,
         a.attname,
         a.atttypid, a.atttypmod, a.attisdropped, a.attgenerated, a.attcollation))
    FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
    JOIN ns ON ns.oid = c.relnamespace
    WHERE a.attnum > 0 AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
  UNION ALL SELECT 'E' || e.oid || md5(concat_ws('|', e.xmin, e.enumtypid, e.enumsortorder,
         e.enumlabel))
    FROM pg_catalog.pg_enum e JOIN pg_catalog.pg_type t ON t.oid = e.enumtypid
    JOIN ns ON ns.oid = t.typnamespace
)
SELECT coalesce(md5(string_agg(x, ',' ORDER BY x)), '') FROM rows
"""


#: Catalogs holding user code with a row another, still running, transaction updated or
#: deleted (its old version, still visible, carries that transaction's number as xmax).
#: Rows of temporary relations are left out: sessions create and drop them all the time.
_CHANGED_ROWS = {
    "pg_proc": "", "pg_operator": "", "pg_cast": "", "pg_aggregate": "",
    "pg_event_trigger": "", "pg_namespace": " AND nspname NOT LIKE 'pg!_%temp!_%' ESCAPE '!'",
    "pg_class": " AND oid NOT IN (SELECT oid FROM temp_rels)",
    "pg_type": " AND typrelid NOT IN (SELECT oid FROM temp_rels)",
    "pg_trigger": " AND tgrelid NOT IN (SELECT oid FROM temp_rels)",
    "pg_rewrite": " AND ev_class NOT IN (SELECT oid FROM temp_rels)",
    "pg_attrdef": " AND adrelid NOT IN (SELECT oid FROM temp_rels)",
    "pg_constraint": " AND conrelid NOT IN (SELECT oid FROM temp_rels)",
    "pg_policy": " AND polrelid NOT IN (SELECT oid FROM temp_rels)",
    "pg_inherits": " AND inhrelid NOT IN (SELECT oid FROM temp_rels)",
    "pg_index": " AND indrelid NOT IN (SELECT oid FROM temp_rels)",
}
CATALOG_CHANGES_SQL = (
    "WITH snap AS (SELECT pg_catalog.pg_current_snapshot() AS s), "
    # in progress: listed in the snapshot, or not finished before it (at or past its xmax)
    "running AS (SELECT mod(x::text::bigint, 4294967296)::text AS x "
    "FROM snap, pg_catalog.pg_snapshot_xip(s) AS x), "
    "later AS (SELECT mod(pg_catalog.pg_snapshot_xmax(s)::text::bigint, 4294967296) AS x "
    "FROM snap), "
    "temp_rels AS (SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
    "ON n.oid = c.relnamespace WHERE n.nspname LIKE 'pg!_%temp!_%' ESCAPE '!') " +
    " UNION ALL ".join(
        f"(SELECT '{cat}' FROM pg_catalog.{cat} WHERE (xmax::text IN (SELECT x FROM running)"
        " OR (xmax::text <> '0' AND xmax::text::bigint >= (SELECT x FROM later)))"
        f"{extra} LIMIT 1)" for cat, extra in _CHANGED_ROWS.items()))


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    return "'" + str(value).replace("'", "''") + "'"


#: The counted session class, made once (on first use: it subclasses ClientSession).
_SESSION_CLASS: list[type[ClientSession]] = []


def _counted_session_class() -> type[ClientSession]:
    """ClientSession as the listener makes it: every socket is admitted against the
    gateway's caps when it connects and released when it goes (sessions made elsewhere,
    e.g. by hand, are not counted)."""
    from proxies.postgres.session import ClientSession

    class CountedSession(ClientSession):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.gw.admit(self)

        def connection_lost(self, exc: Exception | None) -> None:
            self.gw.release(self)  # also for sockets already marked closed
            super().connection_lost(exc)

    return CountedSession


def _raise_fd_limit(max_connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: each logged-in session holds two
    sockets (client and target), and running out of descriptors would stop accept()."""
    needed = 2 * max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, needed) if hard == resource.RLIM_INFINITY else hard
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            log.warning("could not raise RLIMIT_NOFILE from %d to %d", soft, want,
                        exc_info=True)
    if soft < needed:
        log.warning("only %d file descriptors (RLIMIT_NOFILE): gateway.limits.max_connections"
                    " %d needs about %d; raise the limit or lower max_connections", soft,
                    max_connections, needed)


def _mask_key(config: Any) -> bytes:
    """The HMAC key of the ``hash`` masking style: configured (stable across restarts
    and gateways) or, failing that, random for this process."""
    ref = config.gateway.mask_key
    if ref is not None:
        return ref.resolve().encode()
    return secrets.token_bytes(32)


def reload_problem(old: Config, new: Config) -> str | None:
    """Why ``new`` cannot replace ``old``'s policies in a running gateway, or None."""
    if new.connections != old.connections:
        return "connections changed (restart the gateway to change connections)"
    if new.users != old.users:
        return "users changed (restart the gateway to change identities)"
    for conn in old.connections.values():
        if masks_in(old.policies[conn.policy]) != masks_in(new.policies[conn.policy]):
            return (f"whether connection {conn.name!r} masks results changed (open sessions "
                    "keep their mode: restart the gateway)")
    return None
