"""`+concurrency=auto`: find the knee of the vLLM servers from their own gauges while a run goes on.

The controller samples the backends' gauges (through the model adapters' `GET /backends`) a
few times a second and moves the collector's concurrency limit:

- ramp: start low and double while no backend queues and the run really uses the limit; the
  first waiting request (or every KV cache full) ends the ramp;
- then hold the queue small: a little waiting keeps every sequence slot busy (throughput), a
  long queue only adds latency. Above the band, cut by the excess (each waiting request is a
  rollout too many; once the rollouts over the last cut have drained); below it, add 5%; KV cache near full on every backend holds (no
  raise); rising preemptions cut at once.

Decisions are a pure function of the samples (`decide`), so they are tested with injected
gauges and an injected clock; `run()` is the loop around them.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from nemo_gym_cli.config.paths import conf_defaults

AUTO_START = 4  # "start low": the ramp doubles from here
SAMPLE_INTERVAL_S = 0.25  # "at most a few times a second"
READ_TIMEOUT_S = 2.0
SMOOTHING = 0.5  # EWMA weight of the newest waiting sample: gauges are instantaneous and noisy
QUEUE_LOW_PER_BACKEND = 2.0  # below this mean queue: room to raise
QUEUE_HIGH_PER_BACKEND = 4.0  # above this: cut towards QUEUE_TARGET_PER_BACKEND
QUEUE_TARGET_PER_BACKEND = 2.5
KV_FULL = 0.95
SEEN_SHARE = 0.5  # at least this share of the rollouts in flight must be at the servers to raise
MAX_CUT = 0.75  # never cut below 75% of the limit in one step
TRACE_LIMIT = 2000


@dataclass
class Signals:
    """The backends' gauges summed over every model adapter's up backends."""
    backends: int  # up backends that report vLLM gauges
    running: float = 0.0
    waiting: float = 0.0
    kv_min: float | None = None  # the emptiest backend's KV cache usage (all full -> no room)
    preemptions: float | None = None  # cumulative

    @classmethod
    def from_views(cls, views: list[dict]) -> "Signals":
        """From model adapters' `/backends` answers."""
        s = cls(backends=0)
        kvs, preempted = [], []
        seen: set = set()  # a server behind two adapters (policy and judge) counts once
        for view in views:
            for b in view.get("backends", []):
                g = b.get("vllm") or {}
                if not b.get("healthy") or g.get("running") is None or g.get("waiting") is None or b.get("url") in seen:
                    continue
                seen.add(b.get("url"))
                s.backends += 1
                s.running += g["running"]
                s.waiting += g["waiting"]
                if g.get("kv_cache_usage") is not None:
                    kvs.append(g["kv_cache_usage"])
                if g.get("preemptions") is not None:
                    preempted.append(g["preemptions"])
        s.kv_min = min(kvs) if kvs else None
        s.preemptions = sum(preempted) if preempted else None
        return s


