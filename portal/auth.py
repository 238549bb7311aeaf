"""Sign-in and sign-out: local passwords and OIDC single sign-on.

The session (a signed, HttpOnly cookie) holds who signed in, how and when.
Every request rebuilds the viewer from it: for local accounts the groups
come from the config on each request (so removing someone from a group takes
effect at once); for SSO they come from the ID token's groups claim. A
session older than ``portal.session_lifetime`` is refused, whatever the
cookie says.

It must not trust a session for groups: they come from the config on each request.
"""

from __future__ import annotations

import time
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import LoginManager, login_user, logout_user

from keyturn.services import Services
from portal import oidc
from portal.accounts import check_password
from portal.roles import Viewer, roles_for, viewer
from portal.settings import PORTAL
from portal.throttle import LoginThrottle

bp = Blueprint("auth", __name__)
login_manager = LoginManager()


def services() -> Services:
    return current_app.extensions["keyturn"]


def make_viewer(user: str, groups: tuple[str, ...], method: str) -> Viewer:
    cfg = services().config
    u = cfg.users.get(user)
    return Viewer(user, groups, roles_for(cfg, groups), method,
                  (u.display_name if u and u.display_name else user))


@login_manager.user_loader
def load_viewer(user_id: str) -> Viewer | None:
    auth = session.get("kt_auth")
    cfg = services().config
    if not isinstance(auth, dict) or auth.get("user") != user_id:
        return None
    if time.time() - float(auth.get("at", 0)) > PORTAL.of(cfg).session_lifetime:
        session.clear()
        return None
    if user_id not in cfg.users:
        return None
    if auth.get("method") == "oidc":
        groups = tuple(auth.get("groups") or ())
    else:
        groups = cfg.groups_of(user_id)
    return make_viewer(user_id, groups, str(auth.get("method")))


def start_session(user: str, groups: tuple[str, ...], method: str) -> None:
    """A fresh session (a new CSRF token too: no fixation across sign-in)."""
    session.clear()
    session.permanent = True
    session["kt_auth"] = {"user": user, "method": method, "at": time.time(),
                          "groups": list(groups) if method == "oidc" else None}
    login_user(make_viewer(user, groups, method))
    services().record_audit(kind="login", user=user, action="portal-login", outcome="ok",
                            client_addr=request.remote_addr, detail={"method": method})


def safe_next(target: str | None) -> str:
    """Only same-site relative paths: never an open redirect."""
    if target and target.startswith("/") and not target.startswith("//") and \
            "\\" not in target:
        return target
    return url_for("queue.home")


@bp.route("/login", methods=["GET", "POST"])
def login():  # type: ignore[no-untyped-def]
    svc = services()
    if request.method == "GET" and viewer().is_authenticated:
        return redirect(safe_next(request.args.get("next")))
    error = None
    status = 200
    username = ""
    if request.method == "POST":
        username = (request.form.get("username") or "").strip()[:64]
        password = request.form.get("password") or ""
        addr = request.remote_addr or ""
        throttle: LoginThrottle = current_app.extensions["keyturn_login_throttle"]
        wait = throttle.wait_seconds(username, addr)
        if wait > 0:
            svc.record_audit(kind="login", user=username or None, action="portal-login",
                             outcome="throttled", client_addr=addr,
                             detail={"method": "password"})
            error = (f"Too many failed sign-ins. Try again in {int(wait) // 60 + 1} "
                     "minutes.")
            return render_template("login.html", error=error, username=username,
                                   next=request.values.get("next", ""),
                                   oidc=PORTAL.of(svc.config).oidc), 429
        if username and password and check_password(svc.config, svc.store, username, password):
            throttle.succeeded(username)
            start_session(username, svc.config.groups_of(username), "password")
            return redirect(safe_next(request.form.get("next")), 303)
        throttle.failed(username, addr)
        svc.record_audit(kind="login", user=username or None, action="portal-login",
                         outcome="failed", client_addr=addr, detail={"method": "password"})
        error = "Unknown user or wrong password."
        status = 401
    return render_template("login.html", error=error, username=username,
                           next=request.values.get("next", ""),
                           oidc=PORTAL.of(svc.config).oidc), status


@bp.post("/logout")
def logout():  # type: ignore[no-untyped-def]
    logout_user()
    session.clear()
    return redirect(url_for("auth.login"), 303)


@bp.get("/login/sso")
def sso_start():  # type: ignore[no-untyped-def]
    if PORTAL.of(services().config).oidc is None:
        abort(404)
    session["sso_next"] = safe_next(request.args.get("next"))
    return oidc.client().authorize_redirect(url_for("auth.sso_callback", _external=True))


@bp.get("/login/sso/callback")
def sso_callback():  # type: ignore[no-untyped-def]
    settings = PORTAL.of(services().config).oidc
    if settings is None:
        abort(404)
    nxt = session.get("sso_next") or url_for("queue.home")
    try:
        user, groups = oidc.finish_login(services().config)
    except oidc.SsoError as exc:
        services().record_audit(kind="login", user=None, action="portal-login",
                                outcome="failed", client_addr=request.remote_addr,
                                detail={"method": "oidc", "error": exc.message})
        return render_template("login.html", error=f"Single sign-on failed: {exc.message}",
                               username="", next="", oidc=settings), 401
    start_session(user, groups, "oidc")
    return redirect(safe_next(nxt), 303)


def _unauthorized() -> Any:
    from portal.htmx import is_htmx, redirect_to

    if request.blueprint == "live":
        # An event stream cannot follow a redirect to a sign-in form: say it plainly.
        return Response("Sign in to follow live updates.\n", 401, mimetype="text/plain")
    target = url_for("auth.login", next=request.full_path.rstrip("?"))
    if is_htmx():
        return redirect_to(target)
    return redirect(target)


def init_app(app: Flask) -> None:
    app.extensions["keyturn_login_throttle"] = LoginThrottle()
    login_manager.init_app(app)
    login_manager.unauthorized_handler(_unauthorized)
    login_manager.session_protection = None  # the session is rebuilt on every request anyway
    app.jinja_env.globals["viewer"] = viewer
    oidc.init_app(app)
