"""New sessions in turn over the healthy backends."""

from __future__ import annotations

from ..backend import Backend
from .base import Policy


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def choose(self, healthy: list[Backend], session_id: str | None, group_key: str | None) -> Backend:
        i = self._next % len(healthy)
        self._next = i + 1
        return healthy[i]
