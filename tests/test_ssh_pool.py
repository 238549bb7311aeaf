"""The SSH gateway's pool of logins to targets (proxies/ssh/gateway.UpstreamPool): commands
share logins up to CHANNELS each, at most LOGINS logins to a target are open or being
made at once, and a command beyond waits for a channel to free, or fails with a clear
message once WAIT is over. The logins are stand-ins (the pool's bookkeeping is what is
tested; tests/test_ssh_gateway.py runs real ones)."""

from __future__ import annotations

import asyncio

import pytest

from proxies.ssh import gateway
from proxies.ssh.register import SSHTarget

TARGET = SSHTarget(host="10.0.0.9", port=22, user="deploy", host_keys=("SHA256:x",))


class FakeLogin:
    def __init__(self) -> None:
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def logins(monkeypatch: pytest.MonkeyPatch) -> list[FakeLogin]:
    made: list[FakeLogin] = []

    async def connect(target: SSHTarget) -> FakeLogin:
        await asyncio.sleep(0.01)  # a login takes a while: concurrent acquires overlap
        made.append(FakeLogin())
        return made[-1]

    monkeypatch.setattr(gateway, "_connect", connect)
    return made


def test_logins_are_shared_and_capped(logins: list[FakeLogin]) -> None:
    async def go() -> None:
        pool = gateway.UpstreamPool()
        pool.CHANNELS, pool.LOGINS, pool.WAIT = 2, 3, 0.5
        got = await asyncio.gather(*(pool.acquire(TARGET) for _ in range(6)))
        assert len(logins) == 3  # six commands, two per login, three logins
        assert sorted(got.count(c) for c in logins) == [2, 2, 2]
        # A seventh waits for a channel; one ends; it takes that channel.
        seventh = asyncio.ensure_future(pool.acquire(TARGET))
        await asyncio.sleep(0.1)
        assert not seventh.done()
        pool.release(TARGET, got[0])
        assert await asyncio.wait_for(seventh, 1) is got[0]
        assert len(logins) == 3
        # An eighth finds nothing free within WAIT: a clear error, no fourth login.
        with pytest.raises(gateway.PoolFull, match="6 commands already run on deploy@"):
            await pool.acquire(TARGET)
        assert len(logins) == 3
        assert "try again later" in gateway._connect_error(
            TARGET, gateway.PoolFull("6 commands already run on x; try again later"))
        # A broken login makes room for a new one.
        pool.release(TARGET, got[1], broken=True)
        fresh = await pool.acquire(TARGET, fresh=True)
        assert fresh is logins[-1] and len(logins) == 4
        pool.close()

    asyncio.run(go())
