"""Typed server config: each server kind's dataclass, checked with every problem reported at once."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, run_cli
from nemo_gym_cli.config import ConfigError
from nemo_gym_cli.config.typed import ServerConfig, ServerRef, UrlList, load_config


@dataclass(kw_only=True)
class ExampleConfig(ServerConfig):
    base_url: UrlList
    target: ServerRef
    timeout_s: float = 600
    retries: int = 3
    policy: Literal["a", "b"] = "a"
    extra: dict | None = None


def test_fields_are_converted_and_defaults_filled():
    cfg = load_config(ExampleConfig, {"entrypoint": "app.py", "base_url": " http://a/v1, http://b/v1 ",
                                      "target": {"type": "resources_servers", "name": "env"}, "timeout_s": 5}, "m")
    assert cfg.base_url == ["http://a/v1", "http://b/v1"]
    assert cfg.target == ServerRef(type="resources_servers", name="env")
    assert cfg.timeout_s == 5.0 and isinstance(cfg.timeout_s, float)  # an int is a fine float
    assert (cfg.retries, cfg.policy, cfg.extra) == (3, "a", None)


def test_every_problem_is_reported_at_once_naming_the_key():
    with pytest.raises(ConfigError) as info:
        load_config(ExampleConfig, {"base_url": "", "retries": "3", "policy": "c", "timeout_ss": 1,
                                    "target": {"type": "resources_servers"}}, "policy_model.responses_api_models.x")
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 5, problems
    assert "'policy_model.responses_api_models.x.base_url' must be a URL" in problems
    assert "'policy_model.responses_api_models.x.retries' must be int, got '3'" in problems
    assert "'policy_model.responses_api_models.x.policy' must be 'a' | 'b', got 'c'" in problems
    assert "'policy_model.responses_api_models.x.timeout_ss' is not a field of this server (did you mean 'timeout_s'?)" in problems
    assert "'policy_model.responses_api_models.x.target.name' is required but not set" in problems


def test_keys_of_the_graph_and_unrelated_keys_are_accepted():
    cfg = load_config(ExampleConfig, {"base_url": "http://a/v1", "target": {"type": "t", "name": "n"},
                                      "replicas": 2, "datasets": [{"name": "x"}], "my_own_note": "hi"}, "m")
    assert cfg.base_url == ["http://a/v1"]


def test_a_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="'m.retries' must be int, got True"):
        load_config(ExampleConfig, {"base_url": "http://a/v1", "target": {"type": "t", "name": "n"}, "retries": True}, "m")


def test_ng_run_reports_bad_server_fields_before_starting_anything(tmp_path: Path):
    (tmp_path / "env.yaml").write_text(textwrap.dedent("""
        policy_base_url: http://127.0.0.1:9/v1
        policy_api_key: EMPTY
        policy_model_name: m
    """))
    args = [f"+config_paths=[{VLLM_MODEL},{WEATHER}]", "+head_server.port=0",
            "++policy_model.responses_api_models.vllm_model.routing_policy=fastest",
            "++policy_model.responses_api_models.vllm_model.timeout_s=soon",
            "++simple_weather_simple_agent.responses_api_agents.simple_agent.max_step=3"]
    result = run_cli("ng_run", args, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert "Config errors (3)" in err
    assert ("'policy_model.responses_api_models.vllm_model.routing_policy' must be 'least_loaded' | 'round_robin' | 'hash', "
            "got 'fastest'") in err
    assert "'policy_model.responses_api_models.vllm_model.timeout_s' must be float, got 'soon'" in err
    assert ("'simple_weather_simple_agent.responses_api_agents.simple_agent.max_step' is not a field of this server "
            "(did you mean 'max_steps'?)") in err
    assert "command line" in err  # where the bad value was set
    assert "serving" not in err  # nothing started
