"""Tests for the throwaway-PostgreSQL helper, the self-signed TLS helper and the demo seed.

Integration tests start real clusters (one per fixture, module-scoped to keep initdb runs to
two); the pure helpers (certificates, Luhn, fake data) are tested without a server.  These tests
must not depend on a PostgreSQL server other than the ones they start.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keyturn import tlsutil
from keyturn.launch.demo_seed import fake_customers, luhn_check_digit, seed_shop
from keyturn.launch.localpg import LocalPostgres, LocalPostgresError

SSN_RE = re.compile(r"^(\d{3})-(\d{2})-(\d{4})$")
PHONE_RE = re.compile(r"^\(\d{3}\) 555-01\d{2}$")
EMAIL_RE = re.compile(r"^[a-z]+\.[a-z]+\d*@example\.(com|org|net)$")
# created_at is left out: it defaults to now() and differs between seedings.
CUSTOMERS_FINGERPRINT = (
    "SELECT md5(string_agg(concat_ws('|', id, full_name, email, ssn, card_number, phone, city),"
    " ',' ORDER BY id)) FROM customers"
)


def luhn_ok(number: str) -> bool:
    """Independent Luhn check (deliberately not reusing demo_seed's helper)."""
    digits = [int(c) for c in number]
    odd = digits[-1::-2]
    even = [sum(divmod(2 * d, 10)) for d in digits[-2::-2]]
    return (sum(odd) + sum(even)) % 10 == 0


def assert_ssn_shape(ssn: str) -> None:
    match = SSN_RE.match(ssn)
    assert match, ssn
    area, group, serial = (int(part) for part in match.groups())
    assert area != 0 and area != 666 and area < 900, ssn
    assert group != 0 and serial != 0, ssn


# --------------------------------------------------------------------------- pure helpers


def test_self_signed_cert_has_sans_and_private_key(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "c" / "server.crt", tmp_path / "k" / "server.key"
    tlsutil.make_self_signed(cert_path, key_path, hosts=("localhost", "127.0.0.1", "::1"))

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.issuer == cert.subject


def test_ensure_self_signed_only_creates_when_missing(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    assert tlsutil.ensure_self_signed(cert_path, key_path, key_type="rsa") is True
    first = cert_path.read_bytes()
    assert isinstance(
        x509.load_pem_x509_certificate(first).public_key(), rsa.RSAPublicKey
    )
    assert tlsutil.ensure_self_signed(cert_path, key_path) is False
    assert cert_path.read_bytes() == first
    key_path.unlink()
    assert tlsutil.ensure_self_signed(cert_path, key_path) is True
    assert cert_path.read_bytes() != first


def test_luhn_check_digit_matches_reference() -> None:
    # The textbook example: 7992739871 completes to 79927398713.
    assert luhn_check_digit("7992739871") == 3
    assert luhn_ok("79927398713")


def test_fake_customers_are_deterministic_and_well_formed() -> None:
    first = list(fake_customers(300, random.Random(7)))
    again = list(fake_customers(300, random.Random(7)))
    assert first == again
    assert len({c.email for c in first}) == 300
    for customer in first:
        assert EMAIL_RE.match(customer.email), customer.email
        assert_ssn_shape(customer.ssn)
        assert PHONE_RE.match(customer.phone), customer.phone
        assert len(customer.card_number) == 16 and customer.card_number[0] in "45"
        assert luhn_ok(customer.card_number), customer.card_number


def test_invalid_auth_method_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="auth must be one of"):
        LocalPostgres(tmp_path, auth="ident")


# --------------------------------------------------------------------------- real clusters


@pytest.fixture(scope="module")
def scram_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    pg = LocalPostgres(tmp_path_factory.mktemp("pg-scram"), auth="scram-sha-256")
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.mark.integration
def test_cluster_layout_and_timing(scram_pg: LocalPostgres) -> None:
    assert scram_pg.is_running()
    assert scram_pg.superuser_password
    assert scram_pg.initdb_seconds is not None and scram_pg.startup_seconds is not None
    # Not a benchmark, just a tripwire for a start that silently waits out its timeout.
    assert scram_pg.startup_seconds < 15
    assert (scram_pg.base_dir / "postgres.log").stat().st_size > 0
    if os.geteuid() == 0:
        # PostgreSQL refuses root, so the server files belong to the service user.
        assert scram_pg.data_dir.stat().st_uid != 0
        assert scram_pg.socket_dir.stat().st_uid != 0
    with psycopg.connect(scram_pg.dsn()) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('fsync', 'max_connections', 'port', 'listen_addresses', 'ssl')"
            ).fetchall()
        )
    assert settings == {
        "fsync": "off",
        "max_connections": "200",
        "port": str(scram_pg.port),
        "listen_addresses": "127.0.0.1",
        "ssl": "off",
    }


