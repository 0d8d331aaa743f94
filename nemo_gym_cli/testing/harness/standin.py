"""A local vLLM stand-in process (`ng_vllm_standin --port 0 --port-file ...`) on a free port."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path
from typing import Iterable

from nemo_gym_cli.testing.harness.http_calls import http_get, http_json
from nemo_gym_cli.testing.harness.netns import LOCAL, Host
from nemo_gym_cli.testing.harness.processes import GaveUp, script, start_process, stop_process, wait_until
from nemo_gym_cli.testing.harness.prometheus import metric_sums, metric_total


class StandIn:
    """Started and ready (GET /health answers) once constructed; `stop()` ends it. On `host`
    (netns.py), its URL is that host's loopback: for servers on that host."""

    def __init__(self, workdir: Path, *flags: str, name: str | None = None, timeout: float = 30, host: Host = LOCAL):
        self.name = name or f"standin_{uuid.uuid4().hex[:8]}"
        self.flags = list(flags)
        port_file = Path(workdir) / f"{self.name}.port"
        port_file.unlink(missing_ok=True)
        self.log_path = port_file.with_suffix(".log")
        self.argv = [script("ng_vllm_standin"), "--port", "0", "--port-file", str(port_file), *self.flags]
        self.proc = start_process(host.argv(self.argv), self.log_path)

        def port() -> str:
            if self.proc.poll() is not None:
                raise GaveUp(f"stand-in {self.name} exited with {self.proc.returncode}:\n{self.output()[-2000:]}")
            return port_file.exists() and port_file.read_text().strip()

        try:
            self.port = int(wait_until(port, timeout, f"stand-in {self.name} port file"))
            self.root = f"http://127.0.0.1:{self.port}"
            self.url = f"{self.root}/v1"
            wait_until(lambda: host.call(http_json, self.root + "/health", timeout=2)[0] == 200, timeout,
                       f"stand-in {self.name} /health")
        except BaseException:
            self.stop()
            raise

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sessions(self) -> dict[str, int]:
        """{session id: requests} as the stand-in saw them (X-Session-ID)."""
        return json.loads(http_get(self.root + "/standin/sessions", 30))

    def stats(self) -> dict:
        return json.loads(http_get(self.root + "/standin/stats"))

    def requests(self) -> list[dict]:
        """The last requests, oldest first: {route, session[, sampling_params]} (chat, generate, render, ...)."""
        return json.loads(http_get(self.root + "/standin/requests", 30))

    def metrics_text(self) -> str:
        return http_get(self.root + "/metrics").decode()

    def metrics(self) -> dict[str, float]:
        """{sample name: sum over its label sets} of /metrics."""
        return metric_sums(self.metrics_text())

    def metric(self, name: str, **labels: str) -> float:
        return metric_total(self.metrics_text(), name, **labels)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return stop_process(self.proc, sig)


def start_standins(workdir: Path, flags_per_standin: Iterable[Iterable[str]], prefix: str = "standin") -> list[StandIn]:
    """One stand-in per entry of `flags_per_standin`, named prefix1, prefix2, ..."""
    started: list[StandIn] = []
    try:
        for i, flags in enumerate(flags_per_standin):
            started.append(StandIn(workdir, *flags, name=f"{prefix}{i + 1}"))
    except BaseException:
        for s in started:
            s.stop()
        raise
    return started
