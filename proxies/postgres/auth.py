"""Sans-I/O authentication helpers for the PostgreSQL gateway.

What this module is for:
  * ``scram_verifier``: derive the SCRAM-SHA-256 verifier stored for an
    access token, exactly as PostgreSQL would for the same password;
  * ``ScramServer``: run the SCRAM-SHA-256 exchange with a client that logs
    in to the gateway, accepting any one of several verifiers that share a
    salt (a user may hold several live access tokens);
  * ``TargetAuthenticator``: answer a real server's AuthenticationXXX
    requests with stored credentials (cleartext, md5, SCRAM-SHA-256).

What it must not do:
  * no sockets or asyncio: callers pass decoded request bodies in and write
    the returned bytes out;
  * no credential storage or user lookup: callers supply verifiers and
    passwords, and decide what an unknown user looks like (``mock_salt``);
  * no channel binding (SCRAM-SHA-256-PLUS): it is neither offered nor
    accepted, and asking for it fails loudly rather than silently.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

from keyturn.identity import salted_keys

from . import codec

SCRAM_SHA_256: Final = "SCRAM-SHA-256"
DEFAULT_ITERATIONS: Final = 4096
# A hostile target could announce an enormous iteration count to burn our CPU.
MAX_ITERATIONS: Final = 10_000_000
_NONCE_BYTES: Final = 18  # same as PostgreSQL; 24 base64 characters


class AuthError(Exception):
    """Authentication failed or cannot be carried out."""

    def __init__(self, message: str, sqlstate: str = "28000") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


class ScramError(AuthError):
    """A client's SCRAM exchange with the gateway failed."""

    def __init__(self, message: str, sqlstate: str = "28P01") -> None:
        super().__init__(message, sqlstate)


# --------------------------------------------------------------------------
# Primitives


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str, error: type[AuthError]) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise error(f"malformed SCRAM message: invalid base64 in {what}") from None


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _new_nonce() -> str:
    return _b64(secrets.token_bytes(_NONCE_BYTES))


def _valid_nonce(nonce: str) -> bool:
    # RFC 5802: printable ASCII except ','.
    return bool(nonce) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in nonce)


def pg_saslprep(password: str) -> bytes:
    """Password bytes as PostgreSQL feeds them to SCRAM.

    PostgreSQL passes pure ASCII through untouched and, where SASLprep
    (RFC 4013) fails, falls back to the raw UTF-8 bytes instead of refusing
    the password; we mirror that so our verifiers match the server's.
    """
    raw = password.encode("utf-8")
    if password.isascii():
        return raw
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    )
    if not mapped:
        return raw
    for c in mapped:  # PostgreSQL checks the mapped (pre-normalisation) text
        if (
            stringprep.in_table_c12(c)
            or stringprep.in_table_c21_c22(c)
            or stringprep.in_table_c3(c)
            or stringprep.in_table_c4(c)
            or stringprep.in_table_c5(c)
            or stringprep.in_table_c6(c)
            or stringprep.in_table_c7(c)
            or stringprep.in_table_c8(c)
            or stringprep.in_table_c9(c)
            or stringprep.in_table_a1(c)
        ):
            return raw
    if any(stringprep.in_table_d1(c) for c in mapped):
        if any(stringprep.in_table_d2(c) for c in mapped):
            return raw
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            return raw
    return unicodedata.normalize("NFKC", mapped).encode("utf-8")


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def scram_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> ScramVerifier:
    if iterations < 1:
        raise ValueError("iterations must be positive")
    if salt is None:
        salt = secrets.token_bytes(16)  # PostgreSQL's salt length
    _, stored_key, server_key = salted_keys(pg_saslprep(password), salt, iterations)
    return ScramVerifier(salt, iterations, stored_key, server_key)


def mock_salt(server_secret: bytes, username: str) -> bytes:
    """Stable fake salt for an unknown user, so probing cannot tell users apart."""
    return _hmac(server_secret, b"keyturn-scram-mock-salt\0" + username.encode("utf-8"))[:16]


# --------------------------------------------------------------------------
# Server side: clients logging in to the gateway


