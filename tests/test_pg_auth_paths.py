"""Login paths through the gateway against real servers: every target
authentication method (with and without TLS), cleartext tokens only inside
TLS, and the audit queue flushed on SIGTERM.

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, make_keyturn

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("auth, stored, ssl", [
    ("trust", None, False),
    ("password", "scram-sha-256", False),
    ("md5", "md5", True),
    ("scram-sha-256", "scram-sha-256", True),
])
def test_target_authentication_methods(tmp_path: Path, auth: str, stored: str | None,
                                       ssl: bool) -> None:
    pg = LocalPostgres(tmp_path / "pg", auth=auth, ssl=ssl)
    pg.start()
    try:
        pg.create_role("app", APP_PASSWORD, password_encryption=stored)
        pg.create_database("shop", owner="app")
        kt = make_keyturn(tmp_path / "kt", pg, target_sslmode="require" if ssl else "disable")
        kt.start()
        try:
            with psycopg.connect(kt.dsn("alice")) as c:
                row = c.execute("SELECT current_user, ssl FROM pg_stat_ssl "
                                "WHERE pid = pg_backend_pid()").fetchone()
            assert row == ("app", ssl)
        finally:
            assert kt.stop() == 0
        log = kt.log()
        assert "Traceback" not in log, log
    finally:
        pg.stop()


def test_cleartext_token_only_inside_tls(pg: LocalPostgres, tmp_path: Path) -> None:
    kt = make_keyturn(tmp_path / "kt", pg, client_auth="password")
    kt.start()
    try:
        # Inside TLS the gateway asks for the password in clear (over the TLS channel).
        with psycopg.connect(kt.dsn("alice", sslmode="require"),
                             require_auth="password") as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        # Without TLS it insists on SCRAM: a client that only allows cleartext is refused.
        with pytest.raises(psycopg.OperationalError, match="SASL|scram|password"):
            psycopg.connect(kt.dsn("alice"), require_auth="password")
        with psycopg.connect(kt.dsn("alice"), require_auth="scram-sha-256") as c:
            assert c.execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(kt.dsn("alice", sslmode="require").replace(
                kt.tokens["alice"], kt.tokens["bob"]))
    finally:
        kt.stop()


def test_sigterm_flushes_every_audit_record(pg: LocalPostgres, tmp_path: Path) -> None:
    kt = make_keyturn(tmp_path / "kt", pg)
    kt.start()
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        for i in range(300):
            c.execute(f"SELECT {i}")
    assert kt.stop() == 0  # SIGTERM right after the last statement
    export = kt.cli("audit", "export").stdout
    selects = [line for line in export.splitlines() if '"statement": "SELECT ' in line]
    assert len(selects) == 300
    assert "audit chain OK" in kt.cli("audit", "verify").stdout


def test_audit_verify_cli_detects_a_tampered_record(pg: LocalPostgres, tmp_path: Path) -> None:
    import sqlite3

    kt = make_keyturn(tmp_path / "kt", pg)
    kt.start()
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        c.execute("SELECT 'before tampering'")
    assert kt.stop() == 0
    ok = kt.cli("audit", "verify")
    assert ok.returncode == 0 and "audit chain OK" in ok.stdout and "BROKEN" not in ok.stdout
    with sqlite3.connect(kt.base / "keyturn.db") as db:
        db.execute("UPDATE audit_records SET statement = 'SELECT 1' "
                   "WHERE statement = 'SELECT ''before tampering'''")
    bad = kt.cli("audit", "verify", check=False)
    assert bad.returncode == 1 and "BROKEN" in bad.stdout and "edited" in bad.stdout
