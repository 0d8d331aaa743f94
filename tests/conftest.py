"""Fixtures that start real processes on free ports and poll for readiness (never fixed sleeps).

- `standins(n, *flags)`: local vLLM stand-ins (`python -m nemo_gym_cli.testing.vllm_standin`).
- `graph(config_paths, env=..., args=...)`: a real `ng_run` in a temporary working directory,
  with its own head server port; waits until every server answers, stops it at teardown.
- `run_cli(...)`: runs a console script (ng_collect_rollouts, ng_dump_config, ...) to completion.
Set NG_TEST_COLOCATE=1 (or use the `mode` fixture) to run the graph with +colocate=true.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(sys.executable).parent  # the console scripts installed with the project


def script(name: str) -> str:
    return str(BIN / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 10, headers: dict | None = None):
    """A plain blocking HTTP call; returns (status, parsed JSON or text)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")


class GaveUp(Exception):
    """Raised by a wait_until predicate when waiting longer cannot help (the process died)."""


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except GaveUp:
            raise
        except Exception as e:  # not up yet
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


def stop_process(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 15) -> int:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


class StandIn:
    def __init__(self, tmp: Path, *flags: str):
        port_file = tmp / f"standin_{free_port()}.port"
        self.log_path = port_file.with_suffix(".log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([PY, "-m", "nemo_gym_cli.testing.vllm_standin", "--port", "0", "--port-file", str(port_file), *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.port = int(wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 30, "stand-in port"))
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/v1"
        wait_until(lambda: http_json(self.root + "/health")[0] == 200, 30, "stand-in /health")

    def sessions(self) -> dict:
        return http_json(self.root + "/standin/sessions")[1]

    def stats(self) -> dict:
        return http_json(self.root + "/standin/stats")[1]

    def metric(self, name: str) -> float:
        status, text = http_json(self.root + "/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))

    def stop(self, sig=signal.SIGTERM):
        stop_process(self.proc, sig)
        self.log.close()


class Graph:
    """A running `ng_run` (its own head port, its own working directory)."""

    def __init__(self, cwd: Path, config_paths: list[str], env_yaml: dict | None, args: list[str], colocate: bool,
                 wait: bool = True, timeout: float = 60):
        self.cwd = cwd
        self.head_port = free_port()
        if env_yaml is not None:
            (cwd / "env.yaml").write_text(yaml.safe_dump(env_yaml))
        self.args = [f"+config_paths=[{','.join(config_paths)}]", f"+head_server.port={self.head_port}", *args]
        if colocate:
            self.args.append("+colocate=true")
        self.log_path = cwd / f"ng_run_{self.head_port}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([script("ng_run"), *self.args], cwd=cwd, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.head = f"http://127.0.0.1:{self.head_port}"
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60):
        def ready():
            if self.proc.poll() is not None:
                raise GaveUp(f"ng_run exited with {self.proc.returncode}:\n{self.output()}")
            servers = http_json(self.head + "/servers", timeout=2)[1]
            return servers and all(s["state"] == "ready" for s in servers) and "servers ready" in self.output()

        try:
            wait_until(ready, timeout, "ng_run ready")
        except TimeoutError:
            raise TimeoutError(f"ng_run not ready:\n{self.output()}") from None

    def servers(self) -> list[dict]:
        return http_json(self.head + "/servers")[1]

    def url(self, name: str) -> str:
        return next(s["url"] for s in self.servers() if s["name"] == name)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM) -> int:
        code = stop_process(self.proc, sig, timeout=30)
        self.log.close()
        return code


@pytest.fixture
def standins(tmp_path):
    started: list[StandIn] = []

    def start(n: int = 1, *flags: str) -> list[StandIn]:
        new = [StandIn(tmp_path, *flags) for _ in range(n)]
        started.extend(new)
        return new

    yield start
    for s in started:
        s.stop()


@pytest.fixture(params=["processes", "colocated"] if os.environ.get("NG_TEST_BOTH_MODES", "1") == "1" else ["processes"])
def mode(request) -> str:
    return request.param


@pytest.fixture
def graph(tmp_path):
    started: list[Graph] = []

    def start(config_paths: list[str], env: dict | None = None, args: list[str] = (), colocate: bool = False,
              wait: bool = True, timeout: float = 60) -> Graph:
        g = Graph(tmp_path, list(config_paths), env, list(args), colocate or os.environ.get("NG_TEST_COLOCATE") == "1", wait, timeout)
        started.append(g)
        return g

    yield start
    for g in started:
        g.stop()


def run_cli(name: str, args: list[str], cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a console script (ng_collect_rollouts, ng_dump_config, ...) to completion."""
    return subprocess.run([script(name), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def weather_env(standins: list[StandIn]) -> dict:
    return {"policy_base_url": ",".join(s.url for s in standins), "policy_api_key": "EMPTY", "policy_model_name": "standin-model"}


VLLM_MODEL = "responses_api_models/vllm_model/configs/vllm_model.yaml"
WEATHER = "resources_servers/simple_weather/configs/simple_weather.yaml"
