"""NeMo Gym's own servers in our graph, started under NeMo Gym's launch contract.

Each runs unmodified, as `<nemo_gym.python> <entrypoint>` in its folder (PYTHONPATH: that folder
and its tree), exactly as NeMo Gym's ng_run starts it:
- `NEMO_GYM_CONFIG_DICT`: the whole resolved config as YAML, holding every server's host and
  port, `head_server`, `dry_run` and `ray_head_node_address`; `NEMO_GYM_CONFIG_PATH`: its
  instance name. Secrets are in that variable only (never on a command line; its output is
  scrubbed like our servers').
- A NeMo Gym server reads its peers' addresses once, at start, so every single-replica server of
  the graph (ours too) gets a fixed port, kept across restarts.
- One Ray cluster for all of them: the user's (`nemo_gym.ray_address`, as NeMo Gym's
  `ray_head_node_address`), else a Ray head that ng_run starts with their Python (Ray's and
  Python's versions must match exactly) and stops with the graph. (`+ray.address`, our servers as
  Ray actors, is refused with NeMo Gym servers: ray_runner.check_ray_config says why.)
- The Ray head is supervised too: probed through its dashboard agent's /api/healthz (503 when the
  GCS does not answer), restarted on its ports when it dies or freezes; then every NeMo Gym server
  is restarted, as a Ray driver cannot join a new cluster (it would exit 60 s after losing its GCS).
- Ready when `GET /` answers (they have no /health); then ng_run registers them with the head
  server (name, url, pid) and supervises them like ours.
Their code is never imported by ours.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
from pathlib import Path
from typing import Callable

import yaml

from nemo_gym_cli.config import ServerSpec, head_address
from nemo_gym_cli.config.nemo_gym import nemo_gym_python
from nemo_gym_cli.config.paths import base_defaults
from nemo_gym_cli.config.specs import NEMO_GYM
from nemo_gym_cli.graph.head import HeadServer
from nemo_gym_cli.graph.processes import LocalProcess
from nemo_gym_cli.serving.client import ServerClient

CONFIG_DICT_ENV = "NEMO_GYM_CONFIG_DICT"
CONFIG_PATH_ENV = "NEMO_GYM_CONFIG_PATH"
READY_PATH = "/"  # NeMo Gym's liveness route
READY_POLL_S = 0.1
PORT_TRIES = 200
RAY_HEAD_LABEL = "ray head"
RAY_STOP_GRACE_S = 2.0  # our own cluster, alone in its temporary folder: no 30 s drain
RAY_HEALTH_PATH = "/api/healthz"  # of its dashboard agent: the raylet's and the GCS's health (a frozen GCS: 503)
RAY_HEALTH_POLL_S = 0.5  # until the agent first answers (it starts many seconds after the GCS)

OnStarted = Callable[[str, int, list[str]], None]  # the graph's leftovers record (processes.py)


def nemo_specs(specs: dict[str, ServerSpec]) -> list[ServerSpec]:
    return [s for s in specs.values() if s.runtime == NEMO_GYM]


def _nemo_settings(config: dict) -> dict:
    return {**base_defaults()["nemo_gym"], **(config.get("nemo_gym") or {})}


def users_ray_address(config: dict) -> str | None:
    """`nemo_gym.ray_address`: the user's Ray cluster for NeMo Gym's servers, or None (ng_run starts one)."""
    address = _nemo_settings(config).get("ray_address")
    return str(address) if address else None


def assign_fixed_ports(config: dict, specs: dict[str, ServerSpec]) -> None:
    """Give every single-replica server without a `port` a free fixed one (and its host), in
    `nemo_gym.port_range`, written into its instance config: ours bind it, NeMo Gym's read it.
    (Replicated servers of ours keep binding any port: no NeMo Gym server may call them.)"""
    low, high = (int(p) for p in _nemo_settings(config)["port_range"])
    default_host = str(config["default_host"])  # conf/base.yaml
    taken = {head_address(config)[1]} | {int(s.config["port"]) for s in specs.values() if s.config.get("port")}
    for spec in specs.values():
        if spec.replicas != 1 or spec.config.get("port"):
            continue
        host = str(spec.config.get("host") or default_host)
        spec.config["host"] = host
        spec.config["port"] = _free_port_in(host, low, high, taken)
        taken.add(spec.config["port"])


def _free_port_in(host: str, low: int, high: int, taken: set[int]) -> int:
    for _ in range(PORT_TRIES):
        port = random.randint(low, high)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in nemo_gym.port_range [{low}, {high}] on {host} after {PORT_TRIES} tries")


def config_dict_yaml(config: dict, head: tuple[str, int], ray_address: str) -> str:
    """NEMO_GYM_CONFIG_DICT: the resolved config with head_server (host, port), dry_run and the Ray address."""
    host, port = head
    data = {**config, "head_server": {"host": host, "port": port}, "dry_run": bool(config.get("dry_run", False)),
            "ray_head_node_address": ray_address}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _their_environment() -> dict[str, str]:
    """Ours, without what would point their Python at our packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _environment(spec: ServerSpec, dict_yaml: str) -> dict[str, str]:
    assert spec.folder is not None
    env = _their_environment()
    # The server's folder (`import app`) and its tree (`resources_servers.<x>.app`), as NeMo Gym does.
    env["PYTHONPATH"] = f"{spec.folder}{os.pathsep}{spec.folder.parent.parent}"
    env["PYTHONUNBUFFERED"] = "1"
    env[CONFIG_DICT_ENV] = dict_yaml
    env[CONFIG_PATH_ENV] = spec.name
    return env


