"""Prometheus series for the router. Label children are created once per backend; gauges read
the live attributes at scrape time (``set_function``), so the hot path only bumps counters."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .backend import OUTCOMES, Backend

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class BackendMetrics:
    """Cached label children of one backend."""

    __slots__ = ("requests", "seconds", "failovers")

    def __init__(self, requests: dict, seconds, failovers) -> None:
        self.requests = requests  # outcome -> Counter child
        self.seconds = seconds
        self.failovers = failovers


def register(registry: CollectorRegistry, backends: list[Backend], session_count: Callable[[], int]) -> None:
    """Register the router's series on ``registry`` and attach ``BackendMetrics`` to each backend."""
    lb = ["backend"]
    in_flight = Gauge("ng_model_backend_in_flight", "Requests in flight to the backend", lb, registry=registry)
    requests = Counter("ng_model_backend_requests", "Requests to the backend by outcome (ok, error, unavailable, malformed)",
                       ["backend", "outcome"], registry=registry)
    seconds = Histogram("ng_model_backend_request_seconds", "Request latency per backend", lb,
                        buckets=LATENCY_BUCKETS, registry=registry)
    sessions = Gauge("ng_model_backend_active_sessions", "Sessions pinned to the backend", lb, registry=registry)
    failovers = Counter("ng_model_backend_failovers", "Calls that failed on the backend and were retried elsewhere",
                        lb, registry=registry)
    up = Gauge("ng_model_backend_up", "1 if the backend is healthy, else 0", lb, registry=registry)
    Gauge("ng_model_sessions", "Sessions in the routing table", registry=registry).set_function(session_count)
    for b in backends:
        u = b.url
        in_flight.labels(u).set_function(lambda b=b: b.in_flight)
        sessions.labels(u).set_function(lambda b=b: b.sessions)
        up.labels(u).set_function(lambda b=b: 1.0 if b.healthy else 0.0)
        b.metrics = BackendMetrics(
            {o: requests.labels(u, o) for o in OUTCOMES}, seconds.labels(u), failovers.labels(u))