@dataclass
class AutoConcurrency:
    """Drives `limit` (anything with `.value` and `.set(n)`) between 1 and `maximum`."""
    limit: Any
    read_signals: Callable[[], Awaitable[Signals | None]]
    in_flight: Callable[[], int]
    maximum: int = conf_defaults("ng_collect_rollouts")["concurrency_max"]
    interval_s: float = SAMPLE_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
    ramping: bool = True
    queue: float | None = None  # smoothed total waiting
    last_preemptions: float | None = None
    trace: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, limit) at each change
    ramp_ended_at: float | None = None
    no_signals: bool = False

    def __post_init__(self) -> None:
        self.started = self.clock()
        self.limit.set(min(self.limit.value, self.maximum))
        self._note()

    # ------------------------------------------------------------ the decision
    def decide(self, s: Signals) -> int:
        """The next limit after one sample (also updates the smoothed state)."""
        current = self.limit.value
        if s.backends == 0:  # nothing to read (OpenAI, all down): hold
            return current
        self.queue = s.waiting if self.queue is None else SMOOTHING * s.waiting + (1 - SMOOTHING) * self.queue
        preempted = (s.preemptions is not None and self.last_preemptions is not None
                     and s.preemptions > self.last_preemptions)
        if s.preemptions is not None:
            self.last_preemptions = s.preemptions
        n = s.backends
        queue_now = min(self.queue, s.waiting)  # smoothed, but never staler than the sample: no undershoot
        flight = self.in_flight()
        kv_all_full = s.kv_min is not None and s.kv_min >= KV_FULL
        if preempted:
            self._end_ramp()
            return max(1, current - math.ceil(current / 4))
        if queue_now > QUEUE_HIGH_PER_BACKEND * n:
            self._end_ramp()
            if flight > current:  # the last cut is still draining (rollouts in flight finish first)
                return current
            excess = max(1, math.ceil(queue_now - QUEUE_TARGET_PER_BACKEND * n))
            return max(1, current - excess, math.floor(current * MAX_CUT))
        if self.ramping and (s.waiting >= 1 or kv_all_full):  # the first sign of a full server ends the doubling
            self._end_ramp()
            return current
        using_it = flight >= current * 0.9  # a run's tail (or a small dataset) does not use it
        # On slow servers the requests of newly started rollouts show up late: raise only once the
        # gauges see most of what is in flight, or a stale "no queue" would double past the knee.
        seen = s.running + s.waiting >= SEEN_SHARE * flight
        if self.queue > QUEUE_LOW_PER_BACKEND * n or kv_all_full or not using_it or not seen:
            return current
        step = current if self.ramping else max(1, round(current * 0.05))
        return min(self.maximum, current + step)

    def _end_ramp(self) -> None:
        if self.ramping:
            self.ramping = False
            self.ramp_ended_at = self.clock()

    # ------------------------------------------------------------ the loop
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="concurrency=auto")

    async def stop(self) -> None:
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        """Sample and adjust until cancelled."""
        while True:
            try:
                signals = await self.read_signals()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a missed sample is a held limit
                signals = None
            if signals is not None:
                self.no_signals = signals.backends == 0
                self.step(signals)
            await self.sleep(self.interval_s)

    def step(self, signals: Signals) -> None:
        new = self.decide(signals)
        if new != self.limit.value:
            self.limit.set(new)
            self._note()

    def _note(self) -> None:
        if len(self.trace) < TRACE_LIMIT:
            self.trace.append((round(self.clock() - self.started, 3), self.limit.value))

    # ------------------------------------------------------------ the report
    def settled(self) -> int:
        """The time-weighted mean limit since the ramp ended (or over the whole run)."""
        now = self.clock()
        since = self.ramp_ended_at if self.ramp_ended_at is not None else self.started
        points = [(t + self.started, v) for t, v in self.trace]
        total = weighted = 0.0
        for i, (t, v) in enumerate(points):
            end = points[i + 1][0] if i + 1 < len(points) else now
            start = max(t, since)
            if end > start:
                total += end - start
                weighted += (end - start) * v
        return round(weighted / total) if total > 0 else self.limit.value

    def report(self) -> dict[str, Any]:
        return {"mode": "auto", "settled": self.settled(), "final": self.limit.value, "maximum": self.maximum,
                "ramp_s": round(self.ramp_ended_at - self.started, 3) if self.ramp_ended_at is not None else None,
                "signals": not self.no_signals, "trace": [list(p) for p in self.trace]}


def adapters_reader(client, model_urls: list[str]) -> Callable[[], Awaitable[Signals | None]]:
    """Read the gauges through every model adapter's `GET /backends` (in parallel, short timeout)."""
    async def read() -> Signals | None:
        async def view(url: str) -> dict:
            try:
                return await client.request_json("GET", f"{url}/backends", server="model adapter",
                                                  timeout_s=READ_TIMEOUT_S, retries=0) or {}
            except Exception:  # noqa: BLE001 - an adapter without /backends (or restarting) adds nothing
                return {}
        return Signals.from_views(list(await asyncio.gather(*(view(u) for u in model_urls)))) if model_urls else None
    return read
