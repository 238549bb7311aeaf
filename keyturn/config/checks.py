"""The checks every part of keyturn.yaml is validated with: a mapping with known keys, a
string, a list of strings, a secret by reference, a listener, a port, a duration...
each failing with an error that names the file, the line and the key path.

``Checker`` is what the core's sections (keyturn.config.validate) and every registered
connection type and section (keyturn.config.registry) are handed, so a protocol's target
schema or the portal's settings report errors exactly like the core's.

It must not know any section of the file: sections are validated where they are defined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keyturn.config.model import Listener, SecretRef
from keyturn.config.values import parse_duration
from keyturn.config.yamldoc import Doc, KeyPath, format_path
from keyturn.errors import ConfigError

# Keys that would be a secret if written inline, wherever they appear. Besides these, a
# key ``X`` the schema does not accept is refused as an inline secret where the schema
# accepts ``X_env`` or ``X_file`` (``password:`` where ``password_env`` is expected).
SECRET_KEYS = frozenset({"password", "secret", "token"})


class Checker:
    def __init__(self, doc: Doc):
        self.doc = doc

    @property
    def path(self) -> str:
        """The config file's path, as given."""
        return self.doc.path

    def err(self, at: KeyPath, message: str) -> ConfigError:
        return self.doc.error(at, message)

    def line(self, at: KeyPath) -> int | None:
        return self.doc.line(at)

    def relative_path(self, value: str) -> str:
        """A path from the file, relative to the config file's directory (not the cwd)."""
        return str(Path(self.doc.path).resolve().parent / value)

    def mapping(self, value: Any, at: KeyPath, allowed: set[str] | None = None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.err(at, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            for key in value:
                if key in SECRET_KEYS or (key not in allowed and (
                        f"{key}_env" in allowed or f"{key}_file" in allowed)):
                    raise self.err(at + (key,), f"secrets must not be inline; use {key}_env or "
                                                f"{key}_file")
                if key not in allowed:
                    raise self.err(at + (key,), f"unknown key (expected one of: "
                                                f"{', '.join(sorted(allowed))})")
        return value

    def str_list(self, value: Any, at: KeyPath) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.err(at, "expected a string or a list of strings")
        return tuple(value)

    def string(self, value: Any, at: KeyPath, *, required: bool = True) -> str:
        if value is None and not required:
            return ""
        if not isinstance(value, str) or not value:
            raise self.err(at, "expected a non-empty string" if value is not None else
                           "is required")
        return value

    def secret(self, m: dict, key: str, at: KeyPath) -> SecretRef | None:
        """``{key}_env`` or ``{key}_file`` in ``m`` (not both), or None."""
        env, file = m.get(f"{key}_env"), m.get(f"{key}_file")
        if env is None and file is None:
            return None
        if env is not None and file is not None:
            raise self.err(at + (f"{key}_env",), f"give {key}_env or {key}_file, not both")
        ref_at = at + (f"{key}_env" if env else f"{key}_file",)
        return SecretRef(env=env, file=file,
                         where=f"{self.doc.where(ref_at)}: {format_path(ref_at)}")

    def required_secret(self, m: dict, key: str, at: KeyPath, why: str) -> SecretRef:
        ref = self.secret(m, key, at)
        if ref is None:
            raise self.err(at + (f"{key}_env",), f"{why}: give {key}_env or {key}_file")
        return ref

    def listener(self, value: Any, at: KeyPath) -> Listener:
        """``HOST:PORT``, a port number (on 127.0.0.1) or ``{host, port}``."""
        if isinstance(value, dict):
            m = self.mapping(value, at, {"host", "port"})
            return Listener(self.string(m.get("host", "127.0.0.1"), at + ("host",)),
                            self.port(m.get("port"), at + ("port",), zero=True))
        if isinstance(value, int) and not isinstance(value, bool):
            return Listener("127.0.0.1", value)
        if isinstance(value, str) and ":" in value:
            host, _, port = value.rpartition(":")
            if port.isdigit():
                return Listener(host or "127.0.0.1", int(port))
        raise self.err(at, f"expected HOST:PORT or a port number, got {value!r}")

    def port(self, value: Any, at: KeyPath, *, zero: bool = False) -> int:
        """A TCP port (``zero``: 0 too, any free port, for a listener)."""
        if not isinstance(value, int) or isinstance(value, bool) or \
                not (0 if zero else 1) <= value < 65536:
            raise self.err(at, "expected a port number")
        return value

    def url(self, value: Any, at: KeyPath) -> str:
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise self.err(at, f"expected an http(s) URL, got {value!r}")
        return value

    def duration(self, value: Any, at: KeyPath) -> float:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.err(at, str(exc)) from exc

    def count(self, m: dict, key: str, default: int, at: KeyPath, low: int) -> int:
        """``m[key]``, an integer of at least ``low``."""
        n = m.get(key, default)
        if not isinstance(n, int) or isinstance(n, bool) or n < low:
            raise self.err(at + (key,), f"expected an integer of at least {low}")
        return n

    def seconds(self, m: dict, key: str, default: float, at: KeyPath) -> float:
        """``m[key]``, a duration of more than zero."""
        value = self.duration(m.get(key, default), at + (key,))
        if value <= 0:
            raise self.err(at + (key,), "must be more than zero")
        return value

    def name_map(self, value: Any, at: KeyPath, known: dict[str, Any],
                 what: str) -> dict[str, str]:
        """``{name: string}`` where every name is one of ``known`` (connections, policies)."""
        raw = self.mapping(value, at)
        for k, v in raw.items():
            if k not in known:
                raise self.err(at + (k,), f"unknown {what} {k!r}")
            self.string(v, at + (k,))
        return dict(raw)
