"""The config registry: connection types and sections registered by the packages that
own them, validated from YAML with errors naming file, line and key, and the launcher
starting the gateways the registry names.

A second protocol, ``test-kv``, exists only here: a target schema of its own (a URL, a
bucket, a token by reference), an option, a listener key (``gateway.kv``) and a gateway
class in this module. Nothing in keyturn/ knows it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest

from keyturn.config import (
    Checker,
    Config,
    ConnectionType,
    Listener,
    Option,
    SecretRef,
    Section,
    Target,
    parse_config,
    register_connection_type,
    register_section,
)
from keyturn.config.registry import unregister_connection_type, unregister_section
from keyturn.config.yamldoc import KeyPath
from keyturn.errors import ConfigError
from keyturn.launch.installed import gateways
from keyturn.request import Vocabulary, register, vocabularies

# ---------------------------------------------------------------- a test-only protocol


@dataclass(frozen=True)
class KvTarget(Target):
    bucket: str = ""
    token: SecretRef | None = None


def kv_target(check: Checker, value: Any, at: KeyPath, name: str) -> KvTarget:
    t = check.mapping(value, at, {"url", "bucket", "token_env", "token_file"})
    url = check.url(t.get("url"), at + ("url",))
    host, _, port = url.split("://", 1)[1].partition(":")
    return KvTarget(host=host, port=int(port or 443),
                    bucket=check.string(t.get("bucket", name), at + ("bucket",)),
                    token=check.secret(t, "token", at))


def kv_verbs(check: Checker, value: Any, at: KeyPath) -> tuple[str, ...]:
    verbs = check.str_list(value, at)
    for v in verbs:
        if v not in ("get", "put", "delete"):
            raise check.err(at, f"unknown verb {v!r}")
    return verbs


class FakeGateway:
    """What the launcher needs of a gateway: ``(services, spool)``, start, stop."""

    events: list[str] = []

    def __init__(self, services: Any, audit: Any):
        self.config = services.config

    async def start(self) -> None:
        listen = self.config.gateway.listener("kv")
        FakeGateway.events.append(f"start {listen.host}:{listen.port}")

    async def stop(self) -> None:
        FakeGateway.events.append("stop")


KV = ConnectionType(
    name="test-kv", target=kv_target, options={"verbs": Option(kv_verbs, ("get",))},
    listener="kv", default_listener=Listener("127.0.0.1", 7379),
    gateway=f"{__name__}:FakeGateway")


@pytest.fixture()
def kv() -> Iterator[ConnectionType]:
    if not any(v.protocol == "test-kv" for v in vocabularies()):
        register(Vocabulary(protocol="test-kv", classes=("read", "write", "unknown"),
                            write_classes=frozenset({"write"}), resources=("keys",)))
    register_connection_type(KV)
    yield KV
    unregister_connection_type(KV.name)


BASE = """\
store: {url: "sqlite:///:memory:"}
identity: {users: {alice: {groups: [engineers]}}}
policies: {p: []}
connections:
  - {name: shop, type: postgres, target: {host: 127.0.0.1}, policy: p}
"""


def parse(text: str) -> Config:
    return parse_config(BASE + text, "k.yaml")


def error(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse(text)
    return str(exc.value)


# ---------------------------------------------------------------- connection types

def test_an_unregistered_connection_type_names_file_line_key_and_the_installed_types() -> None:
    msg = error("  - name: orders\n    type: mysql\n    target: {host: h}\n    policy: p\n")
    assert msg == ("k.yaml:7: connections[1].type: no gateway for connection type 'mysql' "
                   "is installed (installed: http, postgres, ssh)")
    assert error("  - {name: orders, target: {host: h}, policy: p}\n").startswith(
        "k.yaml:6: connections[1].type: is required (installed: http, postgres, ssh)")


def test_a_second_protocol_validates_its_own_target_options_and_listener(
        kv: ConnectionType) -> None:
    cfg = parse("""\
  - name: cache
    type: test-kv
    target: {url: "https://kv.internal:8443", token_env: KV_TOKEN}
    verbs: [get, put]
    policy: p
gateway:
  postgres: 127.0.0.1:6000
  kv: {host: 0.0.0.0, port: 7000}
