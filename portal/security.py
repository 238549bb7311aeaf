"""Request security for the HTML portal: CSRF tokens and response headers.

CSRF is a synchronizer token kept in the (signed, HttpOnly) session. Every
state-changing request (anything but GET/HEAD/OPTIONS) must echo it, either
as the ``csrf_token`` form field (plain forms) or as the ``X-CSRF-Token``
header (HTMX sends it from ``hx-headers`` on <body>). The bearer-token JSON
API is exempt: it carries no ambient credentials a browser could replay.

The Content-Security-Policy allows scripts and styles only from the portal
itself, so no template may contain inline script or style.

It must not let a state-changing request through without its token.
"""

from __future__ import annotations

import hmac
import secrets

from flask import Flask, Response, abort, request, session

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
CSRF_EXEMPT_BLUEPRINTS = {"api"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


def _check_csrf() -> None:
    if request.method in SAFE_METHODS or request.blueprint in CSRF_EXEMPT_BLUEPRINTS:
        return
    if request.endpoint is None:
        return  # 404/405 follow
    expected = session.get("csrf")
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    if not expected or not hmac.compare_digest(str(expected), sent):
        abort(403, description="The form's security token is missing or out of date. "
                               "Reload the page and try again.")


def _headers(resp: Response) -> Response:
    h = resp.headers
    h.setdefault("Content-Security-Policy", CSP)
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("X-Frame-Options", "DENY")
    h.setdefault("Referrer-Policy", "same-origin")
    h.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
    h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    if request.is_secure:
        h.setdefault("Strict-Transport-Security", "max-age=31536000")
    if resp.mimetype == "text/html" or request.blueprint == "api":
        # Tickets and audit records are sensitive: never keep them in caches.
        h.setdefault("Cache-Control", "no-store")
    return resp


def init_app(app: Flask) -> None:
    app.before_request(_check_csrf)
    app.after_request(_headers)
    app.jinja_env.globals["csrf_token"] = csrf_token
