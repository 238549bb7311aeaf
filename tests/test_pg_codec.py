"""Unit tests for proxies.postgres.codec (no servers needed)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxies.postgres import codec
from proxies.postgres.codec import (
    NEED_DATA,
    BackendReader,
    Bind,
    CancelRequest,
    Close,
    Describe,
    Execute,
    Field,
    FrontendReader,
    GSSENCRequest,
    LocalProtocolError,
    Message,
    Parse,
    ProtocolError,
    RemoteProtocolError,
    SSLRequest,
    StartupMessage,
)

FUZZ = settings(max_examples=300, deadline=None)
FUZZ_SMALL = settings(max_examples=150, deadline=None)

STARTUP_PARAMS = {"user": "alice", "database": "app", "application_name": "pgbench"}

FRONTEND_STREAM = b"".join(
    [
        codec.encode_startup(STARTUP_PARAMS),
        codec.encode_password(b"md5abcdef\0"),
        codec.encode_query("SELECT 1; SELECT 'é'"),
        codec.encode_parse("s1", "SELECT $1::int", (23,)),
        codec.encode_bind("", "s1", (0,), (b"42",), (1,)),
        codec.encode_describe("P", ""),
        codec.encode_execute("", 0),
        codec.encode_close("S", "s1"),
        codec.encode_sync(),
        codec.encode_flush(),
        codec.encode_terminate(),
    ]
)

BACKEND_STREAM = b"".join(
    [
        codec.encode_auth_sasl(["SCRAM-SHA-256"]),
        codec.encode_auth_ok(),
        codec.encode_parameter_status("server_version", "17.0"),
        codec.encode_backend_key_data(1234, 0xDEADBEEF),
        codec.encode_ready_for_query("I"),
        codec.encode_row_description([Field("a", type_oid=23, type_size=4), Field("b")]),
        codec.encode_data_row([b"1", None]),
        codec.encode_data_row([b"", b"xyz"]),
        codec.encode_command_complete("SELECT 2"),
        codec.encode_notice(message="careful"),
        codec.encode_error("ERROR", "42P01", "no such table", detail="d", hint="h"),
        codec.encode_empty_query_response(),
        codec.encode_ready_for_query("T"),
    ]
)


def drain(reader: FrontendReader | BackendReader) -> list[object]:
    events = []
    while (event := reader.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def feed(make: Callable[[], FrontendReader | BackendReader], chunks: list[bytes]) -> list[object]:
    reader = make()
    events: list[object] = []
    for chunk in chunks:
        reader.receive_data(chunk)
        events.extend(drain(reader))
    assert reader.pending == 0
    return events


def feed_fast(reader: FrontendReader | BackendReader, chunks: list[bytes]) -> list[Message]:
    out: list[Message] = []
    for chunk in chunks:
        reader.receive_data(chunk)
        out.extend(reader.next_messages())
    return out


def one(data: bytes, reader: FrontendReader | BackendReader | None = None) -> Message:
    """Frame exactly one typed message, whichever direction its type belongs to."""
    if reader is None:
        frontend = data[:1] in codec.FRONTEND_TYPES
        reader = FrontendReader() if frontend else BackendReader()
        if frontend:
            reader.start_typed()
    reader.receive_data(data)
    message = reader.next_event()
    assert isinstance(message, Message)
    assert message.raw == data
    assert reader.next_event() is NEED_DATA
    return message


# --------------------------------------------------------------------------
# Framing


@pytest.mark.parametrize(
    ("make", "stream"),
    [(FrontendReader, FRONTEND_STREAM), (BackendReader, BACKEND_STREAM)],
    ids=["frontend", "backend"],
)
def test_every_split_point_gives_identical_events(make, stream):
    expected = feed(make, [stream])
    assert len(expected) == 11 if make is FrontendReader else 13
    for i in range(len(stream) + 1):
        assert feed(make, [stream[:i], stream[i:]]) == expected, i
    assert feed(make, [stream[i : i + 1] for i in range(len(stream))]) == expected


def test_frontend_stream_contents():
    events = feed(FrontendReader, [FRONTEND_STREAM])
    startup = events[0]
    assert isinstance(startup, StartupMessage)
    assert startup.version == codec.PROTOCOL_VERSION
    assert startup.params == STARTUP_PARAMS
    assert startup.raw == codec.encode_startup(STARTUP_PARAMS)
    assert [m.type for m in events[1:]] == [bytes([c]) for c in b"pQPBDECSHX"]
    for m in events[1:]:
        assert m.raw == m.type + struct.pack("!i", len(m.body) + 4) + m.body
    assert b"".join(m.raw for m in events[1:]) == FRONTEND_STREAM[len(startup.raw) :]


@pytest.mark.parametrize(
    ("make", "stream"),
    [(FrontendReader, FRONTEND_STREAM), (BackendReader, BACKEND_STREAM)],
    ids=["frontend", "backend"],
)
def test_next_messages_matches_next_event(make, stream):
    expected = [e for e in feed(make, [stream]) if isinstance(e, Message)]
    if make is FrontendReader:
        stream = stream[len(codec.encode_startup(STARTUP_PARAMS)) :]
    for i in range(len(stream) + 1):
        reader = make()
        if isinstance(reader, FrontendReader):
            reader.start_typed()
        assert feed_fast(reader, [stream[:i], stream[i:]]) == expected
        assert reader.pending == 0
    # Continuing after a StartupMessage on the same reader works too.
    if make is FrontendReader:
        reader = FrontendReader()
        reader.receive_data(FRONTEND_STREAM)
        assert isinstance(reader.next_event(), StartupMessage)
        assert reader.next_messages() == expected


def test_startup_phase_events():
    assert feed(FrontendReader, [codec.encode_ssl_request()]) == [SSLRequest()]
    assert feed(FrontendReader, [codec.encode_gssenc_request()]) == [GSSENCRequest()]
    assert feed(FrontendReader, [codec.encode_cancel_request(77, 0xFFFFFFFF)]) == [
        CancelRequest(77, 0xFFFFFFFF)
    ]
    # After an SSLRequest answered with 'N' the client sends a fresh startup packet.
    reader = FrontendReader()
    reader.receive_data(codec.encode_ssl_request())
    assert reader.next_event() == SSLRequest()
    assert reader.in_startup
    reader.receive_data(codec.encode_startup({"user": "u"}))
    event = reader.next_event()
    assert isinstance(event, StartupMessage) and event.params == {"user": "u"}
    assert not reader.in_startup


def test_startup_with_minor_version_and_no_params():
    reader = FrontendReader()
    reader.receive_data(codec.encode_startup({}, version=(3 << 16) | 2))
    event = reader.next_event()
    assert isinstance(event, StartupMessage)
    assert event.version == 196610 and event.params == {}


def test_data_buffered_after_ssl_request_is_refused():
    reader = FrontendReader()
    reader.receive_data(codec.encode_ssl_request() + codec.encode_startup({"user": "u"}))
    with pytest.raises(RemoteProtocolError, match="unencrypted"):
        reader.next_event()


def test_manual_start_typed():
    reader = FrontendReader()
    assert reader.in_startup
    reader.start_typed()
    assert not reader.in_startup
    reader.receive_data(codec.encode_sync())
    assert reader.next_event() == Message(b"S", b"", codec.encode_sync())


def test_truncated_startup_needs_data():
    data = codec.encode_startup(STARTUP_PARAMS)
    reader = FrontendReader()
    reader.receive_data(data[:-1])
    assert reader.next_event() is NEED_DATA
    assert reader.pending == len(data) - 1


def _startup_error(data: bytes) -> RemoteProtocolError:
    reader = FrontendReader()
    reader.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_event()
    # Errors stick: the stream cannot be resynchronised.
    with pytest.raises(RemoteProtocolError):
        reader.next_event()
    return info.value


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("!i", 7) + b"\0\0\0",
        struct.pack("!i", 4),
        struct.pack("!i", 0),
        struct.pack("!i", -1),
        struct.pack("!i", 10001),  # refused on the length alone
        struct.pack("!ii", 8, 196608),  # no terminator at all
        struct.pack("!ii", 14, 196608) + b"a\0b\0\0\0",  # terminator not last
        struct.pack("!ii", 11, 196608) + b"ab\0",  # name without value
        struct.pack("!ii", 12, 196608) + b"a\0b\0",  # no final terminator
        struct.pack("!ii", 12, codec.SSL_REQUEST_CODE) + b"\0\0\0\0",
        struct.pack("!ii", 12, codec.CANCEL_REQUEST_CODE) + b"\0\0\0\1",
        struct.pack("!ii", 11, 196608) + b"\xff\0\0",  # invalid UTF-8
    ],
)
def test_bad_startup_packets(data):
    assert isinstance(_startup_error(data), ProtocolError)


def test_oversized_startup_packet():
    big = struct.pack("!ii", 10004, 196608) + b"a\0" + b"x" * 9992 + b"\0\0"
    assert len(big) == 10004
    assert "invalid length" in _startup_error(big).message
    assert "invalid length" in _startup_error(big[:4]).message
    with pytest.raises(LocalProtocolError):
        codec.encode_startup({"options": "x" * 10000})


@pytest.mark.parametrize("major", [0, 1, 2, 4, 1234])
def test_unknown_protocol_version(major):
    error = _startup_error(codec.encode_startup({"user": "u"}, version=major << 16))
    assert error.sqlstate == "0A000"


@pytest.mark.parametrize("length", [0, 1, 3, -1, -(2**31)])
def test_typed_length_below_four(length):
    reader = BackendReader()
    reader.receive_data(b"Z" + struct.pack("!i", length))
    with pytest.raises(RemoteProtocolError, match="length"):
        reader.next_event()


def test_message_too_large_is_detected_from_header():
    reader = BackendReader(max_message_size=100)
    reader.receive_data(b"D" + struct.pack("!i", 101))
    with pytest.raises(RemoteProtocolError, match="message too large"):
        reader.next_event()
    reader = FrontendReader(max_message_size=100)
    reader.start_typed()
    reader.receive_data(b"Q" + struct.pack("!i", 100) + b"x" * 95 + b"\0")
    assert reader.next_messages()[0].type == b"Q"
    reader.receive_data(b"Q" + struct.pack("!i", 2**31 - 1))
    with pytest.raises(RemoteProtocolError, match="message too large"):
        reader.next_messages()


def test_default_size_limit():
    reader = FrontendReader()
    reader.start_typed()
    reader.receive_data(b"Q" + struct.pack("!i", 64 * 1024 * 1024 + 1))
    with pytest.raises(RemoteProtocolError, match="message too large"):
        reader.next_event()


@pytest.mark.parametrize(
    ("make", "bad"),
    [(FrontendReader, b"Z"), (FrontendReader, b"\0"), (BackendReader, b"Q"), (BackendReader, b"p")],
)
def test_unknown_type_bytes(make, bad):
    reader = make()
    if isinstance(reader, FrontendReader):
        reader.start_typed()
    reader.receive_data(bad + struct.pack("!i", 4))
    with pytest.raises(RemoteProtocolError, match="invalid message type"):
        reader.next_event()


def test_next_messages_returns_good_prefix_then_raises():
    reader = BackendReader()
    reader.receive_data(codec.encode_ready_for_query("I") + b"?\0\0\0\4")
    assert [m.type for m in reader.next_messages()] == [b"Z"]
    with pytest.raises(RemoteProtocolError):
        reader.next_messages()
    with pytest.raises(RemoteProtocolError):
        reader.next_event()


def _scan_all(reader: BackendReader, chunks: list[bytes]) -> tuple[bytes, list[Message]]:
    """Forwarded bytes and the (non-row) messages scan() reported, as Messages."""
    forwarded, seen = b"", []
    for chunk in chunks:
        data, frames = reader.scan(chunk)
        for t, start, end in frames:
            assert data[start:start + 1] == t
            seen.append(Message(t, data[start + 5:end], data[start:end]))
        forwarded += data
    return forwarded, seen


def _feed_all(reader: FrontendReader, chunks: list[bytes]) -> list[Message]:
    out: list[Message] = []
    for chunk in chunks:
        out.extend(reader.feed(chunk))
    return out


def _typed(make: Callable[[], FrontendReader | BackendReader]) -> FrontendReader | BackendReader:
    reader = make()
    if isinstance(reader, FrontendReader):
        reader.start_typed()
    return reader


@pytest.mark.parametrize(
    ("make", "stream"),
    [(FrontendReader, FRONTEND_STREAM), (BackendReader, BACKEND_STREAM)],
    ids=["frontend", "backend"],
)
def test_relay_framing_matches_next_messages_at_every_split(make, stream):
    if make is FrontendReader:
        stream = stream[len(codec.encode_startup(STARTUP_PARAMS)) :]
    expected = feed_fast(_typed(make), [stream])
    splits = [[stream[:i], stream[i:]] for i in range(len(stream) + 1)]
    splits.append([stream[i:i + 1] for i in range(len(stream))])  # byte by byte
    for chunks in splits:
        reader = _typed(make)
        if isinstance(reader, FrontendReader):
            assert _feed_all(reader, chunks) == expected
        else:
            forwarded, seen = _scan_all(reader, chunks)
            assert forwarded == stream  # every byte forwarded once, in order
            assert seen == [m for m in expected if m.type not in (b"D", b"d")]
        assert reader.pending == 0


def test_feed_does_not_copy_a_chunk_holding_one_message():
    reader = _typed(FrontendReader)
    query = codec.encode_query("SELECT 1")
    (message,) = reader.feed(query)
    assert message.raw is query


def test_relay_framing_returns_good_prefix_then_raises():
    good = codec.encode_ready_for_query("I")
    reader = BackendReader()
    data, frames = reader.scan(good + b"?\0\0\0\4")
    assert data == good and [f[0] for f in frames] == [b"Z"]
    with pytest.raises(RemoteProtocolError, match="invalid message type"):
        reader.scan(good)
    reader = _typed(FrontendReader)
    assert [m.type for m in reader.feed(codec.encode_sync() + b"Z\0\0\0\4")] == [b"S"]
    with pytest.raises(RemoteProtocolError):
        reader.feed(codec.encode_sync())


def test_relay_framing_checks_the_header_before_buffering():
    reader = BackendReader(max_message_size=100)
    with pytest.raises(RemoteProtocolError, match="message too large"):
        reader.scan(b"D" + struct.pack("!i", 101))
    reader = _typed(FrontendReader)
    reader.feed(b"Q\0")  # a header cut in two is buffered...
    with pytest.raises(RemoteProtocolError, match="length"):
        reader.feed(b"\0\0\1")  # ...and checked once it is whole


def test_a_large_message_in_small_pieces_is_joined_once():
    body = b"x" * 200_000
    message = codec.encode_message(b"d", body)
    reader = BackendReader()
    seen = b""
    for i in range(0, len(message), 1000):
        data, frames = reader.scan(message[i:i + 1000])
        seen += data
        # Until the message is complete nothing is forwarded and nothing re-framed.
        assert data == (message if i + 1000 >= len(message) else b"")
    assert seen == message and reader.pending == 0


def test_next_messages_refused_in_startup_phase():
    with pytest.raises(LocalProtocolError):
        FrontendReader().next_messages()


def test_partial_header_needs_data():
    reader = BackendReader()
    reader.receive_data(b"Z\0\0")
    assert reader.next_event() is NEED_DATA
    assert reader.next_messages() == []
    reader.receive_data(b"\0\5I")
    assert reader.next_messages() == [Message(b"Z", b"I", b"Z\0\0\0\5I")]


# --------------------------------------------------------------------------
# Round trips


def test_round_trip_frontend_messages():
    assert codec.decode_query(one(codec.encode_query("SELECT 'ü'")).body) == "SELECT 'ü'"
    assert codec.decode_parse(one(codec.encode_parse("n", "q", (23, 0xFFFFFFFF))).body) == Parse(
        "n", "q", (23, 0xFFFFFFFF)
    )
    bind = codec.encode_bind("p", "s", (0, 1), (b"x", None), (1, 0, 1))
    assert codec.decode_bind(one(bind).body) == Bind("p", "s", (0, 1), (b"x", None), (1, 0, 1))
    assert codec.decode_bind(one(codec.encode_bind("", "")).body) == Bind("", "", (), (), ())
    assert codec.decode_describe(one(codec.encode_describe("S", "st")).body) == Describe("S", "st")
    assert codec.decode_close(one(codec.encode_close("P", "po")).body) == Close("P", "po")
    assert codec.decode_execute(one(codec.encode_execute("po", 10)).body) == Execute("po", 10)
    assert codec.decode_execute(one(codec.encode_execute()).body) == Execute("", 0)
    assert codec.decode_password(one(codec.encode_password(b"secret\0")).body) == b"secret"
    initial = codec.encode_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert codec.decode_sasl_initial_response(one(initial).body) == (
        "SCRAM-SHA-256",
        b"n,,n=,r=abc",
    )
    empty = codec.encode_sasl_initial_response("X", None)
    assert codec.decode_sasl_initial_response(one(empty).body) == ("X", None)
    assert one(codec.encode_password(b"raw sasl")).body == b"raw sasl"
    for encoded, type_ in [
        (codec.encode_sync(), b"S"),
        (codec.encode_flush(), b"H"),
        (codec.encode_terminate(), b"X"),
    ]:
        assert one(encoded) == Message(type_, b"", type_ + b"\0\0\0\4")


def test_round_trip_startup_packets():
    reader = FrontendReader()
    reader.receive_data(codec.encode_cancel_request(2**32 - 1, 0))
    assert reader.next_event() == CancelRequest(2**32 - 1, 0)
    assert codec.encode_ssl_request() == struct.pack("!ii", 8, 80877103)
    assert codec.encode_gssenc_request() == struct.pack("!ii", 8, 80877104)


def test_round_trip_backend_messages():
    error = one(codec.encode_error("FATAL", "28P01", "bad", detail="d", hint="h"))
    assert error.type == b"E"
    assert codec.decode_error_fields(error.body) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28P01",
        "M": "bad",
        "D": "d",
        "H": "h",
    }
    notice = one(codec.encode_notice(message="hi"))
    assert notice.type == b"N"
    assert codec.decode_error_fields(notice.body) == {
        "S": "NOTICE",
        "V": "NOTICE",
        "C": "00000",
        "M": "hi",
    }
    warn = one(codec.encode_notice("WARNING", "01000", "w"))
    assert codec.decode_error_fields(warn.body)["S"] == "WARNING"
    for status in "ITE":
        assert (
            codec.decode_ready_for_query(one(codec.encode_ready_for_query(status)).body) == status
        )
    assert codec.decode_backend_key_data(
        one(codec.encode_backend_key_data(99, 2**32 - 1)).body
    ) == (99, 2**32 - 1)
    assert codec.decode_parameter_status(one(codec.encode_parameter_status("a", "b")).body) == (
        "a",
        "b",
    )
    assert codec.decode_command_complete(one(codec.encode_command_complete("INSERT 0 1")).body) == (
        "INSERT 0 1"
    )
    assert one(codec.encode_empty_query_response()) == Message(b"I", b"", b"I\0\0\0\4")
    assert codec.decode_auth(one(codec.encode_auth_ok()).body) == (0, b"")
    assert codec.decode_auth(one(codec.encode_auth_cleartext_request()).body) == (3, b"")
    assert codec.decode_auth(one(codec.encode_auth_md5_request(b"salt")).body) == (5, b"salt")
    code, payload = codec.decode_auth(one(codec.encode_auth_sasl(["A", "SCRAM-SHA-256"])).body)
    assert code == 10 and codec.decode_sasl_mechanisms(payload) == ("A", "SCRAM-SHA-256")
    assert codec.decode_auth(one(codec.encode_auth_sasl_continue(b"r=x")).body) == (11, b"r=x")
    assert codec.decode_auth(one(codec.encode_auth_sasl_final(b"v=y")).body) == (12, b"v=y")
    fields = (
        Field("id", 16384, 1, 23, 4, -1, 0),
        Field("näme", 0, 0, 25, -1, -1, 1),
        Field("n", 2**32 - 1, -1, 1700, -1, 0x7FFFFFFF, 0),
    )
    assert codec.decode_row_description(one(codec.encode_row_description(fields)).body) == fields
    assert codec.decode_row_description(one(codec.encode_row_description([])).body) == ()
    row = (b"1", None, b"", b"\0\xff")
    assert codec.decode_data_row(one(codec.encode_data_row(row)).body) == row
    negotiate = one(codec.encode_negotiate_protocol_version(0, ["_pq_.x"]))
    assert negotiate.body == struct.pack("!ii", 0, 1) + b"_pq_.x\0"


def test_generic_encode_message():
    assert codec.encode_message(b"Q", b"x\0") == b"Q\0\0\0\6x\0"
    with pytest.raises(LocalProtocolError):
        codec.encode_message(b"QQ", b"")


_TEXT = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=20)
_VALUE = st.none() | st.binary(max_size=20)


@FUZZ_SMALL
@given(_TEXT, _TEXT, st.lists(st.integers(0, 1), max_size=5), st.lists(_VALUE, max_size=5))
def test_round_trip_bind_property(portal, statement, result_formats, params):
    formats = [i % 2 for i in range(len(params))]
    data = codec.encode_bind(portal, statement, formats, params, result_formats)
    assert codec.decode_bind(one(data).body) == Bind(
        portal, statement, tuple(formats), tuple(params), tuple(result_formats)
    )


@FUZZ_SMALL
@given(_TEXT, _TEXT, st.lists(st.integers(0, 2**32 - 1), max_size=5), st.lists(_VALUE, max_size=8))
def test_round_trip_parse_and_rows_property(name, query, types, row):
    assert codec.decode_parse(one(codec.encode_parse(name, query, types)).body) == Parse(
        name, query, tuple(types)
    )
    assert codec.decode_data_row(one(codec.encode_data_row(row)).body) == tuple(row)
    assert codec.decode_query(one(codec.encode_query(query)).body) == query


@pytest.mark.parametrize(
    "encode",
    [
        lambda: codec.encode_query("a\0b"),
        lambda: codec.encode_parse("", "q", (-1,)),
        lambda: codec.encode_bind("", "", (0,) * 70000),
        lambda: codec.encode_describe("X", ""),
        lambda: codec.encode_close("", ""),
        lambda: codec.encode_ready_for_query("X"),
        lambda: codec.encode_error("ERROR", "bad", "m"),
        lambda: codec.encode_backend_key_data(-1, 0),
        lambda: codec.encode_cancel_request(2**32, 0),
        lambda: codec.encode_startup({"": "x"}),
        lambda: codec.encode_auth_sasl([]),
        lambda: codec.encode_execute("", 2**31),
    ],
)
def test_encoders_refuse_invalid_input(encode):
    with pytest.raises(LocalProtocolError):
        encode()


# --------------------------------------------------------------------------
# Malformed bodies


@pytest.mark.parametrize(
    ("decode", "body"),
    [
        (codec.decode_query, b"SELECT 1"),  # no terminator
        (codec.decode_query, b"SELECT 1\0DROP TABLE t\0"),  # trailing statement
        (codec.decode_query, b"\xc3\0"),  # invalid UTF-8
        (codec.decode_parse, b"s\0q\0\0\2\0\0\0\1"),  # count overruns
        (codec.decode_bind, b"\0\0\0\0\0\1\0\0\0\5ab\0\0"),  # value overruns
        (codec.decode_bind, b"\0\0\0\0\0\1\xff\xff\xff\xfe\0\0"),  # length -2
        (codec.decode_bind, b"\0\0\0\2\0\0\0\0\0\0\0\0"),  # 2 formats, 0 params
        (codec.decode_describe, b""),
        (codec.decode_describe, b"Xname\0"),
        (codec.decode_close, b"S"),
        (codec.decode_execute, b"\0\0\0"),
        (codec.decode_error_fields, b"Mmsg\0"),  # no final terminator
        (codec.decode_error_fields, b"Mmsg"),
        (codec.decode_ready_for_query, b"X"),
        (codec.decode_ready_for_query, b"II"),
        (codec.decode_backend_key_data, b"\0" * 7),
        (codec.decode_parameter_status, b"a\0b"),
        (codec.decode_command_complete, b""),
        (codec.decode_auth, b"\0\0\0"),
        (codec.decode_sasl_mechanisms, b"SCRAM-SHA-256\0"),
        (codec.decode_row_description, b"\0\1a\0\0\0"),
        (codec.decode_data_row, b"\0\2\xff\xff\xff\xff"),
        (codec.decode_data_row, b"\0\1\0\0\0\2a"),
        (codec.decode_password, b"pw"),
        (codec.decode_password, b"pw\0x\0"),
        (codec.decode_sasl_initial_response, b"M\0\0\0\0\5ab"),
    ],
)
def test_malformed_bodies(decode, body):
    with pytest.raises(RemoteProtocolError):
        decode(body)


def test_invalid_utf8_gets_sqlstate_22021():
    with pytest.raises(RemoteProtocolError) as info:
        codec.decode_query(b"\xff\0")
    assert info.value.sqlstate == "22021"


def test_error_fields_tolerate_bad_utf8():
    assert codec.decode_error_fields(b"M\xff\0\0") == {"M": "\ufffd"}


# --------------------------------------------------------------------------
# Fuzzing

DECODERS = [
    codec.decode_query,
    codec.decode_parse,
    codec.decode_bind,
    codec.decode_describe,
    codec.decode_close,
    codec.decode_execute,
    codec.decode_password,
    codec.decode_sasl_initial_response,
    codec.decode_error_fields,
    codec.decode_ready_for_query,
    codec.decode_backend_key_data,
    codec.decode_parameter_status,
    codec.decode_command_complete,
    codec.decode_auth,
    codec.decode_sasl_mechanisms,
    codec.decode_row_description,
    codec.decode_data_row,
]

# Bodies built from protocol-shaped pieces reach deeper than uniform noise.
_PIECES = st.sampled_from(
    [b"\0", b"\0\0", b"\0\1", b"\0\2", b"\xff\xff\xff\xff", b"\0\0\0\1", b"S", b"P", b"a\0"]
)
_BODIES = st.binary(max_size=64) | st.lists(_PIECES | st.binary(max_size=6), max_size=12).map(
    b"".join
)


@pytest.mark.parametrize("decode", DECODERS, ids=lambda f: f.__name__)
@settings(max_examples=100, deadline=None)
@given(body=_BODIES)
def test_decoders_only_raise_remote_protocol_error(decode, body):
    try:
        decode(body)
    except RemoteProtocolError:
        pass


def _run_reader(reader: FrontendReader | BackendReader, data: bytes, split: int) -> None:
    try:
        for chunk in (data[:split], data[split:]):
            reader.receive_data(chunk)
            while True:
                event = reader.next_event()
                if event is NEED_DATA:
                    break
                assert isinstance(
                    event, Message | SSLRequest | GSSENCRequest | CancelRequest | StartupMessage
                )
    except ProtocolError:
        pass


def _run_fast(reader: FrontendReader | BackendReader, data: bytes, split: int) -> None:
    try:
        for chunk in (data[:split], data[split:]):
            reader.receive_data(chunk)
            for message in reader.next_messages():
                assert isinstance(message, Message)
    except ProtocolError:
        pass
    # The relay framing of the same bytes: only ProtocolError, never another exception.
    relay = type(reader)(max_message_size=1000)
    try:
        for chunk in (data[:split], data[split:]):
            if isinstance(relay, FrontendReader):
                relay.start_typed()
                assert all(isinstance(m, Message) for m in relay.feed(chunk))
            else:
                relay.scan(chunk)
    except ProtocolError:
        pass


_STREAMS = st.binary(max_size=200) | st.lists(
    st.sampled_from([b"Q", b"Z", b"D", b"p", b"\0\0\0\4", b"\0\0\0\x08", b"\0\0\0\5I"])
    | st.binary(max_size=8),
    max_size=20,
).map(b"".join)


@FUZZ
@given(data=_STREAMS, split=st.integers(0, 200))
def test_fuzz_frontend_startup_phase(data, split):
    _run_reader(FrontendReader(max_message_size=1000), data, split)


@FUZZ
@given(data=_STREAMS, split=st.integers(0, 200))
def test_fuzz_frontend_after_startup(data, split):
    prefix = codec.encode_startup({"user": "u"})
    _run_reader(FrontendReader(max_message_size=1000), prefix + data, split + len(prefix))
    reader = FrontendReader(max_message_size=1000)
    reader.start_typed()
    _run_fast(reader, data, split)


@FUZZ
@given(data=_STREAMS, split=st.integers(0, 200))
def test_fuzz_backend(data, split):
    _run_reader(BackendReader(max_message_size=1000), data, split)
    _run_fast(BackendReader(max_message_size=1000), data, split)


_MESSAGES = st.lists(
    st.tuples(st.sampled_from(sorted(codec.BACKEND_TYPES)), st.binary(max_size=30)), max_size=8
)


@FUZZ_SMALL
@given(messages=_MESSAGES, splits=st.lists(st.integers(0, 400), max_size=4))
def test_arbitrary_valid_messages_survive_arbitrary_chunking(messages, splits):
    stream = b"".join(codec.encode_message(t, b) for t, b in messages)
    cuts = sorted({0, len(stream), *(s for s in splits if s <= len(stream))})
    chunks = [stream[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    expected = [Message(t, b, codec.encode_message(t, b)) for t, b in messages]
    assert feed(BackendReader, chunks) == expected
    assert feed_fast(BackendReader(), chunks) == expected
    forwarded, seen = _scan_all(BackendReader(), chunks)
    assert forwarded == stream
    assert seen == [m for m in expected if m.type not in (b"D", b"d")]
