"""Preflight at ng_run: every model backend is checked before "servers ready" (model served,
reachable, prefix caching on); a mistake stops ng_run with exit 2 naming the URL."""

from __future__ import annotations

import json

import yaml

from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, free_port, http_json, run_cli, weather_env

OPENAI_MODEL = "responses_api_models/openai_model/configs/openai_model.yaml"
AGENT = "+agent_name=simple_weather_simple_agent"


def ng_run_fails(tmp_path, env: dict, config_paths=(VLLM_MODEL, WEATHER), args=()):
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(env))
    return run_cli("ng_run", [f"+config_paths=[{','.join(config_paths)}]", f"+head_server.port={free_port()}", *args],
                   cwd=tmp_path, timeout=90)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def test_a_model_name_the_backend_does_not_serve_stops_ng_run_naming_what_it_serves(standins, tmp_path, mode):
    ok, wrong = standins(1), standins(1, "--model", "other-a")
    env = {**weather_env(ok + wrong)}
    result = ng_run_fails(tmp_path, env, args=["+colocate=true"] if mode == "colocated" else [])
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert f"{wrong[0].url} serves ['other-a']; the config asks for standin-model" in out
    assert ok[0].url + " serves" not in out  # only the wrong one is named
    assert "servers ready" not in out and "Traceback" not in out


def test_all_backends_dead_is_an_error(tmp_path):
    dead = [dead_url(), dead_url()]
    result = ng_run_fails(tmp_path, {"policy_base_url": ",".join(dead), "policy_api_key": "EMPTY",
                                     "policy_model_name": "standin-model"})
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "no backend answers" in out and all(url in out for url in dead), out


def test_one_dead_backend_of_three_is_a_warning_and_rollouts_complete(standins, graph, tmp_path):
    live = standins(2)
    dead = dead_url()
    env = {**weather_env(live), "policy_base_url": ",".join([live[0].url, dead, live[1].url])}
    g = graph([VLLM_MODEL, WEATHER], env=env)
    out = g.output()
    assert f"warning: policy_model: {dead} is unreachable" in out, out
    assert "Model backends" in out  # the table of backends with their state
    view = http_json(g.url("policy_model") + "/backends")[1]
    states = {b["url"]: b["healthy"] for b in view["backends"]}
    assert states == {live[0].url: True, dead: False, live[1].url: True}
    assert "preflight" in next(b["down_reason"] for b in view["backends"] if b["url"] == dead)

    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"responses_create_params": {"input": f"weather in city {i}?"}}) + "\n" for i in range(20)))
    done = run_cli("ng_collect_rollouts", [AGENT, f"+head_server.port={g.head_port}", "+progress=false",
                                           "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+concurrency=8"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 20
    assert live[0].stats()["chat"] > 0 and live[1].stats()["chat"] > 0


def test_prefix_caching_off_is_a_warning_and_max_model_len_is_noted(standins, graph):
    on, off = standins(1, "--context-length", "4096"), standins(1, "--no-enable-prefix-caching")
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(on + off))
    out = g.output()
    assert f"warning: policy_model: {off[0].url}: prefix caching is off" in out, out
    assert f"{on[0].url}: prefix caching" not in out
    assert "4096" in out  # max_model_len in the backends table


def test_preflight_false_skips_the_checks(standins, graph):
    wrong = standins(1, "--model", "other-a")
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(wrong), args=["+preflight=false"])
    assert "serves" not in g.output() and "Model backends" not in g.output()
    assert g.proc.poll() is None


def test_openai_model_gets_only_the_reachability_and_model_checks(standins, graph, tmp_path):
    no_caching = standins(1, "--no-enable-prefix-caching")
    g = graph([OPENAI_MODEL, WEATHER], env=weather_env(no_caching))
    assert "prefix caching is" not in g.output()  # not a vLLM: no /metrics read, no warning
    view = http_json(g.url("policy_model") + "/backends")[1]
    assert view["backends"][0]["vllm"]["running"] is None
    g.stop()

    result = ng_run_fails(tmp_path, {**weather_env(no_caching), "policy_model_name": "gpt-x"}, config_paths=(OPENAI_MODEL, WEATHER))
    assert result.returncode == 2 and "serves ['standin-model']; the config asks for gpt-x" in result.stderr, result.stderr
