"""Fuzz target: the compiled ``fast_shape`` against keyturn.analysis.postgres.fast_shape.

The C takes a str and reads it only when it is ASCII (one byte per character, as the
fast path reads a Query's bytes off the wire); the input's bytes become that str in one
of three ways (Latin-1, each byte one character; ASCII, the top bit dropped; UTF-8 with
errors replaced), so every byte value and non-ASCII text reach it. Both must give the
same shape (or None); with a smaller ``max_len`` the C must give None for longer texts
and the regular expressions' shape otherwise.

This target must not be run without the sanitizers (see fuzz/harness.py).
"""

from __future__ import annotations

from typing import Any

from fuzz import harness


def make_target(compiled: Any) -> Any:
    from keyturn.analysis.postgres import MAX_SHAPED_TEXT, fast_shape

    c_shape = compiled.fast_shape

    def test_one_input(data: bytes) -> None:
        if not data:
            return
        how, rest = data[0], data[1:]
        if how & 3 == 0:
            sql = rest.decode("latin-1")
        elif how & 3 == 1:
            sql = bytes(b & 0x7F for b in rest).decode("ascii")
        else:
            sql = rest.decode("utf-8", "replace")
        expected = fast_shape(sql)
        got = c_shape(sql, MAX_SHAPED_TEXT)
        if got != expected or type(got) is not type(expected):
            raise AssertionError(f"fast_shape({sql!r}): C {got!r}, Python {expected!r}")
        if how & 4:  # a smaller limit, around the text's own length
            limit = len(sql) - 1 + (how >> 3) % 3
            want = None if len(sql) > limit else expected
            got = c_shape(sql, limit)
            if got != want:
                raise AssertionError(f"fast_shape({sql!r}, {limit}): C {got!r}, "
                                     f"expected {want!r}")

    return test_one_input


if __name__ == "__main__":
    harness.main(make_target)
