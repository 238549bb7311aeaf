"""The sftp subsystem through the gateway (sftp, and scp, which speaks SFTP since OpenSSH 9).

``SFTPRelay`` is asyncssh's SFTP server for the client and an SFTP client of the target:
each request is judged, then relayed. Operations and their classes:

- ``read``: opening a file for reading, listing a directory, stat, realpath, readlink;
- ``write``: opening a file for writing (create, truncate, append), mkdir, rename, links,
  setting times;
- ``admin``: setstat that changes permissions or owners;
- ``destructive``: remove, rmdir.

Each is judged by policy with its paths (``match: {paths: ["/etc/*"]}``) like an exec
command: allowed, blocked (the client gets "permission denied"; the reason goes to its
stderr) or held for approval (the request waits; "held for approval — ticket N" goes to
stderr, which OpenSSH's sftp and scp print). Opens, removes, renames, setstats, mkdirs,
rmdirs, links and directory listings are audited with their paths; a file's record is
completed when it is closed, with the bytes read and written. Stat-like lookups are judged
but only refusals are audited (a client makes thousands). A held operation is cancelled
when the client closes the channel or ends its input (sftp-server's end of a session).
Paths that are not UTF-8 are judged and shown with those bytes as ``\\xNN``; an unexpected
failure is refused with a generic message (never the exception's text). The session runs
on one of the gateway's pooled logins to the host (gateway.UpstreamPool), within the
host's cap of logins and the user's share of them.

A transfer keeps the pipeline full although asyncssh's server answers one request at a
time: sequential reads are issued ahead (READ_AHEAD blocks), and writes are answered
as soon as they are sent to the target (up to WRITES_IN_FLIGHT at once); a write the
target refuses fails the next write, fsync, fstat or the close, as a full disk does
with a local file's buffered writes.

It must not decide (keyturn.policy does) and must not touch the gateway's own files: every
path is the target's.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncssh
from asyncssh.constants import (
    FXF_APPEND,
    FXF_CREAT,
    FXF_TRUNC,
    FXF_WRITE,
)

from keyturn.auditspool import AuditUnwritable
from keyturn.request import Request
from proxies.ssh.shell import magic_link

if TYPE_CHECKING:
    from proxies.ssh.gateway import _Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTPAction:
    """One SFTP operation as policy sees it (keyturn.request.Action)."""

    text: str
    cls: str
    reasons: tuple[str, ...]
    programs: tuple[str, ...]
    paths: tuple[str, ...]
    forbidden: str | None = None


#: Reads of a file issued ahead of the client's (sequential transfers), and writes sent on
#: without waiting for the target's answer: asyncssh's SFTP server answers one request at a
#: time, so without them each block would wait a round trip to the target.
READ_AHEAD = 16
WRITES_IN_FLIGHT = 32


@dataclass
class _Open:
    file: Any  # asyncssh.SFTPClientFile
    path: str
    n: int
    common: dict[str, Any]
    started: float
    bytes_read: int = 0
    bytes_written: int = 0
    ahead: dict[tuple[int, int], asyncio.Task[bytes]] = field(default_factory=dict)
    writes: deque[asyncio.Task[None]] = field(default_factory=deque)
    error: str | None = None

    async def settle(self) -> None:
        """Wait for the writes in flight; the first failure fails what comes next."""
        while self.writes:
            task = self.writes.popleft()
            try:
                await task
            except asyncssh.SFTPError as exc:
                self.error = self.error or exc.reason
            except (OSError, asyncssh.Error) as exc:
                self.error = self.error or str(exc)
        if self.error is not None:
            raise asyncssh.SFTPFailure(self.error)

    def forget_reads(self) -> None:
        for task in self.ahead.values():
            task.cancel()
        self.ahead.clear()


def _path(raw: bytes) -> str:
    """A path as rules see it: absolute, or under ``~`` (the login's home) when relative;
    bytes that are not UTF-8 as ``\\xNN``; ``*`` (anywhere) with a ``..`` in it, which
    the host resolves through symbolic links, or through a /proc magic link
    (``/proc/self/root/...``, ``/proc/<pid>/cwd``, ``/dev/fd/N``)."""
    # Bytes that are not UTF-8 are shown escaped (``\\xff``): tickets, audit records and
    # the store hold text.
    p = raw.decode("utf-8", "backslashreplace")
    if ".." in p.split("/"):
        return "*"
    if p.startswith("/"):
        p = "/" + posixpath.normpath(p).lstrip("/")
        # /proc/self/root/etc/passwd is /etc/passwd: a magic link may lead anywhere.
        return "*" if magic_link(p) else p
    return posixpath.normpath(posixpath.join("~", p)) if p not in ("", ".") else "~"


class SFTPRelay(asyncssh.SFTPServer):
    def __init__(self, chan: asyncssh.SSHServerChannel[bytes]):
        super().__init__(chan)
        owner = chan.get_connection().get_owner()
        self.session: _Session = owner  # type: ignore[assignment]
        self._chan = chan
        self._conn: asyncssh.SSHClientConnection | None = None
        self._client: asyncssh.SFTPClient | None = None
        self._lock = asyncio.Lock()
        self._pooled: Any = None  # the target whose pooled login self._conn is

    # ---- the target

    async def _target(self) -> asyncssh.SFTPClient:
        async with self._lock:
            if self._client is None:
                from proxies.ssh.gateway import _connect_error
                from proxies.ssh.register import target_of

                assert self.session.connection is not None
                target = target_of(self.session.connection)
                # On the gateway's pooled logins to the host, like commands: an sftp session
                # is a channel on one, within the host's cap of logins and the user's share.
                pool, user = self.session.gw.upstreams, self.session.user
                try:
                    conn = await pool.acquire(target, owner=user)
                    try:
                        client = await conn.start_sftp_client()
                    except (OSError, asyncssh.Error):
                        # A pooled login the target closed meanwhile: once more, anew.
                        pool.release(target, conn, broken=True, owner=user)
                        conn = await pool.acquire(target, fresh=True, owner=user)
                        try:
                            client = await conn.start_sftp_client()
                        except BaseException:
                            pool.release(target, conn, owner=user)
                            raise
                    self._conn, self._client, self._pooled = conn, client, target
                except (OSError, asyncssh.Error, ValueError) as exc:
                    why = _connect_error(target, exc)
                    self._say(why)
                    raise asyncssh.SFTPConnectionLost(why) from exc
            return self._client

    def _say(self, text: str) -> None:
        try:
            self._chan.write_stderr(f"keyturn: {text}\n".encode())
        except (OSError, asyncssh.Error):
            pass

    # ---- judging

    async def _judge(self, op: str, cls: str, paths: tuple[str, ...], *,
                     audited: bool = True) -> tuple[int, dict[str, Any]] | None:
        """Decide one operation; raise SFTPPermissionDenied when it must not run. Returns
        (n, common fields) of its intent record when it is audited. An unexpected failure
        refuses the operation with a generic message (asyncssh would send the client the
        exception's text: the gateway's SQL, its parameters)."""
        try:
            return await self._decide(op, cls, paths, audited=audited)
        except (asyncssh.SFTPError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("ssh: judging sftp %s for %s failed", op, self.session.user)
            self._say("internal error; the operation was not run")
            raise asyncssh.SFTPFailure("keyturn: internal error; the operation was not "
                                       "run") from exc

    async def _decide(self, op: str, cls: str, paths: tuple[str, ...], *,
                      audited: bool) -> tuple[int, dict[str, Any]] | None:
        s = self.session
        conn = s.connection
        assert conn is not None and s.identity is not None
        text = f"sftp {op} " + " ".join(paths)
        action = SFTPAction(text, cls, (f"sftp {op}",), ("sftp",), paths)
        req = Request(user=s.user, groups=s.identity.groups, connection=conn,
                      actions=[action], client_addr=s.client_addr, session_id=s.session_id)
        decision = s.gw.policy.evaluate(req)
        common = dict(user=s.user, connection=conn.name, session_id=s.session_id,
                      client_addr=s.client_addr, statement=text, classification=cls)
        detail = {"op": op, "paths": list(paths), "subsystem": "sftp"}
        ticket_id = None
        if decision.action == "block":
            s.gw.audit(kind="statement", action="block", rule=decision.rule,
                       reason=decision.reason, outcome="blocked", detail=detail, **common)
            self._say(f"blocked by rule {decision.rule}: {decision.reason}")
            raise asyncssh.SFTPPermissionDenied(f"keyturn: blocked by rule {decision.rule}")
        if decision.action == "review":
            outcome = await s.hold_action(action, req, decision, self._say,
                                          channel=self._chan, eof_ends=True)
            ticket_id = outcome.ticket_id
            if not outcome.run:
                s.gw.audit(kind="statement", action="review", rule=decision.rule,
                           reason=outcome.message, ticket_id=ticket_id,
                           outcome=outcome.status, detail=detail, **common)
                self._say(outcome.message)
                raise asyncssh.SFTPPermissionDenied(f"keyturn: {outcome.message}")
            self._say(outcome.message)
        if not audited:
            return None
        s.channels += 1
        n = s.channels
        s.gw.audit(kind="intent", n=n, action=decision.action, rule=decision.rule,
                   reason=decision.reason, ticket_id=ticket_id, detail=detail, **common)
        try:
            s.gw.audit_spool.flush_ahead()
        except AuditUnwritable as exc:
            s.gw.audit(kind="statement", n=n, action=decision.action, rule=decision.rule,
                       reason=str(exc), outcome="refused", detail=detail, **common)
            self._say(str(exc))
            raise asyncssh.SFTPFailure(str(exc)) from exc
        return n, dict(common, action=decision.action, rule=decision.rule,
                       reason=decision.reason, ticket_id=ticket_id, detail=detail)

    def _done(self, judged: tuple[int, dict[str, Any]] | None, outcome: str,
              started: float, error: str | None = None, **extra: Any) -> None:
        if judged is None:
            return
        n, rec = judged
        rec = dict(rec)
        rec["detail"] = {**rec["detail"], **extra}
        if error:
            rec["reason"] = error
        self.session.gw.audit(kind="statement", n=n, outcome=outcome,
                              duration_ms=round((time.monotonic() - started) * 1000, 3),
                              **rec)

    async def _run(self, judged: tuple[int, dict[str, Any]] | None, coro: Any) -> Any:
        started = time.monotonic()
        try:
            result = await coro
        except asyncssh.SFTPError as exc:
            self._done(judged, "error", started, exc.reason)
            raise
        self._done(judged, "ok", started)
        return result

    # ---- files

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> _Open:
        p = _path(path)
        writes = bool(pflags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC))
        judged = await self._judge("open-write" if writes else "open-read",
                                   "write" if writes else "read", (p,))
        assert judged is not None
        client = await self._target()
        started = time.monotonic()
        try:
            f = await client.open(path, pflags, attrs, encoding=None)
        except asyncssh.SFTPError as exc:
            self._done(judged, "error", started, exc.reason)
            raise
        n, common = judged
        return _Open(f, p, n, common, started)

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        h = file_obj
        assert isinstance(h, _Open)
        if h.writes:
            await h.settle()  # a read sees the writes before it
        task = h.ahead.pop((offset, size), None)
        if task is None:
            h.forget_reads()  # not sequential: start again from here
            task = asyncio.ensure_future(h.file.read(size, offset))
        data: bytes = await task
        if len(data) == size:
            for j in range(1, READ_AHEAD + 1):
                key = (offset + j * size, size)
                if key not in h.ahead:
                    h.ahead[key] = asyncio.ensure_future(h.file.read(size, key[0]))
        h.bytes_read += len(data)
        return data

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        h = file_obj
        assert isinstance(h, _Open)
        if h.error is not None:
            raise asyncssh.SFTPFailure(h.error)
        if h.ahead:
            h.forget_reads()  # what was read ahead may be overwritten
        h.writes.append(asyncio.ensure_future(h.file.write(data, offset)))
        if len(h.writes) > WRITES_IN_FLIGHT:
            oldest = h.writes.popleft()
            try:
                await oldest
            except asyncssh.SFTPError as exc:
                h.error = exc.reason
                raise asyncssh.SFTPFailure(exc.reason) from exc
        h.bytes_written += len(data)
        return len(data)

    async def close(self, file_obj: object) -> None:
        h = file_obj
        assert isinstance(h, _Open)
        error = None
        h.forget_reads()
        try:
            await h.settle()
        except asyncssh.SFTPError as exc:
            error = exc.reason
        try:
            await h.file.close()
        except asyncssh.SFTPError as exc:
            error = error or exc.reason
        self._done((h.n, h.common), "error" if error else "ok", h.started, error,
                   bytes_read=h.bytes_read, bytes_written=h.bytes_written)

    async def fstat(self, file_obj: object) -> asyncssh.SFTPAttrs:
        assert isinstance(file_obj, _Open)
        await file_obj.settle()
        attrs: asyncssh.SFTPAttrs = await file_obj.file.stat()
        return attrs

    async def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        assert isinstance(file_obj, _Open)
        judged = await self._judge("setstat", _setstat_class(attrs), (file_obj.path,))
        await file_obj.settle()
        await self._run(judged, file_obj.file.setstat(attrs))

    async def fsync(self, file_obj: object) -> None:
        assert isinstance(file_obj, _Open)
        await file_obj.settle()
        await file_obj.file.fsync()

    # ---- names

    async def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        await self._judge("stat", "read", (_path(path),), audited=False)
        attrs: asyncssh.SFTPAttrs = await (await self._target()).stat(path)
        return attrs

    async def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        await self._judge("stat", "read", (_path(path),), audited=False)
        attrs: asyncssh.SFTPAttrs = await (await self._target()).lstat(path)
        return attrs

    async def realpath(self, path: bytes) -> bytes:
        await self._judge("realpath", "read", (_path(path),), audited=False)
        result: bytes = await (await self._target()).realpath(path)
        return result

    async def readlink(self, path: bytes) -> bytes:
        await self._judge("readlink", "read", (_path(path),), audited=False)
        result: bytes = await (await self._target()).readlink(path)
        return result

    async def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        await self._judge("statvfs", "read", (_path(path),), audited=False)
        result: asyncssh.SFTPVFSAttrs = await (await self._target()).statvfs(path)
        return result

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:  # type: ignore[override]
        judged = await self._judge("list", "read", (_path(path),))
        client = await self._target()
        started = time.monotonic()
        count = 0
        try:
            async for name in client.scandir(path):
                count += 1
                yield name
        except asyncssh.SFTPError as exc:
            self._done(judged, "error", started, exc.reason)
            raise
        self._done(judged, "ok", started, entries=count)

    async def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        judged = await self._judge("setstat", _setstat_class(attrs), (_path(path),))
        await self._run(judged, (await self._target()).setstat(path, attrs))

    async def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        judged = await self._judge("setstat", _setstat_class(attrs), (_path(path),))
        await self._run(judged, (await self._target()).setstat(path, attrs,
                                                               follow_symlinks=False))

    async def remove(self, path: bytes) -> None:
        judged = await self._judge("remove", "destructive", (_path(path),))
        await self._run(judged, (await self._target()).remove(path))

    async def rmdir(self, path: bytes) -> None:
        judged = await self._judge("rmdir", "destructive", (_path(path),))
        await self._run(judged, (await self._target()).rmdir(path))

    async def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        judged = await self._judge("mkdir", "write", (_path(path),))
        await self._run(judged, (await self._target()).mkdir(path, attrs))

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        judged = await self._judge("rename", "write", (_path(oldpath), _path(newpath)))
        await self._run(judged, (await self._target()).rename(oldpath, newpath))

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        judged = await self._judge("rename", "write", (_path(oldpath), _path(newpath)))
        await self._run(judged, (await self._target()).posix_rename(oldpath, newpath))

    async def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        judged = await self._judge("symlink", "write", (_path(oldpath), _path(newpath)))
        await self._run(judged, (await self._target()).symlink(oldpath, newpath))

    async def link(self, oldpath: bytes, newpath: bytes) -> None:
        judged = await self._judge("link", "write", (_path(oldpath), _path(newpath)))
        await self._run(judged, (await self._target()).link(oldpath, newpath))

    def exit(self) -> None:
        if self._client is not None:
            self._client.exit()
            self._client = None
        if self._conn is not None and self._pooled is not None:
            self.session.gw.upstreams.release(self._pooled, self._conn,
                                              owner=self.session.user)
        self._conn = self._pooled = None
        # Like sshd's sftp-server: an exit status, which scp waits for (without one it
        # reports a failure even though every file arrived).
        try:
            self._chan.exit(0)
        except (OSError, asyncssh.Error):
            pass


def _setstat_class(attrs: asyncssh.SFTPAttrs) -> str:
    changes_access = any(getattr(attrs, a, None) is not None
                         for a in ("permissions", "uid", "gid", "owner", "group"))
    return "admin" if changes_access else "write"


__all__ = ["SFTPRelay"]
