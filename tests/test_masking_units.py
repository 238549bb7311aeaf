"""Unit tests for keyturn.masking.styles and keyturn.masking.detectors (no servers needed)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from keyturn.masking.detectors import (
    BUILTIN_NAMES,
    DetectorConfigError,
    DetectorSet,
    Hit,
)
from keyturn.masking.styles import (
    FULL_MASK,
    FULL_MASK_BYTES,
    PARTIAL_PREFIX,
    MaskStyle,
    mask_bytes,
    masker,
)

KEY = b"test-key-0123456789"
GH_PAT = "github_pat_11ABCDEFG0123456789_abcdefghij"
PROPS = settings(max_examples=200, deadline=None)

ALL = DetectorSet.build()
NO_PREFILTER = DetectorSet.build(prefilter=False)


def names(text: str, ds: DetectorSet = ALL) -> list[str]:
    return [h.name for h in ds.scan(text)]


def found(text: str, ds: DetectorSet = ALL) -> list[tuple[str, str]]:
    return [(h.name, text[h.start : h.end]) for h in ds.scan(text)]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict[str, object]) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    return f"{header}.{payload}.{b64url(b'signature-bytes-here')}"


def luhn_complete(prefix: str) -> str:
    """Append the check digit that makes ``prefix`` pass Luhn."""
    for check in "0123456789":
        digits = prefix + check
        total = 0
        for i, ch in enumerate(reversed(digits)):
            d = int(ch) * (2 if i % 2 else 1)
            total += d - 9 if d > 9 else d
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


# ================================================================ styles


class TestStyleParse:
    @pytest.mark.parametrize(
        "spec, kind, keep",
        [
            ("full", "full", 4),
            ("partial", "partial", 4),
            ("partial:4", "partial", 4),
            ("partial:2", "partial", 2),
            (" Partial : 6 ", "partial", 6),
            ("email", "email", 4),
            ("null", "null", 4),
            ("hash", "hash", 4),
            ("HASH", "hash", 4),
        ],
    )
    def test_accepts(self, spec: str, kind: str, keep: int) -> None:
        style = MaskStyle.parse(spec)
        assert (style.kind, style.keep) == (kind, keep)

    @pytest.mark.parametrize(
        "spec, message",
        [
            ("", "cannot read masking style"),
            ("redact", "unknown masking style 'redact'"),
            ("partial:", "whole number"),
            ("partial:x", "whole number"),
            ("partial:-1", "whole number"),
            ("partial:0", "between 1 and 64"),
            ("partial:65", "between 1 and 64"),
            ("full:4", "takes no argument"),
            ("hash:sha1", "takes no argument"),
            ("partial:4:4", "whole number"),
        ],
    )
    def test_rejects_with_clear_message(self, spec: str, message: str) -> None:
        with pytest.raises(ValueError, match=re.escape(message)):
            MaskStyle.parse(spec)

    def test_constructor_validates_too(self) -> None:
        with pytest.raises(ValueError, match="unknown masking style"):
            MaskStyle("scramble")
        with pytest.raises(ValueError, match="integer"):
            MaskStyle("partial", keep="4")  # type: ignore[arg-type]

    def test_round_trips_through_str(self) -> None:
        for spec in ("full", "partial:7", "email", "null", "hash"):
            assert str(MaskStyle.parse(spec)) == spec


class TestStyles:
    def test_full_hides_content_and_length(self) -> None:
        fn = masker(MaskStyle("full"), KEY)
        assert fn("123-45-6789") == FULL_MASK
        assert fn("x") == FULL_MASK
        assert fn("a much longer secret value than the mask") == FULL_MASK
        assert fn("") == FULL_MASK

    def test_partial_keeps_last_n(self) -> None:
        assert masker(MaskStyle.parse("partial"), KEY)("4111111111111111") == "****1111"
        assert masker(MaskStyle.parse("partial:2"), KEY)("123-45-6789") == "****89"
        # The prefix has a fixed width: it does not reveal how much was hidden.
        fn = masker(MaskStyle.parse("partial:4"), KEY)
        assert fn("abcde1234") == fn("abcdefghijklmnop1234") == "****1234"

    def test_partial_short_values_fully_masked(self) -> None:
        fn = masker(MaskStyle.parse("partial:4"), KEY)
        assert fn("1234") == FULL_MASK
        assert fn("12") == FULL_MASK
        assert fn("") == FULL_MASK
        assert fn("12345") == "****2345"

    def test_email_keeps_shape(self) -> None:
        fn = masker(MaskStyle("email"), KEY)
        assert fn("john.doe@example.com") == "j***@example.com"
        assert fn("J@Example.ORG") == "J***@Example.ORG"
        assert fn("ops+alerts@mail.corp.example.co.uk") == "o***@mail.corp.example.co.uk"

    @pytest.mark.parametrize(
        "value", ["not an email", "john@localhost", "@example.com", "a@b@c.com", "", "x y@z.com"]
    )
    def test_email_non_email_falls_back_to_full(self, value: str) -> None:
        assert masker(MaskStyle("email"), KEY)(value) == FULL_MASK

    def test_null(self) -> None:
        fn = masker(MaskStyle("null"), KEY)
        assert fn("anything") is None
        assert mask_bytes(fn, b"anything") is None
        assert mask_bytes(fn, b"\xff\xfe") is None

    def test_hash_shape_stable_and_keyed(self) -> None:
        fn = masker(MaskStyle("hash"), KEY)
        out = fn("123-45-6789")
        assert out is not None and re.fullmatch(r"h:[0-9a-f]{16}", out)
        assert fn("123-45-6789") == out
        assert masker(MaskStyle("hash"), KEY)("123-45-6789") == out  # a new masker, same key
        assert masker(MaskStyle("hash"), b"other-key")("123-45-6789") != out
        assert fn("123-45-6788") != out

    def test_hash_matches_published_hmac(self) -> None:
        for key in (KEY, b"k", b"x" * 64, b"long key " * 20):  # > 64 bytes is hashed first
            expected = hmac.new(key, b"alice@example.com", hashlib.sha256).hexdigest()[:16]
            assert masker(MaskStyle("hash"), key)("alice@example.com") == "h:" + expected

    def test_hash_refuses_empty_key(self) -> None:
        with pytest.raises(ValueError, match="non-empty secret key"):
            masker(MaskStyle("hash"), b"")
        # Other styles do not need a key.
        assert masker(MaskStyle("full"), b"")("x") == FULL_MASK

    def test_mask_bytes_utf8(self) -> None:
        fn = masker(MaskStyle.parse("partial:3"), KEY)
        assert mask_bytes(fn, "Zoë Ångström".encode()) == "****röm".encode()
        assert mask_bytes(masker(MaskStyle("email"), KEY), b"bob@example.com") == (
            b"b***@example.com"
        )
        assert mask_bytes(fn, memoryview(b"abcdef")) == b"****def"

    @pytest.mark.parametrize("spec", ["full", "partial", "partial:1", "email", "hash"])
    def test_mask_bytes_invalid_utf8_is_fully_masked(self, spec: str) -> None:
        fn = masker(MaskStyle.parse(spec), KEY)
        # The last bytes are plain ASCII: partial must not pass them through.
        for raw in (b"\xff\xfe secret 1234", b"abc\xc3", b"x@y.com\x80"):
            assert mask_bytes(fn, raw) == FULL_MASK_BYTES

    @PROPS
    @given(value=st.text(max_size=60), keep=st.integers(1, 12))
    def test_partial_reveals_only_the_suffix(self, value: str, keep: int) -> None:
        assume("*" not in value)
        out = masker(MaskStyle("partial", keep=keep), KEY)(value)
        assert out is not None
        if len(value) <= keep:
            assert out == FULL_MASK
        else:
            assert out == PARTIAL_PREFIX + value[-keep:]
            assert value not in out
            assert len(out) == len(PARTIAL_PREFIX) + keep

    @PROPS
    @given(value=st.text(min_size=1, max_size=60))
    def test_full_never_contains_the_value(self, value: str) -> None:
        assume(value not in FULL_MASK)
        out = masker(MaskStyle("full"), KEY)(value)
        assert out == FULL_MASK and value not in out

    @PROPS
    @given(
        a=st.text(max_size=40),
        b=st.text(max_size=40),
        k1=st.binary(min_size=1, max_size=80),
        k2=st.binary(min_size=1, max_size=80),
    )
    def test_hash_stable_and_key_dependent(self, a: str, b: str, k1: bytes, k2: bytes) -> None:
        h1 = masker(MaskStyle("hash"), k1)
        assert h1(a) == h1(a) == masker(MaskStyle("hash"), k1)(a)
        assert (h1(a) == h1(b)) == (a == b)
        if k1 != k2:
            assert h1(a) != masker(MaskStyle("hash"), k2)(a)
        assert mask_bytes(h1, a.encode()) == h1(a).encode()  # type: ignore[union-attr]
        assert h1(a) == "h:" + hmac.new(k1, a.encode(), hashlib.sha256).hexdigest()[:16]


# ================================================================ detectors


class TestEmail:
    @pytest.mark.parametrize(
        "text, value",
        [
            ("contact john.doe@example.com today", "john.doe@example.com"),
            ("JOHN.DOE@EXAMPLE.COM", "JOHN.DOE@EXAMPLE.COM"),
            ("<ops+alerts@mail.example.co.uk>", "ops+alerts@mail.example.co.uk"),
            ('{"email":"a_b-c%d@sub-domain.example.io"}', "a_b-c%d@sub-domain.example.io"),
        ],
    )
    def test_found(self, text: str, value: str) -> None:
        assert found(text) == [("email", value)]

    @pytest.mark.parametrize(
        "text", ["user@localhost", "@example.com", "not-an-address", "a@b", "x@1.2", "me@ home.com"]
    )
    def test_not_found(self, text: str) -> None:
        assert "email" not in names(text)


class TestSSN:
    @pytest.mark.parametrize(
        "text, value",
        [
            ("ssn 123-45-6789", "123-45-6789"),
            ("123 45 6789", "123 45 6789"),
            ("SSN: 123456789", "123456789"),
            ("ssn#078051120", "078051120"),
            ("Social Security Number 219099999", "219099999"),
        ],
    )
    def test_found(self, text: str, value: str) -> None:
        assert found(text) == [("ssn", value)]

    @pytest.mark.parametrize(
        "text",
        [
            "000-12-3456",  # area 000
            "666-12-3456",  # area 666
            "912-12-3456",  # area 9xx
            "123-00-4567",  # group 00
            "123-45-0000",  # serial 0000
            "123-45 6789",  # mixed separators
            "123456789",  # bare nine digits: ambiguous without a label
            "zip 12345-6789",
            "1123-45-6789",
            "123-45-67890",
            "ssn 000123456",
        ],
    )
    def test_rejected(self, text: str) -> None:
        assert "ssn" not in names(text)


VALID_CARDS = [
    "4111111111111111",
    "5555555555554444",
    "378282246310005",
    "6011111111111117",
    "4222222222222",
    "2223003122003222",
    "3530111333300000",
    "6200000000000005",
    "4111111111111111110",  # 19 digits
]


class TestCard:
    @pytest.mark.parametrize("card", VALID_CARDS)
    def test_valid_cards(self, card: str) -> None:
        assert found(f"card {card} on file") == [("card", card)]

    @pytest.mark.parametrize(
        "text, value",
        [
            ("4111 1111 1111 1111", "4111 1111 1111 1111"),
            ("4111-1111-1111-1111", "4111-1111-1111-1111"),
            ("3782 822463 10005", "3782 822463 10005"),
            ("pay with 5555-5555-5555-4444, thanks", "5555-5555-5555-4444"),
            ("4111 1111 1111 1111 2031", "4111 1111 1111 1111"),  # followed by a year
            ("ref:4111111111111111.", "4111111111111111"),
        ],
    )
    def test_separators_and_context(self, text: str, value: str) -> None:
        assert found(text) == [("card", value)]

    @pytest.mark.parametrize(
        "text",
        [
            "4111111111111112",  # Luhn fails
            "4111 1111 1111 1112",
            "5555555555554445",
            "1234567812345670",  # Luhn-valid but no card issuer starts with 1
            "7992739871300000",
            "411111111111",  # 12 digits
            "41111111111111111111",  # 20 digits
            "4111  1111  1111  1111",  # double spaces are not card grouping
            "1732300000000",  # epoch milliseconds
            "41111111111114",  # Luhn-valid, but Visa numbers have 13, 16 or 19 digits
            "5500000000000004006",  # Mastercard prefix, Luhn-valid, 19 digits
            "3111111111111113",  # Luhn-valid, no issuer uses 31
            "4111111111111111abc",  # glued to letters
            "41111111-1111-1111-1111-111111111111",  # UUID shape, digits only
        ],
    )
    def test_rejected(self, text: str) -> None:
        assert "card" not in names(text)


class TestIBAN:
    @pytest.mark.parametrize(
        "iban",
        [
            "DE89370400440532013000",
            "GB82WEST12345698765432",
            "FR1420041010050500013M02606",
            "NL91ABNA0417164300",
            "NO9386011117947",
            "CH9300762011623852957",
        ],
    )
    def test_valid(self, iban: str) -> None:
        assert found(f"iban: {iban}") == [("iban", iban)]

    def test_spaced_and_lower_case(self) -> None:
        assert found("to DE89 3704 0044 0532 0130 00 please") == [
            ("iban", "DE89 3704 0044 0532 0130 00")
        ]
        assert found("gb82 west 1234 5698 7654 32") == [("iban", "gb82 west 1234 5698 7654 32")]

    @pytest.mark.parametrize(
        "text",
        [
            "DE88370400440532013000",  # wrong check digits
            "DE89370400440532013001",  # altered account number
            "GB82WEST1234569876543",  # too short for GB
            "XX89370400440532013000",  # no such country
            "AB12CDEFGHIJKLMNOP",
            "GB82WEST12345698765432XYZ",  # glued to more characters
            "be211e15370df85b541ef61c5afde540",  # hex digest whose first 16 pass mod-97
        ],
    )
    def test_rejected(self, text: str) -> None:
        assert "iban" not in names(text)


class TestPhone:
    @pytest.mark.parametrize(
        "text, value",
        [
            ("call +14155552671 now", "+14155552671"),
            ("+1 (212) 555-0100", "+1 (212) 555-0100"),
            ("+44 20 7946 0958", "+44 20 7946 0958"),
            ("+33 6 12 34 56 78", "+33 6 12 34 56 78"),
            ("(212) 555-0100", "(212) 555-0100"),
            ("212-555-0100", "212-555-0100"),
            ("212.555.0100", "212.555.0100"),
            ("020 7946 0958", "020 7946 0958"),
            ("06 12 34 56 78", "06 12 34 56 78"),
        ],
    )
    def test_found(self, text: str, value: str) -> None:
        assert found(text) == [("phone", value)]

    @pytest.mark.parametrize(
        "text",
        [
            "order 1234567890",
            "id 12345678901",
            "the year 2023",
            "20231115",
            "3.14159265358979",
            "192.168.100.200",
            "version 1.22.333.4444",
            "2023-11-22 10:30:00",
            "2023-11-22T10:30:00Z",
            "total 1,234,567.89",
            "+42",
            "+1234567",  # too short for E.164 with a country code
            "1700000000",
            "550e8400-e29b-41d4-a716-446655440000",
            "212-555-01000",
            "112-555-0100",  # NANP area codes do not start with 0 or 1
            "1-2-3-4-5-6-7-8-9-0",
        ],
    )
    def test_ordinary_numbers_not_flagged(self, text: str) -> None:
        assert ALL.scan(text) == []


class TestSecrets:
    @pytest.mark.parametrize(
        "text, value",
        [
            ("key sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
            ("rk_test_51Habc123DEF456ghi", "rk_test_51Habc123DEF456ghi"),
            ("AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
            ("ghp_" + "a1B2" * 9, "ghp_" + "a1B2" * 9),
            (f"gh: {GH_PAT}", GH_PAT),
            ("xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij"),
            ("xoxp-1234-5678-abcdefgh", "xoxp-1234-5678-abcdefgh"),
            ("api_key=abcd1234efgh5678", "abcd1234efgh5678"),
            ('{"apiKey": "Zx9Qw8Er7Ty6"}', "Zx9Qw8Er7Ty6"),
            ("X-Api-Key: 0123456789abcdef", "0123456789abcdef"),
            ("DB_PASSWORD='hunter2hunter2'", "hunter2hunter2"),
            ("client_secret=s3cr3t-v4lue", "s3cr3t-v4lue"),
        ],
    )
    def test_api_keys(self, text: str, value: str) -> None:
        assert found(text) == [("api_key", value)]

    def test_secret_embedded_in_longer_text(self) -> None:
        text = (
            "deploy failed for svc-42: upstream said 401 using AKIAIOSFODNN7EXAMPLE from "
            "the env; please rotate"
        )
        out, counts = ALL.redact(text)
        assert "AKIAIOSFODNN7EXAMPLE" not in out
        assert counts == {"api_key": 1}
        assert out.startswith("deploy failed for svc-42: upstream said 401 using <redacted:")

    @pytest.mark.parametrize(
        "text",
        [
            "sk_live_short",
            "AKIA1234",  # too short
            "xAKIAIOSFODNN7EXAMPLE",  # not at a word start
            "ghp_tooshort",
            "api_key=short",
            "the key: value",
            "task_list=pending",
            "monkey=bananas-and-more",
        ],
    )
    def test_not_secrets(self, text: str) -> None:
        assert "api_key" not in names(text)

    def test_jwt(self) -> None:
        token = make_jwt({"sub": "1234567890", "name": "Jane"})
        assert found(f"Authorization: Bearer {token}") == [("jwt", token)]
        unsigned = token.rsplit(".", 1)[0] + "."
        assert found(unsigned) == [("jwt", unsigned)]

    @pytest.mark.parametrize(
        "text",
        [
            # Random base64 with dots: the first segment does not decode to JSON.
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ.dGhpcyBpcyBub3Q.YSBqd3QgYXQgYWxs",
            # Starts with eyJ but the header is not valid JSON.
            b64url(b'{"alg": broken') + "." + b64url(b"{}") + ".sig",
            # Header decodes to a JSON array, not an object.
            "eyJ" + b64url(b'["a", 1]')[3:] + ".abcd.efgh",
            "eyJhbGciOiJIUzI1NiJ9",  # one segment only
        ],
    )
    def test_not_jwt(self, text: str) -> None:
        assert "jwt" not in names(text)

    def test_pem_private_key(self) -> None:
        block = (
            "-----BEGIN RSA PRIVATE KEY-----\n"
            "MIIEpAIBAAKCAQEA1c7+9z5Pad7OejecsQ0bu3aumG9LL0i3HC2EUB4e5VgkS1L2\n"
            "-----END RSA PRIVATE KEY-----"
        )
        out, counts = ALL.redact(f"config:\n{block}\nend")
        assert out == "config:\n<redacted:private_key>\nend" and counts == {"private_key": 1}
        for kind in ("", "EC ", "OPENSSH ", "ENCRYPTED "):
            text = f"-----BEGIN {kind}PRIVATE KEY-----\nabc\n-----END {kind}PRIVATE KEY-----"
            assert names(text) == ["private_key"]

    def test_truncated_pem_redacted_to_end(self) -> None:
        out, _ = ALL.redact("key: -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEF")
        assert out == "key: <redacted:private_key>"

    def test_public_material_not_flagged(self) -> None:
        text = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZI\n-----END PUBLIC KEY-----"
        assert "private_key" not in names(text)
        assert "private_key" not in names("-----BEGIN CERTIFICATE-----\nMIIB\n")

    def test_secrets_alias(self) -> None:
        ds = DetectorSet.build(enabled=["secrets"])
        assert set(ds.names) == {"api_key", "jwt", "private_key"}
        assert ds.scan("john@example.com 4111111111111111") == []
        assert names("AKIAIOSFODNN7EXAMPLE", ds) == ["api_key"]


class TestWireShapedValues:
    """Values as the relay sees them: error messages, COPY rows, JSON, log lines."""

    def test_postgres_error_quoting_a_value(self) -> None:
        message = 'invalid input syntax for type integer: "123-45-6789"'
        out, counts = ALL.redact(message)
        assert out == 'invalid input syntax for type integer: "<redacted:ssn>"'
        assert counts == {"ssn": 1}
        detail = "Key (email)=(Jane.Roe@Example.com) already exists."
        assert ALL.redact(detail)[0] == "Key (email)=(<redacted:email>) already exists."

    def test_copy_rows(self) -> None:
        csv_row = '42,"Roe, Jane",jane@example.com,4111111111111111,2024-01-15\n'
        out, counts = ALL.redact(csv_row)
        assert out == '42,"Roe, Jane",<redacted:email>,<redacted:card>,2024-01-15\n'
        text_row = "7\t078-05-1120\t+44 20 7946 0958\tactive\n"
        out, counts = ALL.redact(text_row)
        assert out == "7\t<redacted:ssn>\t<redacted:phone>\tactive\n"

    def test_json_document(self) -> None:
        doc = json.dumps(
            {"id": 981, "iban": "GB82 WEST 1234 5698 7654 32", "token": make_jwt({"sub": "1"})}
        )
        out, counts = ALL.redact(doc)
        assert counts == {"iban": 1, "jwt": 1}
        assert json.loads(out) == {
            "id": 981, "iban": "<redacted:iban>", "token": "<redacted:jwt>",
        }  # fmt: skip

    def test_already_masked_values_are_left_alone(self) -> None:
        for value in ("****1111", "********", "j***@example.com", "h:0123456789abcdef"):
            assert ALL.scan(value) == [], value


class TestDetectorSet:
    def test_all_builtins_by_default(self) -> None:
        assert set(ALL.names) == set(BUILTIN_NAMES)
        assert set(BUILTIN_NAMES) == {
            "email", "ssn", "card", "iban", "phone", "api_key", "jwt", "private_key",
        }  # fmt: skip

    def test_enabled_subset(self) -> None:
        ds = DetectorSet.build(enabled=["card"])
        assert ds.names == ("card",)
        text = "john@example.com 4111111111111111 123-45-6789"
        assert ds.scan(text) == [Hit("card", 17, 33)]
        assert DetectorSet.build(enabled=[]).scan(text) == []

    def test_unknown_builtin(self) -> None:
        with pytest.raises(DetectorConfigError, match="'creditcard': unknown built-in"):
            DetectorSet.build(enabled=["creditcard"])

    def test_many_hits_counted(self) -> None:
        text = (
            "a@example.com, b@example.com; SSN 123-45-6789; card 4111-1111-1111-1111; "
            "iban DE89370400440532013000; tel +14155552671"
        )
        out, counts = ALL.redact(text)
        assert counts == {"email": 2, "ssn": 1, "card": 1, "iban": 1, "phone": 1}
        assert out == (
            "<redacted:email>, <redacted:email>; SSN <redacted:ssn>; card <redacted:card>; "
            "iban <redacted:iban>; tel <redacted:phone>"
        )

    def test_nothing_to_redact_returns_same_text(self) -> None:
        text = "plain words and 42 apples"
        out, counts = ALL.redact(text)
        assert out is text and counts == {}

    def test_luhn_failure_falls_through_to_later_detector(self) -> None:
        # The card pattern sees 13 digits starting at '2' first; Luhn rejects them and the
        # phone detector must still get its turn at the same place.
        text = "+12125550100"
        assert names(text) == ["phone"]
        assert found("212 555 0100 1") == []  # not a phone: separators must agree

    def test_redact_bytes(self) -> None:
        raw = b"plain value"
        out, counts = ALL.redact_bytes(raw)
        assert out is raw and counts == {}
        raw = b"no digits here at all"
        assert ALL.redact_bytes(raw)[0] is raw
        raw = "Zoë 4111 1111 1111 1111 ✓".encode()
        out, counts = ALL.redact_bytes(raw)
        assert out == "Zoë <redacted:card> ✓".encode() and counts == {"card": 1}

    def test_redact_bytes_keeps_invalid_utf8_bytes(self) -> None:
        raw = b"\xff\xfe bob@example.com \x80tail"
        out, counts = ALL.redact_bytes(raw)
        assert out == b"\xff\xfe <redacted:email> \x80tail" and counts == {"email": 1}
        raw = b"\xff 42 \xfe"
        assert ALL.redact_bytes(raw)[0] is raw

    def test_prefilter_skips_and_still_finds(self) -> None:
        # No digit, @, key prefix or assignment: nothing to find.
        assert ALL.scan("Lorem ipsum dolor sit amet " * 50) == []
        # Digit-free secrets pass the pre-filter through their prefixes.
        assert names("token: xoxb-abcdefghijklmnop") == ["api_key"]
        assert names("PASSWORD = correcthorsebattery") == ["api_key"]


class TestCustomDetectors:
    def test_custom_regex(self) -> None:
        ds = DetectorSet.build(enabled=[], custom={"employee_id": r"EMP-\d{6}"})
        assert ds.names == ("employee_id",)
        out, counts = ds.redact("badge EMP-004217 issued; EMP-12 invalid")
        assert out == "badge <redacted:employee_id> issued; EMP-12 invalid"
        assert counts == {"employee_id": 1}

    def test_custom_with_builtins_and_groups(self) -> None:
        ds = DetectorSet.build(custom={"project": r"(?i)proj-(alpha|beta)\b", "ticket": "T#[0-9]+"})
        assert ds.names[-2:] == ("project", "ticket")
        assert found("PROJ-Alpha for bob@example.com, T#77", ds) == [
            ("project", "PROJ-Alpha"),
            ("email", "bob@example.com"),
            ("ticket", "T#77"),
        ]
        # Custom patterns are not anchored at word starts: the configured regex decides.
        assert names("xxT#1", ds) == ["ticket"]

    def test_custom_flags_stay_scoped(self) -> None:
        ds = DetectorSet.build(
            custom={"code": r"(?i)project-\d+", "verbose": r"(?x) ORD - \d{4}  # order id"}
        )
        assert found("PROJECT-12 and ord-0001 and ORD-0001 at x@example.com", ds) == [
            ("code", "PROJECT-12"),
            ("verbose", "ORD-0001"),
            ("email", "x@example.com"),
        ]

    def test_custom_runs_without_prefilter(self) -> None:
        ds = DetectorSet.build(custom={"codename": "Bluebird"})
        assert names("Operation Bluebird", ds) == ["codename"]

    @pytest.mark.parametrize(
        "custom, message",
        [
            ({"bad": "EMP-(\\d{6}"}, "detector 'bad': invalid regular expression"),
            ({"empty": "x*"}, "detector 'empty': pattern 'x*' matches the empty string"),
            ({"edge": r"\b"}, "matches the empty string"),
            ({"ahead": "(?=a)"}, "matches the empty string"),
            ({"named": "(?P<id>\\d+)"}, "named groups and backreferences are not supported"),
            ({"backref": "(a)\\1"}, "named groups and backreferences are not supported"),
            ({"email": "foo"}, "detector 'email': is a built-in detector"),
            ({"secrets": "foo"}, "is a built-in detector"),
            ({"9lives": "foo"}, "names start with a letter"),
            ({"blank": ""}, "non-empty string"),
        ],
    )
    def test_bad_custom_config(self, custom: dict[str, str], message: str) -> None:
        with pytest.raises(DetectorConfigError, match=re.escape(message)):
            DetectorSet.build(custom=custom)

    def test_config_error_is_value_error_with_name(self) -> None:
        with pytest.raises(ValueError) as info:
            DetectorSet.build(custom={"ids": "[unclosed"})
        assert isinstance(info.value, DetectorConfigError)
        assert info.value.name == "ids"
        assert "[unclosed" in str(info.value)


# ---------------------------------------------------------------- properties

_emails = st.builds(
    lambda user, host, tld: f"{user}@{host}.{tld}",
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,10}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9]{1,10}", fullmatch=True),
    st.sampled_from(["com", "org", "IO", "co"]),
)
_cards = st.builds(
    lambda issuer, body, sep: sep.join(
        re.findall(".{1,4}", luhn_complete(issuer[0] + body[: issuer[1] - len(issuer[0]) - 1]))
    ),
    st.sampled_from([("4", 16), ("4", 13), ("51", 16), ("37", 15), ("6011", 16), ("35", 19)]),
    st.from_regex(r"[0-9]{18}", fullmatch=True),
    st.sampled_from(["", " ", "-"]),
)
_ssns = st.builds(
    lambda a, g, s, sep: f"{a:03d}{sep}{g:02d}{sep}{s:04d}",
    st.integers(1, 899).filter(lambda a: a != 666),
    st.integers(1, 99),
    st.integers(1, 9999),
    st.sampled_from(["-", " "]),
)
_secrets = st.one_of(
    st.from_regex(r"AKIA[A-Z0-9]{16}", fullmatch=True),
    st.from_regex(r"sk_live_[A-Za-z0-9]{16,30}", fullmatch=True),
    st.from_regex(r"ghp_[A-Za-z0-9]{36}", fullmatch=True),
    st.builds(make_jwt, st.dictionaries(st.text("abc", min_size=1, max_size=3), st.integers())),
)
_sensitive = st.one_of(_emails, _cards, _ssns, _secrets)
# Ordinary text between the values; each value is set off by spaces, as in prose.
_filler = st.lists(
    st.sampled_from([*"abcXYZ ,;:()\n\t.", "the ", "id 42 ", "2023 ", "n=7 "]), max_size=12
).map("".join)


@PROPS
@given(parts=st.lists(st.tuples(_filler, _sensitive), min_size=1, max_size=4), tail=_filler)
def test_redact_never_leaves_a_detected_value(parts: list[tuple[str, str]], tail: str) -> None:
    text = "".join(f"{before} {value} " for before, value in parts) + tail
    out, counts = ALL.redact(text)
    for _, value in parts:
        assert value not in out, (value, out)
    assert sum(counts.values()) >= len(parts)
    # Redacting again finds nothing new: placeholders never look sensitive themselves.
    assert ALL.redact(out) == (out, {})


@PROPS
@given(text=st.text(alphabet=st.sampled_from(list("0123456789 -+.()@aZ=:_")), max_size=80))
def test_scan_hits_are_ordered_disjoint_and_removed(text: str) -> None:
    hits = ALL.scan(text)
    last = 0
    for hit in hits:
        assert last <= hit.start < hit.end <= len(text)
        last = hit.end
    out, counts = ALL.redact(text)
    assert sum(counts.values()) == len(hits)
    for hit in hits:
        value = text[hit.start : hit.end]
        if len(value) >= 8:
            assert value not in out


@PROPS
@given(raw=st.binary(max_size=80))
def test_redact_bytes_never_loses_data_without_hits(raw: bytes) -> None:
    out, counts = ALL.redact_bytes(raw)
    if not counts:
        assert out is raw
    else:
        assert out.count(b"<redacted:") >= sum(counts.values())


@PROPS
@given(
    raw=st.one_of(
        st.binary(max_size=80),
        st.text(alphabet=st.sampled_from(list("0123456789 -+.()@aZAJeyk_=:é")), max_size=80).map(
            str.encode
        ),
    )
)
def test_bytes_prefilter_never_changes_a_result(raw: bytes) -> None:
    assert ALL.redact_bytes(raw) == NO_PREFILTER.redact_bytes(raw)


@pytest.mark.parametrize(
    "text",
    [
        "+" + "1" * 20000,
        "a" * 20000 + "@",
        "1-" * 10000,
        "22 " * 7000,
        "a." * 10000 + "@x",
        "de12 " * 4000,
        "+1 " * 7000,
        "eyJ" + "a" * 20000,
        "-----BEGIN PRIVATE KEY-----" + "x" * 100000,
        "api_key=" * 3000,
        "x@" + "a." * 10000 + "1",
        "password: " + "x" * 20000,
        "SSN 1234567890" * 1500,
        ("4111 " * 5 + "\n") * 1000,
    ],
    ids=lambda t: repr(t[:12]),
)
def test_hostile_values_scan_in_linear_time(text: str) -> None:
    # Shapes that make naive patterns backtrack (long runs, repeated near-misses): a
    # relayed value must never stall the connection.
    t0 = time.perf_counter()
    ALL.redact(text)
    assert time.perf_counter() - t0 < 1.0


def test_values_glued_to_words_are_not_tokens() -> None:
    # Detectors look for values as written: inside a longer word or number they are not
    # separate values (lineage masking covers deliberate encodings).
    assert ALL.scan("id4111111111111111") == []
    assert ALL.scan("94111111111111111") == []
    assert names("card:4111111111111111") == ["card"]
