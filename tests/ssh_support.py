"""The SSH gateway's tests: a throwaway OpenSSH server (keyturn.launch.localssh, installed
by ``make test`` when missing) and options for the real clients."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from keyturn.launch import localssh
from keyturn.launch.localssh import TARGET_USER, fingerprint, keygen

__all__ = ["TARGET_USER", "LocalSSHD", "fingerprint", "keygen", "ssh_options"]


class LocalSSHD(localssh.LocalSSHD):
    def start(self, port: int | None = None) -> None:
        if not (os.path.exists(localssh.SSHD) and shutil.which("ssh")):
            root = Path(__file__).resolve().parent.parent
            subprocess.run([str(root / "scripts" / "system-deps.sh")], check=False)
        try:
            super().start(port)
        except localssh.LocalSSHError as exc:
            pytest.skip(f"no OpenSSH server here: {exc}")


def ssh_options(known_hosts: Path | None = None) -> list[str]:
    """Options for the real ssh client in tests: no agent, no config, our key only."""
    return ["-F", "none", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=" + ("yes" if known_hosts else "no"),
            "-o", f"UserKnownHostsFile={known_hosts or '/dev/null'}",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20"]
