"""The in-process collection API; `ng_collect_rollouts` and `ng_reverify` are built on it.

    from nemo_gym_cli import collect_rollouts
    async for result in collect_rollouts(rows, head_url="http://127.0.0.1:11000", concurrency=64):
        ...  # one finished rollout: the agent's /verify answer + _ng_task_index, _ng_rollout_index, agent_ref

At most `concurrency` rollouts are in flight, and a finished one holds its slot until the
consumer takes it, so a slow consumer slows the run instead of filling memory. A rollout that
fails for a transport or server reason (connection refused or reset, timeout, 5xx, 408, 429)
is run again after a short backoff, up to `max_attempts` attempts in all; one the row itself
causes (other 4xx: a bad row, an unknown agent) is not. A failed rollout is yielded with an
`error` field (and `status`, `attempts`, `reasons`), never raised.

A call that nothing listened to (refused before a byte was sent) costs no attempt: the run
asks whether ng_run's head server answers. If it does, the rollout is tried again (a server
being restarted). If it does not, ng_run is gone: no new rollout starts, and the run waits up
to `graph_wait_s` for the graph to come back. If it comes back the run goes on; if not, the
run ends, those rollouts are not reported at all (they never ran: resume runs them), and
`collect_rollouts` raises GraphGone once everything that finished is yielded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

from nemo_gym_cli.collect.autoconcurrency import AUTO_START, AutoConcurrency, adapters_reader
from nemo_gym_cli.collect.jobs import Job, Repeats, agent_ref, iter_rows, retryable
from nemo_gym_cli.collect.limit import ConcurrencyLimit
from nemo_gym_cli.config import AGENT_SERVERS, MODEL_SERVERS
from nemo_gym_cli.config import head_url as default_head_url
from nemo_gym_cli.config.paths import conf_defaults
from nemo_gym_cli.serving.client import HttpClientConfig, ServerClient
from nemo_gym_cli.serving.errors import ServerCallError
from nemo_gym_cli.serving.head_client import HeadClient

# The one home of a collection's defaults (max_attempts, retry_backoff_s, ...), for this API too.
DEFAULTS = conf_defaults("ng_collect_rollouts")
NOT_SENT_FAILURES = ("refused", "not_sent")  # ServerCallError.failure of a call that never reached a server
GRAPH_POLL_S = 0.5  # while ng_run is gone, its head server is asked this often whether it is back


class GraphGone(ServerCallError):
    """ng_run's graph stopped answering and did not come back within graph_wait_s."""


class GraphWatch:
    """Whether ng_run's graph answers: one check (of the head server's /health) shared by every
    rollout that found nothing listening, bounded by `wait_s` over one outage."""

    def __init__(self, client: ServerClient, wait_s: float):
        self.client, self.wait_s = client, wait_s
        self.lost: str | None = None  # why the run must end: the graph is gone
        self._check: asyncio.Future | None = None

    @property
    def checking(self) -> bool:
        return self._check is not None

    async def back(self) -> bool:
        """True once the head server answers (at once if it does); False if it did not within wait_s."""
        if self.lost:
            return False
        if self._check is None:
            self._check = asyncio.ensure_future(self._wait())
        return await asyncio.shield(self._check)

    async def _answers(self) -> bool:
        try:
            await HeadClient(self.client).health(timeout_s=2)
            return True
        except ServerCallError:
            return False

    async def _wait(self) -> bool:
        deadline = time.monotonic() + self.wait_s
        try:
            while not await self._answers():
                if time.monotonic() >= deadline:
                    self.lost = (f"ng_run's graph at {self.client.head_url} stopped answering (its head server and agents "
                                 f"refuse connections) and did not come back within {self.wait_s:g} s (graph_wait_s)")
                    return False
                await asyncio.sleep(GRAPH_POLL_S)
            return True
        finally:
            self._check = None


@dataclass
class Outcome:
    job: Job
    result: dict | None = None  # the agent's answer (success)
    error: str | None = None
    status: int | None = None
    attempts: int = 0
    reasons: list[str] = field(default_factory=list)
    latency: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def failure_record(self) -> dict:
        job = self.job
        return {"_ng_task_index": job.task, "_ng_rollout_index": job.rollout, "agent_ref": agent_ref(job.agent),
                "line": job.line, "status": self.status, "error": self.error, "reason": self.error,
                "attempts": self.attempts, "reasons": self.reasons}

    def as_dict(self) -> dict:
        """What the API yields: the result (as the CLI writes it), or the failure record."""
        return self.result if self.ok else self.failure_record()


