"""Token-exact mode (vllm_model_for_training.yaml) and weight syncs, against vLLM stand-ins that serve
vLLM 0.32's render/generate/derender and pause API: a real graph (ng_run), real sockets."""

from __future__ import annotations

import json
import threading

import yaml

from nemo_gym_cli.testing.harness import (VLLM_MODEL, WEATHER, free_port, http_json, run_cli, wait_until,
                                          weather_env)
from responses_api_models.vllm_model.token_exact import splice

TRAINING = "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml"
AGENT = "simple_weather_simple_agent"
TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")
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


def _turn_during_a_pause(g, backend, body: dict) -> tuple[dict, dict]:
    """POST `body` to the adapter; once the stand-in generates, pause every backend through the
    adapter (mode=abort), check /backends says paused, resume. Returns (response, pause answer)."""
    answer: dict = {}
    thread = threading.Thread(target=lambda: answer.update(
        zip(("status", "body"), http_json(g.url("policy_model") + "/v1/responses", body, timeout=60))))
    thread.start()
    wait_until(lambda: backend.metric("vllm:num_requests_running") >= 1, 20, "a generation running", interval=0.02)
    status, paused = http_json(g.url("policy_model") + "/pause?mode=abort", {}, timeout=10)
    assert status == 200 and paused["ok"] and paused["backends"][0]["answer"] == {"status": "paused"}, paused
    status, view = http_json(g.url("policy_model") + "/backends")
    assert view["backends"][0]["paused"] is True and view["backends"][0]["healthy"] is True, view
    wait_until(lambda: backend.stats()["aborted"] >= 1, 10, "the stand-in aborted the generation", interval=0.02)
    status, resumed = http_json(g.url("policy_model") + "/resume", {}, timeout=10)
    assert status == 200 and resumed["ok"], resumed
    thread.join(60)
    assert answer.get("status") == 200, answer
    return answer["body"], paused


def test_a_weight_sync_abort_never_cuts_a_turn_short_in_either_mode(graph, standins):
    backend = standins(1, "--per-token-ms", "40")[0]
    text_row = {"input": "Tell me about the weather in a long sentence please", "max_output_tokens": 64}

    g = graph([TRAINING, WEATHER], env=weather_env([backend]))
    whole = http_json(g.url("policy_model") + "/v1/responses", text_row, timeout=60)[1]["output"][-1]
    response, _ = _turn_during_a_pause(g, backend, text_row)
    last = response["output"][-1]
    assert response["status"] == "completed" and last["aborted_generations"] >= 1, last
    assert last["generation_token_ids"] == whole["generation_token_ids"]  # continued from the partial tokens
    assert last["content"] == whole["content"]
    g.stop()

    g = graph([VLLM_MODEL, WEATHER], env=weather_env([backend]))
    whole = http_json(g.url("policy_model") + "/v1/responses", text_row, timeout=60)[1]["output"][-1]
    response, _ = _turn_during_a_pause(g, backend, text_row)
    assert response["status"] == "completed" and response["output"][-1]["content"] == whole["content"]
