"""Local portal accounts: set and check passwords.

Passwords are stored only as salted scrypt hashes (werkzeug.security). An
account can exist only for a user configured in ``identity.users``; removing
the user from the config disables the account without touching the store.
Checking an unknown user still spends one hash, so response time does not
reveal which accounts exist.

It must not store or log a password in clear, nor create an account for someone the
config does not name.
"""

from __future__ import annotations

import time

from werkzeug.security import check_password_hash, generate_password_hash

from keyturn.config import Config
from keyturn.errors import KeyturnError, NotFound
from keyturn.store import Store
from portal.models import PortalAccount

MIN_PASSWORD = 10
_DUMMY_HASH = generate_password_hash("not-a-real-password-xx")


class WeakPassword(KeyturnError):
    code = "weak_password"


def set_password(config: Config, store: Store, user: str, password: str, *,
                 now: float | None = None) -> None:
    if user not in config.users:
        raise NotFound(f"unknown user {user!r} (portal accounts are for users configured in "
                       "identity.users)")
    if len(password) < MIN_PASSWORD:
        raise WeakPassword(f"a portal password needs at least {MIN_PASSWORD} characters")
    now = time.time() if now is None else now
    hashed = generate_password_hash(password)
    with store.write() as s:
        row = s.get(PortalAccount, user)
        if row is None:
            s.add(PortalAccount(user=user, password_hash=hashed, created_at=now,
                                updated_at=now))
        else:
            row.password_hash, row.updated_at = hashed, now


def check_password(config: Config, store: Store, user: str, password: str) -> bool:
    """True only for a configured user whose account's password matches."""
    with store.session() as s:
        row = s.get(PortalAccount, user) if user else None
        hashed = row.password_hash if row is not None else _DUMMY_HASH
    ok = check_password_hash(hashed, password)
    if not ok or row is None or user not in config.users:
        return False
    with store.write() as s:
        acc = s.get(PortalAccount, user)
        if acc is not None:
            acc.last_login_at = time.time()
    return True
