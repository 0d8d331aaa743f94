"""Shared helpers for the bench/ scripts.

Everything is started the way a user starts it: the console scripts installed next to the
Python running the benchmark (`ng_vllm_standin`, `ng_run`, `ng_collect_rollouts`), on free
ports, in a temporary working directory, and stopped at the end (also on Ctrl-C).

Measurement:
- wall time of a whole command (the collector, the direct client), from spawn to exit;
- CPU seconds (user + system): for a command, from os.wait4() of that exact child (its whole
  life, nothing else); for long-lived processes (ng_run and ALL its children, the
  stand-ins), psutil deltas over the command's run;
- peak RSS: sampled with psutil every ~50 ms for every tracked process; for a command, also
  ru_maxrss from os.wait4() (the kernel's exact peak).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import psutil
from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
PY = sys.executable
BIN = Path(sys.executable).parent  # the console scripts installed with the project

VLLM_MODEL = "responses_api_models/vllm_model/configs/vllm_model.yaml"
WEATHER = "resources_servers/simple_weather/configs/simple_weather.yaml"
WEATHER_AGENT = "simple_weather_simple_agent"
MODEL_KEY = "policy_model.responses_api_models.vllm_model"
AGENT_KEY = "simple_weather_simple_agent.responses_api_agents.simple_agent"

console = Console(width=None if sys.stdout.isatty() else 220, highlight=False, soft_wrap=False, record=True)


def begin_report() -> None:
    """From here on, what is printed is the report (kept in the results JSON for run_all.py)."""
    console.export_text(clear=True)


def end_report() -> str:
    return console.export_text(clear=True)


ERRORS: list[str] = []  # failed or incomplete runs: the script exits 1


def fail(message: str, detail: str = "") -> None:
    ERRORS.append(message)
    console.print(message)
    if detail:
        console.print(detail, markup=False, highlight=False)


def exit_code() -> int:
    if ERRORS:
        console.print(f"[red]{len(ERRORS)} run(s) failed or were incomplete (see above)[/red]")
    return 1 if ERRORS else 0


def script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise SystemExit(f"{path} not found: install the project into this Python first (pip install -e {PROJECT_ROOT})")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # not up yet
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what} (last error: {last})")


def parse_int_list(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def parse_str_list(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def mb(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / (1024 * 1024)


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# ---------------------------------------------------------------------------------------
# Dataset rows (the simple_weather format of resources_servers/simple_weather/data/example.jsonl)
# ---------------------------------------------------------------------------------------

DEVELOPER = "You are a helpful personal assistant that aims to be helpful and reduce any pain points the user has."
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": ""}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
CITIES = ["SF", "Tokyo", "Berlin", "Paris", "Lagos", "Lima", "Oslo", "Seoul", "Cairo", "Austin", "Dublin", "Hanoi",
          "Quito", "Perth", "Denver", "Nairobi", "Madrid", "Boston", "Taipei", "Zurich", "Mumbai", "Toronto", "Prague"]
PROMPTS = [
    "going out in {city} tn, should i bring a jacket?",
    "what's the weather like in {city} right now?",
    "I'm flying to {city} tomorrow morning. Do I need an umbrella?",
    "is it a good day for a picnic in {city}?",
    "should I wear shorts in {city} today?",
]
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def weather_row(i: int, *, context_words: int = 0, tool_choice: Any = None) -> dict:
    """Row i: a distinct user prompt (row number in it); optional row-specific notes of
    `context_words` words (a long unique prefix, so the prefix cache has something to serve)."""
    city = CITIES[i % len(CITIES)]
    text = PROMPTS[(i // len(CITIES)) % len(PROMPTS)].format(city=city) + f" (request {i})"
    if context_words:
        # Deterministic, row-specific words: rows differ from their first word on.
        notes = " ".join(WORDS[(i * 7 + k * (i % 5 + 1)) % len(WORDS)] for k in range(context_words))
        text = f"My travel notes, request {i}: {notes}. {text}"
    params: dict[str, Any] = {
        "input": [{"role": "developer", "content": DEVELOPER}, {"role": "user", "content": text}],
        "tools": [WEATHER_TOOL],
    }
    if tool_choice is not None:
        params["tool_choice"] = tool_choice
    return {"responses_create_params": params}


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
    return path


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


# ---------------------------------------------------------------------------------------
# Processes we start; all of them are stopped by stop_all() (also on Ctrl-C)
# ---------------------------------------------------------------------------------------

_started: list["Managed"] = []


class Managed:
    proc: subprocess.Popen

    def stop(self) -> None:
        raise NotImplementedError


def _stop_popen(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20, group: bool = True) -> None:
    if proc.returncode is not None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def stop_all() -> None:
    while _started:
        try:
            _started.pop().stop()
        except Exception as e:  # keep stopping the others
            console.print(f"[yellow]bench: stopping a process failed: {e}[/yellow]")


class Standin(Managed):
    """One `ng_vllm_standin --port 0 --port-file ...`."""

    def __init__(self, workdir: Path, name: str, flags: Iterable[str] = ()):
        self.name = name
        self.flags = list(flags)
        port_file = workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.argv = [script("ng_vllm_standin"), "--port", "0", "--port-file", str(port_file), *self.flags]
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        _started.append(self)
        self.ps = psutil.Process(self.proc.pid)

        def port():
            if self.proc.poll() is not None:
                raise RuntimeError(f"stand-in {name} exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            return port_file.exists() and port_file.read_text().strip()

        self.port = int(wait_until(port, 30, f"stand-in {name} port file"))
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/v1"
        wait_until(lambda: http_get(self.root + "/health", 2) is not None, 30, f"stand-in {name} /health")

    def sessions(self) -> dict[str, int]:
        return json.loads(http_get(self.root + "/standin/sessions", 30))

    def stats(self) -> dict:
        return json.loads(http_get(self.root + "/standin/stats"))

    def metrics(self) -> dict[str, float]:
        """Prometheus text -> {metric name: sum over its label sets}."""
        out: dict[str, float] = {}
        for line in http_get(self.root + "/metrics").decode().splitlines():
            if not line or line.startswith("#"):
                continue
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def processes(self) -> list[psutil.Process]:
        return [self.ps]

    def stop(self) -> None:
        _stop_popen(self.proc)
        self._log.close()
        if self in _started:
            _started.remove(self)


def start_standins(workdir: Path, flags_per_standin: list[list[str]], prefix: str = "standin") -> list[Standin]:
    return [Standin(workdir, f"{prefix}{i + 1}", flags) for i, flags in enumerate(flags_per_standin)]


class NgRun(Managed):
    """`ng_run` of the weather graph (vllm_model + simple_weather) in its own working directory,
    with its own head server port; env.yaml written there like a user would."""

    READY = re.compile(r"servers\s+ready")

    def __init__(self, workdir: Path, name: str, base_urls: list[str], *, colocate: bool = False,
                 extra_args: Iterable[str] = (), config_paths: Iterable[str] = (VLLM_MODEL, WEATHER)):
        self.name = name
        self.cwd = workdir / name
        self.cwd.mkdir(parents=True, exist_ok=True)
        (self.cwd / "env.yaml").write_text(
            f"policy_base_url: {','.join(base_urls)}\npolicy_api_key: EMPTY\npolicy_model_name: standin-model\n")
        self.head_port = free_port()
        self.argv = [script("ng_run"), f"+config_paths=[{','.join(config_paths)}]", f"+head_server.port={self.head_port}",
                     *(["+colocate=true"] if colocate else []), *extra_args]
        self.colocate = colocate
        self.log_path = self.cwd / "ng_run.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        _started.append(self)
        self.ps = psutil.Process(self.proc.pid)
        self._tree: list[psutil.Process] | None = None
        self.names_by_pid: dict[int, str] = {}  # filled by a benchmark that reports CPU per server

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> "NgRun":
        t0 = time.monotonic()

        def ready():
            if self.proc.poll() is not None:
                raise SystemExit(f"ng_run ({self.name}) exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            return self.READY.search(self.output())

        try:
            wait_until(ready, timeout, f"'servers ready' from ng_run ({self.name})")
        except TimeoutError:
            raise SystemExit(f"ng_run ({self.name}) not ready after {timeout:g} s:\n{self.output()[-4000:]}") from None
        self.startup_s = time.monotonic() - t0
        self._tree = [self.ps, *self.ps.children(recursive=True)]  # every server exists once ready
        return self

    def processes(self) -> list[psutil.Process]:
        return self._tree if self._tree is not None else [self.ps]

    def pids(self) -> dict[str, int]:
        """{'ng_run': pid, '<instance>': pid} from the head server."""
        servers = json.loads(http_get(f"http://127.0.0.1:{self.head_port}/servers"))
        return {"ng_run": self.ps.pid, **{s["name"]: s["pid"] for s in servers}}

    def stop(self) -> None:
        # ng_run stops its own children (they live in their own sessions); SIGTERM it alone.
        _stop_popen(self.proc, signal.SIGTERM, timeout=30, group=False)
        for child in self._tree or []:
            if child.pid != self.ps.pid and child.is_running():
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
        self._log.close()
        if self in _started:
            _started.remove(self)


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------


def cpu_seconds(procs: Iterable[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after[pid] - before.get(pid, 0.0) for pid in after)


class Sampler(threading.Thread):
    """Samples the RSS of tracked process groups every `interval` seconds.

    Per group: the peak of the group's summed RSS, the peak of any one of its processes, and
    (optionally) a timeline of (seconds, summed RSS)."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True, name="rss-sampler")
        self.interval = interval
        self._groups: dict[str, Callable[[], list[psutil.Process]]] = {}
        self._timeline_groups: set[str] = set()
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.peak_sum: dict[str, int] = {}
            self.peak_one: dict[str, int] = {}
            self.timeline: dict[str, list[tuple[float, int]]] = {}
            self.samples = 0
            self._t0 = time.monotonic()

    def track(self, name: str, procs: Callable[[], list[psutil.Process]], timeline: bool = False) -> None:
        with self._lock:
            self._groups[name] = procs
            if timeline:
                self._timeline_groups.add(name)

    def untrack(self, name: str) -> None:
        with self._lock:
            self._groups.pop(name, None)
            self._timeline_groups.discard(name)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            with self._lock:
                groups = list(self._groups.items())
                now = time.monotonic() - self._t0
                self.samples += 1
            for name, fn in groups:
                total, top = 0, 0
                for p in fn():
                    try:
                        rss = p.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                        continue
                    total += rss
                    top = max(top, rss)
                if not total:
                    continue
                with self._lock:
                    self.peak_sum[name] = max(self.peak_sum.get(name, 0), total)
                    self.peak_one[name] = max(self.peak_one.get(name, 0), top)
                    if name in self._timeline_groups:
                        self.timeline.setdefault(name, []).append((round(now, 3), total))

    def close(self) -> None:
        self._halt.set()


