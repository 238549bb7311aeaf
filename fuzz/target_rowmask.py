"""Fuzz target: the compiled ``RowMasker`` against proxies/postgres/rowmask.py ``PyRowMasker``.

From the input: a list of ops (every op code of rowmask.py, with the project's real
masking styles and detectors as the gateway builds them in masker.py, and small
functions that return bytes, a bytearray, None or raise), then one to three calls of
``rows(chunk, start, end)`` on the same masker, each on a run of messages: DataRows with
as many fields as ops or more or fewer, NULL, empty, ASCII, UTF-8, invalid UTF-8 and
e-mail-like values, other message types, and malformed rows (short bodies, lengths
below -1 or past the message, messages cut or overrunning the run), with ``start`` and
``end`` now and then out of range or inside a message. Each call must return the same
bytes (or None) in C and in Python, or raise the same exception with the same message,
and the per-field counts must stay equal. Ops the C refuses (it checks them, the twin
does not) must raise TypeError or ValueError, never crash.

This target must not be run without the sanitizers (see fuzz/harness.py).
"""

from __future__ import annotations

import functools
import struct
from typing import Any

from fuzz import harness

#: Field values that reach the styles' interesting cases.
VALUES = [b"", b"a", b"abcd", b"hello world", b"4111 1111 1111 1111", b"alice@example.com",
          b"a@b.c", b"@b.c", b"a@@b.c", b"a b@c.d", b"a@b", b"a@.c", b"x@y.",
          "caf\u00e9@b\u00e9.fr".encode(), "\u00fc\u00f1\u00ee\u00e7\u00f8d\u00e9".encode(),
          b"\xff\xfe\xfd", b"\xc3", b"a\x1cb@c.d", b"ab\tc@d.e", b"123-45-6789",
          b"+1 (555) 010-9999", b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln", b"0" * 70,
          b"DE89370400440532013000", b"password=hunter2"]


class FnError(Exception):
    """Raised by the input's masking functions on purpose."""


