"""Active health checks in a real graph: a vLLM stand-in frozen (SIGSTOP) mid-run is found by
its /health, its requests in flight are cut off and re-issued on the others, and every rollout
completes; a slow stand-in whose /health answers is never cut off."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from conftest import VLLM_MODEL, WEATHER, http_json, script, stop_process, wait_until, weather_env

MODEL = "++policy_model.responses_api_models.vllm_model"
# Fast checks keep the test short; the defaults (2 s, 2 s, 3) are measured in bench/frozen_backend.py.
FAST_CHECKS = [f"{MODEL}.health_interval_s=0.2", f"{MODEL}.health_timeout_s=0.5", f"{MODEL}.health_failures=3"]


def write_rows(path, n: int) -> None:
    tool = {"type": "function", "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"responses_create_params": {"input": [{"role": "user", "content": f"city {i}?"}],
                                                            "tools": [tool]}}) + "\n")


def backend_series(g, name: str) -> dict[str, float]:
    """{backend url: value} of one ng_model_backend_* series of the policy model."""
    _, text = http_json(g.url("policy_model") + "/metrics")
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            url = labels.split('backend="', 1)[1].split('"', 1)[0]
            out[url] = out.get(url, 0.0) + float(value)
    return out


def lines(path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def test_a_frozen_backend_is_routed_around_and_every_rollout_completes(standins, graph, tmp_path):
    backends = standins(3, "--latency-ms", "40")
    victim = backends[1]
    # timeout_s 600: without the health checks the frozen backend's rollouts would wait 10 minutes
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(backends), args=[*FAST_CHECKS, f"{MODEL}.timeout_s=600"])
    write_rows(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out.jsonl"
    collector = subprocess.Popen(
        [script("ng_collect_rollouts"), "+agent_name=simple_weather_simple_agent", f"+head_server.port={g.head_port}",
         "+progress=false", "+input_jsonl_fpath=in.jsonl", f"+output_jsonl_fpath={out}", "+concurrency=30"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: lines(out) >= 30, 60, "the run to be under way")
        victim.proc.send_signal(signal.SIGSTOP)
        frozen_at = lines(out)
        collector.wait(timeout=120)  # bounded: the frozen backend would hold rollouts for 600 s
        log = collector.stdout.read().decode(errors="replace")
        assert collector.returncode == 0, log
        assert lines(out) == 300 and frozen_at < 300, log
        assert (tmp_path / "out_failures.jsonl").read_text() == ""
        assert all(json.loads(line)["reward"] == 1.0 for line in out.read_bytes().splitlines())

        assert backend_series(g, "ng_model_backend_up") == {backends[0].url: 1.0, victim.url: 0.0, backends[2].url: 1.0}
        failovers = backend_series(g, "ng_model_backend_failovers_total")
        assert failovers[victim.url] >= 1 and failovers[backends[0].url] == failovers[backends[2].url] == 0
        # it comes back when its /health answers again
        victim.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: backend_series(g, "ng_model_backend_up")[victim.url] == 1.0, 30, "the thawed backend up")
    finally:
        victim.proc.send_signal(signal.SIGCONT)
        stop_process(collector)


def test_a_slow_backend_whose_health_answers_is_never_cut_off(standins, graph):
    slow = standins(1, "--latency-ms", "3000")[0]  # each generation takes 3 s, 15 health checks' worth
    g = graph([VLLM_MODEL, WEATHER], env=weather_env([slow]), args=FAST_CHECKS)
    url = g.url("policy_model") + "/v1/chat/completions"
    t0 = time.monotonic()
    status, body = http_json(url, {"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert status == 200 and body["choices"][0]["message"]["content"], body
    assert time.monotonic() - t0 >= 3.0
    assert backend_series(g, "ng_model_backend_up") == {slow.url: 1.0}
    assert backend_series(g, "ng_model_backend_failovers_total") == {slow.url: 0.0}
    assert backend_series(g, "ng_model_backend_requests_total") == {slow.url: 1.0}
