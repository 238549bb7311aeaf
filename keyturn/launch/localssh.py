"""Start and stop a throwaway OpenSSH server for the SSH gateway's tests and benchmarks.

A ``LocalSSHD`` runs Debian's sshd on a free port of 127.0.0.1 with its own host key,
config and authorized_keys under a caller-chosen directory, and lets one throwaway system
user log in by key (``ktssh``, created when missing: this needs root, as sshd itself does
to log in anyone but the user running it). The caller adds the keys that may log in with
``authorize``.

It lives in the launcher (tests and benchmarks use it): the core and the edges must not
import it, and it must never be pointed at a server anyone relies on.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

SSHD = "/usr/sbin/sshd"
TARGET_USER = "ktssh"

__all__ = ["SSHD", "TARGET_USER", "LocalSSHD", "LocalSSHError", "fingerprint", "keygen"]


class LocalSSHError(RuntimeError):
    """The server cannot be started here (the message says why)."""


def keygen(path: Path, comment: str = "") -> str:
    """A new ed25519 key pair at ``path`` (and ``path.pub``); its SHA256 fingerprint."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True, stdin=subprocess.DEVNULL)
    return fingerprint(path.with_suffix(".pub"))


def fingerprint(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], check=True,
                         capture_output=True, text=True).stdout
    return out.split()[1]


def ensure_user() -> Path:
    """The target's login user, with a home of its own and an unlocked account (sshd
    without PAM refuses locked ones, even by key)."""
    try:
        home = Path(pwd.getpwnam(TARGET_USER).pw_dir)
    except KeyError:
        if os.geteuid() != 0:
            raise LocalSSHError(f"creating the test user {TARGET_USER} needs root") from None
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", TARGET_USER], check=True)
        home = Path(pwd.getpwnam(TARGET_USER).pw_dir)
    subprocess.run(["usermod", "-p", "*", TARGET_USER], check=True)
    return home


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalSSHD:
    base: Path
    port: int = 0
    host_fingerprint: str = ""
    proc: subprocess.Popen[bytes] | None = None
    home: Path = field(default_factory=Path)
    _log: IO[bytes] | None = None

    @property
    def authorized_keys(self) -> Path:
        return self.base / "authorized_keys"

    def start(self, port: int | None = None) -> None:
        if not os.path.exists(SSHD):
            raise LocalSSHError(f"{SSHD} is missing (apt-get install openssh-server)")
        self.home = ensure_user()
        self.base.mkdir(parents=True, exist_ok=True)
        # sshd reads authorized_keys as the target user: it must be able to get there.
        self.base.chmod(0o755)
        for parent in self.base.parents:
            if parent == Path(parent.anchor) or parent.stat().st_mode & 0o001:
                break
            parent.chmod(parent.stat().st_mode | 0o001)
        self.host_fingerprint = keygen(self.base / "host_key", "target host key")
        self.authorized_keys.touch()
        self.authorized_keys.chmod(0o644)
        self.port = port or _free_port()
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        (self.base / "sshd_config").write_text(textwrap.dedent(f"""
            Port {self.port}
            ListenAddress 127.0.0.1
            HostKey {self.base / 'host_key'}
            PidFile {self.base / 'sshd.pid'}
            AuthorizedKeysFile {self.authorized_keys}
            StrictModes no
            UsePAM no
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            AllowUsers {TARGET_USER}
            Subsystem sftp internal-sftp
            LogLevel VERBOSE
            MaxStartups 1000
            MaxSessions 1000
        """))
        self._log = open(self.base / "sshd.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.base / "sshd_config")],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LocalSSHError(f"sshd exited with {self.proc.returncode}: "
                                    f"{(self.base / 'sshd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise LocalSSHError(f"sshd did not open port {self.port}")

    def authorize(self, pub: Path) -> None:
        with self.authorized_keys.open("a") as fh:
            fh.write(pub.read_text())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
