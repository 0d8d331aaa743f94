"""A frozen vLLM server mid-run: wall time of a run with and without one.

The weather graph (vllm_model over N stand-ins + simple_weather, the default health checks
of vllm_model.yaml: GET /health every 2 s, 2 s timeout, down after 3 failures) and
ng_collect_rollouts. "clean": nothing happens. "frozen": one stand-in is SIGSTOPped
--freeze-after-s seconds after the collector starts (a hung GPU server looks like this: the
port accepts connections, nothing answers). The health checks find it, cut its requests in
flight off and re-issue them on the others. Fresh stand-ins and ng_run for every run.
Without health checks the frozen server's rollouts waited for the 600 s request timeout.

    python bench/frozen_backend.py                   # 600 rollouts, concurrency 60, 3 stand-ins
    python bench/frozen_backend.py --rounds 3 --latency-ms 20
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.table import Table  # noqa: E402

import common as C  # noqa: E402

NAME = "frozen_backend"
BOUND_S = 45.0  # the bound for 600 rollouts at concurrency 60 with one server frozen 1 s in


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=600)
    p.add_argument("--concurrency", type=int, default=60)
    p.add_argument("--standins", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=0.0, help="stand-ins' --latency-ms")
    p.add_argument("--freeze-after-s", type=float, default=1.0, help="SIGSTOP one stand-in this long after the collector starts")
    p.add_argument("--rounds", type=int, default=1, help="repeat both runs (interleaved); the table shows medians")
    p.add_argument("--keep-tmp", action="store_true")
    return p


def adapter_series(graph: C.NgRun, name: str) -> dict[str, float]:
    """{backend url: value} of one ng_model_backend_* series of the policy model."""
    url = next(s["url"] for s in json.loads(C.http_get(f"http://127.0.0.1:{graph.head_port}/servers"))
               if s["name"] == "policy_model")
    out: dict[str, float] = {}
    for line in C.http_get(url + "/metrics").decode().splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            backend = labels.split('backend="', 1)[1].split('"', 1)[0]
            out[backend] = out.get(backend, 0.0) + float(value)
    return out


def one_run(args, work: Path, rows: Path, label: str, freeze: bool, sampler: C.Sampler) -> dict:
    run_dir = work / label
    run_dir.mkdir()
    flags = ["--latency-ms", f"{args.latency_ms:g}"]
    standins = C.start_standins(run_dir, [flags] * args.standins)
    victim = standins[-1]
    frozen_at: list[int] = []
    out = run_dir / "rollouts.jsonl"

    def freeze_now():
        os.kill(victim.proc.pid, signal.SIGSTOP)
        frozen_at.append(C.count_lines(out) if out.exists() else 0)

    try:
        graph = C.NgRun(run_dir, "ng_run", [s.url for s in standins]).wait_ready()
        timer = threading.Timer(args.freeze_after_s, freeze_now) if freeze else None
        if timer is not None:
            timer.start()  # started with the collector: run_measured spawns it right away
        res = C.run_measured(C.collector_argv(graph.head_port, rows, out, args.concurrency, ["+progress=false"]),
                             run_dir, "collect", sampler, timeout=900)
        if timer is not None:
            timer.cancel()
        up = adapter_series(graph, "ng_model_backend_up")
        failovers = adapter_series(graph, "ng_model_backend_failovers_total")
    finally:
        try:
            os.kill(victim.proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    done = C.count_lines(out)
    metrics = C.read_json(C.metrics_path_of(out))
    if res.returncode != 0 or done != args.rollouts:
        C.fail(f"[red]{label}: exit {res.returncode}, {done}/{args.rollouts} rollouts[/red]", res.tail())
    return {
        "label": label, "frozen": freeze, "rollouts": done, "failures": metrics.get("failures"),
        "wall_s": res.wall_s, "frozen_at_rollouts": frozen_at[0] if frozen_at else None,
        "victim_up_at_end": up.get(victim.url), "victim_failovers": failovers.get(victim.url),
        "other_load_cores": res.other_load_cores, "returncode": res.returncode,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = C.repro_command(parser, args, __file__)
    C.print_header("bench/frozen_backend.py", command)
    runs: list[dict] = []
    with C.bench_session(NAME, args.keep_tmp) as (work, sampler):
        rows = C.write_jsonl(work.path / "rows.jsonl", (C.weather_row(i) for i in range(args.rollouts)))
        for r in range(args.rounds):
            order = [False, True] if r % 2 == 0 else [True, False]
            for freeze in order:
                label = f"r{r}_{'frozen' if freeze else 'clean'}"
                run = one_run(args, work.path, rows, label, freeze, sampler)
                run["round"] = r
                runs.append(run)
                C.console.print(f"  round {r} {'frozen' if freeze else 'clean '}: {run['rollouts']} rollouts in "
                                f"{run['wall_s']:.2f} s" + (f" (frozen at {run['frozen_at_rollouts']} written, "
                                                             f"{run['victim_failovers']:.0f} re-issued)" if freeze else ""))
    C.begin_report()
    table = Table(title=f"Frozen backend: {args.rollouts} weather rollouts, concurrency {args.concurrency}, "
                        f"{args.standins} stand-ins (--latency-ms {args.latency_ms:g}), one SIGSTOPped "
                        f"{args.freeze_after_s:g} s in (median of {args.rounds})", title_justify="left")
    for col in ("run", "rollouts", "failures", "wall s", "frozen at (written)", "re-issued from frozen", "frozen marked down",
                "other load (cores)"):
        table.add_column(col, justify="left" if col == "run" else "right")
    summary = {}
    for freeze in (False, True):
        mine = [x for x in runs if x["frozen"] == freeze]
        wall = C.median(x["wall_s"] for x in mine)
        summary["frozen" if freeze else "clean"] = wall
        table.add_row("frozen" if freeze else "clean", f"{C.median(x['rollouts'] for x in mine):.0f}",
                      f"{sum(x['failures'] or 0 for x in mine)}", C.fmt(wall, 2),
                      C.fmt(C.median(x["frozen_at_rollouts"] for x in mine), 0) if freeze else "-",
                      C.fmt(C.median(x["victim_failovers"] for x in mine), 0) if freeze else "-",
                      ("yes" if all(x["victim_up_at_end"] == 0 for x in mine) else "no") if freeze else "-",
                      C.fmt(C.median(x["other_load_cores"] for x in mine), 2))
    C.console.print(table)
    frozen = summary.get("frozen")
    C.console.print(C.targets_table("Target", [(f"{args.rollouts}/{args.rollouts} rollouts with one backend frozen",
                                                 f"< {BOUND_S:g} s", C.fmt(frozen, 2, " s"),
                                                 None if frozen is None else frozen < BOUND_S)]))
    report = C.end_report()
    path = C.write_results(NAME, {"machine": C.machine_info(), "args": vars(args), "command": command,
                                  "runs": runs, "summary_wall_s": summary, "report": report})
    C.print_footer(command, path)
    return C.exit_code()


if __name__ == "__main__":
    sys.exit(C.run_main(main))
