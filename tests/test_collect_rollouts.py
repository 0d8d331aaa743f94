"""ng_collect_rollouts against a real ng_run graph (vllm_model over two stand-ins + simple_weather)."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, run_cli, script, wait_until, weather_env
from nemo_gym_cli.testing.harness.scenarios import AGENT, collect, read_lines, write_rows

@pytest.fixture
def weather(standins, graph, mode):
    def start(*flags: str):
        backends = standins(2, *flags)
        return graph([VLLM_MODEL, WEATHER], env=weather_env(backends), colocate=(mode == "colocated")), backends
    return start


def test_every_row_becomes_one_line_with_indices_limit_and_repeats(weather, tmp_path):
    g, backends = weather()
    write_rows(tmp_path / "in.jsonl", 12)
    done = collect(g, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out/rollouts.jsonl", "+limit=10",
                   "+num_repeats=3", "+concurrency=7", "+responses_create_params={temperature:0.5}")
    assert done.returncode == 0, done.stderr
    rows = read_lines(tmp_path / "out/rollouts.jsonl")
    assert sorted((r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows) == [(t, r) for t in range(10) for r in range(3)]
    for r in rows:
        assert r["reward"] == 1.0
        assert r["row_id"] == r["_ng_task_index"]  # extra keys pass through to /verify and back
        assert r["responses_create_params"]["temperature"] == 0.5
        kinds = [item["type"] for item in r["response"]["output"]]
        assert "function_call" in kinds and "function_call_output" in kinds
    metrics = json.loads((tmp_path / "out/rollouts_metrics.json").read_text())
    assert metrics["rollouts"] == 30 and metrics["failures"] == 0 and metrics["means"]["reward"] == 1.0
    assert sum(metrics["requests_per_backend"].values()) == 60  # two model turns per rollout
    assert len(metrics["requests_per_backend"]) == 2
    assert "rollouts/s" in done.stderr and "mean reward" in done.stderr
    assert (tmp_path / "out/rollouts_failures.jsonl").read_text() == ""

    # the repeats of one prompt are adjacent in the order they are taken: one worker finishes
    # each rollout before taking the next, so its output order is the order taken
    done = collect(g, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=serial.jsonl", "+limit=3", "+num_repeats=2",
                   "+concurrency=1")
    assert done.returncode == 0, done.stderr
    taken = [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in read_lines(tmp_path / "serial.jsonl")]
    assert taken == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_failing_and_malformed_rows_are_recorded_and_the_run_goes_on(weather, tmp_path):
    g, _ = weather()
    write_rows(tmp_path / "in.jsonl", 4)
    with open(tmp_path / "in.jsonl", "a") as f:
        f.write("this is not json\n")
        f.write(json.dumps({"no_params": True}) + "\n")
        # tool_choice=required without tools: the model adapter refuses it with a 400
        f.write(json.dumps({"responses_create_params": {"input": "hi", "tool_choice": "required"}}) + "\n")
    done = collect(g, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl")
    assert done.returncode == 1
    assert len(read_lines(tmp_path / "out.jsonl")) == 4
    failures = {f["line"]: f for f in read_lines(tmp_path / "out_failures.jsonl")}
    assert set(failures) == {5, 6, 7}
    assert "in.jsonl:5: not valid JSON" in failures[5]["reason"]
    assert "in.jsonl:6: row has no 'responses_create_params'" in failures[6]["reason"]
    assert failures[7]["status"] == 400 and "tool_choice" in failures[7]["reason"]
    assert "in.jsonl:5" in done.stderr  # the user sees which line


def test_resume_after_sigkill_gives_each_pair_exactly_once(weather, tmp_path):
    g, _ = weather("--latency-ms", "20")
    write_rows(tmp_path / "in.jsonl", 60)
    args = [script("ng_collect_rollouts"), AGENT, f"+head_server.port={g.head_port}", "+progress=false",
            "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+num_repeats=4", "+concurrency=8"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out.jsonl"
    wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= 40, 60, "some rollouts written")
    proc.kill()
    proc.wait()
    first = out.read_bytes().count(b"\n")
    assert first < 240, "the run was not interrupted"

    again = collect(g, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+num_repeats=4")
    assert again.returncode == 2
    assert "already exists" in again.stderr and "+resume=true" in again.stderr  # never silently appended

    resumed = collect(g, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+num_repeats=4", "+resume=true")
    assert resumed.returncode == 0, resumed.stderr
    pairs = [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in read_lines(out)]
    assert len(pairs) == len(set(pairs)) == 240
    assert json.loads((tmp_path / "out_metrics.json").read_text())["skipped_already_done"] >= first


def test_sigterm_finishes_in_flight_rollouts_then_resume_completes(weather, tmp_path):
    g, _ = weather("--latency-ms", "30")
    write_rows(tmp_path / "in.jsonl", 200)
    args = [script("ng_collect_rollouts"), AGENT, f"+head_server.port={g.head_port}", "+progress=false",
            "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+concurrency=10"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "out.jsonl"
    wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= 20, 60, "some rollouts written")
    proc.send_signal(signal.SIGTERM)
    # It finishes the rollouts in flight (30 ms each) and exits; the generous timeout only catches
    # a hang on a loaded machine (no wall-clock bound on how fast).
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in stderr and "+resume=true" in stderr
    partial = read_lines(out)
    assert 20 <= len(partial) < 200
    assert json.loads((tmp_path / "out_metrics.json").read_text())["interrupted"] is True
    assert (tmp_path / "out_failures.jsonl").read_text() == ""  # in-flight rollouts finished, none cancelled

    resumed = collect(g, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(r["_ng_task_index"] for r in read_lines(out)) == list(range(200))


def test_concurrency_is_exactly_what_was_asked(standins, graph, tmp_path):
    backends = standins(1, "--latency-ms", "100")
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(backends))
    write_rows(tmp_path / "in.jsonl", 30)
    proc = subprocess.Popen([script("ng_collect_rollouts"), AGENT, f"+head_server.port={g.head_port}", "+progress=false",
                             "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+num_samples_in_parallel=7"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert proc.wait(120) == 0
    finally:
        proc.kill()  # a no-op once it has exited
    # The stand-in counts the most requests it ever ran at once (no sampling that could miss it).
    # 7 workers start together and each model call lasts 100 ms, so all 7 overlap at least once.
    assert backends[0].stats()["peak_running"] == 7


def test_setup_errors_are_clear(standins, graph, tmp_path):
    # no ng_run: an error within seconds naming the address and how to start it
    write_rows(tmp_path / "in.jsonl", 2)
    # (a refused connection is not retried for minutes: run_cli's 60 s timeout would fail the test;
    # no tighter wall-clock bound, other processes share the machine)
    done = run_cli("ng_collect_rollouts", [AGENT, "+head_server.port=1", "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=o.jsonl"],
                   cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert "127.0.0.1:1" in done.stderr and "ng_run" in done.stderr
    # an unknown flag is an error with "did you mean", never ignored
    done = run_cli("ng_collect_rollouts", [AGENT, "+concurency=10", "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=o.jsonl"],
                   cwd=tmp_path)
    assert done.returncode == 2 and "did you mean '+concurrency'" in done.stderr and "Traceback" not in done.stderr
    # missing input file
    done = run_cli("ng_collect_rollouts", [AGENT, "+input_jsonl_fpath=nope.jsonl", "+output_jsonl_fpath=o.jsonl"], cwd=tmp_path)
    assert done.returncode == 2 and "nope.jsonl" in done.stderr
    # unknown agent: lists the agents the head server knows
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(standins(1)))
    done = run_cli("ng_collect_rollouts", ["+agent_name=weather_agent", f"+head_server.port={g.head_port}",
                                           "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=o.jsonl"], cwd=tmp_path)
    assert done.returncode == 2 and "simple_weather_simple_agent" in done.stderr
    assert not (tmp_path / "o.jsonl").exists()
    # the help says what happens to bad lines
    done = run_cli("ng_collect_rollouts", ["--help"], cwd=tmp_path)
    assert done.returncode == 0 and "failures" in done.stdout and "+resume=true" in done.stdout
