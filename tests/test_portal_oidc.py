"""OIDC sign-in against a stand-in provider started by the test: real HTTP on
free ports for both the provider and the portal, issuer discovery, the
authorization code flow with PKCE (S256, checked by the provider), and an
RS256-signed ID token. Forged, mis-addressed and replayed tokens are refused."""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from flask import Flask, abort, jsonify, redirect, request
from joserfc import jwt
from joserfc.jwk import RSAKey
from portal_support import make_services
from werkzeug.serving import make_server

from keyturn.services import Services
from portal import create_app

CLIENT_ID, CLIENT_SECRET = "keyturn-portal", "s3cret-for-tests"


@dataclass
class Provider:
    """A minimal OpenID provider: enough of the protocol to be strict about it."""

    url: str = ""
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(
        2048, parameters={"kid": "k1"}, private=True))
    claims: dict[str, Any] = field(default_factory=dict)
    mode: str = "good"  # good | forged | wrong-aud | wrong-nonce | expired | wrong-iss
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    pkce_checked: int = 0

    def app(self) -> Flask:
        app = Flask("stand-in-oidc")

        @app.get("/.well-known/openid-configuration")
        def discovery():  # type: ignore[no-untyped-def]
            return jsonify({
                "issuer": self.url, "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token", "jwks_uri": f"{self.url}/jwks",
                "response_types_supported": ["code"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"]})

        @app.get("/jwks")
        def jwks():  # type: ignore[no-untyped-def]
            return jsonify({"keys": [self.key.as_dict(private=False)]})

        @app.get("/authorize")
        def authorize():  # type: ignore[no-untyped-def]
            a = request.args
            if a.get("client_id") != CLIENT_ID or a.get("response_type") != "code":
                abort(400, "bad client or response type")
            if a.get("code_challenge_method") != "S256" or not a.get("code_challenge"):
                abort(400, "PKCE S256 is required")
            if "openid" not in a.get("scope", "").split():
                abort(400, "openid scope missing")
            code = secrets.token_urlsafe(16)
            self.codes[code] = {"challenge": a["code_challenge"], "nonce": a.get("nonce"),
                                "redirect_uri": a["redirect_uri"]}
            query = urlencode({"code": code, "state": a["state"]})
            return redirect(f"{a['redirect_uri']}?{query}")

        @app.post("/token")
        def token():  # type: ignore[no-untyped-def]
            auth = request.authorization
            if not auth or (auth.username, auth.password) != (CLIENT_ID, CLIENT_SECRET):
                return jsonify({"error": "invalid_client"}), 401
            f = request.form
            grant = self.codes.pop(f.get("code", ""), None)  # one use only
            if grant is None or f.get("redirect_uri") != grant["redirect_uri"]:
                return jsonify({"error": "invalid_grant"}), 400
            verifier = f.get("code_verifier", "")
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            if digest.rstrip(b"=").decode() != grant["challenge"]:
                return jsonify({"error": "invalid_grant", "error_description": "PKCE"}), 400
            self.pkce_checked += 1
            now = int(time.time())
            claims = {"iss": self.url, "sub": "u-123", "aud": CLIENT_ID, "iat": now,
                      "exp": now + 300, "nonce": grant["nonce"], **self.claims}
            key = self.key
            if self.mode == "forged":  # same kid, someone else's key
                key = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
            elif self.mode == "wrong-aud":
                claims["aud"] = "another-client"
            elif self.mode == "wrong-nonce":
                claims["nonce"] = "replayed"
            elif self.mode == "expired":
                claims.update(iat=now - 7200, exp=now - 3600)
            elif self.mode == "wrong-iss":
                claims["iss"] = "https://evil.example"
            id_token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)
            return jsonify({"access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
                            "expires_in": 300, "id_token": id_token})

        return app


def _serve(app: Flask) -> tuple[str, Any]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.port}", server


@pytest.fixture()
def provider() -> Iterator[Provider]:
    p = Provider()
    p.url, server = _serve(p.app())
    yield p
    server.shutdown()


@pytest.fixture()
def portal_url(tmp_path: Path, provider: Provider,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Services]]:
    monkeypatch.setenv("KT_TEST_OIDC_SECRET", CLIENT_SECRET)
    svc = make_services(tmp_path, f"""  oidc:
    issuer: {provider.url}
    client_id: {CLIENT_ID}
    client_secret_env: KT_TEST_OIDC_SECRET
    groups_claim: roles
    label: Example SSO
""")
    url, server = _serve(create_app(svc))
    yield url, svc
    server.shutdown()
    svc.store.dispose()


