"""The core's services for one process, built from a Config: store, identities,
approvals and audit trail, bundled as ``Services``.

Portal, bots, the gateway and the launcher all start here, so they share one way of
opening the store and announcing decisions. It belongs to the core, not to the
launcher: every edge is handed a ``Services`` and names the type, and an edge must not
import the launcher.

What it must not do: import an edge or the launcher, or start anything (listeners,
threads, processes): it builds objects; keyturn.launch.runner starts the surfaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keyturn.approvals import Approvals
from keyturn.audit import AuditLog
from keyturn.config import Config
from keyturn.identity import Identities
from keyturn.store import Store


@dataclass
class Services:
    config: Config
    store: Store
    identities: Identities
    approvals: Approvals
    audit: AuditLog

    def record_audit(self, **rec: Any) -> None:
        """Synchronous audit append, for low-volume surfaces (API, CLI, portal)."""
        self.audit.append([rec])


def build_services(config: Config, *, store: Store | None = None, upgrade: bool = True,
                   audit_sink: Any = None) -> Services:
    store = store or Store(config.store_url)
    if upgrade:
        store.upgrade()
    services = Services(config, store, Identities(config, store), Approvals(store),
                        AuditLog(store))
    # Decisions are audited through the process's sink: the gateway's spool, or a
    # synchronous append for low-volume surfaces.
    services.approvals.audit = audit_sink or services.record_audit
    services.approvals.max_pending = config.gateway.max_pending_per_user
    return services
