"""Transcript tests for any protocol session: bytes in from the client and from the
target, messages out checked on each side, with no sockets.

A ``Playbook`` owns an event loop and two ``Wire`` transports (the client's and the
target's). A protocol adapter (tests/pg_playbook.py for PostgreSQL) builds the real
gateway and session on it through their own entry points and says how each side's bytes
are framed into messages. The test then alternates:

    pb.client_sends(data)        # the session's data_received, as from the client socket
    pb.target_sends(data)        # the target side's data_received
    pb.client_gets(n)            # run the loop until n new messages reached the client
    pb.target_gets(n)            # ... or the target; returns them for checking
    pb.quiet()                   # nothing more goes anywhere (for a short while)

Every step runs the event loop, so what the session does in tasks and threads (store
calls, holds, catalog reads) happens as it would on the network, and a race is written
down by the order of the steps. Each future protocol gets an adapter like PostgreSQL's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

#: How long a step waits for what it expects before failing.
STEP_TIMEOUT = 5.0


class Wire:
    """One side's transport (the asyncio.Transport methods sessions use): what the
    session writes to it is kept, in order (``written`` until taken; ``data``: all of
    it since ``mark``)."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        # Like a socket's send buffer: past this many unread bytes the protocol is told
        # to pause writing (None: never, what most transcripts want).
        self.high_water: int | None = None
        self.paused = False
        self.written = bytearray()
        self.log = bytearray()
        self.marked = 0
        self.closed = False
        self.protocol: Any = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            self.written += data
            self.log += data
            if self.high_water is not None and not self.paused and \
                    len(self.written) > self.high_water and self.protocol is not None:
                self.paused = True
                self.protocol.pause_writing()

    @property
    def data(self) -> bytes:
        return bytes(self.log[self.marked:])

    def mark(self) -> None:
        self.marked = len(self.log)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol  # a relay may take the session's place (fast path)

    def get_protocol(self) -> Any:
        return self.protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self.closed

    def get_write_buffer_size(self) -> int:
        return len(self.written)  # what the test has not taken yet: "not read"

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data


class PlainWire(Wire):
    """A transport whose protocol cannot be replaced (no relay can take the session's
    place, as with transports that lack set_protocol)."""

    set_protocol = None  # type: ignore[assignment]


class Playbook:
    """A session between two wires on an event loop of its own (see the module
    docstring). ``client_frames`` / ``target_frames``: bytes -> complete messages (each
    keeps what it has not framed yet); what the session wrote to each side."""

    def __init__(self, client_frames: Callable[[bytes], list[Any]],
                 target_frames: Callable[[bytes], list[Any]], *,
                 wire: type[Wire] = Wire) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = wire(("127.0.0.1", 40000))
        self.target = wire(("127.0.0.1", 5432))
        self._frames = {"client": client_frames, "target": target_frames}
        self._got: dict[str, list[Any]] = {"client": [], "target": []}
        self.session: Any = None  # the protocol object on the client wire
        self.upstream: Any = None  # the protocol object on the target wire

    # -- running the loop --------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn`` inside the running loop (protocol callbacks expect one)."""
        async def inside() -> Any:
            return fn(*args)
        return self.run(inside())

    def _collect(self, side: str) -> list[Any]:
        wire = self.client if side == "client" else self.target
        data = wire.take()
        if data:
            self._got[side].extend(self._frames[side](data))
        return self._got[side]

    def _wait(self, side: str, n: int, timeout: float) -> list[Any]:
        async def waiting() -> None:
            deadline = self.loop.time() + timeout
            while len(self._collect(side)) < n:
                if self.loop.time() > deadline:
                    return
                await asyncio.sleep(0.001)
        self.run(waiting())
        got = self._got[side][:n]
        assert len(got) == n, (f"the {side} got {len(self._got[side])} message(s) of the "
                               f"{n} expected within {timeout} s: {self._got[side]!r}")
        del self._got[side][:n]
        return got

    # -- steps ---------------------------------------------------------------------------

    def client_sends(self, data: bytes) -> Playbook:
        """``data`` arrives from the client (at whatever protocol object reads the
        client's socket now: the session, or a relay that took its place)."""
        self.call(self.client.protocol.data_received, data)
        return self

    def target_sends(self, data: bytes) -> Playbook:
        self.call(self.target.protocol.data_received, data)
        return self

    def client_gets(self, n: int, timeout: float = STEP_TIMEOUT) -> list[Any]:
        """The next ``n`` messages the session sent the client (waiting for them)."""
        return self._wait("client", n, timeout)

    def target_gets(self, n: int, timeout: float = STEP_TIMEOUT) -> list[Any]:
        """The next ``n`` messages the session sent the target (waiting for them)."""
        return self._wait("target", n, timeout)

    def quiet(self, seconds: float = 0.05) -> None:
        """Nothing (more) reaches either side for ``seconds`` of running the loop."""
        self.run(asyncio.sleep(seconds))
        for side in ("client", "target"):
            extra = self._collect(side)
            assert not extra, f"the {side} got unexpected messages: {extra!r}"

    def close(self) -> None:
        async def ending() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.run(ending())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()
