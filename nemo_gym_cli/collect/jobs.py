"""What a collection works on: jobs (one rollout of one row), read lazily from rows or a file.

A row names its agent with `agent_ref: {type: responses_api_agents, name: ...}` (NeMo Gym's
key); rows without one use the default agent. The repeats of a row (per agent) are adjacent.
On resume, the output says which (task, rollout) pairs are done and the failures file says how
many attempts each failed pair has used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson

from nemo_gym_cli.config import AGENT_SERVERS

DEFAULT_KEY = "_default"


@dataclass
class Job:
    task: int  # _ng_task_index: 0-based row number of the input
    rollout: int  # _ng_rollout_index: repeat number
    row: dict | None
    agent: str | None
    line: int | None = None  # 1-based line number in the input file
    error: str | None = None  # known bad before it runs (not JSON, no agent, ...)
    status: int | None = None
    prior_attempts: int = 0  # attempts used by earlier runs (resume)
    prior_reasons: list[str] = field(default_factory=list)
    exhausted: bool = False  # no attempts left, or its failure was final: carried over as a failure, not run again


def retryable(status: int | None) -> bool:
    """Worth another attempt: no answer at all, a server error, or "try again later". Any other
    4xx is the row's fault: final, in this run and on resume."""
    return status is None or status >= 500 or status in (408, 429)


class Repeats:
    """`num_repeats`: an int for every agent, or `{_default: 1, some_agent: 8}`."""

    def __init__(self, spec: "int | dict[str, int] | Repeats"):
        if isinstance(spec, Repeats):
            self.default, self.per_agent = spec.default, dict(spec.per_agent)
            return
        if isinstance(spec, dict):
            per_agent = {str(k): self._check(v, f"num_repeats.{k}") for k, v in spec.items()}
            self.default = per_agent.pop(DEFAULT_KEY, 1)
            self.per_agent = per_agent
        else:
            self.default, self.per_agent = self._check(spec, "num_repeats"), {}

    @staticmethod
    def _check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"+{key} must be an integer >= 1 (or a mapping like {{_default:1,my_agent:8}}), got {value!r}")
        return value

    def of(self, agent: str | None) -> int:
        return self.per_agent.get(agent, self.default) if agent else self.default

    def max(self) -> int:
        return max([self.default, *self.per_agent.values()])


def agent_of(row: dict, default: str | None) -> tuple[str | None, str | None]:
    """(agent name, error): the row's agent_ref, else the default."""
    ref = row.get("agent_ref")
    if ref is None:
        if default:
            return default, None
        return None, "row names no agent: give it agent_ref {type: responses_api_agents, name: ...} or pass +agent_name=..."
    if not isinstance(ref, dict) or not isinstance(ref.get("name"), str) or not ref["name"]:
        return None, f"agent_ref must be {{type: responses_api_agents, name: <agent>}}, got {ref!r}"
    if ref.get("type", AGENT_SERVERS) != AGENT_SERVERS:
        return None, f"agent_ref.type must be '{AGENT_SERVERS}', got {ref.get('type')!r}"
    return ref["name"], None


def agent_ref(name: str | None) -> dict | None:
    return {"type": AGENT_SERVERS, "name": name} if name else None


def check_row(row: Any, where: str) -> str | None:
    if not isinstance(row, dict):
        return f"{where}: expected a JSON object, got {type(row).__name__}"
    if not isinstance(row.get("responses_create_params"), dict):
        return f"{where}: row has no 'responses_create_params' object"
    return None


def jobs_of_row(task: int, row: Any, line: int | None, where: str, repeats: Repeats, default_agent: str | None,
                params: dict | None = None, error: str | None = None) -> Iterator[Job]:
    """The jobs of one row (its repeats), with the row's problem if it has one."""
    agent = default_agent
    error = error or check_row(row, where)
    if error is None:
        agent, agent_error = agent_of(row, default_agent)
        if agent_error:
            error = f"{where}: {agent_error}"
        elif params:
            row["responses_create_params"] = {**row["responses_create_params"], **params}
    for rollout in range(repeats.of(agent)):
        yield Job(task, rollout, row if isinstance(row, dict) else None, agent, line, error, 400 if error else None)


def iter_rows(rows: Iterable[dict], repeats: Repeats, default_agent: str | None, params: dict | None = None) -> Iterator[Job]:
    """Jobs of in-memory rows (the in-process API): task index = position in `rows`."""
    for task, row in enumerate(rows):
        yield from jobs_of_row(task, row, None, f"row {task}", repeats, default_agent, params)


def iter_file(path: Path, limit: int | None, repeats: Repeats, default_agent: str | None, params: dict | None) -> Iterator[Job]:
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
            except orjson.JSONDecodeError as e:
                error = f"{path}:{line_no}: not valid JSON ({e})"
            yield from jobs_of_row(task, row, line_no, f"{path}:{line_no}", repeats, default_agent, params, error)


def for_resume(jobs: Iterator[Job], done: set[tuple[int, int]], failed: dict[tuple[int, int], dict],
               max_attempts: int, skipped: list[int]) -> Iterator[Job]:
    """Skip the pairs already written; give failed pairs their attempts so far (or carry them over
    as failures when none are left, or when the failure was final: a 4xx the row caused).
    skipped[0] counts the skipped pairs."""
    for job in jobs:
        key = (job.task, job.rollout)
        if key in done:
            skipped[0] += 1
            continue
        before = failed.get(key)
        if before is not None:
            job.prior_attempts = int(before.get("attempts") or 1)
            job.prior_reasons = list(before.get("reasons") or [before.get("reason", "")])
            if job.prior_attempts >= max_attempts or not retryable(before.get("status")):
                job.exhausted = True
                job.error = before.get("reason") or "failed"
                job.status = before.get("status")
        yield job


def out_paths(output: Path) -> tuple[Path, Path]:
    stem = output.with_suffix("") if output.suffix == ".jsonl" else output
    return stem.with_name(stem.name + "_failures.jsonl"), stem.with_name(stem.name + "_metrics.json")


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def read_done(output: Path, on_row=None) -> set[tuple[int, int]]:
    """(task, rollout) pairs already written; a torn last line (killed mid-write) is cut off.
    `on_row(row)` sees each complete row (e.g. to count it in pass@k)."""
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
            if on_row is not None:
                on_row(row)
            good_end += len(raw)
        f.truncate(good_end)
    return done


def read_failed(path: Path) -> dict[tuple[int, int], dict]:
    """The failure records of an earlier run, by (task, rollout)."""
    failed: dict[tuple[int, int], dict] = {}
    if not path.exists():
        return failed
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = orjson.loads(raw)
                failed[(int(rec["_ng_task_index"]), int(rec["_ng_rollout_index"]))] = rec
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a torn line: that pair is simply retried
    return failed
