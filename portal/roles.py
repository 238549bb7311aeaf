"""Who may do what in the portal: roles from groups and policy.

* engineer — everyone signed in: their own requests and tokens;
* approver — member of a group some review rule names as approvers: the
  tickets those groups may decide;
* manager  — ``portal.roles.managers`` groups: every queue and the dashboard,
  read-only unless also an approver;
* auditor  — ``portal.roles.auditors`` groups: history, audit and export,
  read-only;
* admin    — ``portal.roles.admins`` groups: every page (still no votes
  unless also an approver: votes are decided by keyturn.approvals alone).

It must not be bypassed: every view asks it, on every request.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import wraps
from typing import Any

from flask import abort
from flask_login import current_user, login_required

from keyturn.config import Config
from keyturn.identity import Identity
from keyturn.models import Ticket
from portal.settings import PORTAL

ENGINEER, APPROVER, MANAGER, AUDITOR, ADMIN = "engineer", "approver", "manager", "auditor", \
    "admin"


def approver_groups(config: Config) -> set[str]:
    out: set[str] = set()
    for policy in config.policies.values():
        for rule in policy.rules:
            if rule.review:
                out.update(rule.review.approvers)
    return out


def roles_for(config: Config, groups: tuple[str, ...]) -> frozenset[str]:
    g = set(groups)
    roles = {ENGINEER}
    if g & approver_groups(config):
        roles.add(APPROVER)
    if g & set(PORTAL.of(config).manager_groups):
        roles.add(MANAGER)
    if g & set(PORTAL.of(config).auditor_groups):
        roles.add(AUDITOR)
    if g & set(PORTAL.of(config).admin_groups):
        roles.add(ADMIN)
    return frozenset(roles)


@dataclass(frozen=True)
class Viewer:
    """The signed-in person (flask-login's user object)."""

    user: str
    groups: tuple[str, ...]
    roles: frozenset[str]
    method: str = "password"
    display_name: str = ""

    is_authenticated = True
    is_active = True
    is_anonymous = False

    def get_id(self) -> str:
        return self.user

    @property
    def identity(self) -> Identity:
        return Identity(self.user, self.groups)

    def has(self, *roles: str) -> bool:
        return bool(self.roles & set(roles))

    def sees_all_tickets(self) -> bool:
        return self.has(MANAGER, AUDITOR, ADMIN)

    def may_see(self, t: Ticket) -> bool:
        """Requester, an approver of the ticket, or a manager/auditor/admin."""
        return t.requester == self.user or bool(set(self.groups) & set(t.approver_groups)) \
            or self.sees_all_tickets()


def viewer() -> Viewer:
    return current_user  # type: ignore[return-value]


def require(*roles: str):  # type: ignore[no-untyped-def]
    """Signed in and holding one of ``roles`` (none given: any signed-in person)."""
    def deco(fn):  # type: ignore[no-untyped-def]
        @wraps(fn)
        @login_required
        def wrapper(*args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
            if roles and not viewer().has(*roles):
                abort(403, description="Your role does not include this page "
                                       f"(needs {' or '.join(roles)}).")
            return fn(*args, **kwargs)
        return wrapper
    return deco
