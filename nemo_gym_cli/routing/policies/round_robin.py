"""New sessions in turn over the healthy backends."""

from __future__ import annotations

from ..backend import Backend
from .base import Policy


class RoundRobin(Policy):
    name = "round_robin"

    def choose(self, healthy: list[Backend], session_id: str | None, group_key: str | None) -> Backend:
        return healthy[self.rotate(len(healthy))]