def _sso(base: str) -> tuple[requests.Session, requests.Response]:
    http = requests.Session()
    login = http.get(f"{base}/login", timeout=10)
    assert "Sign in with Example SSO" in login.text
    r = http.get(f"{base}/login/sso?next=/dashboard", timeout=10)
    return http, r


def test_sso_sign_in_with_groups_from_claim(provider: Provider,
                                           portal_url: tuple[str, Services]) -> None:
    base, svc = portal_url
    provider.claims = {"preferred_username": "bob", "roles": ["approvers", "managers"]}
    http, r = _sso(base)
    assert r.status_code == 200, r.text
    assert r.url == f"{base}/dashboard"  # manager by the token's groups, not the config's
    assert "Approvals dashboard" in r.text and "Bob Brown" in r.text
    assert provider.pkce_checked == 1
    assert http.get(f"{base}/queue", timeout=10).status_code == 200
    logins = [x for x in svc.audit.iter_records(kind="login") if x["outcome"] == "ok"]
    assert logins[-1]["user"] == "bob" and logins[-1]["detail"] == {"method": "oidc"}


def test_sso_groups_fall_back_to_config_without_the_claim(
        provider: Provider, portal_url: tuple[str, Services]) -> None:
    base, _ = portal_url
    provider.claims = {"preferred_username": "carol"}
    http, r = _sso(base)
    assert r.url == f"{base}/dashboard" and r.status_code == 403  # an auditor, per config
    assert http.get(f"{base}/history", timeout=10).status_code == 200


@pytest.mark.parametrize("mode, needle", [
    ("forged", "bad_signature"), ("wrong-aud", "missing claim"), ("wrong-nonce", "nonce"),
    ("expired", "expired"), ("wrong-iss", "iss"),
])
def test_bad_id_tokens_are_refused(provider: Provider, portal_url: tuple[str, Services],
                                   mode: str, needle: str) -> None:
    base, svc = portal_url
    provider.claims = {"preferred_username": "bob", "roles": ["approvers"]}
    provider.mode = mode
    http, r = _sso(base)
    assert r.status_code == 401
    assert "Single sign-on failed" in r.text
    assert needle in r.text.lower()
    r = http.get(f"{base}/queue", timeout=10, allow_redirects=False)
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    failed = [x for x in svc.audit.iter_records(kind="login") if x["outcome"] == "failed"]
    assert failed and failed[-1]["detail"]["method"] == "oidc"


def test_unknown_user_and_forged_callback_are_refused(provider: Provider,
                                                     portal_url: tuple[str, Services]) -> None:
    base, _ = portal_url
    provider.claims = {"preferred_username": "mallory", "roles": ["admins"]}
    http, r = _sso(base)
    assert r.status_code == 401 and "mallory is not a user configured" in r.text
    # A callback the portal never started (login CSRF): no state in the session.
    fresh = requests.Session()
    r = fresh.get(f"{base}/login/sso/callback?code=abc&state=forged", timeout=10)
    assert r.status_code == 401 and "Single sign-on failed" in r.text
    assert fresh.get(f"{base}/queue", timeout=10, allow_redirects=False).status_code == 302


def test_oidc_config_is_validated(tmp_path: Path) -> None:
    from portal_support import CONFIG

    from keyturn.config import parse_config
    from keyturn.errors import ConfigError

    base = CONFIG % {"db": tmp_path / "k.db", "portal_extra": "%s"}
    for extra, needle in (
        ("  oidc: {issuer: https://idp, client_id: k, client_secret: x}\n", "not be inline"),
        ("  oidc: {client_id: k}\n", "portal.oidc.issuer: is required"),
        ("  oidc: {issuer: ftp://idp, client_id: k}\n", "expected an https:// URL"),
        ("  oidc: {issuer: https://idp, client_id: k, scopes: [email]}\n",
         "must include openid"),
        ("  roles: {bosses: [x]}\n", "portal.roles.bosses: unknown key"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_config(base % extra, str(tmp_path / "keyturn.yaml"))
    cfg = parse_config(base % "  roles: {managers: [leads, heads]}\n",
                       str(tmp_path / "keyturn.yaml"))
    assert cfg.portal.manager_groups == ("leads", "heads")
    assert cfg.portal.auditor_groups == ("auditors",)
