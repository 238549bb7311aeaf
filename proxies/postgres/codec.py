"""Sans-I/O codec for the PostgreSQL frontend/backend protocol 3.0.

What this module is for:
  * framing bytes read from a client (``FrontendReader``) or from a server
    (``BackendReader``) into messages, cheaply enough for the relay hot path;
    every message keeps its ``raw`` bytes so relaying never re-encodes;
  * decoding the message bodies the gateway needs to inspect (queries,
    extended-protocol messages, errors, authentication requests, rows);
  * encoding the messages the gateway itself produces, in both directions.

What it must not do:
  * no sockets, no asyncio, no TLS: callers feed bytes in and write bytes out;
  * no policy: it does not refuse replication connections, pick auth methods
    or decide what is risky. It only refuses bytes that are not valid
    protocol, raising ``RemoteProtocolError`` (peer's fault) or
    ``LocalProtocolError`` (we were asked to produce something invalid).

Strings are UTF-8. The gateway assumes ``client_encoding`` UTF8; text that is
not valid UTF-8 is refused with SQLSTATE 22021 instead of being guessed at,
because a proxy that misreads a query's encoding can be made to approve a
different statement from the one the server executes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

# --------------------------------------------------------------------------
# Constants

PROTOCOL_VERSION: Final = 196608  # 3.0
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102
MAX_STARTUP_PACKET_LENGTH: Final = 10000  # same limit as the PostgreSQL server
DEFAULT_MAX_MESSAGE_SIZE: Final = 64 * 1024 * 1024
# Before a client has logged in: the longest message PostgreSQL reads while it
# authenticates (PG_MAX_AUTH_TOKEN_LENGTH, 65535 bytes of body) plus its length field.
MAX_LOGIN_MESSAGE_SIZE: Final = 65535 + 4

# Authentication request codes (the int32 at the start of an 'R' message).
AUTH_OK: Final = 0
AUTH_KERBEROS_V5: Final = 2
AUTH_CLEARTEXT_PASSWORD: Final = 3
AUTH_MD5_PASSWORD: Final = 5
AUTH_SCM_CREDENTIAL: Final = 6
AUTH_GSS: Final = 7
AUTH_GSS_CONTINUE: Final = 8
AUTH_SSPI: Final = 9
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

FRONTEND_TYPES: Final = frozenset(bytes([c]) for c in b"BCdcfDEHFPpQSX")
BACKEND_TYPES: Final = frozenset(bytes([c]) for c in b"RKSZTDCIENAcdGHWVn123stv")


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

_HDR = struct.Struct("!ci")  # type byte + int32 length (length counts itself)
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_II = struct.Struct("!ii")
_UU = struct.Struct("!II")
_FIELD = struct.Struct("!IhIhih")  # RowDescription per-field fixed part


# --------------------------------------------------------------------------
# Errors


class ProtocolError(Exception):
    """Invalid protocol traffic. ``sqlstate`` is what to report to a client."""

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


class LocalProtocolError(ProtocolError):
    """We were asked to encode something the protocol cannot carry."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not valid protocol."""


# --------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: int


@dataclass(frozen=True, slots=True)
class StartupMessage:
    version: int
    params: dict[str, str]
    raw: bytes


class Message(NamedTuple):
    """One typed message. ``raw`` is the whole message including its header.

    A NamedTuple (built with ``tuple.__new__`` in the readers) because it is
    the cheapest immutable record CPython can allocate per relayed message.
    """

    type: bytes
    body: bytes
    raw: bytes


StartupEvent = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage
_new_tuple = tuple.__new__


# --------------------------------------------------------------------------
# Readers


