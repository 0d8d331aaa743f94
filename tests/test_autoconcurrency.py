"""The +concurrency=auto controller alone: injected gauges (a simulated set of vLLM servers with
max_num_seqs) and an injected clock, so its decisions are checked exactly and fast."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from nemo_gym_cli.collect.autoconcurrency import QUEUE_HIGH_PER_BACKEND, AutoConcurrency, Signals


class Limit:
    def __init__(self, value: int):
        self.value = value

    def set(self, value: int) -> None:
        assert isinstance(value, int) and value >= 1
        self.value = value


class Servers:
    """`backends` vLLM servers of `seqs` slots each: a rollout spends `model_share` of its time in
    a model call, so `in_flight * model_share` requests are at the servers; the rest queue."""

    def __init__(self, backends: int = 3, seqs: int = 8, model_share: float = 0.9):
        self.backends, self.seqs, self.model_share = backends, seqs, model_share
        self.preemptions = 0.0

    def signals(self, in_flight: int) -> Signals:
        demand = in_flight * self.model_share
        capacity = self.backends * self.seqs
        running = min(demand, capacity)
        return Signals(backends=self.backends, running=running, waiting=max(0.0, demand - capacity),
                       kv_min=running / capacity, preemptions=self.preemptions)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def controller(limit: Limit, servers: Servers | None = None, maximum: int = 1024, in_flight=None, **kw) -> AutoConcurrency:
    servers = servers or Servers()
    clock = Clock()

    async def read():
        return servers.signals(limit.value)

    async def sleep(s):
        clock.now += s

    return AutoConcurrency(limit, read, in_flight or (lambda: limit.value), maximum=maximum, clock=clock, sleep=sleep, **kw)


def steps(auto: AutoConcurrency, servers: Servers, n: int, in_flight=None) -> list[int]:
    seen = []
    for _ in range(n):
        auto.step(servers.signals(auto.limit.value if in_flight is None else in_flight))
        auto.clock.now += auto.interval_s
        seen.append(auto.limit.value)
    return seen


def test_it_ramps_to_the_knee_and_settles_without_overshooting():
    servers = Servers(backends=3, seqs=8, model_share=0.9)  # capacity 24 sequences: the knee is ~27 rollouts
    auto = controller(Limit(4), servers)
    seen = steps(auto, servers, 200)
    assert seen[:3] == [8, 16, 32]  # doubling while nothing queues
    assert max(seen) <= 40  # never runs off towards concurrency_max
    assert all(27 <= v <= 34 for v in seen[10:]), seen  # busy servers, short queue
    report = auto.report()
    assert 27 <= report["settled"] <= 34 and report["mode"] == "auto" and report["ramp_s"] is not None
    assert report["trace"][0] == [0.0, 4] and report["trace"][-1][1] == auto.limit.value


def test_a_long_queue_is_cut_back_by_its_excess():
    servers = Servers(backends=2, seqs=4, model_share=1.0)
    auto = controller(Limit(64), servers)  # far past the knee (8)
    seen = steps(auto, servers, 40)
    assert seen[0] < 64 and seen[-1] <= 8 + QUEUE_HIGH_PER_BACKEND * 2 and min(seen) >= 8, seen


def test_a_cut_waits_for_the_rollouts_over_it_to_drain_before_cutting_again():
    servers = Servers(backends=2, seqs=4, model_share=1.0)
    flight = [64]
    auto = controller(Limit(64), servers, in_flight=lambda: flight[0])
    auto.step(servers.signals(flight[0]))
    assert auto.limit.value == 48  # the queue (56) says cut; at most 25% at once
    auto.step(servers.signals(flight[0]))  # still 64 in flight: the gauges show the old load
    assert auto.limit.value == 48
    flight[0] = 48
    auto.step(servers.signals(flight[0]))
    assert auto.limit.value == 36


def test_it_does_not_raise_before_the_servers_see_the_rollouts_in_flight():
    servers = Servers(backends=2, seqs=4)
    auto = controller(Limit(8), servers)
    auto.step(Signals(backends=2, running=1, waiting=0, kv_min=0.1))  # 8 in flight, 1 arrived so far
    assert auto.limit.value == 8
    auto.step(Signals(backends=2, running=6, waiting=0, kv_min=0.7))
    assert auto.limit.value == 16


def test_rising_preemptions_cut_at_once_and_stop_the_ramp():
    servers = Servers(backends=2, seqs=100)
    auto = controller(Limit(40), servers)
    steps(auto, servers, 1)
    assert auto.limit.value == 80
    servers.preemptions += 3
    steps(auto, servers, 1)
    assert auto.limit.value == 60 and not auto.ramping
    steps(auto, servers, 1)
    assert auto.limit.value == 63  # no new preemptions, room left: small steps after the ramp


def test_kv_cache_full_everywhere_holds_and_the_maximum_is_never_passed():
    full = Servers(backends=2, seqs=8)
    auto = controller(Limit(16), full)
    auto.step(Signals(backends=2, running=16, waiting=0, kv_min=0.97))
    assert auto.limit.value == 16
    capped = controller(Limit(4), Servers(backends=4, seqs=1000), maximum=50)
    assert steps(capped, Servers(backends=4, seqs=1000), 10)[-1] == 50


def test_it_holds_when_the_run_does_not_use_the_limit_or_nothing_reports_gauges():
    servers = Servers(backends=2, seqs=100)
    auto = controller(Limit(10), servers, in_flight=lambda: 3)
    assert steps(auto, servers, 5, in_flight=3)[-1] == 10  # the tail of a run: no raise
    blind = controller(Limit(10), servers)
    blind.step(Signals(backends=0))  # an OpenAI backend: no vLLM gauges
    assert blind.limit.value == 10


def test_signals_sum_the_up_backends_of_every_adapter():
    views = [{"backends": [{"healthy": True, "vllm": {"running": 2, "waiting": 1, "kv_cache_usage": 0.5, "preemptions": 1}},
                           {"healthy": False, "vllm": {"running": None, "waiting": None}}]},
             {"backends": [{"healthy": True, "vllm": {"running": 3, "waiting": 0, "kv_cache_usage": 0.2, "preemptions": 0}},
                           {"healthy": True, "vllm": {"running": None, "waiting": None, "kv_cache_usage": None}}]}]
    for i, b in enumerate(b for v in views for b in v["backends"]):
        b["url"] = f"http://h{i}:8000/v1"
    s = Signals.from_views(views)
    assert (s.backends, s.running, s.waiting, s.kv_min, s.preemptions) == (2, 5, 1, 0.2, 1)
    judge = {"backends": [dict(views[0]["backends"][0])]}  # the same server behind a judge adapter
    assert Signals.from_views([*views, judge]).waiting == 1


def test_the_loop_samples_at_its_interval_and_survives_a_failed_read():
    limit = Limit(4)
    clock = Clock()
    calls = []

    async def read():
        calls.append(clock.now)
        if len(calls) == 2:
            raise OSError("adapter restarting")
        if len(calls) == 5:
            raise asyncio.CancelledError
        return Servers().signals(limit.value)

    async def sleep(s):
        clock.now += s

    auto = AutoConcurrency(limit, read, lambda: limit.value, clock=clock, sleep=sleep, interval_s=0.25)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(auto.run())
    assert [round(t - 1000, 2) for t in calls] == [0, 0.25, 0.5, 0.75, 1.0]
    assert limit.value == 32  # 3 good samples: 8, (failed: held), 16, 32


# ------------------------------------------------------------------ in a real run


def test_auto_converges_on_stand_ins_and_does_not_overshoot(standins, graph, tmp_path):
    """3 stand-ins x --max-num-seqs 4 (capacity 12): the limit ramps, finds the queue and stays
    near the knee, far below concurrency_max; the summary reports where it settled and the trace."""
    import json

    from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, run_cli, weather_env

    g = graph([VLLM_MODEL, WEATHER], env=weather_env(standins(3, "--latency-ms", "50", "--max-num-seqs", "4")))
    (tmp_path / "in.jsonl").write_text("".join(
        json.dumps({"responses_create_params": {"input": f"weather in city {i}?"}}) + "\n" for i in range(400)))
    done = run_cli("ng_collect_rollouts", ["+agent_name=simple_weather_simple_agent", f"+head_server.port={g.head_port}",
                                           "+progress=false", "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl",
                                           "+concurrency=auto", "+concurrency_max=1024"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 400
    metrics = json.loads((tmp_path / "out_metrics.json").read_text())
    auto = metrics["concurrency_auto"]
    limits = [v for _, v in auto["trace"]]
    assert limits[0] == 4 and auto["maximum"] == 1024 and auto["signals"]
    assert 12 <= max(limits) <= 64, limits  # it went past the capacity (found the queue), never ran off to the max
    assert 10 <= auto["settled"] <= 40 and metrics["concurrency"] == auto["settled"], auto
    assert "auto: settled at" in done.stderr + done.stdout

    # The in-process API takes the same setting.
    script = tmp_path / "trainer.py"
    script.write_text(
        "import asyncio, sys\nfrom nemo_gym_cli import collect_rollouts\n"
        "rows = [{'responses_create_params': {'input': f'weather in city {i}?'}} for i in range(60)]\n"
        "async def main():\n"
        "    results = [r async for r in collect_rollouts(rows, head_url=sys.argv[1], concurrency='auto', concurrency_max=16,\n"
        "                                                 agent_name='simple_weather_simple_agent')]\n"
        "    print(len(results), sum(r.get('reward', 0) for r in results))\n"
        "asyncio.run(main())\n")
    api = subprocess.run([sys.executable, str(script), g.head], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert api.returncode == 0 and api.stdout.split() == ["60", "60.0"], api.stderr
