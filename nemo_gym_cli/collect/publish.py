"""Publish a running collection's progress to the head server (about once a second), so
`ng_status --watch` can show it. Best effort: a head server that does not answer never slows
or fails the run."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable

from nemo_gym_cli.serving.head_client import HeadClient

PUBLISH_INTERVAL_S = 1.0
PUBLISH_TIMEOUT_S = 2.0


class ProgressPublisher:
    """`snapshot()` returns the numbers to show (done, failed, rollouts_per_s, mean_reward, ...)."""

    def __init__(self, client, head_url: str, agent: str, output: str, snapshot: Callable[[], dict[str, Any]],
                 interval_s: float = PUBLISH_INTERVAL_S):
        self.head, self.snapshot, self.interval_s = HeadClient(client, head_url), snapshot, interval_s
        self.base = {"id": f"{os.uname().nodename}:{os.getpid()}:{time.time_ns()}", "agent": agent, "output": output}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="publish progress")

    async def stop(self, state: str, reason: str | None = None) -> None:
        """Stop publishing; post the final numbers with `state` (finished, interrupted, or failed
        with its `reason`)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._post(state, reason)

    async def _loop(self) -> None:
        while True:
            await self._post("running")
            await asyncio.sleep(self.interval_s)

    async def _post(self, state: str, reason: str | None = None) -> None:
        body = {**self.base, **self.snapshot(), "state": state, "reason": reason}
        try:
            await self.head.publish_progress(body, timeout_s=PUBLISH_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - progress is informational; the run goes on
            pass
