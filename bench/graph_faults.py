"""Faults in the graph itself, the issue-20 scenarios: a server of ours frozen for good, ng_run
SIGKILLed mid-collection (then started again and the run resumed), ng_run SIGKILLed while a
child is frozen (then started again). Each fault lands when a quarter of the rollouts is
written; the weather graph over stand-ins, everything at its defaults.

    python -m bench.graph_faults                       # 1200 rollouts, concurrency 60, 3 x 100 ms stand-ins
    python -m bench.graph_faults --rollouts 300 --latency-ms 20
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, Graph, StandIn, weather_env
from nemo_gym_cli.testing.harness.scenarios import (by_name, collect, collect_through_fault, lines_written, read_lines,
                                                    write_rows)


def rollouts_in(out: Path) -> tuple[int, int]:
    """(lines, distinct task indexes) of the output."""
    rows = read_lines(out)
    return len(rows), len({r["_ng_task_index"] for r in rows})


def failures_in(out: Path) -> int:
    path = out.with_name(out.stem + "_failures.jsonl")
    return path.read_bytes().count(b"\n") if path.exists() else 0


def frozen_for_good(args, work: Path, env: dict, victim: str) -> list[str]:
    g = Graph(work, [VLLM_MODEL, WEATHER], env)
    out = work / "out.jsonl"
    try:
        pid = by_name(g)[victim]["pid"]
        code, _, took = collect_through_fault(g, out, args.rollouts, lambda: os.kill(pid, signal.SIGSTOP),
                                              f"+concurrency={args.concurrency}", timeout=600)
        lines, distinct = rollouts_in(out)
        return [f"{victim} SIGSTOPped for good", f"{lines}/{args.rollouts} ({distinct} distinct)", str(failures_in(out)),
                f"run ended {took:.1f} s after the freeze (exit {code})", "-"]
    finally:
        g.stop()
        g.kill_leftovers()


def ng_run_killed(args, work: Path, env: dict, freeze_child: bool) -> list[str]:
    g = Graph(work, [VLLM_MODEL, WEATHER], env)
    out = work / "out.jsonl"
    child = by_name(g)["simple_weather"]["pid"]

    def fault() -> None:
        if freeze_child:
            os.kill(child, signal.SIGSTOP)
        os.kill(g.proc.pid, signal.SIGKILL)

    try:
        code, _, ended = collect_through_fault(g, out, args.rollouts, fault, f"+concurrency={args.concurrency}", timeout=600)
        written = lines_written(out)
        failed = failures_in(out)
        left = freeze_child and psutil.pid_exists(child) and psutil.Process(child).status() == psutil.STATUS_STOPPED
        g2 = Graph(work, [VLLM_MODEL, WEATHER], env, head_port=g.head_port)
        try:
            cleaned = "ended 1 server process left by an earlier ng_run" in g2.output()
            t1 = time.monotonic()
            resumed = collect(g2, "+input_jsonl_fpath=in.jsonl", f"+output_jsonl_fpath={out}", "+resume=true",
                              f"+concurrency={args.concurrency}", timeout=600)
            resume_s = time.monotonic() - t1
        finally:
            g2.stop()
        lines, distinct = rollouts_in(out)
        what = "ng_run SIGKILLed" + (" while simple_weather is SIGSTOPped" if freeze_child else "") + " mid-collection"
        extra = (f"stopped child left: {'yes' if left else 'no'}, next ng_run ended it: {'yes' if cleaned else 'no'}"
                 if freeze_child else "-")
        return [what, f"{written} at the end; after resume {lines}/{args.rollouts} ({distinct} distinct)", str(failed),
                f"collector ended {ended:.1f} s after the kill (exit {code}, graph_wait_s 60); "
                f"resume exit {resumed.returncode} in {resume_s:.1f} s", extra]
    finally:
        g.stop()
        g.kill_leftovers()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=1200)
    p.add_argument("--concurrency", type=int, default=60)
    p.add_argument("--standins", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=100)
    args = p.parse_args(argv)
    console = Console()
    table = Table(title=f"Graph faults: {args.rollouts} weather rollouts, concurrency {args.concurrency}, {args.standins} "
                        f"stand-ins x {args.latency_ms:g} ms, each fault at 25% written", title_justify="left")
    for col in ("fault", "rollouts written", "failures recorded", "time", "leftovers"):
        table.add_column(col)
    with tempfile.TemporaryDirectory(prefix="bench_graph_faults_") as tmp:
        root = Path(tmp)
        scenarios = [("adapter", lambda w, e: frozen_for_good(args, w, e, "policy_model")),
                     ("agent", lambda w, e: frozen_for_good(args, w, e, "simple_weather_simple_agent")),
                     ("killed", lambda w, e: ng_run_killed(args, w, e, False)),
                     ("killed_frozen", lambda w, e: ng_run_killed(args, w, e, True))]
        for name, scenario in scenarios:
            work = root / name
            work.mkdir()
            standins = [StandIn(work, "--latency-ms", f"{args.latency_ms:g}") for _ in range(args.standins)]
            try:
                write_rows(work / "in.jsonl", args.rollouts)
                row = scenario(work, weather_env(standins))
            except (subprocess.SubprocessError, TimeoutError, AssertionError) as e:
                row = [name, "-", "-", f"failed: {type(e).__name__}: {e}", "-"]
            finally:
                for s in standins:
                    s.stop()
            console.print(" | ".join(row))
            table.add_row(*row)
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
