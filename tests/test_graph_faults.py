"""Faults in the graph itself, on real processes: a server of ours frozen for good (SIGSTOP),
ng_run SIGKILLed mid-collection (then started again, and the run resumed), and what a killed
ng_run leaves behind. The weather graph over stand-ins; liveness and backoffs at their defaults
except where a test says why.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import orjson
import psutil
import pytest

from nemo_gym_cli import collect_rollouts
from nemo_gym_cli.collect.api import GraphGone
from nemo_gym_cli.collect.collector import EXIT_GRAPH_GONE
from nemo_gym_cli.graph.leftovers import PREFIX, STATE_FILE
from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, WEATHER_AGENT, free_port, run_cli, wait_until, weather_env
from nemo_gym_cli.testing.harness.scenarios import (SECRET, by_name, collect, collect_through_fault, read_lines, relay,
                                                   start_pair, write_rows)

ROWS = 300


def weather_graph(graph, standins, **kwargs):
    return graph([VLLM_MODEL, WEATHER], env=weather_env(standins(2, "--latency-ms", "20")), **kwargs)


def entry_of(g, name: str, replica: int) -> dict:
    [entry] = [s for s in g.servers() if s["name"] == name and s["replica"] == replica]
    return entry


def failures_of(out: Path) -> list[dict]:
    path = out.with_name(out.stem + "_failures.jsonl")
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


REPLICA = "++policy_model.responses_api_models.vllm_model.replicas=2"


@pytest.mark.parametrize("frozen, replica, colocate, args", [
    ("policy_model", 0, False, []),
    (WEATHER_AGENT, 0, False, []),
    ("policy_model", 1, False, [REPLICA]),  # one of two local replicas; the other serves on
    ("policy_model", 0, True, []),  # the one process hosting every server
], ids=["adapter", "agent", "adapter_replica", "colocated_host"])
def test_a_server_frozen_for_good_is_killed_and_restarted_and_the_run_completes(graph, standins, tmp_path, frozen, replica,
                                                                               colocate, args):
    g = weather_graph(graph, standins, args=args, colocate=colocate)
    label = "colocated" if g.colocate else f"{frozen}#{replica}" if args else frozen  # how ng_run names the process
    pid = entry_of(g, frozen, replica)["pid"]
    write_rows(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    try:  # SIGSTOPped for good: only the kill ends it
        code, output, took = collect_through_fault(g, out, ROWS, lambda _: os.kill(pid, signal.SIGSTOP), "+concurrency=30")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert code == 0, output
    rows = read_lines(out)
    assert sorted(r["_ng_task_index"] for r in rows) == list(range(ROWS))  # nothing lost, nothing twice, no resume
    assert took < 60, f"{took:.1f} s from the freeze to the end of the run"
    # With two replicas the run can end on the other one before the frozen one's successor serves.
    entry = wait_until(lambda: (e := entry_of(g, frozen, replica))["state"] == "ready" and e["pid"] != pid and e, 30,
                       f"{label} to serve again after its restart")
    assert entry["restarts"] == 1
    assert f"server '{label}' (pid {pid}) is not answering" in g.output(), g.output()
    if g.colocate:  # every server lived in the frozen process: all came back in the new one
        assert {s["pid"] for s in g.servers()} == {entry["pid"]}
    if replica:  # only the frozen replica was replaced
        [other] = [s for s in g.servers() if s["name"] == frozen and s["replica"] != replica]
        assert other["restarts"] == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    print(f"\n{label} frozen for good: {ROWS}/{ROWS} written, {took:.1f} s from the freeze to the end")


def test_ng_run_killed_mid_collection_costs_no_attempts_and_resume_completes_the_set(graph, standins, tmp_path):
    g = weather_graph(graph, standins)
    write_rows(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    # ng_run only: its children follow it.
    code, output, took = collect_through_fault(g, out, ROWS, lambda _: os.kill(g.proc.pid, signal.SIGKILL),
                                               "+concurrency=30", "+graph_wait_s=5")
    assert code == EXIT_GRAPH_GONE, output
    assert "ng_run's graph at" in output and "did not come back within 5 s" in output and "+resume=true" in output, output
    assert "Traceback" not in output
    written = read_lines(out)
    failed = failures_of(out)
    # What found nothing listening is written nowhere; only rollouts cut off mid-call are failures.
    assert not [f for f in failed if "refused" in f["error"] or "cannot connect" in f["error"]], failed
    assert len(failed) <= 30, failed
    assert took < 5 + 15, f"{took:.1f} s from the kill to the end"

    g2 = weather_graph(graph, standins, head_port=g.head_port)  # ng_run again, where it was
    done = collect(g2, "+input_jsonl_fpath=in.jsonl", f"+output_jsonl_fpath={out}", "+resume=true", "+concurrency=30")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_lines(out)
    assert sorted(r["_ng_task_index"] for r in rows) == list(range(ROWS)), "missing or duplicate rows after resume"
    print(f"\nng_run SIGKILLed at {len(written)}/{ROWS}: collector ended in {took:.1f} s (graph_wait_s=5), "
          f"{len(failed)} failures (mid-call), resume: {ROWS}/{ROWS}, no duplicates")


def test_ng_run_back_within_graph_wait_s_the_same_run_completes(graph, standins, tmp_path):
    g = weather_graph(graph, standins)
    write_rows(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"

    def kill_and_restart(_) -> None:
        os.kill(g.proc.pid, signal.SIGKILL)
        g.proc.wait(10)
        weather_graph(graph, standins, head_port=g.head_port)

    code, output, _ = collect_through_fault(g, out, ROWS, kill_and_restart, "+concurrency=30", "+graph_wait_s=60")
    # Rollouts cut off mid-call were retried (attempts left): the run completes without a resume.
    assert code == 0, output
    assert sorted(r["_ng_task_index"] for r in read_lines(out)) == list(range(ROWS))


def test_the_in_process_api_raises_graph_gone_and_reports_nothing_it_did_not_run(graph, standins, tmp_path):
    g = weather_graph(graph, standins)
    rows = [{"responses_create_params": {"input": f"weather in city {i}?"}} for i in range(ROWS)]

    async def run() -> tuple[list[dict], BaseException | None]:
        got: list[dict] = []
        try:
            async for r in collect_rollouts(rows, head_url=g.head, concurrency=30, agent_name=WEATHER_AGENT,
                                            graph_wait_s=2):
                got.append(r)
                if len(got) == ROWS // 4:
                    os.kill(g.proc.pid, signal.SIGKILL)
        except GraphGone as e:
            return got, e
        return got, None

    got, error = asyncio.run(asyncio.wait_for(run(), 120))
    assert isinstance(error, GraphGone) and "did not come back within 2 s" in str(error), error
    assert len(got) < ROWS
    refused = [r for r in got if "error" in r and ("refused" in r["error"] or "cannot connect" in r["error"])]
    assert refused == []


def _graph_folder(pid: int, tmp: Path) -> Path | None:
    for folder in tmp.glob(PREFIX + "*"):
        try:
            if orjson.loads((folder / STATE_FILE).read_bytes())["ng_run"]["pid"] == pid:
                return folder
        except (OSError, ValueError, KeyError):
            continue
    return None


def test_the_next_ng_run_ends_a_frozen_child_a_killed_ng_run_left_and_no_secret_is_on_disk(graph, tmp_path):
    # The state folders in a TMPDIR of this test's own: any other ng_run on the machine would end
    # (or, an older or newer ng_run, drop) the killed graph's leftovers before ours could.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    g = start_pair(graph, tmp_path, "processes", process_env=env)
    folder = _graph_folder(g.proc.pid, tmp)
    assert folder is not None
    for path in folder.rglob("*"):  # the config reached the children through a pipe
        assert SECRET not in path.read_text(errors="replace"), path
    echo = psutil.Process(by_name(g)["echo"]["pid"])
    port = int(by_name(g)["echo"]["url"].rsplit(":", 1)[1])
    os.kill(echo.pid, signal.SIGSTOP)
    wait_until(lambda: echo.status() == psutil.STATUS_STOPPED, 10, "echo stopped")
    os.kill(g.proc.pid, signal.SIGKILL)
    g.proc.wait(10)
    # The stopped child keeps its SIGTERM pending: it outlives ng_run, holding its port.
    assert echo.is_running() and echo.status() == psutil.STATUS_STOPPED

    g2 = start_pair(graph, tmp_path, "processes", process_env=env)
    out = g2.output()
    assert f"left by an earlier ng_run (pid {g.proc.pid}, no longer running)" in out, out
    assert f"'echo' (pid {echo.pid}, stopped, holding port {port})" in out, out
    wait_until(lambda: not echo.is_running() or echo.status() == psutil.STATUS_ZOMBIE, 10, "the leftover echo ended")
    assert not folder.exists()
    g2.stop()
    assert _graph_folder(g2.proc.pid, tmp) is None  # a clean stop removes the graph's folder


def test_a_call_to_a_frozen_server_is_cut_off_in_seconds_while_a_long_call_of_a_live_one_finishes(graph, tmp_path):
    # ng_run's own probes off: the caller's server client alone must notice (e.g. ng_run is gone).
    g = start_pair(graph, tmp_path, "processes", args=["+liveness.interval_s=0", "+http_client.stall_s=1",
                                                       "+http_client.liveness_timeout_s=1"])
    status, body = relay(g, "long", s=4)  # 4x stall_s: echo's /health answers all along, so it runs to its end
    assert status == 200 and body["reply"]["slept_s"] == 4, body
    os.kill(by_name(g)["echo"]["pid"], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        status, body = relay(g, "frozen", s=0.1)
        took = time.monotonic() - t0
    finally:
        os.kill(by_name(g)["echo"]["pid"], signal.SIGCONT)
    assert status == 500 and "stopped answering /health" in body["error"]["message"], body
    assert took < 10, f"{took:.1f} s"


def test_bad_liveness_settings_are_a_config_error_before_anything_starts(tmp_path):
    done = run_cli("ng_run", ["+config_paths=[]", "+liveness.timeout_s=soon", f"+head_server.port={free_port()}"],
                   cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "'liveness.timeout_s' must be float, got 'soon'" in done.stdout + done.stderr
