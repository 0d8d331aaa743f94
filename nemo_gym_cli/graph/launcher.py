"""ng_run: start the head server and every server of the graph, keep them up, stop them cleanly.

Default: one process per server replica (`replicas: N`, default 1; a crash in one environment
does not take the others down), all from this Python environment. `+colocate=true`: every
server in one child process, each on its own port, calling each other without HTTP (local
dispatch). Either way the head server stays in this process, so clients never lose it, and a
process that crashes is restarted (per instance `restart: on-failure`, the default, or `never`:
a crash stops the graph), with backoff; a restart storm stops the graph with the reason.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import orjson
from rich.table import Table

from nemo_gym_cli.config import Composed, ConfigError, ServerSpec, head_address, secret_values
from nemo_gym_cli.graph import leftovers, nemo_runtime, ray_runner
from nemo_gym_cli.graph.build import COLOCATED_ARG, STDIN_ARG
from nemo_gym_cli.graph.head import HeadServer, node_label
from nemo_gym_cli.graph.preflight import backends_table, preflight_models
from nemo_gym_cli.graph.processes import LocalProcess
from nemo_gym_cli.graph.supervisor import Liveness, ReplicaRunner, RestartPolicy, Supervisor
from nemo_gym_cli.serving.client import ServerClient
from nemo_gym_cli.serving.logs import make_console, scrub

console = make_console(stderr=True)

HELP = """usage: ng_run "+config_paths=[a.yaml,b.yaml]" [+key=value ...]

Start the server graph: a head server (registry) plus one process per server instance in the
config (or all in one child process with +colocate=true). Prints a table of servers when all answer
/health; restarts a server that crashes or stops answering /health (+liveness.*); ends what a
killed ng_run left behind; Ctrl-C or SIGTERM stops everything.

