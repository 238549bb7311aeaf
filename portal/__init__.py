"""Keyturn's web app: the approval portal (HTML + HTMX) and the JSON API /api/v1.

``create_app(services)`` is the app factory; one blueprint per area. The app
only calls keyturn services; it holds no business rules itself (ticket state
changes go through keyturn.approvals, never through ticket rows).

Importing the package must stay cheap: every Keyturn process imports its settings
(portal/settings.py, the ``portal:`` section) before reading a config, gateways
included, so Flask and the blueprints are imported inside ``create_app`` only.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from typing import TYPE_CHECKING, Any

from portal.settings import PORTAL

if TYPE_CHECKING:
    from flask import Flask

    from keyturn.services import Services

log = logging.getLogger(__name__)


def _secret_key(services: Services) -> str:
    ref = PORTAL.of(services.config).secret_key
    if ref is not None:
        return ref.resolve()
    # No configured key: a per-process random key. Sessions end when the process
    # restarts, which is the safe failure for a demo or a single-process set-up.
    log.info("portal.secret_key_env/_file not set: portal sessions last until this process "
             "stops (set a key when running several portal processes)")
    return secrets.token_urlsafe(48)


def create_app(services: Services, config: dict[str, Any] | None = None) -> Flask:
    from flask import Flask

    app = Flask(__name__)
    settings = PORTAL.of(services.config)
    secure = settings.cookie_secure if settings.cookie_secure is not None \
        else settings.public_url.startswith("https://")
    app.config.update(
        JSON_SORT_KEYS=False,
        SECRET_KEY=_secret_key(services),
        SESSION_COOKIE_NAME="keyturn_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure,
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SECURE=secure,
        REMEMBER_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=dt.timedelta(seconds=settings.session_lifetime),
        MAX_CONTENT_LENGTH=1024 * 1024,
    )
    if config:
        app.config.update(config)
    app.extensions["keyturn"] = services

    from portal import (
        auditview,
        auth,
        chatlinks,
        configview,
        dashboard,
        errors,
        export,
        filters,
        history,
        htmx,
        keys,
        live,
        queue,
        recordings,
        security,
        tickets,
        tokens,
    )
    from portal.api import bp as api_bp

    security.init_app(app)
    htmx.init_app(app)
    filters.init_app(app)
    auth.init_app(app)
    errors.init_app(app)
    live.init_app(app)
    app.register_blueprint(api_bp)
    for module in (auth, queue, tickets, history, auditview, export, tokens, keys,
                   recordings, chatlinks, configview, dashboard):
        app.register_blueprint(module.bp)

    @app.get("/healthz")
    def healthz():  # type: ignore[no-untyped-def]
        return {"ok": True}

    return app
