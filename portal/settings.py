"""The portal's settings: the ``portal:`` section of keyturn.yaml (listener, public URL,
session secret, roles, session lifetime, cookies, single sign-on through OIDC), validated
with line numbers and registered with the core's config as the section ``portal``.

Read them with ``PORTAL.of(config)``; ``config.portal`` works too. Other surfaces read
``public_url`` here for their links to tickets.

The launcher imports this module in every process before a config is read, so it must
stay light: it must not import Flask or anything else that serves requests (the
package's ``__init__`` imports Flask only inside ``create_app`` for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keyturn.config import Checker, Config, Listener, SecretRef, Section, register_section


@dataclass(frozen=True)
class OidcSettings:
    """Single sign-on through an OpenID Connect provider (issuer discovery)."""

    issuer: str
    client_id: str
    client_secret: SecretRef | None = None
    groups_claim: str = "groups"
    username_claim: str = "preferred_username"
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    label: str = "single sign-on"


@dataclass(frozen=True)
class PortalSettings:
    listen: Listener = Listener("127.0.0.1", 8080)
    public_url: str = "http://127.0.0.1:8080"
    secret_key: SecretRef | None = None
    # Portal roles that do not follow from policy come from these groups.
    manager_groups: tuple[str, ...] = ("managers",)
    auditor_groups: tuple[str, ...] = ("auditors",)
    admin_groups: tuple[str, ...] = ("admins",)
    session_lifetime: float = 8 * 3600.0
    # None: Secure cookies exactly when public_url is https.
    cookie_secure: bool | None = None
    oidc: OidcSettings | None = None
    # Open live pages (Server-Sent Events streams) per portal process; past it, polling.
    live_clients: int = 100


def _portal(check: Checker, value: Any, config: Config) -> PortalSettings:
    p = check.mapping(value, ("portal",), {"listen", "public_url", "secret_key_env",
                                           "secret_key_file", "roles", "session_lifetime",
                                           "cookie_secure", "oidc", "live_clients"})
    listen = check.listener(p["listen"], ("portal", "listen")) if "listen" in p else \
        Listener("127.0.0.1", 8080)
    url = p.get("public_url") or f"http://{listen.host}:{listen.port}"
    roles = check.mapping(p.get("roles"), ("portal", "roles"),
                          {"managers", "auditors", "admins"})
    groups = {k: check.str_list(roles[k], ("portal", "roles", k)) if k in roles
              else (k,) for k in ("managers", "auditors", "admins")}
    lifetime = check.duration(p.get("session_lifetime", "8h"), ("portal", "session_lifetime"))
    secure = p.get("cookie_secure")
    if secure is not None and not isinstance(secure, bool):
        raise check.err(("portal", "cookie_secure"), "expected true or false")
    clients = p.get("live_clients", 100)
    if not isinstance(clients, int) or isinstance(clients, bool) or not 0 <= clients <= 10000:
        raise check.err(("portal", "live_clients"), "expected an integer from 0 to 10000")
    return PortalSettings(listen, url.rstrip("/"), check.secret(p, "secret_key", ("portal",)),
                          groups["managers"], groups["auditors"], groups["admins"], lifetime,
                          secure, _oidc(check, p.get("oidc")), clients)


def _oidc(check: Checker, value: Any) -> OidcSettings | None:
    if value is None:
        return None
    at = ("portal", "oidc")
    o = check.mapping(value, at, {"issuer", "client_id", "client_secret_env",
                                  "client_secret_file", "groups_claim", "username_claim",
                                  "scopes", "label"})
    issuer = check.string(o.get("issuer"), at + ("issuer",))
    if not issuer.startswith(("https://", "http://")):
        raise check.err(at + ("issuer",), "expected an https:// URL")
    scopes = check.str_list(o.get("scopes"), at + ("scopes",)) or \
        ("openid", "profile", "email")
    if "openid" not in scopes:
        raise check.err(at + ("scopes",), "must include openid")
    return OidcSettings(
        issuer.rstrip("/"), check.string(o.get("client_id"), at + ("client_id",)),
        check.secret(o, "client_secret", at),
        check.string(o.get("groups_claim", "groups"), at + ("groups_claim",)),
        check.string(o.get("username_claim", "preferred_username"),
                     at + ("username_claim",)),
        scopes, str(o.get("label") or "single sign-on"))


PORTAL: Section[PortalSettings] = register_section(Section(
    key="portal", name="portal", validate=_portal, exports=(PortalSettings, OidcSettings)))
