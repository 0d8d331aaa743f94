"""The collector's concurrency: a limit that can change while a run goes on.

Workers start a new rollout only while `in_flight < limit.value`. `set(n)` changes the limit at
once: a raise starts new rollouts right away, a cut lets the ones in flight finish and starts
none until the count is under the new limit. This is the hook for `+concurrency=auto`: a
controller holds the same object and calls `set()`.
"""

from __future__ import annotations

import asyncio


class ConcurrencyLimit:
    def __init__(self, value: int):
        self.value = self._check(value)
        self._changed: asyncio.Future | None = None

    @staticmethod
    def _check(value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {value!r}")
        return value

    def set(self, value: int) -> None:
        """Change the limit; the run takes the new value without waiting for a rollout to end."""
        self.value = self._check(value)
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    def changed(self) -> asyncio.Future:
        """A future that completes at the next set() (one shared future until it fires)."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    @classmethod
    def of(cls, concurrency: "int | ConcurrencyLimit") -> "ConcurrencyLimit":
        return concurrency if isinstance(concurrency, ConcurrencyLimit) else cls(concurrency)

    def __repr__(self) -> str:
        return f"ConcurrencyLimit({self.value})"
