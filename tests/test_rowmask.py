"""The DataRow masker: the compiled one (_speedups.RowMasker) must do exactly what the
pure-Python reference (rowmask.PyRowMasker) does, and both must mask each value as the
masking styles say (keyturn.masking.styles). No servers needed; the end-to-end masking
tests are in test_pg_masking.py."""

from __future__ import annotations

import functools
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyturn.masking import styles
from proxies.postgres import codec, rowmask

PROPS = settings(max_examples=300, deadline=None)
KEY = b"row-mask-test-key"
C = rowmask.CRowMasker
needs_c = pytest.mark.skipif(C is None, reason="compiled speedups not built or disabled")


def op_for(style: str):
    parsed = styles.MaskStyle.parse(style)
    fn = functools.partial(styles.mask_bytes, styles.masker(parsed, KEY))
    return {
        "full": (rowmask.OP_CONST, styles.FULL_MASK_BYTES),
        "null": (rowmask.OP_NULL,),
        "partial": (rowmask.OP_PARTIAL, parsed.keep, fn),
        "email": (rowmask.OP_EMAIL, fn),
        "hash": (rowmask.OP_CALL, fn),
    }[parsed.kind]


def reference(style: str, value: bytes | None) -> bytes | None:
    """What one value must become: the style itself, through mask_bytes."""
    if value is None:
        return None
    return styles.mask_bytes(styles.masker(styles.MaskStyle.parse(style), KEY), value)


def detect(value: bytes) -> bytes | None:
    """A stand-in detector: redacts the digits of values that hold '42'."""
    if b"42" not in value:
        return None
    return bytes(b"#"[0] if 0x30 <= c <= 0x39 else c for c in value)


def data_row(values) -> bytes:
    return codec.encode_message(b"D", struct.pack("!h", len(values)) + b"".join(
        b"\xff\xff\xff\xff" if v is None else struct.pack("!i", len(v)) + v for v in values))


def fields(msg: bytes) -> list[bytes | None]:
    return list(codec.decode_data_row(msg[5:]))


STYLES = ["full", "null", "partial:1", "partial:4", "partial:9", "email", "hash"]
ascii_text = st.text(st.characters(max_codepoint=127), max_size=24)
any_text = st.text(max_size=24)
emailish = st.builds(lambda a, b, c, sp: f"{a}{sp}@{b}.{c}", st.text("ab.@ \t", max_size=4),
                     st.text("xy.@\x1c", max_size=4), st.text("z.", max_size=3),
                     st.sampled_from(["", " ", "\u00a0", "\x1f", "@"]))
value = st.one_of(
    st.none(),
    ascii_text.map(str.encode),
    any_text.map(lambda s: s.encode("utf-8")),
    emailish.map(lambda s: s.encode("utf-8")),
    st.binary(max_size=12),  # not always valid UTF-8
)


@needs_c
@PROPS
@given(style=st.sampled_from(STYLES), v=value)
def test_each_style_masks_a_value_as_the_style_says(style, v):
    for impl in (C, rowmask.PyRowMasker):
        m = impl([None, op_for(style)])
        row = data_row([b"id-1", v])
        new = m.rows(row, 0, len(row))
        expected = reference(style, v)
        if v is None:
            assert new is None  # NULL stays NULL: nothing changed
            assert m.counts == [0, 0]
        else:
            assert fields(new) == [b"id-1", expected], impl
            assert m.counts == [0, 1]


rows_strategy = st.lists(st.lists(value, min_size=0, max_size=6), min_size=1, max_size=6)
ops_strategy = st.lists(st.one_of(st.none(), st.sampled_from(STYLES).map(op_for),
                                  st.just((rowmask.OP_DETECT, detect))), max_size=7)


