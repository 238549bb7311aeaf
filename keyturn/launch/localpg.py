"""Start and stop a throwaway PostgreSQL cluster for the demo, the test session and benchmarks.

A `LocalPostgres` owns one data directory under a caller-chosen base directory.  It runs
``initdb`` once, then ``pg_ctl start``/``stop`` as often as asked, listens on 127.0.0.1 plus a
private unix socket, and offers a few superuser helpers (roles, databases, raw SQL).

The cluster is tuned for speed, not safety (fsync, synchronous_commit and full_page_writes are
off), so this module must never be pointed at data anyone cares about, and it must not be used to
manage a production server.  It also must not hide failures: a cluster that does not come up
raises with the tail of its server log.

It lives in the launcher (the demo, the tests, the benchmarks and scripts/ use it): the
core and the edges must not import it.

Running as root
---------------
PostgreSQL refuses to run as root.  When the effective uid is 0, every server-side command
(initdb, pg_ctl) runs as the ``postgres`` system user (created with ``useradd --system`` when
missing), and the data directory, socket directory and log file are chowned to it.  So that user
can reach them, ``o+x`` (traverse only, never read) is added to every ancestor of ``base_dir`` it
could not otherwise enter -- e.g. pytest's 0700 ``/tmp/pytest-of-root``.  ``base_dir`` itself
stays owned by the caller.  Root can still read and write everything, including the unix socket.
"""

from __future__ import annotations

import atexit
import functools
import grp
import hashlib
import importlib.util
import math
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from keyturn import tlsutil

__all__ = ["LocalPostgres", "LocalPostgresError", "find_pg_bindir"]

HOST_AUTH_METHODS = ("trust", "md5", "scram-sha-256", "password")
PASSWORD_ENCRYPTIONS = ("md5", "scram-sha-256")
SERVICE_USER = "postgres"

# Linux's sun_path holds 108 bytes including the NUL; PostgreSQL refuses longer socket paths.
_MAX_SOCKET_PATH = 107
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_PORT_IN_USE_MARKERS = ("Address already in use", "could not create any TCP/IP sockets")
# Ports tried when the port was chosen by us and someone else grabbed it before the server bound.
_PORT_ATTEMPTS = 3


class LocalPostgresError(RuntimeError):
    """A throwaway cluster could not be found, initialised, started or stopped."""


@dataclass(frozen=True)
class _ServiceUser:
    uid: int
    gid: int
    name: str


