"""Keeping the graph's processes up: a replica runner (how one is started), a restart policy,
liveness probes, and the supervisor that restarts a runner that exits unexpectedly or stops
answering its /health (NeMo Gym's servers: GET /; frozen: SIGSTOP, a deadlock; it is killed
first, then restarted).

A `ReplicaRunner` starts one unit of the graph: one replica of one server, or the co-located
process hosting every server. `processes.LocalProcess` is a child process of ng_run; another
runner (a Ray actor) implements the same few methods. The unit registers itself with the
head server once it serves; the supervisor only tells the head when it is gone.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

from nemo_gym_cli.config.typed import load_config
from nemo_gym_cli.config.paths import conf_defaults
from nemo_gym_cli.graph.head import HeadServer

# (server url, timeout, path) -> None if `GET url+path` answers in time, else why not (ServerClient.health_problem).
Probe = Callable[[str, float, str], Awaitable["str | None"]]


class ReplicaRunner(Protocol):
    """One unit of the graph, started and stopped by its supervisor (maybe many times)."""

    label: str  # how logs name it: "simple_weather", "simple_weather#1", "colocated"
    members: list[tuple[str, int]]  # the (server name, replica) pairs it serves and registers

    async def start(self) -> None:
        """Launch it; returns once launched (it registers with the head server when it serves)."""

    async def wait(self) -> str:
        """Until it exits; returns how it ended, e.g. "with code -9"."""

    def failed(self) -> bool:
        """Whether its last exit was a failure (on-failure restarts only those)."""

    async def stop(self, grace_s: float) -> None:
        """Stop it (and what it started), killing it after `grace_s`; idempotent."""

    def kill(self) -> None:
        """End it now, without a grace period (it stopped answering); wait() then reports the exit."""

    def last_lines(self) -> list[str]:
        """Its last log lines, for the report when it dies."""

    # Optional: `liveness_targets() -> list[dict]`, what to probe instead of its members' registrations
    # (a Ray head is no server of the head server): entries shaped like HeadServer's.


@dataclass
class RestartPolicy:
    """Backoff `backoff_s` doubling to `max_backoff_s`; more than `max_restarts` within `window_s`
    is a storm. The defaults: `restarts` in conf/ng_run.yaml."""

    backoff_s: float
    max_backoff_s: float
    max_restarts: int
    window_s: float
    clock: Callable[[], float] = time.monotonic
    _recent: collections.deque = field(default_factory=collections.deque, repr=False)

    @classmethod
    def from_config(cls, config: dict, clock: Callable[[], float] = time.monotonic) -> "RestartPolicy":
        cfg = {**conf_defaults("ng_run")["restarts"], **(config.get("restarts") or {})}
        return cls(float(cfg["backoff_s"]), float(cfg["max_backoff_s"]), int(cfg["max_restarts"]), float(cfg["window_s"]),
                   clock)

    def next_delay(self) -> float | None:
        """The delay before the next restart (and count it), or None: too many restarts lately."""
        now = self.clock()
        while self._recent and now - self._recent[0] > self.window_s:
            self._recent.popleft()
        if len(self._recent) >= self.max_restarts:
            return None
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** len(self._recent))
        self._recent.append(now)
        return delay


@dataclass(kw_only=True)
class Liveness:
    """`liveness` of ng_run's config; what each field does and its default: conf/ng_run.yaml."""

    interval_s: float
    timeout_s: float
    failures: int

    @classmethod
    def from_config(cls, config: dict) -> "Liveness | None":
        """None when probing is off (interval_s: 0)."""
        liveness = load_config(cls, config.get("liveness") or {}, "liveness")
        return liveness if liveness.interval_s > 0 else None


class Supervisor:
    """Runs one runner for the life of the graph; restarts it per policy (None: never).

    Before the graph is ready any exit is fatal (a server that cannot start will not start on
    a second try either). `run()` returns None when stopped, or the reason the graph must stop.
    """

    def __init__(self, runner: ReplicaRunner, head: HeadServer, policy: RestartPolicy | None,
                 say: Callable[[str], None], liveness: Liveness | None = None, probe: Probe | None = None):
        self.runner, self.head, self.policy, self.say = runner, head, policy, say
        self.liveness, self.probe = (liveness, probe) if probe is not None else (None, None)
        self.graph_ready = False
        self.stopping = False
        self.restarts = 0
        self.killed_because: str | None = None  # why the current life was killed, if it was

    async def run(self) -> str | None:
        watch = asyncio.create_task(self._watch_liveness()) if self.liveness else None
        try:
            return await self._run()
        finally:
            if watch is not None:
                watch.cancel()

    async def _run(self) -> str | None:
        await self.runner.start()
        while True:
            how = await self.runner.wait()
            if self.stopping:
                return None
            if self.killed_because:
                how, self.killed_because = f"{how}, killed because {self.killed_because}", None
            for name, replica in self.runner.members:
                self.head.set_state(name, replica, "exited")
            what = f"server '{self.runner.label}' exited"
            if not self.graph_ready:
                return f"{what} while starting {how}"
            if self.policy is None or not self.runner.failed():
                why = "restart: never" if self.policy is None else "a clean exit is not a failure"
                return f"{what} unexpectedly {how} ({why})"
            delay = self.policy.next_delay()
            if delay is None:
                return (f"{what} unexpectedly {how}, after {self.restarts} restarts: more than "
                        f"{self.policy.max_restarts} restarts within {self.policy.window_s:g} s")
            self.restarts += 1
            self.say(f"ng_run: {what} unexpectedly {how}; restarting it in {delay:g} s (restart {self.restarts})")
            for name, replica in self.runner.members:
                self.head.mark_restarting(name, replica)
            await asyncio.sleep(delay)
            if self.stopping:
                return None
            await self.runner.start()

    async def stop(self, grace_s: float) -> None:
        self.stopping = True
        await self.runner.stop(grace_s)

    def kill(self, why: str) -> None:
        """End the runner's current life now; it is restarted like a crash (per policy), `why` in the report."""
        self.killed_because = why
        self.runner.kill()

    def _liveness_targets(self) -> list[dict]:
        own = getattr(self.runner, "liveness_targets", None)
        return own() if own is not None else [self.head.servers[m] for m in self.runner.members]

    async def _watch_liveness(self) -> None:
        """Probe every member's /health while it is ready; kill the runner when one stops answering.

        Failures count per process (pid): a replica restarted by someone else (Ray) starts afresh,
        and a killed one is not probed again."""
        liveness = self.liveness
        failed: dict[tuple, int] = {}
        killed: set = set()
        while True:
            await asyncio.sleep(liveness.interval_s)
            live = [e for e in self._liveness_targets() if e["state"] == "ready" and e["url"] and e["pid"] not in killed]
            results = await asyncio.gather(*(self.probe(e["url"], liveness.timeout_s, e["probe_path"])
                                             for e in live))
            for entry, why in zip(live, results):
                key = (entry["name"], entry["replica"], entry["pid"])
                if why is None:
                    failed.pop(key, None)
                    continue
                failed[key] = failed.get(key, 0) + 1
                if failed[key] >= liveness.failures and not self.stopping and entry["pid"] not in killed:
                    killed.add(entry["pid"])
                    frozen = f"'{entry['name']}' stopped answering {entry['probe_path']} ({failed[key]} probes in a row: {why})"
                    self.say(f"ng_run: server '{self.runner.label}' (pid {entry['pid']}) is not answering: {frozen}; "
                             f"killing it")
                    self.kill(frozen)
