"""Least in-flight requests, then fewest active sessions; ties rotated (never "first in the list")."""

from __future__ import annotations

from ..backend import Backend
from .base import Policy


class LeastLoaded(Policy):
    name = "least_loaded"

    def choose(self, healthy: list[Backend], session_id: str | None, group_key: str | None) -> Backend:
        n = len(healthy)
        start = self.rotate(n)
        best = healthy[start]
        best_if, best_s = best.in_flight, best.sessions
        for i in range(start + 1, start + n):
            b = healthy[i % n]
            f = b.in_flight
            if f < best_if or (f == best_if and b.sessions < best_s):
                best, best_if, best_s = b, f, b.sessions
        return best