@pytest.mark.integration
def test_tcp_requires_superuser_password(scram_pg: LocalPostgres) -> None:
    with psycopg.connect(scram_pg.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(scram_pg.dsn(user="postgres", password="wrong"))


@pytest.mark.integration
def test_password_storage_forms_and_scram_login(scram_pg: LocalPostgres) -> None:
    scram_pg.create_role("alice_md5", "md5-secret", password_encryption="md5")
    scram_pg.create_role("bob_scram", "scram-secret", password_encryption="scram-sha-256")
    scram_pg.create_role("nologin_role", None, login=False)

    with psycopg.connect(scram_pg.dsn()) as conn:
        stored = dict(
            conn.execute(
                "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                (["alice_md5", "bob_scram", "nologin_role"],),
            ).fetchall()
        )
    assert stored["alice_md5"].startswith("md5")
    assert stored["bob_scram"].startswith("SCRAM-SHA-256$")
    assert stored["nologin_role"] is None

    with psycopg.connect(scram_pg.dsn(user="bob_scram", password="scram-secret")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("bob_scram",)
    # A scram-sha-256 hba line cannot verify an md5-stored password; the md5 cluster below
    # shows the same role logging in.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(scram_pg.dsn(user="alice_md5", password="md5-secret"))


@pytest.mark.integration
def test_execute_and_create_database(scram_pg: LocalPostgres) -> None:
    scram_pg.create_role("app_owner", "owner-secret")
    scram_pg.create_database("app db", owner="app_owner")
    # Several statements in one call, and a literal % that must not be taken as a placeholder.
    scram_pg.execute(
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('100%'); GRANT SELECT ON t TO app_owner",
        dbname="app db",
    )
    with psycopg.connect(scram_pg.dsn("app db", "app_owner", "owner-secret")) as conn:
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        ).fetchone()
        assert owner == ("app_owner",)
        assert conn.execute("SELECT v FROM t").fetchall() == [("100%",)]


@pytest.mark.integration
def test_seed_shop(scram_pg: LocalPostgres) -> None:
    scram_pg.create_database("shop")
    dsn = scram_pg.dsn("shop")
    seed_shop(dsn, customers=200, orders=1000)

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT full_name, email, ssn, card_number, phone, city FROM customers ORDER BY id"
        ).fetchall()
        assert len(rows) == 200
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1000,)
        orphans = conn.execute(
            "SELECT count(*) FROM orders o LEFT JOIN customers c ON c.id = o.customer_id "
            "WHERE c.id IS NULL OR o.total <= 0 OR o.placed_at IS NULL"
        ).fetchone()
        assert orphans == (0,)
        fingerprint = conn.execute(CUSTOMERS_FINGERPRINT).fetchone()

    emails = [row[1] for row in rows]
    assert len(set(emails)) == len(emails)
    for full_name, email, ssn, card, phone, city in rows:
        assert full_name and city
        assert EMAIL_RE.match(email), email
        assert_ssn_shape(ssn)
        assert len(card) == 16 and card[0] in "45" and luhn_ok(card), card
        assert PHONE_RE.match(phone), phone

    # Re-seeding replaces the tables instead of failing or appending, with identical data.
    seed_shop(dsn, customers=200, orders=1000)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1000,)
        assert conn.execute(CUSTOMERS_FINGERPRINT).fetchone() == fingerprint


@pytest.mark.integration
def test_ssl_md5_cluster_lifecycle(tmp_path: Path) -> None:
    # A base dir long enough that base_dir/sock would overflow the unix socket path limit.
    base = tmp_path / ("long-" * 14) / "cluster"
    pg = LocalPostgres(base, auth="md5", ssl=True)
    assert pg.socket_dir.parent != pg.base_dir
    with pg:
        assert pg.socket_dir.exists()
        with psycopg.connect(pg.dsn(), sslmode="require") as conn:
            assert conn.info.pgconn.ssl_in_use
        # The certificate is its own trust root and names 127.0.0.1, so verify-full passes.
        with psycopg.connect(
            pg.dsn(), sslmode="verify-full", sslrootcert=str(pg.ssl_cert_path)
        ) as conn:
            assert conn.info.pgconn.ssl_in_use
        assert stat.S_IMODE(pg.ssl_key_path.stat().st_mode) == 0o600

        # md5 hba lines accept md5-stored passwords and negotiate SCRAM for scram-stored ones.
        pg.create_role("alice_md5", "md5-secret", password_encryption="md5")
        pg.create_role("bob_scram", "scram-secret", password_encryption="scram-sha-256")
        for user, password in (("alice_md5", "md5-secret"), ("bob_scram", "scram-secret")):
            with psycopg.connect(pg.dsn(user=user, password=password), sslmode="require") as c:
                assert c.execute("SELECT current_user").fetchone() == (user,)

        pg.stop()
        assert not pg.is_running()
        assert not pg.socket_dir.exists()
        pg.stop()  # stopping a stopped cluster is harmless

        # Restarting reuses the data dir, roles and password; a fresh handle on the same
        # base dir finds the stored superuser password.
        reopened = LocalPostgres(base, auth="md5", ssl=True)
        assert reopened.superuser_password == pg.superuser_password
        reopened.start()
        try:
            assert reopened.initdb_seconds is None
            with psycopg.connect(reopened.dsn("postgres", "alice_md5", "md5-secret")) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            reopened.stop()
    assert not pg.is_running()
    pg.stop()


@pytest.mark.integration
def test_start_error_includes_log_tail(tmp_path: Path) -> None:
    pg = LocalPostgres(tmp_path / "bad", settings={"shared_buffers": "not-a-size"})
    with pytest.raises(LocalPostgresError, match="shared_buffers") as excinfo:
        pg.start(timeout=10)
    assert "tail of" in str(excinfo.value)
    assert not pg.is_running()
    pg.stop()
