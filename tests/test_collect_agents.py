"""Rows name their agent: unknown agents, per-agent repeats, per-agent metrics and pass@k
(checked against values computed by hand), over a real graph with one environment and two agents."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nemo_gym_cli.testing.harness import VLLM_MODEL, run_cli, weather_env

FLAKY = "resources_servers/flaky_env/configs/flaky_env.yaml"


def ref(name: str) -> dict:
    return {"type": "responses_api_agents", "name": name}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def two_agents(standins, graph, tmp_path):
    shutil.copytree(Path(__file__).parent / "fixtures/flaky_env/resources_servers", tmp_path / "resources_servers")
    return graph([VLLM_MODEL, FLAKY], env=weather_env(standins(1)))


def test_per_agent_repeats_metrics_and_pass_at_k(two_agents, tmp_path):
    rows = [
        {"agent_ref": ref("flaky_agent"), "rewards": [1, 0, 0, 1, 0, 0, 1, 0]},  # task 0: 3 of 8 pass
        {"agent_ref": ref("flaky_agent"), "rewards": [0] * 8},  # task 1: none
        {"agent_ref": ref("flaky_agent"), "rewards": [1] * 8},  # task 2: all
        {"agent_ref": ref("flaky_agent_half"), "rewards": [0.5, 0.0]},  # task 3: 0.5 passes for this agent
        {"agent_ref": ref("flaky_agent_half"), "rewards": [0.4, 0.4]},  # task 4: below its threshold
        {"agent_ref": ref("no_such_agent")},  # task 5: not in the graph
        {},  # task 6: no agent_ref and no +agent_name
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"responses_create_params": {"input": f"q{i}"}, **r}) + "\n"
                                               for i, r in enumerate(rows)))
    done = run_cli("ng_collect_rollouts", [f"+head_server.port={two_agents.head_port}", "+progress=false",
                                           "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl",
                                           "+num_repeats={_default:2,flaky_agent:8}"], cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # some rows failed, the run went on
    written = lines(tmp_path / "out.jsonl")
    per_task = {}
    for r in written:
        per_task.setdefault(r["_ng_task_index"], []).append(r["_ng_rollout_index"])
        assert r["agent_ref"] == ref("flaky_agent" if r["_ng_task_index"] < 3 else "flaky_agent_half")
    assert {t: sorted(v) for t, v in per_task.items()} == {0: list(range(8)), 1: list(range(8)), 2: list(range(8)),
                                                           3: [0, 1], 4: [0, 1]}
    failures = lines(tmp_path / "out_failures.jsonl")
    unknown = [f for f in failures if f["_ng_task_index"] == 5]
    assert len(unknown) == 2 and unknown[0]["status"] == 404 and unknown[0]["attempts"] == 1  # not retried
    assert "no_such_agent" in unknown[0]["reason"] and "flaky_agent, flaky_agent_half" in unknown[0]["reason"]
    assert unknown[0]["agent_ref"] == ref("no_such_agent")
    [no_agent] = [f for f in failures if f["_ng_task_index"] == 6 and f["_ng_rollout_index"] == 0]
    assert "names no agent" in no_agent["reason"] and "in.jsonl:7" in no_agent["reason"]

    metrics = json.loads((tmp_path / "out_metrics.json").read_text())
    assert metrics["rollouts"] == 28 and metrics["failures"] == 4 and metrics["agent_name"] is None
    full, half = metrics["per_agent"]["flaky_agent"], metrics["per_agent"]["flaky_agent_half"]
    assert full["rollouts"] == 24 and full["failures"] == 0 and full["means"]["reward"] == pytest.approx(11 / 24, abs=1e-6)
    # by hand, per task (n=8): pass@k = 1 - C(n-c, k)/C(n, k); task 0 has c=3, task 1 c=0, task 2 c=8
    #   k=1: 3/8, 0, 1   k=2: 1 - 10/28, 0, 1   k=4: 1 - 5/70, 0, 1   k=8: 1, 0, 1
    expected = {"1": (3 / 8 + 0 + 1) / 3, "2": (1 - 10 / 28 + 0 + 1) / 3, "4": (1 - 5 / 70 + 0 + 1) / 3, "8": 2 / 3}
    assert full["pass@k"] == pytest.approx(expected, abs=1e-6)
    # threshold 0.5: task 3 has c=1 of n=2, task 4 c=0: pass@1 = (1/2 + 0)/2, pass@2 = (1 + 0)/2
    assert half["rollouts"] == 4 and half["means"]["reward"] == pytest.approx(1.3 / 4, abs=1e-6)
    assert half["pass@k"] == pytest.approx({"1": 0.25, "2": 0.5}, abs=1e-6)
    assert metrics["per_agent"]["no_such_agent"] == {"rollouts": 0, "failures": 2, "repeats": 2, "means": {}, "pass@k": {}}
    assert "agent flaky_agent" in done.stderr and "pass@8 0.6667" in done.stderr  # one summary row per agent


def test_agent_name_is_the_default_for_rows_without_agent_ref(two_agents, tmp_path):
    rows = [{"responses_create_params": {"input": "a"}},
            {"responses_create_params": {"input": "b"}, "agent_ref": ref("flaky_agent_half")}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run_cli("ng_collect_rollouts", ["+agent_name=flaky_agent", f"+head_server.port={two_agents.head_port}", "+progress=false",
                                           "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {r["_ng_task_index"]: r["agent_ref"]["name"] for r in lines(tmp_path / "out.jsonl")} == {0: "flaky_agent", 1: "flaky_agent_half"}
