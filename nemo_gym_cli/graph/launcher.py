"""ng_run: start the head server and every server of the graph, watch them, stop them cleanly.

Default: one process per server instance (a crash in one environment does not take the
others down), all from this Python environment. `+colocate=true`: every server in this
process, each on its own port, calling each other without HTTP (local dispatch).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import orjson

from rich.table import Table

from nemo_gym_cli.serving.client import ServerClient
from nemo_gym_cli.config import Composed, ServerSpec, head_address, secret_values
from nemo_gym_cli.graph.build import RunningServer, bind_address, build_server, serve
from nemo_gym_cli.graph.head import HeadServer
from nemo_gym_cli.graph.preflight import backends_table, preflight_models
from nemo_gym_cli.serving.logs import ScrubbingStream, make_console, scrub

console = make_console(stderr=True)
LAST_LINES = 40


def _die_with_parent() -> None:
    """Child side of fork: get SIGTERM if ng_run itself dies (even by SIGKILL). Linux only."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Child:
    """One server process: its output is prefixed with its name and its last lines kept."""

    def __init__(self, spec: ServerSpec, proc: asyncio.subprocess.Process, secrets: set[str], log_file):
        self.spec, self.proc, self.secrets, self.log_file = spec, proc, secrets, log_file
        self.last_lines: collections.deque[str] = collections.deque(maxlen=LAST_LINES)
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        assert self.proc.stdout is not None
        prefix = f"[{self.spec.name}] "
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                return
            text = scrub(line.decode(errors="replace").rstrip("\n"), self.secrets)
            self.last_lines.append(text)
            sys.stderr.write(prefix + text + "\n")
            if self.log_file:
                self.log_file.write(text + "\n")
                self.log_file.flush()