""")
    conn = cfg.connections["cache"]
    assert conn.type == "test-kv"
    assert conn.target == KvTarget("kv.internal", 8443, "cache", SecretRef(env="KV_TOKEN"))
    assert conn.target.address == "kv.internal:8443"
    assert conn.option("verbs") == ("get", "put")
    # PostgreSQL's options are PostgreSQL's: the kv connection has none of them...
    assert conn.option("unknown_functions") is None
    # ...and the postgres connection kept its defaults.
    assert cfg.connections["shop"].option("unknown_functions") == "write"
    assert cfg.connections["shop"].target.address == "127.0.0.1:5432/shop"
    assert cfg.gateway.listener("kv") == Listener("0.0.0.0", 7000)
    assert cfg.gateway.listener("postgres") == Listener("127.0.0.1", 6000)
    assert cfg.gateway.postgres == Listener("127.0.0.1", 6000)  # the old spelling
    # A default listener when the file gives none.
    assert parse("  - {name: c, type: test-kv, target: {url: 'http://h'}, policy: p}\n"
                 ).gateway.listener("kv") == Listener("127.0.0.1", 7379)


@pytest.mark.parametrize("text, message", [
    ("  - name: cache\n    type: test-kv\n    target: {url: ftp://kv}\n    policy: p\n",
     "k.yaml:8: connections[1].target.url: expected an http(s) URL, got 'ftp://kv'"),
    ("  - name: cache\n    type: test-kv\n    target:\n      url: https://kv\n"
     "      token: s3cret\n    policy: p\n",
     "k.yaml:10: connections[1].target.token: secrets must not be inline; use token_env or "
     "token_file"),
    ("  - name: cache\n    type: test-kv\n    target: {url: https://kv}\n    policy: p\n"
     "    verbs: [get, scan]\n",
     "k.yaml:10: connections[1].verbs: unknown verb 'scan'"),
    # An option of another type is an unknown key here.
    ("  - name: cache\n    type: test-kv\n    target: {url: https://kv}\n    policy: p\n"
     "    unknown_functions: read\n",
     "k.yaml:10: connections[1].unknown_functions: unknown key (expected one of: "
     "description, name, policy, target, type, verbs)"),
    ("  - {name: cache, type: test-kv, target: {url: https://kv}, policy: p}\n"
     "gateway:\n  kv: somewhere\n",
     "k.yaml:8: gateway.kv: expected HOST:PORT or a port number, got 'somewhere'"),
    ("  - {name: cache, type: test-kv, target: {url: https://kv}, policy: p}\n"
     "gateway:\n  postgres: 127.0.0.1:7000\n  kv: 127.0.0.1:7000\n",
     "k.yaml:9: gateway.kv: 127.0.0.1:7000 is already the listener of gateway.postgres"),
])
def test_a_second_protocols_errors_name_file_line_and_key(kv: ConnectionType, text: str,
                                                          message: str) -> None:
    assert error(text) == message


def test_a_listener_key_exists_only_while_its_type_is_registered() -> None:
    assert "k.yaml:7: gateway.kv: unknown key" in error("gateway:\n  kv: 7000\n")


def test_a_type_whose_gateway_has_no_listener_is_refused(kv: ConnectionType) -> None:
    register_connection_type(ConnectionType(
        name="test-kv", target=kv_target, listener="kv", gateway=KV.gateway))
    assert error("  - {name: c, type: test-kv, target: {url: 'http://h'}, policy: p}\n") == \
        "k.yaml:6: connections[1].type: test-kv connections need a listener: give " \
        "gateway.kv: HOST:PORT"


# ---------------------------------------------------------------- sections

@dataclass(frozen=True)
class ReportSettings:
    every: float
    to: tuple[str, ...]


def reports(check: Checker, value: Any, config: Config) -> ReportSettings | None:
    if value is None:
        return None
    m = check.mapping(value, ("reports",), {"every", "to"})
    to = check.str_list(m.get("to"), ("reports", "to"))
    for group in to:
        if not config.members_of(group):
            raise check.err(("reports", "to"), f"no user is in group {group!r}")
    return ReportSettings(check.duration(m.get("every", "1d"), ("reports", "every")), to)


@pytest.fixture()
def report_section() -> Iterator[Section[ReportSettings | None]]:
    section = register_section(Section("reports", "reports", reports,
                                       exports=(ReportSettings,)))
    yield section
    unregister_section("reports")


def test_an_edge_section_is_validated_with_lines_and_read_typed(
        report_section: Section[ReportSettings | None]) -> None:
    cfg = parse("reports:\n  every: 7d\n  to: engineers\n")
    assert report_section.of(cfg) == ReportSettings(7 * 86400.0, ("engineers",))
    assert cfg.reports is report_section.of(cfg)  # type: ignore[attr-defined]
    assert error("reports:\n  every: 7d\n  to: [nobody]\n") == \
        "k.yaml:8: reports.to: no user is in group 'nobody'"
    assert error("reports:\n  every: soon\n") == \
        "k.yaml:7: reports.every: not a duration: 'soon' (use e.g. 30s, 10m, 1h)"
    import keyturn.config

    assert keyturn.config.ReportSettings is ReportSettings  # type: ignore[attr-defined]


def test_an_unregistered_section_is_an_unknown_key() -> None:
    assert error("reports: {every: 1d}\n").startswith("k.yaml:6: reports: unknown key")
    import keyturn.config

    with pytest.raises(AttributeError, match="ReportSettings"):
        keyturn.config.ReportSettings  # type: ignore[attr-defined]  # noqa: B018


def test_the_core_model_knows_no_web_or_chat_settings() -> None:
    from bots.settings import CHAT
    from portal.settings import PORTAL

    names = {f.name for f in fields(Config)}
    assert not names & {"portal", "chat", "oidc", "slack", "teams"}
    cfg = parse("portal: {listen: 8181}\n")
    # Registered by portal/ and bots/, read typed or by the old attribute names.
    assert PORTAL.of(cfg).public_url == "http://127.0.0.1:8181" == cfg.portal.public_url  # type: ignore[attr-defined]
    assert CHAT.of(cfg) is None and cfg.chat is None  # type: ignore[attr-defined]


def test_registrations_are_light_in_a_fresh_process(tmp_path: Path) -> None:
    """Every process imports every registration before it reads a config: that must not
    load a surface, a gateway or an event loop (import-linter cannot see package
    ``__init__`` modules run on the way)."""
    (tmp_path / "k.yaml").write_text(BASE + "portal: {listen: 8181}\n"
                                     "integrations: {slack: {bot_token_env: T, "
                                     "signing_secret_env: S, channel: C}}\n")
    heavy = ["flask", "werkzeug", "slack_bolt", "aiohttp", "uvloop", "asyncio", "sqlalchemy",
             "psycopg", "proxies.postgres.gateway", "proxies.postgres.codec", "portal.auth",
             "bots.server"]
    script = textwrap.dedent(f"""
        import sys
        from keyturn.launch.installed import install
        from keyturn.config import load_config
        install()
        cfg = load_config({str(tmp_path / "k.yaml")!r})
        assert cfg.chat.slack.channel == "C" and cfg.portal.listen.port == 8181
        print(",".join(m for m in {heavy!r} if m in sys.modules))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


