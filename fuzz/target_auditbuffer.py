"""Fuzz target: the compiled ``AuditBuffer`` against keyturn.auditspool ``LineBuffer``.

From the input: a limit (small, so that it is crossed often) and what ``on_full`` does
when it is (nothing, take everything, append a line of its own, raise, or no callback at
all), then a sequence of appends (lines of any bytes and sizes, a bytes subclass, now and
then something that is not bytes, or a burst of several MiB) and takes. After every step
both buffers must have given the same result (the same bytes from ``take``, the same
exception), and hold the same ``size`` and ``lines``; ``on_full`` must have been called
the same number of times with the same bytes pending.

This target must not be run without the sanitizers (see fuzz/harness.py).
"""

from __future__ import annotations

from typing import Any

from fuzz import harness


class Line(bytes):
    """A bytes subclass: both twins take it as bytes."""


class FullError(Exception):
    """Raised by on_full on purpose."""


def make_target(compiled: Any) -> Any:
    import atheris

    from keyturn.auditspool import LineBuffer

    def make(cls: Any, limit: int, mode: int, seen: list[Any]) -> Any:
        box: list[Any] = []

        def on_full() -> None:
            buf = box[0]
            seen.append(("full", buf.size, buf.lines))
            if mode == 1:
                seen.append(("took", buf.take()))
            elif mode == 2:
                buf.append(b"from on_full\n")  # must not recurse into on_full
                seen.append(("after own line", buf.size, buf.lines))
            elif mode == 3:
                raise FullError("spool stalled")
            elif mode == 4:
                seen.append(("took", buf.take()))
                buf.append(b"x" * 7)

        buf = cls(limit, None if mode == 5 else on_full)
        box.append(buf)
        return buf

    def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
        try:
            return "ok", fn(*args)
        except Exception as exc:  # noqa: BLE001 - compared between the twins
            return type(exc).__name__, str(exc)

    def test_one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        limit = fdp.PickValueInList([-1, 0, 1, 16, 100, 4096, 1 << 20, 5 << 20]) + \
            fdp.ConsumeIntInRange(0, 64)
        mode = fdp.ConsumeIntInRange(0, 5)
        c_seen: list[Any] = []
        py_seen: list[Any] = []
        c = make(compiled.AuditBuffer, limit, mode, c_seen)
        py = make(LineBuffer, limit, mode, py_seen)
        bursts = 0
        for step in range(fdp.ConsumeIntInRange(0, 64)):
            how = fdp.ConsumeIntInRange(0, 15)
            if how <= 9:
                line: Any = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
                got, want = outcome(c.append, line), outcome(py.append, line)
            elif how == 10:
                line = Line(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20)))
                got, want = outcome(c.append, line), outcome(py.append, line)
            elif how == 11:
                line = fdp.PickValueInList([bytearray(b"x\n"), "text\n", None, 7,
                                            memoryview(b"m\n")])
                got, want = outcome(c.append, line), outcome(py.append, line)
            elif how == 12 and bursts < 2:  # past the C's 4 MiB "give the memory back" mark
                bursts += 1
                line = b"y" * ((1 << 20) * fdp.ConsumeIntInRange(1, 5))
                got, want = outcome(c.append, line), outcome(py.append, line)
            else:
                got, want = outcome(c.take), outcome(py.take)
            if got != want or c_seen != py_seen or (c.size, c.lines) != (py.size, py.lines):
                raise AssertionError(
                    f"step {step} ({how}), limit {limit}, on_full mode {mode}:\n"
                    f"  C      {got!r:.300} size {c.size} lines {c.lines} {c_seen!r:.300}\n"
                    f"  Python {want!r:.300} size {py.size} lines {py.lines} {py_seen!r:.300}")
        if c.take() != py.take():
            raise AssertionError("the last take() differs")

    return test_one_input


if __name__ == "__main__":
    harness.main(make_target)
