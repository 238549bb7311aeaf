"""Keyturn's config, ``keyturn.yaml``: the public names, re-exported from the modules that
define them.

- ``yamldoc``: YAML with the line of every key; errors naming file, line and key.
- ``values``: durations and column names as people write them.
- ``model``: the core's typed config (store, users, connections, policies, gateway).
- ``checks``: the checks every part of the file is validated with (``Checker``).
- ``registry``: connection types and sections that protocols and edges register.
- ``options``: connection options of the core's capabilities (masking, analysers).
- ``validate``: the core's sections and ``load_config`` / ``parse_config``.

Settings types that moved to their edge (the portal's, the bots') stay importable from
here while their section is registered (``registry.Section.exports``).

This package must not import an edge or the launcher, open network connections or touch
the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keyturn.config import registry
from keyturn.config.checks import Checker
from keyturn.config.model import (
    ACTIONS,
    MASK_REFUSALS,
    MASK_STYLES,
    REVIEW_MODES,
    AuthThrottle,
    ClientLimits,
    Config,
    Connection,
    GatewaySettings,
    Listener,
    MaskSettings,
    Match,
    Policy,
    ReviewSettings,
    Rule,
    SecretRef,
    Target,
    User,
)
from keyturn.config.registry import (
    ConnectionType,
    Option,
    Section,
    connection_type,
    connection_types,
    register_connection_type,
    register_section,
)
from keyturn.config.validate import load_config, parse_config
from keyturn.config.values import fold_identifiers, parse_duration

__all__ = [
    "ACTIONS", "MASK_REFUSALS", "MASK_STYLES", "REVIEW_MODES", "AuthThrottle", "Checker",
    "ClientLimits", "Config", "Connection", "ConnectionType", "GatewaySettings", "Listener",
    "Match", "MaskSettings", "Option", "Policy", "ReviewSettings", "Rule", "Section",
    "SecretRef", "Target", "User", "connection_type", "connection_types", "fold_identifiers",
    "load_config", "parse_config", "parse_duration", "register_connection_type",
    "register_section",
]

if not TYPE_CHECKING:
    # Not seen by mypy: typed code imports a moved type from its edge.
    def __getattr__(name: str) -> Any:
        found = registry.exported(name)
        if found is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r} (the "
                                 "settings of an edge are exported here only while the "
                                 "edge's section is registered)")
        return found