# ---------------------------------------------------------------- the launcher

def test_the_launcher_starts_the_gateways_that_have_work(kv: ConnectionType) -> None:
    both = parse("  - {name: cache, type: test-kv, target: {url: 'http://h'}, policy: p}\n"
                 "gateway: {kv: 7001}\n")
    plans = gateways(both)
    assert [(p.ctype.name, p.listen, p.connections) for p in plans] == [
        ("postgres", Listener("127.0.0.1", 6432), ("shop",)),
        ("test-kv", Listener("127.0.0.1", 7001), ("cache",))]
    from proxies.postgres.gateway import PostgresGateway

    assert plans[0].load() is PostgresGateway and plans[1].load() is FakeGateway
    # No connection of a type: nothing of it starts, even with its listener configured.
    only_pg = parse("gateway: {kv: 7001}\n")
    assert [p.ctype.name for p in gateways(only_pg)] == ["postgres"]
    # A type registered without a gateway class is validated but never started.
    register_connection_type(ConnectionType(name="test-kv", target=kv_target,
                                            listener="kv", default_listener=Listener("::1", 1)))
    assert [p.ctype.name for p in gateways(both)] == ["postgres"]


def test_the_runner_starts_only_the_registered_gateway_with_connections(
        kv: ConnectionType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from keyturn.launch import runner

    class NoIngester:
        def __init__(self, config: Config):
            pass

        def start(self) -> None:
            pass

        def check(self) -> None:
            pass

        def stop(self) -> None:
            pass

    monkeypatch.setattr(runner, "Ingester", NoIngester)
    cfg = parse_config(textwrap.dedent(f"""\
        store: {{url: "sqlite:///{tmp_path}/k.db"}}
        identity: {{users: {{alice: {{groups: [engineers]}}}}}}
        policies: {{p: []}}
        connections:
          - {{name: cache, type: test-kv, target: {{url: 'http://h'}}, policy: p}}
        gateway: {{kv: 127.0.0.1:7002, audit_spool: spool}}
    """), str(tmp_path / "keyturn.yaml"))
    FakeGateway.events.clear()

    def ready(services: Any) -> None:
        FakeGateway.events.append("ready")
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the runner's loop: a clean stop

    assert runner.run(cfg, gateway=True, portal=False, bots=False, ready=ready) == 0
    # No postgres connection: the PostgreSQL gateway was not started (it would have
    # listened on 6432 and read the catalogs of its connections).
    assert FakeGateway.events == ["start 127.0.0.1:7002", "ready", "stop"]
