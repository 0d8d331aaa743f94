"""ng_run restarts a server process that crashes: real processes, SIGKILL, real calls by name.

The graph is tests/fixtures/graph/pair.yaml (`caller`'s /relay reaches `echo` by name), as in
test_ng_run.py. Backoffs are shortened with +restarts.* so that the tests take seconds.
"""

from __future__ import annotations

import os
import re
import signal

from nemo_gym_cli.graph.supervisor import RestartPolicy
from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, wait_until, weather_env
from nemo_gym_cli.testing.harness.scenarios import (alive, by_name, collect_in_background, lines_written, read_lines,
                                                   relay, server_processes, start_pair, wait_for_exit, write_rows)

FAST = ["+restarts.backoff_s=0.1"]


def restarted(g, name: str, old_pid: int, count: int = 1) -> dict:
    def check():
        entry = by_name(g)[name]
        return entry if entry["restarts"] == count and entry["state"] == "ready" and entry["pid"] != old_pid else None
    return wait_until(check, 60, f"{name} restarted ({count})")


def test_a_killed_server_is_restarted_and_calls_by_name_find_it_again(graph, tmp_path, mode):
    g = start_pair(graph, tmp_path, mode, args=FAST)
    before = by_name(g)
    status, body = relay(g, "before-the-crash")  # the caller now knows echo's address, and this session is on it
    assert status == 200, body
    os.kill(before["echo"]["pid"], signal.SIGKILL)

    if mode == "processes":
        # The caller still has the dead address: the call is refused there, the name resolved
        # again, and the call reaches the restarted echo instead of failing.
        status, body = relay(g, "after-the-crash")
        assert status == 200, body
        assert body["reply"]["pid"] != before["echo"]["pid"]
        # A session that lived on the dead process fails, saying so (the collector retries it).
        status, body = relay(g, "before-the-crash")
        assert status == 500 and "gone" in body["error"]["message"], body
    echo = restarted(g, "echo", before["echo"]["pid"])
    assert echo["url"] and echo["state"] == "ready"
    status, body = relay(g, "later")
    assert status == 200 and body["reply"]["pid"] == echo["pid"], body

    after = by_name(g)
    if mode == "colocated":  # the one process hosts both: both came back, in one new process
        assert after["caller"]["restarts"] == 1 and after["caller"]["pid"] == echo["pid"]
        assert not alive(before["caller"]["pid"])
    else:  # only echo's process was restarted
        assert after["caller"]["restarts"] == 0 and after["caller"]["pid"] == before["caller"]["pid"]
    out = g.output()
    assert re.search(r"server '(echo|colocated)' exited unexpectedly with code -9; restarting it in 0.1 s \(restart 1\)", out), out
    assert g.proc.poll() is None  # the graph kept running


def test_a_restart_storm_stops_the_graph_with_the_reason_and_last_lines(graph, tmp_path):
    marker = tmp_path / "crashy.started"
    g = start_pair(graph, tmp_path, "processes", config_paths=["pair.yaml", "crash.yaml"],
                   args=["+restarts.backoff_s=0.05", "+restarts.max_restarts=2",
                         "++crashy.resources_servers.ng_test_crash.crash_in=restart",
                         f"++crashy.resources_servers.ng_test_crash.marker={marker}"])
    os.kill(by_name(g)["crashy"]["pid"], signal.SIGKILL)  # every start after the first fails

    code = wait_for_exit(g, 60)
    out = g.output()
    assert code != 0, out
    assert "restarting it in 0.05 s (restart 1)" in out and "restarting it in 0.1 s (restart 2)" in out, out
    assert re.search(r"server 'crashy' exited unexpectedly with code 1, after 2 restarts: more than 2 restarts "
                     r"within 60 s; stopping the others", out), out
    last = out.split("last lines of crashy", 1)[-1]
    assert "the dataset lock is still held (raised on a restart)" in last, out
    assert server_processes(tmp_path) == []


def test_restart_never_stops_the_graph_in_colocated_mode_too(graph, tmp_path):
    g = start_pair(graph, tmp_path, "colocated", args=["++caller.resources_servers.ng_test_caller.restart=never"])
    os.kill(by_name(g)["echo"]["pid"], signal.SIGKILL)
    code = wait_for_exit(g)
    assert code != 0
    assert "server 'colocated' exited unexpectedly with code -9 (restart: never)" in g.output()
    assert server_processes(tmp_path) == []


def test_restart_backoff_doubles_to_a_cap_and_a_storm_is_refused():
    now = [0.0]
    policy = RestartPolicy.from_config({}, clock=lambda: now[0])  # conf/ng_run.yaml's restarts
    delays = []
    for _ in range(5):
        delays.append(policy.next_delay())
        now[0] += 1
    assert delays == [0.5, 1, 2, 4, 8]
    assert policy.next_delay() is None  # a 6th restart within 60 s: stop the graph
    now[0] += 60  # a quiet minute: restarts are allowed again, from the short backoff
    assert policy.next_delay() == 0.5
    capped = RestartPolicy.from_config({"restarts": {"max_restarts": 10}}, clock=lambda: now[0])
    assert [capped.next_delay() for _ in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]


def test_a_resources_server_killed_mid_run_is_restarted_and_the_run_completes(standins, graph, tmp_path):
    backends = standins(2)
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(backends), args=FAST)
    weather_pid = by_name(g)["simple_weather"]["pid"]
    write_rows(tmp_path / "in.jsonl", 400)
    out = tmp_path / "out.jsonl"
    proc = collect_in_background(g, out, "+concurrency=40", "+max_attempts=3")
    try:
        wait_until(lambda: lines_written(out) >= 50, 120, "50 rollouts written")
        os.kill(weather_pid, signal.SIGKILL)  # mid-run: some 40 rollouts are in flight
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    rows = read_lines(out)
    assert sorted(r["_ng_task_index"] for r in rows) == list(range(400))  # all of them, no resume needed
    assert all(r["reward"] == 1.0 for r in rows)
    entry = by_name(g)["simple_weather"]
    assert entry["restarts"] == 1 and entry["pid"] != weather_pid
    assert "server 'simple_weather' exited unexpectedly with code -9; restarting it" in g.output()
