"""ng_reverify: stored rollouts graded again by their environments, no model request made."""

from __future__ import annotations

import json

from conftest import VLLM_MODEL, WEATHER, run_cli, weather_env

MATH = "resources_servers/math_verify/configs/math_verify.yaml"


def ref(name: str) -> dict:
    return {"type": "responses_api_agents", "name": name}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reverify_reproduces_rewards_without_the_model_and_regrades_a_changed_row(standins, graph, tmp_path):
    (tmp_path / "policy.json").write_text(json.dumps([{"match": "MATH-156", "content": "so \\boxed{156}"}]))
    policy, = standins(1, "--script", str(tmp_path / "policy.json"))
    g = graph([VLLM_MODEL, WEATHER, MATH], env=weather_env([policy]))
    rows = [{"responses_create_params": {"input": "MATH-156 a"}, "expected_answer": "156", "agent_ref": ref("math_verify_simple_agent")},
            {"responses_create_params": {"input": "MATH-156 b"}, "expected_answer": "157", "agent_ref": ref("math_verify_simple_agent")},
            {"responses_create_params": {"input": "Weather in Oslo?"}, "agent_ref": ref("simple_weather_simple_agent")}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"+head_server.port={g.head_port}", "+progress=false"]
    collected = run_cli("ng_collect_rollouts", [*common, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=rollouts.jsonl",
                                                "+num_repeats=2"], cwd=tmp_path)
    assert collected.returncode == 0, collected.stderr
    stored = lines(tmp_path / "rollouts.jsonl")
    model_requests = policy.stats()["requests"]

    again = run_cli("ng_reverify", [*common, "+input_jsonl_fpath=rollouts.jsonl", "+output_jsonl_fpath=reverified.jsonl"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert policy.stats()["requests"] == model_requests  # no model call
    key = lambda r: (r["_ng_task_index"], r["_ng_rollout_index"])  # noqa: E731
    before = {key(r): r for r in stored}
    after = {key(r): r for r in lines(tmp_path / "reverified.jsonl")}
    assert set(after) == set(before) and len(after) == 6
    assert {k: r["reward"] for k, r in after.items()} == {k: r["reward"] for k, r in before.items()}
    assert {k: r["agent_ref"] for k, r in after.items()} == {k: r["agent_ref"] for k, r in before.items()}
    assert {k: r["response"] for k, r in after.items()} == {k: r["response"] for k, r in before.items()}
    metrics = json.loads((tmp_path / "reverified_metrics.json").read_text())
    assert metrics["per_agent"]["math_verify_simple_agent"]["pass@k"] == {"1": 0.5, "2": 0.5}

    # the gold answer of task 1 was wrong: fix it in the stored rollouts and grade again
    fixed = [{**r, "expected_answer": "156"} if r["_ng_task_index"] == 1 else r for r in stored]
    fixed.append({"_ng_task_index": 9, "_ng_rollout_index": 0, "response": {"output": []}, "agent_ref": ref("gone_agent")})
    (tmp_path / "fixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fixed) + "not json\n")
    regraded = run_cli("ng_reverify", [*common, "+input_jsonl_fpath=fixed.jsonl", "+output_jsonl_fpath=regraded.jsonl"], cwd=tmp_path)
    assert regraded.returncode == 1  # two lines could not be re-verified; the others were
    assert {key(r): r["reward"] for r in lines(tmp_path / "regraded.jsonl") if r["_ng_task_index"] == 1} == {(1, 0): 1.0, (1, 1): 1.0}
    failures = lines(tmp_path / "regraded_failures.jsonl")
    assert len(failures) == 2 and "gone_agent" in failures[0]["reason"] and "not valid JSON" in failures[1]["reason"]
    assert policy.stats()["requests"] == model_requests

    resumed = run_cli("ng_reverify", [*common, "+input_jsonl_fpath=fixed.jsonl", "+output_jsonl_fpath=regraded.jsonl",
                                      "+resume=true"], cwd=tmp_path)
    assert resumed.returncode == 1
    assert json.loads((tmp_path / "regraded_metrics.json").read_text())["skipped_already_done"] == 6
    assert len(lines(tmp_path / "regraded.jsonl")) == 6
