"""Shared fixtures for the portal tests (import the ``*_fixture`` names; the
fixtures are called svc, app, client and auth): a real SQLite store, the real app,
a test client that signs in through the real login form, and helpers to make
tickets through keyturn.approvals (as the gateway does).

It must not write store rows by hand: tickets are made the way the gateway makes them,
so portal tests see what a real deployment shows.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from keyturn.approvals import TicketRequest
from keyturn.config import parse_config
from keyturn.services import Services, build_services
from portal import create_app
from portal.accounts import set_password
from proxies.postgres.holding import ticket_facts

PASSWORD = "correct-horse-battery"
USERS = ("alice", "bob", "dana", "erin", "carol", "mona", "adam")

CONFIG = """
store: {url: "sqlite:///%(db)s"}
portal:
  listen: 127.0.0.1:8080
%(portal_extra)s
identity:
  users:
    alice: {groups: [engineers], name: Alice Adams}
    bob: {groups: [approvers], name: Bob Brown}
    dana: {groups: [approvers]}
    erin: {groups: [approvers, engineers]}
    carol: {groups: [auditors]}
    mona: {groups: [managers]}
    adam: {groups: [admins]}
connections:
  - name: shop
    type: postgres
    target: {host: 127.0.0.1, port: 5432, user: app, password_env: SHOP_PW}
    policy: shop
  - name: billing
    type: postgres
    target: {host: 127.0.0.1, port: 5432, user: app, password_env: SHOP_PW}
    policy: shop
policies:
  shop:
    rules:
      - name: reads
        match: {class: read}
        action: allow
      - name: no-ddl
        match: {class: ddl}
        action: block
      - name: writes
        match: {class: write}
        action: review
        reason: data changes need a second pair of eyes
        review: {approvers: [approvers], timeout: 10m}
"""


_TEMPLATE: dict[str, Path] = {}


def _template_db() -> Path:
    """A migrated store with every portal password set, made once per test run:
    password hashing is deliberately slow, so tests copy this file instead."""
    if "db" not in _TEMPLATE:
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="kt-portal-template-"))
        cfg = parse_config(CONFIG % {"db": base / "k.db", "portal_extra": ""},
                           str(base / "keyturn.yaml"))
        svc = build_services(cfg)
        for u in USERS:
            set_password(cfg, svc.store, u, PASSWORD)
        svc.store.dispose()
        _TEMPLATE["db"] = base / "k.db"
    return _TEMPLATE["db"]


def make_services(tmp: Path, portal_extra: str = "") -> Services:
    import shutil

    shutil.copy(_template_db(), tmp / "k.db")
    text = CONFIG % {"db": tmp / "k.db", "portal_extra": portal_extra}
    cfg = parse_config(text, str(tmp / "keyturn.yaml"))
    return build_services(cfg)


def make_ticket(svc: Services, requester: str = "alice", *, connection: str = "shop",
                statement: str = "DELETE FROM orders WHERE status = 'cancelled'",
                rule: str = "writes", approvers: tuple[str, ...] = ("approvers",),
                n: int = 1, timeout: float = 600, now: float | None = None) -> int:
    t = svc.approvals.create(TicketRequest(
        requester=requester, requester_groups=svc.config.groups_of(requester),
        connection=connection, statement=statement, classification="write", rule=rule,
        reason="data changes need a second pair of eyes", approver_groups=approvers,
        min_approvals=n, timeout=timeout, client_addr="10.0.0.7", application="psql",
        session_id="s-abc123", detail={"in_transaction": False, "row_estimate": 42},
        tables=("public.orders",), language="sql",
        facts=ticket_facts("write", ("public.orders",), 42, False)), now=now)
    return t.id


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


class Auth:
    """Sign in through the real login form (CSRF token included)."""

    def __init__(self, client: FlaskClient):
        self.client = client

    def login(self, user: str, password: str = PASSWORD) -> Any:
        page = self.client.get("/login")
        return self.client.post("/login", data={"username": user, "password": password,
                                                "csrf_token": csrf_of(page.text)})

    def csrf(self, path: str = "/tokens") -> str:
        return csrf_of(self.client.get(path).text)

    def post(self, path: str, data: dict[str, str] | None = None, *, htmx: bool = False,
             page: str = "/tokens") -> Any:
        token = self.csrf(page)
        headers = {"X-CSRF-Token": token, "HX-Request": "true"} if htmx else {}
        body = dict(data or {})
        if not htmx:
            body["csrf_token"] = token
        return self.client.post(path, data=body, headers=headers)


@pytest.fixture(name="svc")
def svc_fixture(tmp_path: Path) -> Services:
    return make_services(tmp_path)


@pytest.fixture(name="app")
def app_fixture(svc: Services) -> Iterator[Flask]:
    app = create_app(svc)
    app.config.update(TESTING=True)
    yield app
    app.extensions["keyturn_live"].feed.stop()  # the live pages' reader thread
    svc.store.dispose()


@pytest.fixture(name="client")
def client_fixture(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(name="auth")
def auth_fixture(client: FlaskClient) -> Auth:
    return Auth(client)


def now() -> float:
    return time.time()


def set_portal_password(kt: Any, user: str, password: str = PASSWORD) -> None:
    """``keyturn user set-password USER --password-stdin`` against a Keyturn's config."""
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "keyturn.launch", "-c", str(kt.config), "user",
                          "set-password", user, "--password-stdin"], input=password + "\n",
                         capture_output=True, text=True, env=dict(os.environ, **kt.env),
                         timeout=60)
    assert res.returncode == 0, res.stderr


def record_session(svc: Services, records: list[dict[str, Any]], *,
                   gateway_runs_on: bool = False) -> Any:
    """Records of a gateway session, the way the gateway makes them: written to the
    audit spool and taken into the store by the real ingester, which writes the session's
    transcript (the config's recordings directory) and seals it at its disconnect, or
    when the gateway stops. ``gateway_runs_on``: the spool stays open (returned; close
    it), as a gateway that is still running keeps it."""
    from keyturn.auditspool import AuditIngester, AuditSpool

    spool = AuditSpool(svc.config.gateway.audit_spool, "gw")
    for rec in records:
        spool.record(**rec)
    if gateway_runs_on:
        spool.flush()
    else:
        spool.close()
    AuditIngester(svc.audit, svc.config.gateway.audit_spool,
                  recordings=svc.config.gateway.recordings).run_once()
    return spool
