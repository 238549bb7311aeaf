"""The protocol-neutral request model: who asks, on which connection, and what.

A request is a list of actions (a SQL statement, a shell command, an HTTP call, a
Kubernetes verb on a resource). Each action has its text, a class from its protocol's
vocabulary, reasons for that class, and the resources it touches by kind (``tables`` and
``functions`` for SQL; ``paths`` and ``methods`` for HTTP; ``programs`` for SSH...),
which policy rules match by the same names (``match: {tables: [...]}``).

Each protocol declares its ``Vocabulary`` — its classes from least to most risky, those
that run with write access on the target, the resource kinds rules may name and how a
rule's glob is spelled the way the protocol spells names — and registers it. Policy
matching (keyturn.policy) and config validation (keyturn.config) work on the registered
vocabularies only, never on one protocol's words.

This module must not import protocol or web code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from keyturn.errors import ConfigError


def _as_written(kind: str, glob: str) -> str:
    return glob


@dataclass(frozen=True)
class Vocabulary:
    protocol: str
    #: From least to most risky; the last one is what the gateway cannot analyse.
    classes: tuple[str, ...]
    #: Classes that run with write access on the target (nothing on the target side
    #: refuses a write hidden in them).
    write_classes: frozenset[str]
    #: Resource kinds actions report and rules may name (``match`` keys).
    resources: tuple[str, ...]
    #: A rule's glob for ``kind`` as the protocol spells names (SQL: lowercased,
    #: ``public.`` when unqualified, cut like the server cuts identifiers).
    normalize: Callable[[str, str], str] = _as_written
    #: The resource kind that names code the gateway cannot see into (an action's
    #: ``opaque`` names): a rule narrowed to some resources covers such code in a
    #: write only when it names it under this kind.
    code_kind: str | None = None

    def risk(self, cls: str) -> int:
        try:
            return self.classes.index(cls)
        except ValueError:
            return len(self.classes)  # not in the vocabulary: the riskiest

    @property
    def riskiest(self) -> str:
        return self.classes[-1]


_REGISTRY: dict[str, Vocabulary] = {}


def register(vocabulary: Vocabulary) -> Vocabulary:
    """Make a protocol's vocabulary known (its package does this when imported)."""
    _REGISTRY[vocabulary.protocol] = vocabulary
    return vocabulary


def vocabulary(protocol: str) -> Vocabulary:
    try:
        return _REGISTRY[protocol]
    except KeyError:
        raise ConfigError(f"no gateway for protocol {protocol!r} is installed") from None


def vocabularies() -> tuple[Vocabulary, ...]:
    return tuple(_REGISTRY.values())


def known_classes() -> tuple[str, ...]:
    """Every class of every registered protocol (a policy may serve several)."""
    return tuple(dict.fromkeys(c for v in _REGISTRY.values() for c in v.classes))


def resource_kinds() -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for v in _REGISTRY.values() for k in v.resources))


class Action(Protocol):
    """One thing a request does (for SQL: one statement). Resources are attributes
    named by the vocabulary's resource kinds (``action.tables``...)."""

    @property
    def text(self) -> str: ...
    @property
    def cls(self) -> Any: ...
    @property
    def reasons(self) -> tuple[str, ...]: ...
    @property
    def forbidden(self) -> str | None: ...


@dataclass(frozen=True)
class Request:
    """Who (user, groups, and where from) asks for what on which connection."""

    user: str
    groups: tuple[str, ...]
    connection: Any  # keyturn.config.Connection
    actions: Sequence[Action]
    parse_error: str | None = None
    client_addr: str = ""
    application: str = ""
    session_id: str = ""

    @property
    def statements(self) -> Sequence[Action]:
        """The actions, by the name the SQL gateway uses."""
        return self.actions

    @property
    def vocabulary(self) -> Vocabulary:
        return vocabulary(self.connection.type)


__all__ = ["Action", "Request", "Vocabulary", "known_classes", "register", "resource_kinds",
           "vocabularies", "vocabulary"]
