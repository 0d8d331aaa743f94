"""Session id -> pinned backend, bounded by an idle TTL and an LRU cap. O(1) per operation."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from .backend import Backend


class SessionTable:
    """Keeps ``Backend.sessions`` right on pin, re-pin, release, LRU eviction and TTL expiry.

    Entries are kept in last-use order, so expiry only looks at the oldest ones (lazily, on
    each operation): no per-session timers.
    """

    __slots__ = ("ttl_s", "max_sessions", "_clock", "_d")

    def __init__(self, ttl_s: float, max_sessions: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if ttl_s <= 0:
            raise ValueError(f"session_ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._d: OrderedDict[str, tuple[Backend, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._d

    def get(self, session_id: str) -> Backend | None:
        """The pinned backend (and mark the session used now), or None if unknown or expired."""
        now = self._clock()
        self._expire(now)
        entry = self._d.get(session_id)
        if entry is None:
            return None
        backend = entry[0]
        self._d[session_id] = (backend, now)
        self._d.move_to_end(session_id)
        return backend

    def pin(self, session_id: str, backend: Backend) -> None:
        """Pin (or re-pin) a session to ``backend``; evicts the least recently used over the cap."""
        now = self._clock()
        d = self._d
        old = d.get(session_id)
        if old is not None:
            old[0].sessions -= 1
        d[session_id] = (backend, now)
        d.move_to_end(session_id)
        backend.sessions += 1
        while len(d) > self.max_sessions:
            d.popitem(last=False)[1][0].sessions -= 1
        self._expire(now)

    def release(self, session_id: str) -> Backend | None:
        entry = self._d.pop(session_id, None)
        if entry is None:
            return None
        entry[0].sessions -= 1
        return entry[0]

    def expire(self) -> None:
        self._expire(self._clock())

    def _expire(self, now: float) -> None:
        d = self._d
        cutoff = now - self.ttl_s
        while d:
            backend, last_used = next(iter(d.values()))
            if last_used > cutoff:
                return
            d.popitem(last=False)
            backend.sessions -= 1
