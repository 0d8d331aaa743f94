"""The interface every routing policy implements."""

from __future__ import annotations

from ..backend import Backend


class Policy:
    """Chooses a backend for a new (or re-pinned) session. Stickiness and failover live in the
    Router; a policy only places.

    ``choose`` gets the healthy backends (never empty; do not mutate it). ``bind`` is called
    once with every backend, in configured order, before the first ``choose``.
    """

    name = "base"

    def __init__(self) -> None:
        self.backends: list[Backend] = []
        self._turn = 0

    def rotate(self, n: int) -> int:
        """0..n-1, one further each call: where to start among n healthy backends, so ties never
        all land on the first in the list."""
        start = self._turn % n
        self._turn = start + 1
        return start

    def bind(self, backends: list[Backend]) -> None:
        self.backends = backends

    def choose(self, healthy: list[Backend], session_id: str | None, group_key: str | None) -> Backend:
        raise NotImplementedError

    def on_result(self, backend: Backend, ok: bool, latency_s: float) -> None:
        """Hear about a finished call (optional; the Router skips it when not overridden)."""
