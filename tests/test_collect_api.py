"""The in-process API: the scheduler's changeable concurrency limit (driven step by step, no
clock), and collect_rollouts from a plain Python script against a real graph."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, wait_until_async, weather_env
from nemo_gym_cli.collect.api import RolloutRun
from nemo_gym_cli.collect.jobs import Repeats, iter_rows
from nemo_gym_cli.collect.limit import ConcurrencyLimit


async def settle(predicate, what: str) -> None:
    """Let the event loop run until predicate() holds (no wall clock involved)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


class Gated:
    """A rollout call that runs until the test releases it."""

    def __init__(self):
        self.started: list[int] = []
        self.gates: dict[int, asyncio.Event] = {}

    async def __call__(self, job, client):
        self.started.append(job.task)
        gate = self.gates[job.task] = asyncio.Event()
        await gate.wait()
        return {"task": job.task}

    def release(self, n: int) -> None:
        for task in [t for t, g in self.gates.items() if not g.is_set()][:n]:
            self.gates[task].set()


async def test_the_limit_can_change_while_rollouts_are_in_flight():
    call, limit = Gated(), ConcurrencyLimit(2)
    run = RolloutRun(iter_rows([{"responses_create_params": {}}] * 30, Repeats(1), "agent"), None, limit, call=call)
    results: list = []

    async def consume():
        async for outcome in run:
            results.append(outcome.result["task"])

    consumer = asyncio.create_task(consume())
    await settle(lambda: len(call.started) == 2, "two rollouts in flight")
    limit.set(5)  # a raise starts new rollouts at once, without waiting for one to finish
    await settle(lambda: len(call.started) == 5, "five in flight after set(5)")
    limit.set(1)  # a cut starts nothing new until in-flight is below the new limit
    call.release(3)
    await settle(lambda: len(results) == 3, "three finished")
    assert len(call.started) == 5 and run.in_flight() == 2
    call.release(2)
    await settle(lambda: len(call.started) == 6, "one new rollout once in-flight dropped under 1")
    for _ in range(30):
        await asyncio.sleep(0)
    assert len(call.started) == 6 and run.in_flight() == 1
    await settle(lambda: call.release(30) or consumer.done(), "every rollout to finish")  # releasing as they start
    assert sorted(results) == list(range(30))


async def test_a_finished_rollout_holds_its_slot_until_the_consumer_takes_it():
    call = Gated()
    run = RolloutRun(iter_rows([{"responses_create_params": {}}] * 10, Repeats(1), "agent"), None, 3, call=call)
    it = run.__aiter__()
    first = asyncio.ensure_future(it.__anext__())
    await settle(lambda: len(call.started) == 3, "three in flight")
    call.release(3)
    assert (await first).ok
    # the consumer has taken one result and not asked for more: two results wait, one slot is free
    await settle(lambda: len(call.started) == 4, "one new rollout")
    for _ in range(30):
        await asyncio.sleep(0)
    assert len(call.started) == 4 and run.in_flight() == 3
    await it.aclose()  # leaving early cancels what is in flight


SCRIPT = """
import asyncio, json, sys
from nemo_gym_cli import ConcurrencyLimit, collect_rollouts

rows = [{"responses_create_params": {"input": f"weather in city {i}?"}, "row_id": i} for i in range(6)]
rows.append({"responses_create_params": {"input": "x"}, "agent_ref": {"type": "responses_api_agents", "name": "nope"}})

async def main():
    async for result in collect_rollouts(rows, head_url=sys.argv[1], concurrency=ConcurrencyLimit(3), num_repeats=2,
                                         agent_name="simple_weather_simple_agent"):
        print(json.dumps(result))

asyncio.run(main())
"""


def test_collect_rollouts_from_a_plain_python_script(standins, graph, tmp_path):
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(standins(1)))
    (tmp_path / "trainer.py").write_text(textwrap.dedent(SCRIPT))
    done = subprocess.run([sys.executable, "trainer.py", g.head], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    ok = [r for r in results if "error" not in r]
    assert sorted((r["_ng_task_index"], r["_ng_rollout_index"]) for r in ok) == [(t, k) for t in range(6) for k in range(2)]
    assert all(r["reward"] == 1.0 and r["row_id"] == r["_ng_task_index"] for r in ok)
    assert all(r["agent_ref"] == {"type": "responses_api_agents", "name": "simple_weather_simple_agent"} for r in ok)
    failed = [r for r in results if "error" in r]  # yielded, not raised
    assert len(failed) == 2 and all(r["_ng_task_index"] == 6 and r["status"] == 404 and "nope" in r["error"] for r in failed)


async def test_leaving_the_loop_early_cancels_the_rollouts_in_flight(standins, graph, tmp_path):
    from nemo_gym_cli import collect_rollouts

    backend, = standins(1, "--latency-ms", "200")
    g = graph([VLLM_MODEL, WEATHER], env=weather_env([backend]))
    rows = ({"responses_create_params": {"input": f"weather in city {i}?"}} for i in range(1000))
    taken = 0
    stream = collect_rollouts(rows, head_url=g.head, concurrency=20, agent_name="simple_weather_simple_agent")
    async for result in stream:
        taken += 1
        if taken == 3:
            break
    await stream.aclose()
    # nothing goes on behind our back: the backend goes idle, having served only the rollouts
    # taken and the ones in flight when we left (two model turns each)
    await wait_until_async(lambda: backend.metric("vllm:num_requests_running") == 0, 20, "the backend to go idle",
                           interval=0.05)
    assert backend.metric("vllm:num_requests_running") == 0
    assert backend.stats()["requests"] <= 2 * (taken + 20 + 1)
