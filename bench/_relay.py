"""A bare TCP relay on uvloop: the ceiling of a Python asyncio proxy on this machine.

    python bench/_relay.py LISTEN_PORT TARGET_HOST TARGET_PORT

For each accepted client it opens one connection to the target and forwards bytes both
ways with ``transport.write`` - no parsing, no flow control, no logging. Only what the client
sends before the target connection is up (the startup packet) is kept until then. It uses
the same event loop (uvloop) and the same transport API as the Keyturn gateway, so
``pgbench`` through it shows how fast a Python relay can be on this machine before any
PostgreSQL protocol work is done. Used as a baseline by pgbench_compare.py.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop


class _Target(asyncio.Protocol):
    """The relay's connection to the target: bytes go to the client."""

    def __init__(self, client: asyncio.Transport):
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    """One client connection: bytes go to the target."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.target: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # received before the target connection was up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            target, _ = await loop.create_connection(lambda: _Target(self.transport),
                                                     self.host, self.port)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            target.close()
            return
        self.target = target
        if self.early:
            target.write(b"".join(self.early))
            self.early = []

    def data_received(self, data: bytes) -> None:
        if self.target is not None:
            self.target.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.target is not None:
            self.target.close()


async def main(listen_port: int, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(host, port), "127.0.0.1", listen_port,
                                      reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