class ScramServer:
    """One SCRAM-SHA-256 exchange (no channel binding) against several verifiers.

    Every candidate must have been derived with ``salt`` and ``iterations``.
    With no candidates the exchange still runs normally and then fails, so an
    unknown user looks exactly like a wrong password.
    """

    def __init__(
        self,
        salt: bytes,
        iterations: int,
        candidates: Sequence[tuple[Any, bytes, bytes]],
        *,
        server_nonce: str | None = None,
    ) -> None:
        if iterations < 1:
            raise ValueError("iterations must be positive")
        if server_nonce is not None and not _valid_nonce(server_nonce):
            raise ValueError("invalid server nonce")
        self._salt = salt
        self._iterations = iterations
        self._candidates = tuple(candidates)
        self._server_nonce = server_nonce or _new_nonce()
        self._stage = "client-first"
        self._gs2_header = b""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self.matched_key: Any = None

    def handle_client_first(self, data: bytes) -> bytes:
        if self._stage != "client-first":
            raise ScramError("unexpected SCRAM client-first message")
        self._stage = "failed"  # until this message is fully accepted
        text = _scram_text(data)
        if text.startswith("p="):
            raise ScramError(
                "channel binding was requested, but only SCRAM-SHA-256 without "
                "channel binding is offered"
            )
        if text[:2] not in ("n,", "y,"):
            raise ScramError("malformed SCRAM message: invalid channel binding flag")
        if text.startswith("a=", 2):
            raise ScramError("client uses authorization identity, but it is not supported")
        if text[2:3] != ",":
            raise ScramError("malformed SCRAM message: invalid GS2 header")
        self._gs2_header = text[:3].encode("ascii")
        bare = text[3:]
        attrs = bare.split(",")
        if any(a.startswith("m=") for a in attrs):
            raise ScramError("malformed SCRAM message: mandatory extensions are not supported")
        # The username is ignored, as in PostgreSQL: clients send an empty one
        # and the identity comes from the startup packet.
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            raise ScramError("malformed SCRAM message: expected username and nonce")
        client_nonce = attrs[1][2:]
        if not _valid_nonce(client_nonce):
            raise ScramError("malformed SCRAM message: invalid client nonce")
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        self._server_first = f"r={self._nonce},s={_b64(self._salt)},i={self._iterations}"
        self._stage = "client-final"
        return self._server_first.encode("ascii")

    def handle_client_final(self, data: bytes) -> bytes:
        if self._stage != "client-final":
            raise ScramError("unexpected SCRAM client-final message")
        self._stage = "failed"  # no second attempt within one exchange
        text = _scram_text(data)
        without_proof, sep, proof_text = text.rpartition(",p=")
        attrs = without_proof.split(",")
        if not sep or "," in proof_text or len(attrs) < 2:
            raise ScramError("malformed SCRAM message: expected c=, r= and p= attributes")
        if not attrs[0].startswith("c=") or not attrs[1].startswith("r="):
            raise ScramError("malformed SCRAM message: expected c=, r= and p= attributes")
        cbind = _unb64(attrs[0][2:], "channel binding", ScramError)
        if not hmac.compare_digest(cbind, self._gs2_header):
            raise ScramError("SCRAM channel binding check failed")
        if not hmac.compare_digest(attrs[1][2:].encode(), self._nonce.encode()):
            raise ScramError("SCRAM nonce mismatch")
        proof = _unb64(proof_text, "proof", ScramError)
        if len(proof) != hashlib.sha256().digest_size:
            raise ScramError("malformed SCRAM message: invalid proof length")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        matched: tuple[Any, bytes, bytes] | None = None
        # Every candidate is checked, so timing does not reveal which matched.
        for candidate in self._candidates:
            _key, stored_key, _server_key = candidate
            client_key = _xor(proof, _hmac(stored_key, auth_message))
            ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)
            if ok and matched is None:
                matched = candidate
        if matched is None:
            raise ScramError("password authentication failed")
        self.matched_key = matched[0]
        self._stage = "done"
        return f"v={_b64(_hmac(matched[2], auth_message))}".encode("ascii")


def _scram_text(data: bytes) -> str:
    # Usernames may carry UTF-8; everything else in SCRAM is ASCII.
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("malformed SCRAM message: invalid UTF-8") from None
    if "\0" in text:
        raise ScramError("malformed SCRAM message: NUL byte")
    return text


# --------------------------------------------------------------------------
# Client side: the gateway logging in to the real server


_UNSUPPORTED: Final = {
    codec.AUTH_KERBEROS_V5: "Kerberos V5",
    codec.AUTH_SCM_CREDENTIAL: "SCM credential",
    codec.AUTH_GSS: "GSSAPI",
    codec.AUTH_GSS_CONTINUE: "GSSAPI",
    codec.AUTH_SSPI: "SSPI",
}