class _TypedReader:
    """Buffer + typed-phase framing shared by both directions."""

    __slots__ = ("_buf", "_limit", "_types", "_error", "_need")

    def __init__(self, types: frozenset[bytes], max_message_size: int) -> None:
        if max_message_size < 4:
            raise ValueError("max_message_size must be at least 4")
        self._buf = bytearray()
        self._limit = max_message_size
        self._types = types
        self._error: RemoteProtocolError | None = None
        self._need = 0  # bytes _buf must hold before framing can make progress (feed/scan)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is None:  # after an error nothing is parsed; don't hoard it
            self._buf += data

    @property
    def pending(self) -> int:
        """Bytes buffered but not yet returned (non-zero at EOF = truncated)."""
        return len(self._buf)

    @property
    def idle(self) -> bool:
        """Nothing buffered and no error kept for the next call (a chunk whose messages
        were returned may end in a bad header: the error is raised on the next call)."""
        return not self._buf and self._error is None

    def _fail(self, message: str, sqlstate: str = "08P01") -> RemoteProtocolError:
        # Once the stream is desynchronised nothing after it can be trusted,
        # so the error sticks and every later call raises it again.
        self._error = RemoteProtocolError(message, sqlstate)
        return self._error

    def _bad_header(self, t: bytes, length: int) -> RemoteProtocolError:
        if t not in self._types:
            return self._fail(f"invalid message type {t!r}")
        if length < 4:
            return self._fail(f"invalid message length {length}")
        return self._fail("message too large")

    def _next_typed(self) -> Message | _NeedData:
        buf = self._buf
        if len(buf) < 5:
            return NEED_DATA
        t, length = _HDR.unpack_from(buf, 0)
        # Checked before the body arrives so junk never makes us buffer 64 MiB.
        if t not in self._types or length < 4 or length > self._limit:
            raise self._bad_header(t, length)
        end = length + 1
        if len(buf) < end:
            return NEED_DATA
        raw = bytes(buf[:end])
        del buf[:end]  # bytearray front deletion is amortised O(1) in CPython
        return _new_tuple(Message, (t, raw[5:], raw))

    def _messages(self) -> list[Message]:
        buf = self._buf
        n = len(buf)
        out: list[Message] = []
        if n < 5:
            return out
        types, limit, unpack, append = self._types, self._limit, _HDR.unpack_from, out.append
        off = 0
        with memoryview(buf) as mv:
            while n - off >= 5:
                t, length = unpack(mv, off)
                if t not in types or length < 4 or length > limit:
                    if out:
                        break  # hand over the good ones; the next call raises
                    raise self._bad_header(t, length)
                end = off + 1 + length
                if end > n:
                    break
                raw = mv[off:end].tobytes()
                append(_new_tuple(Message, (t, raw[5:], raw)))
                off = end
        if off:
            del buf[:off]
        return out

    # ---- the relay hot path: frame each chunk as it arrives

    def _input(self, data: bytes) -> bytes | None:
        """The bytes to frame now, or None while the buffered message is incomplete.

        Most chunks start and end on message boundaries, so they are framed in
        place; only a message cut across reads is buffered, and it is joined
        once, when complete (never re-copied per read, so a 64 MiB COPY row
        arriving in small pieces costs O(n)).
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return None
            data = bytes(buf)
            buf.clear()
        return data

    def _keep(self, data: bytes, off: int) -> None:
        """Buffer the incomplete message that starts at ``off``."""
        rest = memoryview(data)[off:]
        self._buf += rest
        if len(rest) >= 5:
            self._need = _HDR.unpack_from(rest, 0)[1] + 1
        else:
            self._need = 5



class BackendReader(_TypedReader):
    """Frames bytes coming FROM a PostgreSQL server (always typed messages).

    The single 'S'/'N' byte answering an SSLRequest is not a message; the
    caller reads it before feeding this reader.
    """

    __slots__ = ()

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        super().__init__(BACKEND_TYPES, max_message_size)

    def next_event(self) -> Message | _NeedData:
        if self._error is not None:
            raise self._error
        return self._next_typed()

    def next_messages(self) -> list[Message]:
        """Every complete message in the buffer."""
        if self._error is not None:
            raise self._error
        return self._messages()

    def scan(self, data: bytes) -> tuple[bytes, list[tuple[bytes, int, int]]]:
        """Frame one chunk from the server without copying it (relay hot path).

        Returns the bytes of every complete message (to forward as they are)
        and ``(type, start, end)`` for each of them except DataRow and
        CopyData, which a relay forwards without looking (masking rewrites the
        runs of them that lie between the frames returned);
        ``chunk[start + 5:end]`` is a message's body. An incomplete last
        message is kept for the next call. Invalid framing raises
        ``RemoteProtocolError`` (after returning the valid messages before it, if any).
        """
        chunk = self._input(data)
        frames: list[tuple[bytes, int, int]] = []
        if chunk is None:
            return b"", frames
        n = len(chunk)
        off = 0
        types, limit, unpack, append = self._types, self._limit, _HDR.unpack_from, frames.append
        try:
            while n - off >= 5:
                t, length = unpack(chunk, off)
                if t not in types or length < 4 or length > limit:
                    raise self._bad_header(t, length)
                end = off + 1 + length
                if end > n:
                    break
                if t != b"D" and t != b"d":
                    append((t, off, end))
                off = end
        except RemoteProtocolError:
            if not off:
                raise
        if off < n:
            if self._error is None:
                self._keep(chunk, off)
            return chunk[:off], frames
        return chunk, frames


class FrontendReader(_TypedReader):
    """Frames bytes coming FROM a client: startup packets, then typed messages."""

    __slots__ = ("_startup",)

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        super().__init__(FRONTEND_TYPES, max_message_size)
        self._startup = True

    @property
    def in_startup(self) -> bool:
        return self._startup

    def start_typed(self) -> None:
        self._startup = False

    def set_max_message_size(self, size: int) -> None:
        """Messages longer than ``size`` bytes (length field included) are refused from
        now on: a session allows big messages only once its client logged in."""
        if size < 4:
            raise ValueError("max_message_size must be at least 4")
        self._limit = size

    def next_event(self) -> StartupEvent | Message | _NeedData:
        if self._error is not None:
            raise self._error
        if self._startup:
            return self._next_startup()
        return self._next_typed()

    def next_messages(self) -> list[Message]:
        """Every complete typed message in the buffer."""
        if self._error is not None:
            raise self._error
        if self._startup:
            raise LocalProtocolError("next_messages() called during the startup phase")
        return self._messages()

    def feed(self, data: bytes) -> list[Message]:
        """Frame one chunk of typed messages (relay hot path).

        Equivalent to ``receive_data`` + ``next_messages``, but a chunk that
        holds exactly one message (the usual case) is not copied at all. Only
        for the typed phase, with nothing left unread from ``receive_data``.
        """
        if self._startup:
            raise LocalProtocolError("feed() called during the startup phase")
        chunk = self._input(data)
        out: list[Message] = []
        if chunk is None:
            return out
        n = len(chunk)
        off = 0
        types, limit, unpack, append = self._types, self._limit, _HDR.unpack_from, out.append
        try:
            while n - off >= 5:
                t, length = unpack(chunk, off)
                if t not in types or length < 4 or length > limit:
                    raise self._bad_header(t, length)
                end = off + 1 + length
                if end > n:
                    break
                raw = chunk if (off == 0 and end == n) else chunk[off:end]
                append(_new_tuple(Message, (t, raw[5:], raw)))
                off = end
        except RemoteProtocolError:
            if not off:
                raise
        if off < n and self._error is None:
            self._keep(chunk, off)
        return out

    def _next_startup(self) -> StartupEvent | _NeedData:
        buf = self._buf
        if len(buf) < 4:
            return NEED_DATA
        (length,) = _I32.unpack_from(buf, 0)
        if length < 8 or length > MAX_STARTUP_PACKET_LENGTH:
            raise self._fail(f"invalid length of startup packet: {length}")
        if len(buf) < length:
            return NEED_DATA
        (code,) = _I32.unpack_from(buf, 4)
        raw = bytes(buf[:length])
        del buf[:length]
        if code == SSL_REQUEST_CODE or code == GSSENC_REQUEST_CODE:
            if length != 8:
                raise self._fail("invalid length of encryption request packet")
            if buf:
                # Bytes sent before the TLS/GSS handshake could be injected by
                # a man in the middle (CVE-2021-23214); refuse them outright.
                raise self._fail("received unencrypted data after encryption request")
            return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
        if code == CANCEL_REQUEST_CODE:
            # Protocol 3.2 allows longer keys; we only ever hand out 4-byte ones.
            if length != 16:
                raise self._fail("invalid length of cancel request packet")
            pid, secret = _UU.unpack_from(raw, 8)
            return CancelRequest(pid, secret)
        if code >> 16 != 3:
            raise self._fail(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}", "0A000")
        try:
            params = _startup_params(raw)
        except RemoteProtocolError as exc:
            raise self._fail(exc.message, exc.sqlstate) from None
        self._startup = False
        return StartupMessage(code, params, raw)


def _startup_params(raw: bytes) -> dict[str, str]:
    # Layout: (name NUL value NUL)* NUL, and the final NUL must be the last byte.
    end = len(raw)
    pos = 8
    params: dict[str, str] = {}
    while True:
        if pos >= end:
            raise RemoteProtocolError("invalid startup packet layout: missing terminator")
        if raw[pos] == 0:
            if pos != end - 1:
                raise RemoteProtocolError(
                    "invalid startup packet layout: expected terminator as last byte"
                )
            return params
        name, pos = _cstring(raw, pos)
        value, pos = _cstring(raw, pos)
        params[name] = value


# --------------------------------------------------------------------------
# Decoding helpers


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("invalid byte sequence for encoding UTF8", "22021") from None


def _cstring(body: bytes, pos: int) -> tuple[str, int]:
    end = body.find(b"\0", pos)
    if end < 0:
        raise RemoteProtocolError("invalid string in message: missing terminator")
    return _utf8(body[pos:end]), end + 1


def _unpack(st: struct.Struct, body: bytes, pos: int) -> tuple[int, ...]:
    if pos + st.size > len(body):
        raise RemoteProtocolError("insufficient data left in message")
    return st.unpack_from(body, pos)


def _array(fmt: str, count: int, size: int, body: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    end = pos + count * size
    if end > len(body):
        raise RemoteProtocolError("insufficient data left in message")
    return struct.unpack_from(f"!{count}{fmt}", body, pos), end


def _values(body: bytes, pos: int, count: int) -> tuple[tuple[bytes | None, ...], int]:
    # Shared by Bind parameters and DataRow columns: int32 length (-1 = NULL) + bytes.
    out: list[bytes | None] = []
    n = len(body)
    for _ in range(count):
        if pos + 4 > n:
            raise RemoteProtocolError("insufficient data left in message")
        (size,) = _I32.unpack_from(body, pos)
        pos += 4
        if size == -1:
            out.append(None)
            continue
        if size < 0 or pos + size > n:
            raise RemoteProtocolError("insufficient data left in message")
        out.append(body[pos : pos + size])
        pos += size
    return tuple(out), pos


def _end(body: bytes, pos: int, what: str) -> None:
    # The server rejects trailing bytes too; accepting them here would let the
    # gateway inspect something other than what the server would see.
    if pos != len(body):
        raise RemoteProtocolError(f"invalid {what} message format")


# --------------------------------------------------------------------------
# Decoded message records


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    query: str
    param_types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Describe:
    kind: Literal["S", "P"]
    name: str


@dataclass(frozen=True, slots=True)
class Close:
    kind: Literal["S", "P"]
    name: str


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    table_oid: int = 0
    column_number: int = 0
    type_oid: int = 25  # text
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0


# --------------------------------------------------------------------------
# Decoders (frontend messages)


def decode_query(body: bytes) -> str:
    query, pos = _cstring(body, 0)
    _end(body, pos, "Query")
    return query


def decode_parse(body: bytes) -> Parse:
    name, pos = _cstring(body, 0)
    query, pos = _cstring(body, pos)
    (count,) = _unpack(_U16, body, pos)
    types, pos = _array("I", count, 4, body, pos + 2)
    _end(body, pos, "Parse")
    return Parse(name, query, types)


def decode_bind(body: bytes) -> Bind:
    portal, pos = _cstring(body, 0)
    statement, pos = _cstring(body, pos)
    (nfmt,) = _unpack(_U16, body, pos)
    formats, pos = _array("h", nfmt, 2, body, pos + 2)
    (nparams,) = _unpack(_U16, body, pos)
    params, pos = _values(body, pos + 2, nparams)
    (nres,) = _unpack(_U16, body, pos)
    result_formats, pos = _array("h", nres, 2, body, pos + 2)
    _end(body, pos, "Bind")
    if nfmt > 1 and nfmt != nparams:
        # Otherwise nobody can tell which parameter is text and which binary.
        raise RemoteProtocolError(
            f"bind message has {nfmt} parameter formats but {nparams} parameters"
        )
    return Bind(portal, statement, formats, params, result_formats)


def _kind_and_name(body: bytes, what: str) -> tuple[Literal["S", "P"], str]:
    if not body or body[0] not in b"SP":
        raise RemoteProtocolError(f"invalid {what} message subtype")
    name, pos = _cstring(body, 1)
    _end(body, pos, what)
    return ("S" if body[0] == 0x53 else "P"), name


def decode_describe(body: bytes) -> Describe:
    return Describe(*_kind_and_name(body, "Describe"))


def decode_close(body: bytes) -> Close:
    return Close(*_kind_and_name(body, "Close"))


def decode_execute(body: bytes) -> Execute:
    portal, pos = _cstring(body, 0)
    (max_rows,) = _unpack(_I32, body, pos)
    _end(body, pos + 4, "Execute")
    return Execute(portal, max_rows)


def decode_password(body: bytes) -> bytes:
    """PasswordMessage for cleartext/md5: one NUL-terminated string, returned raw."""
    end = body.find(b"\0")
    if end != len(body) - 1:
        raise RemoteProtocolError("invalid password packet size")
    return body[:end]


def decode_sasl_initial_response(body: bytes) -> tuple[str, bytes | None]:
    """SASLInitialResponse: mechanism name and client-first data (None if absent)."""
    mechanism, pos = _cstring(body, 0)
    (size,) = _unpack(_I32, body, pos)
    pos += 4
    if size == -1:
        _end(body, pos, "SASLInitialResponse")
        return mechanism, None
    if size < 0:
        raise RemoteProtocolError("invalid SASLInitialResponse length")
    _end(body, pos + size, "SASLInitialResponse")
    return mechanism, body[pos:]


# --------------------------------------------------------------------------
# Decoders (backend messages)


def decode_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse keyed by their one-letter code.

    Values are decoded leniently (invalid UTF-8 replaced): they are only shown
    to people, and a server may emit startup errors in its own encoding.
    """
    fields: dict[str, str] = {}
    pos = 0
    n = len(body)
    while True:
        if pos >= n:
            raise RemoteProtocolError("error message fields lack a terminator")
        code = body[pos]
        if code == 0:
            _end(body, pos + 1, "ErrorResponse")
            return fields
        end = body.find(b"\0", pos + 1)
        if end < 0:
            raise RemoteProtocolError("invalid string in message: missing terminator")
        fields[chr(code)] = body[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1


def decode_ready_for_query(body: bytes) -> str:
    if len(body) != 1 or body not in (b"I", b"T", b"E"):
        raise RemoteProtocolError("invalid ReadyForQuery status")
    return chr(body[0])


def decode_backend_key_data(body: bytes) -> tuple[int, int]:
    if len(body) != 8:
        raise RemoteProtocolError("invalid BackendKeyData length")
    pid, secret = _UU.unpack(body)
    return pid, secret


def decode_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = _cstring(body, 0)
    value, pos = _cstring(body, pos)
    _end(body, pos, "ParameterStatus")
    return name, value


def decode_command_complete(body: bytes) -> str:
    tag, pos = _cstring(body, 0)
    _end(body, pos, "CommandComplete")
    return tag


def decode_auth(body: bytes) -> tuple[int, bytes]:
    (code,) = _unpack(_I32, body, 0)
    return code, body[4:]


def decode_sasl_mechanisms(payload: bytes) -> tuple[str, ...]:
    """Mechanism list of an AuthenticationSASL payload (after the int32 code)."""
    names: list[str] = []
    pos = 0
    while True:
        if pos >= len(payload):
            raise RemoteProtocolError("SASL mechanism list lacks a terminator")
        if payload[pos] == 0:
            _end(payload, pos + 1, "AuthenticationSASL")
            return tuple(names)
        name, pos = _cstring(payload, pos)
        names.append(name)


def decode_row_description(body: bytes) -> tuple[Field, ...]:
    (count,) = _unpack(_U16, body, 0)
    pos = 2
    fields: list[Field] = []
    for _ in range(count):
        name, pos = _cstring(body, pos)
        fields.append(Field(name, *_unpack(_FIELD, body, pos)))
        pos += _FIELD.size
    _end(body, pos, "RowDescription")
    return tuple(fields)


def decode_data_row(body: bytes) -> tuple[bytes | None, ...]:
    (count,) = _unpack(_U16, body, 0)
    values, pos = _values(body, 2, count)
    _end(body, pos, "DataRow")
    return values


# --------------------------------------------------------------------------
# Encoding helpers


def encode_message(type: bytes, body: bytes) -> bytes:
    if len(type) != 1:
        raise LocalProtocolError("message type must be exactly one byte")
    if len(body) > 0x7FFFFFFF - 4:
        raise LocalProtocolError("message too large")
    return type + _I32.pack(len(body) + 4) + body


def _cstr(value: str) -> bytes:
    data = value.encode("utf-8")
    # An embedded NUL would end the string early and desynchronise the peer.
    if b"\0" in data:
        raise LocalProtocolError("string contains a NUL byte")
    return data + b"\0"


def _pack(st: struct.Struct, *values: int) -> bytes:
    try:
        return st.pack(*values)
    except struct.error as exc:
        raise LocalProtocolError(f"value out of range: {exc}") from None


def _pack_array(fmt: str, values: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"!H{len(values)}{fmt}", len(values), *values)
    except struct.error as exc:
        raise LocalProtocolError(f"value out of range: {exc}") from None


def _values_block(values: Sequence[bytes | None]) -> bytes:
    parts = [_pack(_U16, len(values))]
    for value in values:
        if value is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(_pack(_I32, len(value)))
            parts.append(bytes(value))
    return b"".join(parts)


def _fields(
    type: bytes, severity: str, sqlstate: str, message: str, detail: str | None, hint: str | None
) -> bytes:
    if len(sqlstate) != 5 or not sqlstate.isascii() or not sqlstate.isalnum():
        raise LocalProtocolError(f"invalid SQLSTATE {sqlstate!r}")
    parts = [
        b"S",
        _cstr(severity),
        b"V",
        _cstr(severity),
        b"C",
        _cstr(sqlstate),
        b"M",
        _cstr(message),
    ]
    if detail is not None:
        parts += [b"D", _cstr(detail)]
    if hint is not None:
        parts += [b"H", _cstr(hint)]
    parts.append(b"\0")
    return encode_message(type, b"".join(parts))


def _auth(code: int, payload: bytes = b"") -> bytes:
    return encode_message(b"R", _I32.pack(code) + payload)


# --------------------------------------------------------------------------
# Encoders (backend messages, i.e. what the gateway says to clients)


def encode_error(
    severity: str,
    sqlstate: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    return _fields(b"E", severity, sqlstate, message, detail, hint)


def encode_notice(
    severity: str = "NOTICE",
    sqlstate: str = "00000",
    message: str = "",
    *,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    return _fields(b"N", severity, sqlstate, message, detail, hint)


def encode_ready_for_query(status: str) -> bytes:
    if status not in ("I", "T", "E"):
        raise LocalProtocolError(f"invalid transaction status {status!r}")
    return encode_message(b"Z", status.encode("ascii"))


def encode_auth_ok() -> bytes:
    return _auth(AUTH_OK)


def encode_auth_cleartext_request() -> bytes:
    return _auth(AUTH_CLEARTEXT_PASSWORD)


def encode_auth_md5_request(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise LocalProtocolError("md5 salt must be 4 bytes")
    return _auth(AUTH_MD5_PASSWORD, salt)


def encode_auth_sasl(mechanisms: Sequence[str]) -> bytes:
    if not mechanisms or any(not m for m in mechanisms):
        raise LocalProtocolError("SASL mechanism list must hold non-empty names")
    return _auth(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def encode_auth_sasl_continue(data: bytes) -> bytes:
    return _auth(AUTH_SASL_CONTINUE, data)


def encode_auth_sasl_final(data: bytes) -> bytes:
    return _auth(AUTH_SASL_FINAL, data)


def encode_parameter_status(name: str, value: str) -> bytes:
    return encode_message(b"S", _cstr(name) + _cstr(value))


def encode_backend_key_data(pid: int, secret: int) -> bytes:
    return encode_message(b"K", _pack(_UU, pid, secret))


def encode_negotiate_protocol_version(newest_minor: int, unsupported: Sequence[str] = ()) -> bytes:
    body = _pack(_II, newest_minor, len(unsupported)) + b"".join(_cstr(o) for o in unsupported)
    return encode_message(b"v", body)


def encode_command_complete(tag: str) -> bytes:
    return encode_message(b"C", _cstr(tag))


def encode_empty_query_response() -> bytes:
    return encode_message(b"I", b"")


def encode_row_description(fields: Sequence[Field]) -> bytes:
    parts = [_pack(_U16, len(fields))]
    for f in fields:
        parts.append(_cstr(f.name))
        parts.append(
            _pack(
                _FIELD,
                f.table_oid,
                f.column_number,
                f.type_oid,
                f.type_size,
                f.type_modifier,
                f.format,
            )
        )
    return encode_message(b"T", b"".join(parts))


def encode_data_row(values: Sequence[bytes | None]) -> bytes:
    return encode_message(b"D", _values_block(values))


# --------------------------------------------------------------------------
# Encoders (frontend messages, i.e. what the gateway says to servers)


def encode_startup(params: Mapping[str, str], version: int = PROTOCOL_VERSION) -> bytes:
    parts: list[bytes] = []
    for name, value in params.items():
        if not name:
            raise LocalProtocolError("startup parameter names must not be empty")
        parts.append(_cstr(name))
        parts.append(_cstr(value))
    body = _pack(_I32, version) + b"".join(parts) + b"\0"
    if len(body) + 4 > MAX_STARTUP_PACKET_LENGTH:
        raise LocalProtocolError("startup packet too large")
    return _I32.pack(len(body) + 4) + body


def encode_ssl_request() -> bytes:
    return _II.pack(8, SSL_REQUEST_CODE)


def encode_gssenc_request() -> bytes:
    return _II.pack(8, GSSENC_REQUEST_CODE)


def encode_cancel_request(pid: int, secret: int) -> bytes:
    return _II.pack(16, CANCEL_REQUEST_CODE) + _pack(_UU, pid, secret)


def encode_query(sql: str) -> bytes:
    return encode_message(b"Q", _cstr(sql))


def encode_parse(name: str, query: str, param_types: Sequence[int] = ()) -> bytes:
    return encode_message(b"P", _cstr(name) + _cstr(query) + _pack_array("I", param_types))


def encode_bind(
    portal: str,
    statement: str,
    param_formats: Sequence[int] = (),
    params: Sequence[bytes | None] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    body = (
        _cstr(portal)
        + _cstr(statement)
        + _pack_array("h", param_formats)
        + _values_block(params)
        + _pack_array("h", result_formats)
    )
    return encode_message(b"B", body)


def _check_kind(kind: str) -> bytes:
    if kind not in ("S", "P"):
        raise LocalProtocolError(f"kind must be 'S' or 'P', not {kind!r}")
    return kind.encode("ascii")


def encode_describe(kind: str, name: str = "") -> bytes:
    return encode_message(b"D", _check_kind(kind) + _cstr(name))


def encode_close(kind: str, name: str = "") -> bytes:
    return encode_message(b"C", _check_kind(kind) + _cstr(name))


def encode_execute(portal: str = "", max_rows: int = 0) -> bytes:
    return encode_message(b"E", _cstr(portal) + _pack(_I32, max_rows))


_SYNC: Final = encode_message(b"S", b"")
_FLUSH: Final = encode_message(b"H", b"")
_TERMINATE: Final = encode_message(b"X", b"")


def encode_sync() -> bytes:
    return _SYNC


def encode_flush() -> bytes:
    return _FLUSH


def encode_terminate() -> bytes:
    return _TERMINATE


def encode_password(data: bytes) -> bytes:
    """PasswordMessage/SASLResponse ('p') carrying ``data`` verbatim.

    For cleartext and md5 the caller includes the trailing NUL; SASL
    responses carry no terminator, so this function cannot add one.
    """
    return encode_message(b"p", bytes(data))


def encode_sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    size = b"\xff\xff\xff\xff" if data is None else _pack(_I32, len(data))
    return encode_message(b"p", _cstr(mechanism) + size + (data or b""))
