"""Stable hash of the session id over the backends; if that one is down, the next healthy one
in ring order. Stable across processes and restarts (crc32, not Python's salted ``hash()``)."""

from __future__ import annotations

import zlib

from ..backend import Backend
from .base import Policy


class Hash(Policy):
    name = "hash"

    def choose(self, healthy: list[Backend], session_id: str | None, group_key: str | None) -> Backend:
        key = session_id if session_id is not None else group_key
        ring = self.backends or healthy
        if key is None:  # neither a session id nor a group key: in turn
            return healthy[self.rotate(len(healthy))]
        n = len(ring)
        start = zlib.crc32(key.encode()) % n
        for i in range(start, start + n):
            b = ring[i % n]
            if b.healthy:
                return b
        return healthy[0]  # unreachable while the Router passes a non-empty healthy list
