"""Portal tables (schema owned by migrations/versions/0003_portal.py).

Only what the portal alone needs: local sign-in accounts. Who a person is and
which groups they are in still comes from the config file; an account only
adds a password for someone already configured there.

It must not hold identity or groups: the config owns them.
"""

from __future__ import annotations

from sqlalchemy import Float, String
from sqlalchemy.orm import Mapped, mapped_column

from keyturn.models import Base


class PortalAccount(Base):
    __tablename__ = "portal_accounts"
    user: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    last_login_at: Mapped[float | None] = mapped_column(Float, nullable=True)
