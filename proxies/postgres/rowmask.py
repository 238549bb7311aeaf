"""Masking DataRow messages a run at a time.

A masked result is rewritten per network chunk: the gateway hands the masker every
DataRow between two other messages (``rows(chunk, start, end)``) and gets the new bytes
back. Each output field has an *op*, built once per result from its masking style:

- ``None``: the field passes unchanged (copied in runs, never decoded);
- ``(OP_CONST, b"********")``: the ``full`` style;
- ``(OP_NULL,)``: the ``null`` style;
- ``(OP_PARTIAL, keep, fn)`` and ``(OP_EMAIL, fn)``: ``partial:N`` and ``email``; the
  compiled masker applies them itself to ASCII values and calls ``fn`` (the Python
  style, ``keyturn.masking.styles``) for any other value;
- ``(OP_CALL, fn)``: any other style (``hash``): ``fn(bytes) -> bytes | None`` (None = NULL);
- ``(OP_DETECT, fn)``: a free-text field read by the content detectors:
  ``fn(bytes) -> bytes | None`` (None = unchanged); empty values are skipped.

NULL values stay NULL and are not counted. ``counts`` gives the values masked per field.

``PyRowMasker`` below is the reference; ``_speedups.RowMasker`` (C) does the same and is
used when it is built, unless ``KEYTURN_NO_SPEEDUPS=1``. Tests run both on the same
inputs.

It must not do I/O or decide which columns are masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxies.postgres.speedups import compiled

OP_CONST, OP_NULL, OP_PARTIAL, OP_EMAIL, OP_CALL, OP_DETECT = 1, 2, 3, 4, 5, 6
_NULL = b"\xff\xff\xff\xff"


class PyRowMasker:
    """Pure-Python twin of ``_speedups.RowMasker`` (the behaviour both must have)."""

    __slots__ = ("_ops", "_counts")

    def __init__(self, ops: Sequence[Any]) -> None:
        self._ops = list(ops)
        self._counts = [0] * len(self._ops)

    @property
    def counts(self) -> list[int]:
        return list(self._counts)

    def rows(self, chunk: bytes, start: int, end: int) -> bytes | None:
        """Rewrite the whole messages in ``chunk[start:end]``; None when none changed."""
        if start < 0 or end > len(chunk) or start > end:
            raise ValueError("start/end out of range")
        out: list[bytes] = []
        copied = start
        changed = False
        p = start
        while p < end:
            if end - p < 5:
                raise ValueError(f"malformed DataRow at offset {p}")
            mend = p + 1 + int.from_bytes(chunk[p + 1:p + 5], "big")
            if mend < p + 5 or mend > end:
                raise ValueError(f"malformed DataRow at offset {p}")
            if chunk[p] == 0x44:  # "D"
                new = self._row(chunk, p, mend)
                if new is not None:
                    out.append(chunk[copied:p])
                    out.append(new)
                    copied = mend
                    changed = True
            p = mend
        if not changed:
            return None
        out.append(chunk[copied:end])
        return b"".join(out)

    def _row(self, chunk: bytes, start: int, end: int) -> bytes | None:
        from_bytes = int.from_bytes
        if end - start - 5 < 2:
            raise ValueError(f"malformed DataRow at offset {start}")
        nfields = from_bytes(chunk[start + 5:start + 7], "big")
        ops, counts = self._ops, self._counts
        pos = start + 7
        keep = pos
        parts: list[bytes] = []
        changed = False
        for i in range(min(nfields, len(ops))):
            if end - pos < 4:
                raise ValueError(f"malformed DataRow at offset {start}")
            ln = from_bytes(chunk[pos:pos + 4], "big", signed=True)
            vstart = pos + 4
            vend = vstart + ln if ln > 0 else vstart
            if ln < -1 or vend > end:
                raise ValueError(f"malformed DataRow at offset {start}")
            op = ops[i]
            if op is None or ln == -1 or (op[0] == OP_DETECT and ln == 0):
                pos = vend
                continue
            kind = op[0]
            value = chunk[vstart:vend]
            if kind == OP_CONST:
                new = op[1]
            elif kind == OP_NULL:
                new = None
            elif kind == OP_PARTIAL:
                new = op[2](value)
            else:
                new = op[1](value)
                if kind == OP_DETECT and new is None:
                    pos = vend
                    continue
            if kind != OP_DETECT:
                counts[i] += 1
            parts.append(chunk[keep:pos])
            if new is None:
                parts.append(_NULL)
            else:
                parts.append(len(new).to_bytes(4, "big"))
                parts.append(new)
            changed = True
            keep = pos = vend
        if not changed:
            return None
        parts.append(chunk[keep:end])
        payload = chunk[start + 5:start + 7] + b"".join(parts)
        return b"D" + (len(payload) + 4).to_bytes(4, "big") + payload


CRowMasker = compiled.RowMasker if compiled else None
RowMasker: Any = CRowMasker or PyRowMasker