class RolloutRun:
    """Runs jobs with bounded, changeable concurrency and per-rollout retries; iterate for outcomes.

    `call(job, client)` does one attempt of a job (default: POST the row to its agent's /run).
    stop(): start nothing new, let in-flight rollouts finish. cancel(): end in-flight ones now
    (they are not yielded: they never finished).
    """

    def __init__(self, jobs: Iterator[Job], client: ServerClient, concurrency: "int | ConcurrencyLimit",
                 max_attempts: int = DEFAULTS["max_attempts"], agents: set[str] | None = None,
                 call: Callable | None = None, backoff_s: float = DEFAULTS["retry_backoff_s"],
                 backoff_max_s: float = DEFAULTS["retry_backoff_max_s"],
                 graph_wait_s: float = DEFAULTS["graph_wait_s"]):
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
        self.jobs = jobs
        self.client = client
        self.limit = ConcurrencyLimit.of(concurrency)
        self.max_attempts = max_attempts
        self.agents = agents  # None: not checked here
        self.call = call or run_agent
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.graph = GraphWatch(client, float(graph_wait_s))
        self.not_run = 0  # rollouts dropped because the graph was gone (never ran: resume runs them)
        self.retries = 0  # attempts after the first, over all rollouts
        self.stopping = False
        self._pending: set[asyncio.Task] = set()
        self._ready: deque[Outcome] = deque()
        self._wake: asyncio.Future | None = None
        self._exhausted = False

    def stop(self) -> None:
        self.stopping = True
        self._poke()

    def cancel(self) -> None:
        self.stopping = True
        for task in self._pending:
            task.cancel()

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def in_flight(self) -> int:
        """Rollouts running or finished but not yet taken by the consumer."""
        return len(self._pending) + len(self._ready)

    async def __aiter__(self) -> AsyncIterator[Outcome]:
        pending, ready = self._pending, self._ready
        try:
            while True:
                self._fill()
                if ready:
                    outcome = ready.popleft()
                    self._fill()  # its slot is free as it is handed over: start the next one now
                    yield outcome
                    continue
                if not pending and (self._exhausted or self.stopping):
                    return
                self._wake = asyncio.get_running_loop().create_future()
                await asyncio.wait([self._wake, self.limit.changed()], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in list(pending):
                task.cancel()

    def _fill(self) -> None:
        """Start jobs while in flight (running + finished, not yet taken) is under the limit."""
        pending, ready = self._pending, self._ready
        while (not self.stopping and not self._exhausted and not self.graph.checking
               and len(pending) + len(ready) < self.limit.value):
            job = next(self.jobs, None)
            if job is None:
                self._exhausted = True
            elif (early := self._refuse(job)) is not None:
                ready.append(early)  # known bad: no request
            else:
                task = asyncio.ensure_future(self._run(job))
                pending.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._pending.discard(task)
        if not task.cancelled():
            outcome = task.result()
            if outcome is None:  # the graph is gone: not run, not reported
                self.not_run += 1
            else:
                self._ready.append(outcome)
        elif self.graph.lost:
            self.not_run += 1
        self._poke()

    def _refuse(self, job: Job) -> Outcome | None:
        if job.exhausted:
            return Outcome(job, error=job.error, status=job.status, attempts=job.prior_attempts, reasons=job.prior_reasons)
        if job.error is not None:
            return Outcome(job, error=job.error, status=job.status, attempts=job.prior_attempts + 1,
                           reasons=[*job.prior_reasons, job.error])
        if self.agents is not None and job.agent not in self.agents:
            error = f"no agent named '{job.agent}' in the graph (agents: {', '.join(sorted(self.agents)) or 'none'})"
            return Outcome(job, error=error, status=404, attempts=job.prior_attempts + 1, reasons=[*job.prior_reasons, error])
        return None

    async def _run(self, job: Job) -> Outcome | None:
        """The job's outcome, or None: the graph is gone (nothing of it is reported)."""
        t0 = time.perf_counter()
        attempts, reasons = job.prior_attempts, list(job.prior_reasons)
        unsent = 0  # tries that reached no server while the head server answered
        while True:
            attempts += 1
            try:
                result = await self.call(job, self.client)
                return Outcome(job, result=result, attempts=attempts, reasons=reasons, latency=time.perf_counter() - t0)
            except ServerCallError as e:
                status, message = e.status, e.message
                if e.failure in NOT_SENT_FAILURES and unsent < self.max_attempts:
                    # Nothing listened: no attempt spent. Is ng_run there at all?
                    attempts -= 1
                    if not await self._graph_back():
                        return None
                    unsent += 1  # it is: a server being restarted; a server that only refuses counts after a while
                    continue
            except Exception as e:  # a bug, not a transport problem: fail this rollout, keep the run
                message = f"{type(e).__name__}: {e}"
                return Outcome(job, error=message, attempts=attempts, reasons=[*reasons, message], latency=time.perf_counter() - t0)
            reasons.append(f"attempt {attempts}: {f'HTTP {status}' if status else 'no answer'}: {message}")
            if not retryable(status) or attempts >= self.max_attempts or self.stopping:
                return Outcome(job, error=message, status=status, attempts=attempts, reasons=reasons,
                               latency=time.perf_counter() - t0)
            self.retries += 1
            doubling = self.backoff_s * 2 ** (attempts - job.prior_attempts - 1)
            await asyncio.sleep(random.uniform(0.5, 1.0) * min(self.backoff_max_s, doubling))

    async def _graph_back(self) -> bool:
        back = await self.graph.back()
        if not back and not self.stopping:  # gone for good: end the run; what is in flight is not reported
            self.cancel()
        self._poke()  # new rollouts may start again (or the run ends)
        return back


async def run_agent(job: Job, client: ServerClient) -> dict:
    """One attempt of a rollout: the row to its agent's /run; the answer as written to the output."""
    body = {**job.row, "_ng_task_index": job.task, "_ng_rollout_index": job.rollout}
    # Retries are per rollout (RolloutRun), not per request: no status is retried here.
    result = await client.post(job.agent, "/run", body, retry_statuses=frozenset())
    if not isinstance(result, dict):
        raise ServerCallError(job.agent, "/run", f"/run returned {type(result).__name__}, expected a JSON object", 502)
    result["_ng_task_index"] = job.task
    result["_ng_rollout_index"] = job.rollout
    result["agent_ref"] = {"type": AGENT_SERVERS, "name": job.agent}
    return result


async def list_agents(client: ServerClient) -> list[dict]:
    """The agents the head server knows (raises ServerCallError when it does not answer)."""
    servers = await HeadClient(client).servers(timeout_s=HeadClient.LOOKUP_TIMEOUT_S, retries=HeadClient.LOOKUP_RETRIES)
    return [s for s in servers if s.get("server_type") == AGENT_SERVERS]


async def model_servers(client: ServerClient) -> list[str]:
    """The URLs of the model servers the head server knows ([] when it does not answer)."""
    try:
        servers = await client.servers()
    except ServerCallError:
        return []
    return [s["url"] for s in servers if s.get("server_type") == MODEL_SERVERS and s.get("url")]


def collector_client(head_url: str, http_config: dict | None, most_in_flight: int) -> ServerClient:
    """A server client with room for every rollout that can be in flight (connections per host)."""
    http = HttpClientConfig.of(http_config)
    return ServerClient(dataclasses.replace(http, connector_limit=max(http.connector_limit, 2 * most_in_flight)), head_url)


def starting_limit(concurrency: "int | ConcurrencyLimit | str", maximum: int | None) -> tuple[ConcurrencyLimit, int | None]:
    """(the limit to start with, the most it may rise to under "auto", else None)."""
    if concurrency == "auto":
        return ConcurrencyLimit(min(AUTO_START, maximum)), maximum
    return ConcurrencyLimit.of(concurrency), None


def start_run(jobs: Iterator[Job], client: ServerClient, limit: ConcurrencyLimit, *, auto_max: int | None,
              models: list[str], **run_args) -> tuple[RolloutRun, AutoConcurrency | None]:
    """The run of every collection (ng_collect_rollouts, ng_reverify, collect_rollouts()): a
    RolloutRun, and under concurrency=auto (`auto_max`) the controller that moves its limit,
    reading the model servers at `models`; the caller stops that controller."""
    run = RolloutRun(jobs, client, limit, **run_args)
    controller = None
    if auto_max:
        controller = AutoConcurrency(limit, adapters_reader(client, models), run.in_flight, maximum=auto_max)
        controller.start()
    return run, controller


async def collect_rollouts(rows: Iterable[dict], *, head_url: str | None = None,
                           concurrency: "int | ConcurrencyLimit | str" = DEFAULTS["concurrency"],
                           concurrency_max: int = DEFAULTS["concurrency_max"],
                           num_repeats: "int | dict[str, int]" = DEFAULTS["num_repeats"],
                           agent_name: str | None = None, max_attempts: int = DEFAULTS["max_attempts"],
                           responses_create_params: dict | None = None,
                           http_config: dict | None = None,
                           graph_wait_s: float = DEFAULTS["graph_wait_s"]) -> AsyncIterator[dict[str, Any]]:
    """Yield one dict per finished rollout (see the module doc). `rows` is read lazily.

    head_url: the ng_run head server (default: head_server in conf/base.yaml). num_repeats: an int or
    `{"_default": 1, "my_agent": 8}`. agent_name: the agent of rows without `agent_ref`.
    concurrency="auto": the limit follows the vLLM servers' gauges (autoconcurrency.py), never
    above concurrency_max. graph_wait_s: how long to wait for a gone ng_run to come back (default:
    conf/collection.yaml). Raises ServerCallError when the head server does not answer
    at the start, and GraphGone (after yielding what finished) when the graph went away and did
    not come back: the rollouts not yielded never ran.
    """
    limit, auto_max = starting_limit(concurrency, concurrency_max)
    client = collector_client(head_url or default_head_url({}), http_config, auto_max or limit.value)
    controller = None
    try:
        agents = {s["name"] for s in await list_agents(client)}
        jobs = iter_rows(rows, Repeats(num_repeats), agent_name, responses_create_params)
        models = await model_servers(client) if auto_max else []
        run, controller = start_run(jobs, client, limit, auto_max=auto_max, models=models, max_attempts=max_attempts,
                                    agents=agents, graph_wait_s=graph_wait_s)
        async with contextlib.aclosing(run.__aiter__()) as outcomes:  # leaving early cancels what is in flight
            async for outcome in outcomes:
                yield outcome.as_dict()
        if run.graph.lost:
            raise GraphGone("ng_run", client.head_url or "", f"{run.graph.lost}; {run.not_run} rollouts did not run",
                            failure="refused")
    finally:
        if controller is not None:
            await controller.stop()
        await client.close()
