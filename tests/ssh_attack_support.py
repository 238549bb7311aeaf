"""What the SSH attack-run tests (tests/test_ssh_attack_run_*.py) share: a throwaway
OpenSSH server, a gateway with three ssh connections (web1 blocks /etc/passwd and holds
changes, web2 the same without path rules, web3 also allows writes under /tmp/ktsftp-*),
the ssh client helpers and a scratch directory on the host. Modules import the fixtures
by name (each module gets its own, module-scoped)."""
from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Keyturn, LocalPostgres, free_port, make_keyturn, wait_port
from tests.ssh_support import TARGET_USER, LocalSSHD, keygen, ssh_options

RISK = {c: i for i, c in enumerate(["read", "write", "forward", "admin", "destructive",
                                    "shell", "unknown"])}

POLICY = """
  ssh-atk:
    default: block
    rules:
      - name: no-secrets
        match: {paths: ["/etc/passwd", "/etc/hostname*"]}
        action: block
        reason: secrets
      - name: reads
        match: {class: read}
        action: allow
      - name: changes-need-approval
        match: {class: [write, forward, admin, destructive]}
        action: review
        review: {approvers: [approvers], timeout: 4s}
  ssh-atk3:
    default: block
    rules:
      - name: no-secrets
        match: {paths: ["/etc/passwd"]}
        action: block
      - name: reads
        match: {class: read}
        action: allow
      - name: scratch-space
        match: {class: write, paths: ["/tmp/ktsftp-*"]}
        action: allow
      - name: changes-need-approval
        match: {class: [write, forward, admin, destructive]}
        action: review
        review: {approvers: [approvers], timeout: 4s}
  ssh-atk2:
    default: block
    rules:
      - name: reads
        match: {class: read}
        action: allow
      - name: changes-need-approval
        match: {class: [write, forward, admin, destructive]}
        action: review
        review: {approvers: [approvers], timeout: 4s}
"""


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSSHD]:
    server = LocalSSHD(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, sshd: LocalSSHD,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = start_gateway(pg, sshd, tmp_path_factory.mktemp("kt-ssh"))
    yield k
    k.stop()


def start_gateway(pg: LocalPostgres, sshd: LocalSSHD, base: Path, gateway: str = "",
                  edit: Callable[[str], str] | None = None, policies: str = "",
                  connections: tuple[tuple[str, str], ...] = ()) -> Keyturn:
    """The gateway described above, started; ``gateway``: more lines of its gateway
    section (indented by two spaces); ``edit``: changes the config's text once more;
    ``policies``: more policies (YAML as POLICY); ``connections``: more ssh connections
    to the same host, as (name, policy)."""
    keygen(base / "target_key", "keyturn -> target")
    sshd.authorize(base / "target_key.pub")
    k = make_keyturn(base, pg, extra=POLICY + policies)
    sport = free_port()
    text = k.config.read_text()
    text = text.replace("gateway:\n", f"gateway:\n  ssh: 127.0.0.1:{sport}\n{gateway}", 1)
    conns = (f"  - name: web1\n    type: ssh\n"
             f"    target: {{host: 127.0.0.1, port: {sshd.port}, user: {TARGET_USER}, "
             f"key_file: {base / 'target_key'}, host_key: \"{sshd.host_fingerprint}\"}}\n"
             f"    policy: ssh-atk\n")
    one = conns
    conns += one.replace("web1", "web2").replace("ssh-atk", "ssh-atk2")
    conns += one.replace("web1", "web3").replace("ssh-atk", "ssh-atk3")
    for name, policy in connections:
        conns += one.replace("web1", name).replace("ssh-atk", policy)
    text = text.replace("connections:\n", "connections:\n" + conns, 1)
    k.config.write_text(edit(text) if edit is not None else text)
    k.ssh_port = sport  # type: ignore[attr-defined]
    for user in ("alice", "bob"):
        keygen(base / f"{user}_key", f"{user}'s laptop")
        k.cli("key", "add", "--user", user, str(base / f"{user}_key.pub"))
    k.start()
    wait_port(sport, proc=k.proc)
    return k


def _argv(kt, user, conn, command, extra=()):
    return ["ssh", *ssh_options(), "-i", str(kt.base / f"{user}_key"), "-p",
            str(kt.ssh_port), *extra, f"{user}:{conn}@127.0.0.1",
            *([command] if command is not None else [])]


def ssh(kt, command, user="alice", conn="web1", extra=(), timeout=60, **kw):
    return subprocess.run(_argv(kt, user, conn, command, extra), capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture
def box() -> Iterator[Path]:
    d = Path(f"/tmp/ktatk-{uuid.uuid4().hex[:10]}")
    d.mkdir()
    os.chmod(d, 0o777)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


__all__ = ["POLICY", "RISK", "_argv", "box", "kt", "ssh", "sshd"]
