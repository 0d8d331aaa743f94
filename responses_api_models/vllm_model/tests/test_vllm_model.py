"""The vllm_model adapter in a running graph: `ng_run` with vllm_model.yaml + simple_weather.yaml
in front of local vLLM stand-ins, called the way users and trainers call it (the OpenAI SDK,
an agent's /run, many rollouts at once)."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nemo_gym_cli.testing.harness import PROJECT_ROOT, VLLM_MODEL, WEATHER, free_port, http_json, wait_until, weather_env

AGENT = "simple_weather_simple_agent"
ROWS = [json.loads(line) for line in (PROJECT_ROOT / "resources_servers/simple_weather/data/example.jsonl").read_text().splitlines()
        if line.strip()]
WEATHER_TOOL = ROWS[0]["responses_create_params"]["tools"][0]
MODEL_KEY = "++policy_model.responses_api_models.vllm_model"


def start(graph, backends, *, config_paths=(VLLM_MODEL, WEATHER), args=(), env_extra=None):
    return graph(list(config_paths), env={**weather_env(backends), **(env_extra or {})}, args=list(args))


def sdk(g) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.url("policy_model") + "/v1", api_key="x", max_retries=0, timeout=30)


def row(i: int = 0, text: str | None = None) -> dict:
    r = json.loads(json.dumps(ROWS[i % len(ROWS)]))
    if text is not None:
        r["responses_create_params"]["input"][-1]["content"] = text
    return r


def run_many(g, rows: list[dict], concurrency: int, on_done=None) -> list[tuple[int, dict]]:
    """POST every row to the agent's /run, `concurrency` at a time; results in row order."""
    url = g.url(AGENT) + "/run"
    results: list = [None] * len(rows)
    with ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(http_json, url, r, 60): i for i, r in enumerate(rows)}
        for n, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if on_done:
                on_done(n)
    return results


def samples(url: str) -> list:
    status, text = http_json(url + "/metrics")
    assert status == 200
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric(url: str, name: str, **labels) -> float:
    return sum(s.value for s in samples(url) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def assert_all_rewarded(results):
    bad = [(status, body) for status, body in results if status != 200 or body.get("reward") != 1.0]
    assert not bad, f"{len(bad)} of {len(results)} rollouts failed, e.g. {bad[0]}"


# ------------------------------------------------------------------ conversion through the adapter


def test_the_openai_sdk_gets_responses_from_the_adapter(graph, standins):
    g = start(graph, standins(1))
    client = sdk(g)

    answer = client.responses.create(model="anything", input="What is the capital of France?")
    assert answer.status == "completed"
    assert answer.model == "standin-model"  # always the configured model
    assert answer.output_text == "The answer is: What is the capital of France?"
    assert [item.type for item in answer.output] == ["message"]

    call = client.responses.create(model="anything", input="Weather in SF?", tools=[WEATHER_TOOL],
                                   instructions="Use tools.", max_output_tokens=200)
    calls = [item for item in call.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "San Francisco"}

    # Feeding the call and its output back gives the final answer.
    final = client.responses.create(model="anything", tools=[WEATHER_TOOL], input=[
        {"role": "user", "content": "Weather in SF?"},
        *[item.model_dump(exclude_none=True) for item in call.output],
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"weather": "cold"}'},
    ])
    assert final.output_text.startswith("Based on the tool result: ")


def test_the_openai_sdk_gets_chat_completions_from_the_adapter(graph, standins):
    g = start(graph, standins(1))
    client = sdk(g)

    chat = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "hi there"}])
    assert chat.model == "standin-model"
    assert chat.choices[0].message.content == "The answer is: hi there"

    tool_chat = client.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "Weather in SF?"}], tool_choice="required",
        tools=[{"type": "function", "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")}}])
    call = tool_chat.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "San Francisco"}


