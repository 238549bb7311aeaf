"""The command lines typed in a terminal session, for search and for the player's markers.

``TypedLines`` watches one PTY channel: the output goes through a terminal emulator
(pyte), the input through a small line editor. When Enter is pressed it keeps the line:
what was typed when that is plain text (a paste of several lines gives each), else what
the screen shows on the cursor's line (tab completion, history recall and other editing
happen in the shell, so only the screen knows the result). The lines are a search aid and
navigation, not a control: a shell runs what it runs, whatever was shown.

``snapshot`` gives the screen as ANSI text that redraws it (characters, colours,
attributes, the cursor): the keyframes a player starts from in a long recording.

The emulator costs a few microseconds per byte, so a channel pouring out output (``cat``
of a big log) would hold the gateway's event loop. Each channel has a budget
(``BUDGET`` bytes a second, ``BURST`` at once); output beyond it is not emulated as it
comes: only its last screenful or so is kept and fed when the screen is next needed (a
keyframe, an Enter), starting at a line break. Typing and ordinary output stay exact; after
a flood the screen is rebuilt from its tail (text exact, colours set before the tail may
differ).

Sans-I/O: it must not import asyncio, sockets or asyncssh.
"""

from __future__ import annotations

import time
from typing import Any

import pyte
from pyte import graphics

MAX_LINES = 5000
MAX_LINE = 2000
BUDGET = 32768  # bytes a second each channel's emulator is fed as output comes
BURST = 65536
#: The largest terminal emulated: a client may declare any size (SSH carries uint32), and
#: the emulator's work and memory grow with it. A bigger terminal is emulated at this size
#: (its typed lines and keyframes show the top-left part).
MAX_COLUMNS = 500
MAX_ROWS = 200


def clamp_size(width: int, height: int) -> tuple[int, int]:
    """A terminal size as emulated and recorded (at most MAX_COLUMNS x MAX_ROWS)."""
    return min(max(int(width), 2), MAX_COLUMNS), min(max(int(height), 2), MAX_ROWS)


class _Screen(pyte.Screen):  # type: ignore[misc]
    """pyte's screen with the alternate screen of full-screen programs (modes 47, 1047,
    1049: less, vim, top): leaving it brings back the main screen as it was."""

    _ALTERNATE = {47, 1047, 1049}

    def __init__(self, columns: int, lines: int):
        super().__init__(columns, lines)
        self._saved: tuple[Any, Any] | None = None

    def set_mode(self, *modes: int, **kwargs: Any) -> None:
        if kwargs.get("private") and self._ALTERNATE.intersection(modes) and \
                self._saved is None:
            self._saved = ({y: dict(row) for y, row in self.buffer.items()},
                           (self.cursor.x, self.cursor.y))
            self.erase_in_display(2)
        super().set_mode(*modes, **kwargs)

    def reset_mode(self, *modes: int, **kwargs: Any) -> None:
        super().reset_mode(*modes, **kwargs)
        if kwargs.get("private") and self._ALTERNATE.intersection(modes) and \
                self._saved is not None:
            rows, (x, y) = self._saved
            self._saved = None
            self.erase_in_display(2)
            for row_y, row in rows.items():
                if row_y < self.lines:
                    self.buffer[row_y].update(
                        {cx: ch for cx, ch in row.items() if cx < self.columns})
            self.cursor_position(y + 1, x + 1)
            self.dirty.update(range(self.lines))

_FG = {name: code for code, name in {**graphics.FG_ANSI, **graphics.FG_AIXTERM}.items()}
_BG = {name: code for code, name in {**graphics.BG_ANSI, **graphics.BG_AIXTERM}.items()}
_FLAGS = (("bold", 1), ("italics", 3), ("underscore", 4), ("blink", 5), ("reverse", 7),
          ("strikethrough", 9))


def _colour(value: str, names: dict[str, int], base: int) -> list[str]:
    if value == "default":
        return []
    if value in names:
        return [str(names[value])]
    try:
        r, g, b = (int(value[i:i + 2], 16) for i in (0, 2, 4))
    except ValueError:
        return []
    return [str(base), "2", str(r), str(g), str(b)]


def _sgr(ch: pyte.screens.Char) -> str:
    codes = ["0"] + [str(n) for attr, n in _FLAGS if getattr(ch, attr)]
    codes += _colour(ch.fg, _FG, 38) + _colour(ch.bg, _BG, 48)
    return "\x1b[" + ";".join(codes) + "m"


