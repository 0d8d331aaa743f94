"""Active health checks of a router's backends: `GET <root>/health` on a schedule.

A backend whose /health fails `failures` times in a row (refused, reset, timed out after
`timeout_s`, or not HTTP 200) is marked down and its calls in flight are cut off, so the
router re-issues them elsewhere: a frozen vLLM (SIGSTOP, a hung GPU) looks like a slow one to
its callers, and only a check that does not depend on its load tells the two apart. A slow
backend whose /health answers is never cut off. A down backend is checked every
`down_interval_s` and comes back on the first HTTP 200.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from .backend import Backend

# GET url with a timeout -> HTTP status. The model adapter passes its server client's, so the
# probes go through the same HTTP client (and errors) as the requests.
Probe = Callable[[str, float], Awaitable[int]]


def describe(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class HealthChecks:
    """One watch task per backend. ``on_down(backend, reason)`` / ``on_up(backend)`` / ``cut_off(backend)``
    are the router's."""

    def __init__(self, probe: Probe, *, interval_s: float, timeout_s: float, failures: int, down_interval_s: float,
                 on_down: Callable[[Backend, str], None], on_up: Callable[[Backend], None],
                 cut_off: Callable[[Backend], None]) -> None:
        if interval_s < 0 or timeout_s <= 0 or failures < 1 or down_interval_s <= 0:
            raise ValueError("health_interval_s must be >= 0 (0: off), health_timeout_s and probe_interval_s > 0, "
                             f"health_failures >= 1; got {interval_s}, {timeout_s}, {down_interval_s}, {failures}")
        self.probe = probe
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failures = failures
        self.down_interval_s = down_interval_s
        self._on_down, self._on_up, self._cut_off = on_down, on_up, cut_off
        self.closed = False

    @property
    def active(self) -> bool:
        return self.interval_s > 0

    def watch(self, backend: Backend) -> None:
        """Start watching (idempotent). Needs a running loop."""
        if backend.probe_task is None and not self.closed:
            backend.probe_task = asyncio.get_running_loop().create_task(
                self._watch(backend), name=f"health {backend.root_url}")

    async def check(self, backend: Backend) -> str | None:
        """None if `GET /health` answers 200 within the timeout, else why not."""
        try:
            async with asyncio.timeout(self.timeout_s):
                status = await self.probe(backend.root_url + "/health", self.timeout_s)
        except Exception as e:  # noqa: BLE001 - unavailable, or a malformed answer: a failed check either way
            return f"GET /health: {describe(e)}"
        return None if status == 200 else f"GET /health: HTTP {status}"

    async def _watch(self, backend: Backend) -> None:
        loop = asyncio.get_running_loop()
        failed = 0
        spent = 0.0
        try:
            while not self.closed:
                if backend.healthy and not self.active:
                    return  # passive mode: only a down backend is watched
                interval = self.interval_s if backend.healthy else self.down_interval_s
                await asyncio.sleep(max(0.0, interval - spent))  # checks start every `interval`
                t0 = loop.time()
                error = await self.check(backend)
                spent = loop.time() - t0
                if error is None:
                    failed = 0
                    backend.probe_error = None
                    if not backend.healthy:
                        self._on_up(backend)
                    continue
                failed += 1
                backend.probe_error = error
                if failed >= self.failures:
                    if backend.healthy:
                        self._on_down(backend, f"{error} ({failed} checks in a row)")
                    self._cut_off(backend)  # frozen for sure: what is still in flight there never returns
        finally:
            backend.probe_task = None

    async def close(self, backends: list[Backend]) -> None:
        self.closed = True
        tasks = [b.probe_task for b in backends if b.probe_task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
