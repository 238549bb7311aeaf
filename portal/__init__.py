"""Keyturn's web app: the JSON API under /api/v1 (and, later, the portal).

``create_app(services)`` is the app factory; blueprints hold the areas.
The app only calls keyturn services; it holds no business rules itself.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify

from keyturn.errors import KeyturnError
from keyturn.services import Services


def create_app(services: Services, config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(JSON_SORT_KEYS=False)
    if config:
        app.config.update(config)
    app.extensions["keyturn"] = services

    from portal.api import bp as api_bp

    app.register_blueprint(api_bp)

    @app.errorhandler(KeyturnError)
    def keyturn_error(exc: KeyturnError):  # type: ignore[no-untyped-def]
        return jsonify(exc.to_json()), exc.status

    @app.get("/healthz")
    def healthz():  # type: ignore[no-untyped-def]
        return {"ok": True}

    return app
