"""simple_agent episodes against a scripted vLLM stand-in, through a real ng_run graph."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import VLLM_MODEL, WEATHER, http_json, wait_until, weather_env

AGENT_CFG = "simple_weather_simple_agent.responses_api_agents.simple_agent"
TOOLS = [{"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]

SCRIPT = [
    # second turns: the model read the tool output and answers
    {"match": "not valid JSON", "content": "Sorry, my arguments were broken."},
    {"match": "unknown tool", "content": "Sorry, that tool does not exist."},
    {"match": "missing required field", "content": "Sorry, I forgot the city."},
    # first turns
    {"match": "BADJSON", "tool_call": {"name": "get_weather", "arguments": "{\"city\": Paris"}},
    {"match": "NOSUCHTOOL", "tool_call": {"name": "get_stock_price", "arguments": "{}"}},
    {"match": "NOCITY", "tool_call": {"name": "get_weather", "arguments": "{}"}},
    {"match": "THINKFOREVER", "content": "", "reasoning": "Let me think about it some more."},
]


def ask(text: str) -> dict:
    return {"input": [{"role": "user", "content": text}], "tools": TOOLS}


@pytest.fixture
def scripted(standins, graph, tmp_path, mode):
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))

    def start(*args: str, configs=(VLLM_MODEL, WEATHER)):
        backend = standins(1, "--script", str(script))[0]
        g = graph(list(configs), env=weather_env([backend]), args=list(args), colocate=(mode == "colocated"))
        return g, backend
    return start


def output_types(response: dict) -> list[str]:
    return [item["type"] for item in response["output"]]


def test_an_episode_calls_the_tool_and_answers(scripted):
    g, backend = scripted()
    status, response = http_json(g.url("simple_weather_simple_agent") + "/v1/responses", ask("Weather in Paris?"),
                                 headers={"X-Session-ID": "episode-1"})
    assert status == 200, response
    assert output_types(response) == ["function_call", "function_call_output", "message"]
    call, result, answer = response["output"]
    assert result["call_id"] == call["call_id"]
    assert json.loads(result["output"]) == {"city": "San Francisco", "weather_description": "The weather in San Francisco is cold."}
    assert answer["content"][0]["text"].startswith("Based on the tool result")
    assert backend.sessions() == {"episode-1": 2}  # both turns, one session, forwarded upstream
    # usage is summed over the two turns
    assert response["usage"]["input_tokens"] > 0 and response["usage"]["total_tokens"] == \
        response["usage"]["input_tokens"] + response["usage"]["output_tokens"]


@pytest.mark.parametrize("trigger, tool_output, answer", [
    ("BADJSON", "are not valid JSON", "arguments were broken"),
    ("NOSUCHTOOL", "unknown tool 'get_stock_price'", "does not exist"),
    ("NOCITY", "missing required field 'city'", "forgot the city"),
])
def test_a_bad_tool_call_becomes_an_error_the_model_reads(scripted, trigger, tool_output, answer):
    g, _ = scripted()
    status, response = http_json(g.url("simple_weather_simple_agent") + "/v1/responses", ask(f"{trigger} please"))
    assert status == 200, response
    assert output_types(response)[-2:] == ["function_call_output", "message"]
    assert tool_output in response["output"][-2]["output"]
    assert answer in response["output"][-1]["content"][0]["text"]


def test_max_steps_stops_an_episode_that_keeps_calling_tools(standins, graph, mode):
    backend = standins(1, "--tool-call-turns", "10")[0]
    g = graph([VLLM_MODEL, WEATHER], env=weather_env([backend]), args=[f"++{AGENT_CFG}.max_steps=3"], colocate=(mode == "colocated"))
    status, response = http_json(g.url("simple_weather_simple_agent") + "/v1/responses", {**ask("hi"), "tool_choice": "auto"},
                                 headers={"X-Session-ID": "long"})
    assert status == 200
    assert output_types(response).count("function_call") == 3
    assert backend.sessions() == {"long": 3}


def test_an_episode_that_only_reasons_stops_at_the_hard_cap(scripted):
    g, backend = scripted(f"++{AGENT_CFG}.hard_step_cap=4")
    status, response = http_json(g.url("simple_weather_simple_agent") + "/v1/responses", ask("THINKFOREVER"),
                                 headers={"X-Session-ID": "thinker"})
    assert status == 200
    assert output_types(response).count("reasoning") == 4
    assert backend.sessions() == {"thinker": 4}


def test_run_seeds_runs_verifies_and_releases_the_session(standins, graph, tmp_path, mode):
    shutil.copytree(Path(__file__).parent / "fixtures/agent_env/resources_servers", tmp_path / "resources_servers")
    backends = standins(2)
    g = graph([VLLM_MODEL, "resources_servers/recording_env/configs/recording_env.yaml"], env=weather_env(backends),
              colocate=(mode == "colocated"))
    row = {"responses_create_params": ask("Weather in Oslo?"), "extra_key": "kept", "_ng_task_index": 3}
    for _ in range(4):
        status, result = http_json(g.url("recording_agent") + "/run", row)
        assert status == 200, result
        assert result["reward"] == 0.5
        assert result["extra_key"] == "kept" and result["verify_saw_extra"] == "kept"
        assert result["seed_saw"]["extra_key"] == "kept"  # the whole row reached /seed_session
        assert output_types(result["response"]) == ["function_call", "function_call_output", "message"]
        assert json.loads(result["response"]["output"][1]["output"])["seeded"] is True  # same session for the tool
    # every rollout was one session on one backend; all four are repeats of one prompt (task 3)
    sessions = {**backends[0].sessions(), **backends[1].sessions()}
    assert len(sessions) == 4 and set(sessions.values()) == {2}
    assert not (set(backends[0].sessions()) & set(backends[1].sessions()))
    # at the end of each rollout the agent released the model session (in a batch, shortly after)
    wait_until(lambda: "ng_model_sessions 0.0" in http_json(g.url("policy_model") + "/metrics")[1], 5, "sessions released")


def test_run_rejects_a_row_without_params(scripted):
    g, _ = scripted()
    status, body = http_json(g.url("simple_weather_simple_agent") + "/run", {"input": "hi"})
    assert status == 400
    assert "responses_create_params" in body["error"]["message"]


def test_reset_tool_choice_turns_a_forced_first_call_into_one_call(standins, graph):
    backend = standins(1)[0]
    g = graph([VLLM_MODEL, WEATHER], env=weather_env([backend]), args=[f"++{AGENT_CFG}.reset_tool_choice=true"])
    status, response = http_json(g.url("simple_weather_simple_agent") + "/v1/responses", {**ask("hi"), "tool_choice": "required"})
    assert status == 200, response
    assert output_types(response) == ["function_call", "function_call_output", "message"]


@pytest.mark.parametrize("index", ["7\r\nX-Session-ID: injected-by-row", "7\nX-Session-ID: injected-by-row", "7\x00"])
def test_a_row_cannot_put_headers_on_the_model_request(scripted, index):
    g, backend = scripted()
    row = {"responses_create_params": ask("Weather in Paris?"), "_ng_task_index": index}
    status, error = http_json(g.url("simple_weather_simple_agent") + "/run", row)
    assert status == 400, error
    assert "'_ng_task_index'" in error["error"]["message"] and "CR, LF or NUL" in error["error"]["message"]
    assert "injected-by-row" not in backend.sessions()
    assert backend.stats()["requests"] == 0  # refused before the episode started
