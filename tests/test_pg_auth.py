"""Unit tests for proxies.postgres.auth (no servers needed).

SCRAM is checked against scramp, an independent implementation, in both
directions; md5 against a vector computed here with hashlib.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
import scramp

from proxies.postgres import codec
from proxies.postgres.auth import (
    AuthError,
    ScramError,
    ScramServer,
    TargetAuthenticator,
    mock_salt,
    pg_saslprep,
    scram_verifier,
)

SALT = b"0123456789abcdef"
ITERATIONS = 4096
TOKENS = {"tok1": "kt_first-token", "tok2": "kt_second-token", "tok3": "kt_third-token"}


def candidates(tokens: dict[str, str] = TOKENS) -> list[tuple[str, bytes, bytes]]:
    out = []
    for key, token in tokens.items():
        v = scram_verifier(token, salt=SALT, iterations=ITERATIONS)
        out.append((key, v.stored_key, v.server_key))
    return out


def client_for(password: str, **kwargs) -> scramp.ScramClient:
    return scramp.ScramClient(["SCRAM-SHA-256"], "alice", password, **kwargs)


def exchange(server: ScramServer, client: scramp.ScramClient) -> None:
    server_first = server.handle_client_first(client.get_client_first().encode())
    client.set_server_first(server_first.decode())
    server_final = server.handle_client_final(client.get_client_final().encode())
    client.set_server_final(server_final.decode())  # verifies our server signature


def body_of(message: bytes) -> bytes:
    reader = codec.FrontendReader()
    reader.start_typed()
    reader.receive_data(message)
    event = reader.next_event()
    assert isinstance(event, codec.Message) and event.type == b"p"
    return event.body


# --------------------------------------------------------------------------
# Verifiers


def test_verifier_matches_scramp():
    v = scram_verifier("kt_token", salt=SALT, iterations=ITERATIONS)
    salt, stored, server, iterations = scramp.ScramMechanism().make_auth_info(
        "kt_token", iteration_count=ITERATIONS, salt=SALT
    )
    assert (v.salt, v.iterations, v.stored_key, v.server_key) == (salt, iterations, stored, server)


def test_verifier_generates_fresh_salt():
    a, b = scram_verifier("x", iterations=1), scram_verifier("x", iterations=1)
    assert len(a.salt) == 16 and a.salt != b.salt


def test_pg_saslprep():
    assert pg_saslprep("plain\x07ascii") == b"plain\x07ascii"  # ASCII passes untouched
    assert pg_saslprep("a\u00adb") == b"ab"  # soft hyphen maps to nothing
    assert pg_saslprep("a\u00a0b") == b"a b"  # non-ASCII space maps to space
    assert pg_saslprep("\u2168") == b"IX"  # NFKC
    assert pg_saslprep("pw\ue000") == "pw\ue000".encode()  # prohibited: raw bytes
    assert pg_saslprep("\u00ad") == "\u00ad".encode()  # empty after mapping: raw bytes


def test_mock_salt_is_stable_per_user():
    assert mock_salt(b"k", "bob") == mock_salt(b"k", "bob")
    assert mock_salt(b"k", "bob") != mock_salt(b"k", "eve")
    assert mock_salt(b"k", "bob") != mock_salt(b"k2", "bob")
    assert len(mock_salt(b"k", "bob")) == 16


# --------------------------------------------------------------------------
# ScramServer


def test_second_of_three_tokens_matches():
    server = ScramServer(SALT, ITERATIONS, candidates())
    exchange(server, client_for(TOKENS["tok2"]))
    assert server.matched_key == "tok2"


def test_single_candidate():
    server = ScramServer(SALT, ITERATIONS, candidates({"only": "pw"}))
    exchange(server, client_for("pw"))
    assert server.matched_key == "only"


def test_wrong_password_fails():
    server = ScramServer(SALT, ITERATIONS, candidates())
    client = client_for("not-a-token")
    client.set_server_first(server.handle_client_first(client.get_client_first().encode()).decode())
    final = client.get_client_final().encode()
    with pytest.raises(ScramError) as info:
        server.handle_client_final(final)
    assert info.value.sqlstate == "28P01"
    assert server.matched_key is None
    # The exchange is spent: no second guess on the same server.
    with pytest.raises(ScramError, match="unexpected"):
        server.handle_client_final(final)


def test_tampered_nonce_fails():
    server = ScramServer(SALT, ITERATIONS, candidates())
    client = client_for(TOKENS["tok1"])
    client.set_server_first(server.handle_client_first(client.get_client_first().encode()).decode())
    final = client.get_client_final()
    c_attr, r_attr, p_attr = final.split(",")
    tampered = f"{c_attr},{r_attr[:-1]}{'A' if r_attr[-1] != 'A' else 'B'},{p_attr}"
    with pytest.raises(ScramError, match="nonce"):
        server.handle_client_final(tampered.encode())


def test_tampered_proof_fails():
    server = ScramServer(SALT, ITERATIONS, candidates())
    client = client_for(TOKENS["tok1"])
    client.set_server_first(server.handle_client_first(client.get_client_first().encode()).decode())
    without, _, proof = client.get_client_final().rpartition(",p=")
    raw = bytearray(base64.b64decode(proof))
    raw[0] ^= 1
    with pytest.raises(ScramError):
        server.handle_client_final(f"{without},p={base64.b64encode(raw).decode()}".encode())


def test_channel_binding_request_rejected():
    client = scramp.ScramClient(
        ["SCRAM-SHA-256-PLUS"], "alice", "pw", channel_binding=("tls-server-end-point", b"cert")
    )
    first = client.get_client_first()
    assert first.startswith("p=")
    server = ScramServer(SALT, ITERATIONS, candidates())
    with pytest.raises(ScramError, match="channel binding"):
        server.handle_client_first(first.encode())


def test_empty_candidates_always_fail():
    server = ScramServer(mock_salt(b"secret", "ghost"), ITERATIONS, [])
    client = client_for("anything")
    server_first = server.handle_client_first(client.get_client_first().encode()).decode()
    assert (
        server_first.count(",") == 2 and ",s=" in server_first and server_first.endswith(",i=4096")
    )
    client.set_server_first(server_first)
    with pytest.raises(ScramError, match="password authentication failed"):
        server.handle_client_final(client.get_client_final().encode())


def manual_client_final(password: str, client_first_bare: str, server_first: str, cbind: str):
    """SCRAM client maths written out with hashlib, independent of the module."""
    attrs = dict(a.split("=", 1) for a in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    without = f"c={cbind},r={attrs['r']}"
    auth_message = f"{client_first_bare},{server_first},{without}".encode()
    signature = hmac.new(stored_key, auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    expected_final = hmac.new(server_key, auth_message, "sha256").digest()
    return f"{without},p={base64.b64encode(proof).decode()}", expected_final


@pytest.mark.parametrize(("flag", "cbind"), [("n", "biws"), ("y", "eSws")])
def test_libpq_style_empty_username_and_gs2_flags(flag, cbind):
    server = ScramServer(SALT, ITERATIONS, candidates(), server_nonce="SERVERNONCE")
    bare = "n=,r=clientnonce"
    server_first = server.handle_client_first(f"{flag},,{bare}".encode()).decode()
    assert server_first == (
        f"r=clientnonceSERVERNONCE,s={base64.b64encode(SALT).decode()},i={ITERATIONS}"
    )
    final, expected = manual_client_final(TOKENS["tok3"], bare, server_first, cbind)
    assert server.handle_client_final(final.encode()) == b"v=" + base64.b64encode(expected)
    assert server.matched_key == "tok3"


def test_channel_binding_attribute_must_match_gs2_header():
    server = ScramServer(SALT, ITERATIONS, candidates())
    bare = "n=,r=clientnonce"
    server_first = server.handle_client_first(f"y,,{bare}".encode()).decode()
    final, _ = manual_client_final(TOKENS["tok1"], bare, server_first, "biws")
    with pytest.raises(ScramError, match="channel binding"):
        server.handle_client_final(final.encode())


@pytest.mark.parametrize(
    "first",
    [
        b"",
        b"x,,n=,r=abc",
        b"n,a=admin,n=,r=abc",
        b"n,,n=,r=",
        b"n,,r=abc",
        b"n,,m=ext,n=,r=abc",
        b"n,,n=,r=a\x00b",
        b"n,,n=\xff,r=abc",
        b"n,n=,r=abc",
    ],
)
def test_malformed_client_first(first):
    with pytest.raises(ScramError):
        ScramServer(SALT, ITERATIONS, candidates()).handle_client_first(first)


@pytest.mark.parametrize(
    "final",
    [
        b"",
        b"c=biws",
        b"c=biws,r=abc",
        b"r=x,c=biws,p=AAAA",
        b"c=!!,r=abcS,p=AAAA",
        b"c=biws,r=abcS,p=AAAA",
    ],
)
def test_malformed_client_final(final):
    server = ScramServer(SALT, ITERATIONS, candidates(), server_nonce="S")
    server.handle_client_first(b"n,,n=,r=abc")
    with pytest.raises(ScramError):
        server.handle_client_final(final)


def test_out_of_order_calls():
    server = ScramServer(SALT, ITERATIONS, candidates())
    with pytest.raises(ScramError):
        server.handle_client_final(b"c=biws,r=x,p=AAAA")
    server = ScramServer(SALT, ITERATIONS, candidates())
    server.handle_client_first(b"n,,n=,r=abc")
    with pytest.raises(ScramError):
        server.handle_client_first(b"n,,n=,r=abc")


# --------------------------------------------------------------------------
# TargetAuthenticator


def test_auth_ok_needs_nothing():
    assert TargetAuthenticator("u", None).respond(0, b"") is None


def test_cleartext():
    message = TargetAuthenticator("u", "s3cret").respond(3, b"")
    assert message == b"p\0\0\0\x0bs3cret\0"


def test_md5_known_vector():
    user, password, salt = "alice", "wonderland", b"\x01\x02\x03\x04"
    inner = hashlib.md5(f"{password}{user}".encode()).hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    message = TargetAuthenticator(user, password).respond(5, salt)
    assert body_of(message) == expected.encode() + b"\0"
    assert codec.decode_password(body_of(message)) == expected.encode()


def test_md5_bad_salt():
    with pytest.raises(AuthError):
        TargetAuthenticator("u", "p").respond(5, b"abc")


def sasl_payload(*mechanisms: str) -> bytes:
    return b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0"


def scramp_server(password: str):
    mechanism = scramp.ScramMechanism()
    auth_info = mechanism.make_auth_info(password, iteration_count=4096)
    return mechanism.make_server(lambda _user: auth_info)


def test_scram_against_scramp_server():
    server = scramp_server("db-password")
    target = TargetAuthenticator("app_user", "db-password")
    initial = target.respond(10, sasl_payload("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    mechanism, client_first = codec.decode_sasl_initial_response(body_of(initial))
    assert mechanism == "SCRAM-SHA-256" and client_first is not None
    assert client_first.startswith(b"n,,")
    server.set_client_first(client_first.decode())
    final = target.respond(11, server.get_server_first().encode())
    server.set_client_final(body_of(final).decode())  # raises if our proof is wrong
    assert target.respond(12, server.get_server_final().encode()) is None
    assert target.respond(0, b"") is None


def test_scram_against_our_own_server():
    target = TargetAuthenticator("u", TOKENS["tok1"])
    server = ScramServer(SALT, ITERATIONS, candidates())
    _, first = codec.decode_sasl_initial_response(
        body_of(target.respond(10, sasl_payload("SCRAM-SHA-256")))
    )
    assert first is not None
    server_first = server.handle_client_first(first)
    server_final = server.handle_client_final(body_of(target.respond(11, server_first)))
    assert target.respond(12, server_final) is None
    assert server.matched_key == "tok1"


def _scram_until_final(password: str, server_password: str):
    server = scramp_server(server_password)
    target = TargetAuthenticator("u", password)
    _, first = codec.decode_sasl_initial_response(
        body_of(target.respond(10, sasl_payload("SCRAM-SHA-256")))
    )
    assert first is not None
    server.set_client_first(first.decode())
    final = target.respond(11, server.get_server_first().encode())
    return target, server, final


def test_scram_rejects_forged_server_signature():
    target, _server, _final = _scram_until_final("pw", "pw")
    forged = b"v=" + base64.b64encode(b"\0" * 32)
    with pytest.raises(AuthError, match="signature"):
        target.respond(12, forged)
    with pytest.raises(AuthError):
        target.respond(0, b"")


def test_scram_server_error_attribute():
    target, _server, _final = _scram_until_final("pw", "pw")
    with pytest.raises(AuthError, match="invalid-proof"):
        target.respond(12, b"e=invalid-proof")


def test_auth_ok_before_scram_final_is_refused():
    target, _server, _final = _scram_until_final("pw", "pw")
    with pytest.raises(AuthError, match="before SCRAM completed"):
        target.respond(0, b"")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=unrelated,s=c2FsdA==,i=4096",  # nonce does not extend ours
        b"garbage",
        b"e=other-error",
    ],
)
def test_scram_rejects_bad_server_first(server_first):
    target = TargetAuthenticator("u", "pw")
    target.respond(10, sasl_payload("SCRAM-SHA-256"))
    with pytest.raises(AuthError):
        target.respond(11, server_first)


def test_scram_rejects_huge_iteration_count():
    target = TargetAuthenticator("u", "pw")
    _, first = codec.decode_sasl_initial_response(
        body_of(target.respond(10, sasl_payload("SCRAM-SHA-256")))
    )
    assert first is not None
    nonce = first.decode().split("r=")[1]
    with pytest.raises(AuthError, match="iterations"):
        target.respond(11, f"r={nonce}xyz,s=c2FsdA==,i=999999999".encode())


def test_only_channel_binding_offered():
    with pytest.raises(AuthError, match="PLUS"):
        TargetAuthenticator("u", "pw").respond(10, sasl_payload("SCRAM-SHA-256-PLUS"))
    with pytest.raises(AuthError, match="no supported SASL mechanism"):
        TargetAuthenticator("u", "pw").respond(10, sasl_payload("OAUTHBEARER"))


@pytest.mark.parametrize(
    ("code", "name"), [(2, "Kerberos"), (7, "GSSAPI"), (9, "SSPI"), (6, "SCM")]
)
def test_unsupported_methods(code, name):
    with pytest.raises(AuthError, match=f"{name}.*not supported"):
        TargetAuthenticator("u", "pw").respond(code, b"")


def test_unknown_method():
    with pytest.raises(AuthError, match="unsupported authentication method 42"):
        TargetAuthenticator("u", "pw").respond(42, b"")


@pytest.mark.parametrize(
    ("code", "payload"), [(3, b""), (5, b"salt"), (10, sasl_payload("SCRAM-SHA-256"))]
)
def test_missing_password(code, payload):
    with pytest.raises(AuthError, match="^target requires a password but none is configured$"):
        TargetAuthenticator("u", None).respond(code, payload)


def test_allowed_methods_can_refuse_cleartext():
    target = TargetAuthenticator("u", "pw", allowed_methods={10})
    with pytest.raises(AuthError, match="not allowed"):
        target.respond(3, b"")


def test_sasl_messages_out_of_order():
    with pytest.raises(AuthError):
        TargetAuthenticator("u", "pw").respond(11, b"r=x,s=c2FsdA==,i=1")
    with pytest.raises(AuthError):
        TargetAuthenticator("u", "pw").respond(12, b"v=AAAA")
