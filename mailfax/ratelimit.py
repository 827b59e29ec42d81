"""Counting events per key in a sliding time window, in memory (per instance): failed logins
per client address. (Status mails per sender are counted in the store's outbox instead, so
that limit holds over all instances.)"""

from __future__ import annotations

import time
from collections import deque

MAX_KEYS = 10_000  # beyond this, keys with no recent events are forgotten


class SlidingWindow:
    def __init__(self, limit: int, window: float):
        self.limit = limit
        self.window = window
        self._times: dict[str, deque[float]] = {}

    def count(self, key: str, now: float | None = None) -> int:
        return len(self._recent(key, now))

    def full(self, key: str, now: float | None = None) -> bool:
        return self.count(key, now) >= self.limit

    def add(self, key: str, now: float | None = None) -> None:
        self._recent(key, now).append(time.monotonic() if now is None else now)
        if len(self._times) > MAX_KEYS:
            for stale in [name for name, times in self._times.items() if not times]:
                del self._times[stale]

    def allow(self, key: str, now: float | None = None) -> bool:
        """Count one event for ``key`` if the window has room; False (and not counted) if not."""
        if self.full(key, now):
            return False
        self.add(key, now)
        return True

    def forget(self, key: str) -> None:
        self._times.pop(key, None)

    def _recent(self, key: str, now: float | None) -> deque[float]:
        moment = time.monotonic() if now is None else now
        times = self._times.setdefault(key, deque())
        while times and moment - times[0] > self.window:
            times.popleft()
        return times
