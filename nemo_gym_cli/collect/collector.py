"""ng_collect_rollouts: stream dataset rows through an agent's /run and write each result at once.

Streaming and bounded: rows are read as workers free up and exactly `concurrency` rollouts are
in flight, so memory does not grow with the dataset. Every finished rollout is one whole,
flushed line; a failed one goes to `<stem>_failures.jsonl` and the run goes on.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import orjson

from nemo_gym_cli.collect.publish import ProgressPublisher
from nemo_gym_cli.serving.client import ServerCallError, ServerClient
from nemo_gym_cli.config import Composed, resolve_path
from nemo_gym_cli.serving.logs import make_console
from nemo_gym_cli.config import head_url

HELP = """usage: ng_collect_rollouts +agent_name=NAME +input_jsonl_fpath=IN.jsonl +output_jsonl_fpath=OUT.jsonl
                           [+limit=N] [+num_repeats=N] [+concurrency=N] [+resume=true]
                           [+responses_create_params={temperature:0.7,max_output_tokens:512}]

Send each row of IN.jsonl (repeated num_repeats times, repeats adjacent) to the agent's /run on
the running ng_run graph, with exactly `concurrency` rollouts in flight (alias
+num_samples_in_parallel). Each finished rollout is written at once to OUT.jsonl as one line:
the verify response plus _ng_task_index (input row) and _ng_rollout_index (repeat).

  +limit=N                  only the first N input rows
  +responses_create_params  merged into every row's responses_create_params (these win)
  +resume=true              skip the (task, rollout) pairs already in OUT.jsonl; without it an
                            existing OUT.jsonl is an error (never appended to, never deleted)
  +head_server.port=...     where ng_run's head server is (same config as ng_run)

