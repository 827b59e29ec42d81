"""Counting events per key in a sliding time window, in memory (per instance): failed logins
per client address and per user name. (Status mails per sender are counted in the store's
outbox instead, so that limit holds over all instances.)"""

from __future__ import annotations

import time
from collections import deque

MAX_KEYS = 10_000  # at this many keys, a new key first makes the window forget stale ones


class SlidingWindow:
    """Events per key within the last ``window`` seconds; each event may carry a tag (for
    failed logins from an address: the user name tried), so some can be forgotten alone."""

    def __init__(self, limit: int, window: float):
        self.limit = limit
        self.window = window
        self._times: dict[str, deque[tuple[float, str]]] = {}
        self._prune_at = MAX_KEYS

    def __len__(self) -> int:
        """How many keys are remembered (some may be stale until the next clean-up)."""
        return len(self._times)

    def count(self, key: str, now: float | None = None) -> int:
        times = self._times.get(key)  # asking never adds a key
        if times is None:
            return 0
        self._trim(times, _moment(now))
        if not times:
            del self._times[key]
        return len(times)

    def full(self, key: str, now: float | None = None) -> bool:
        return self.count(key, now) >= self.limit

    def add(self, key: str, now: float | None = None, tag: str = "") -> None:
        moment = _moment(now)
        times = self._times.get(key)
        if times is None:
            if len(self._times) >= self._prune_at:
                self._prune(moment)
            times = self._times[key] = deque()
        self._trim(times, moment)
        times.append((moment, tag))

    def forget(self, key: str, tag: str | None = None) -> None:
        """Forget ``key``'s events (only those tagged ``tag``, if given)."""
        if tag is None:
            self._times.pop(key, None)
            return
        times = self._times.get(key)
        if times is None:
            return
        kept = deque(event for event in times if event[1] != tag)
        if kept:
            self._times[key] = kept
        else:
            del self._times[key]

    def _trim(self, times: deque[tuple[float, str]], moment: float) -> None:
        while times and moment - times[0][0] > self.window:
            times.popleft()

    def _prune(self, moment: float) -> None:
        """Forget keys whose newest event is older than the window (a client that failed once
        and never came back). If most keys are recent, the next clean-up waits until there
        are twice as many, so adding stays cheap on average."""
        for key in [key for key, times in self._times.items()
                    if not times or moment - times[-1][0] > self.window]:
            del self._times[key]
        self._prune_at = max(MAX_KEYS, 2 * len(self._times))


def _moment(now: float | None) -> float:
    return time.monotonic() if now is None else now
