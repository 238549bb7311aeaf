"""Self-signed TLS certificates for the gateway's listener and for throwaway test servers.

This module only mints a local, self-signed certificate plus private key and writes them to disk
(key file mode 0600).  It is meant for development, the demo and the test suite.  It must not be
used as, or grow into, a certificate authority or anything that manages production PKI: there is
no chain, no revocation and no rotation here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ensure_self_signed", "make_self_signed"]

KeyType = Literal["ec", "rsa"]


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Split host names from IP literals: clients match IPs only against iPAddress SANs."""
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` so that the file is never readable by others, not even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # O_CREAT's mode is ignored for a file that already exists, so force it.
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def make_self_signed(
    cert_path: Path,
    key_path: Path,
    *,
    common_name: str = "localhost",
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 825,
    key_type: KeyType = "ec",
) -> None:
    """Create (or overwrite) a self-signed server certificate and its unencrypted private key.

    The certificate carries every entry of `hosts` as a subjectAltName (DNS names and IP
    addresses), so clients using `sslmode=verify-full` / hostname checking with the certificate
    itself as the trust root accept it.  EC P-256 is the default because it is fast to generate;
    pass ``key_type="rsa"`` for RSA 2048 when a peer cannot do ECDSA.
    """
    cert_path = Path(cert_path)
    key_path = Path(key_path)
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    if not hosts:
        raise ValueError("hosts must name at least one DNS name or IP address")

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(f"key_type must be 'ec' or 'rsa', got {key_type!r}")

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    # Backdate a little so a peer whose clock is slightly behind does not see "not yet valid".
    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        # An end-entity certificate: strict verifiers (Go, rustls) reject a CA cert used as a
        # server certificate, while OpenSSL accepts this self-signed leaf as its own trust root.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                # RSA key exchange needs keyEncipherment; it is meaningless for EC keys.
                key_encipherment=key_type == "rsa",
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = builder.sign(key, hashes.SHA256())

    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    # Key first: a certificate on disk without its key is a confusing half-state for callers of
    # ensure_self_signed, which only checks existence.
    _write_private(
        key_path,
        key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        ),
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure_self_signed(
    cert_path: Path,
    key_path: Path,
    *,
    common_name: str = "localhost",
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 825,
    key_type: KeyType = "ec",
) -> bool:
    """Create the certificate and key only if either file is missing.

    Returns True when new files were written, False when both already existed (their contents
    are not inspected, so a stale or mismatched pair is left for the caller to notice).
    """
    if Path(cert_path).exists() and Path(key_path).exists():
        return False
    make_self_signed(
        cert_path,
        key_path,
        common_name=common_name,
        hosts=hosts,
        days=days,
        key_type=key_type,
    )
    return True