class Launcher:
    def __init__(self, composed: Composed):
        self.composed = composed
        self.config = composed.config
        self.specs = composed.servers
        self.secrets = secret_values(self.config)
        self.head = HeadServer(self.config, self.specs)
        self.children: dict[str, Child] = {}
        self.colocated: list[RunningServer] = []
        self.client: ServerClient | None = None
        self.stop_event = asyncio.Event()
        self.exit_code = 0
        self.backend_reports: dict[str, dict] = {}
        self.tmpdir = tempfile.TemporaryDirectory(prefix="ng_run_")

    async def run(self) -> int:
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
            if self.config.get("colocate"):
                await self._start_colocated()
            else:
                await self._start_processes()
            ready = await self._wait_ready(float(self.config.get("ready_timeout_s", 60)))
            if ready and self.config.get("preflight", True) is not False:
                ready = await self._preflight()
            if ready:
                self._print_table(time.monotonic() - t0)
                await self._watch()
        except Exception as e:  # a server that cannot start in colocate mode, etc.
            message = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
            console.print(f"ng_run: {scrub(message, self.secrets)}", style="red", markup=False)
            self.exit_code = 1
        finally:
            await self._stop_all()
        return self.exit_code

    def _on_signal(self, sig: int) -> None:
        if not self.stop_event.is_set():
            console.print(f"ng_run: got {signal.Signals(sig).name}, stopping servers...")
        self.stop_event.set()

    # ------------------------------------------------------------ start
    async def _start_processes(self) -> None:
        config_file = Path(self.tmpdir.name) / "config.json"
        # The resolved config (with secrets) goes to children through a file only we can read.
        fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(self._config_for_children()))
        log_dir = self.config.get("log_dir")
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name, spec in self.specs.items():
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nemo_gym_cli.graph.child", str(config_file), name,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                env=env, start_new_session=True, preexec_fn=_die_with_parent,
            )
            log_file = open(Path(log_dir) / f"{name}.log", "a") if log_dir else None
            self.children[name] = Child(spec, proc, self.secrets, log_file)

    def _config_for_children(self) -> dict:
        config = dict(self.config)
        config["head_server"] = {**(config.get("head_server") or {}), "port": int(self.head.url.rsplit(":", 1)[1])}
        return config

    async def _start_colocated(self) -> None:
        config = self._config_for_children()
        if self.secrets:  # servers share our stdout here: mask what they print, as the pump does
            sys.stdout = ScrubbingStream(sys.stdout, self.secrets)
            sys.stderr = ScrubbingStream(sys.stderr, self.secrets)
        local: dict = {}
        self.client = ServerClient(config.get("http_client"), self.head.url, local_servers=local)
        for spec in self.specs.values():
            try:
                local[spec.name] = build_server(spec, config, self.client)
            except Exception as e:
                raise RuntimeError(f"server '{spec.name}' ({spec.server_type}/{spec.impl}) cannot start: {type(e).__name__}: {e}") from e
        for spec in self.specs.values():
            try:
                running = await serve(local[spec.name], *bind_address(spec, config))
            except Exception as e:
                raise RuntimeError(f"server '{spec.name}' ({spec.server_type}/{spec.impl}) failed to start: {type(e).__name__}: {e}") from e
            self.colocated.append(running)
            self.head.register(spec.name, running.url, os.getpid())
            console.print(f"[{spec.name}] serving {spec.server_type}/{spec.impl} at {running.url} (colocated)", markup=False)

    # ------------------------------------------------------------ readiness and watching
    async def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        probe = ServerClient({"max_retries": 0})
        pending = set(self.specs)
        try:
            while pending:
                if self.stop_event.is_set():
                    return False
                dead = self._dead_child()
                if dead:
                    self._report_death(dead, "while starting")
                    return False
                for name in list(pending):
                    url = self.head.servers[name]["url"]
                    if url is None:
                        continue
                    try:
                        await probe.request_json("GET", f"{url}/health", server=name, timeout_s=2, retries=0)
                        pending.discard(name)
                        self.head.set_state(name, "ready")
                    except Exception:
                        pass
                if pending and time.monotonic() > deadline:
                    console.print(f"[red]ng_run: not ready after {timeout_s:.0f} s: {', '.join(sorted(pending))} "
                                  f"(raise +ready_timeout_s=... if a server needs longer to start)[/red]")
                    for name in sorted(pending):
                        self._print_last_lines(name)
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

    def _dead_child(self) -> Child | None:
        for child in self.children.values():
            if child.proc.returncode is not None:
                return child
        return None

    def _report_death(self, child: Child, when: str) -> None:
        self.head.set_state(child.spec.name, "exited")
        console.print(f"[red]ng_run: server '{child.spec.name}' exited {when} with code {child.proc.returncode}; "
                      f"stopping the others.[/red]")
        self._print_last_lines(child.spec.name)
        self.exit_code = 1

    def _print_last_lines(self, name: str) -> None:
        child = self.children.get(name)
        if child and child.last_lines:
            console.print(f"--- last lines of {name} ---", markup=False)
            for line in child.last_lines:
                console.print(f"  {line}", markup=False)

    async def _watch(self) -> None:
        waits = {asyncio.create_task(c.proc.wait()): c for c in self.children.values()}
        stop = asyncio.create_task(self.stop_event.wait())
        done, _ = await asyncio.wait([stop, *waits], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task in waits and not self.stop_event.is_set():
                await waits[task].pump  # let its last lines arrive
                self._report_death(waits[task], "unexpectedly")
        for task in [stop, *waits]:
            task.cancel()

    def _print_table(self, seconds: float) -> None:
        table = Table(title=f"All {len(self.specs)} servers ready in {seconds:.2f} s (head server {self.head.url})")
        for col in ("name", "type", "impl", "url", "pid"):
            table.add_column(col)
        for s in self.head.servers.values():
            table.add_row(s["name"], s["server_type"], s["impl"], s["url"], str(s["pid"]))
        console.print(table)
        if self.backend_reports:
            console.print(backends_table(self.backend_reports))
        sys.stderr.flush()

    # ------------------------------------------------------------ stop
    async def _stop_all(self) -> None:
        grace = float(self.config.get("stop_grace_s", 10))
        for child in self.children.values():
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children.values():
            try:
                await asyncio.wait_for(child.proc.wait(), max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                console.print(f"ng_run: '{child.spec.name}' did not stop within {grace:.0f} s; killing it")
            _signal_group(child.proc, signal.SIGKILL)  # whatever it started, too
            await child.proc.wait()
            await child.pump
            if child.log_file:
                child.log_file.close()
        for running in self.colocated:
            await running.stop()
        if self.client:
            await self.client.close()
        await self.head.stop()
        self.tmpdir.cleanup()


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def run_graph(composed: Composed) -> int:
    return await Launcher(composed).run()