@dataclass
class CommandResult:
    argv: list[str]
    returncode: int
    wall_s: float
    cpu_s: float  # user + system of that process, whole life (os.wait4)
    maxrss_mb: float  # ru_maxrss of that process (os.wait4)
    sampled_peak_rss_mb: float | None
    log_path: str
    timeline: list[tuple[float, int]] = field(default_factory=list)
    # CPU seconds of long-lived groups (ng_run tree, stand-ins) during the command
    group_cpu_s: dict[str, float] = field(default_factory=dict)
    group_cpu_s_by_pid: dict[str, dict[int, float]] = field(default_factory=dict)
    group_peak_rss_mb: dict[str, float | None] = field(default_factory=dict)
    group_peak_one_rss_mb: dict[str, float | None] = field(default_factory=dict)
    # CPU the rest of the machine used meanwhile (other users' processes), in cores
    other_load_cores: float | None = None
    bench_cpu_s: float | None = None  # this benchmark process (sampler thread, waiting)

    def tail(self, n: int = 3000) -> str:
        return Path(self.log_path).read_text(errors="replace")[-n:]


def run_measured(argv: list[str], cwd: Path, name: str, sampler: Sampler,
                 groups: dict[str, Callable[[], list[psutil.Process]]] | None = None,
                 timeout: float = 900, timeline: bool = False) -> CommandResult:
    """Run a whole command to completion; measure it and the long-lived `groups` meanwhile."""
    groups = groups or {}
    log_path = cwd / f"{name}.log"
    sampler.reset()
    for gname, fn in groups.items():
        sampler.track(gname, fn)
    before = {g: cpu_seconds(fn()) for g, fn in groups.items()}
    busy_before = _busy_seconds()
    me = psutil.Process()
    me_before = sum(me.cpu_times()[:2])
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            ps = [psutil.Process(proc.pid)]
        except psutil.NoSuchProcess:
            ps = []
        sampler.track(name, lambda: ps, timeline=timeline)
        timer = threading.Timer(timeout, lambda: _kill_group(proc.pid))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: exact CPU and peak RSS
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    after = {g: cpu_seconds(fn()) for g, fn in groups.items()}
    busy = _busy_seconds() - busy_before
    me_cpu = sum(me.cpu_times()[:2]) - me_before
    cpu_s = usage.ru_utime + usage.ru_stime
    group_cpu = {g: cpu_delta(before[g], after[g]) for g in groups}
    sampler.untrack(name)
    for gname in groups:
        sampler.untrack(gname)
    return CommandResult(
        argv=list(argv), returncode=proc.returncode, wall_s=wall, cpu_s=cpu_s,
        maxrss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
        sampled_peak_rss_mb=mb(sampler.peak_sum.get(name)), log_path=str(log_path),
        timeline=list(sampler.timeline.get(name, [])),
        group_cpu_s=group_cpu,
        group_cpu_s_by_pid={g: {pid: after[g][pid] - before[g].get(pid, 0.0) for pid in after[g]} for g in groups},
        group_peak_rss_mb={g: mb(sampler.peak_sum.get(g)) for g in groups},
        group_peak_one_rss_mb={g: mb(sampler.peak_one.get(g)) for g in groups},
        other_load_cores=max(0.0, busy - cpu_s - me_cpu - sum(group_cpu.values())) / wall if wall > 0 else None,
        bench_cpu_s=me_cpu,
    )


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def collector_argv(head_port: int, input_path: Path, output_path: Path, concurrency: int,
                   extra: Iterable[str] = ()) -> list[str]:
    return [script("ng_collect_rollouts"), f"+agent_name={WEATHER_AGENT}", f"+input_jsonl_fpath={input_path}",
            f"+output_jsonl_fpath={output_path}", f"+concurrency={concurrency}", f"+head_server.port={head_port}",
            *extra]


