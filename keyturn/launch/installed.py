"""What this installation has: the registrations of every protocol and edge section,
and the gateways a config gives work to.

The core's config knows connection types and sections only from its registry
(keyturn.config.registry); the modules that register them belong to the edges. The
launcher imports all of them, with ``install()``, before it reads a config, in every
process it starts (gateway, portal, bots, the audit ingester, each CLI command), so every
process validates the same file the same way, whether or not it goes on to load a
gateway. Those modules are light by rule: they import the core's config and nothing of
their protocol's or surface's machinery (a test checks it).

Adding a protocol: write ``proxies/<protocol>/register.py`` and import it in
``install()``; nothing in the core changes.

Part of the launcher: the core and the edges must not import it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from keyturn.config import Config, ConnectionType, Listener, connection_types


def install() -> None:
    """Import every registration (once; importing again does nothing)."""
    import bots.settings  # noqa: F401  integrations: (the chat bots)
    import portal.settings  # noqa: F401  portal:
    import proxies.http.register  # noqa: F401  type: http
    import proxies.postgres.register  # noqa: F401  type: postgres
    import proxies.ssh.register  # noqa: F401  type: ssh


@dataclass(frozen=True)
class GatewayPlan:
    """A gateway this process starts: its connection type and where it listens."""

    ctype: ConnectionType
    listen: Listener
    connections: tuple[str, ...]

    def load(self) -> Any:
        """The gateway class (``ConnectionType.gateway``, ``module:Class``), imported."""
        assert self.ctype.gateway is not None
        module, _, name = self.ctype.gateway.partition(":")
        return getattr(importlib.import_module(module), name)


def gateways(config: Config) -> list[GatewayPlan]:
    """Every registered gateway that has work in ``config``: a connection type with a
    gateway class, a listener and at least one connection, in registration order."""
    plans = []
    for ctype in connection_types():
        names = tuple(c.name for c in config.connections_of(ctype.name))
        listen = config.gateway.listener(ctype.listener) if ctype.listener else None
        if ctype.gateway and listen is not None and names:
            plans.append(GatewayPlan(ctype, listen, names))
    return plans