def _is_bindir(path: Path) -> bool:
    return all(os.access(path / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres"))


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: sort numerically so 16 beats 9.6.
    parts = re.findall(r"\d+", path.parent.name)
    return tuple(int(p) for p in parts)


@functools.lru_cache(maxsize=1)
def find_pg_bindir() -> Path:
    """Locate the directory holding initdb, pg_ctl and postgres.

    Order: $KEYTURN_PG_BINDIR, ``pg_config --bindir``, the newest ``/usr/lib/postgresql/*/bin``,
    PATH, and finally the binaries bundled in the optional ``pgserver`` package if it is
    importable (it is not a dependency).
    """
    override = os.environ.get("KEYTURN_PG_BINDIR")
    if override:
        if not _is_bindir(Path(override)):
            raise LocalPostgresError(
                f"KEYTURN_PG_BINDIR={override} does not contain initdb, pg_ctl and postgres"
            )
        return Path(override)

    pg_config = shutil.which("pg_config")
    if pg_config:
        # Debian's pg_config comes with libpq-dev and may name a bindir whose server package is
        # not installed, hence the _is_bindir check rather than trusting it.
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        if out and _is_bindir(Path(out)):
            return Path(out)

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if _is_bindir(candidate):
            return candidate

    initdb = shutil.which("initdb")
    if initdb and _is_bindir(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent

    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        for found in sorted(Path(spec.origin).parent.glob("**/bin/initdb")):
            if _is_bindir(found.parent):
                return found.parent

    raise LocalPostgresError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found. Install them with "
        "`apt-get install postgresql` (the Makefile does this) or set KEYTURN_PG_BINDIR."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _service_user() -> _ServiceUser | None:
    """The user server processes must run as, or None when we may run them ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        # The Debian postgresql package creates this user; a bare image might not have it.
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             SERVICE_USER],
            check=True,
            capture_output=True,
            text=True,
        )
        entry = pwd.getpwnam(SERVICE_USER)
    return _ServiceUser(uid=entry.pw_uid, gid=entry.pw_gid, name=entry.pw_name)


def _can_traverse(st: os.stat_result, user: _ServiceUser, groups: set[int]) -> bool:
    # Mirror the kernel's owner > group > other precedence: only the first matching class counts.
    if st.st_uid == user.uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid in groups:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _make_traversable(path: Path, user: _ServiceUser) -> None:
    """Let `user` walk down to `path` by adding the execute bit where it is missing."""
    groups = {user.gid} | {g.gr_gid for g in grp.getgrall() if user.name in g.gr_mem}
    for directory in [path, *path.parents]:
        st = directory.stat()
        if _can_traverse(st, user, groups):
            continue
        if st.st_uid == user.uid:
            bit = 0o100
        elif st.st_gid in groups:
            bit = 0o010
        else:
            bit = 0o001
        os.chmod(directory, (st.st_mode & 0o7777) | bit)


def _quote_setting(value: str) -> str:
    # Every GUC accepts a single-quoted value; doubling quotes is the config-file escape.
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def _tail(path: Path, lines: int = 40, start: int = 0) -> str:
    if not path.exists():
        return f"(no log file at {path})"
    with path.open("rb") as fh:
        fh.seek(start)
        text = fh.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


class LocalPostgres:
    """One throwaway PostgreSQL cluster rooted at ``base_dir``.

    Layout: ``base_dir/data`` (PGDATA), ``base_dir/sock`` (unix socket dir; a short directory
    under /tmp instead when that path would be too long for a socket), ``base_dir/postgres.log``,
    and ``base_dir/superuser.password`` when ``auth`` is not ``trust``.  TCP clients use ``auth``;
    unix-socket clients are always trusted, which is what `execute` and friends rely on.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int | None = None,
        superuser: str = "postgres",
        auth: str = "trust",
        ssl: bool = False,
        settings: Mapping[str, str] | None = None,
        superuser_password: str | None = None,
    ) -> None:
        if auth not in HOST_AUTH_METHODS:
            raise ValueError(f"auth must be one of {HOST_AUTH_METHODS}, got {auth!r}")
        for name in settings or {}:
            if not _SETTING_NAME.match(name):
                raise ValueError(f"invalid setting name {name!r}")
        self.base_dir = Path(base_dir).absolute()
        self.host = "127.0.0.1"
        self._auto_port = port is None
        self.port: int = _free_port() if port is None else port
        self.superuser = superuser
        self.auth = auth
        self.ssl = ssl
        self.settings: dict[str, str] = dict(settings or {})
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "postgres.log"
        self._password_file = self.base_dir / "superuser.password"
        self.socket_dir = self._pick_socket_dir()
        self.ssl_cert_path = self.data_dir / "server.crt"
        self.ssl_key_path = self.data_dir / "server.key"
        self.superuser_password: str | None = None
        self._requested_password = superuser_password
        if auth != "trust":
            # A cluster re-opened from an existing base_dir keeps the password initdb stored.
            if self._password_file.exists():
                self.superuser_password = self._password_file.read_text().strip()
            else:
                self.superuser_password = superuser_password or secrets.token_urlsafe(18)
        # Wall-clock seconds of the last initdb / `pg_ctl start -w`; None until they ran.
        self.initdb_seconds: float | None = None
        self.startup_seconds: float | None = None
        self._user: _ServiceUser | None = None
        self._atexit_registered = False

    # ------------------------------------------------------------------ paths and processes

    def _pick_socket_dir(self) -> Path:
        preferred = self.base_dir / "sock"
        if len(str(preferred / ".s.PGSQL.65535")) <= _MAX_SOCKET_PATH:
            return preferred
        # Deterministic per base_dir, so reopening the same cluster finds the same socket.
        digest = hashlib.sha256(str(self.base_dir).encode()).hexdigest()[:12]
        return Path("/tmp") / f"keyturn-pg-{digest}"

    @property
    def _socket_dir_is_external(self) -> bool:
        return self.socket_dir.parent != self.base_dir

    def _env(self) -> dict[str, str]:
        # Stray PG* variables (PGDATA, PGPORT, PGHOST...) from the caller's shell must not
        # redirect our tools; C locale keeps log text stable for the port-in-use check.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        if self._user is not None:
            env.update(USER=self._user.name, LOGNAME=self._user.name, HOME=str(self.base_dir))
        return env

    def _run(
        self, args: Sequence[str], *, timeout: float, new_session: bool = False
    ) -> subprocess.CompletedProcess[str]:
        bindir = find_pg_bindir()
        cmd = [str(bindir / args[0]), *args[1:]]
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            # setuid in the child instead of runuser/su: no PAM, no shell quoting, and
            # extra_groups=[] drops root's supplementary groups.
            kwargs.update(user=self._user.uid, group=self._user.gid, extra_groups=[])
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env(),
            # The service user may not be able to enter the caller's cwd; initdb warns about it.
            cwd="/",
            # Keep the postmaster out of our process group so a terminal Ctrl-C reaches us and
            # we shut it down in order, instead of it dying mid-request.
            start_new_session=new_session,
            **kwargs,
        )

    def _own(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)
        if self._user is not None:
            os.chown(path, self._user.uid, self._user.gid)

    def _prepare_dirs(self) -> None:
        self._user = _service_user()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            _make_traversable(self.base_dir, self._user)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._own(self.data_dir, 0o700)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        # 0700: local connections are trusted, so only the owner (and root) may reach the socket.
        self._own(self.socket_dir, 0o700)
        self.log_path.touch(exist_ok=True)
        # pg_ctl appends to the log as the service user; base_dir itself stays the caller's.
        self._own(self.log_path, 0o644)

    # ------------------------------------------------------------------ lifecycle

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def is_running(self) -> bool:
        if not self.initialized:
            return False
        if self._user is None:
            self._user = _service_user()
        result = self._run(["pg_ctl", "status", "-D", str(self.data_dir)], timeout=30)
        # pg_ctl status: 0 running, 3 not running, 4 no usable data directory.
        if result.returncode == 0:
            return True
        if result.returncode in (3, 4):
            return False
        raise LocalPostgresError(
            f"pg_ctl status failed ({result.returncode}): {result.stdout}{result.stderr}"
        )

    def _initdb(self) -> None:
        args = [
            "initdb",
            "-D", str(self.data_dir),
            "-U", self.superuser,
            "--auth-local=trust",
            f"--auth-host={self.auth}",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",  # throwaway cluster: durability of the initial files is pointless
        ]
        pwfile: Path | None = None
        if self.superuser_password is not None:
            self._password_file.write_text(self.superuser_password + "\n")
            os.chmod(self._password_file, 0o600)
            # initdb reads the password as the service user, from a file only it can read,
            # and the file is deleted right after.
            pwfile = self.base_dir / ".initdb-pwfile"
            pwfile.write_text(self.superuser_password + "\n")
            self._own(pwfile, 0o600)
            args.append(f"--pwfile={pwfile}")
        began = time.monotonic()
        try:
            result = self._run(args, timeout=120)
        finally:
            if pwfile is not None:
                pwfile.unlink()
        self.initdb_seconds = time.monotonic() - began
        if result.returncode != 0:
            raise LocalPostgresError(
                f"initdb failed ({result.returncode}) for {self.data_dir}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as fh:
            # Everything we control lives in keyturn.conf, rewritten on each start, so a
            # restart can change port or settings without editing initdb's file.
            fh.write("\n# Added by keyturn.launch.localpg\ninclude_if_exists = 'keyturn.conf'\n")

    def _write_config(self) -> None:
        values: dict[str, str] = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            # Throwaway cluster: trade crash safety for speed.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        if self.ssl:
            tlsutil.ensure_self_signed(
                self.ssl_cert_path, self.ssl_key_path, hosts=("localhost", self.host)
            )
            # The server refuses a key readable by others or owned by someone else.
            self._own(self.ssl_key_path, 0o600)
            self._own(self.ssl_cert_path, 0o644)
            values.update(ssl="on", ssl_cert_file="server.crt", ssl_key_file="server.key")
        else:
            values["ssl"] = "off"
        values.update(self.settings)
        lines = ["# Written by keyturn.launch.localpg on every start; edits are lost.\n"]
        lines += [f"{name} = {_quote_setting(value)}\n" for name, value in values.items()]
        path = self.data_dir / "keyturn.conf"
        path.write_text("".join(lines))
        self._own(path, 0o600)

    def start(self, timeout: float = 30) -> None:
        """initdb if needed, then ``pg_ctl start -w``.  A no-op when the cluster already runs."""
        self._prepare_dirs()
        if not self.initialized:
            self._initdb()
        elif self.is_running():
            return
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._write_config()
            log_offset = self.log_path.stat().st_size
            began = time.monotonic()
            result = self._run(
                [
                    "pg_ctl", "start", "-w",
                    "-t", str(max(1, math.ceil(timeout))),
                    "-D", str(self.data_dir),
                    "-l", str(self.log_path),
                ],
                timeout=timeout + 15,
                new_session=True,
            )
            self.startup_seconds = time.monotonic() - began
            if result.returncode == 0:
                break
            new_log = _tail(self.log_path, start=log_offset)
            port_taken = any(marker in new_log for marker in _PORT_IN_USE_MARKERS)
            if self._auto_port and port_taken and attempt < _PORT_ATTEMPTS:
                self.port = _free_port()
                continue
            raise LocalPostgresError(
                f"pg_ctl start failed ({result.returncode}) for {self.data_dir} on port "
                f"{self.port} after {self.startup_seconds:.1f}s:\n{result.stdout}{result.stderr}"
                f"\n--- tail of {self.log_path} ---\n{_tail(self.log_path)}"
            )
        if not self._atexit_registered:
            # Do not leave postmasters behind when a demo or benchmark script simply exits.
            atexit.register(self._stop_at_exit)
            self._atexit_registered = True

    def stop(self) -> None:
        """``pg_ctl stop -m fast``.  Safe to call when stopped, never started, or twice."""
        if self.is_running():
            result = self._run(
                ["pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data_dir)], timeout=90
            )
            # 1 with "No server running" is a race with someone else stopping it: fine.
            if result.returncode != 0 and self.is_running():
                raise LocalPostgresError(
                    f"pg_ctl stop failed ({result.returncode}): {result.stdout}{result.stderr}"
                    f"\n--- tail of {self.log_path} ---\n{_tail(self.log_path)}"
                )
        if self._socket_dir_is_external and self.socket_dir.exists():
            # Our short socket dir lives outside base_dir; nobody else would ever remove it.
            shutil.rmtree(self.socket_dir)
        if self._atexit_registered:
            atexit.unregister(self._stop_at_exit)
            self._atexit_registered = False

    def _stop_at_exit(self) -> None:
        if self.is_running():
            self.stop()

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ client helpers

    def dsn(
        self, dbname: str = "postgres", user: str | None = None, password: str | None = None
    ) -> str:
        """A libpq keyword DSN for TCP on 127.0.0.1.

        With no `user`, connects as the superuser and includes its password (if any).
        """
        if user is None:
            user = self.superuser
            if password is None:
                password = self.superuser_password
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "dbname": dbname,
            "user": user,
        }
        if password is not None:
            params["password"] = password
        return make_conninfo(**params)

    def socket_dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        """A libpq keyword DSN over the unix socket, where every user is trusted."""
        return make_conninfo(
            host=str(self.socket_dir), port=self.port, dbname=dbname, user=user or self.superuser
        )

    def _superuser_connect(self, dbname: str) -> psycopg.Connection[Any]:
        return psycopg.connect(self.socket_dsn(dbname), autocommit=True)

    def execute(self, sql_text: str, dbname: str = "postgres") -> None:
        """Run SQL as the superuser over the unix socket, in autocommit mode.

        Several `;`-separated statements are allowed (they then share one implicit transaction).
        """
        with self._superuser_connect(dbname) as conn:
            # Without parameters psycopg sends the text verbatim (simple query protocol), so a
            # literal `%` is safe; bytes keep type checkers from demanding a LiteralString.
            conn.execute(sql_text.encode())

    def create_role(
        self,
        name: str,
        password: str | None,
        *,
        login: bool = True,
        superuser: bool = False,
        password_encryption: str | None = None,
    ) -> None:
        """CREATE ROLE; `password_encryption` ('md5' / 'scram-sha-256') picks the stored form."""
        if password_encryption is not None and password_encryption not in PASSWORD_ENCRYPTIONS:
            raise ValueError(
                f"password_encryption must be one of {PASSWORD_ENCRYPTIONS}, "
                f"got {password_encryption!r}"
            )
        options: list[sql.Composable] = [
            sql.SQL("LOGIN" if login else "NOLOGIN"),
            sql.SQL("SUPERUSER" if superuser else "NOSUPERUSER"),
        ]
        if password is not None:
            options.append(sql.SQL("PASSWORD {}").format(sql.Literal(password)))
        statement = sql.SQL("CREATE ROLE {} {}").format(
            sql.Identifier(name), sql.SQL(" ").join(options)
        )
        with self._superuser_connect("postgres") as conn:
            if password_encryption is not None:
                # Session-level: the hash is computed server-side at CREATE ROLE time.
                conn.execute(
                    sql.SQL("SET password_encryption = {}").format(
                        sql.Literal(password_encryption)
                    )
                )
            conn.execute(statement)

    def create_database(self, name: str, owner: str | None = None) -> None:
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner is not None:
            statement = sql.SQL("{} OWNER {}").format(statement, sql.Identifier(owner))
        with self._superuser_connect("postgres") as conn:
            conn.execute(statement)

    def __repr__(self) -> str:
        return (
            f"LocalPostgres(base_dir={str(self.base_dir)!r}, port={self.port}, "
            f"auth={self.auth!r}, ssl={self.ssl})"
        )