Failures never stop the run: a rollout that fails, and an input line that is not JSON or has no
responses_create_params (named by file and line number), go to OUT_failures.jsonl with the
reason; `+resume=true` retries them. Exit code: 0 if every rollout succeeded, 1 if some failed,
2 for a setup error (bad flag, missing file, no ng_run, unknown agent), 130 if interrupted.
Ctrl-C / SIGTERM: stop taking rows, let in-flight rollouts finish (+shutdown_grace_s=30),
write the summary; a second Ctrl-C stops at once. Summary numbers also go to OUT_metrics.json.
"""


class SetupError(Exception):
    """Wrong flags or setup, found before any rollout starts."""


@dataclass
class Job:
    task: int  # _ng_task_index: 0-based row number of the input
    rollout: int  # _ng_rollout_index: repeat number
    line: int  # 1-based line number in the input file
    row: dict | None
    error: str | None = None


LATENCY_SAMPLES = 20_000  # a uniform sample of rollout latencies: p50/p95 in bounded memory


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: int = 0
    skipped: int = 0
    latencies: array = field(default_factory=lambda: array("d"))  # reservoir sample
    latency_sum: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)  # numeric verify fields (reward, ...)
    counts: dict[str, int] = field(default_factory=dict)

    def add_result(self, result: dict, latency: float) -> None:
        self.done += 1
        self.latency_sum += latency
        if len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append(latency)
        else:  # reservoir sampling: every rollout has the same chance to be in the sample
            slot = random.randrange(self.done)
            if slot < LATENCY_SAMPLES:
                self.latencies[slot] = latency
        for key, value in result.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("_ng_"):
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1

    def mean(self, key: str) -> float | None:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else None


def _out_paths(output: Path) -> tuple[Path, Path]:
    stem = output.with_suffix("") if output.suffix == ".jsonl" else output
    return stem.with_name(stem.name + "_failures.jsonl"), stem.with_name(stem.name + "_metrics.json")


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def read_done_pairs(output: Path) -> set[tuple[int, int]]:
    """(task, rollout) pairs already written; a torn last line (killed mid-write) is cut off."""
    done: set[tuple[int, int]] = set()
    if not output.exists():
        return done
    with open(output, "rb+") as f:
        good_end = 0
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                row = orjson.loads(raw)
                done.add((int(row["_ng_task_index"]), int(row["_ng_rollout_index"])))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                break
            good_end += len(raw)
        f.truncate(good_end)
    return done


def iter_jobs(path: Path, limit: int | None, repeats: int, params: dict, done: set[tuple[int, int]], stats: Stats) -> Iterator[Job]:
    """Read the input lazily: one line at a time, as workers ask for work."""
    task = -1
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            task += 1
            if limit is not None and task >= limit:
                return
            row, error = None, None
            try:
                row = orjson.loads(raw)
                if not isinstance(row, dict):
                    error = f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}"
                elif not isinstance(row.get("responses_create_params"), dict):
                    error = f"{path}:{line_no}: row has no 'responses_create_params' object"
            except orjson.JSONDecodeError as e:
                error = f"{path}:{line_no}: not valid JSON ({e})"
            if row is not None and error is None and params:
                row["responses_create_params"] = {**row["responses_create_params"], **params}
            for rollout in range(repeats):
                if (task, rollout) in done:
                    stats.skipped += 1
                    continue
                yield Job(task, rollout, line_no, row, error)


class Collector:
    def __init__(self, composed: Composed):
        self.config = cfg = composed.config
        self.console = make_console(stderr=True)
        self.agent = str(cfg["agent_name"])
        found = resolve_path(str(cfg["input_jsonl_fpath"]))
        if found is None or not found.is_file():
            raise SetupError(f"+input_jsonl_fpath: file '{cfg['input_jsonl_fpath']}' not found "
                             f"(looked in the current directory, then the project root)")
        self.input = found
        self.output = Path(str(cfg["output_jsonl_fpath"])).expanduser().absolute()
        self.failures_path, self.metrics_path = _out_paths(self.output)
        self.concurrency = self._positive_int("num_samples_in_parallel" if cfg.get("num_samples_in_parallel") else "concurrency")
        self.repeats = self._positive_int("num_repeats")
        self.limit = None if cfg.get("limit") is None else self._positive_int("limit", allow_zero=True)
        self.params = cfg.get("responses_create_params") or {}
        if not isinstance(self.params, dict):
            raise SetupError(f"+responses_create_params must be a mapping, e.g. '+responses_create_params={{temperature:0.7}}', got {self.params!r}")
        self.resume = bool(cfg.get("resume"))
        self.grace_s = float(cfg.get("shutdown_grace_s", 30))
        http = dict(cfg.get("http_client") or {})
        http["connector_limit"] = max(int(http.get("connector_limit", 4096)), 2 * self.concurrency)
        self.client = ServerClient(http, head_url(cfg))
        self.stats = Stats()
        self.stopping = False
        self.interrupted = False

    def _positive_int(self, key: str, allow_zero: bool = False) -> int:
        value = self.config.get(key)
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise SetupError(f"+{key} must be an integer, got {value!r}") from None
        if number < (0 if allow_zero else 1) or number != value:
            raise SetupError(f"+{key} must be an integer >= {0 if allow_zero else 1}, got {value!r}")
        return number

    # ------------------------------------------------------------ setup checks
    async def check_agent(self) -> None:
        try:
            servers = await self.client.request_json("GET", f"{self.client.head_url}/servers", server="head server",
                                                      timeout_s=5, retries=1)
        except ServerCallError as e:
            raise SetupError(f"no ng_run head server at {self.client.head_url} ({e.message}). Start the servers first: "
                             f"ng_run \"+config_paths=[...]\" (or point at them with +head_server.host=... +head_server.port=...)") from None
        agents = sorted(s["name"] for s in servers if s.get("server_type") == "responses_api_agents")
        if self.agent not in agents:
            raise SetupError(f"+agent_name={self.agent}: no such agent on {self.client.head_url} "
                             f"(agents: {', '.join(agents) or 'none'})")

    def open_outputs(self) -> set[tuple[int, int]]:
        if self.output.exists() and not self.resume:
            raise SetupError(f"output {self.output} already exists: use +resume=true to complete it, "
                             f"or choose another +output_jsonl_fpath")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        done = read_done_pairs(self.output) if self.resume else set()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        self.out_fd = os.open(self.output, flags, 0o644)
        self.fail_fd = os.open(self.failures_path, flags | os.O_TRUNC, 0o644)  # failures are retried on resume
        return done

    # ------------------------------------------------------------ the run
    async def run(self) -> int:
        await self.check_agent()
        model_servers = await self._model_servers()
        backends_before = await self._backend_counts(model_servers)
        done = self.open_outputs()
        total_rows = _count_lines(self.input)
        if self.limit is not None:
            total_rows = min(total_rows, self.limit)
        jobs = iter_jobs(self.input, self.limit, self.repeats, self.params, done, self.stats)
        self.total = max(0, total_rows * self.repeats - len(done))
        progress = self._progress(self.total)
        publisher = ProgressPublisher(self.client, self.client.head_url, self.agent, str(self.output), self.progress_numbers)
        publisher.start()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        workers = [asyncio.create_task(self._worker(jobs, progress)) for _ in range(self.concurrency)]
        self._workers = workers
        try:
            await asyncio.gather(*workers, return_exceptions=True)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if progress is not None:
                progress.close()
            os.close(self.out_fd)
            os.close(self.fail_fd)
            await publisher.stop("interrupted" if self.interrupted else "finished")
        spread = self._spread(backends_before, await self._backend_counts(model_servers))
        self.report(spread)
        if self.interrupted:
            return 130
        return 1 if self.stats.failed else 0

    async def _worker(self, jobs: Iterator[Job], progress) -> None:
        for job in jobs:  # a shared iterator: each row is taken by exactly one worker
            if self.stopping:
                return
            if job.error is not None:
                self._fail(job, None, job.error)
            else:
                await self._rollout(job)
            if progress is not None:
                self._tick(progress)
            if self.stopping:
                return

    async def _rollout(self, job: Job) -> None:
        body = {**job.row, "_ng_task_index": job.task, "_ng_rollout_index": job.rollout}
        t0 = time.perf_counter()
        try:
            # Only unavailability is retried: a 500 from /run means the rollout itself failed.
            result = await self.client.post(self.agent, "/run", body, retry_statuses=frozenset({502, 503, 504}))
        except ServerCallError as e:
            self._fail(job, e.status, e.message)
            return
        if not isinstance(result, dict):
            self._fail(job, None, f"/run returned {type(result).__name__}, expected a JSON object")
            return
        result["_ng_task_index"] = job.task
        result["_ng_rollout_index"] = job.rollout
        os.write(self.out_fd, orjson.dumps(result) + b"\n")  # one whole line, one write
        self.stats.add_result(result, time.perf_counter() - t0)

    def _fail(self, job: Job, status: int | None, reason: str) -> None:
        self.stats.failed += 1
        record = {"_ng_task_index": job.task, "_ng_rollout_index": job.rollout, "line": job.line, "status": status, "reason": reason}
        os.write(self.fail_fd, orjson.dumps(record) + b"\n")
        if job.row is None or status is None:
            self.console.print(f"skipped: {reason}", style="yellow", markup=False)

    def _on_signal(self) -> None:
        self.interrupted = True
        if self.stopping:
            self.console.print("[red]second interrupt: cancelling in-flight rollouts[/red]")
            for w in self._workers:
                w.cancel()
            return
        self.stopping = True
        self.console.print(f"[yellow]interrupted: taking no new rows; waiting up to {self.grace_s:.0f} s for in-flight "
                           f"rollouts (Ctrl-C again to stop now). Complete the run later with +resume=true.[/yellow]")
        asyncio.get_running_loop().call_later(self.grace_s, lambda: [w.cancel() for w in self._workers])

    # ------------------------------------------------------------ observability
    def _progress(self, total: int):
        if not self.config.get("progress", True):
            return None
        from tqdm import tqdm

        return tqdm(total=total, unit="rollout", dynamic_ncols=True, mininterval=0.5, smoothing=0.1)

    def _tick(self, progress) -> None:
        progress.update(1)
        # Postfix formatting costs more than the update itself: only when tqdm will redraw.
        if progress.n % max(1, self.concurrency // 4) == 0:
            reward = self.stats.mean("reward")
            progress.set_postfix_str(f"reward={reward:.3f} failed={self.stats.failed}" if reward is not None
                                     else f"failed={self.stats.failed}", refresh=False)

    def progress_numbers(self) -> dict[str, Any]:
        """What the head server shows of this run (ng_status --watch)."""
        s = self.stats
        elapsed = time.monotonic() - s.started
        return {"done": s.done, "failed": s.failed, "total": self.total, "concurrency": self.concurrency,
                "rollouts_per_s": round(s.done / elapsed, 2) if elapsed > 0 else None,
                "mean_reward": s.mean("reward"), "elapsed_s": round(elapsed, 1)}

    async def _model_servers(self) -> list[str]:
        try:
            servers = await self.client.servers()
        except ServerCallError:
            return []
        return [s["url"] for s in servers if s.get("server_type") == "responses_api_models" and s.get("url")]

    async def _backend_counts(self, urls: list[str]) -> dict[str, float]:
        """Requests per model backend, from the adapters' /metrics (for the spread table)."""
        counts: dict[str, float] = {}
        for url in urls:
            try:
                status, raw = await self.client.raw_request("GET", f"{url}/metrics", None, None, 5)
                text = raw.decode()
            except Exception:
                continue
            for line in text.splitlines():
                if line.startswith("ng_model_backend_requests_total{") and 'outcome="ok"' in line:
                    backend = line.split('backend="', 1)[1].split('"', 1)[0]
                    counts[backend] = counts.get(backend, 0.0) + float(line.rsplit(" ", 1)[1])
        return counts

    @staticmethod
    def _spread(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
        return {b: int(after[b] - before.get(b, 0.0)) for b in sorted(after)}

    def summary(self, spread: dict[str, int]) -> dict[str, Any]:
        s = self.stats
        elapsed = time.monotonic() - s.started
        lat = sorted(s.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 4) if lat else None

        return {
            "agent_name": self.agent,
            "input": str(self.input),
            "output": str(self.output),
            "rollouts": s.done,
            "failures": s.failed,
            "skipped_already_done": s.skipped,
            "interrupted": self.interrupted,
            "elapsed_s": round(elapsed, 3),
            "rollouts_per_s": round(s.done / elapsed, 2) if elapsed > 0 else None,
            "latency_p50_s": pct(0.50),
            "latency_p95_s": pct(0.95),
            "latency_mean_s": round(s.latency_sum / s.done, 4) if s.done else None,
            "concurrency": self.concurrency,
            "means": {k: round(s.sums[k] / s.counts[k], 6) for k in sorted(s.sums)},
            "requests_per_backend": spread,
        }

    def report(self, spread: dict[str, int]) -> None:
        from rich.table import Table

        summary = self.summary(spread)
        self.metrics_path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        table = Table(title=f"Rollouts: {self.agent} -> {self.output.name}", show_header=False)
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("rollouts written", str(summary["rollouts"]))
        table.add_row("failures", f"{summary['failures']}" + (f" (see {self.failures_path.name})" if summary["failures"] else ""))
        if summary["skipped_already_done"]:
            table.add_row("already done (resume)", str(summary["skipped_already_done"]))
        for key, value in summary["means"].items():
            table.add_row(f"mean {key}", f"{value:.4f}")
        table.add_row("rollouts/s", f"{summary['rollouts_per_s']}")
        table.add_row("latency p50 / p95 (s)", f"{summary['latency_p50_s']} / {summary['latency_p95_s']}")
        table.add_row("concurrency", str(self.concurrency))
        total = sum(spread.values())
        for backend, n in spread.items():
            table.add_row(f"model requests {backend}", f"{n} ({100 * n / total:.0f}%)" if total else "0")
        if self.interrupted:
            table.add_row("interrupted", "yes: complete with +resume=true")
        self.console.print(table)
        self.console.print(f"metrics: {self.metrics_path}")


async def collect(composed: Composed) -> int:
    collector = None
    try:
        collector = Collector(composed)
        return await collector.run()
    except SetupError as e:
        make_console(stderr=True).print(f"ng_collect_rollouts: {e}", markup=False)
        return 2
    finally:
        if collector is not None:
            await collector.client.close()