class NemoGymProcess(LocalProcess):
    """A NeMo Gym server as a ReplicaRunner: `python app.py` in its folder; registered with the head
    server (in this process) once `GET /` answers, after every start."""

    def __init__(self, spec: ServerSpec, config: dict, dict_yaml: str, head: HeadServer, secrets: set[str],
                 on_started: OnStarted | None = None):
        python = nemo_gym_python(config)
        assert python is not None and spec.folder is not None  # validate_servers checked both
        super().__init__(spec.name, [(spec.name, 0)], [], secrets, config.get("log_dir"),
                         command=[str(Path(python).expanduser()), str(spec.config.get("entrypoint", "app.py"))],
                         cwd=str(spec.folder), env=_environment(spec, dict_yaml), on_started=on_started)
        self.url = f"http://{spec.config['host']}:{spec.config['port']}"
        self.head = head
        self.probe = ServerClient({"max_retries": 0})
        self.registering: asyncio.Task | None = None

    async def start(self) -> None:
        await super().start()
        self.registering = asyncio.create_task(self._register_when_ready())

    async def _register_when_ready(self) -> None:
        while self.proc is not None and self.proc.returncode is None:
            try:
                if await self.probe.health_status(self.url + READY_PATH, 2) < 500:
                    self.head.register(self.label, self.url, self.pid or 0)
                    return
            except Exception:
                pass  # not listening yet
            await asyncio.sleep(READY_POLL_S)

    async def wait(self) -> str:
        how = await super().wait()
        self._stop_registering()
        return how

    def _stop_registering(self) -> None:
        if self.registering is not None:
            self.registering.cancel()
            self.registering = None

    async def stop(self, grace_s: float) -> None:
        self._stop_registering()
        await super().stop(grace_s)
        await self.probe.close()


class RayHead(LocalProcess):
    """A Ray head on this machine for the NeMo Gym servers of one graph, run with their Python by
    `ray start --head --block` in its own process group (stopping it stops the whole cluster; it
    exits itself when its GCS or raylet dies). Its ports are free ones, never Ray's defaults
    (another cluster on the machine may hold them), kept across restarts (the NeMo Gym servers
    have its address); its files live in ng_run's temporary folder. `on_restarted()`: a restarted
    head serves again."""

    def __init__(self, config: dict, temp_dir: Path, secrets: set[str], on_started: OnStarted | None = None,
                 on_restarted: Callable[[], None] | None = None):
        python = str(Path(nemo_gym_python(config) or sys.executable).expanduser())
        self.timeout_s = float(_nemo_settings(config)["ray_start_timeout_s"])
        self.port, self.agent_port = _loopback_free_port(), _loopback_free_port()
        ports = ["--port", str(self.port), "--ray-client-server-port", str(_loopback_free_port()),
                 "--dashboard-agent-listen-port", str(self.agent_port), "--min-worker-port", "0", "--max-worker-port", "0"]
        command = [python, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()",
                   "start", "--head", "--block", "--node-ip-address", "127.0.0.1", *ports, "--include-dashboard=false",
                   "--disable-usage-stats", "--temp-dir", str(temp_dir)]
        super().__init__(RAY_HEAD_LABEL, [], [], secrets, config.get("log_dir"), command=command, env=_their_environment(),
                         on_started=on_started)
        self.address = f"127.0.0.1:{self.port}"
        self.on_restarted = on_restarted
        self.probe = ServerClient({"max_retries": 0})
        self.lives = 0
        self.agent_up = False  # its agent answered /api/healthz in this life: liveness probes it from then on
        self.watching: asyncio.Task | None = None

    async def start(self) -> None:
        if self.watching is not None:
            self.watching.cancel()  # the last life's
        self.agent_up = False
        await super().start()
        self.lives += 1
        self.watching = asyncio.create_task(self._watch_start(restarted=self.lives > 1))

    async def _watch_start(self, restarted: bool) -> None:
        if restarted:
            try:
                await self.wait_serving()
            except RuntimeError as e:
                self.lines.append(str(e))
                self.kill()  # its supervisor restarts it again, or gives up (a restart storm)
                return
            if self.on_restarted is not None:
                self.on_restarted()
        while self.proc is not None and self.proc.returncode is None:
            try:
                await self.probe.health_status(self.agent_url + RAY_HEALTH_PATH, 2)
                self.agent_up = True  # from now on a 503 (its GCS does not answer) is a failed probe
                return
            except Exception:
                pass  # not listening yet
            await asyncio.sleep(RAY_HEALTH_POLL_S)

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.agent_port}"

    def liveness_targets(self) -> list[dict]:
        """For its supervisor's liveness probes (supervisor.py): its agent, once it answered."""
        if not self.agent_up or self.pid is None:
            return []
        return [{"name": RAY_HEAD_LABEL, "replica": 0, "pid": self.pid, "url": self.agent_url, "state": "ready",
                 "probe_path": RAY_HEALTH_PATH}]

    async def stop(self, grace_s: float) -> None:
        if self.watching is not None:
            self.watching.cancel()
        await super().stop(min(grace_s, RAY_STOP_GRACE_S))
        await self.probe.close()

    async def wait_serving(self) -> None:
        """Until its GCS accepts connections; raises if it exits or takes longer than ray_start_timeout_s."""
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            if self.proc is not None and self.proc.returncode is not None:
                lines = "\n  ".join(self.last_lines()[-10:])
                raise RuntimeError(f"the Ray head for the NeMo Gym servers exited while starting:\n  {lines}")
            if self.proc is not None:  # (its supervisor starts it)
                try:
                    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 1)
                    writer.close()
                    return
                except (OSError, asyncio.TimeoutError):
                    pass
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"the Ray head for the NeMo Gym servers did not start within {self.timeout_s:g} s "
                                   f"(raise +nemo_gym.ray_start_timeout_s=...)")
            await asyncio.sleep(0.2)


def _loopback_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
