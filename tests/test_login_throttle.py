"""Unit tests for keyturn.identity.LoginThrottle and the gateway.limits settings
(no servers: a fake clock)."""

from __future__ import annotations

import pytest

from keyturn.config import AuthThrottle, parse_config
from keyturn.errors import ConfigError
from keyturn.identity import LoginThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(**kw: float) -> tuple[LoginThrottle, Clock]:
    clock = Clock()
    settings = AuthThrottle(**{"free_attempts": 2, "base_delay": 1.0, "max_delay": 8.0,
                               "forget_after": 60.0, **kw})  # type: ignore[arg-type]
    return LoginThrottle(settings, clock=clock), clock


def test_failures_back_off_exponentially_up_to_the_cap() -> None:
    t, clock = throttle()
    waits = []
    for _ in range(8):
        v = t.failed("alice", "10.0.0.1")
        waits.append(v.wait)
        clock.now += v.wait  # a client that waits for each answer
    assert waits == [0, 0, 1, 2, 4, 8, 8, 8]


def test_parallel_failures_queue_behind_each_other() -> None:
    t, _ = throttle()
    waits = [t.failed("alice", "10.0.0.1").wait for _ in range(5)]
    assert waits == [0, 0, 1, 3, 7]  # 1, then +2, then +4: no faster than one at a time


def test_throttling_start_is_reported_once_per_key() -> None:
    t, _ = throttle()
    started = [t.failed("alice", "10.0.0.1").started for _ in range(5)]
    assert started == [False, False, True, False, False]


def test_a_users_failures_never_delay_the_right_token_from_elsewhere() -> None:
    t, _ = throttle()
    for _ in range(6):
        t.failed("alice", "10.0.0.1")
    assert t.success_wait("10.0.0.2") == 0  # another address: at once
    assert t.failed("alice", "10.0.0.2").wait > 0  # but alice's failures are slowed anywhere
    assert t.failed("bob", "10.0.0.3").wait == 0  # and nobody else's


def test_a_success_from_a_throttled_address_waits_like_a_failure_at_most_max_delay() -> None:
    t, clock = throttle()
    for _ in range(3):
        clock.now += t.failed("alice", "10.0.0.1").wait
    # A fourth failure would wait 2 s: so does a success, so timing tells nothing.
    assert t.success_wait("10.0.0.1") == 2
    for _ in range(10):
        t.failed("mallory", "10.0.0.1")
    assert t.success_wait("10.0.0.1") == 8  # capped


def test_failures_are_forgotten_and_the_table_is_bounded() -> None:
    t, clock = throttle()
    for _ in range(4):
        clock.now += t.failed("alice", "10.0.0.1").wait
    clock.now += 61
    assert t.failures("user", "alice") == 0 and t.failed("alice", "10.0.0.1").wait == 0
    small = LoginThrottle(AuthThrottle(), max_keys=10)
    for i in range(100):
        small.failed(f"made-up-{i}", "10.0.0.9")
    assert len(small._keys) <= 10


def test_limits_settings_are_validated() -> None:
    c = parse_config("gateway:\n  limits: {login_timeout: 5s, max_connections: 50, "
                     "auth_throttle: {base_delay: 200ms}}\n")
    limits = c.gateway.limits
    assert (limits.login_timeout, limits.max_connections, limits.max_pending_logins) == \
        (5.0, 50, 50)
    assert limits.auth_throttle.base_delay == 0.2 and limits.max_connections_per_user == 100
    for bad, key in [("max_connections: 0", "max_connections"),
                     ("login_timeout: soon", "login_timeout"),
                     ("max_connections: 10, max_pending_logins: 20", "max_pending_logins"),
                     ("auth_throttle: {delay: 1s}", "auth_throttle.delay"),
                     ("max_conections: 5", "max_conections")]:
        with pytest.raises(ConfigError, match=f"gateway.limits.{key}"):
            parse_config(f"gateway:\n  limits: {{{bad}}}\n")
