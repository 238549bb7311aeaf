"""A throwaway OpenSSH server for the SSH gateway's tests, and the real clients.

``LocalSSHD`` runs Debian's sshd on a free port with its own host key, config and
authorized_keys in a temporary directory, logging in one throwaway system user
(``ktssh``, created when missing; the test session runs as root here). The tests use the
real ``ssh``, ``scp`` and ``sftp`` clients through the gateway.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_port

SSHD = "/usr/sbin/sshd"
TARGET_USER = "ktssh"


def keygen(path: Path, comment: str = "") -> str:
    """A new ed25519 key pair at ``path`` (and ``path.pub``); its SHA256 fingerprint."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True, stdin=subprocess.DEVNULL)
    return fingerprint(path.with_suffix(".pub"))


def fingerprint(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], check=True,
                         capture_output=True, text=True).stdout
    return out.split()[1]


def _ensure_system_deps() -> None:
    if os.path.exists(SSHD) and shutil.which("ssh"):
        return
    root = Path(__file__).resolve().parent.parent
    subprocess.run([str(root / "scripts" / "system-deps.sh")], check=False)
    if not os.path.exists(SSHD):
        pytest.skip("OpenSSH server could not be installed (apt-get install openssh-server)")


def _ensure_user() -> Path:
    """The target's login user, with a home of its own and an unlocked account (sshd
    without PAM refuses locked ones, even by key)."""
    try:
        home = Path(pwd.getpwnam(TARGET_USER).pw_dir)
    except KeyError:
        if os.geteuid() != 0:
            pytest.skip(f"creating the test user {TARGET_USER} needs root")
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", TARGET_USER], check=True)
        home = Path(pwd.getpwnam(TARGET_USER).pw_dir)
    subprocess.run(["usermod", "-p", "*", TARGET_USER], check=True)
    return home


@dataclass
class LocalSSHD:
    base: Path
    port: int = 0
    host_fingerprint: str = ""
    proc: subprocess.Popen[bytes] | None = None
    home: Path = field(default_factory=Path)

    @property
    def authorized_keys(self) -> Path:
        return self.base / "authorized_keys"

    def start(self) -> None:
        _ensure_system_deps()
        self.home = _ensure_user()
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
        self.port = free_port()
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
            MaxStartups 200
            MaxSessions 200
        """))
        self.log = open(self.base / "sshd.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.base / "sshd_config")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, proc=self.proc)

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
            self.log.close()


def ssh_options(known_hosts: Path | None = None) -> list[str]:
    """Options for the real ssh client in tests: no agent, no config, our key only."""
    return ["-F", "none", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=" + ("yes" if known_hosts else "no"),
            "-o", f"UserKnownHostsFile={known_hosts or '/dev/null'}",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20"]
