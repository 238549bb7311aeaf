"""Slow down password guessing: after ``LIMIT`` failed sign-ins for one user
name, or from one address, within ``WINDOW`` seconds, further attempts are
refused (even with the right password) until the window has passed.

Kept in process memory: each portal process counts on its own, which bounds
guessing per process without a shared store. SSO sign-ins are the provider's
business and are not counted here.

It must not tell a refused attempt with the right password from a wrong one.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

LIMIT = 5
WINDOW = 300.0


class LoginThrottle:
    def __init__(self, limit: int = LIMIT, window: float = WINDOW):
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures[key]
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def wait_seconds(self, user: str, addr: str, now: float | None = None) -> float:
        """0 if an attempt may proceed, else how long until it may."""
        now = time.time() if now is None else now
        with self._lock:
            waits = [q[0] + self.window - now for key in (f"u:{user.lower()}", f"a:{addr}")
                     if len(q := self._recent(key, now)) >= self.limit]
        return max(waits, default=0.0)

    def failed(self, user: str, addr: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            for key in (f"u:{user.lower()}", f"a:{addr}"):
                self._recent(key, now).append(now)

    def succeeded(self, user: str) -> None:
        with self._lock:
            self._failures.pop(f"u:{user.lower()}", None)
