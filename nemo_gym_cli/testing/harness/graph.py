"""A running `ng_run` graph in its own working directory with its own head server port."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Iterable

import psutil
import yaml

from nemo_gym_cli.testing.harness.http_calls import http_json
from nemo_gym_cli.serving.head_client import HeadClient
from nemo_gym_cli.testing.harness.netns import LOCAL, Host
from nemo_gym_cli.testing.harness.processes import GaveUp, free_port, script, start_process, stop_process, wait_until

# The weather graph every test and bench starts: the vLLM adapter + simple_weather (+ its agent).
VLLM_MODEL = "responses_api_models/vllm_model/configs/vllm_model.yaml"
WEATHER = "resources_servers/simple_weather/configs/simple_weather.yaml"
WEATHER_AGENT = "simple_weather_simple_agent"
READY_LINE = re.compile(r"servers\s+ready")  # ng_run's "All N servers ready in ..." (may wrap)


def weather_env(standins: Iterable) -> dict:
    """env.yaml for the weather graph pointing at stand-ins (objects with .url) or base URLs."""
    urls = [s if isinstance(s, str) else s.url for s in standins]
    return {"policy_base_url": ",".join(urls), "policy_api_key": "EMPTY", "policy_model_name": "standin-model"}


class Graph:
    """`ng_run +config_paths=[...]` started in `cwd` (env.yaml written there, like a user would),
    on `host` (netns.py: another network namespace; the head server is reached there)."""

    def __init__(self, cwd: Path, config_paths: Iterable[str], env_yaml: dict | None = None, args: Iterable[str] = (),
                 colocate: bool = False, wait: bool = True, timeout: float = 60, head_port: int | None = None,
                 host: Host = LOCAL, process_env: dict | None = None):
        """head_port: the head server's port (default: a free one), e.g. to restart a killed graph where it was."""
        self.cwd, self.host = Path(cwd), host
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.head_port = head_port or free_port()
        self.head = f"http://127.0.0.1:{self.head_port}"
        if env_yaml is not None:
            (self.cwd / "env.yaml").write_text(yaml.safe_dump(env_yaml))
        self.colocate = colocate
        self.args = [f"+config_paths=[{','.join(config_paths)}]", f"+head_server.port={self.head_port}", *args]
        if colocate:
            self.args.append("+colocate=true")
        self.log_path = self.cwd / f"ng_run_{self.head_port}.log"
        self.proc = start_process(host.argv([script("ng_run"), *self.args]), self.log_path, cwd=self.cwd, env=process_env)
        self.startup_s: float | None = None
        self.children: list[psutil.Process] = []  # ng_run's process tree once ready
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()
                raise

    def wait_ready(self, timeout: float = 60) -> "Graph":
        """Every server registered and ready, and ng_run said so; raises with ng_run's output if not."""
        t0 = time.monotonic()

        def ready():
            if self.proc.poll() is not None:
                raise GaveUp(f"ng_run exited with {self.proc.returncode}:\n{self.output()}")
            servers = self.host.call(http_json, self.head + HeadClient.SERVERS, timeout=2)[1]
            return servers and all(s["state"] == "ready" for s in servers) and READY_LINE.search(self.output())

        try:
            wait_until(ready, timeout, "ng_run ready")
        except TimeoutError:
            raise TimeoutError(f"ng_run not ready after {timeout:g} s:\n{self.output()}") from None
        self.startup_s = time.monotonic() - t0
        try:
            self.children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            self.children = []
        return self

    def servers(self) -> list[dict]:
        return self.host.call(http_json, self.head + HeadClient.SERVERS)[1]

    def url(self, name: str) -> str:
        return next(s["url"] for s in self.servers() if s["name"] == name)

    def pids(self) -> dict[str, int]:
        """{"ng_run": pid, "<instance>": pid} (colocated servers share ng_run's pid)."""
        return {"ng_run": self.proc.pid, **{s["name"]: s["pid"] for s in self.servers()}}

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Signal ng_run (it stops its own servers, as it does for a user) and wait for it."""
        return stop_process(self.proc, sig, timeout=timeout)

    def kill_leftovers(self) -> None:
        """SIGKILL servers that outlived ng_run (a teardown safety net, never part of a check)."""
        for child in self.children:
            try:
                child.kill()  # psutil checks the pid still names that process
            except psutil.NoSuchProcess:
                pass
