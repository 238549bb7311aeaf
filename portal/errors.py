"""Error pages. The JSON API answers errors as JSON; the portal as HTML pages
(or, for HTMX requests, as a fragment the page shows in its message area).

They must not leak internals (tracebacks, SQL, paths) to the page.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError

from keyturn.errors import KeyturnError

log = logging.getLogger(__name__)

TITLES = {400: "Bad request", 401: "Sign-in needed", 403: "Not allowed", 404: "Not found",
          405: "Method not allowed", 409: "Conflict", 413: "Too large",
          500: "Something went wrong"}


def _wants_json() -> bool:
    return request.blueprint == "api" or request.path.startswith("/api/")


def render_error(status: int, message: str):  # type: ignore[no-untyped-def]
    from portal.htmx import is_htmx

    if is_htmx():
        resp = render_template("_error_fragment.html", status=status, message=message)
        return resp, status, {"HX-Retarget": "#flash", "HX-Reswap": "innerHTML"}
    return render_template("error.html", status=status, title=TITLES.get(status, "Error"),
                           message=message), status


def init_app(app: Flask) -> None:
    @app.errorhandler(KeyturnError)
    def keyturn_error(exc: KeyturnError):  # type: ignore[no-untyped-def]
        if _wants_json():
            return jsonify(exc.to_json()), exc.status
        return render_error(exc.status, exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        status = exc.code or 500
        if _wants_json():
            return jsonify({"error": exc.name.lower().replace(" ", "_"),
                            "message": exc.description}), status
        return render_error(status, exc.description or TITLES.get(status, "Error"))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("unhandled error on %s %s", request.method, request.path)
        if _wants_json():
            return jsonify({"error": "internal", "message": "internal error"}), 500
        return render_error(500, InternalServerError.description)