class TypedLines:
    def __init__(self, width: int, height: int):
        self.screen = _Screen(*clamp_size(width, height))
        self.stream = pyte.ByteStream(self.screen)
        self.lines: list[str] = []
        self._typed = bytearray()
        self._plain = True
        self._tokens = float(BURST)
        self._refilled = time.monotonic()
        self._tail = bytearray()  # output not emulated yet (over budget)
        self._lost = False  # the tail lost its beginning
        self.skipped = 0  # bytes never emulated (only their tail was)

    def output(self, data: bytes) -> None:
        now = time.monotonic()
        self._tokens = min(BURST, self._tokens + (now - self._refilled) * BUDGET)
        self._refilled = now
        if not self._tail and len(data) <= self._tokens:
            self._tokens -= len(data)
            self._feed(data)
            return
        self._tail += data
        keep = self._keep()
        if len(self._tail) > 2 * keep:
            self.skipped += len(self._tail) - keep
            self._lost = True
            del self._tail[:len(self._tail) - keep]
        if len(self._tail) <= self._tokens:
            self.catch_up()

    def _keep(self) -> int:
        """Bytes of output that surely redraw a screen of plain text (4 per cell)."""
        return min(4 * self.screen.columns * self.screen.lines, 65536)

    def catch_up(self) -> None:
        """Feed the output kept over budget (from a line break when some was dropped)."""
        if not self._tail:
            return
        data = bytes(self._tail)
        self._tail.clear()
        if len(data) > self._keep():
            self.skipped += len(data) - self._keep()
            self._lost = True
            data = data[-self._keep():]
        if self._lost:
            # Start at a line break, else at an escape sequence: never inside one (its
            # tail would show as text the terminal never printed).
            cut = data.find(b"\n")
            if cut >= 0:
                data = b"\r\n" + data[cut + 1:]
            else:
                esc = data.find(b"\x1b")
                data = data[esc:] if esc >= 0 else data
            self._lost = False
        self._tokens -= len(data)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self.stream.feed(data)
        except Exception:  # noqa: BLE001 - a terminal emulator must never stop the relay
            self.screen.reset()

    def resize(self, width: int, height: int) -> None:
        self.catch_up()
        cols, rows = clamp_size(width, height)
        self.screen.resize(rows, cols)

    def input(self, data: bytes) -> list[str]:
        """Feed what the client typed; returns the lines its Enter keys completed."""
        done: list[str] = []
        for b in data:
            if b in (0x0D, 0x0A):
                line = self._line()
                if line:
                    done.append(line)
                self._typed.clear()
                self._plain = True
            elif b in (0x7F, 0x08):  # backspace
                if self._typed:
                    self._typed.pop()
            elif b == 0x15:  # Ctrl-U: kill the line
                self._typed.clear()
                self._plain = True
            elif b == 0x03:  # Ctrl-C: the shell drops the line
                self._typed.clear()
                self._plain = True
            elif b < 0x20 or b == 0x1B:
                self._plain = False  # Tab, arrows, Ctrl-R...: only the screen knows
            elif len(self._typed) < MAX_LINE:
                self._typed.append(b)
        if len(self.lines) < MAX_LINES:
            self.lines.extend(done[:MAX_LINES - len(self.lines)])
        return done

    def snapshot(self) -> str:
        """The screen as ANSI text that redraws it on a terminal of the same size."""
        self.catch_up()
        screen = self.screen
        out = ["\x1b[0m\x1b[H\x1b[2J"]
        for y in range(screen.lines):
            row = screen.buffer[y]
            blank = screen.default_char
            last = max((x for x, ch in row.items() if ch != blank), default=-1)
            sgr = ""
            if y:
                out.append(f"\x1b[{y + 1};1H")
            for x in range(min(last + 1, screen.columns)):
                ch = row[x]
                want = _sgr(ch)
                if want != sgr:
                    out.append(want)
                    sgr = want
                out.append(ch.data)
        out.append(f"\x1b[0m\x1b[{screen.cursor.y + 1};{screen.cursor.x + 1}H")
        if screen.cursor.hidden:
            out.append("\x1b[?25l")
        return "".join(out)

    def _line(self) -> str:
        self.catch_up()
        if self._plain:
            return self._typed.decode("utf-8", "replace").strip()
        row = self.screen.display[self.screen.cursor.y]
        return row.rstrip()[:MAX_LINE]


__all__ = ["MAX_COLUMNS", "MAX_ROWS", "TypedLines", "clamp_size"]