def test_a_run_does_multi_step_tool_calls_and_is_rewarded(graph, standins):
    g = start(graph, standins(1, "--tool-call-turns", "2"))
    status, result = http_json(g.url(AGENT) + "/run", row(0), timeout=30)
    assert status == 200, result
    assert result["reward"] == 1.0

    output = result["response"]["output"]
    kinds = [item["type"] for item in output]
    assert kinds.count("function_call") == 2 and kinds.count("function_call_output") == 2, kinds
    for i, item in enumerate(output):  # every call is answered right after it
        if item["type"] == "function_call":
            answer = next(o for o in output[i + 1:] if o["type"] == "function_call_output")
            assert answer["call_id"] == item["call_id"]
            assert "cold" in answer["output"]
    final = output[-1]
    assert final["type"] == "message" and final["content"][0]["text"].startswith("Based on the tool result")
    assert result["response"]["usage"]["input_tokens"] > 0
    assert result["responses_create_params"] == ROWS[0]["responses_create_params"]  # the row passes through


def test_reasoning_becomes_a_reasoning_item(graph, standins):
    g = start(graph, standins(1, "--reasoning"))
    answer = sdk(g).responses.create(model="anything", input="Think about 2+2")
    assert [item.type for item in answer.output] == ["reasoning", "message"]
    reasoning = answer.output[0]
    texts = [part.text for part in (reasoning.summary or [])] + [part.text for part in (reasoning.content or [])]
    assert any(t.strip() for t in texts), reasoning
    assert "<think>" not in answer.output_text

    status, result = http_json(g.url(AGENT) + "/run", row(1), timeout=30)
    assert status == 200 and result["reward"] == 1.0
    assert "reasoning" in [item["type"] for item in result["response"]["output"]]


def test_token_ids_for_training_match_vllms_tokenizer(graph, standins, tmp_path):
    (tmp_path / "training.yaml").write_text(
        "config_paths:\n  - responses_api_models/vllm_model/configs/vllm_model_for_training.yaml\n")
    backend = standins(1)[0]
    g = start(graph, [backend], config_paths=["training.yaml", WEATHER])

    status, response = http_json(g.url("policy_model") + "/v1/responses", {"input": "hello token world"})
    assert status == 200, response
    last = response["output"][-1]
    for key in ("prompt_token_ids", "generation_token_ids", "generation_log_probs"):
        assert key in last, last
    assert all(k not in item for item in response["output"][:-1] for k in ("prompt_token_ids",))
    _, tokenized = http_json(backend.root + "/tokenize", {"model": "standin-model", "add_generation_prompt": True,
                                                           "messages": [{"role": "user", "content": "hello token world"}]})
    assert last["prompt_token_ids"] == tokenized["tokens"]
    assert len(last["generation_token_ids"]) == len(last["generation_log_probs"]) == response["usage"]["output_tokens"]
    assert all(isinstance(t, int) for t in last["generation_token_ids"])
    assert all(isinstance(p, float) and p <= 0 for p in last["generation_log_probs"])

    # A whole rollout: each turn's last item carries its ids, sent back upstream on the next turn.
    status, result = http_json(g.url(AGENT) + "/run", row(0), timeout=30)
    assert status == 200 and result["reward"] == 1.0, result
    output = result["response"]["output"]
    call = next(item for item in output if item["type"] == "function_call")
    final = output[-1]
    assert call["prompt_token_ids"] and final["prompt_token_ids"]
    assert len(final["prompt_token_ids"]) > len(call["prompt_token_ids"])


# ------------------------------------------------------------------ many vLLM servers


def test_three_backends_keep_every_session_on_one_and_spread_new_ones(graph, standins):
    backends = standins(3)
    g = start(graph, backends)
    results = run_many(g, [row(i) for i in range(24)], concurrency=6)
    assert_all_rewarded(results)

    per_backend = [b.sessions() for b in backends]
    owners: dict[str, list[int]] = {}
    for i, sessions in enumerate(per_backend):
        for sid in sessions:
            owners.setdefault(sid, []).append(i)
    split = {sid: where for sid, where in owners.items() if len(where) > 1}
    assert not split, f"sessions served by more than one backend: {split}"
    assert len(owners) == 24  # one session per rollout
    assert all(count == 2 for sessions in per_backend for count in sessions.values())  # both turns of each
    spread = [len(s) for s in per_backend]
    print(f"\nsessions per backend: {spread}")
    assert all(n >= 3 for n in spread), spread


def test_new_sessions_avoid_a_slow_backend(graph, standins):
    slow = standins(1, "--latency-ms", "150")[0]
    fast = standins(2)
    g = start(graph, [slow, *fast])  # the slow one first: "first in the list" would favour it
    results = run_many(g, [row(i) for i in range(48)], concurrency=8)
    assert_all_rewarded(results)
    counts = [len(b.sessions()) for b in (slow, *fast)]
    print(f"\nsessions: slow={counts[0]} fast={counts[1:]}")
    assert sum(counts) == 48
    assert counts[0] * 2 < min(counts[1:]), counts


