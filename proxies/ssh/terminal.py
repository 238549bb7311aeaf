"""The command lines typed in a terminal session, for search and for the player's markers.

``TypedLines`` watches one PTY channel: the output goes through a terminal emulator
(pyte), the input through a small line editor. When Enter is pressed it keeps the line:
what was typed when that is plain text (a paste of several lines gives each), else what
the screen shows on the cursor's line (tab completion, history recall and other editing
happen in the shell, so only the screen knows the result). The lines are a search aid and
navigation, not a control: a shell runs what it runs, whatever was shown.

Sans-I/O: it must not import asyncio, sockets or asyncssh.
"""

from __future__ import annotations

import pyte

MAX_LINES = 5000
MAX_LINE = 2000


class TypedLines:
    def __init__(self, width: int, height: int):
        self.screen = pyte.Screen(max(width, 2), max(height, 2))
        self.stream = pyte.ByteStream(self.screen)
        self.lines: list[str] = []
        self._typed = bytearray()
        self._plain = True

    def output(self, data: bytes) -> None:
        try:
            self.stream.feed(data)
        except Exception:  # noqa: BLE001 - a terminal emulator must never stop the relay
            self.screen.reset()

    def resize(self, width: int, height: int) -> None:
        self.screen.resize(max(height, 2), max(width, 2))

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

    def _line(self) -> str:
        if self._plain:
            return self._typed.decode("utf-8", "replace").strip()
        row = self.screen.display[self.screen.cursor.y]
        return row.rstrip()[:MAX_LINE]


__all__ = ["TypedLines"]
