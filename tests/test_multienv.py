"""One collection over several environments in one graph: weather, math_verify and
equivalence_llm_judge, rows naming their agents, per-agent repeats and metrics (both modes)."""

from __future__ import annotations

import json

from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, run_cli

JUDGE_MODEL = "responses_api_models/vllm_model/configs/vllm_judge_model.yaml"
JUDGE_ENV = "resources_servers/equivalence_llm_judge/configs/equivalence_llm_judge.yaml"
MATH = "resources_servers/math_verify/configs/math_verify.yaml"
TOOLS = [{"type": "function", "name": "get_weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def ref(name: str) -> dict:
    return {"type": "responses_api_agents", "name": name}


def mixed_rows() -> list[dict]:
    weather = {"responses_create_params": {"input": "What is the weather in Oslo?", "tools": TOOLS}}
    return [
        {**weather, "agent_ref": ref("simple_weather_simple_agent")},
        {"responses_create_params": {"input": "MATH-156: compute 12 * 13"}, "expected_answer": "156",
         "agent_ref": ref("math_verify_simple_agent")},  # the policy answers \boxed{156}: right
        {"responses_create_params": {"input": "MATH-HALF: what is 1/2?"}, "expected_answer": "0.5",
         "agent_ref": ref("math_verify_simple_agent")},  # \boxed{\frac{1}{2}}: right
        {"responses_create_params": {"input": "MATH-156: compute 12 * 13 + 1"}, "expected_answer": "157",
         "agent_ref": ref("math_verify_simple_agent")},  # \boxed{156}: wrong
        {"responses_create_params": {"input": "mark-eq: capital of France?"}, "expected_answer": "Paris",
         "agent_ref": ref("equivalence_llm_judge_simple_agent")},
        {"responses_create_params": {"input": "mark-neq: capital of Spain?"}, "expected_answer": "Madrid",
         "agent_ref": ref("equivalence_llm_judge_simple_agent")},
        {"responses_create_params": {"input": "hello"}, "agent_ref": ref("math_agent_that_is_not_there")},
        weather,  # no agent_ref: +agent_name's agent
    ]


def test_one_collection_over_three_environments(standins, graph, tmp_path, mode):
    policy_rules = [{"match": "MATH-156", "content": "12 * 13 = 156, so the answer is \\boxed{156}."},
                    {"match": "MATH-HALF", "content": "One half: \\boxed{\\frac{1}{2}}"}]
    (tmp_path / "policy.json").write_text(json.dumps(policy_rules))
    (tmp_path / "judge.json").write_text(json.dumps([{"match": "mark-eq", "content": "[[A=B]]"},
                                                     {"match": "mark-neq", "content": "[[A!=B]]"}]))
    policy, = standins(1, "--model", "policy-model", "--script", str(tmp_path / "policy.json"))
    judge, = standins(1, "--model", "judge-model", "--script", str(tmp_path / "judge.json"))
    env = {"policy_base_url": policy.url, "policy_api_key": "EMPTY", "policy_model_name": "policy-model",
           "judge_base_url": judge.url, "judge_api_key": "EMPTY", "judge_model_name": "judge-model"}
    g = graph([VLLM_MODEL, JUDGE_MODEL, WEATHER, JUDGE_ENV, MATH], env=env, colocate=(mode == "colocated"))
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed_rows()))
    done = run_cli("ng_collect_rollouts", ["+agent_name=simple_weather_simple_agent", f"+head_server.port={g.head_port}",
                                           "+progress=false", "+input_jsonl_fpath=mixed.jsonl", "+output_jsonl_fpath=out.jsonl",
                                           "+num_repeats={_default:1,math_verify_simple_agent:4}", "+concurrency=8"], cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # one row names an agent the graph does not have
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    by_task: dict[int, list[dict]] = {}
    for r in written:
        by_task.setdefault(r["_ng_task_index"], []).append(r)
    assert {t: len(v) for t, v in by_task.items()} == {0: 1, 1: 4, 2: 4, 3: 4, 4: 1, 5: 1, 7: 1}
    rewards = {t: sorted({r["reward"] for r in v}) for t, v in by_task.items()}
    assert rewards == {0: [1.0], 1: [1.0], 2: [1.0], 3: [0.0], 4: [1.0], 5: [0.0], 7: [1.0]}
    assert by_task[2][0]["extracted_answer"] == "\\frac{1}{2}" and by_task[3][0]["extracted_answer"] == "156"
    assert by_task[4][0]["judge_evaluations"][0]["verdict"] == "equal"
    agents = {t: v[0]["agent_ref"]["name"] for t, v in by_task.items()}
    assert agents == {0: "simple_weather_simple_agent", 1: "math_verify_simple_agent", 2: "math_verify_simple_agent",
                      3: "math_verify_simple_agent", 4: "equivalence_llm_judge_simple_agent",
                      5: "equivalence_llm_judge_simple_agent", 7: "simple_weather_simple_agent"}
    [missing] = [json.loads(line) for line in (tmp_path / "out_failures.jsonl").read_text().splitlines()]
    assert missing["_ng_task_index"] == 6 and "math_agent_that_is_not_there" in missing["reason"]
    assert "math_verify_simple_agent" in missing["reason"] and "simple_weather_simple_agent" in missing["reason"]

    per_agent = json.loads((tmp_path / "out_metrics.json").read_text())["per_agent"]
    assert per_agent["math_verify_simple_agent"]["rollouts"] == 12
    assert per_agent["math_verify_simple_agent"]["pass@k"] == {"1": 0.666667, "2": 0.666667, "4": 0.666667}
    assert per_agent["equivalence_llm_judge_simple_agent"]["means"]["reward"] == 0.5
    assert per_agent["simple_weather_simple_agent"] == {"rollouts": 2, "failures": 0, "repeats": 1,
                                                         "means": {"reward": 1.0}, "pass@k": {"1": 1.0}}
    for name in ("simple_weather_simple_agent", "math_verify_simple_agent", "equivalence_llm_judge_simple_agent"):
        assert f"agent {name}" in done.stderr
