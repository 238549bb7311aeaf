"""SSH's registration with the core's config: the ``ssh`` connection type.

A ``type: ssh`` connection names one host. Its ``target:`` says where (``host``,
``port``), as whom the gateway logs in (``user``, and a private key or a password, both by
reference: ``key_file``/``key_env``, ``password_file``/``password_env``) and how the
gateway knows it reached the right host: ``host_key`` (one or more fingerprints,
``SHA256:...`` as ``ssh-keygen -lf`` prints them) or ``known_hosts`` (a file). One of the
two is required: the gateway never logs in to a host it cannot verify. ``user_ca`` (a file,
or a list of files, of OpenSSH CA public keys) lets people log in with a certificate one of
those CAs signed for their user name (a principal). Its listener is
``gateway.ssh`` (default 127.0.0.1:2222) and its gateway ``SSHGateway``. Importing it also
registers SSH's class vocabulary.

Like every registration this module must stay light: it must not import asyncssh, the
gateway, asyncio or anything that serves connections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyturn.config import (
    Checker,
    Connection,
    ConnectionType,
    Listener,
    Option,
    SecretRef,
    Target,
    register_connection_type,
)
from keyturn.config.yamldoc import KeyPath
from keyturn.request import Vocabulary, register

#: Least to most risky (proxies/ssh/shell.py says what each means). Nothing on an SSH
#: target refuses a write hidden in a "read", so every class but read counts as writing.
CLASSES = ("read", "write", "forward", "admin", "destructive", "shell", "unknown")

VOCABULARY = register(Vocabulary(
    protocol="ssh", classes=CLASSES, write_classes=frozenset(CLASSES[1:]),
    resources=("programs", "paths")))

_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}\Z")
_PUBLIC_KEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|"
                         r"sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)"
                         r" [A-Za-z0-9+/]+={0,2}( .*)?\Z")


def ca_lines(path: str) -> list[str]:
    """The CA public keys in a ``user_ca`` file ("algorithm base64 [comment]" lines;
    blank lines and ``#`` comments skipped). Raises ValueError naming a bad line."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not _PUBLIC_KEY.match(line):
            raise ValueError(f"line {n} is not an OpenSSH public key")
        out.append(" ".join(line.split()[:2]))
    return out


def _user_ca(check: Checker, value: Any, at: KeyPath) -> tuple[str, ...]:
    files = tuple(check.relative_path(f) for f in check.str_list(value, at))
    for f in files:
        try:
            if not ca_lines(f):
                raise ValueError("it holds no public key")
        except (OSError, ValueError) as exc:
            raise check.err(at, f"cannot use {f} as a user CA: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    return files


@dataclass(frozen=True)
class SSHTarget(Target):
    user: str = ""
    key: SecretRef | None = None
    password: SecretRef | None = None
    host_keys: tuple[str, ...] = ()
    known_hosts: str | None = None

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def _target(check: Checker, value: Any, at: KeyPath, name: str) -> SSHTarget:
    t = check.mapping(value, at, {"host", "port", "user", "key_env", "key_file",
                                  "password_env", "password_file", "host_key",
                                  "known_hosts"})
    key = check.secret(t, "key", at)
    password = check.secret(t, "password", at)
    if key is None and password is None:
        raise check.err(at + ("key_file",), "the gateway needs a way to log in: give key_file "
                        "(or key_env) or password_file (or password_env)")
    host_keys = check.str_list(t.get("host_key"), at + ("host_key",))
    for fp in host_keys:
        if not _FINGERPRINT.match(fp):
            raise check.err(at + ("host_key",), f"{fp!r} is not a fingerprint: expected "
                            "SHA256:... as `ssh-keygen -lf KEY` prints it")
    known = t.get("known_hosts")
    if known is not None:
        known = check.relative_path(check.string(known, at + ("known_hosts",)))
    if not host_keys and not known:
        raise check.err(at + ("host_key",), "the target's host key must be verified: give "
                        "host_key (its SHA256 fingerprint) or known_hosts (a file)")
    return SSHTarget(host=check.string(t.get("host"), at + ("host",)),
                     port=check.port(t.get("port", 22), at + ("port",)),
                     user=check.string(t.get("user"), at + ("user",)), key=key,
                     password=password, host_keys=host_keys, known_hosts=known)


def target_of(conn: Connection) -> SSHTarget:
    if not isinstance(conn.target, SSHTarget):
        raise TypeError(f"connection {conn.name!r} is not an ssh connection "
                        f"(type {conn.type!r})")
    return conn.target


SSH = register_connection_type(ConnectionType(
    name="ssh",
    target=_target,
    options={"user_ca": Option(_user_ca, ())},
    listener="ssh",
    default_listener=Listener("127.0.0.1", 2222),
    gateway="proxies.ssh.gateway:SSHGateway",
))
