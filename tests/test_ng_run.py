"""ng_run as a user runs it: a real process tree, real ports, real signals.

The graph under test is tests/fixtures/graph/pair.yaml: two tiny servers of the user's own
(`echo` and `caller`, whose /relay reaches `echo` by name through the server client), copied
into the test's working directory the way a user keeps an environment folder next to env.yaml.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
import socket
import time
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, free_port, http_json, run_cli, wait_until, weather_env
from nemo_gym_cli.testing.harness.scenarios import (ENV, HF_TOKEN, SECRET, alive, by_name, server_processes, start_pair,
                                                   user_folder, wait_for_exit)

SERVER_KEYS = {"name", "label", "server_type", "impl", "replica", "url", "pid", "node", "host", "state", "restarts"}


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a restarted server would
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def final_output(g) -> str:
    """ng_run's whole output, also after the `graph` fixture's stop() closed its log."""
    return g.log_path.read_text(errors="replace")


# ------------------------------------------------------------------ the graph comes up


def test_two_servers_start_and_one_reaches_the_other_by_name(graph, tmp_path, mode):
    g = start_pair(graph, tmp_path, mode)

    servers = by_name(g)
    assert set(servers) == {"echo", "caller"}
    for s in servers.values():
        assert SERVER_KEYS <= set(s), s
        assert s["server_type"] == "resources_servers"
        assert s["state"] == "ready"
        assert isinstance(s["pid"], int) and s["pid"] > 0
        status, body = http_json(s["url"] + "/health")
        assert status == 200, body
    assert (servers["echo"]["impl"], servers["caller"]["impl"]) == ("ng_test_echo", "ng_test_caller")
    if mode == "processes":
        assert len({servers["echo"]["pid"], servers["caller"]["pid"], g.proc.pid}) == 3  # one process each
    else:
        # all in one process, apart from ng_run (which keeps the head server while that one restarts)
        assert servers["echo"]["pid"] == servers["caller"]["pid"] != g.proc.pid

    status, body = http_json(servers["caller"]["url"] + "/relay", {"question": "ping", "n": [1, 2]},
                             headers={"X-Session-ID": "rollout-42"})
    assert status == 200, body
    assert body["via"] == "caller"
    assert body["reply"]["server"] == "echo"
    assert body["reply"]["body"] == {"question": "ping", "n": [1, 2]}
    assert body["reply"]["session_id"] == "rollout-42"  # the session travels with the call
    assert body["reply"]["pid"] == servers["echo"]["pid"]

    status, health = http_json(g.head + "/health")
    assert status == 200 and health["status"] == "ok"

    status, config = http_json(g.head + "/config")
    assert status == 200
    echo = config["echo"]["resources_servers"]["ng_test_echo"]
    assert echo["api_key"] == "****" and echo["hf_token"] == "****"
    assert config["echo_api_key"] == "****"
    assert echo["max_tokens"] == 77 and echo["prompt_token_ids"] == [1, 2, 3]
    assert SECRET not in json.dumps(config) and HF_TOKEN not in json.dumps(config)


def test_a_users_own_server_folder_runs_next_to_the_projects_servers(graph, tmp_path, mode):
    g = start_pair(graph, tmp_path, mode, config_paths=["with_weather.yaml"])
    servers = by_name(g)
    assert set(servers) == {"echo", "caller", "weather"}
    status, body = http_json(servers["weather"]["url"] + "/get_weather", {"city": "Paris"})
    assert status == 200 and "Paris" in body["weather_description"]
    status, body = http_json(servers["echo"]["url"] + "/echo", {"x": 1})
    assert status == 200 and body["body"] == {"x": 1}


# ------------------------------------------------------------------ what every server does


def test_every_server_has_health_metrics_and_json_errors(graph, tmp_path, mode):
    g = start_pair(graph, tmp_path, mode)
    servers = by_name(g)

    for s in servers.values():
        http_json(s["url"] + "/health")
        status, text = http_json(s["url"] + "/metrics")
        assert status == 200 and isinstance(text, str)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert "ng_server_requests" in families
        samples = [x for x in families["ng_server_requests"].samples if x.name == "ng_server_requests_total"]
        assert any(x.labels == {"route": "/health", "status": "200"} and x.value >= 1 for x in samples), samples

        status, body = http_json(s["url"] + "/no/such/route", {"x": 1})
        assert status == 404, body
        assert set(body["error"]) >= {"message", "type"} and "/no/such/route" in body["error"]["message"]

    echo = servers["echo"]["url"]
    status, body = http_json(echo + "/boom", {})
    assert status == 500
    assert set(body["error"]) >= {"message", "type"}
    assert "kaboom in the handler" in body["error"]["message"]
    assert "Traceback" not in json.dumps(body) and 'File "' not in json.dumps(body)

    # The traceback is in ng_run's output, attributed to the instance that failed.
    if mode == "processes":
        wait_until(lambda: "[echo] Traceback (most recent call last):" in g.output()
                   and "[echo] RuntimeError: kaboom in the handler" in g.output(), 10, "the traceback in ng_run's output")
    else:
        wait_until(lambda: re.search(r"nemo_gym\.echo.*failed", g.output()) and "Traceback (most recent call last):" in g.output()
                   and "RuntimeError: kaboom in the handler" in g.output(), 10, "the traceback in ng_run's output")

    status, raw = raw_post(echo + "/echo", b"{not json", {"Content-Type": "application/json"})
    assert status == 400
    error = json.loads(raw)["error"]
    assert "JSON" in error["message"] and error["type"]

    status, text = http_json(echo + "/metrics")
    assert 'ng_server_requests_total{route="/boom",status="500"} 1.0' in text
    assert 'ng_server_requests_total{route="/echo",status="400"} 1.0' in text


def test_a_session_is_kept_by_header_or_by_cookie(graph, tmp_path, mode):
    g = start_pair(graph, tmp_path, mode)
    echo = g.url("echo") + "/echo"

    # The agent's way: an explicit header on every call.
    for _ in range(2):
        status, body = http_json(echo, {}, headers={"X-Session-ID": "my-session"})
        assert status == 200 and body["session_id"] == "my-session"

    # A plain client with a cookie jar (NeMo Gym's style) gets a session cookie and keeps it.
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

    def call() -> dict:
        req = urllib.request.Request(echo, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
        with opener.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    first, second = call(), call()
    cookies = {c.name: c.value for c in jar}
    assert "ng_session_id" in cookies
    assert first["session_id"] == second["session_id"] == cookies["ng_session_id"]

    # Without a cookie jar, every call is a new session.
    assert http_json(echo, {})[1]["session_id"] != http_json(echo, {})[1]["session_id"]

    # Through the caller, the cookie's session reaches the server it calls.
    req = urllib.request.Request(g.url("caller") + "/relay", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with opener.open(req, timeout=10) as resp:
        relayed = json.loads(resp.read())
    assert relayed["reply"]["session_id"] == cookies["ng_session_id"]


# ------------------------------------------------------------------ stopping


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_process_and_frees_every_port(graph, tmp_path, mode, sig):
    g = start_pair(graph, tmp_path, mode)
    servers = by_name(g)
    pids = {s["pid"] for s in servers.values()} - {g.proc.pid}
    ports = [port_of(s["url"]) for s in servers.values()] + [g.head_port]
    if mode == "processes":
        assert len(pids) == 2 and len(server_processes(tmp_path)) == 2

    t0 = time.monotonic()
    g.stop(sig)
    print(f"\nng_run stopped on {sig.name} in {time.monotonic() - t0:.2f} s ({mode})")

    assert g.proc.returncode is not None
    assert not [pid for pid in pids if alive(pid)]
    assert server_processes(tmp_path) == []
    busy = [p for p in ports if not port_is_free(p)]
    assert not busy, f"ports still taken after ng_run exited: {busy}"
    assert "Traceback" not in final_output(g)


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize("crash_in", ["init", "startup"])
def test_a_server_that_crashes_at_start_fails_ng_run(graph, tmp_path, mode, crash_in):
    g = start_pair(graph, tmp_path, mode, config_paths=["pair.yaml", "crash.yaml"],
                   args=[f"++crashy.resources_servers.ng_test_crash.crash_in={crash_in}"], wait=False)
    code = wait_for_exit(g)
    out = g.output()
    assert code != 0, out
    assert re.search(r"\bcrashy\b", out), f"ng_run's output does not say which server failed:\n{out}"
    assert "raised in __init__" in out if crash_in == "init" else "raised in on_startup" in out
    if mode == "processes":
        assert re.search(r"crashy.*exited.*code 1", out), out  # its name and its exit code
        last = out.split("last lines of crashy", 1)[-1]
        assert "crash server: checking the dataset before starting" in last  # its last log lines
        assert "RuntimeError" in last
    assert server_processes(tmp_path) == []  # the healthy servers were stopped too


def test_a_server_that_dies_later_is_reported_and_the_rest_are_stopped(graph, tmp_path):
    # restart: never keeps the behaviour without restarts (tests/test_restarts.py has the default).
    g = start_pair(graph, tmp_path, "processes", args=["++echo.resources_servers.ng_test_echo.restart=never"])
    servers = by_name(g)
    os.kill(servers["echo"]["pid"], signal.SIGKILL)

    code = wait_for_exit(g)
    out = g.output()
    assert code != 0, out
    assert re.search(r"'echo' exited unexpectedly with code -9 \(restart: never\)", out), out
    assert not alive(servers["caller"]["pid"])
    assert server_processes(tmp_path) == []


def test_a_head_port_in_use_is_a_clear_error(tmp_path):
    user_folder(tmp_path)
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(ENV))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # it exits on its own (run_cli's timeout fails the test on a hang; no tighter wall-clock bound
        # on a shared machine)
        result = run_cli("ng_run", ["+config_paths=[pair.yaml]", f"+head_server.port={port}"], cwd=tmp_path, timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert str(port) in out and "+head_server.port" in out
    assert "Traceback" not in out
    assert server_processes(tmp_path) == []


# ------------------------------------------------------------------ secrets


def test_an_api_key_never_shows_in_output_logs_config_or_dump(graph, tmp_path, mode):
    """The echo server logs its whole config at startup (api_key included)."""
    g = start_pair(graph, tmp_path, mode, args=["++echo.resources_servers.ng_test_echo.log_config=true", "+log_dir=logs"])
    wait_until(lambda: "my config:" in g.output(), 10, "the server's config log line")
    g.stop()
    out = final_output(g)
    assert "max_tokens=77" in out  # the line is there, only the secrets are masked
    assert SECRET not in out and HF_TOKEN not in out

    if mode == "processes":
        logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.log")}
        assert set(logs) == {"echo.log", "caller.log"}
        assert "my config:" in logs["echo.log"]
        assert not [name for name, text in logs.items() if SECRET in text or HF_TOKEN in text]

    dump = run_cli("ng_dump_config", ["+config_paths=[pair.yaml]"], cwd=tmp_path, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert SECRET not in dump.stdout + dump.stderr and HF_TOKEN not in dump.stdout
    assert yaml.safe_load(dump.stdout)["echo"]["resources_servers"]["ng_test_echo"]["api_key"] == "****"


def test_an_api_key_printed_by_a_server_is_masked_too(graph, tmp_path, mode):
    """A careless environment print()s its config instead of logging it."""
    g = start_pair(graph, tmp_path, mode, args=["++echo.resources_servers.ng_test_echo.print_config=true"])
    wait_until(lambda: "my config (print):" in g.output(), 10, "the server's printed config")
    g.stop()
    out = final_output(g)
    assert SECRET not in out and HF_TOKEN not in out, out


# ------------------------------------------------------------------ ng_status


def test_ng_status_shows_each_server_up(graph, tmp_path):
    g = start_pair(graph, tmp_path, "processes")
    result = run_cli("ng_status", [f"+head_server.port={g.head_port}"], cwd=tmp_path, timeout=30)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    for name in ("echo", "caller"):
        assert re.search(rf"\b{name}\b.*\bup\b", out), out


def test_ng_status_without_ng_run_fails_fast_naming_the_address(tmp_path):
    port = free_port()
    t0 = time.monotonic()
    result = run_cli("ng_status", [f"+head_server.port={port}"], cwd=tmp_path, timeout=90)
    elapsed = time.monotonic() - t0
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    # Generous on purpose (other processes share the machine): it catches retrying for minutes,
    # which is what "fails fast" rules out, not a few slow seconds.
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert f"127.0.0.1:{port}" in out
    assert "Traceback" not in out


# ------------------------------------------------------------------ how long startup takes


def test_startup_time_of_the_weather_graph(graph, standins, tmp_path, mode):
    """Measured and printed, not asserted: command to 'all servers ready' for the guide's graph."""
    backends = standins(1)
    t0 = time.monotonic()
    g = graph([VLLM_MODEL, WEATHER], env=weather_env(backends), colocate=mode == "colocated", wait=False)
    g.wait_ready()
    elapsed = time.monotonic() - t0
    reported = re.search(r"All 3 servers ready in ([\d.]+) s", g.output())
    assert reported, g.output()
    print(f"\nng_run weather graph ({mode}): {elapsed:.2f} s from command to all servers ready "
          f"(ng_run itself reports {reported.group(1)} s after its head server was up)")
    assert {s["name"] for s in g.servers()} == {"policy_model", "simple_weather", "simple_weather_simple_agent"}
