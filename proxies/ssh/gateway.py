"""The SSH gateway: one listener for every ``type: ssh`` connection (asyncssh).

People log in as ``USER:CONNECTION`` (or ``USER+CONNECTION``, which scp's
``user@host:path`` parsing leaves alone) with one of their registered public keys or, as a
fallback, an access token typed as the password. Each channel they open is one request:

- **exec** (``ssh web1 'systemctl restart nginx'``): the command is classified
  (proxies/ssh/shell.py) and judged by policy before any channel to the target opens. A
  held command waits with "keyturn: held for approval — ticket N ..." on stderr (stdout
  stays clean); approved, the byte-identical command runs and its output and exit status
  come back; refused, the client gets the reason on stderr and exit status 126. Closing the
  client while it waits cancels the ticket.
- **shell** (interactive, with or without a terminal): policy allows, blocks or reviews
  opening it (class ``shell``); it is always recorded.
- **sftp** (and scp, which speaks SFTP): each operation is judged with its paths and
  audited (proxies/ssh/sftp.py). Other subsystems, and forwarding of agents, X11, ports
  (``-L``/``-R``) and tunnels, are refused.

Every exec and shell is recorded in asciicast v2 (output, input, resizes) under the
recordings directory; its reference and SHA-256 enter the audit chain when it closes. The
gateway logs in to the target with the connection's stored key or password and verifies
the target's host key against the configured fingerprints or known_hosts file; the client
never sees those credentials. Its logins are kept and reused (``UpstreamPool``): a
command is a new channel on one, not a new login.

Audit: a command's intent record reaches the spool file before the upstream channel
opens (write-ahead); its outcome (exit status, bytes, duration) completes it.

The event loop serves every client: a command line is classified in a worker thread
(lines over 8 KiB are refused unparsed), and one connection serves at most
MAX_CHANNELS exec/shell/subsystem channels at a time (like sshd's MaxSessions); more are
refused and audited.

This module must not decide what a command may do (keyturn.policy does, from the class
shell.py gives) nor what an audit record holds (keyturn.auditschema).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh

from keyturn import holds
from keyturn.approvals import TicketRequest, binding_of
from keyturn.auditspool import AuditSpool, AuditUnwritable
from keyturn.bus import DecisionWatcher
from keyturn.config import Connection
from keyturn.errors import StoreUnavailable, Unauthorized
from keyturn.identity import Identity, LoginThrottle, key_fingerprint
from keyturn.policy import PolicyEngine
from keyturn.recording import Recorder, Recording, RecordingFull
from keyturn.request import Request
from keyturn.services import Services
from portal.settings import PORTAL
from proxies.ssh.register import SSHTarget, ca_lines, target_of
from proxies.ssh.sftp import SFTPRelay
from proxies.ssh.shell import ShellAction, classify
from proxies.ssh.terminal import TypedLines, clamp_size

log = logging.getLogger(__name__)

PROTOCOL = "ssh"
#: Exit status of a command keyturn did not run (blocked, rejected, expired, cancelled):
#: like a shell's "found but cannot execute".
REFUSED_STATUS = 126
#: Exit status when the target cannot be reached or verified (like ssh's own failures).
UNREACHABLE_STATUS = 255
SEPARATORS = (":", "+")
_USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,63}\Z")  # as the config allows them
HOST_KEY_NAME = "ssh_host_ed25519_key"
MAX_CHANNELS = 10  # open exec/shell/subsystem channels per client connection
KEEPALIVE = 30.0  # seconds between keepalives: a held client stays open through NAT
CHUNK = 65536
KEYFRAME_BYTES = 1 << 20  # a keyframe at least every MiB of output, however fast
#: Ciphers offered, fastest first where the machine has AES instructions (the client's
#: order decides, so ChaCha20, which asyncssh runs slower, is not offered: every OpenSSH
#: client has AES-GCM).
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr",
           "aes256-ctr")


def split_username(name: str) -> tuple[str, str | None]:
    """``alice:web1`` -> (alice, web1); a name without a separator names no connection."""
    for sep in SEPARATORS:
        if sep in name:
            user, _, conn = name.partition(sep)
            return user, conn
    return name, None


def host_key_path(config: Any) -> Path:
    """The gateway's own host key: next to the audit spool, in the data directory."""
    return Path(config.gateway.audit_spool).resolve().parent / HOST_KEY_NAME


