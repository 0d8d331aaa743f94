"""`replicas: N`: N processes behind one name; calls spread, sessions stick, a gone replica is
left for the others. Real ng_run graphs, real processes, SIGKILL.

tests/fixtures/graph/pair.yaml: `caller`'s /relay reaches `echo` by name (echo answers its pid).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket

from conftest import VLLM_MODEL, WEATHER, http_json, run_cli, wait_until, weather_env
from test_collect_rollouts import collect, read_lines, write_rows
from test_ng_run import ENV, by_name, start_pair, user_folder
from test_restarts import relay

TWO_ECHOES = ["++echo.resources_servers.ng_test_echo.replicas=2"]


def echoes(g) -> list[dict]:
    return sorted((s for s in g.servers() if s["name"] == "echo"), key=lambda s: s["replica"])


def test_each_replica_registers_and_calls_spread_while_a_session_sticks(graph, tmp_path):
    g = start_pair(graph, tmp_path, "processes", args=TWO_ECHOES)
    first, second = echoes(g)
    assert (first["replica"], second["replica"]) == (0, 1)
    assert first["url"] != second["url"] and first["pid"] != second["pid"]
    for s in (first, second):
        assert s["state"] == "ready" and s["restarts"] == 0 and s["node"] == socket.gethostname()
    assert [s["replica"] for s in g.servers() if s["name"] == "caller"] == [0]
    assert "replica" in g.output()  # the startup table shows the replica column

    pids = collections.Counter(relay(g, f"session-{i}")[1]["reply"]["pid"] for i in range(20))
    assert set(pids) == {first["pid"], second["pid"]}
    assert max(pids.values()) <= 12, pids  # spread, not all on one

    sticky = {relay(g, "one-session")[1]["reply"]["pid"] for _ in range(8)}
    assert len(sticky) == 1, "the calls of one session went to different replicas"

    status = run_cli("ng_status", [f"+head_server.port={g.head_port}"], cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "echo#1" in status.stdout and "restarts" in status.stdout


def test_a_gone_replica_is_left_for_the_other_and_its_sessions_fail(graph, tmp_path):
    g = start_pair(graph, tmp_path, "processes", args=[*TWO_ECHOES, "+restarts.backoff_s=3"])
    pid_of = {s["pid"]: s["replica"] for s in echoes(g)}
    status, body = relay(g, "doomed")
    assert status == 200, body
    doomed_pid = body["reply"]["pid"]
    survivor_pid = next(pid for pid in pid_of if pid != doomed_pid)
    os.kill(doomed_pid, signal.SIGKILL)

    # New sessions: none fails; they end up on the survivor while the other one is away.
    answers = [relay(g, f"new-{i}") for i in range(6)]
    assert all(status == 200 for status, _ in answers), answers
    assert answers[-1][1]["reply"]["pid"] == survivor_pid
    # The session that lived on the dead replica fails, naming why (the collector retries its rollout).
    status, body = relay(g, "doomed")
    assert status == 500 and "gone" in body["error"]["message"], body

    # The replica is restarted; the caller finds it again and spreads over both.
    replica = pid_of[doomed_pid]
    back = wait_until(lambda: next(s for s in echoes(g) if s["replica"] == replica and s["restarts"] == 1
                                   and s["state"] == "ready"), 60, "the replica restarted")
    seen: set[int] = set()

    def both_used():
        seen.update(relay(g, f"later-{len(seen)}-{os.urandom(4).hex()}")[1]["reply"]["pid"] for _ in range(4))
        return {back["pid"], survivor_pid} <= seen
    wait_until(both_used, 30, "calls reaching the restarted replica again")
    assert doomed_pid not in seen


def test_replicas_with_colocate_and_bad_values_are_config_errors_all_at_once(tmp_path):
    user_folder(tmp_path)
    (tmp_path / "env.yaml").write_text(json.dumps(ENV))
    done = run_cli("ng_run", ["+config_paths=[pair.yaml]", "+colocate=true", *TWO_ECHOES,
                              "++caller.resources_servers.ng_test_caller.restart=always"], cwd=tmp_path, timeout=60)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "'echo.resources_servers.ng_test_echo.replicas' is 2, but +colocate=true" in out, out
    assert "'caller.resources_servers.ng_test_caller.restart' must be one of on-failure, never, got 'always'" in out, out
    done = run_cli("ng_run", ["+config_paths=[pair.yaml]", "++echo.resources_servers.ng_test_echo.replicas=0"],
                   cwd=tmp_path, timeout=60)
    assert done.returncode != 0 and "'echo.resources_servers.ng_test_echo.replicas' must be an integer >= 1, got 0" \
        in done.stdout + done.stderr


def test_two_model_adapter_replicas_keep_the_backend_spread(standins, graph, tmp_path):
    backends = standins(3)
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(backends), args=["++policy_model.responses_api_models.vllm_model.replicas=2"])
    adapters = [s for s in g.servers() if s["name"] == "policy_model"]
    assert len(adapters) == 2
    write_rows(tmp_path / "in.jsonl", 300)
    done = collect(g, "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+concurrency=30")
    assert done.returncode == 0, done.stderr
    assert len(read_lines(tmp_path / "out.jsonl")) == 300

    per_backend = [b.metric("standin_requests_total") for b in backends]
    assert sum(per_backend) == 600  # two model turns per rollout
    assert max(per_backend) / min(per_backend) <= 1.2, per_backend
    per_adapter = []
    for a in adapters:
        text = http_json(a["url"] + "/metrics")[1]
        per_adapter.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                               if line.startswith("ng_model_backend_requests_total{")))
    assert sum(per_adapter) == 600 and min(per_adapter) >= 150, per_adapter  # both replicas served