def test_a_backend_killed_mid_run_loses_no_rollout(graph, standins):
    backends = standins(3, "--latency-ms", "50")
    victim = backends[1]
    g = start(graph, backends)
    adapter = g.url("policy_model")

    def kill_partway(done: int):
        if done == 12:
            victim.proc.send_signal(signal.SIGKILL)

    results = run_many(g, [row(i) for i in range(60)], concurrency=12, on_done=kill_partway)
    assert victim.proc.wait(5) == -signal.SIGKILL
    assert_all_rewarded(results)

    assert metric(adapter, "ng_model_backend_failovers_total", backend=victim.url) >= 1
    assert metric(adapter, "ng_model_backend_up", backend=victim.url) == 0
    for b in backends:
        if b is not victim:
            assert metric(adapter, "ng_model_backend_up", backend=b.url) == 1


def test_the_session_table_stays_bounded_and_sessions_are_released(graph, standins):
    g = start(graph, standins(1, "--latency-ms", "30"), args=[f"{MODEL_KEY}.max_sessions=5"])
    adapter = g.url("policy_model")
    seen: list[float] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(metric(adapter, "ng_model_sessions"))
            stop.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = run_many(g, [row(i) for i in range(20)], concurrency=10)
    finally:
        stop.set()
        watcher.join()
    assert_all_rewarded(results)
    print(f"\nng_model_sessions while running: max {max(seen)} over {len(seen)} scrapes")
    assert max(seen) <= 5
    assert max(seen) >= 1
    wait_until(lambda: metric(adapter, "ng_model_sessions") == 0, 10, "every session released")


# ------------------------------------------------------------------ errors


def test_a_full_context_ends_the_episode_cleanly(graph, standins):
    g = start(graph, standins(1, "--context-length", "10"))
    response = sdk(g).responses.create(model="anything", input="This question is far longer than ten tokens, surely it is.")
    assert response.status == "incomplete"
    assert response.incomplete_details is not None

    status, result = http_json(g.url(AGENT) + "/run", row(0), timeout=30)
    assert status == 200, result
    assert result["response"]["status"] == "incomplete"
    assert "reward" in result


def test_an_upstream_4xx_reaches_the_caller_with_vllms_message(graph, standins, tmp_path):
    vllm_message = "top_k must be -1 (disable), or at least 1, got 0."
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"match": "trigger a bad request", "status": 400, "message": vllm_message}]))
    g = start(graph, standins(1, "--script", str(rules)))
    client = sdk(g)

    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="anything", input="please trigger a bad request")
    assert info.value.status_code == 400
    assert vllm_message in str(info.value)

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "trigger a bad request"}])
    assert vllm_message in str(info.value)

    status, body = http_json(g.url(AGENT) + "/run", row(0, text="please trigger a bad request"), timeout=30)
    assert status == 400, body
    assert vllm_message in body["error"]["message"]


def test_no_backend_reachable_is_a_503_naming_the_urls(graph, tmp_path):
    dead = [f"http://127.0.0.1:{free_port()}/v1", f"http://127.0.0.1:{free_port()}/v1"]
    g = graph([VLLM_MODEL, WEATHER], env={"policy_base_url": ",".join(dead), "policy_api_key": "EMPTY",
                                         "policy_model_name": "standin-model"},
              args=[f"{MODEL_KEY}.wait_for_backend_s=1", "+preflight=false"])  # ng_run would stop: no backend

    t0 = time.monotonic()
    status, body = http_json(g.url("policy_model") + "/v1/responses", {"input": "anyone there?"}, timeout=30)
    elapsed = time.monotonic() - t0
    assert status == 503, body
    assert all(url in body["error"]["message"] for url in dead), body
    # The configured 1 s wait was applied, not the default 30 s; generous for a loaded machine.
    assert elapsed < 20, f"took {elapsed:.1f} s with wait_for_backend_s=1"

    status, body = http_json(g.url(AGENT) + "/run", row(0), timeout=60)
    assert status == 503, body
    assert dead[0] in body["error"]["message"]
