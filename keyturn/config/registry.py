"""What the core's config does not know by itself: connection types and edge sections,
registered by the packages that own them.

- A **connection type** (``ConnectionType``) is registered by a protocol's package
  (PostgreSQL: proxies/postgres/register.py). It names the type (``postgres``), validates
  a connection's ``target:`` mapping into a typed target, declares the other keys a
  connection of that type may have (``Option``: ``unknown_functions``, ``columns``...),
  the key of its listener under ``gateway:`` with a default, and the gateway class the
  launcher starts, by import path.
- A **section** (``Section``) is a top-level key of keyturn.yaml owned by an edge: the
  portal's ``portal:`` (portal/settings.py), the bots' ``integrations:``
  (bots/settings.py). Its validated settings are in ``Config.sections``; ``of(config)``
  reads them typed.

Registrations happen when those modules are imported. The launcher imports every one of
them before it reads a config (keyturn.launch.installed), so the gateway, the portal,
the bots and every CLI command validate the same file the same way, whichever code they
go on to load. A registration module must therefore stay light: it imports the core's
config and nothing of its protocol's or surface's machinery.

What this module must not do: import an edge or the launcher (a gateway class is named by
a string, which only the launcher imports), or validate anything itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from keyturn.config.checks import Checker
from keyturn.config.model import Config, Listener, Target
from keyturn.config.yamldoc import KeyPath
from keyturn.errors import ConfigError

T = TypeVar("T")

#: ``(check, target mapping as written, where it is, connection name) -> typed target``
TargetValidator = Callable[[Checker, Any, KeyPath, str], Target]


@dataclass(frozen=True)
class Option:
    """A key a connection of some type may have besides ``name``, ``type``, ``target``,
    ``policy`` and ``description``. ``validate(check, value, at)`` returns the typed value
    kept in ``Connection.options``; ``default`` is kept when the key is absent."""

    validate: Callable[[Checker, Any, KeyPath], Any]
    default: Any = None


@dataclass(frozen=True)
class ConnectionType:
    #: ``type:`` in a connection, and the protocol whose vocabulary its requests use.
    name: str
    target: TargetValidator
    options: Mapping[str, Option] = field(default_factory=dict)
    #: The key of this type's listener under ``gateway:`` (``gateway.postgres``); None for
    #: a type served without one.
    listener: str | None = None
    #: Where it listens when the file does not say (None: only where the file says).
    default_listener: Listener | None = None
    #: ``"package.module:Class"``, the gateway the launcher starts for connections of this
    #: type: ``Class(services, audit_spool)`` with ``async start()`` and ``async stop()``.
    gateway: str | None = None


@dataclass(frozen=True)
class Section(Generic[T]):
    """A top-level key of keyturn.yaml that an edge owns."""

    #: The key in the file (``portal``, ``integrations``).
    key: str
    #: Where its settings are in ``Config.sections`` (and ``config.<name>``).
    name: str
    #: ``(check, value as written or None, the core's config) -> settings``; called even
    #: when the file has no such key, so the settings always exist, with their defaults.
    #: The core's config is complete but for ``sections``.
    validate: Callable[[Checker, Any, Config], T]
    #: Types that ``keyturn.config`` exported before they moved to their edge; they stay
    #: importable from there (``from keyturn.config import X``) while this is registered.
    exports: tuple[type, ...] = ()

    def of(self, config: Config) -> T:
        """This section's settings in ``config``, typed."""
        try:
            value: T = config.sections[self.name]
        except KeyError:
            raise ConfigError(f"{config.path}: no {self.key!r} settings: the section was "
                              "registered after the config was read") from None
        return value


_CONNECTION_TYPES: dict[str, ConnectionType] = {}
_SECTIONS: dict[str, Section[Any]] = {}

# The core's own top-level keys; a section may not take one, except ``integrations``,
# which the core keeps as written (``Config.integrations``) for the edge that reads it.
CORE_KEYS = ("store", "identity", "connections", "policies", "integrations", "gateway")


def register_connection_type(ctype: ConnectionType) -> ConnectionType:
    """Make a connection type known (its protocol's package does this when imported).
    Registering a name again replaces the earlier registration."""
    _CONNECTION_TYPES[ctype.name] = ctype
    return ctype


def unregister_connection_type(name: str) -> None:
    """Forget a connection type (tests that register one of their own)."""
    _CONNECTION_TYPES.pop(name, None)


def connection_type(name: str) -> ConnectionType | None:
    return _CONNECTION_TYPES.get(name)


def connection_types() -> tuple[ConnectionType, ...]:
    return tuple(_CONNECTION_TYPES.values())


def register_section(section: Section[T]) -> Section[T]:
    """Make a top-level section known (its edge's settings module does this when
    imported)."""
    if section.key in CORE_KEYS and section.key != "integrations":
        raise ValueError(f"{section.key!r} is a section of the core")
    _SECTIONS[section.name] = section
    return section


def unregister_section(name: str) -> None:
    _SECTIONS.pop(name, None)


def sections() -> tuple[Section[Any], ...]:
    return tuple(_SECTIONS.values())


def exported(name: str) -> type | None:
    """A type a registered section exports under ``name``, or None."""
    return next((t for s in _SECTIONS.values() for t in s.exports if t.__name__ == name), None)
