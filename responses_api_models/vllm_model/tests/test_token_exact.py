"""Token-exact mode (vllm_model_for_training.yaml) and weight syncs, against vLLM stand-ins that serve
vLLM 0.32's render/generate/derender and pause API: a real graph (ng_run), real sockets."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

import yaml

from nemo_gym_cli.testing.harness import (VLLM_MODEL, WEATHER, free_port, http_get, http_json, run_cli, wait_until,
                                          weather_env)
from responses_api_models.vllm_model.token_exact import last_model_turn, splice

TRAINING = "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml"
AGENT = "simple_weather_simple_agent"
TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
TIMEOUT_S = "++policy_model.responses_api_models.vllm_model.timeout_s"
LONG_TURN = {"input": "Tell me about the weather in a long sentence please", "max_output_tokens": 64}
ROW = {"responses_create_params": {
    "input": [{"role": "user", "content": "What is the weather in Paris?"}],
    "tools": [{"type": "function", "name": "get_weather", "description": "weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]}}


def model_turn_ends(output: list[dict]) -> list[dict]:
    """The last output item of every model turn (the one carrying the token fields)."""
    return [item for item in output if "generation_token_ids" in item]


def test_splice_keeps_the_exact_ids_and_takes_the_rendered_tail_after_the_end_of_turn_token():
    EOT, NL, START, ASSISTANT = 9, 1, 8, 7
    prev_prompt = [5, 6, EOT, NL, START, ASSISTANT, NL]
    prev_generation = [40, 41, 42, EOT]  # what the model made; the template re-renders it as 40 1 41 42
    rendered = prev_prompt + [40, NL, 41, 42, EOT, NL, START, 3, 30, EOT, NL, START, ASSISTANT, NL]
    ids, why = splice(prev_prompt, prev_generation, rendered)
    assert why is None
    assert ids == prev_prompt + prev_generation + [NL, START, 3, 30, EOT, NL, START, ASSISTANT, NL]
    edited = [5, 66, EOT] + rendered[3:]
    assert splice(prev_prompt, prev_generation, edited)[0] is None
    assert "renders to other tokens" in splice(prev_prompt, prev_generation, edited)[1]
    cut_short = prev_generation[:-1]  # max_output_tokens: no end-of-turn token at the end
    assert "end-of-turn" in splice(prev_prompt, cut_short, rendered)[1]

    # A template that rewrites an earlier model turn (here: drops its reasoning, 50 51) is no
    # fallback: model turns keep the ids the model made; only the other turns are compared.
    THINK = [50, 51]
    prev_prompt2 = [5, 6, EOT, NL, START, ASSISTANT, NL, *THINK, 40, EOT, NL, START, 3, 30, EOT, NL, START, ASSISTANT, NL]
    rendered2 = [5, 6, EOT, NL, START, ASSISTANT, NL, 40, EOT, NL, START, 3, 30, EOT, NL, START, ASSISTANT, NL, 44, EOT,
                 NL, START, 3, 31, EOT, NL, START, ASSISTANT, NL]
    ids, why = splice(prev_prompt2, [44, EOT], rendered2)
    assert why is None and ids == prev_prompt2 + [44, EOT, NL, START, 3, 31, EOT, NL, START, ASSISTANT, NL]


def test_a_model_turn_without_ids_is_a_fallback_but_a_few_shot_prompt_is_not():
    ids = {"prompt_token_ids": [1, 2], "generation_token_ids": [3, 9]}
    user, tool = {"role": "user", "content": "q"}, {"role": "tool", "content": "out"}
    model, bare = {"role": "assistant", "content": "a", **ids}, {"role": "assistant", "content": "a"}
    assert last_model_turn([user]) == (None, None, None)  # a first turn
    assert last_model_turn([user, model, tool]) == ([1, 2], [3, 9], None)
    # few-shot examples (id-less model messages before the last user message) are part of the prompt
    assert last_model_turn([user, bare, user]) == (None, None, None)
    assert last_model_turn([bare, user]) == (None, None, None)
    # this episode's model turn (after the last user message, or after a turn with ids) lost its ids
    for history in ([user, bare, tool], [bare, tool], [user, model, tool, user, bare, user],
                    [user, {**model, "generation_token_ids": []}, tool]):
        prompt, generation, why = last_model_turn(history)
        assert (prompt, generation) == (None, None) and "dropped or changed" in why, history


def test_a_training_rollout_is_token_exact_over_every_turn(graph, standins, tmp_path):
    backend = standins(1, "--tool-call-turns", "2")[0]
    g = graph([TRAINING, WEATHER], env=weather_env([backend]))
    status, result = http_json(g.url(AGENT) + "/run", ROW, timeout=30)
    assert status == 200 and result["reward"] == 1.0, result
    turns = model_turn_ends(result["response"]["output"])
    assert len(turns) == 3  # two tool calls, then the answer
    for earlier, later in zip(turns, turns[1:]):
        history = earlier["prompt_token_ids"] + earlier["generation_token_ids"]
        assert later["prompt_token_ids"][:len(history)] == history
        assert len(later["prompt_token_ids"]) > len(history)
    for turn in turns:
        assert turn["token_exact"] is True and "token_exact_reason" not in turn
        assert len(turn["generation_log_probs"]) == len(turn["generation_token_ids"])
        assert turn["weight_versions"] == [{"version": "default", "start": 0, "end": len(turn["generation_token_ids"])}]
    stats = backend.stats()
    # 3 turns of render -> generate -> derender, plus ng_run's preflight probe of render and generate
    assert stats["chat"] == 0 and stats["render"] == stats["generate"] == 4 and stats["derender"] == 3, stats

    # A history edited before the last model turn cannot be spliced: rendered afresh, and it says so.
    replay = json.loads(json.dumps(ROW["responses_create_params"]))
    replay["input"] = [{"role": "user", "content": "What is the weather in Rome?"}] + result["response"]["output"][:2]
    status, response = http_json(g.url("policy_model") + "/v1/responses", replay, timeout=30)
    assert status == 200, response
    last = response["output"][-1]
    assert last["token_exact"] is False and "history was edited" in last["token_exact_reason"]

    # ng_collect_rollouts counts the token-exact turns (and the fallbacks) in its summary.
    (tmp_path / "rows.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n")
    done = run_cli("ng_collect_rollouts", [f"+agent_name={AGENT}", f"+head_server.port={g.head_port}", "+progress=false",
                                           "+input_jsonl_fpath=rows.jsonl", "+output_jsonl_fpath=out.jsonl"], cwd=g.cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((g.cwd / "out_metrics.json").read_text())
    assert metrics["token_exact_turns"] == 6 and metrics["token_exact_fallbacks"] == 0, metrics
    assert "token-exact turns" in done.stderr


def test_a_backend_without_scale_out_stops_ng_run_naming_it(standins, tmp_path):
    backend = standins(1, "--no-enable-scale-out")[0]
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(weather_env([backend])))
    result = run_cli("ng_run", [f"+config_paths=[{TRAINING},{WEATHER}]", f"+head_server.port={free_port()}"],
                     cwd=tmp_path, timeout=90)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert f"{backend.root}/v1/chat/completions/render is not served" in out and "--enable-scale-out" in out


def in_background(url: str, body: dict, timeout: float = 60) -> tuple[threading.Thread, dict]:
    """POST `body` to `url` in a thread; the dict gets "status" and "body" (and "s", the seconds it took)."""
    answer: dict = {}

    def call():
        t0 = time.monotonic()
        answer.update(zip(("status", "body"), http_json(url, body, timeout=timeout)))
        answer["s"] = time.monotonic() - t0
    thread = threading.Thread(target=call)
    thread.start()
    return thread, answer


def running(*backends) -> bool:
    return sum(b.metric("vllm:num_requests_running") for b in backends) >= 1


def _turn_during_a_pause(g, backend, body: dict, path: str = "/v1/responses") -> tuple[dict, dict]:
    """POST `body` to the adapter's `path`; once the stand-in generates, pause every backend through
    the adapter (mode=abort), check /backends says paused, resume. Returns (response, what changed
    on the stand-in: its stats after minus before)."""
    before = backend.stats()
    thread, answer = in_background(g.url("policy_model") + path, body)
    wait_until(lambda: running(backend), 20, "a generation running", interval=0.02)
    status, paused = http_json(g.url("policy_model") + "/pause?mode=abort", {}, timeout=10)
    assert status == 200 and paused["ok"] and paused["backends"][0]["answer"] == {"status": "paused"}, paused
    status, view = http_json(g.url("policy_model") + "/backends")
    assert view["backends"][0]["paused"] is True and view["backends"][0]["healthy"] is True, view
    wait_until(lambda: backend.stats()["aborted"] > before["aborted"], 10, "the stand-in aborted the generation",
               interval=0.02)
    status, resumed = http_json(g.url("policy_model") + "/resume", {}, timeout=10)
    assert status == 200 and resumed["ok"], resumed
    thread.join(60)
    assert answer.get("status") == 200, answer
    after = backend.stats()
    return answer["body"], {k: after[k] - before[k] for k in ("aborted", "chat", "generate")}


def test_a_weight_sync_abort_never_cuts_a_turn_short_in_either_mode(graph, standins):
    backend = standins(1, "--per-token-ms", "40")[0]
    text_row = LONG_TURN

    g = graph([TRAINING, WEATHER], env=weather_env([backend]))
    whole = http_json(g.url("policy_model") + "/v1/responses", text_row, timeout=60)[1]["output"][-1]
    response, changed = _turn_during_a_pause(g, backend, text_row)
    last = response["output"][-1]
    assert response["status"] == "completed" and last["aborted_generations"] >= 1, last
    assert last["generation_token_ids"] == whole["generation_token_ids"]  # continued from the partial tokens
    assert last["content"] == whole["content"]
    assert changed == {"aborted": 1, "chat": 0, "generate": 2}, changed  # the aborted call, then its continuation
    g.stop()

    g = graph([VLLM_MODEL, WEATHER], env=weather_env([backend]))
    whole = http_json(g.url("policy_model") + "/v1/responses", text_row, timeout=60)[1]["output"][-1]
    response, changed = _turn_during_a_pause(g, backend, text_row)
    assert response["status"] == "completed" and response["output"][-1]["content"] == whole["content"]
    assert changed == {"aborted": 1, "chat": 2, "generate": 0}, changed  # text mode: aborted, then run again

    # The plain Chat Completions pass-through: an aborted call is no answer either; it runs again.
    chat = {"messages": [{"role": "user", "content": text_row["input"]}], "max_tokens": 64}
    status, reference = http_json(g.url("policy_model") + "/v1/chat/completions", chat, timeout=60)
    assert status == 200 and reference["choices"][0]["finish_reason"] == "stop", reference
    answer, changed = _turn_during_a_pause(g, backend, chat, path="/v1/chat/completions")
    assert answer["choices"][0]["finish_reason"] == "stop", answer
    assert answer["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
    assert changed == {"aborted": 1, "chat": 2, "generate": 0}, changed


def without_token_fields(items: list[dict]) -> list[dict]:
    return [{k: v for k, v in item.items() if k not in TOKEN_FIELDS} for item in items]


def test_fallbacks_are_marked_on_the_turn_and_counted_by_ng_collect_rollouts(graph, standins, tmp_path):
    backend = standins(1, "--tool-call-turns", "2")[0]
    g = graph([TRAINING, WEATHER], env=weather_env([backend]))
    status, result = http_json(g.url(AGENT) + "/run", ROW, timeout=30)
    assert status == 200, result
    output, params = result["response"]["output"], ROW["responses_create_params"]
    adapter = g.url("policy_model") + "/v1/responses"

    # The caller dropped the token fields of the model's turn: that turn cannot be extended, and it says so.
    stripped = {**params, "input": params["input"] + without_token_fields(output[:2])}
    status, response = http_json(adapter, stripped, timeout=30)
    assert status == 200, response
    last = response["output"][-1]
    assert last["token_exact"] is False and "dropped" in last["token_exact_reason"], last
    # A few-shot example (a model message without ids before the question) is part of the prompt.
    few_shot = {**params, "input": [{"role": "user", "content": "What is the weather in Oslo?"},
                                    {"role": "assistant", "content": "Cold and clear."}, *params["input"]]}
    status, response = http_json(adapter, few_shot, timeout=30)
    assert status == 200 and response["output"][-1]["token_exact"] is True, response

    # A row whose history was edited (another question before the model's turn), collected for real:
    # its first turn is rendered afresh and counted, its second extends that one exactly.
    edited = {"responses_create_params": {**params, "input": [{"role": "user", "content": "What is the weather in Rome?"},
                                                              *output[:2]]}}
    (tmp_path / "rows.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(edited) + "\n")
    done = run_cli("ng_collect_rollouts", [f"+agent_name={AGENT}", f"+head_server.port={g.head_port}", "+progress=false",
                                           "+input_jsonl_fpath=rows.jsonl", "+output_jsonl_fpath=out.jsonl"], cwd=g.cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["_ng_task_index"]: r for r in map(json.loads, (g.cwd / "out.jsonl").read_text().splitlines())}
    turns = model_turn_ends(rows[1]["response"]["output"])
    assert [t["token_exact"] for t in turns] == [False, True], turns
    assert "history was edited" in turns[0]["token_exact_reason"]
    metrics = json.loads((g.cwd / "out_metrics.json").read_text())
    assert metrics["token_exact_turns"] == 3 + 1 and metrics["token_exact_fallbacks"] == 1, metrics
    assert re.search(r"token-exact turns\s*│\s*4 \(1 not exact\)", done.stderr), done.stderr


def test_one_pause_through_the_adapter_reaches_every_backend(graph, standins):
    a, b = standins(2, "--per-token-ms", "40")
    g = graph([VLLM_MODEL, WEATHER], env=weather_env([a, b]))
    adapter = g.url("policy_model")
    status, body = http_json(adapter + "/pause?mode=soon", {})
    assert status == 400 and "mode must be one of abort, wait, keep" in body["error"]["message"], body
    assert a.stats()["pause"] == b.stats()["pause"] == 0  # nothing was forwarded

    t0 = time.monotonic()
    status, reference = http_json(adapter + "/v1/responses", LONG_TURN, timeout=60)
    uninterrupted_s = time.monotonic() - t0
    assert status == 200, reference
    thread, answer = in_background(adapter + "/v1/responses", LONG_TURN)
    wait_until(lambda: running(a, b), 20, "a generation running", interval=0.02)
    status, paused = http_json(adapter + "/pause?mode=keep", {}, timeout=10)
    assert status == 200 and paused["ok"] and paused["mode"] == "keep", paused
    assert [(e["url"], e["status"], e["answer"]) for e in paused["backends"]] == [
        (a.url, 200, {"status": "paused"}), (b.url, 200, {"status": "paused"})], paused
    for backend in (a, b):
        assert json.loads(http_get(backend.root + "/is_paused")) == {"is_paused": True}
    view = http_json(adapter + "/backends")[1]["backends"]
    assert [(v["paused"], v["healthy"]) for v in view] == [(True, True), (True, True)], view
    # mode=keep: the request in flight waits (longer than it takes uninterrupted), nothing is aborted
    thread.join(2 * uninterrupted_s + 1)
    assert thread.is_alive() and a.stats()["aborted"] == b.stats()["aborted"] == 0
    status, resumed = http_json(adapter + "/resume", {}, timeout=10)
    assert status == 200 and resumed["ok"] and [e["answer"] for e in resumed["backends"]] == [{"status": "resumed"}] * 2
    thread.join(30)
    assert answer.get("status") == 200, answer
    assert answer["body"]["output"][-1]["content"] == reference["output"][-1]["content"]
    assert a.stats()["chat"] + b.stats()["chat"] == 2  # the reference and this one: never run again
    g.stop()

    # One backend without the pause API (no VLLM_SERVER_DEV_MODE) and one dead: answered per backend, not 200.
    no_dev, = standins(1, "--no-dev-mode")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    g = graph([VLLM_MODEL, WEATHER], env={**weather_env([a]), "policy_base_url": f"{a.url},{no_dev.url},{dead}"})
    status, body = http_json(g.url("policy_model") + "/pause?mode=abort", {}, timeout=30)
    assert status == 502 and body["error"]["type"] == "upstream_error", body
    by_url = {e["url"]: e for e in body["error"]["backends"]}
    assert by_url[a.url]["ok"] and by_url[a.url]["answer"] == {"status": "paused"}
    assert by_url[no_dev.url]["status"] == 404 and "VLLM_SERVER_DEV_MODE=1" in by_url[no_dev.url]["error"]
    assert by_url[dead]["status"] is None and by_url[dead]["error"]
    assert no_dev.url in body["error"]["message"] and dead in body["error"]["message"]
    status, body = http_json(g.url("policy_model") + "/resume", {}, timeout=30)
    assert status == 502 and {e["url"]: e["ok"] for e in body["error"]["backends"]} == {a.url: True, no_dev.url: False,
                                                                                       dead: False}
    assert json.loads(http_get(a.root + "/is_paused")) == {"is_paused": False}


def test_weight_versions_show_each_span_of_a_turn_that_a_weight_update_split(graph, standins):
    backend, = standins(1, "--per-token-ms", "40")
    g = graph([TRAINING, WEATHER], env=weather_env([backend]))
    adapter = g.url("policy_model")
    whole = http_json(adapter + "/v1/responses", LONG_TURN, timeout=60)[1]["output"][-1]["generation_token_ids"]
    n = len(whole)

    def update_during(mode: str, version: str) -> dict:
        """A turn in flight; pause (mode), a trainer's new weights (`version`), resume: the turn's last item."""
        thread, answer = in_background(adapter + "/v1/responses", LONG_TURN)
        wait_until(lambda: running(backend), 20, "a generation running", interval=0.02)
        time.sleep(0.2)  # a few tokens (40 ms each) under the old weights
        assert http_json(adapter + f"/pause?mode={mode}", {}, timeout=10)[0] == 200
        status, updated = http_json(backend.root + "/update_weight_version", {"new_version": version})
        assert status == 200 and updated == {"success": True, "new_version": version}, updated
        assert json.loads(http_get(backend.root + "/weight_info")) == {"weight_version": version}
        assert http_json(adapter + "/resume", {}, timeout=10)[0] == 200
        thread.join(60)
        assert answer.get("status") == 200, answer
        return answer["body"]["output"][-1]

    # abort: the partial generation (old weights) is continued under the new ones, in a second generate call
    last = update_during("abort", "step-1")
    spans = last["weight_versions"]
    assert last["generation_token_ids"] == whole and last["aborted_generations"] == 1
    assert [s["version"] for s in spans] == ["default", "step-1"], spans
    k = spans[0]["end"]
    assert 0 < k < n and spans == [{"version": "default", "start": 0, "end": k}, {"version": "step-1", "start": k, "end": n}]
    # keep: one generate call, frozen in the middle; vLLM itself reports both spans
    last = update_during("keep", "step-2")
    spans = last["weight_versions"]
    assert last["generation_token_ids"] == whole and "aborted_generations" not in last
    k = spans[0]["end"]
    assert 0 < k < n and spans == [{"version": "step-1", "start": 0, "end": k}, {"version": "step-2", "start": k, "end": n}]


def test_a_pause_that_never_ends_fails_the_turn_in_time_and_a_backend_that_cannot_say_is_retried(graph, standins):
    backend, = standins(1, "--per-token-ms", "40")
    g = graph([TRAINING, WEATHER], env=weather_env([backend]), args=[f"{TIMEOUT_S}=3"])
    thread, answer = in_background(g.url("policy_model") + "/v1/responses", LONG_TURN)
    wait_until(lambda: running(backend), 20, "a generation running", interval=0.02)
    assert http_json(g.url("policy_model") + "/pause?mode=abort", {}, timeout=10)[0] == 200
    thread.join(20)
    assert answer.get("status") == 503 and answer["body"]["error"]["type"] == "upstream_paused", answer
    assert "did not serve again within the request timeout" in answer["body"]["error"]["message"]
    assert 2.5 <= answer["s"] < 5, answer["s"]  # timeout_s=3 from the turn's start
    assert backend.stats()["is_paused"] >= 2  # it asked, and kept asking while paused
    g.stop()

    # Without /is_paused (no dev mode) the adapter cannot ask: it waits a backoff step and sends the turn
    # again; the paused engine holds that request until it is resumed.
    blind, = standins(1, "--per-token-ms", "40", "--no-dev-mode")
    g = graph([VLLM_MODEL, WEATHER], env=weather_env([blind]))
    reference = http_json(g.url("policy_model") + "/v1/responses", LONG_TURN, timeout=60)[1]
    thread, answer = in_background(g.url("policy_model") + "/v1/responses", LONG_TURN)
    wait_until(lambda: running(blind), 20, "a generation running", interval=0.02)
    assert http_json(blind.root + "/is_paused")[0] == 404
    assert http_json(blind.root + "/standin/pause?mode=abort", {})[0] == 200  # paused by someone the adapter cannot ask
    wait_until(lambda: blind.stats()["chat"] == 3, 10, "the turn sent again after the abort", interval=0.02)
    assert blind.stats()["aborted"] == 1 and thread.is_alive()
    assert http_json(blind.root + "/standin/resume", {})[0] == 200
    thread.join(30)
    assert answer.get("status") == 200 and answer["body"]["output"][-1]["content"] == reference["output"][-1]["content"]
    assert blind.stats()["chat"] == 3  # reference, aborted, sent again: nothing more


def test_a_paused_backend_that_stops_answering_its_probes_still_ends_the_turn_at_its_deadline(graph, standins):
    """A /is_paused probe that times out (a loaded or frozen server) is no answer that it serves
    again: the adapter keeps waiting, within the turn's timeout, instead of sending the turn into
    the paused engine (where it would wait past the deadline)."""
    backend, = standins(1, "--per-token-ms", "40")
    g = graph([TRAINING, WEATHER], env=weather_env([backend]), args=[f"{TIMEOUT_S}=3"])
    generated = backend.stats()["generate"]  # ng_run's preflight generated once
    thread, answer = in_background(g.url("policy_model") + "/v1/responses", LONG_TURN)
    wait_until(lambda: running(backend), 20, "a generation running", interval=0.02)
    assert http_json(g.url("policy_model") + "/pause?mode=abort", {}, timeout=10)[0] == 200
    # The adapter has the aborted generation back once it asks whether the backend serves again
    # (the pause's answer can come before the aborted generate's).
    wait_until(lambda: backend.stats()["is_paused"] >= 1, 10, "the adapter asking /is_paused", interval=0.01)
    backend.proc.send_signal(signal.SIGSTOP)  # paused, then frozen: every probe times out
    try:
        thread.join(20)
    finally:
        backend.proc.send_signal(signal.SIGCONT)
    assert answer.get("status") == 503 and answer["body"]["error"]["type"] == "upstream_paused", answer
    assert 2.5 <= answer["s"] < 5, answer["s"]  # timeout_s=3 from the turn's start
    assert backend.stats()["generate"] == generated + 1  # never sent again into the paused engine


def test_a_backend_frozen_mid_generation_ends_the_turn_at_its_deadline(graph, standins):
    """The only backend freezes under a generation: the call times out at the turn's deadline, the
    backend is marked down, and the wait for a healthy one ends at that deadline too (not
    wait_for_backend_s, 30 s, later)."""
    backend, = standins(1, "--per-token-ms", "40")
    g = graph([TRAINING, WEATHER], env=weather_env([backend]), args=[f"{TIMEOUT_S}=3"])
    thread, answer = in_background(g.url("policy_model") + "/v1/responses", LONG_TURN)
    wait_until(lambda: running(backend), 20, "a generation running", interval=0.02)
    backend.proc.send_signal(signal.SIGSTOP)
    try:
        thread.join(20)
    finally:
        backend.proc.send_signal(signal.SIGCONT)
    assert answer.get("status") == 503 and answer["body"]["error"]["type"] == "upstream_unavailable", answer
    assert answer["s"] < 5, answer["s"]  # timeout_s=3 from the turn's start


def run_rollouts(g, n: int, concurrency: int) -> list[tuple[int, dict]]:
    url = g.url(AGENT) + "/run"
    results: list = [None] * n
    with ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(http_json, url, ROW, 60): i for i in range(n)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
    return results


def assert_exact_episodes(results: list[tuple[int, dict]], turns: int) -> None:
    for status, result in results:
        assert status == 200 and result["reward"] == 1.0, result
        ends = model_turn_ends(result["response"]["output"])
        assert len(ends) == turns and all(t["token_exact"] is True for t in ends), ends
        for earlier, later in zip(ends, ends[1:]):
            history = earlier["prompt_token_ids"] + earlier["generation_token_ids"]
            assert later["prompt_token_ids"][:len(history)] == history


def test_every_call_of_a_token_exact_session_goes_to_its_backend_and_a_dead_one_moves_it(graph, standins):
    backends = standins(2, "--tool-call-turns", "2", "--latency-ms", "30")
    g = graph([TRAINING, WEATHER], env=weather_env(backends))
    assert_exact_episodes(run_rollouts(g, 8, 4), turns=3)
    routes: dict[str, list[tuple[int, str]]] = {}
    for i, backend in enumerate(backends):
        for r in backend.requests():
            if r["session"]:
                routes.setdefault(r["session"], []).append((i, r["route"]))
    assert len(routes) == 8
    for session, calls in routes.items():
        assert len({i for i, _ in calls}) == 1, (session, calls)  # one backend for the whole episode
        assert [route for _, route in calls] == ["render", "generate", "derender"] * 3, (session, calls)
    assert {calls[0][0] for calls in routes.values()} == {0, 1}  # both backends took sessions

    # A backend killed in the middle of a run: its sessions move to the other one. The next turns still
    # extend the exact ids (they travel in the history, not in the server); only the prefix cache is lost.
    victim, survivor = backends
    seen_before = set(routes)

    def kill_in_the_middle_of_an_episode() -> None:
        def mid_episode() -> bool:  # turn 1 done on the victim, at least one turn to go (calls 3 to 6 of 9)
            calls = Counter(r["session"] for r in victim.requests() if r["session"] and r["session"] not in seen_before)
            return any(3 <= n <= 6 for n in calls.values())
        wait_until(mid_episode, 30, "a session on the victim in the middle of its episode", interval=0.01)
        victim.proc.send_signal(signal.SIGKILL)

    with ThreadPoolExecutor(1) as pool:
        killer = pool.submit(kill_in_the_middle_of_an_episode)
        results = run_rollouts(g, 16, 4)
        killer.result(30)
    assert victim.proc.wait(5) == -signal.SIGKILL
    assert_exact_episodes(results, turns=3)
    calls = {s: n for s, n in survivor.sessions().items() if s not in seen_before}
    moved = [s for s, n in calls.items() if n < 9]  # part of the episode ran on the victim
    print(f"\nsessions moved by the kill: {len(moved)} of {len(calls)} on the survivor")
    assert moved, calls


def test_sampling_params_reach_generate_as_they_reach_chat_completions(graph, standins):
    backend, = standins(1)
    sampling = {"temperature": 0.3, "top_p": 0.9, "seed": 7, "stop": ["STOP"]}
    expected = {**sampling, "max_tokens": 50}
    for config, route in ((TRAINING, "generate"), (VLLM_MODEL, "chat")):
        g = graph([config, WEATHER], env=weather_env([backend]))
        status, response = http_json(g.url("policy_model") + "/v1/responses",
                                     {"input": "hello", **sampling, "max_output_tokens": 50}, timeout=30)
        assert status == 200, response
        got = [r for r in backend.requests() if r["route"] == route][-1]["sampling_params"]
        assert {k: got.get(k) for k in expected} == expected, (route, got)
        g.stop()
