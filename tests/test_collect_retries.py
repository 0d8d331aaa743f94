"""+max_attempts: rollouts failing for a server reason are retried inside the run, 4xx are not,
and +resume=true retries failed rows only while they have attempts left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import VLLM_MODEL, http_json, run_cli, weather_env

FLAKY = "resources_servers/flaky_env/configs/flaky_env.yaml"


@pytest.fixture
def flaky(standins, graph, tmp_path):
    shutil.copytree(Path(__file__).parent / "fixtures/flaky_env/resources_servers", tmp_path / "resources_servers")
    return graph([VLLM_MODEL, FLAKY], env=weather_env(standins(1)))


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps({"responses_create_params": {"input": f"question {i}"}, **row}) + "\n"
                            for i, row in enumerate(rows)))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def collect(g, *args: str):
    return run_cli("ng_collect_rollouts", ["+agent_name=flaky_agent", f"+head_server.port={g.head_port}", "+progress=false",
                                           "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl",
                                           "+retry_backoff_s=0.05", *args], cwd=g.cwd)


def calls(g) -> dict[str, int]:
    return http_json(g.url("flaky_env") + "/calls")[1]


def test_server_errors_are_retried_up_to_max_attempts_and_4xx_never(flaky, tmp_path):
    # task 0 fine; task 1 fails twice then works; task 2 fails 5 times (more than 3 attempts); task 3 is a 4xx
    write(tmp_path / "in.jsonl", [{}, {"fail_first": 2}, {"fail_first": 5}, {"fail_status": 422}])
    done = collect(flaky, "+concurrency=4")
    assert done.returncode == 1, done.stderr
    written = {r["_ng_task_index"]: r for r in lines(tmp_path / "out.jsonl")}
    assert set(written) == {0, 1}
    assert written[1]["verify_calls"] == 3  # succeeded on its third attempt
    assert written[1]["agent_ref"] == {"type": "responses_api_agents", "name": "flaky_agent"}
    failures = {f["_ng_task_index"]: f for f in lines(tmp_path / "out_failures.jsonl")}
    assert set(failures) == {2, 3}
    assert failures[2]["attempts"] == 3 and failures[2]["status"] == 500
    assert [r.split(":")[0] for r in failures[2]["reasons"]] == ["attempt 1", "attempt 2", "attempt 3"]
    assert all("judge unavailable" in r and "HTTP 500" in r for r in failures[2]["reasons"])
    assert failures[3]["attempts"] == 1 and failures[3]["status"] == 422 and len(failures[3]["reasons"]) == 1
    assert calls(flaky) == {"0": 1, "1": 3, "2": 3, "3": 1}  # the 4xx row was sent once
    metrics = json.loads((tmp_path / "out_metrics.json").read_text())
    assert metrics["retries"] == 2 + 2 and metrics["failures"] == 2 and metrics["rollouts"] == 2
    assert "retries" in done.stderr


def test_resume_retries_failed_rows_only_while_they_have_attempts_left(flaky, tmp_path):
    write(tmp_path / "in.jsonl", [{}, {"fail_first": 100}, {"fail_first": 2}])
    first = collect(flaky, "+max_attempts=2")
    assert first.returncode == 1
    assert calls(flaky) == {"0": 1, "1": 2, "2": 2}
    assert {f["_ng_task_index"]: f["attempts"] for f in lines(tmp_path / "out_failures.jsonl")} == {1: 2, 2: 2}

    # same cap: nothing is sent again; the failures are carried over as they were
    again = collect(flaky, "+max_attempts=2", "+resume=true")
    assert again.returncode == 1
    assert calls(flaky) == {"0": 1, "1": 2, "2": 2}
    carried = {f["_ng_task_index"]: f for f in lines(tmp_path / "out_failures.jsonl")}
    assert {k: f["attempts"] for k, f in carried.items()} == {1: 2, 2: 2} and len(carried[1]["reasons"]) == 2

    # a higher cap: each failed row gets the attempts it has left, its reasons accumulate
    more = collect(flaky, "+max_attempts=4", "+resume=true")
    assert more.returncode == 1
    assert calls(flaky) == {"0": 1, "1": 4, "2": 3}  # task 2 works on its third call
    failures = lines(tmp_path / "out_failures.jsonl")
    assert [(f["_ng_task_index"], f["attempts"], len(f["reasons"])) for f in failures] == [(1, 4, 4)]
    assert sorted(r["_ng_task_index"] for r in lines(tmp_path / "out.jsonl")) == [0, 2]
    assert json.loads((tmp_path / "out_metrics.json").read_text())["skipped_already_done"] == 1