@needs_c
@PROPS
@given(rows=rows_strategy, ops=ops_strategy, junk=st.binary(max_size=3))
def test_compiled_and_reference_maskers_agree_on_whole_chunks(rows, ops, junk):
    # Other messages (a CommandComplete here) pass untouched between rows; the
    # chunk may hold bytes before and after the range given.
    msgs = [data_row(r) for r in rows]
    msgs.insert(len(msgs) // 2, codec.encode_message(b"C", b"SELECT 1\0"))
    body = b"".join(msgs)
    chunk = junk + body + junk
    c, py = C(ops), rowmask.PyRowMasker(ops)
    out_c = c.rows(chunk, len(junk), len(junk) + len(body))
    out_py = py.rows(chunk, len(junk), len(junk) + len(body))
    assert out_c == out_py
    assert c.counts == py.counts
    if out_c is not None:
        # Every message is still well framed and every unmasked field is byte-for-byte.
        reader = codec.BackendReader()
        reader.receive_data(out_c)
        framed = reader.next_messages()
        assert b"".join(m.raw for m in framed) == out_c and len(framed) == len(msgs)
        for m, original in zip(framed, msgs, strict=True):
            if m.type != b"D":
                assert m.raw == original
                continue
            before, after = fields(original), fields(m.raw)
            assert len(after) == len(before)
            for i, (b, a) in enumerate(zip(before, after, strict=True)):
                op = ops[i] if i < len(ops) else None
                if op is None or b is None:
                    assert a == b


@pytest.mark.parametrize("impl", [pytest.param(C, marks=needs_c), rowmask.PyRowMasker],
                         ids=["compiled", "python"])
@pytest.mark.parametrize("bad", [
    b"D\x00\x00\x00\x06\x00",                          # field count cut short
    b"D\x00\x00\x00\x0a\x00\x01\x00\x00\x00\x09ab",  # value longer than the message
    b"D\x00\x00\x00\x0a\x00\x01\xff\xff\xff\xfeab",  # length below -1
    b"D\x00\x00\x00\x0a\x00\x02\x00\x00\x00\x00",    # second field missing
    b"D\x00\x00\x00\x02",                              # message length below 4
    b"D\x00\x00\x01\x00\x00\x01",                      # runs past the range
    b"D\x00\x00",                                      # header cut short
])
def test_malformed_rows_raise_instead_of_passing_unmasked(impl, bad):
    m = impl([op_for("full"), op_for("full")])
    with pytest.raises(ValueError, match="malformed DataRow"):
        m.rows(bad, 0, len(bad))


@needs_c
def test_ops_are_checked_when_the_masker_is_built():
    for bad in [(99,), (rowmask.OP_CONST, "text"), (rowmask.OP_PARTIAL, 0, len),
                (rowmask.OP_CALL, "not callable"), "x"]:
        with pytest.raises((ValueError, TypeError)):
            C([bad])
    with pytest.raises(ValueError, match="out of range"):
        C([None]).rows(b"", 0, 1)


@needs_c
def test_an_exception_in_a_style_function_propagates():
    def boom(value: bytes) -> bytes:
        raise RuntimeError("masking failed")

    row = data_row([b"x"])
    with pytest.raises(RuntimeError, match="masking failed"):
        C([(rowmask.OP_CALL, boom)]).rows(row, 0, len(row))
    with pytest.raises(TypeError, match="not bytes or None"):
        C([(rowmask.OP_CALL, lambda v: "str")]).rows(row, 0, len(row))


def test_the_gateway_uses_the_compiled_masker_when_it_is_built():
    # The build is part of `make test` (pip install -e . compiles it); if it failed, the
    # gateway would still mask correctly but much slower, so say so loudly here.
    if os.environ.get("KEYTURN_NO_SPEEDUPS"):
        assert rowmask.RowMasker is rowmask.PyRowMasker
    else:
        assert C is not None, "proxies/postgres/_speedups.c was not built"
        assert rowmask.RowMasker is C


@needs_c
def test_style_functions_may_return_bytearray_in_both_maskers():
    row = data_row([b"abc", None])
    ops = [(rowmask.OP_CALL, lambda v: bytearray(v.upper())), (rowmask.OP_CALL, lambda v: b"z")]
    assert C(ops).rows(row, 0, len(row)) == rowmask.PyRowMasker(ops).rows(row, 0, len(row))
    assert fields(C(ops).rows(row, 0, len(row))) == [b"ABC", None]
