"""Session router over many vLLM backends: sticky sessions, load-aware placement, passive +
active health checks (health.py), failover, and calls cut off a frozen backend re-issued
elsewhere. Single asyncio loop, no locks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal, TypeVar

from prometheus_client import CollectorRegistry

from nemo_gym_cli.config.typed import UrlList

from . import backend_metrics as _metrics
from .backend import Backend
from .groups import GroupAffinity
from .health import HealthChecks, Probe
from .policies import Policy, make_policy
from .sessions import SessionTable

T = TypeVar("T")

UNAVAILABLE_STATUSES = frozenset({502, 503, 504})


@dataclass(kw_only=True)
class RoutingSettings:
    """How a model adapter spreads sessions over its backends and watches them. Every default of
    these fields is here, one line each (UpstreamConfig, a model adapter's config, includes them)."""

    base_url: UrlList  # one URL, a comma-separated string of URLs, or a list: one backend each
    routing_policy: Literal["least_loaded", "round_robin", "hash"] = "least_loaded"  # new sessions; all sticky
    group_affinity: bool = True  # the repeats of one prompt on one backend while load allows
    group_affinity_slack: int = 4  # ...unless that backend has this many more in flight than the least loaded
    session_ttl_s: float = 1800  # a session idle this long is forgotten
    max_sessions: int = 100_000  # sessions remembered at most (least recently used go first)
    health_interval_s: float = 2  # GET /health on every backend this often (0: only after a failed request)
    health_timeout_s: float = 2  # a /health slower than this is a failed check
    health_failures: int = 3  # failed checks in a row: down, its requests in flight re-issued elsewhere
    probe_interval_s: float = 0.5  # a backend marked down is probed on /health this often
    wait_for_backend_s: float = 30  # with every backend down, a request waits this long for one (a turn: not past its timeout_s)
    # Malformed answers (not HTTP, not JSON, no `choices`, over max_answer_bytes) in a row that mark a
    # backend down (never the last healthy one); its request is retried on another backend.
    malformed_answers: int = 3
    # ...it then stays down at least this long (doubling each time it is marked down again before a
    # good answer, at most 16x); it comes back on a good /health after that, and one more
    # malformed answer takes it out again.
    malformed_hold_s: float = 5


class BackendUnavailable(Exception):
    """The backend refused the connection, reset it, timed out, or answered 502/503/504."""


class NoHealthyBackend(BackendUnavailable):
    """No backend came back within ``wait_for_backend_s``."""


class MalformedAnswer(Exception):
    """The backend answered, but with something we cannot use (bad HTTP, not JSON, too large...)."""

    def __init__(self, message: str, backend: str):
        super().__init__(f"{backend}: {message}")
        self.message, self.backend = message, backend


class Router:
    """Routes each call of a session to one backend, chosen once by the policy.

    ``call(session_id, attempt)`` runs ``await attempt(backend)``; if that raises
    BackendUnavailable the backend is marked down and probed, the session is re-pinned to
    another healthy backend and the attempt is retried there. The same happens to an attempt
    cut off because the health checks found its backend dead (the attempt is cancelled, so it
    must be safe to repeat). Any other exception propagates.

    ``probe(url, timeout_s) -> HTTP status`` does the health checks' GETs.
    """

    def __init__(self, config: RoutingSettings, *, probe: Probe, max_failovers: int | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        urls = [u.rstrip("/") for u in config.base_url]
        if not urls:
            raise ValueError("Router needs at least one backend URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"duplicate backend URLs: {urls}")
        if config.wait_for_backend_s < 0:
            raise ValueError(f"wait_for_backend_s must be >= 0, got {config.wait_for_backend_s}")
        if config.malformed_answers < 1 or config.malformed_hold_s < 0:
            raise ValueError(f"malformed_answers must be >= 1 and malformed_hold_s >= 0, got "
                             f"{config.malformed_answers}, {config.malformed_hold_s}")
        if max_failovers is not None and max_failovers < 0:
            raise ValueError(f"max_failovers must be >= 0, got {max_failovers}")
        self.backends = [Backend(u, i) for i, u in enumerate(urls)]
        self.policy: Policy = make_policy(config.routing_policy)
        self.policy.bind(self.backends)
        on_result = type(self.policy).on_result
        self._on_result = self.policy.on_result if on_result is not Policy.on_result else None
        self.sessions = SessionTable(config.session_ttl_s, config.max_sessions)
        self.groups = GroupAffinity(config.group_affinity_slack, config.max_sessions) if config.group_affinity else None
        self.health = HealthChecks(probe, interval_s=config.health_interval_s, timeout_s=config.health_timeout_s,
                                   failures=config.health_failures, down_interval_s=config.probe_interval_s,
                                   on_down=self._mark_down, on_up=self._mark_up, cut_off=self._cut_off)
        self._started = False
        self.max_failovers = len(self.backends) if max_failovers is None else max_failovers
        self.wait_for_backend_s = config.wait_for_backend_s
        self.malformed_answers, self.malformed_hold_s = config.malformed_answers, config.malformed_hold_s
        self._healthy: list[Backend] = list(self.backends)
        self._up = asyncio.Event()
        self._up.set()
        self._closed = False
        if registry is not None:
            _metrics.register(registry, self.backends, self._session_count)

    # -- the hot path -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the active health checks (needs a running loop; call() does it on first use)."""
        self._started = True
        if self.health.active:
            for backend in self.backends:
                self.health.watch(backend)

    async def call(self, session_id: str | None, attempt: Callable[[Backend], Awaitable[T]], *,
                   group_key: str | None = None, deadline: float | None = None) -> T:
        """`attempt` on the session's backend, failing over; with every backend down it waits for one
        `wait_for_backend_s`, and never past `deadline` (monotonic) when the caller has one."""
        if not self._started:
            self.start()
        backend = self._route(session_id, group_key)
        waiting_since = wait_until = None  # the first time every backend was down, and until when to wait
        failovers = 0
        task = asyncio.current_task()
        while True:
            if backend is None:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    wait_until = waiting_since + self.wait_for_backend_s
                    if deadline is not None:
                        wait_until = min(wait_until, deadline)
                await self._wait_for_healthy(waiting_since, wait_until)
                backend = self._route(session_id, group_key)
                continue
            backend.in_flight += 1
            calls = backend.calls
            calls.add(task)
            t0 = time.perf_counter()
            try:
                result = await attempt(backend)
            except BackendUnavailable as e:
                calls.discard(task)
                error: BaseException = e
            except MalformedAnswer as e:
                calls.discard(task)
                backend.in_flight -= 1
                self._record(backend, "malformed", time.perf_counter() - t0)
                self._malformed(backend, e)
                other = self._route(session_id, group_key, avoid=backend) if failovers < self.max_failovers else None
                if other is None:
                    raise
                failovers += 1
                self._count_failover(backend)
                backend = other
                continue
            except Exception:
                calls.discard(task)
                backend.in_flight -= 1
                self._record(backend, "error", time.perf_counter() - t0)
                raise
            except BaseException as e:  # cancelled: by the health checks (re-issue), or the caller's
                calls.discard(task)
                if not self._was_cut_off(backend, task, e):
                    backend.in_flight -= 1
                    raise
                error = BackendUnavailable(f"cut off: {backend.why_down()}")
            else:
                calls.discard(task)
                if backend.cut and task in backend.cut:  # cut off just as it finished: keep the result
                    backend.cut.discard(task)
                    task.uncancel()
                backend.in_flight -= 1
                self._record(backend, "ok", time.perf_counter() - t0)
                if backend.malformed_in_a_row or backend.ejections:
                    backend.malformed_in_a_row = backend.ejections = 0  # its answers recovered
                return result
            backend.in_flight -= 1
            self._record(backend, "unavailable", time.perf_counter() - t0)
            self._mark_down(backend, error)
            if failovers >= self.max_failovers:
                raise error
            failovers += 1
            self._count_failover(backend)
            backend = self._route(session_id, group_key)

    def release(self, session_id: str | None) -> None:
        """Forget a session (rollout end). Unknown ids and None are ignored."""
        if session_id is not None:
            self.sessions.release(session_id)

    def _count_failover(self, backend: Backend) -> None:
        backend.failovers += 1
        if backend.metrics is not None:
            backend.metrics.failovers.inc()

    def _route(self, session_id: str | None, group_key: str | None, avoid: Backend | None = None) -> Backend | None:
        """Pinned backend if healthy; else group affinity, then the policy (and pin). None if
        no backend is healthy (other than `avoid`, one that just answered badly)."""
        if session_id is not None:
            backend = self.sessions.get(session_id)
            if backend is not None and backend.healthy and backend is not avoid:
                return backend
        healthy = self._healthy
        if avoid is not None:
            healthy = [b for b in healthy if b is not avoid]
        if not healthy:
            return None
        backend = None
        groups = self.groups
        if groups is not None and group_key is not None:
            backend = groups.pick(group_key, healthy)
            if backend is None:
                backend = self.policy.choose(healthy, session_id, group_key)
                groups.remember(group_key, backend)
        else:
            backend = self.policy.choose(healthy, session_id, group_key)
        if session_id is not None:
            self.sessions.pin(session_id, backend)
        return backend

    def _record(self, backend: Backend, outcome: str, latency_s: float) -> None:
        backend.requests[outcome] += 1
        if outcome != "unavailable":
            backend.latency_sum_s += latency_s
        m = backend.metrics
        if m is not None:
            m.requests[outcome].inc()
            m.seconds.observe(latency_s)
        if self._on_result is not None:
            self._on_result(backend, outcome == "ok", latency_s)

    # -- health -------------------------------------------------------------------------------

    def _mark_down(self, backend: Backend, error: BaseException | str) -> None:
        if not backend.healthy:
            return
        backend.healthy = False
        text = str(error)
        backend.down_reason = text if isinstance(error, str) or (text and type(error) is BackendUnavailable) else (
            f"{type(error).__name__}: {text}" if text else type(error).__name__)
        backend.probe_error = None
        self._healthy = [b for b in self.backends if b.healthy]
        if not self._healthy:
            self._up.clear()
        if not self._closed:
            self.health.watch(backend)

    def _malformed(self, backend: Backend, error: MalformedAnswer) -> None:
        """Count a malformed answer; enough in a row (one, just after it came back) mark it down."""
        backend.last_error = error.message[:300]
        backend.malformed_in_a_row += 1
        limit = 1 if backend.ejections else self.malformed_answers
        if not backend.healthy or backend.malformed_in_a_row < limit or len(self._healthy) <= 1:
            return  # never the last healthy backend: its good answers still serve
        backend.malformed_in_a_row = 0
        backend.ejections += 1
        backend.held_until = time.monotonic() + self.malformed_hold_s * 2 ** min(backend.ejections - 1, 4)
        hold = backend.held_until - time.monotonic()
        self._mark_down(backend, f"{limit} malformed answer{'s' if limit > 1 else ''} in a row "
                                 f"(last: {error.message[:200]}); held out {hold:.0f} s, then back on a good /health")

    @staticmethod
    def _was_cut_off(backend: Backend, task: asyncio.Task, error: BaseException) -> bool:
        """True if `error` is _cut_off's cancellation alone (not also the caller's)."""
        if not isinstance(error, asyncio.CancelledError) or task not in backend.cut:
            return False
        backend.cut.discard(task)
        return task.uncancel() == 0

    def _cut_off(self, backend: Backend) -> None:
        """Cancel the calls in flight on a dead backend; call() re-issues them elsewhere."""
        for task in list(backend.calls):
            if task not in backend.cut:
                backend.cut.add(task)
                task.cancel()

    def mark_down(self, backend: Backend, reason: str) -> None:
        """Take a backend out of rotation (preflight found it unreachable); the probe brings it back."""
        self._mark_down(backend, BackendUnavailable(reason))

    def _mark_up(self, backend: Backend) -> None:
        if backend.healthy or time.monotonic() < backend.held_until:
            return  # held out after malformed answers: the probes bring it back once the hold is over
        backend.healthy = True
        backend.down_reason = backend.probe_error = None
        self._healthy = [b for b in self.backends if b.healthy]
        self._up.set()

    async def _wait_for_healthy(self, waiting_since: float, wait_until: float) -> None:
        """Wait (bounded) until some backend is healthy; else raise NoHealthyBackend, saying how long
        the call has waited since `waiting_since` (it may have waited, and lost its pick, before)."""
        while not self._healthy:
            remaining = wait_until - time.monotonic()
            if remaining <= 0 or self._closed:
                raise NoHealthyBackend(self._no_healthy_message(time.monotonic() - waiting_since))
            try:
                async with asyncio.timeout(remaining):
                    await self._up.wait()
            except TimeoutError:
                raise NoHealthyBackend(self._no_healthy_message(time.monotonic() - waiting_since)) from None

    def _no_healthy_message(self, waited_s: float) -> str:
        lines = "; ".join(f"{b.url}: {b.why_down()}" for b in self.backends)
        return f"no healthy backend after waiting {waited_s:.1f}s: {lines}"

    # -- introspection and shutdown -----------------------------------------------------------

    def snapshot(self) -> dict:
        self.sessions.expire()
        return {
            "policy": self.policy.name,
            "sessions": len(self.sessions),
            "groups": len(self.groups) if self.groups is not None else 0,
            "backends": [b.snapshot() for b in self.backends],
        }

    def _session_count(self) -> int:
        self.sessions.expire()
        return len(self.sessions)

    async def close(self) -> None:
        """Stop the health checks. The HTTP client belongs to the caller and stays open."""
        self._closed = True
        await self.health.close(self.backends)
