"""One NeMo Gym environment (mcqa, unmodified) served by NeMo Gym's own stack vs inside our graph.

Both runs use nemo-gym 0.4.0's mcqa resources server (its own Python, its own FastAPI code) and
the same zero-latency vLLM stand-in, and both graphs are started by our ng_run (NeMo Gym's own
ng_run builds a uv venv per server from PyPI; the servers it would start are the same code):
- nemo_gym: NeMo Gym's simple_agent and vllm_model too (`runtime: nemo_gym`), driven by NeMo
  Gym's own ng_collect_rollouts;
- ours: our simple_agent and vllm_model around mcqa, driven by our ng_collect_rollouts.
Rollouts/s end to end = rollouts / the collector's wall time (its start and exit included: NeMo's
collector takes many seconds to import and read its config); in run = the rollouts after the first
/ the time from the first to the last line written to the output (both collectors write each
rollout as it ends), so the start and the exit are left out. CPU per rollout = the CPU time the
graph's processes (ng_run and every server, the Ray head included) and the collector spent during
the collector's whole run.

    python -m bench.nemo_gym --rollouts 200 --concurrency 20   # the README's table
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml
from rich.table import Table

from bench.common import console, repro_command
from nemo_gym_cli.config.nemo_gym import nemo_gym_tree
from nemo_gym_cli.testing.harness import Graph, StandIn, run_cli
from nemo_gym_cli.testing.harness.nemo_gym import ensure_nemo_gym

MCQA = "resources_servers/mcqa/configs/mcqa.yaml"
OUR_MODEL = "responses_api_models/vllm_model/configs/vllm_model.yaml"
NEMO_STACK = {  # NeMo Gym's own agent and model adapter for mcqa (its vllm_model config's keys)
    "mcqa_simple_agent": {"responses_api_agents": {"simple_agent": {"runtime": "nemo_gym"}}},
    "policy_model": {"responses_api_models": {"vllm_model": {
        "runtime": "nemo_gym", "entrypoint": "app.py", "base_url": "${policy_base_url}", "api_key": "${policy_api_key}",
        "model": "${policy_model_name}", "return_token_id_information": False, "uses_reasoning_parser": False,
        "uses_interleaved_reasoning": False, "chat_template_kwargs": None, "extra_body": None, "default_headers": {}}}},
}


def tree_cpu_s(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


class LineTimes:
    """When each new line of a growing file appeared (polled; it reads only what was appended)."""

    POLL_S = 0.005

    def __init__(self, path: Path):
        self.path, self.lines, self.first, self.last = path, 0, None, None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        offset = 0
        while not self.done.wait(self.POLL_S):
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    new = f.read()
            except FileNotFoundError:
                continue
            offset += len(new)
            if new.count(b"\n"):
                now = time.monotonic()
                self.lines += new.count(b"\n")
                self.first = self.first or now
                self.last = now

    def stop(self) -> float | None:
        """Rollouts/s from the first line to the last (None with fewer than 2 lines)."""
        self.done.set()
        self.thread.join()
        return (self.lines - 1) / (self.last - self.first) if self.lines > 1 and self.last > self.first else None


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_mode(mode: str, python: str, work: Path, standin: StandIn, rollouts: int, concurrency: int) -> dict:
    cwd = work / mode
    cwd.mkdir()
    paths = [MCQA]
    if mode == "nemo_gym":
        (cwd / "nemo_stack.yaml").write_text(yaml.safe_dump(NEMO_STACK))
        paths.append("nemo_stack.yaml")
    else:
        paths.append(OUR_MODEL)
    env = {"policy_base_url": standin.url, "policy_api_key": "EMPTY", "policy_model_name": "standin-model"}
    graph = Graph(cwd, paths, env, [f"+nemo_gym.python={python}", "+stop_grace_s=3"], timeout=300)
    try:
        data = nemo_gym_tree(python) / "resources_servers" / "mcqa" / "data" / "example.jsonl"
        repeats = max(1, rollouts // 5)
        out = cwd / "rollouts.jsonl"
        servers0, collector0, t0 = tree_cpu_s(graph.proc.pid), children_cpu_s(), time.monotonic()
        lines = LineTimes(out)
        if mode == "nemo_gym":
            run_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
            done = subprocess.run([str(Path(python).parent / "ng_collect_rollouts"), "+agent_name=mcqa_simple_agent",
                                   f"+input_jsonl_fpath={data}", f"+output_jsonl_fpath={out}", f"+num_repeats={repeats}",
                                   f"+num_samples_in_parallel={concurrency}",
                                   f"+head_server={{host:127.0.0.1,port:{graph.head_port}}}"],
                                  cwd=cwd, env=run_env, capture_output=True, text=True, timeout=1800)
        else:
            done = run_cli("ng_collect_rollouts", ["+agent_name=mcqa_simple_agent", f"+input_jsonl_fpath={data}",
                                                   f"+output_jsonl_fpath={out}", f"+num_repeats={repeats}",
                                                   f"+concurrency={concurrency}", f"+head_server.port={graph.head_port}",
                                                   "+progress=false"], cwd, timeout=1800)
        wall = time.monotonic() - t0
        in_run = lines.stop()
        servers_cpu, collector_cpu = tree_cpu_s(graph.proc.pid) - servers0, children_cpu_s() - collector0
        if done.returncode != 0:
            raise RuntimeError(f"{mode}: the collector failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        written = len(out.read_text().splitlines())
        return {"mode": mode, "rollouts": written, "wall_s": wall, "rps": written / wall, "in_run_rps": in_run,
                "servers_ms": 1000 * servers_cpu / written, "collector_ms": 1000 * collector_cpu / written}
    finally:
        graph.stop()
        graph.kill_leftovers()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=50)
    args = p.parse_args(argv)
    python, why = ensure_nemo_gym()
    if python is None:
        print(f"bench.nemo_gym: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench_nemo_gym_") as tmp:
        work = Path(tmp)
        standin = StandIn(work)
        try:
            results = [run_mode(mode, python, work, standin, args.rollouts, args.concurrency) for mode in ("nemo_gym", "ours")]
        finally:
            standin.stop()
    table = Table(title=f"mcqa (NeMo Gym 0.4.0, unmodified), {args.rollouts} rollouts, concurrency {args.concurrency}, one run")
    for col in ("stack", "rollouts", "wall s", "rollouts/s end to end", "rollouts/s in run", "CPU ms/rollout (servers + collector)"):
        table.add_column(col)
    base = results[0]
    for r in results:
        cpu = r["servers_ms"] + r["collector_ms"]
        cpu_ratio = cpu / (base["servers_ms"] + base["collector_ms"])
        in_run = f"{r['in_run_rps']:.1f} ({r['in_run_rps'] / base['in_run_rps']:.2f}x)" if r["in_run_rps"] and base["in_run_rps"] else "-"
        table.add_row(r["mode"], str(r["rollouts"]), f"{r['wall_s']:.1f}", f"{r['rps']:.1f} ({r['rps'] / base['rps']:.2f}x)",
                      in_run, f"{cpu:.1f} ({r['servers_ms']:.1f} + {r['collector_ms']:.1f}; {cpu_ratio:.2f}x)")
    console.print(table)
    print(f"reproduce: {repro_command(p, args, __file__)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
