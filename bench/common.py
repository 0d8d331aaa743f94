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
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import psutil
from rich.console import Console
from rich.table import Table

from nemo_gym_cli.testing import harness
from nemo_gym_cli.testing.harness import (BIN, PY, VLLM_MODEL, WEATHER, WEATHER_AGENT, GaveUp, Graph, http_get,  # noqa: F401
                                          StandIn, script)  # BIN, PY, http_get: the benches use them as C.*

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
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
# Processes we start (the harness's stand-ins and graphs); stop_all() ends them (also on Ctrl-C)
# ---------------------------------------------------------------------------------------

_started: list[StandIn | Graph] = []


def stop_all() -> None:
    while _started:
        try:
            _started.pop().stop()
        except Exception as e:  # keep stopping the others
            console.print(f"[yellow]bench: stopping a process failed: {e}[/yellow]")


def start_standins(workdir: Path, flags_per_standin: list[list[str]], prefix: str = "standin") -> list[StandIn]:
    standins = harness.start_standins(workdir, flags_per_standin, prefix)
    _started.extend(standins)
    return standins


def processes_of(standins: Iterable[StandIn]) -> list[psutil.Process]:
    """The stand-ins' processes, for CPU and RSS sampling."""
    out = []
    for s in standins:
        try:
            out.append(psutil.Process(s.proc.pid))
        except psutil.NoSuchProcess:
            pass
    return out


class NgRun(Graph):
    """`ng_run` of the weather graph (vllm_model + simple_weather) in workdir/name, env.yaml
    pointing at `base_urls`; `processes()` is its whole tree once ready."""

    def __init__(self, workdir: Path, name: str, base_urls: list[str], *, colocate: bool = False,
                 extra_args: Iterable[str] = (), config_paths: Iterable[str] = (VLLM_MODEL, WEATHER)):
        self.name = name
        self.names_by_pid: dict[int, str] = {}  # filled by a benchmark that reports CPU per server
        super().__init__(workdir / name, config_paths, harness.weather_env(base_urls), extra_args, colocate, wait=False)
        _started.append(self)
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, timeout: float = 120) -> "NgRun":
        try:
            super().wait_ready(timeout)
        except (TimeoutError, GaveUp) as e:
            raise SystemExit(f"ng_run ({self.name}): {str(e)[-4000:]}") from None
        return self

    def processes(self) -> list[psutil.Process]:
        return [self.ps, *self.children]

    def stop(self) -> None:
        super().stop()
        self.kill_leftovers()


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
    module = "bench." + Path(script_file).stem
    parts = [PY, "-m", module]
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


def finish(name: str, command: str, args: argparse.Namespace, targets: list[tuple], **results: Any) -> int:
    """End of a benchmark: results JSON (with the printed report), footer, exit code."""
    path = write_results(name, {
        "report": end_report(),
        "benchmark": name, "command": command, "machine": machine_info(), "settings": vars(args),
        "targets": [{"target": a, "wanted": b, "measured": c, "met": d} for a, b, c, d in targets],
        **results,
    })
    print_footer(command, path)
    return exit_code()


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
