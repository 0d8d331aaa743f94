"""ng_collect_rollouts: stream dataset rows through their agents' /run and write each result at once.

Built on the in-process API (collect/api.py): this module adds the file input, the output
files, resume, signals, the progress bar and the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import time
from pathlib import Path

import orjson

from nemo_gym_cli.collect import jobs as J
from nemo_gym_cli.collect.api import (DEFAULTS, Outcome, RolloutRun, collector_client, list_agents, model_servers,
                                      start_run, starting_limit)
from nemo_gym_cli.collect.autoconcurrency import AutoConcurrency
from nemo_gym_cli.collect.publish import ProgressPublisher
from nemo_gym_cli.collect.report import backend_counts, report, spread
from nemo_gym_cli.collect.stats import Stats
from nemo_gym_cli.config import AGENT_SERVERS, Composed, head_url, resolve_path
from nemo_gym_cli.config.nemo_gym import nemo_gym_python, nemo_gym_roots
from nemo_gym_cli.serving.errors import ServerCallError
from nemo_gym_cli.serving.head_client import HeadClient
from nemo_gym_cli.serving.logs import make_console

HELP = """usage: ng_collect_rollouts +input_jsonl_fpath=IN.jsonl +output_jsonl_fpath=OUT.jsonl [+agent_name=NAME]
                           [+limit=N] [+num_repeats=N] [+concurrency=N] [+max_attempts={max_attempts}] [+resume=true]
                           [+responses_create_params={{temperature:0.7,max_output_tokens:512}}]

