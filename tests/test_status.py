"""ng_status: one row per model backend (router state + the backend's own vLLM gauges), the
collections in progress (published by ng_collect_rollouts to the head server), and --watch."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import threading

from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, free_port, http_json, run_cli, script, wait_until, weather_env

AGENT = "+agent_name=simple_weather_simple_agent"
CHAT = {"model": "standin-model", "messages": [{"role": "user", "content": "hold a slot"}]}


def cells(out: str, url: str) -> list[str]:
    """The cells of the table row that names `url`."""
    line = next(line for line in out.splitlines() if url + " " in line)
    return [c.strip() for c in line.split("│")[1:-1]]


def in_background(url: str, body: dict) -> None:
    """A request left hanging on purpose; its end (or the server's teardown) is not the test's concern."""
    def call():
        try:
            http_json(url, body, 60)
        except OSError:
            pass
    threading.Thread(target=call, daemon=True).start()


def write_rows(path, n: int) -> None:
    path.write_text("".join(json.dumps({"responses_create_params": {"input": f"weather in city {i}?"}}) + "\n" for i in range(n)))


def test_ng_status_shows_every_backend_with_its_load(standins, graph, tmp_path):
    busy, = standins(1, "--latency-ms", "10000", "--max-num-seqs", "2")
    idle, = standins(1)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    g = graph([VLLM_MODEL, WEATHER], env={**weather_env([busy, idle]), "policy_base_url": f"{busy.url},{idle.url},{dead}"})
    # Two requests through the adapter: least_loaded puts one on each backend; the busy one holds its.
    for _ in range(2):
        in_background(g.url("policy_model") + "/v1/chat/completions", CHAT)
    wait_until(lambda: idle.stats()["chat"] == 1 and busy.metric("vllm:num_requests_running") == 1, 30, "one request on each")
    # Two more straight to the busy stand-in: 2 run (max-num-seqs 2), 1 waits.
    for _ in range(2):
        in_background(busy.url + "/chat/completions", CHAT)
    wait_until(lambda: busy.metric("vllm:num_requests_running") == 2 and busy.metric("vllm:num_requests_waiting") == 1,
               30, "the busy stand-in to run 2 and queue 1")

    view = {b["url"]: b for b in http_json(g.url("policy_model") + "/backends")[1]["backends"]}
    assert view[busy.url]["vllm"]["running"] == 2 and view[busy.url]["vllm"]["waiting"] == 1
    assert view[busy.url]["vllm"]["kv_cache_usage"] == 1.0 and view[busy.url]["vllm"]["preemptions"] == 0
    assert view[idle.url]["vllm"]["running"] == 0 and view[idle.url]["vllm"]["waiting"] == 0
    assert not view[dead]["healthy"] and view[dead]["vllm"]["running"] is None
    assert view[busy.url]["in_flight"] == 1 and view[idle.url]["in_flight"] == 0
    assert view[idle.url]["requests"]["ok"] == 1 and view[busy.url]["requests"]["ok"] == 0

    result = run_cli("ng_status", [f"+head_server.port={g.head_port}"], cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    header = ["server", "backend", "state", "in flight", "sessions", "requests", "failovers", "running", "waiting",
              "KV cache", "prefix hits", "preempted"]
    busy_row, idle_row, dead_row = (dict(zip(header, cells(result.stdout, u))) for u in (busy.url, idle.url, dead))
    assert (busy_row["state"], busy_row["running"], busy_row["waiting"], busy_row["KV cache"]) == ("up", "2", "1", "100%")
    assert (idle_row["state"], idle_row["running"], idle_row["waiting"], idle_row["KV cache"]) == ("up", "0", "0", "0%")
    assert dead_row["state"].startswith("down") and dead_row["running"] == "-" and dead_row["KV cache"] == "-"
    assert (busy_row["in flight"], busy_row["requests"], idle_row["in flight"], idle_row["requests"]) == ("1", "0", "0", "1")


def test_ng_status_shows_backends_paused_for_a_weight_sync_as_paused_not_down(standins, graph, tmp_path):
    backends = standins(2)
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(backends))
    header = ["server", "backend", "state"]

    def states() -> list[str]:
        result = run_cli("ng_status", [f"+head_server.port={g.head_port}"], cwd=tmp_path, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        return [dict(zip(header, cells(result.stdout, b.url)))["state"] for b in backends]

    assert states() == ["up", "up"]
    status, paused = http_json(g.url("policy_model") + "/pause?mode=keep", {})  # the trainer's one pause
    assert status == 200 and paused["ok"], paused
    assert states() == ["paused", "paused"]
    assert http_json(g.url("policy_model") + "/resume", {})[0] == 200
    assert states() == ["up", "up"]


def test_ng_status_names_each_replica_and_the_node_it_runs_on(standins, graph, tmp_path):
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(standins(1)), args=["++simple_weather.resources_servers.simple_weather.replicas=2"])
    result = run_cli("ng_status", [f"+head_server.port={g.head_port}"], cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    header = ["name", "type", "impl", "url", "node", "pid", "state", "restarts", "answers"]
    servers = g.servers()
    assert sorted(s["label"] for s in servers) == ["policy_model", "simple_weather#0", "simple_weather#1",
                                                   "simple_weather_simple_agent"]
    for s in servers:  # a local process: its node is this machine's name, as it registered
        row = dict(zip(header, cells(result.stdout, s["url"])))
        assert (row["name"], row["node"], row["pid"]) == (s["label"], socket.gethostname(), str(s["pid"])), row
        assert s["node"] == socket.gethostname() and s["host"] is None


def test_a_collection_publishes_its_progress_to_the_head_server(standins, graph, tmp_path):
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(standins(2)))
    write_rows(tmp_path / "in.jsonl", 30)
    done = run_cli("ng_collect_rollouts", [AGENT, f"+head_server.port={g.head_port}", "+progress=false",
                                           "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+concurrency=4"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [entry] = http_json(g.head + "/collections")[1]
    assert entry["state"] == "finished" and entry["done"] == 30 and entry["failed"] == 0 and entry["total"] == 30
    assert entry["mean_reward"] == 1.0 and entry["rollouts_per_s"] > 0
    assert entry["agent"] == "simple_weather_simple_agent" and entry["output"].endswith("out.jsonl")

    status, body = http_json(g.head + "/collections/progress", {"id": "x", "done": "many"})
    assert status == 400 and "done" in body["error"]["message"]


def test_watch_redraws_under_a_terminal_and_stops_cleanly_on_ctrl_c(standins, graph, tmp_path):
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(standins(2, "--latency-ms", "200")))
    write_rows(tmp_path / "in.jsonl", 400)
    collector = subprocess.Popen([script("ng_collect_rollouts"), AGENT, f"+head_server.port={g.head_port}", "+progress=false",
                                  "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl", "+concurrency=4"],
                                 cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until(lambda: http_json(g.head + "/collections")[1], 30, "the collection's first progress report")

    controller, terminal = pty.openpty()
    watch = subprocess.Popen([script("ng_status"), "--watch", f"+head_server.port={g.head_port}"], cwd=tmp_path,
                             stdin=terminal, stdout=terminal, stderr=terminal, env={**os.environ, "COLUMNS": "250", "LINES": "60"})
    os.close(terminal)
    seen = bytearray()

    def read_some() -> str:
        while select.select([controller], [], [], 0.1)[0]:
            try:
                seen.extend(os.read(controller, 65536))
            except OSError:  # the terminal closed: the process is gone
                break
        return seen.decode(errors="replace")

    try:
        # Live redraws in place: the cursor moves up and the tables come again, with new numbers.
        wait_until(lambda: read_some().count("model backends") >= 3, 30, "three frames of ng_status --watch")
        text = read_some()
        assert "\x1b[" in text  # cursor control: redrawn in place, not appended
        assert "collections" in text and "simple_weather_simple_agent" in text and "running" in text
        watch.send_signal(signal.SIGINT)
        assert watch.wait(15) == 0
        assert "Traceback" not in read_some() and "KeyboardInterrupt" not in read_some()
    finally:
        if watch.poll() is None:
            watch.kill()
        os.close(controller)
        collector.send_signal(signal.SIGINT)
        collector.wait(60)
