"""OIDC single sign-on through Authlib: issuer discovery, authorization code
with PKCE (S256), and an ID token whose signature, issuer, audience, expiry
and nonce Authlib checks against the provider's published keys.

The person must be a user configured in ``identity.users`` (matched by the
configured username claim, or by e-mail); their groups come from the
configured groups claim when the token carries it, else from the config.

It must not sign in anyone the config does not name, nor skip a check Authlib makes.
"""

from __future__ import annotations

from typing import Any

from authlib.common.errors import AuthlibBaseError
from authlib.integrations.flask_client import OAuth
from flask import Flask, current_app
from joserfc.errors import JoseError

from keyturn.config import Config
from keyturn.errors import KeyturnError
from portal.settings import PORTAL

oauth = OAuth()


class SsoError(KeyturnError):
    status = 401
    code = "sso_failed"


def init_app(app: Flask) -> None:
    settings = PORTAL.of(app.extensions["keyturn"].config).oidc
    oauth.init_app(app)
    if settings is None:
        return
    secret = settings.client_secret.resolve() if settings.client_secret else None
    client_kwargs: dict[str, Any] = {"scope": " ".join(settings.scopes),
                                     "code_challenge_method": "S256"}
    if secret is None:
        client_kwargs["token_endpoint_auth_method"] = "none"
    # Each app gets its own registry entry: tests build several apps in one process.
    app.extensions["keyturn_oidc"] = oauth.register(
        name=f"sso{id(app)}", overwrite=True, client_id=settings.client_id,
        client_secret=secret,
        server_metadata_url=f"{settings.issuer}/.well-known/openid-configuration",
        client_kwargs=client_kwargs)


def client() -> Any:
    return current_app.extensions["keyturn_oidc"]


def finish_login(config: Config) -> tuple[str, tuple[str, ...]]:
    """Exchange the code, validate the ID token, map it to a configured user."""
    settings = PORTAL.of(config).oidc
    assert settings is not None
    try:
        token = client().authorize_access_token()
    except (AuthlibBaseError, JoseError) as exc:
        raise SsoError(f"{type(exc).__name__}: {exc}") from exc
    except ValueError as exc:
        raise SsoError(str(exc)) from exc
    claims = token.get("userinfo")
    if not claims:
        raise SsoError("the provider sent no ID token")
    name = claims.get(settings.username_claim)
    user = name if isinstance(name, str) and name in config.users else None
    if user is None and claims.get("email"):
        user = next((u.name for u in config.users.values()
                     if u.email and u.email.lower() == str(claims["email"]).lower()), None)
    if user is None:
        raise SsoError(f"{name or claims.get('email') or claims.get('sub')!s} is not a user "
                       "configured in identity.users")
    raw = claims.get(settings.groups_claim)
    if raw is None:
        groups = config.groups_of(user)
    elif isinstance(raw, list) and all(isinstance(g, str) for g in raw):
        groups = tuple(raw)
    elif isinstance(raw, str):
        groups = tuple(g for g in raw.replace(",", " ").split() if g)
    else:
        raise SsoError(f"claim {settings.groups_claim!r} is not a list of group names")
    return user, groups
