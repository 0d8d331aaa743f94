"""simple_weather: its tool and /verify over a real socket, its example data, and a whole
collection over that data through ng_run with a local vLLM stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_gym_cli.serving import ServerCallError
from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, WEATHER_AGENT, run_cli, served, weather_env
from resources_servers.simple_weather.app import SimpleWeatherResourcesServer

DATA = Path(__file__).resolve().parents[1] / "data" / "example.jsonl"


async def test_get_weather_answers_for_the_city_asked():
    async with served(SimpleWeatherResourcesServer("simple_weather", {})) as (url, client):
        answer = await client.request_json("POST", url + "/get_weather", {"city": "Paris"})
        assert answer == {"city": "Paris", "weather_description": "The weather in Paris is cold."}
        with pytest.raises(ServerCallError) as info:
            await client.request_json("POST", url + "/get_weather", {"town": "Paris"})
        assert info.value.status == 400 and "'city'" in info.value.message


async def test_verify_rewards_every_episode_and_returns_the_row():
    row = {"responses_create_params": {"input": "hi"}, "response": {"output": []}, "row_id": 3}
    async with served(SimpleWeatherResourcesServer("simple_weather", {})) as (url, client):
        assert await client.request_json("POST", url + "/verify", row) == {**row, "reward": 1.0}


def test_the_example_data_asks_about_weather_with_the_tool():
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    assert len(rows) == 5
    for row in rows:
        params = row["responses_create_params"]
        assert [t["name"] for t in params["tools"]] == ["get_weather"]
        assert params["input"][-1]["role"] == "user"


def test_collecting_the_example_data_calls_the_tool_and_rewards_every_row(standins, graph, tmp_path):
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(standins(1)))
    done = run_cli("ng_collect_rollouts", [f"+agent_name={WEATHER_AGENT}", f"+head_server.port={g.head_port}",
                                           "+progress=false", f"+input_jsonl_fpath={DATA}", "+output_jsonl_fpath=out.jsonl"],
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rollouts = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["_ng_task_index"] for r in rollouts) == [0, 1, 2, 3, 4]
    for r in rollouts:
        assert r["reward"] == 1.0
        calls = [item for item in r["response"]["output"] if item["type"] == "function_call"]
        outputs = [item for item in r["response"]["output"] if item["type"] == "function_call_output"]
        assert [c["name"] for c in calls] == ["get_weather"]
        assert "The weather in" in outputs[0]["output"]