Config layers, lowest to highest: conf/ defaults < config_paths files < env.yaml < command line.
Common keys: +head_server.port={head_server[port]} +colocate=true +ready_timeout_s={ready_timeout_s} +log_dir=logs
"""

# (spec, replica) -> the runner of that replica; see supervisor.py.
RunnerFactory = Callable[[ServerSpec, int], ReplicaRunner]


class Launcher:
    def __init__(self, composed: Composed, runner_factory: RunnerFactory | None = None):
        self.composed = composed
        self.config = composed.config
        self.specs = composed.servers
        self.nemo_specs = nemo_runtime.nemo_specs(self.specs)
        if self.nemo_specs:  # they read their peers' addresses once: every port fixed, before anything starts
            nemo_runtime.assign_fixed_ports(self.config, self.specs)
        self.secrets = secret_values(self.config)
        self.head = HeadServer(self.config, self.specs)
        self.runner_factory = runner_factory or self._local_process
        self.supervisors: list[Supervisor] = []
        self.tasks: dict[asyncio.Task, Supervisor] = {}
        self.stop_event = asyncio.Event()
        self.exit_code = 0
        self.backend_reports: dict[str, dict] = {}
        self.tmpdir = tempfile.TemporaryDirectory(prefix=leftovers.PREFIX)  # the graph's state folder
        self.graph_state = leftovers.GraphState(Path(self.tmpdir.name))
        self.child_config = b""
        self.liveness = Liveness.from_config(self.config)
        self.probe_client = ServerClient({"max_retries": 0})  # liveness probes of every server

    async def run(self) -> int:
        for line in leftovers.end_leftovers(Path(self.tmpdir.name).parent):
            console.print(f"ng_run: {line}", style="yellow", markup=False)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        host, port = head_address(self.config)
        try:
            await self.head.start(host, port)
        except OSError as e:
            console.print(f"[red]ng_run: cannot start the head server on {host}:{port}: {e.strerror}.[/red] "
                          f"Is another ng_run running? Stop it, or pick another port with +head_server.port=...")
            return 1
        t0 = time.monotonic()
        try:
            if not self.specs:
                console.print("[yellow]ng_run: the config defines no servers (did you pass +config_paths=[...]?)[/yellow]")
            await self._start_supervisors()
            ready = await self._wait_ready(float(self.config["ready_timeout_s"]))
            if ready and self.config["preflight"] is not False:
                ready = await self._preflight()
            if ready:
                self._print_table(time.monotonic() - t0)
                for supervisor in self.supervisors:
                    supervisor.graph_ready = True
                await self._watch()
        except Exception as e:  # e.g. a runner that cannot launch at all
            console.print(f"ng_run: {scrub(f'{type(e).__name__}: {e}', self.secrets)}", style="red", markup=False)
            self.exit_code = 1
        finally:
            await self._stop_all()
        return self.exit_code

    def _on_signal(self, sig: int) -> None:
        if not self.stop_event.is_set():
            console.print(f"ng_run: got {signal.Signals(sig).name}, stopping servers...")
        self.stop_event.set()

    # ------------------------------------------------------------ start
    async def _start_supervisors(self) -> None:
        await self._start_nemo_gym_servers()
        # The resolved config (with secrets) goes to our children through their stdin, never to disk.
        self.child_config = orjson.dumps(self._config_for_children())
        if self.config.get("log_dir"):
            Path(self.config["log_dir"]).mkdir(parents=True, exist_ok=True)
        ours = [s for s in self.specs.values() if s not in self.nemo_specs]
        if self.config.get("colocate"):
            # One process for all of ours: restart it unless an instance says never (its crash is everyone's).
            names = [s.name for s in ours]
            runner: ReplicaRunner = LocalProcess("colocated", [(n, 0) for n in names], [STDIN_ARG, COLOCATED_ARG, *names],
                                                 self.secrets, self.config.get("log_dir"), config=self.child_config,
                                                 on_started=self.graph_state.child_started)
            never = any(s.restart == "never" for s in ours)
            self._supervise(runner, None if never else RestartPolicy.from_config(self.config))
            return
        for spec in ours:
            for replica in range(spec.replicas):
                policy = None if spec.restart == "never" else RestartPolicy.from_config(self.config)
                self._supervise(self.runner_factory(spec, replica), policy)

    async def _start_nemo_gym_servers(self) -> None:
        """NeMo Gym's own servers (nemo_runtime.py), on one Ray cluster: the user's
        (`nemo_gym.ray_address`), else a Ray head of ours, started first and supervised like a server
        (restarted when it dies or stops answering)."""
        if not self.nemo_specs:
            return
        ray_address = nemo_runtime.users_ray_address(self.config)
        if ray_address is None:
            ray_head = nemo_runtime.RayHead(self.config, Path(self.tmpdir.name) / "ray", self.secrets,
                                            on_started=self.graph_state.child_started, on_restarted=self._nemo_servers_rejoin)
            self._supervise(ray_head, RestartPolicy.from_config(self.config))  # its supervisor starts it
            await ray_head.wait_serving()
            ray_address = ray_head.address
        dict_yaml = nemo_runtime.config_dict_yaml(self._config_for_children(), self.head.host_and_port, ray_address)
        for spec in self.nemo_specs:
            policy = None if spec.restart == "never" else RestartPolicy.from_config(self.config)
            self._supervise(nemo_runtime.NemoGymProcess(spec, self.config, dict_yaml, self.head, self.secrets,
                                                        on_started=self.graph_state.child_started), policy)

    def _nemo_servers_rejoin(self) -> None:
        """The Ray head was restarted: every NeMo Gym server is restarted to join the new cluster (a Ray
        driver cannot change clusters; left alone it would exit 60 s after losing its GCS)."""
        for supervisor in self.supervisors:
            runner = supervisor.runner
            if isinstance(runner, nemo_runtime.NemoGymProcess) and runner.proc is not None and runner.proc.returncode is None:
                supervisor.kill("its Ray cluster (the ray head) was restarted")

    def _supervise(self, runner: ReplicaRunner, policy: RestartPolicy | None) -> None:
        supervisor = Supervisor(runner, self.head, policy, lambda text: console.print(text, style="yellow", markup=False),
                                self.liveness, self.probe_client.health_problem)
        self.supervisors.append(supervisor)
        self.tasks[asyncio.create_task(supervisor.run())] = supervisor

    def _local_process(self, spec: ServerSpec, replica: int) -> ReplicaRunner:
        label = spec.label(replica)
        args = [STDIN_ARG, spec.name] + ([str(replica)] if replica else [])
        return LocalProcess(label, [(spec.name, replica)], args, self.secrets, self.config.get("log_dir"),
                            config=self.child_config, on_started=self.graph_state.child_started)

    def _config_for_children(self) -> dict:
        config = dict(self.config)
        host, _ = head_address(self.config)  # the port it got (the configured one, or any free one)
        config["head_server"] = {**(config.get("head_server") or {}), "host": host, "port": self.head.host_and_port[1]}
        return config

    # ------------------------------------------------------------ readiness and watching
    async def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        probe = ServerClient({"max_retries": 0})
        pending = set(self.head.servers)
        try:
            while pending:
                if self.stop_event.is_set() or self._ended():
                    return False
                for key in list(pending):
                    entry = self.head.servers[key]
                    if entry["url"] is None:
                        continue
                    try:
                        await probe.request_json("GET", entry["url"] + entry["probe_path"], server=key[0], timeout_s=2, retries=0)
                        pending.discard(key)
                        self.head.set_state(*key, "ready")
                    except Exception:
                        pass
                if pending and time.monotonic() > deadline:
                    names = sorted({name for name, _ in pending})
                    console.print(f"[red]ng_run: not ready after {timeout_s:.0f} s: {', '.join(names)} "
                                  f"(raise +ready_timeout_s=... if a server needs longer to start)[/red]")
                    for supervisor in self.supervisors:
                        if any(m in pending for m in supervisor.runner.members):
                            self._print_last_lines(supervisor.runner)
                    self.exit_code = 1
                    return False
                if pending:
                    await asyncio.sleep(0.05)
            return True
        finally:
            await probe.close()

    async def _preflight(self) -> bool:
        """Model adapters check their backends (+preflight=false skips it); an error stops ng_run (exit 2)."""
        errors, warnings, self.backend_reports = await preflight_models(list(self.head.servers.values()))
        for line in warnings:
            console.print(f"ng_run: warning: {scrub(line, self.secrets)}", style="yellow", markup=False)
        for line in errors:
            console.print(f"ng_run: {scrub(line, self.secrets)}", style="red", markup=False)
        if errors:
            console.print("ng_run: preflight failed; fix the config or the servers (or skip the check with +preflight=false)",
                          style="red", markup=False)
            self.exit_code = 2
        return not errors

    def _ended(self) -> bool:
        """A supervisor has ended (a server died while starting, a storm): report it."""
        for task, supervisor in self.tasks.items():
            if not task.done() or task.cancelled():
                continue
            error = task.exception()
            reason = f"supervising '{supervisor.runner.label}' failed: {type(error).__name__}: {error}" if error else task.result()
            if reason:
                console.print(f"ng_run: {scrub(reason, self.secrets)}; stopping the others.", style="red", markup=False)
                self._print_last_lines(supervisor.runner)
                self.exit_code = 1
                return True
        return False

    def _print_last_lines(self, runner: ReplicaRunner) -> None:
        lines = runner.last_lines()
        if lines:
            console.print(f"--- last lines of {runner.label} ---", markup=False)
            for line in lines:
                console.print(f"  {line}", markup=False)

    async def _watch(self) -> None:
        stop = asyncio.create_task(self.stop_event.wait())
        await asyncio.wait([stop, *self.tasks], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not self.stop_event.is_set():
            self._ended()

    def _print_table(self, seconds: float) -> None:
        table = Table(title=f"All {len(self.specs)} servers ready in {seconds:.2f} s (head server {self.head.url})")
        with_replicas = any(s.replicas > 1 for s in self.specs.values())
        with_nodes = len({s["node"] for s in self.head.servers.values()}) > 1  # e.g. Ray actors on several nodes
        columns = ("name", "type", "impl", *(("replica",) if with_replicas else ()), "url", "pid", *(("node",) if with_nodes else ()))
        for col in columns:
            table.add_column(col)
        for s in self.head.servers.values():
            table.add_row(s["name"], s["server_type"], s["impl"], *((str(s["replica"]),) if with_replicas else ()),
                          s["url"], str(s["pid"]), *((node_label(s),) if with_nodes else ()))
        console.print(table)
        if self.backend_reports:
            console.print(backends_table(self.backend_reports))
        sys.stderr.flush()

    # ------------------------------------------------------------ stop
    async def _stop_all(self) -> None:
        grace = float(self.config["stop_grace_s"])
        for supervisor in self.supervisors:
            supervisor.stopping = True
        for task in self.tasks:
            task.cancel()  # a supervisor waiting out a backoff stops waiting
        await asyncio.gather(*self.tasks, return_exceptions=True)
        # The Ray head last: NeMo Gym's servers leave its cluster first.
        ray_heads = [s for s in self.supervisors if isinstance(s.runner, nemo_runtime.RayHead)]
        await asyncio.gather(*(s.stop(grace) for s in self.supervisors if s not in ray_heads), return_exceptions=True)
        await asyncio.gather(*(s.stop(grace) for s in ray_heads), return_exceptions=True)
        await self.head.stop()
        await self.probe_client.close()
        self.tmpdir.cleanup()


async def run_graph(composed: Composed) -> int:
    try:
        Liveness.from_config(composed.config)  # checked before anything starts
    except ConfigError as e:
        console.print(f"ng_run: {e.render()}", style="red", markup=False)
        return 2
    if not ray_runner.ray_address(composed.config):
        return await Launcher(composed).run()
    # On a Ray cluster: the same launcher, with every replica a Ray actor (ray_runner.py).
    problems = ray_runner.check_ray_config(composed.config, composed.servers)
    if problems:
        console.print("ng_run: " + "\n  ".join(["the Ray settings have problems:", *problems]), style="red", markup=False)
        return 2
    try:
        ray = ray_runner.connect(composed.config)
    except ray_runner.RayUnavailable as e:
        console.print(f"ng_run: {e}", style="red", markup=False)
        return 1
    launcher = Launcher(composed)
    try:
        replicas = ray_runner.RayReplicas(ray, launcher.config, launcher.head, lambda text: console.print(text, markup=False))
    except ray_runner.RayUnavailable as e:
        console.print(f"ng_run: {e}", style="red", markup=False)
        ray.shutdown()
        return 1
    launcher.runner_factory = replicas.runner
    try:
        return await launcher.run()
    finally:
        replicas.close()
        ray.shutdown()
