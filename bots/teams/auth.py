"""Bot Framework authentication, both directions.

Inbound: every activity carries ``Authorization: Bearer <JWT>`` signed by the
Bot Framework. We check the signature against the keys published at the
OpenID metadata's ``jwks_uri`` (RS256 only), the issuer, the audience (our
app id), expiry and not-before (5 minutes of clock skew, as the Bot
Framework allows), and that the token's ``serviceurl`` claim matches the
activity's serviceUrl so a token cannot redirect our replies.

Outbound: the connector service wants an OAuth client-credentials token for
``https://api.botframework.com/.default``; cached until shortly before expiry.

It must not accept an activity whose token does not verify.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

from bots.settings import TeamsSettings

LEEWAY = 300
KEYS_TTL = 3600.0
# An unknown kid may be a key rotation: refetch, but at most this often.
REFETCH_INTERVAL = 60.0


class AuthError(Exception):
    """The request is not from the Bot Framework (401)."""


class InboundAuth:
    def __init__(self, settings: TeamsSettings, session: aiohttp.ClientSession, *,
                 refetch_interval: float = REFETCH_INTERVAL):
        self.settings = settings
        self.session = session
        self.refetch_interval = refetch_interval
        self._keys: KeySet | None = None
        self._fetched = 0.0
        self._lock = asyncio.Lock()

    async def _key_set(self, *, refresh: bool = False) -> KeySet:
        async with self._lock:
            now = time.monotonic()
            stale = self._keys is None or now - self._fetched > KEYS_TTL
            if stale or (refresh and now - self._fetched > self.refetch_interval):
                async with self.session.get(self.settings.openid_metadata_url) as r:
                    r.raise_for_status()
                    meta = await r.json(content_type=None)
                async with self.session.get(meta["jwks_uri"]) as r:
                    r.raise_for_status()
                    jwks = await r.json(content_type=None)
                self._keys = KeySet.import_key_set(
                    {"keys": [k for k in jwks.get("keys", []) if k.get("kty") == "RSA"]})
                self._fetched = now
            assert self._keys is not None
            return self._keys

    async def validate(self, header: str | None, service_url: str | None) -> dict[str, Any]:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("missing bearer token")
        try:
            keys = await self._key_set()
        except (aiohttp.ClientError, KeyError, ValueError) as exc:
            raise AuthError(f"cannot load signing keys: {exc}") from exc
        try:
            try:
                decoded = jwt.decode(token, keys, algorithms=["RS256"])
            except InvalidKeyIdError:
                decoded = jwt.decode(token, await self._key_set(refresh=True),
                                     algorithms=["RS256"])
            jwt.JWTClaimsRegistry(
                leeway=LEEWAY,
                iss={"essential": True, "value": self.settings.issuer},
                aud={"essential": True, "value": self.settings.app_id},
                exp={"essential": True},
            ).validate(decoded.claims)
        except (JoseError, ValueError) as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        claims = decoded.claims
        claimed = (claims.get("serviceurl") or claims.get("serviceUrl") or "").rstrip("/")
        if service_url and claimed != service_url.rstrip("/"):
            # The Bot Connector always names the service URL the activity came from; a
            # token without it could be replayed against any conversation.
            raise AuthError("token serviceurl is missing or does not match the activity")
        return claims


class ConnectorToken:
    def __init__(self, settings: TeamsSettings, session: aiohttp.ClientSession):
        self.settings = settings
        self.session = session
        self._token: str | None = None
        self._until = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        async with self._lock:
            if self._token is None or time.monotonic() > self._until:
                form = {"grant_type": "client_credentials", "client_id": self.settings.app_id,
                        "client_secret": self.settings.app_password.resolve(),
                        "scope": "https://api.botframework.com/.default"}
                async with self.session.post(self.settings.token_url, data=form) as r:
                    if r.status >= 400:
                        raise aiohttp.ClientResponseError(
                            r.request_info, (), status=r.status,
                            message=f"token endpoint answered {r.status}", headers=r.headers)
                    body = await r.json(content_type=None)
                self._token = body["access_token"]
                self._until = time.monotonic() + float(body.get("expires_in", 3600)) - 300
            return self._token

    def forget(self) -> None:
        self._token = None
