"""Run statistics in bounded memory: totals, per-agent means, pass@k, latency percentiles.

pass@k is the unbiased estimator over each task's repeats: with n rollouts of a task of which
c pass, pass@k = 1 - C(n-c, k) / C(n, k), averaged over the tasks with n >= k, for k = 1 and
each power of two up to the agent's repeats. A rollout passes when its reward is at least the
agent's threshold (1.0 unless its config sets `pass_threshold`).
"""

from __future__ import annotations

import random
import time
from array import array
from dataclasses import dataclass, field
from math import comb

LATENCY_SAMPLES = 20_000  # a uniform sample of rollout latencies: p50/p95 in bounded memory


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task with n samples, c of them correct (needs n >= k)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks_for(repeats: int) -> list[int]:
    ks, k = [], 1
    while k <= repeats:
        ks.append(k)
        k *= 2
    return ks


def token_exact_counts(result: dict) -> tuple[int, int]:
    """(turns made token-exact, turns rendered afresh) of a rollout from a token-exact model
    adapter: its turns' last output items say `token_exact: true|false`."""
    response = result.get("response")
    output = response.get("output") if isinstance(response, dict) else None
    exact = fallback = 0
    for item in output if isinstance(output, list) else ():
        flag = item.get("token_exact") if isinstance(item, dict) else None
        exact += flag is True
        fallback += flag is False
    return exact, fallback


def numeric_fields(result: dict):
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("_ng_"):
            yield key, value


@dataclass
class AgentStats:
    repeats: int | None  # None: unknown (re-verifying stored rollouts): groups complete at the end
    threshold: float = 1.0
    rollouts: int = 0
    failures: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    groups: dict[int, list[int]] = field(default_factory=dict)  # task -> [n, passed], until complete
    pass_sums: dict[int, float] = field(default_factory=dict)
    pass_tasks: dict[int, int] = field(default_factory=dict)
    most: int = 0  # the most rollouts seen for one task

    def add_reward(self, task: int, reward: float | None) -> None:
        group = self.groups.setdefault(task, [0, 0])
        group[0] += 1
        group[1] += int(reward is not None and reward >= self.threshold)
        self.most = max(self.most, group[0])
        if self.repeats is not None and group[0] >= self.repeats:
            self._fold(*self.groups.pop(task))

    def _fold(self, n: int, passed: int) -> None:
        for k in ks_for(self.repeats or self.most):
            if n >= k:
                self.pass_sums[k] = self.pass_sums.get(k, 0.0) + pass_at_k(n, passed, k)
                self.pass_tasks[k] = self.pass_tasks.get(k, 0) + 1

    def summary(self) -> dict:
        for task in list(self.groups):  # tasks with fewer rollouts than repeats (failures, interrupted)
            self._fold(*self.groups.pop(task))
        return {
            "rollouts": self.rollouts,
            "failures": self.failures,
            "repeats": self.repeats or self.most,
            "means": {k: round(self.sums[k] / self.counts[k], 6) for k in sorted(self.sums)},
            "pass@k": {str(k): round(self.pass_sums[k] / self.pass_tasks[k], 6) for k in sorted(self.pass_sums)},
        }


@dataclass
class Stats:
    repeats_of: object  # agent -> repeats (jobs.Repeats.of)
    thresholds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: int = 0
    skipped: int = 0
    latencies: array = field(default_factory=lambda: array("d"))  # reservoir sample
    latency_sum: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)  # numeric verify fields (reward, ...)
    counts: dict[str, int] = field(default_factory=dict)
    agents: dict[str, AgentStats] = field(default_factory=dict)
    token_exact_turns: int = 0  # model turns whose prompt extends the previous turn's exact ids
    token_exact_fallbacks: int = 0  # model turns rendered afresh (marked token_exact: false, with the reason)

    def agent(self, name: str | None) -> AgentStats:
        name = name or "(none)"
        stats = self.agents.get(name)
        if stats is None:
            stats = self.agents[name] = AgentStats(self.repeats_of(name), float(self.thresholds.get(name, 1.0)))
        return stats

    def add_result(self, agent: str | None, task: int, result: dict, latency: float) -> None:
        self.done += 1
        self.latency_sum += latency
        if len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append(latency)
        else:  # reservoir sampling: every rollout has the same chance to be in the sample
            slot = random.randrange(self.done)
            if slot < LATENCY_SAMPLES:
                self.latencies[slot] = latency
        per = self.agent(agent)
        per.rollouts += 1
        exact, fallback = token_exact_counts(result)
        self.token_exact_turns += exact
        self.token_exact_fallbacks += fallback
        for key, value in numeric_fields(result):
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
            per.sums[key] = per.sums.get(key, 0.0) + value
            per.counts[key] = per.counts.get(key, 0) + 1
        self.add_earlier(agent, task, result)

    def add_earlier(self, agent: str | None, task: int, result: dict) -> None:
        """A rollout for pass@k only (one written by an earlier run, on resume)."""
        reward = result.get("reward")
        self.agent(agent).add_reward(task, reward if isinstance(reward, (int, float)) else None)

    def add_failure(self, agent: str | None) -> None:
        self.failed += 1
        self.agent(agent).failures += 1

    def mean(self, key: str) -> float | None:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else None

    def percentile(self, p: float) -> float | None:
        lat = sorted(self.latencies)
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 4) if lat else None

    def totals(self) -> dict:
        elapsed = time.monotonic() - self.started
        return {
            "rollouts": self.done,
            "failures": self.failed,
            "skipped_already_done": self.skipped,
            "elapsed_s": round(elapsed, 3),
            "rollouts_per_s": round(self.done / elapsed, 2) if elapsed > 0 else None,
            "latency_p50_s": self.percentile(0.50),
            "latency_p95_s": self.percentile(0.95),
            "latency_mean_s": round(self.latency_sum / self.done, 4) if self.done else None,
            "means": {k: round(self.sums[k] / self.counts[k], 6) for k in sorted(self.sums)},
            "token_exact_turns": self.token_exact_turns,
            "token_exact_fallbacks": self.token_exact_fallbacks,
        }

    def per_agent(self) -> dict:
        return {name: self.agents[name].summary() for name in sorted(self.agents)}
