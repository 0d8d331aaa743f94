"""ng_reverify: grade stored rollouts again, without the model.

Each line of a collector's output (the row, the model's `response`, the old grade) is sent to
the `/verify` of its agent's resources server; the new answer is written like a rollout. Same
concurrency, streaming, retries, failures and resume as ng_collect_rollouts (it is the same
run with other jobs and another call). Use: iterate on a reward function without regenerating.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import orjson

from nemo_gym_cli.collect import jobs as J
from nemo_gym_cli.collect.collector import Collector, SetupError
from nemo_gym_cli.collect.stats import Stats
from nemo_gym_cli.config import AGENT_SERVERS
from nemo_gym_cli.serving.client import ServerClient
from nemo_gym_cli.serving.errors import ServerCallError
from nemo_gym_cli.serving.head_client import HeadClient

HELP = """usage: ng_reverify +input_jsonl_fpath=ROLLOUTS.jsonl +output_jsonl_fpath=REVERIFIED.jsonl [+agent_name=NAME]
                   [+limit=N] [+concurrency=N] [+max_attempts={max_attempts}] [+resume=true]

Send each stored rollout of ROLLOUTS.jsonl (ng_collect_rollouts' output: the row, the model's
response, the old grade) to the /verify of its agent's resources server on the running ng_run
graph, and write the answer to REVERIFIED.jsonl: the new reward with the same _ng_task_index,
_ng_rollout_index and agent_ref. No model is called. The agent is the line's agent_ref
(+agent_name for lines without one); the graph must have that agent, since its config names
the resources server. The old `reward` is not sent.

Concurrency, +max_attempts, failures (to REVERIFIED_failures.jsonl), +resume=true, Ctrl-C and
the summary (REVERIFIED_metrics.json, per agent, with pass@k over each task's rollouts) work as
in ng_collect_rollouts.
"""

STALE_KEYS = ("reward",)  # the grade being redone; the environment sets it again


def iter_rollouts(path: Path, limit: int | None, default_agent: str | None) -> Iterator[J.Job]:
    """One job per stored rollout, keyed by its own (task, rollout) indices."""
    with open(path, "rb") as f:
        count = 0
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if limit is not None and count >= limit:
                return
            count += 1
            where = f"{path}:{line_no}"
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                yield J.Job(line_no - 1, -1, None, default_agent, line_no, f"{where}: not valid JSON ({e})", 400)
                continue
            task, rollout = (row.get("_ng_task_index"), row.get("_ng_rollout_index")) if isinstance(row, dict) else (None, None)
            if not isinstance(task, int) or not isinstance(rollout, int) or not isinstance(row.get("response"), dict):
                error = f"{where}: not a stored rollout (needs _ng_task_index, _ng_rollout_index and a response object)"
                yield J.Job(line_no - 1, -1, None, default_agent, line_no, error, 400)
                continue
            agent, error = J.agent_of(row, default_agent)
            yield J.Job(task, rollout, row, agent, line_no, f"{where}: {error}" if error else None, 400 if error else None)


class Reverifier(Collector):
    command = "ng_reverify"

    def __init__(self, composed):
        super().__init__(composed)
        self.stats = Stats(lambda agent: None)  # how many repeats each task had: seen, not configured
        self.resources: dict[str, str] = {}  # agent -> its resources server

    async def prepare(self, agents: set[str]) -> None:
        try:
            config = await HeadClient(self.client).config()
        except ServerCallError as e:
            raise SetupError(f"cannot read the graph's config from {self.client.head_url} ({e.message})") from None
        for name in agents:
            for impl in ((config or {}).get(name) or {}).get(AGENT_SERVERS, {}).values():
                ref = impl.get("resources_server") if isinstance(impl, dict) else None
                if isinstance(ref, dict) and ref.get("name"):
                    self.resources[name] = str(ref["name"])

    def jobs(self, done: set, failed: dict, skipped: list[int]):
        return J.for_resume(iter_rollouts(self.input, self.rows_limit, self.agent), done, failed, self.max_attempts, skipped)

    def total(self, done: set) -> int | None:
        lines = J.count_lines(self.input)
        return max(0, min(lines, self.rows_limit or lines) - len(done))

    async def call(self, job: J.Job, client: ServerClient) -> dict:
        server = self.resources.get(job.agent)
        if server is None:
            raise ServerCallError(job.agent, "", f"agent '{job.agent}' names no resources_server in the graph's config", 404)
        body = {k: v for k, v in job.row.items() if k not in STALE_KEYS}
        result = await client.post(server, "/verify", body, retry_statuses=frozenset())
        if not isinstance(result, dict):
            raise ServerCallError(server, "/verify", f"/verify returned {type(result).__name__}, expected a JSON object", 502)
        result["_ng_task_index"], result["_ng_rollout_index"] = job.task, job.rollout
        result["agent_ref"] = J.agent_ref(job.agent)
        return result
