"""One upstream vLLM server as the router sees it: plain attributes, cheap to touch."""

from __future__ import annotations

import asyncio

OUTCOMES = ("ok", "error", "unavailable", "malformed")  # malformed: an answer we could not use


def root_of(url: str) -> str:
    """``http://h:8000/v1`` -> ``http://h:8000`` (vLLM serves ``/health`` and ``/metrics`` at the root)."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class Backend:
    """State of one backend. Mutated only by the Router and the SessionTable (single event loop)."""

    __slots__ = (
        "url", "root_url", "index", "healthy", "in_flight", "sessions",
        "requests", "failovers", "latency_sum_s", "down_reason", "probe_error",
        "probe_task", "metrics", "calls", "cut", "malformed_in_a_row", "ejections", "held_until", "last_error",
    )

    def __init__(self, url: str, index: int) -> None:
        self.url = url.rstrip("/")
        self.root_url = root_of(self.url)
        self.index = index
        self.healthy = True  # optimistic: a dead backend is found by its first failed call
        self.in_flight = 0
        self.sessions = 0  # sessions pinned here (kept right by SessionTable)
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.failovers = 0  # calls that failed here and were retried elsewhere
        self.latency_sum_s = 0.0
        self.down_reason: str | None = None
        self.probe_error: str | None = None
        self.probe_task: asyncio.Task | None = None
        self.metrics = None  # BackendMetrics when the router has a registry
        self.calls: set[asyncio.Task] = set()  # tasks awaiting a call here (cancelled if it dies)
        self.cut: set[asyncio.Task] = set()  # of those, the ones the router cancelled
        self.malformed_in_a_row = 0
        self.ejections = 0  # times marked down for malformed answers since its last good answer
        self.held_until = 0.0  # monotonic time before which a good /health does not bring it back
        self.last_error: str | None = None  # the last answer it gave that failed a request

    def why_down(self) -> str:
        if self.healthy:
            return "up"
        why = self.down_reason or "marked down"
        return f"{why}; last probe: {self.probe_error}" if self.probe_error else why

    def snapshot(self) -> dict:
        done = self.requests["ok"] + self.requests["error"]
        return {
            "url": self.url,
            "healthy": self.healthy,
            "down_reason": None if self.healthy else self.why_down(),
            "in_flight": self.in_flight,
            "sessions": self.sessions,
            "requests": dict(self.requests),
            "failovers": self.failovers,
            "last_error": self.last_error,
            "mean_latency_s": self.latency_sum_s / done if done else None,
        }

    def __repr__(self) -> str:
        state = "up" if self.healthy else "down"
        return f"Backend({self.url!r}, {state}, in_flight={self.in_flight}, sessions={self.sessions})"
