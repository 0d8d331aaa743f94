"""openai_model: the policy behind an OpenAI-compatible /responses endpoint (here a stand-in's),
and the guide's promise that switching OpenAI <-> vLLM is changing one config path."""

from __future__ import annotations

import json

import openai

from nemo_gym_cli.testing.harness import PROJECT_ROOT, VLLM_MODEL, WEATHER, http_json, weather_env

OPENAI_MODEL = "responses_api_models/openai_model/configs/openai_model.yaml"
AGENT = "simple_weather_simple_agent"
ROW = json.loads((PROJECT_ROOT / "resources_servers/simple_weather/data/example.jsonl").read_text().splitlines()[0])


def sdk(g) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.url("policy_model") + "/v1", api_key="x", max_retries=0, timeout=30)


def test_the_sdk_talks_to_openai_model_and_a_run_completes(graph, standins):
    backend = standins(1)[0]
    g = graph([OPENAI_MODEL, WEATHER], env=weather_env([backend]))
    servers = {s["name"]: s for s in g.servers()}
    assert servers["policy_model"]["impl"] == "openai_model"

    answer = sdk(g).responses.create(model="anything", input="What is the capital of France?")
    assert answer.status == "completed"
    assert answer.output_text == "The answer is: What is the capital of France?"
    assert backend.stats()["responses"] == 1  # it went to the upstream's /v1/responses, unconverted
    assert backend.stats()["chat"] == 0

    chat = sdk(g).chat.completions.create(model="anything", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "The answer is: hi"

    status, result = http_json(g.url(AGENT) + "/run", ROW, timeout=30)
    assert status == 200, result
    assert result["reward"] == 1.0
    kinds = [item["type"] for item in result["response"]["output"]]
    assert "function_call" in kinds and "function_call_output" in kinds and kinds[-1] == "message", kinds


def test_switching_between_openai_and_vllm_is_one_config_path(graph, standins, tmp_path):
    backend = standins(1)[0]
    env = weather_env([backend])  # the same env.yaml for both
    results = {}
    for model_config in (OPENAI_MODEL, VLLM_MODEL):
        g = graph([model_config, WEATHER], env=env)
        status, result = http_json(g.url(AGENT) + "/run", ROW, timeout=30)
        assert status == 200, (model_config, result)
        results[model_config] = result
        g.stop()

    before, after = results[OPENAI_MODEL], results[VLLM_MODEL]
    assert before["reward"] == after["reward"] == 1.0
    shape = lambda r: [(i["type"], i.get("name")) for i in r["response"]["output"] if i["type"] != "reasoning"]  # noqa: E731
    # Both reach the same tool call and the same final answer; only the model transport differs.
    assert [k for k in shape(before) if k[0] != "message"] == [k for k in shape(after) if k[0] != "message"]
    final = lambda r: r["response"]["output"][-1]["content"][0]["text"]  # noqa: E731
    assert final(before) == final(after)
    assert backend.stats()["responses"] >= 2 and backend.stats()["chat"] >= 2
