"""Faults of the run itself (issue 20), on real processes: the disk fills (by the output or by
the failures file), rows the agent cannot take, two collectors on one output, a killed
collector's progress entry, and a backend that answers 200 with tens of MB of garbage while its
/health is fine."""

from __future__ import annotations

import contextlib
import json
import signal

import psutil
import pytest

from nemo_gym_cli.testing.harness import (VLLM_MODEL, WEATHER, http_get, http_json, metric_total, run_cli, script, start_process,
                                          stop_process, wait_until, weather_env)
from nemo_gym_cli.testing.harness.scenarios import AGENT, collect, read_lines, resize_tmpfs, tmpfs, write_rows
from nemo_gym_cli.testing.harness.scenarios import garbage_backend as garbage_server

MODEL = "++policy_model.responses_api_models.vllm_model"


def pairs(path) -> list[tuple[int, int]]:
    return [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in read_lines(path)]


def bad_runs(agent_url: str) -> float:
    """/run calls the agent answered 400 (its own count, from its /metrics)."""
    return metric_total(http_get(agent_url + "/metrics").decode(), "ng_server_requests_total", route="/run", status="400")


def collections(g) -> dict[str, dict]:
    return {c["output"]: c for c in http_json(g.head + "/collections")[1]}


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (about 20 weather rollouts), unmounted afterwards; needs root."""
    with contextlib.ExitStack() as stack:
        try:
            disk = stack.enter_context(tmpfs(tmp_path / "disk", "64k"))
        except OSError as e:
            pytest.skip(f"the full-disk test: {e}")
        yield disk


def test_a_full_disk_stops_the_run_cleanly_and_resume_completes_it(standins, graph, tmp_path, tiny_disk):
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(standins(1)))
    write_rows(tmp_path / "in.jsonl", 60)
    out = tiny_disk / "out.jsonl"
    args = ["+input_jsonl_fpath=in.jsonl", f"+output_jsonl_fpath={out}", "+concurrency=4"]
    full = collect(g, *args)
    assert full.returncode == 74, full.stderr  # not 1 ("some rows failed")
    assert "Traceback" not in full.stderr
    [line] = [ln for ln in full.stderr.splitlines() if "stopped:" in ln]
    written = pairs(out)  # whole lines only (read_lines checks the last one ends)
    assert 0 < len(written) < 60
    assert "No space left on device" in line and f"{len(written)} rollouts written" in line and "+resume=true" in line
    print(f"\nfull disk: stopped after {len(written)} of 60 rollouts, exit 74, whole lines")
    entry = collections(g)[str(out)]
    assert entry["state"] == "failed" and "No space left on device" in entry["reason"]
    shown = run_cli("ng_status", [f"+head_server.port={g.head_port}"], cwd=tmp_path).stdout
    assert "failed: cannot write" in shown

    assert resize_tmpfs(tiny_disk, "16m")  # space freed
    resumed = collect(g, *args, "+resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(pairs(out)) == [(i, 0) for i in range(60)]  # exact: none twice, none missing


def test_failures_that_fill_the_disk_stop_the_run_cleanly_and_resume_sends_each_row_once(standins, graph, tmp_path,
                                                                                          tiny_disk):
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(standins(1)))
    good, bad = 10, 250  # the good rows first, then rows the agent refuses (400): their records fill the disk
    write_rows(tmp_path / "good.jsonl", good)
    rows = read_lines(tmp_path / "good.jsonl") + [{"responses_create_params": {"input": 42}}] * bad
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tiny_disk / "out.jsonl"
    failures_path = tiny_disk / "out_failures.jsonl"
    # One at a time: every good row is written before the first failure, so the failures file is what fills.
    args = ["+input_jsonl_fpath=in.jsonl", f"+output_jsonl_fpath={out}", "+concurrency=1"]
    full = collect(g, *args)
    assert full.returncode == 74, full.stderr
    assert "Traceback" not in full.stderr
    [line] = [ln for ln in full.stderr.splitlines() if "stopped:" in ln]
    assert f"cannot write {failures_path}: No space left on device" in line, line
    assert f"{good} rollouts written" in line and "+resume=true" in line, line
    assert pairs(out) == [(i, 0) for i in range(good)]  # whole lines only, in both files (read_lines checks)
    recorded = read_lines(failures_path)
    assert 0 < len(recorded) < bad and f"{len(recorded)} failures recorded" in line
    assert all(f["status"] == 400 and f["attempts"] == 1 for f in recorded)
    agent = g.url(AGENT.split("=", 1)[1])
    assert bad_runs(agent) == len(recorded) + 1  # the refused row whose record did not fit: resume runs it
    print(f"\nfailures fill the disk: stopped after {good} rollouts and {len(recorded)} of {bad} failures, exit 74")

    assert resize_tmpfs(tiny_disk, "16m")  # space freed
    resumed = collect(g, *args, "+resume=true")
    assert resumed.returncode == 1, resumed.stderr  # the bad rows stay failed
    assert pairs(out) == [(i, 0) for i in range(good)]  # exact: none twice, none missing
    final = read_lines(failures_path)
    assert sorted(f["_ng_task_index"] for f in final) == list(range(good, good + bad))
    assert all(f["status"] == 400 and f["attempts"] == 1 and len(f["reasons"]) == 1 for f in final)
    # Each bad row reached the agent once over both runs, but the one whose record did not fit (it ran again).
    assert bad_runs(agent) == bad + 1


def test_rows_of_the_wrong_shape_are_400s_naming_the_field_and_never_retried(standins, graph, tmp_path):
    [backend] = standins(1)
    g = graph([VLLM_MODEL, WEATHER], env=weather_env([backend]))
    bad = {1: ({"input": 42}, "'input' must be a string or a list, got 42"),
           2: ({"input": "hi", "tools": "get_weather"}, "'tools' must be a list"),
           3: ({"input": [1, 2]}, "'input[0]' must be an object"),
           4: ({"input": "hi", "temperature": "hot"}, "'temperature' must be a number, got \"hot\""),
           5: ({"input": "hi", "max_output_tokens": True}, "'max_output_tokens' must be an integer, got true")}
    write_rows(tmp_path / "good.jsonl", 7)
    rows = [{"responses_create_params": bad[i][0]} if i in bad else row for i, row in enumerate(read_lines(tmp_path / "good.jsonl"))]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = collect(g, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+concurrency=4", "+max_attempts=3")
    assert done.returncode == 1, done.stderr
    assert sorted(t for t, _ in pairs(tmp_path / "out.jsonl")) == [0, 6]
    failures = {f["_ng_task_index"]: f for f in read_lines(tmp_path / "out_failures.jsonl")}
    assert set(failures) == set(bad)
    for task, (_, field) in bad.items():
        f = failures[task]
        assert f["status"] == 400 and f["attempts"] == 1 and len(f["reasons"]) == 1, f
        assert field in f["error"] and "responses_create_params" in f["error"], f["error"]
        assert "Error:" not in f["error"] and "Traceback" not in f["error"]  # no Python exception shown
    assert json.loads((tmp_path / "out_metrics.json").read_text())["retries"] == 0
    assert backend.stats()["requests"] == 4  # the 2 good rows' 2 turns each: no bad row reached the model

    # A 400 is final on resume too: it has attempts left, but it is carried over, never sent again.
    agent = g.url(AGENT.split("=", 1)[1])
    sent_before = bad_runs(agent)
    assert sent_before == len(bad)
    resumed = collect(g, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+resume=true", "+max_attempts=3")
    assert resumed.returncode == 1, resumed.stderr
    assert bad_runs(agent) == sent_before, "resume sent a row whose 400 was final"
    again = {f["_ng_task_index"]: f for f in read_lines(tmp_path / "out_failures.jsonl")}
    assert again == failures  # the same records: 1 attempt, 1 reason each
    assert sorted(t for t, _ in pairs(tmp_path / "out.jsonl")) == [0, 6]
    status, body = http_json(g.url(AGENT.split("=", 1)[1]) + "/v1/responses", {"input": 42})
    assert status == 400 and "'input'" in body["error"]["message"]


def test_one_collector_per_output_even_with_resume_and_after_sigkill(standins, graph, tmp_path):
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(standins(2, "--latency-ms", "100")))
    write_rows(tmp_path / "in.jsonl", 80)
    out = tmp_path / "out.jsonl"
    args = [AGENT, f"+head_server.port={g.head_port}", "+progress=false", "+input_jsonl_fpath=in.jsonl",
            f"+output_jsonl_fpath={out}", "+resume=true"]
    first = start_process([script("ng_collect_rollouts"), *args, "+concurrency=2"], tmp_path / "first.log", cwd=tmp_path)
    try:
        wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= 2, 60, "the first collector writing")
        for extra in (["+resume=true"], []):  # both with +resume=true; and one without
            second = collect(g, "+input_jsonl_fpath=in.jsonl", f"+output_jsonl_fpath={out}", *extra)
            assert second.returncode == 2, second.stderr
            assert ("being written by another ng_collect_rollouts" if extra else "already exists") in second.stderr
        assert first.poll() is None
        first.send_signal(signal.SIGKILL)  # the lock goes with the process
        first.wait(10)
        killed_at = len(pairs(out))
    finally:
        stop_process(first, signal.SIGKILL)
    resumed = collect(g, "+input_jsonl_fpath=in.jsonl", f"+output_jsonl_fpath={out}", "+resume=true", "+concurrency=8")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(pairs(out)) == [(i, 0) for i in range(80)] and killed_at < 80  # no duplicate, none missing
    print(f"\ntwo collectors: second refused; first SIGKILLed at {killed_at}/80; resume: 80 lines, 0 duplicates")

    # The killed collector's entry stops claiming to run once its heartbeats stop
    def lost():
        return [c for c in http_json(g.head + "/collections")[1] if c["state"] == "lost"]
    [entry] = wait_until(lost, 30, "the SIGKILLed collector's entry shown as lost")
    assert "no progress report" in entry["reason"] and entry["done"] < 80
    assert collections(g)[str(out)]["state"] in ("lost", "finished")
    assert "lost: no progress report" in run_cli("ng_status", [f"+head_server.port={g.head_port}"], cwd=tmp_path).stdout


GARBAGE_BYTES = 40 * 1024 * 1024  # over max_answer_bytes (32 MiB)


@pytest.fixture
def garbage_backend():
    """A "vLLM" whose /health is fine and whose chat completions are 40 MB of garbage until `good` is set."""
    server = garbage_server(GARBAGE_BYTES)
    yield server
    server.close()


def test_a_backend_answering_garbage_is_demoted_and_comes_back_when_its_answers_recover(standins, graph, tmp_path,
                                                                                          garbage_backend):
    good = standins(2)
    env = weather_env([*good, garbage_backend.url + "/v1"])
    g = graph([VLLM_MODEL, WEATHER], env=env, args=["+preflight=false", f"{MODEL}.malformed_hold_s=1"])
    adapter = g.url("policy_model")
    [pid] = [s["pid"] for s in g.servers() if s["name"] == "policy_model"]
    rss_before = psutil.Process(pid).memory_info().rss
    write_rows(tmp_path / "in.jsonl", 90)
    done = collect(g, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+concurrency=15")
    rss_after = psutil.Process(pid).memory_info().rss
    assert done.returncode == 0, done.stderr  # every request it spoiled was retried on a good backend
    assert len(pairs(tmp_path / "out.jsonl")) == 90
    bad_url = garbage_backend.url + "/v1"
    view = {b["url"]: b for b in http_json(adapter + "/backends")[1]["backends"]}[bad_url]
    malformed = view["requests"]["malformed"]
    assert 3 <= malformed <= 15 and view["requests"]["ok"] == 0, view  # demoted after 3, not hit all run long
    assert "max_answer_bytes" in view["last_error"] and "over the 33554432-byte cap" in view["last_error"]
    metrics = json.loads((tmp_path / "out_metrics.json").read_text())
    assert metrics["errors_per_backend"] == {bad_url: {"malformed": malformed}}
    assert metrics["requests_per_backend"][bad_url] == 0 and metrics["failures"] == 0
    assert f"model requests {bad_url}" in done.stderr and f"{malformed} malformed" in done.stderr
    assert rss_after - rss_before < 100 * 2**20, (rss_before, rss_after)  # refused unread: memory stays bounded
    print(f"\ngarbage backend: {malformed} hits, 0/90 failed, adapter RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MB")

    garbage_backend.state["good"] = True  # its answers recover: after its hold, a good /health brings it back

    def served_by_it():
        http_json(adapter + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        b = {b["url"]: b for b in http_json(adapter + "/backends")[1]["backends"]}[bad_url]
        return b["healthy"] and b["requests"]["ok"] >= 1
    wait_until(served_by_it, 40, "the recovered backend serving again", interval=0.2)