def load_host_key(path: Path) -> asyncssh.SSHKey:
    """The gateway's host key, generated (ed25519, mode 0600) the first time."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519", comment="keyturn gateway")
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.export_private_key())
        os.replace(tmp, path)
        log.info("generated the SSH gateway's host key %s (%s)", path,
                 key.get_fingerprint("sha256"))
    return asyncssh.read_private_key(str(path))


class SSHGateway:
    def __init__(self, services: Services, audit: AuditSpool):
        self.services = services
        self.config = services.config
        self.audit_spool = audit
        self.watcher = DecisionWatcher(services.approvals, services.store)
        self.holds = holds.HoldService(services.approvals, self.watcher, self.audit,
                                       public_url=PORTAL.of(self.config).public_url)
        self.policy = PolicyEngine(self.config)
        self.recorder = Recorder(self.config.gateway.recordings,
                                 keep_free_mib=self.config.gateway.recording_min_free_mib)
        self.limits = self.config.gateway.limits
        self.throttle = LoginThrottle(self.limits.auth_throttle)
        # Connections not logged in yet, oldest first (the oldest makes room for new ones).
        self.pending: dict[_Session, None] = {}
        self._revocations: asyncio.Task[None] | None = None
        self._server: asyncssh.SSHAcceptor | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.sessions: set[_Session] = set()
        self.upstreams = UpstreamPool()
        self.host_key: asyncssh.SSHKey | None = None
        self.port = 0

    # ---- lifecycle

    async def start(self) -> None:
        listen = self.config.gateway.listener("ssh")
        assert listen is not None
        self.host_key = load_host_key(host_key_path(self.config))
        loop = asyncio.get_running_loop()
        self.watcher.hear_local_decisions(loop)
        self.watcher.start()
        self._server = await asyncssh.create_server(
            lambda: _Session(self), listen.host, listen.port,
            server_host_keys=[self.host_key], process_factory=self._process,
            encoding=None, line_editor=False, keepalive_interval=KEEPALIVE,
            login_timeout=self.limits.login_timeout, agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False, sftp_factory=SFTPRelay, reuse_address=True,
            encryption_algs=CIPHERS)
        self.port = self._server.sockets[0].getsockname()[1]
        self._revocations = loop.create_task(self._end_revoked_sessions())
        log.info("ssh gateway on %s:%d (%d connections, host key %s)", listen.host,
                 self.port, len(self.config.connections_of("ssh")),
                 self.host_key.get_fingerprint("sha256"))

    async def stop(self) -> None:
        if self._revocations is not None:
            self._revocations.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for s in list(self.sessions):
            s.close("the gateway is stopping")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        self.upstreams.close()
        await self.watcher.stop()

    def admit(self, session: _Session) -> str | None:
        """Why a new connection must be refused (the caps shared with every gateway:
        ``gateway.limits``), or None; the oldest connection not logged in yet makes room."""
        if len(self.sessions) >= self.limits.max_connections:
            return "too many connections to the gateway"
        self.pending[session] = None
        if len(self.pending) > self.limits.max_pending_logins:
            oldest = next(iter(self.pending))
            oldest.close("keyturn: too many connections waiting to log in")
            self.pending.pop(oldest, None)
        return None

    def logged_in(self, session: _Session) -> str | None:
        """Why a logged-in session must end now (too many of its user's), or None."""
        self.pending.pop(session, None)
        mine = sum(1 for s in self.sessions if s.user == session.user and
                   s.identity is not None and s is not session and not s.closed)
        if mine >= self.limits.max_connections_per_user:
            return (f"too many sessions for user {session.user} "
                    f"({self.limits.max_connections_per_user})")
        return None

    async def _end_revoked_sessions(self) -> None:
        """Every ``revocation_check`` seconds, end the sessions whose access token was
        revoked, whose key was removed, or whose user left the config, saying why."""
        ids = self.services.identities
        while True:
            await asyncio.sleep(self.limits.revocation_check)
            live = [s for s in self.sessions if s.identity is not None and not s.closed]
            if not live:
                continue
            try:
                by_token = {s.identity.token_id: s for s in live
                            if s.identity is not None and s.identity.token_id is not None}
                gone = await asyncio.to_thread(ids.revoked, by_token) if by_token else {}
                keys = {s.user: await asyncio.to_thread(ids.keys_of, s.user)
                        for s in live if s.key_line is not None}
            except StoreUnavailable as exc:
                log.error("ssh: checking for revoked logins failed: %s", exc)
                continue
            for s in live:
                tid = s.identity.token_id if s.identity is not None else None
                if tid is not None and tid in gone:
                    why = f"your access token {gone[tid]}"
                elif s.key_line is not None and s.key_line not in [
                        " ".join(k.split()[:2]) for k in keys.get(s.user, [])]:
                    why = "your SSH key was removed"
                elif s.user not in self.config.users:
                    why = f"user {s.user} is no longer configured"
                else:
                    continue
                self.audit(kind="session_ended", user=s.user, connection=s._conn_name,
                           session_id=s.session_id, client_addr=s.client_addr,
                           reason=why, outcome="terminated")
                s.close(f"keyturn: session ended: {why}")

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def audit(self, **rec: Any) -> None:
        rec.setdefault("protocol", PROTOCOL)
        self.audit_spool.record(**rec)

    async def _process(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        session = process.get_extra_info("connection").get_owner()
        assert isinstance(session, _Session)
        if len(session.processes) >= MAX_CHANNELS and session.identity is not None:
            why = (f"too many channels open on this connection ({MAX_CHANNELS}); wait "
                   "for one to end or open another connection")
            self.audit(kind="statement", user=session.user, connection=session._conn_name,
                       session_id=session.session_id, client_addr=session.client_addr,
                       statement=process.command if process.command is not None else
                       f"subsystem {process.subsystem}" if process.subsystem else
                       "(interactive shell)", classification="unknown", action="block",
                       rule="builtin:channels", reason=why, outcome="refused")
            _refuse(process, f"keyturn: {why}", REFUSED_STATUS)
            return
        session.processes.add(process)
        try:
            await session.serve(process)
        except Exception:
            log.exception("ssh: the channel of %s failed", session.user)
            _refuse(process, "keyturn: internal error; the command was not run",
                    UNREACHABLE_STATUS)
        finally:
            session.processes.discard(process)


def _refuse(process: asyncssh.SSHServerProcess[bytes], message: str, status: int) -> None:
    try:
        process.stderr.write(message.encode() + b"\r\n" if process.get_terminal_type()
                             else message.encode() + b"\n")
        process.exit(status)
    except (OSError, asyncssh.Error, BrokenPipeError):
        pass


class _Session(asyncssh.SSHServer):
    """One client connection: who logged in, to which connection, and its channels."""

    def __init__(self, gw: SSHGateway):
        self.gw = gw
        self.conn: asyncssh.SSHServerConnection | None = None
        self.session_id = "ssh-" + secrets.token_hex(8)
        self.user = ""
        self.connection: Connection | None = None
        self.identity: Identity | None = None
        self.client_addr = ""
        self.closed = False
        self.channels = 0
        self.held: set[int] = set()
        self.key_line: str | None = None  # "algorithm base64" of the key that logged in
        self.processes: set[asyncssh.SSHServerProcess[bytes]] = set()  # channels served
        self.refused_keys = 0  # public keys offered that are not the user's

    # ---- asyncssh callbacks

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("", 0)
        self.client_addr = str(peer[0])
        refused = self.gw.admit(self)
        self.gw.sessions.add(self)
        if refused is not None:
            log.warning("ssh: connection from %s refused: %s", self.client_addr, refused)
            conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, f"keyturn: {refused}")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.identity is None and self.refused_keys:
            # It never logged in (keys refused, or it gave up): one record per connection.
            why = f"{self.refused_keys} public key(s) offered, none registered for this user"
            if self.connection is None and self.user:
                why = f"unknown connection {self._wanted or ''!r}; {why}"
            self.gw.audit(kind="auth_failed", user=self.user or None,
                          connection=self._wanted if hasattr(self, "_wanted") else None,
                          client_addr=self.client_addr, outcome="refused", reason=why,
                          detail={"method": "publickey"})
            self.gw.throttle.failed(self.user, self.client_addr)
        self.closed = True
        self.gw.sessions.discard(self)
        self.gw.pending.pop(self, None)
        for ticket_id in list(self.held):
            self.gw.spawn(asyncio.to_thread(
                self.gw.holds.cancel, ticket_id, self.user or "client",
                "the client disconnected while the command was held"))
        if self.identity is not None:
            self.gw.audit(kind="disconnect", user=self.user, connection=self._conn_name,
                          session_id=self.session_id, client_addr=self.client_addr,
                          detail={"channels": self.channels})

    def close(self, why: str) -> None:
        """End the connection, telling every open channel why on its stderr (clients
        print a disconnect's reason only at their default log level or above)."""
        for p in list(self.processes):
            try:
                p.stderr.write(f"\r\n{why}\r\n".encode() if p.get_terminal_type()
                               else f"{why}\n".encode())
            except (OSError, asyncssh.Error):
                pass
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, why)

    @property
    def _conn_name(self) -> str | None:
        return self.connection.name if self.connection else None

    def begin_auth(self, username: str) -> bool:
        user, conn_name = split_username(username)
        self.user = user
        ssh_conns = self.gw.config.connections_of("ssh")
        if conn_name is None and len(ssh_conns) == 1:
            conn_name = ssh_conns[0].name
        conn = self.gw.config.connections.get(conn_name or "")
        self.connection = conn if conn is not None and conn.type == "ssh" else None
        self._wanted = conn_name
        self._trust_user_cas()
        return True

    def _trust_user_cas(self) -> None:
        """Certificates signed by the connection's user CAs for this user name (a
        principal equal to it) log in; asyncssh checks the signature, the validity
        period, the principal and source-address."""
        self.cas: list[str] = []
        if self.connection is None or self.conn is None or \
                self.user not in self.gw.config.users or not _USER_NAME.match(self.user):
            return
        for path in self.connection.option("user_ca", ()):
            try:
                self.cas += ca_lines(path)
            except (OSError, ValueError) as exc:
                log.error("ssh: user CA file %s unusable (%s): certificate logins refused",
                          path, exc)
                self.cas = []
                return
        if self.cas:
            lines = [f'cert-authority,principals="{self.user}",'
                     f'environment="KEYTURN_CA={i}" {ca}' for i, ca in enumerate(self.cas)]
            self.conn.set_authorized_keys(asyncssh.import_authorized_keys("\n".join(lines)))

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if self.connection is None or self.user not in self.gw.config.users:
            self.refused_keys += 1
            return False
        offered = key.export_public_key("openssh").decode().split()[:2]
        try:
            lines = await asyncio.to_thread(self.gw.services.identities.keys_of, self.user)
        except StoreUnavailable as exc:
            log.error("ssh login of %s: the store is unavailable (%s)", self.user, exc)
            return False
        if not any(line.split()[:2] == offered for line in lines):
            self.refused_keys += 1
            return False
        # asyncssh asks this twice (the probe and the signed attempt): count the second.
        self._key_fingerprint = key_fingerprint(key.public_data)
        self.key_line = " ".join(offered)
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        if self.connection is None:
            await self._failed("unknown connection " + repr(self._wanted or ""))
            return False
        try:
            ident = await asyncio.to_thread(self.gw.services.identities.authenticate_token,
                                            password)
        except Unauthorized as exc:
            await self._failed(exc.message)
            return False
        except StoreUnavailable as exc:
            log.error("ssh login of %s: the store is unavailable (%s)", self.user, exc)
            return False
        if ident.user != self.user:
            await self._failed("the token belongs to another user")
            return False
        wait = self.gw.throttle.success_wait(self.client_addr)
        if wait:
            await asyncio.sleep(wait)
        self.identity = ident
        return True

    async def _failed(self, why: str) -> None:
        verdict = self.gw.throttle.failed(self.user, self.client_addr)
        self.gw.audit(kind="auth_failed", user=self.user, connection=self._wanted,
                      client_addr=self.client_addr, outcome="refused", reason=why,
                      detail=verdict.detail())
        if verdict.wait:
            await asyncio.sleep(verdict.wait)

    def auth_completed(self) -> None:
        assert self.connection is not None
        assert self.conn is not None
        env: dict[str, str] = self.conn.get_key_option("environment") or {}  # type: ignore[assignment]
        ca = env.get("KEYTURN_CA") if self.conn.get_key_option("cert-authority", False) \
            else None
        if ca is not None:  # by a certificate one of the connection's CAs signed
            if self.conn.get_certificate_option("force-command") is not None:
                self.gw.audit(kind="auth_failed", user=self.user,
                              connection=self.connection.name,
                              client_addr=self.client_addr, outcome="refused",
                              reason="certificates with force-command are not accepted")
                self.close("keyturn: certificates with a forced command are not accepted; "
                           "the gateway decides per command")
                return
            self.identity = self.gw.services.identities.identity_of(self.user)
            blob = base64.b64decode(self.cas[int(ca)].split()[1])
            self._key_fingerprint = "CA " + key_fingerprint(blob)
            method = "certificate"
        elif self.identity is None:  # by key (validate_public_key found it registered)
            try:
                self.identity = self.gw.services.identities.identity_of(self.user)
            except Unauthorized as exc:
                self.close(f"keyturn: login refused ({exc})")
                return
            # The store write (last used, and the key still registered) off the loop.
            self.gw.spawn(self._key_used(getattr(self, "_key_fingerprint", "")))
            method = "publickey"
        else:
            method = "token"
            self.key_line = None
        over = self.gw.logged_in(self)
        if over is not None:
            self.gw.audit(kind="auth_failed", user=self.user, connection=self.connection.name,
                          client_addr=self.client_addr, outcome="refused", reason=over)
            self.identity = None
            self.close(f"keyturn: {over}")
            return
        self.gw.audit(kind="connect", user=self.user, connection=self.connection.name,
                      session_id=self.session_id, client_addr=self.client_addr,
                      detail={"auth": method, "target": target_of(self.connection).address,
                              **({"key": getattr(self, "_key_fingerprint", "")}
                                 if method in ("publickey", "certificate") else {})})

    async def _key_used(self, fingerprint: str) -> None:
        try:
            await asyncio.to_thread(self.gw.services.identities.key_used, self.user,
                                    fingerprint)
        except Unauthorized as exc:  # removed between the check and now
            self.close(f"keyturn: login refused ({exc})")
        except StoreUnavailable as exc:
            log.warning("ssh: could not note the use of %s's key %s: %s", self.user,
                        fingerprint, exc)

    # Forwarding of every kind is refused (asyncssh's defaults refuse them too; saying so
    # here keeps it so whatever the defaults become).
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> bool:
        self._refused_forward(f"direct-tcpip to {dest_host}:{dest_port}")
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self._refused_forward(f"remote forwarding of {listen_host}:{listen_port}")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self._refused_forward(f"forwarding to {dest_path}")
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self._refused_forward(f"remote forwarding of {listen_path}")
        return False

    def tun_requested(self, unit: int | None) -> bool:
        self._refused_forward("a tunnel device")
        return False

    def tap_requested(self, unit: int | None) -> bool:
        self._refused_forward("a tap device")
        return False

    def _refused_forward(self, what: str) -> None:
        self.gw.audit(kind="statement", user=self.user, connection=self._conn_name,
                      session_id=self.session_id, client_addr=self.client_addr,
                      statement=what, classification="forward", action="block",
                      rule="builtin:forwarding", reason="forwarding is refused",
                      outcome="blocked")

    # ---- one channel

    async def serve(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        if self.identity is None or self.connection is None:
            _refuse(process, "keyturn: not logged in", UNREACHABLE_STATUS)
            return
        self.channels += 1
        n = self.channels  # before any wait: channels of one connection run concurrently
        conn = self.connection
        if process.subsystem:
            self.gw.audit(kind="statement", user=self.user, connection=conn.name,
                          session_id=self.session_id, client_addr=self.client_addr,
                          statement=f"subsystem {process.subsystem}",
                          classification="unknown", action="block",
                          rule="builtin:subsystem", outcome="blocked",
                          reason="subsystems are not served yet")
            _refuse(process, f"keyturn: the {process.subsystem} subsystem is not served "
                    "through this gateway yet; use ssh with a command", REFUSED_STATUS)
            return
        command = process.command
        if command is None:
            action = ShellAction("(interactive shell)", "shell",
                                 ("an interactive shell runs whatever is typed",),
                                 ("*",), ("*",))
        else:
            # Off the event loop: a long line takes bashlex a while (and is refused over
            # shell.MAX_TEXT). Pagers take commands only with a terminal.
            action = await asyncio.to_thread(
                classify, command, terminal=process.get_terminal_type() is not None)
        req = Request(user=self.user, groups=self.identity.groups, connection=conn,
                      actions=[action], client_addr=self.client_addr,
                      session_id=self.session_id)
        decision = self.gw.policy.evaluate(req)
        shown = action.text
        common = dict(user=self.user, connection=conn.name, session_id=self.session_id,
                      client_addr=self.client_addr, statement=shown,
                      classification=decision.classification)
        detail = {"programs": list(action.programs), "paths": list(action.paths),
                  "pty": process.get_terminal_type() is not None}
        ticket_id = None
        if decision.action == "block":
            self.gw.audit(kind="statement", action="block", rule=decision.rule,
                          reason=decision.reason, outcome="blocked", detail=detail, **common)
            _refuse(process, f"keyturn: blocked by rule {decision.rule}: {decision.reason}",
                    REFUSED_STATUS)
            return
        if decision.action == "review":
            outcome = await self.hold_action(
                action, req, decision,
                lambda text: process.stderr.write(f"keyturn: {text}\n".encode()),
                process=process)
            ticket_id = outcome.ticket_id
            if not outcome.run:
                self.gw.audit(kind="statement", action="review", rule=decision.rule,
                              reason=outcome.message, ticket_id=ticket_id,
                              outcome=outcome.status, detail=detail, **common)
                _refuse(process, f"keyturn: {outcome.message}", REFUSED_STATUS)
                return
            try:
                process.stderr.write(f"keyturn: {outcome.message}\n".encode())
            except (OSError, asyncssh.Error):
                # Approved as the client closed the channel: nobody is there to run it for.
                self.gw.audit(kind="statement", action="review", rule=decision.rule,
                              reason="the client closed the channel as it was approved",
                              ticket_id=ticket_id, outcome="gone", detail=detail, **common)
                return
        # Write-ahead: the intent reaches the spool file before the target is asked.
        self.gw.audit(kind="intent", n=n, action=decision.action, rule=decision.rule,
                      reason=decision.reason, ticket_id=ticket_id, detail=detail, **common)
        try:
            self.gw.audit_spool.flush_ahead()
        except AuditUnwritable as exc:
            self.gw.audit(kind="statement", n=n, action=decision.action, rule=decision.rule,
                          reason=str(exc), ticket_id=ticket_id, outcome="refused",
                          detail=detail, **common)
            _refuse(process, str(exc), REFUSED_STATUS)
            return
        started = time.monotonic()
        result = await self._run(process, conn, command, n)
        self.gw.audit(kind="statement", n=n, action=decision.action, rule=decision.rule,
                      reason=result.get("error") or decision.reason, ticket_id=ticket_id,
                      outcome=result["outcome"],
                      duration_ms=round((time.monotonic() - started) * 1000, 3),
                      detail={**detail, **{k: v for k, v in result.items()
                                           if k not in ("outcome", "error")}}, **common)

    def _sealed(self, ref: Any, conn: Connection, n: int) -> None:
        """A channel's recording is closed: its digest enters the audit chain."""
        self.gw.audit(kind="recording", user=self.user, connection=conn.name,
                      session_id=self.session_id, client_addr=self.client_addr,
                      outcome="ok" if ref.incomplete is None else "error",
                      detail={**ref.to_json(), "name": Path(ref.path).name, "channel": n})

    async def hold_action(self, action: Any, req: Request, decision: Any,
                          say: Callable[[str], None], *,
                          process: asyncssh.SSHServerProcess[bytes] | None = None,
                          channel: Any = None, eof_ends: bool = False) -> holds.Outcome:
        """Hold one action (an exec command, an SFTP operation) until it is decided;
        ``say`` tells the client (its stderr). Hanging up cancels the ticket, and so do
        the client closing the action's channel (``channel``, or ``process``'s: with a
        shared connection, ssh's ControlMaster, ending a client closes only its channel)
        and Ctrl-C typed in ``process``'s terminal. ``eof_ends``: the end of the client's
        input ends the session too (sftp-server exits at the end of its input).

        The approval is bound to the user, the connection, the text and whether the
        command has a terminal (with one, programs page their output in less, which runs
        shell commands: a defer-mode approval given without one is not claimed with
        one)."""
        conn = req.connection
        review = decision.review
        target = target_of(conn)
        pty = process is not None and process.get_terminal_type() is not None
        binding = binding_of(self.user, conn.name, action.text,
                             {"pty": True} if pty else None)
        ticket = TicketRequest(
            requester=self.user, requester_groups=req.groups, connection=conn.name,
            statement=action.text, classification=decision.classification,
            rule=decision.rule or "", reason=decision.reason,
            approver_groups=review.approvers, min_approvals=review.min_approvals,
            timeout=review.timeout, mode=review.mode,
            escalate_after=review.escalation_delay(), escalate_to=review.escalate_to,
            client_addr=self.client_addr, session_id=self.session_id, protocol=PROTOCOL,
            gateway_id=self.gw.config.gateway.gateway_id, language="shell",
            facts=(("target", target.address),
                   ("programs", ", ".join(action.programs) or "—"),
                   ("paths", ", ".join(action.paths) or "—"),
                   ("parsed", " ; ".join(getattr(action, "commands", ())) or "—")),
            detail={"programs": list(action.programs), "paths": list(action.paths),
                    "reasons": list(action.reasons), "pty": pty},
            binding=binding)
        mine: list[int] = []
        gone: list[str] = []  # why the client gave up, once it has

        def on_held(held: holds.Held) -> None:
            if held.mode != "defer":
                say(held.message)

        def on_wait(ticket_id: int | None) -> None:
            if ticket_id is not None:
                mine.append(ticket_id)
                self.held.add(ticket_id)
                if gone:  # the channel closed while the ticket was being made
                    self.gw.spawn(asyncio.to_thread(self.gw.holds.cancel, ticket_id,
                                                    self.user, gone[0]))
            else:
                for t in mine:
                    self.held.discard(t)

        if channel is None and process is not None:
            channel = process.channel
        watch = self.gw.spawn(self._watch_cancel(process, channel, mine, gone, eof_ends))
        try:
            return await self.gw.holds.hold(
                ticket, binding=binding, noun="command" if process is not None
                else "operation", on_held=on_held, on_wait=on_wait,
                is_gone=lambda: self.closed or bool(gone) or watch.done())
        finally:
            watch.cancel()

    async def _watch_cancel(self, process: asyncssh.SSHServerProcess[bytes] | None,
                            channel: Any, mine: list[int], gone: list[str],
                            eof_ends: bool = False) -> None:
        """While an action is held: its channel closing, or Ctrl-C typed in its terminal,
        cancels its ticket; other keys typed in the terminal meanwhile are discarded (the
        approved command starts with what is typed after it starts). Without a terminal
        stdin is not read here: it waits for the command."""
        waits: list[asyncio.Future[Any]] = []
        if channel is not None:
            waits.append(asyncio.ensure_future(_channel_gone(channel, eof_ends)))
        if process is not None and process.get_terminal_type() is not None:
            waits.append(asyncio.ensure_future(self._ctrl_c(process)))
        if not waits:
            await asyncio.Event().wait()  # only a hang-up (connection_lost) cancels
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        typed = any(not w.cancelled() and w.exception() is None and w.result() is True
                    for w in done)
        gone.append("cancelled with Ctrl-C while held" if typed else
                    "the client closed the channel while it was held")
        for ticket_id in list(mine):
            await asyncio.to_thread(self.gw.holds.cancel, ticket_id, self.user, gone[0])

    @staticmethod
    async def _ctrl_c(process: asyncssh.SSHServerProcess[bytes]) -> bool:
        """True once Ctrl-C is typed in the terminal (never after the end of input)."""
        while True:
            try:
                data = await process.stdin.read(1)
            except asyncssh.TerminalSizeChanged:
                continue
            except (asyncssh.BreakReceived, asyncssh.SignalReceived):
                continue
            if not data:
                await asyncio.Event().wait()
            if data == b"\x03":
                return True

    # ---- running it on the target

    async def _run(self, process: asyncssh.SSHServerProcess[bytes], conn: Connection,
                   command: str | None, n: int) -> dict[str, Any]:
        target = target_of(conn)
        term = process.get_terminal_type()
        width, height = process.get_terminal_size()[:2] if term else (80, 24)
        pool = self.gw.upstreams
        try:
            first = await pool.acquire(target, owner=self.user)
        except (OSError, asyncssh.Error, ValueError) as exc:
            why = _connect_error(target, exc)
            _refuse(process, f"keyturn: {why}", UNREACHABLE_STATUS)
            return {"outcome": "error", "error": why}
        upstream: asyncssh.SSHClientConnection | None = first
        shown = clamp_size(width or 80, height or 24)  # what is emulated and recorded
        try:
            recording = self.gw.recorder.open(
                f"{self.session_id}-{n}", "asciicast", width=shown[0], height=shown[1],
                title=f"{self.user}@{conn.name}: "
                      f"{command if command is not None else 'shell'}",
                command=command, env={"TERM": term or ""})
        except RecordingFull as exc:
            pool.release(target, first, owner=self.user)
            why = f"{exc}; sessions are not started unrecorded"
            log.error("ssh: %s", why)
            _refuse(process, f"keyturn: {why}", UNREACHABLE_STATUS)
            return {"outcome": "error", "error": why}
        except BaseException:
            pool.release(target, first, owner=self.user)
            raise
        stats = {"bytes_in": 0, "bytes_out": 0}
        typed = TypedLines(width or 80, height or 24) if term else None
        try:
            assert upstream is not None
            try:
                remote = await upstream.create_process(
                    command, term_type=term, term_size=(width, height) if term else None,
                    encoding=None)
            except (OSError, asyncssh.Error):
                # A pooled connection the target closed meanwhile: once more, on a new one.
                pool.release(target, upstream, broken=True, owner=self.user)
                upstream = None
                upstream = await pool.acquire(target, fresh=True, owner=self.user)
                remote = await upstream.create_process(
                    command, term_type=term, term_size=(width, height) if term else None,
                    encoding=None)
            status = await self._pump(process, remote, recording, stats, typed)
        except (OSError, asyncssh.Error, ValueError) as exc:
            ref = recording.close()
            self._sealed(ref, conn, n)
            why = f"the connection to {target.address} failed: {exc}"
            if isinstance(exc, ClientGone):
                why = str(exc)
            elif isinstance(exc, RecordingFull):
                why = f"{exc}; the session was ended so that nothing runs unrecorded"
                log.error("ssh: %s", why)
            elif isinstance(exc, asyncssh.HostKeyNotVerifiable | asyncssh.PermissionDenied):
                why = _connect_error(target, exc)
            _refuse(process, f"keyturn: {why}", UNREACHABLE_STATUS)
            return {"outcome": "error", "error": why, **stats}
        finally:
            if upstream is not None:
                pool.release(target, upstream, owner=self.user)
        ref = recording.close()
        self._sealed(ref, conn, n)
        exit_status, signal = status
        lines = {"lines": typed.lines} if typed is not None else {}
        if signal:
            process.exit_with_signal(signal[0], signal[1], signal[2], signal[3])
        else:
            process.exit(exit_status if exit_status is not None else UNREACHABLE_STATUS)
        return {"outcome": "ok" if exit_status == 0 else "error", "exit_status": exit_status,
                "signal": signal[0] if signal else None, "recording": ref.path, **stats,
                **lines}

    async def _pump(self, process: asyncssh.SSHServerProcess[bytes],
                    remote: asyncssh.SSHClientProcess[bytes], rec: Recording,
                    stats: dict[str, int], typed: TypedLines | None
                    ) -> tuple[int | None, Any]:
        """Move bytes both ways until the target's command ends; record them."""

        every = self.gw.config.gateway.recording_keyframes
        size = list(process.get_terminal_size()[:2]) if typed is not None else [80, 24]
        since = {"t": 0.0, "bytes": 0}

        def keyframe(n: int) -> None:
            """A keyframe every ``every`` seconds or MiB of output (see Recording)."""
            since["bytes"] += n
            now = rec.elapsed()
            if now - since["t"] >= every or since["bytes"] >= KEYFRAME_BYTES:
                cols, rows = clamp_size(size[0] or 80, size[1] or 24)
                rec.keyframe(cols, rows, typed.snapshot() if typed is not None else None)
                since.update(t=now, bytes=0)

        async def client_to_target() -> None:
            while True:
                try:
                    data = await process.stdin.read(CHUNK)
                except asyncssh.TerminalSizeChanged as exc:
                    remote.change_terminal_size(exc.width, exc.height)
                    rec.resize(*clamp_size(exc.width, exc.height))
                    size[:] = [exc.width, exc.height]
                    if typed is not None:
                        typed.resize(exc.width, exc.height)
                    continue
                except asyncssh.BreakReceived:
                    continue
                except asyncssh.SignalReceived as exc:
                    remote.send_signal(exc.signal)
                    continue
                if not data:
                    remote.stdin.write_eof()
                    return
                stats["bytes_in"] += len(data)
                rec.write("i", data)
                if typed is not None:
                    for line in typed.input(data):
                        rec.marker(line)
                remote.stdin.write(data)
                await remote.stdin.drain()

        async def target_to_client(src: Any, dst: Any) -> None:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    return
                stats["bytes_out"] += len(data)
                keyframe(len(data))  # the screen before this output, which starts here
                if typed is not None:
                    typed.output(data)
                rec.write("o", data)
                dst.write(data)
                await dst.drain()

        async def finish() -> None:
            await asyncio.gather(*outs)
            await remote.wait_closed()

        inbound = asyncio.ensure_future(client_to_target())
        outs = [asyncio.ensure_future(target_to_client(remote.stdout, process.stdout)),
                asyncio.ensure_future(target_to_client(remote.stderr, process.stderr))]
        finished = asyncio.ensure_future(finish())
        hung_up = asyncio.ensure_future(process.channel.wait_closed())
        try:
            done, _ = await asyncio.wait([finished, hung_up],
                                         return_when=asyncio.FIRST_COMPLETED)
            if finished not in done:
                raise ClientGone("the client went away while the command ran")
            finished.result()
        finally:
            for t in (finished, hung_up, inbound, *outs):
                t.cancel()
            # The client went away (or the relay failed): the command's channel closes,
            # as sshd closes a session's pipes (and hangs up its terminal) when its client
            # goes; a pooled login must not keep it running.
            remote.close()
        return remote.exit_status, remote.exit_signal


async def _channel_gone(channel: Any, eof_ends: bool) -> None:
    """Returns once the client closed ``channel`` (or, with ``eof_ends``, ended its input).
    asyncssh says when a channel closes, not when its input ends while the server is
    busy with a request, so that is looked at (its receive state) a few times a second."""
    closed = asyncio.ensure_future(channel.wait_closed())
    try:
        while not closed.done():
            if eof_ends and getattr(channel, "_recv_state", "open") != "open":
                return
            await asyncio.wait([closed], timeout=0.25)
    finally:
        closed.cancel()


class ClientGone(OSError):
    """The client closed the channel (or the connection) while its command ran."""


class PoolFull(OSError):
    """Every login to a target the pool may hold is busy (UpstreamPool.LOGINS), or the
    user already has their share of them (UpstreamPool.SHARE)."""


class UpstreamPool:
    """Logged-in connections to the targets, reused: a command (or an sftp session) opens
    a channel on one (a few ms) instead of logging in again (a key exchange and an
    authentication, over 100 ms). Every command runs as the connection's target user
    whoever asks, so sharing a connection shares nothing a new login would not. At most
    ``CHANNELS`` channels run on one connection at a time (below sshd's MaxSessions, 10)
    and at most ``LOGINS`` logins to one target are open or being made (sshd's MaxStartups
    and the host's patience are finite); one user (``owner``) holds at most ``SHARE`` of
    a target's channels, so one person's commands cannot take every login and starve
    everyone else. A command beyond waits up to ``WAIT`` seconds for a channel to free,
    then fails with a clear message. Connections unused for ``IDLE`` seconds are
    closed."""

    CHANNELS = 8
    LOGINS = 16
    SHARE = 32  # channels of one target one user may hold: a quarter of LOGINS x CHANNELS
    WAIT = 30.0
    IDLE = 60.0

    def __init__(self) -> None:
        self._pools: dict[SSHTarget, list[list[Any]]] = {}  # [conn, in use, last used]
        self._connecting: dict[SSHTarget, int] = {}
        self._owned: dict[tuple[SSHTarget, str], int] = {}  # channels held per user
        self._waiters: list[asyncio.Future[None]] = []
        self._reaper: asyncio.TimerHandle | None = None

    async def acquire(self, target: SSHTarget, *, fresh: bool = False,
                      owner: str | None = None) -> asyncssh.SSHClientConnection:
        deadline = time.monotonic() + self.WAIT
        while True:
            mine = self._owned.get((target, owner), 0) if owner is not None else 0
            left = deadline - time.monotonic()
            if mine >= self.SHARE:
                if left <= 0:
                    raise PoolFull(f"you already run {self.SHARE} commands on "
                                   f"{target.address} through the gateway; wait for one "
                                   "to end")
                await self._wait(left)
                continue
            entries = self._pools.setdefault(target, [])
            entries[:] = [e for e in entries if not e[0].is_closed()]
            if not fresh:
                for e in entries:
                    if e[1] < self.CHANNELS:
                        e[1] += 1
                        self._own(target, owner, 1)
                        return e[0]  # type: ignore[no-any-return]
            if len(entries) + self._connecting.get(target, 0) < self.LOGINS:
                break
            if left <= 0:
                raise PoolFull(f"{self.LOGINS * self.CHANNELS} commands already run on "
                               f"{target.address} through the gateway; try again later")
            await self._wait(left)
        self._connecting[target] = self._connecting.get(target, 0) + 1
        self._own(target, owner, 1)
        try:
            conn = await _connect(target)
        except BaseException:
            self._own(target, owner, -1)
            raise
        finally:
            self._connecting[target] -= 1
            self._wake()
        entries.append([conn, 1, time.monotonic()])
        self._schedule()
        return conn

    def _own(self, target: SSHTarget, owner: str | None, n: int) -> None:
        if owner is None:
            return
        key = (target, owner)
        count = self._owned.get(key, 0) + n
        if count > 0:
            self._owned[key] = count
        else:
            self._owned.pop(key, None)

    async def _wait(self, left: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, left)
        except TimeoutError:
            pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def release(self, target: SSHTarget, conn: asyncssh.SSHClientConnection, *,
                broken: bool = False, owner: str | None = None) -> None:
        self._own(target, owner, -1)
        for e in self._pools.get(target, []):
            if e[0] is conn:
                e[1] = max(0, e[1] - 1)
                e[2] = time.monotonic()
                if broken:
                    e[0].close()
                break
        self._wake()

    def _schedule(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(self.IDLE / 2, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = time.monotonic()
        for entries in self._pools.values():
            for e in list(entries):
                if e[0].is_closed() or (e[1] == 0 and now - e[2] > self.IDLE):
                    e[0].close()
                    entries.remove(e)
        if any(self._pools.values()):
            self._schedule()

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for entries in self._pools.values():
            for e in entries:
                e[0].close()
        self._pools.clear()


class _Upstream(asyncssh.SSHClient):
    """Verifies the target's host key against the configured fingerprints."""

    def __init__(self, fingerprints: tuple[str, ...]):
        self.fingerprints = fingerprints
        self.offered: str | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.offered = key.get_fingerprint("sha256")
        return self.offered in self.fingerprints


async def _connect(target: SSHTarget) -> asyncssh.SSHClientConnection:
    """A logged-in connection to the target, its host key verified."""
    keys = [asyncssh.import_private_key(target.key.resolve())] if target.key else []
    password = target.password.resolve() if target.password else None
    known: Any = target.known_hosts if target.known_hosts else ([], [], [])
    if target.known_hosts and target.host_keys:
        known = target.known_hosts  # both: known_hosts, and the fingerprints as a fallback
    conn, _ = await asyncio.wait_for(asyncssh.create_connection(
        lambda: _Upstream(target.host_keys), target.host, target.port,
        username=target.user, client_keys=keys or None, password=password,
        known_hosts=known, server_host_key_algs="default" if target.host_keys else (),
        agent_path=None, preferred_auth="publickey,password", config=None,
        keepalive_interval=KEEPALIVE, encryption_algs=CIPHERS), timeout=30)
    return conn


def _connect_error(target: SSHTarget, exc: BaseException) -> str:
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        want = ", ".join(target.host_keys) or f"the keys in {target.known_hosts}"
        return (f"the host key of {target.host}:{target.port} does not match the configured "
                f"one ({want}); the connection was refused")
    if isinstance(exc, asyncssh.PermissionDenied):
        return (f"the target {target.address} refused the gateway's credentials; ask an "
                "operator to check the connection's key or password")
    if isinstance(exc, PoolFull):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"the target {target.host}:{target.port} did not answer within 30 s"
    return f"cannot reach {target.host}:{target.port}: {exc}"


__all__ = ["REFUSED_STATUS", "SSHGateway", "split_username"]