Send each row of IN.jsonl (repeated num_repeats times, repeats adjacent) to its agent's /run on
the running ng_run graph, with exactly `concurrency` rollouts in flight (alias
+num_samples_in_parallel). A row names its agent with agent_ref: {{type: responses_api_agents,
name: ...}}; +agent_name is the agent of rows without one (needed only then). Each finished
rollout is written at once to OUT.jsonl as one line: the verify response plus
_ng_task_index (input row), _ng_rollout_index (repeat) and agent_ref.

  +concurrency=auto         find the knee of the vLLM servers: start at 4, raise while no backend
                            queues, hold the queue small (vllm:num_requests_waiting, KV cache,
                            preemptions, read through the model adapters' /backends), never above
                            +concurrency_max={concurrency_max}; the summary reports where it settled
  +limit=N                  only the first N input rows
  +num_repeats=N            or per agent: +num_repeats={{_default:1,math_verify_simple_agent:8}}
  +max_attempts={max_attempts:<12}a rollout that fails for a transport or server reason (refused, reset,
                            timeout, 5xx) is run again after a short backoff, up to N attempts in
                            all; a 4xx (bad row, unknown agent) is not retried
  +responses_create_params  merged into every row's responses_create_params (these win)
  +resume=true              skip the (task, rollout) pairs already in OUT.jsonl and retry failed
                            ones that have attempts left (never a 4xx: it stays a failure);
                            without it an existing OUT.jsonl is an error (never appended to,
                            never deleted)
  +head_server.port={head_server[port]:<8}where ng_run's head server is (same config as ng_run)

Failures never stop the run: a rollout that fails, a row naming an agent the graph does not
have, and an input line that is not JSON or has no responses_create_params (named by file and
line number), go to OUT_failures.jsonl with the attempts made and each reason. Exit code: 0 if
every rollout succeeded, 1 if some failed, 2 for a setup error (bad flag, missing file, no
ng_run, unknown +agent_name, another collector writing OUT.jsonl), 74 if OUT.jsonl or
OUT_failures.jsonl could not be written (e.g. the disk is full: the run stops, the output keeps
whole lines only, +resume=true completes it), 75 if ng_run went away mid-run, 130 if interrupted.
ng_run gone (its head server refuses connections): nothing new is sent, the run waits
+graph_wait_s={graph_wait_s} for it to come back, then ends; rollouts that found nothing listening cost
no attempt and are not written anywhere, so +resume=true after restarting ng_run completes the set.
Ctrl-C / SIGTERM: stop taking rows, let in-flight rollouts finish (+shutdown_grace_s={shutdown_grace_s}),
write the summary; a second Ctrl-C stops at once. The summary (totals, then one row per agent
with pass@k) also goes to OUT_metrics.json.
"""


EXIT_WRITE_FAILED = 74  # sysexits.h EX_IOERR: not "some rows failed" (1), nor a setup error (2)
EXIT_GRAPH_GONE = 75  # EX_TEMPFAIL: ng_run went away; resume once it is back


class SetupError(Exception):
    """Wrong flags or setup, found before any rollout starts."""


class WriteFailed(Exception):
    """The output or the failures file could not be written (e.g. ENOSPC): the run stops."""


class LineFile:
    """An append-only JSONL file written one whole line per call: a write that fails or comes up
    short (a full disk) is cut back to the last whole line and raises WriteFailed."""

    def __init__(self, path: Path, truncate: bool = False):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0), 0o644)
        self.size = os.fstat(self.fd).st_size  # where the last whole line ends (we are the only writer)

    def lock(self) -> bool:
        """Hold the file for this process (released on exit, also on SIGKILL); False if another has it."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def sync_size(self) -> None:
        self.size = os.fstat(self.fd).st_size

    def append(self, line: bytes) -> None:
        try:
            written = os.write(self.fd, line)
            while written < len(line):  # a short write: the rest raises when the disk is full
                written += os.write(self.fd, line[written:])
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise WriteFailed(f"cannot write {self.path}: {e.strerror or e}") from None
        self.size += len(line)

    def close(self) -> None:
        os.close(self.fd)


def positive_int(config: dict, key: str, allow_zero: bool = False) -> int:
    value = config.get(key)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SetupError(f"+{key} must be an integer, got {value!r}") from None
    if number < (0 if allow_zero else 1) or number != value or isinstance(value, bool):
        raise SetupError(f"+{key} must be an integer >= {0 if allow_zero else 1}, got {value!r}")
    return number


class Collector:
    """ng_collect_rollouts; ng_reverify (reverify.py) is the same run with other jobs and call."""

    command = "ng_collect_rollouts"
    call = None  # one attempt of a job (None: the agent's /run, collect.api.run_agent)

    def __init__(self, composed: Composed):
        self.config = cfg = composed.config
        self.console = make_console(stderr=True)
        self.agent = str(cfg["agent_name"]) if cfg.get("agent_name") else None
        self.input = self._find_input(cfg)  # None: looked for again with the running graph's nemo_gym.python
        self.output = Path(str(cfg["output_jsonl_fpath"])).expanduser().absolute()
        self.failures_path, self.metrics_path = J.out_paths(self.output)
        key = "num_samples_in_parallel" if cfg.get("num_samples_in_parallel") else "concurrency"
        # +concurrency=auto: a controller moves the limit (autoconcurrency.py), up to auto_max
        auto = cfg.get(key) == "auto"
        maximum = positive_int({**DEFAULTS, **cfg}, "concurrency_max") if auto else None  # (ng_reverify's config has none)
        self.limit, self.auto_max = starting_limit("auto" if auto else positive_int(cfg, key), maximum)
        self.auto: AutoConcurrency | None = None
        try:
            self.repeats = J.Repeats(cfg.get("num_repeats", 1))
        except ValueError as e:
            raise SetupError(str(e)) from None
        self.max_attempts = positive_int(cfg, "max_attempts")
        self.rows_limit = None if cfg.get("limit") is None else positive_int(cfg, "limit", allow_zero=True)
        self.params = cfg.get("responses_create_params") or {}
        if not isinstance(self.params, dict):
            raise SetupError("+responses_create_params must be a mapping, e.g. '+responses_create_params={temperature:0.7}', "
                             f"got {self.params!r}")
        self.resume = bool(cfg.get("resume"))
        self.grace_s = float(cfg["shutdown_grace_s"])
        self.client = collector_client(head_url(cfg), cfg.get("http_client"), self.auto_max or self.limit.value)
        self.stats = Stats(self.repeats.of)
        self.interrupted = False
        self.run_: RolloutRun | None = None

    # ------------------------------------------------------------ setup checks
    async def check_agents(self) -> set[str]:
        try:
            agents = await list_agents(self.client)
        except ServerCallError as e:
            raise SetupError(f"no ng_run head server at {self.client.head_url} ({e.message}). Start the servers first: "
                             'ng_run "+config_paths=[...]" (or point at them with +head_server.host=... '
                             "+head_server.port=...)") from None
        names = {s["name"] for s in agents}
        if self.agent is not None and self.agent not in names:
            raise SetupError(f"+agent_name={self.agent}: no such agent on {self.client.head_url} "
                             f"(agents: {', '.join(sorted(names)) or 'none'})")
        return names

    def _find_input(self, config: dict) -> Path | None:
        """+input_jsonl_fpath in the current directory, the project root, then the NeMo Gym tree of
        `nemo_gym.python` of `config` (ours, or the running graph's)."""
        found = resolve_path(str(self.config["input_jsonl_fpath"]), extra_roots=nemo_gym_roots(config))
        return found if found is not None and found.is_file() else None

    def find_input_in_the_graphs_tree(self, graph_config: dict) -> None:
        """A relative NeMo Gym data path works as typed when the graph runs NeMo Gym's servers: without
        +nemo_gym.python here, the NeMo Gym tree of the graph's own is searched too."""
        if self.input is None and not nemo_gym_python(self.config):
            self.input = self._find_input(graph_config)
        if self.input is None:
            raise SetupError(f"+input_jsonl_fpath: file '{self.config['input_jsonl_fpath']}' not found (looked in the "
                             f"current directory, the project root, then the NeMo Gym tree of +nemo_gym.python, yours "
                             f"or the running graph's)")

    async def graph_config(self) -> dict:
        """The running graph's config (secrets masked), or {} when the head server does not give it."""
        try:
            return await HeadClient(self.client).config() or {}
        except ServerCallError:
            return {}

    def pass_thresholds(self, agents: set[str], config: dict) -> dict[str, float]:
        """Each agent's `pass_threshold` from the graph's config (default 1.0)."""
        thresholds = {}
        for name in agents:
            impls = (config.get(name) or {}).get(AGENT_SERVERS) or {}
            for impl in impls.values():
                if isinstance(impl, dict) and isinstance(impl.get("pass_threshold"), (int, float)):
                    thresholds[name] = float(impl["pass_threshold"])
        return thresholds

    def open_outputs(self) -> tuple[set[tuple[int, int]], dict]:
        if self.output.exists() and not self.resume:
            raise SetupError(f"output {self.output} already exists: use +resume=true to complete it, "
                             f"or choose another +output_jsonl_fpath")
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            out = LineFile(self.output)
        except OSError as e:
            raise SetupError(f"cannot open the output {self.output}: {e.strerror or e}") from None
        if not out.lock():  # before reading it: another collector may be mid-write
            out.close()
            raise SetupError(f"output {self.output} is being written by another {self.command} (it holds the "
                             f"file's lock): wait for it to end, stop it, or choose another +output_jsonl_fpath")
        self.out = out
        done, failed = set(), {}
        if self.resume:
            def earlier(row: dict) -> None:  # rollouts of earlier runs count in pass@k
                agent, _ = J.agent_of(row, self.agent)
                self.stats.add_earlier(agent, int(row["_ng_task_index"]), row)
            done = J.read_done(self.output, on_row=earlier)
            failed = J.read_failed(self.failures_path)  # read before the file is started anew
        out.sync_size()  # read_done cut off a torn last line
        try:
            self.failures = LineFile(self.failures_path, truncate=True)
        except OSError as e:
            out.close()
            raise SetupError(f"cannot open {self.failures_path}: {e.strerror or e}") from None
        return done, failed

    async def prepare(self, agents: set[str]) -> None:
        """Setup a subclass needs once the graph's agents are known."""

    def jobs(self, done: set, failed: dict, skipped: list[int]):
        jobs = J.iter_file(self.input, self.rows_limit, self.repeats, self.agent, self.params)
        return J.for_resume(jobs, done, failed, self.max_attempts, skipped)

    def total(self, done: set) -> int | None:
        if self.repeats.per_agent:
            return None  # the repeats depend on each row's agent
        rows = J.count_lines(self.input)
        if self.rows_limit is not None:
            rows = min(rows, self.rows_limit)
        return max(0, rows * self.repeats.default - len(done))

    # ------------------------------------------------------------ the run
    async def run(self) -> int:
        graph_config = await self.graph_config()
        self.find_input_in_the_graphs_tree(graph_config)  # (a missing input is the first thing to fix)
        agents = await self.check_agents()
        self.stats.thresholds = self.pass_thresholds(agents, graph_config)
        await self.prepare(agents)
        models = await model_servers(self.client)
        backends_before = await backend_counts(self.client, models)
        done, failed = self.open_outputs()
        skipped = [0]
        run, self.auto = start_run(self.jobs(done, failed, skipped), self.client, self.limit, auto_max=self.auto_max,
                                   models=models, max_attempts=self.max_attempts, agents=agents, call=self.call,
                                   backoff_s=float(self.config["retry_backoff_s"]),
                                   backoff_max_s=float(self.config["retry_backoff_max_s"]),
                                   graph_wait_s=float(self.config["graph_wait_s"]))
        self.run_ = run
        self.total_rollouts = self.total(done)
        progress = self._progress(self.total_rollouts)
        publisher = ProgressPublisher(self.client, self.client.head_url, self.agent or "(per row)", str(self.output),
                                      self.progress_numbers)
        publisher.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        reason = None  # why the run failed, shown on the head server's board
        write_failed: WriteFailed | None = None
        try:
            async with contextlib.aclosing(run.__aiter__()) as outcomes:
                async for outcome in outcomes:
                    self._write(outcome)
                    if progress is not None:
                        self._tick(progress)
        except WriteFailed as e:  # leaving the loop cancels the rollouts in flight: resume redoes them
            write_failed, reason = e, str(e)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            raise
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if progress is not None:
                progress.close()
            self.out.close()
            self.failures.close()
            if self.auto is not None:
                await self.auto.stop()
            reason = reason or run.graph.lost
            state = "failed" if reason else "interrupted" if self.interrupted else "finished"
            await publisher.stop(state, reason)
        if write_failed is not None:
            self.console.print(f"{self.command}: stopped: {write_failed}; {self.stats.done} rollouts written to "
                               f"{self.output} this run ({skipped[0]} from before), {self.stats.failed} failures "
                               f"recorded. Fix that (e.g. free space), then complete the run with the same command "
                               f"and +resume=true", style="red", markup=False)
            return EXIT_WRITE_FAILED
        self.stats.skipped = skipped[0]
        per_backend = spread(backends_before, await backend_counts(self.client, models))
        report(self, per_backend)
        if run.graph.lost:
            self.console.print(f"{self.command}: {run.graph.lost}. {self.stats.done} rollouts are written to {self.output}, "
                               f"{run.not_run} did not run. Start ng_run again, then complete this run with the same command "
                               f"and +resume=true.", style="red", markup=False)
            return EXIT_GRAPH_GONE
        if self.interrupted:
            return 130
        return 1 if self.stats.failed else 0

    def _write(self, outcome: Outcome) -> None:
        job = outcome.job
        if outcome.ok:
            self.out.append(orjson.dumps(outcome.result) + b"\n")  # one whole line, one write
            self.stats.add_result(job.agent, job.task, outcome.result, outcome.latency)
            return
        self.failures.append(orjson.dumps(outcome.failure_record()) + b"\n")
        self.stats.add_failure(job.agent)
        if job.line is not None and job.status == 400 and not job.exhausted and job.rollout <= 0:
            self.console.print(f"skipped: {outcome.error}", style="yellow", markup=False)

    def _on_signal(self) -> None:
        run = self.run_
        if self.interrupted:
            self.console.print("[red]second interrupt: cancelling in-flight rollouts[/red]")
            run.cancel()
            return
        self.interrupted = True
        run.stop()
        self.console.print(f"[yellow]interrupted: taking no new rows; waiting up to {self.grace_s:.0f} s for in-flight "
                           f"rollouts (Ctrl-C again to stop now). Complete the run later with +resume=true.[/yellow]")
        asyncio.get_running_loop().call_later(self.grace_s, run.cancel)

    # ------------------------------------------------------------ progress
    def progress_numbers(self) -> dict:
        """What the head server shows of this run (ng_status --watch)."""
        elapsed = time.monotonic() - self.stats.started
        done = self.stats.done
        return {"done": done, "failed": self.stats.failed, "total": self.total_rollouts, "concurrency": self.limit.value,
                "in_flight": self.run_.in_flight() if self.run_ else 0, "elapsed_s": round(elapsed, 1),
                "rollouts_per_s": round(done / elapsed, 2) if elapsed > 0 else None, "mean_reward": self.stats.mean("reward")}

    def _progress(self, total: int | None):
        if not self.config.get("progress", True):
            return None
        from tqdm import tqdm

        return tqdm(total=total, unit="rollout", dynamic_ncols=True, mininterval=0.5, smoothing=0.1)

    def _tick(self, progress) -> None:
        progress.update(1)
        # Postfix formatting costs more than the update itself: only when tqdm will redraw.
        if progress.n % max(1, self.limit.value // 4) == 0:
            reward = self.stats.mean("reward")
            retries = self.run_.retries if self.run_ else 0
            progress.set_postfix_str((f"reward={reward:.3f} " if reward is not None else "")
                                     + f"failed={self.stats.failed} retries={retries}", refresh=False)


async def collect(composed: Composed, kind: type[Collector] = Collector) -> int:
    collector = None
    try:
        collector = kind(composed)
        return await collector.run()
    except SetupError as e:
        make_console(stderr=True).print(f"{kind.command}: {e}", markup=False)
        return 2
    finally:
        if collector is not None:
            await collector.client.close()