def direct_argv(base_urls: list[str], input_path: Path, output_path: Path, concurrency: int,
                extra: Iterable[str] = ()) -> list[str]:
    return [PY, str(BENCH_DIR / "direct_client.py"), "--backends", ",".join(base_urls), "--input", str(input_path),
            "--output", str(output_path), "--concurrency", str(concurrency), *extra]


def metrics_path_of(output: Path) -> Path:
    stem = output.with_suffix("") if output.suffix == ".jsonl" else output
    return stem.with_name(stem.name + "_metrics.json")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def repro_command(parser: argparse.ArgumentParser, args: argparse.Namespace, script_file: str) -> str:
    """The exact command (every option spelled out) that reproduces this run."""
    parts = [PY, os.path.relpath(script_file, Path.cwd()) if Path(script_file).is_absolute() else script_file]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        opt = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                parts.append(opt)
        elif value is not None:
            parts += [opt, str(value)]
    return shlex.join(parts)


def machine_info() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": load,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_results(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))
    return path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "[yellow]n/a[/yellow]"
    return "[green]MET[/green]" if ok else "[red]MISSED[/red]"


def targets_table(title: str, rows: list[tuple[str, str, str, bool | None]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("target", "wanted", "measured", ""):
        table.add_column(col)
    for target, wanted, measured, ok in rows:
        table.add_row(target, wanted, measured, verdict(ok))
    return table


def print_header(title: str, command: str) -> None:
    console.rule(f"[bold]{title}")
    console.print(f"reproduce with: [bold]{command}[/bold]", soft_wrap=True)


def print_footer(command: str, results_path: Path) -> None:
    console.print(f"results: {os.path.relpath(results_path, Path.cwd())}")
    console.print(f"reproduce with: [bold]{command}[/bold]", soft_wrap=True)


class Workdir:
    """A temporary working directory, removed at the end unless --keep-tmp."""

    def __init__(self, prefix: str, keep: bool):
        import tempfile

        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self.keep = keep

    def cleanup(self) -> None:
        if self.keep:
            console.print(f"kept working directory: {self.path}")
            return
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def bench_session(name: str, keep_tmp: bool):
    """One benchmark run: Ctrl-C/SIGTERM handling, a temporary working directory and the
    resource sampler; at the end every process it started is stopped and the directory removed.
    Yields (workdir, sampler)."""
    install_signal_handlers()
    work = Workdir(f"ng_bench_{name}_", keep_tmp)
    sampler = Sampler()
    sampler.start()
    try:
        yield work, sampler
    finally:
        sampler.close()
        stop_all()
        work.cleanup()


def install_signal_handlers() -> None:
    """SIGTERM (and SIGINT, even where a background shell ignores it) behave like Ctrl-C, so
    `finally: stop_all()` runs."""

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def run_main(main: Callable[[], int]) -> int:
    """Run a benchmark's main(); Ctrl-C / SIGTERM: everything started is stopped, exit 130."""
    try:
        return main()
    except KeyboardInterrupt:
        stop_all()
        console.print("[yellow]interrupted: stopped everything this benchmark started[/yellow]")
        return 130