def make_target(compiled: Any) -> Any:
    import atheris

    from keyturn.masking import styles
    from keyturn.masking.detectors import DetectorSet
    from proxies.postgres.rowmask import (
        OP_CALL,
        OP_CONST,
        OP_DETECT,
        OP_EMAIL,
        OP_NULL,
        OP_PARTIAL,
        PyRowMasker,
    )

    key = b"fuzz-mask-key"
    detectors = DetectorSet.build()

    def style_fn(spec: str) -> Any:  # as proxies/postgres/masker.py builds it
        return functools.partial(styles.mask_bytes,
                                 styles.masker(styles.MaskStyle.parse(spec), key))

    def detect(value: bytes) -> bytes | None:  # as masker.py's _detect_op, less counting
        new, hits = detectors.redact_bytes(value)
        return new if hits else None

    def synthetic(kind: int) -> Any:
        def fn(value: bytes) -> Any:
            if kind == 0:
                return None
            if kind == 1:
                return value[::-1]
            if kind == 2:
                return bytearray(value.upper())
            if kind == 3:
                return b""
            if kind == 4:
                return value  # the same object: unchanged
            if kind == 5 and b"x" in value:
                raise FnError("no x")
            return value + b"!"
        return fn

    def make_op(fdp: Any) -> tuple[Any, bool]:
        """One op and whether it is valid (the C checks ops, the twin does not)."""
        kind = fdp.ConsumeIntInRange(0, 10)
        if kind in (0, 10):
            return None, True
        if kind == 1:
            return (OP_CONST, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12))), True
        if kind == 2:
            return (OP_NULL,), True
        if kind == 3:
            keep = fdp.ConsumeIntInRange(1, styles.MAX_KEEP)
            return (OP_PARTIAL, keep, style_fn(f"partial:{keep}")), True
        if kind == 4:
            return (OP_EMAIL, style_fn("email")), True
        if kind == 5:
            spec = fdp.PickValueInList(["hash", "full", "null", "partial:3", "email"])
            return (OP_CALL, style_fn(spec)), True
        if kind == 6:
            return (OP_DETECT, detect), True
        if kind == 7:
            return (OP_CALL, synthetic(fdp.ConsumeIntInRange(0, 6))), True
        if kind == 8:
            return (OP_DETECT, synthetic(fdp.ConsumeIntInRange(0, 6))), True
        # something the C must refuse
        return fdp.PickValueInList([
            (), (0,), (7,), (-1,), (OP_CONST,), (OP_CONST, "str"), (OP_CONST, b"a", b"b"),
            (OP_NULL, 1), (OP_PARTIAL, 0, detect), (OP_PARTIAL, 2, "not callable"),
            (OP_PARTIAL, 2**70, detect), (OP_EMAIL,), (OP_CALL, None), (OP_DETECT, 5),
            ("1", b"x"), [OP_NULL], b"op", 1.5, (2**70,)]), False

    def field(fdp: Any) -> bytes:
        how = fdp.ConsumeIntInRange(0, 9)
        if how == 0:
            return struct.pack("!i", -1)
        if how == 9:  # any length, without its value
            return struct.pack("!i", fdp.ConsumeIntInRange(-2**31, 2**31 - 1))
        if how <= 3:
            value = fdp.PickValueInList(VALUES)
        elif how <= 5:
            value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
        elif how == 6:
            value = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 20)).encode()
        elif how == 7:
            value = b""
        else:
            value = fdp.PickValueInList(VALUES) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))
        return struct.pack("!i", len(value)) + value

    def message(fdp: Any, nops: int) -> bytes:
        how = fdp.ConsumeIntInRange(0, 9)
        if how <= 5:  # a DataRow, its field count right or not
            n = max(0, nops + fdp.ConsumeIntInRange(-2, 2)) if how <= 4 else \
                fdp.ConsumeIntInRange(0, 0xFFFF)
            written = n if n <= 16 and fdp.ConsumeIntInRange(0, 7) else \
                min(n, fdp.ConsumeIntInRange(0, 12))
            body = struct.pack("!H", n) + b"".join(field(fdp) for _ in range(written))
            if fdp.ConsumeIntInRange(0, 7) == 0:
                body += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 6))  # bytes after the fields
            if fdp.ConsumeIntInRange(0, 7) == 0:
                body = body[:fdp.ConsumeIntInRange(0, len(body))]  # cut short
            return b"D" + struct.pack("!I", len(body) + 4) + body
        if how == 6:  # another message of the result
            kind = fdp.PickValueInList([b"T", b"C", b"Z", b"N", b"E", b"d", b"2"])
            body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12))
            return kind + struct.pack("!I", len(body) + 4) + body
        if how == 7:  # a length that lies
            body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12))
            return fdp.PickValueInList([b"D", b"C"]) + struct.pack(
                "!I", fdp.ConsumeIntInRange(0, 2**32 - 1)) + body
        if how == 8:  # a DataRow body shorter than its field count
            return b"D" + struct.pack("!I", 5) + fdp.ConsumeBytes(1)
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))  # anything

    def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
        try:
            return "ok", fn(*args)
        except Exception as exc:  # noqa: BLE001 - compared between the twins
            return type(exc).__name__, str(exc)

    def test_one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        ops: list[Any] = []
        valid = True
        for _ in range(fdp.ConsumeIntInRange(0, 10)):
            op, ok = make_op(fdp)
            ops.append(op)
            valid = valid and ok
        try:
            c = compiled.RowMasker(ops)
        except (TypeError, ValueError, OverflowError):
            if valid:
                raise
            return
        if not valid:
            raise AssertionError(f"the C accepted invalid ops {ops!r}")
        py = PyRowMasker(ops)
        for _ in range(fdp.ConsumeIntInRange(1, 3)):
            head = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 3) * 3)
            run = b"".join(message(fdp, len(ops)) for _ in range(fdp.ConsumeIntInRange(0, 10)))
            tail = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 3) * 3)
            chunk: bytes | bytearray = head + run + tail
            start, end = len(head), len(head) + len(run)
            if fdp.ConsumeIntInRange(0, 5) == 0:  # bounds anywhere, in range or not
                start = fdp.ConsumeIntInRange(-2, len(chunk) + 2)
                end = fdp.ConsumeIntInRange(-2, len(chunk) + 2)
            if fdp.ConsumeBool():
                chunk = bytearray(chunk)
            got = outcome(c.rows, chunk, start, end)
            want = outcome(py.rows, chunk, start, end)
            if got != want or type(got[1]) is not type(want[1]):
                raise AssertionError(f"rows({bytes(chunk)!r}, {start}, {end}) with ops {ops!r}:"
                                     f"\n  C      {got!r}\n  Python {want!r}")
            if c.counts != py.counts:
                raise AssertionError(f"counts after rows({bytes(chunk)!r}, {start}, {end}) "
                                     f"with ops {ops!r}: C {c.counts}, Python {py.counts}")

    return test_one_input


if __name__ == "__main__":
    harness.main(make_target)