class TargetAuthenticator:
    """Answers a target server's authentication requests with stored credentials.

    ``allowed_methods`` (request codes, default: all supported) lets a caller
    refuse e.g. cleartext so a spoofed target cannot harvest the password.
    """

    def __init__(
        self,
        user: str,
        password: str | None,
        *,
        allowed_methods: Collection[int] | None = None,
    ) -> None:
        self.user = user
        self._password = password
        self._allowed = None if allowed_methods is None else frozenset(allowed_methods)
        self._stage = "start"  # start -> sasl-first -> sasl-final -> sasl-done
        self._client_nonce = ""
        self._client_first_bare = ""
        self._server_signature = b""

    def respond(self, code: int, payload: bytes) -> bytes | None:
        payload = bytes(payload)
        if code == codec.AUTH_OK:
            if self._stage in ("sasl-first", "sasl-final", "failed"):
                # Accepting Ok here would skip verifying the server's signature.
                raise AuthError("target sent AuthenticationOk before SCRAM completed")
            return None
        if code in _UNSUPPORTED:
            raise AuthError(
                f"target requested {_UNSUPPORTED[code]} authentication, which is not supported"
            )
        if code == codec.AUTH_SASL_CONTINUE:
            return self._sasl_continue(payload)
        if code == codec.AUTH_SASL_FINAL:
            self._sasl_final(payload)
            return None
        if code not in (codec.AUTH_CLEARTEXT_PASSWORD, codec.AUTH_MD5_PASSWORD, codec.AUTH_SASL):
            raise AuthError(f"target requested unsupported authentication method {code}")
        if self._allowed is not None and code not in self._allowed:
            raise AuthError(f"target requested authentication method {code}, which is not allowed")
        if self._stage != "start":
            raise AuthError("target restarted authentication")
        password = self._password
        if password is None:
            raise AuthError("target requires a password but none is configured")
        if code == codec.AUTH_CLEARTEXT_PASSWORD:
            return codec.encode_password(_cstring(password))
        if code == codec.AUTH_MD5_PASSWORD:
            if len(payload) != 4:
                raise AuthError("target sent a malformed md5 salt")
            inner = hashlib.md5((password + self.user).encode("utf-8")).hexdigest()
            outer = hashlib.md5(inner.encode("ascii") + payload).hexdigest()
            return codec.encode_password(b"md5" + outer.encode("ascii") + b"\0")
        return self._sasl_start(payload)

    def _sasl_start(self, payload: bytes) -> bytes:
        try:
            mechanisms = codec.decode_sasl_mechanisms(payload)
        except codec.ProtocolError:
            raise AuthError("target sent a malformed SASL mechanism list") from None
        if SCRAM_SHA_256 not in mechanisms:
            if "SCRAM-SHA-256-PLUS" in mechanisms:
                raise AuthError(
                    "target requires SCRAM-SHA-256-PLUS (channel binding), which is not supported"
                )
            raise AuthError(f"target offered no supported SASL mechanism: {list(mechanisms)}")
        self._client_nonce = _new_nonce()
        # PostgreSQL ignores this username; sending the real one keeps other
        # RFC 5802 servers (and test doubles) happy.
        user = self.user.replace("=", "=3D").replace(",", "=2C")
        self._client_first_bare = f"n={user},r={self._client_nonce}"
        self._stage = "sasl-first"
        client_first = f"n,,{self._client_first_bare}".encode()
        return codec.encode_sasl_initial_response(SCRAM_SHA_256, client_first)

    def _sasl_continue(self, payload: bytes) -> bytes:
        if self._stage != "sasl-first":
            raise AuthError("unexpected SASL continue from target")
        self._stage = "failed"
        try:
            server_first = payload.decode("ascii")
        except UnicodeDecodeError:
            raise AuthError("malformed SCRAM server-first message") from None
        attrs = server_first.split(",")
        if attrs[0].startswith("e="):
            raise AuthError(f"target rejected SCRAM: {attrs[0][2:]}")
        if len(attrs) < 3 or [a[:2] for a in attrs[:3]] != ["r=", "s=", "i="]:
            raise AuthError("malformed SCRAM server-first message")
        nonce, salt_text, iter_text = (a[2:] for a in attrs[:3])
        if not nonce.startswith(self._client_nonce) or len(nonce) == len(self._client_nonce):
            raise AuthError("target's SCRAM nonce does not extend ours")
        if not _valid_nonce(nonce):
            raise AuthError("malformed SCRAM server-first message")
        salt = _unb64(salt_text, "salt", AuthError)
        if not iter_text.isascii() or not iter_text.isdigit():
            raise AuthError("malformed SCRAM iteration count")
        iterations = int(iter_text)
        if not 1 <= iterations <= MAX_ITERATIONS or not salt:
            raise AuthError(f"refusing SCRAM parameters: {iterations} iterations")
        assert self._password is not None  # checked when SASL started
        client_key, stored_key, server_key = salted_keys(
            pg_saslprep(self._password), salt, iterations
        )
        without_proof = f"c=biws,r={nonce}"  # biws = base64("n,,")
        auth_message = f"{self._client_first_bare},{server_first},{without_proof}".encode()
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._stage = "sasl-final"
        return codec.encode_password(f"{without_proof},p={_b64(proof)}".encode("ascii"))

    def _sasl_final(self, payload: bytes) -> None:
        if self._stage != "sasl-final":
            raise AuthError("unexpected SASL final from target")
        self._stage = "failed"
        try:
            text = payload.decode("ascii")
        except UnicodeDecodeError:
            raise AuthError("malformed SCRAM server-final message") from None
        first = text.split(",")[0]
        if first.startswith("e="):
            raise AuthError(f"target rejected SCRAM: {first[2:]}")
        if not first.startswith("v="):
            raise AuthError("malformed SCRAM server-final message")
        signature = _unb64(first[2:], "server signature", AuthError)
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthError("target's SCRAM server signature is invalid")
        self._stage = "sasl-done"
        return None


def _cstring(password: str) -> bytes:
    data = password.encode("utf-8")
    if b"\0" in data:
        raise AuthError("password contains a NUL byte")
    return data + b"\0"
