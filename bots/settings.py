"""The chat bots' settings: the ``integrations:`` section of keyturn.yaml (the bots'
HTTP listener, the Slack app, the Teams bot registration, where cards go), validated
with line numbers and registered with the core's config as the section ``chat``.

Read them with ``CHAT.of(config)`` (None when neither Slack nor Teams is configured);
``config.chat`` works too. The core keeps ``integrations:`` as written in
``Config.integrations``.

The launcher imports this module in every process before a config is read, so it must
stay light: it must not import slack-bolt, aiohttp or anything else that talks to a
chat platform.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keyturn.config import (
    Checker,
    Config,
    Listener,
    SecretRef,
    Section,
    parse_duration,
    register_section,
)
from keyturn.config.yamldoc import KeyPath


@dataclass(frozen=True)
class SlackSettings:
    """``integrations.slack``: the Slack app the bots run as."""

    bot_token: SecretRef
    signing_secret: SecretRef | None
    app_token: SecretRef | None
    mode: str = "http"
    channel: str = ""
    connection_channels: dict[str, str] = field(default_factory=dict)
    policy_channels: dict[str, str] = field(default_factory=dict)
    reminders: tuple[float, ...] = ()
    api_base_url: str | None = None
    statement_chars: int = 700

    def channel_for(self, connection: str, policy: str | None) -> str:
        return (self.connection_channels.get(connection)
                or (self.policy_channels.get(policy) if policy else None) or self.channel)


@dataclass(frozen=True)
class TeamsSettings:
    """``integrations.teams``: the Azure Bot registration and where cards go."""

    app_id: str
    app_password: SecretRef
    tenant_id: str
    service_url: str
    conversation_id: str
    connection_conversations: dict[str, str] = field(default_factory=dict)
    # conversation id -> the name people know it by, for ticket timelines
    conversation_names: dict[str, str] = field(default_factory=dict)
    reminders: tuple[float, ...] = ()
    openid_metadata_url: str = "https://login.botframework.com/v1/.well-known/openidconfiguration"
    issuer: str = "https://api.botframework.com"
    token_url: str = "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token"
    statement_chars: int = 700

    def conversation_for(self, connection: str) -> str:
        return self.connection_conversations.get(connection) or self.conversation_id


@dataclass(frozen=True)
class ChatSettings:
    """The bots process: its HTTP listener and the platforms it serves."""

    listen: Listener = Listener("127.0.0.1", 3000)
    slack: SlackSettings | None = None
    teams: TeamsSettings | None = None
    poll_interval: float = 0.5


def _integrations(check: Checker, value: Any, config: Config) -> ChatSettings | None:
    at = ("integrations",)
    m = check.mapping(value, at, {"listen", "poll_interval", "slack", "teams"})
    if not m.get("slack") and not m.get("teams"):
        return None
    listen = check.listener(m["listen"], at + ("listen",)) if "listen" in m else \
        Listener("127.0.0.1", 3000)
    poll = check.duration(m.get("poll_interval", 0.5), at + ("poll_interval",))
    slack = _slack(check, m["slack"], config) if m.get("slack") else None
    teams = _teams(check, m["teams"], config) if m.get("teams") else None
    return ChatSettings(listen, slack, teams, poll)


def _chars(check: Checker, m: dict, at: KeyPath) -> int:
    n = m.get("statement_chars", 700)
    if not isinstance(n, int) or isinstance(n, bool) or not 80 <= n <= 2900:
        raise check.err(at + ("statement_chars",), "expected an integer from 80 to 2900")
    return n


def _slack(check: Checker, value: Any, config: Config) -> SlackSettings:
    at = ("integrations", "slack")
    secrets = {f"{k}_{s}" for k in ("bot_token", "signing_secret", "app_token")
               for s in ("env", "file")}
    m = check.mapping(value, at, secrets | {"mode", "channel", "channels", "reminders",
                                            "api_base_url", "statement_chars"})
    mode = m.get("mode", "http")
    if mode not in ("http", "socket"):
        raise check.err(at + ("mode",), "expected http or socket")
    bot = check.required_secret(m, "bot_token", at, "the bot token (xoxb-...) is required")
    signing = check.secret(m, "signing_secret", at)
    app_token = check.secret(m, "app_token", at)
    if mode == "http" and signing is None:
        raise check.err(at + ("signing_secret_env",), "HTTP mode checks request signatures: "
                        "give signing_secret_env or signing_secret_file")
    if mode == "socket" and app_token is None:
        raise check.err(at + ("app_token_env",), "Socket Mode needs an app-level token "
                        "(xapp-...): give app_token_env or app_token_file")
    channel = check.string(m.get("channel"), at + ("channel",))
    ch = check.mapping(m.get("channels"), at + ("channels",), {"connections", "policies"})
    conn_ch = check.name_map(ch.get("connections"), at + ("channels", "connections"),
                             config.connections, "connection")
    pol_ch = check.name_map(ch.get("policies"), at + ("channels", "policies"),
                            config.policies, "policy")
    reminders = _reminders(check, m, at)
    base = check.url(m["api_base_url"], at + ("api_base_url",)) if "api_base_url" in m \
        else None
    if base and not base.endswith("/"):
        base += "/"
    return SlackSettings(bot, signing, app_token, mode, channel, conn_ch, pol_ch,
                         reminders, base, _chars(check, m, at))


def _reminders(check: Checker, m: dict, at: KeyPath) -> tuple[float, ...]:
    """``reminders: [10m, 2m]``: times before expiry, longest first."""
    raw = m.get("reminders") or []
    if not isinstance(raw, list):
        raw = [raw]
    out = []
    for i, r in enumerate(raw):
        try:
            out.append(parse_duration(r))
        except ValueError as exc:
            raise check.err(at + ("reminders", i), f"{exc} (time before expiry)") from exc
    return tuple(sorted(out, reverse=True))


def _teams(check: Checker, value: Any, config: Config) -> TeamsSettings:
    at = ("integrations", "teams")
    m = check.mapping(value, at, {"app_id", "app_password_env", "app_password_file",
                                  "tenant_id", "service_url", "conversation_id",
                                  "conversations", "openid_metadata_url", "issuer",
                                  "token_url", "statement_chars", "reminders"})
    conv = check.mapping(m.get("conversations"), at + ("conversations",),
                         {"connections", "names"})
    names = check.mapping(conv.get("names"), at + ("conversations", "names"))
    for k, v in names.items():
        check.string(v, at + ("conversations", "names", k))
    defaults = TeamsSettings("", SecretRef(), "", "", "")
    return TeamsSettings(
        app_id=check.string(m.get("app_id"), at + ("app_id",)),
        app_password=check.required_secret(m, "app_password", at,
                                           "the bot's client secret is required"),
        tenant_id=check.string(m.get("tenant_id"), at + ("tenant_id",)),
        service_url=check.url(m.get("service_url"), at + ("service_url",)).rstrip("/"),
        conversation_id=check.string(m.get("conversation_id"), at + ("conversation_id",)),
        connection_conversations=check.name_map(
            conv.get("connections"), at + ("conversations", "connections"),
            config.connections, "connection"),
        conversation_names={str(k): str(v) for k, v in names.items()},
        openid_metadata_url=check.url(m.get("openid_metadata_url",
                                            defaults.openid_metadata_url),
                                      at + ("openid_metadata_url",)),
        issuer=check.string(m.get("issuer", defaults.issuer), at + ("issuer",)),
        token_url=check.url(m.get("token_url", defaults.token_url), at + ("token_url",)),
        statement_chars=_chars(check, m, at),
        reminders=_reminders(check, m, at),
    )


CHAT: Section[ChatSettings | None] = register_section(Section(
    key="integrations", name="chat", validate=_integrations,
    exports=(ChatSettings, SlackSettings, TeamsSettings)))
