"""``integrations`` in keyturn.yaml: validated at start-up with errors that
name the key and the line; secrets only by reference.

These tests need no server and must not start one: a config is read, and ``keyturn
bots`` is run only where it stops before starting anything.
"""

from __future__ import annotations

import subprocess

import pytest

from keyturn.config import parse_config
from keyturn.errors import ConfigError
from tests.conftest import KEYTURN

BASE = """\
identity:
  users:
    alice: {groups: [engineers]}
connections:
  - {name: shop, type: postgres, target: {host: 127.0.0.1}, policy: shop}
policies:
  shop: {rules: []}
integrations:
"""


def parse(integrations: str):  # type: ignore[no-untyped-def]
    return parse_config(BASE + integrations, "keyturn.yaml")


def test_full_slack_and_teams_config_is_typed() -> None:
    cfg = parse("""\
  listen: 127.0.0.1:3999
  slack:
    mode: socket
    bot_token_env: SLACK_BOT_TOKEN
    app_token_file: /run/secrets/slack-app
    channel: "#approvals"
    channels: {connections: {shop: C1}, policies: {shop: C2}}
    reminders: [5m, 1m]
  teams:
    app_id: app-1
    app_password_env: TEAMS_SECRET
    tenant_id: t-1
    service_url: https://smba.trafficmanager.net/emea/
    conversation_id: "19:x@thread.tacv2"
""")
    assert cfg.chat is not None and cfg.chat.listen.port == 3999
    s = cfg.chat.slack
    assert s is not None and s.mode == "socket" and s.reminders == (300.0, 60.0)
    assert s.bot_token.env == "SLACK_BOT_TOKEN" and s.signing_secret is None
    assert s.channel_for("shop", "shop") == "C1" and s.channel_for("other", None) == "#approvals"
    t = cfg.chat.teams
    assert t is not None and t.service_url == "https://smba.trafficmanager.net/emea"
    assert t.openid_metadata_url.startswith("https://login.botframework.com/")


@pytest.mark.parametrize("body, message", [
    ("  slack: {bot_token: xoxb-1, channel: C1}\n",
     "keyturn.yaml:9: integrations.slack.bot_token: secrets must not be inline"),
    ("  slack: {bot_token_env: T, channel: C1}\n",
     "keyturn.yaml:9: integrations.slack.signing_secret_env: HTTP mode checks request"),
    ("  slack: {bot_token_env: T, mode: socket, channel: C1}\n",
     "integrations.slack.app_token_env: Socket Mode needs an app-level token"),
    ("  slack: {bot_token_env: T, mode: socket, app_token: xapp-1, channel: C1}\n",
     "integrations.slack.app_token: secrets must not be inline"),
    ("  slack: {bot_token_env: T, signing_secret_env: S, mode: webhook, channel: C1}\n",
     "integrations.slack.mode: expected http or socket"),
    ("  slack: {bot_token_env: T, signing_secret_env: S}\n",
     "integrations.slack.channel: is required"),
    ("  slack:\n    bot_token_env: T\n    signing_secret_env: S\n    channel: C\n"
     "    channels: {connections: {nope: C2}}\n",
     "keyturn.yaml:13: integrations.slack.channels.connections.nope: unknown connection"),
    ("  slack:\n    bot_token_env: T\n    signing_secret_env: S\n    channel: C\n"
     "    reminders: [soon]\n",
     "keyturn.yaml:13: integrations.slack.reminders[0]: not a duration"),
    ("  slack: {bot_token_env: T, signing_secret_env: S, channel: C, colour: red}\n",
     "integrations.slack.colour: unknown key"),
    ("  teams: {app_id: a, app_password: p, tenant_id: t, service_url: https://x, "
     "conversation_id: c}\n", "integrations.teams.app_password: secrets must not be inline"),
    ("  teams: {app_id: a, app_password_env: P, tenant_id: t, service_url: ftp://x, "
     "conversation_id: c}\n", "integrations.teams.service_url: expected an http(s) URL"),
    ("  teams: {app_password_env: P, tenant_id: t, service_url: https://x, "
     "conversation_id: c}\n", "integrations.teams.app_id: is required"),
    ("  chatty: {}\n", "integrations.chatty: unknown key"),
])
def test_bad_integrations_are_named_with_their_line(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(body)
    assert message in str(exc.value)


def test_bots_command_without_integrations_says_so(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "keyturn.yaml"
    cfg.write_text(BASE.replace("integrations:\n", f"store: {{url: 'sqlite:///{tmp_path}/k.db'}}\n"))
    res = subprocess.run([*KEYTURN, "-c", str(cfg), "bots"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "no integrations configured" in res.stderr


def test_demo_config_takes_integrations_from_its_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from keyturn.config import load_config
    from keyturn.launch.demo import write_demo

    def write():  # type: ignore[no-untyped-def]
        return load_config(write_demo(tmp_path, pg_port=5999, gateway_port=6999,
                                      portal_port=8999, pw_file=tmp_path / "pw",
                                      cert=tmp_path / "c", key=tmp_path / "k"))

    assert write().chat is None
    (tmp_path / "integrations.yaml").write_text(
        "integrations:\n  slack: {bot_token_env: T, signing_secret_env: S, channel: C1}\n")
    cfg = write()
    assert cfg.chat is not None and cfg.chat.slack is not None
    assert cfg.chat.slack.channel == "C1"
