"""Does the gym keep a fleet of slow backends busy? Rollouts/s against the backends' capacity.

N stand-ins with --latency-ms L --max-num-seqs S (per-token latency 0) can finish at most
N x S / (L / 1000) requests per second; a weather rollout makes 2 model requests, so the
capacity bound is N x S / (L / 1000) / 2 rollouts/s (3 x 32 / 0.05 / 2 = 960 by default).
At least N x S requests must be in flight to reach it, so the collector runs at concurrency
96 (= 3 x 32: only just enough, since a rollout also spends time outside the backends) and
128 on the default graph (and, for comparison, co-located). The direct client
(bench/direct_client.py) at the same concurrency shows what this machine can reach with no
servers in between. % of bound uses the collector's own rollouts/s (its startup excluded).

    python -m bench.backend_bound
    python -m bench.backend_bound --rollouts 5000 --concurrency 96,128,192 --modes direct,default,colocated
"""

from __future__ import annotations

import argparse
import sys

from rich.table import Table

from bench import common as C

NAME = "backend_bound"
TARGET_PCT = 95.0
REQUESTS_PER_ROLLOUT = 2  # weather: tool call turn + answer turn


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=3000)
    p.add_argument("--concurrency", default="96,128")
    p.add_argument("--modes", default="direct,default,colocated",
                   help="subset of direct,default,colocated (the target is for the default graph)")
    p.add_argument("--standins", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="repeat every measurement; the table shows medians")
    p.add_argument("--keep-tmp", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = C.repro_command(parser, args, __file__)
    concurrencies = C.parse_int_list(args.concurrency)
    modes = [m for m in C.parse_str_list(args.modes) if m in ("direct", "default", "colocated")]
    bound = args.standins * args.max_num_seqs / (args.latency_ms / 1000) / REQUESTS_PER_ROLLOUT
    C.print_header("bench/backend_bound.py", command)
    C.console.print(f"capacity bound = {args.standins} backends x {args.max_num_seqs} seqs / {args.latency_ms / 1000:g} s "
                    f"per request / {REQUESTS_PER_ROLLOUT} requests per rollout = {bound:,.0f} rollouts/s "
                    f"(per-token latency 0; needs >= {args.standins * args.max_num_seqs} requests in flight)")
    runs: list[dict] = []
    with C.bench_session("backend_bound", args.keep_tmp) as (work, sampler):
        rows = C.write_jsonl(work.path / "rows.jsonl", (C.weather_row(i) for i in range(args.rollouts)))
        flags = ["--latency-ms", f"{args.latency_ms:g}", "--max-num-seqs", str(args.max_num_seqs)]
        standins = C.start_standins(work.path, [flags] * args.standins)
        urls = [s.url for s in standins]
        graphs = {m: C.NgRun(work.path, f"ng_run_{m}", urls, colocate=(m == "colocated")) for m in modes if m != "direct"}
        for g in graphs.values():
            g.wait_ready()
        for rnd in range(args.rounds):
            for c in concurrencies:
                for mode in modes:
                    out = work.path / f"r{rnd}_{mode}_c{c}.jsonl"
                    groups = {"standins": lambda: C.processes_of(standins)}
                    if mode == "direct":
                        argv = C.direct_argv(urls, rows, out, c)
                    else:
                        groups["gym_servers"] = graphs[mode].processes
                        argv = C.collector_argv(graphs[mode].head_port, rows, out, c)
                    res = C.run_measured(argv, work.path, out.stem, sampler, groups)
                    metrics = C.read_json(C.metrics_path_of(out))
                    done = C.count_lines(out)
                    if res.returncode != 0 or done != args.rollouts:
                        C.fail(f"[red]{mode} c={c}: exit {res.returncode}, {done}/{args.rollouts}[/red]", res.tail())
                    in_run = metrics.get("rollouts_per_s")
                    cmd_rate = done / res.wall_s
                    runs.append({
                        "round": rnd, "mode": mode, "concurrency": c, "rollouts": done, "wall_s": res.wall_s,
                        "rollouts_per_s": cmd_rate, "in_run_rollouts_per_s": in_run,
                        "pct_of_bound_in_run": 100 * in_run / bound if in_run else None,
                        "pct_of_bound_cmd": 100 * cmd_rate / bound,
                        "latency_p50_s": metrics.get("latency_p50_s"), "latency_p95_s": metrics.get("latency_p95_s"),
                        "cpu_s": {"client": res.cpu_s, **res.group_cpu_s},
                        "peak_rss_mb": {"client": res.maxrss_mb, **res.group_peak_rss_mb},
                        "other_load_cores": res.other_load_cores,
                    })
                    C.console.print(f"  conc {c:>4} {mode:<9}: {in_run} rollouts/s in run, {cmd_rate:.0f} whole command")
                    out.unlink(missing_ok=True)

    C.begin_report()

    summary = []
    for c in concurrencies:
        for mode in modes:
            mine = [r for r in runs if r["mode"] == mode and r["concurrency"] == c]
            if not mine:
                continue
            med = lambda k: C.median(r[k] for r in mine)  # noqa: E731
            cpu = lambda k: C.median(r["cpu_s"].get(k, 0) * 1000 / r["rollouts"] if r["rollouts"] else None for r in mine)  # noqa: E731
            summary.append({"mode": mode, "concurrency": c, "in_run_rollouts_per_s": med("in_run_rollouts_per_s"),
                            "pct_of_bound_in_run": med("pct_of_bound_in_run"), "rollouts_per_s": med("rollouts_per_s"),
                            "pct_of_bound_cmd": med("pct_of_bound_cmd"), "latency_p50_s": med("latency_p50_s"),
                            "latency_p95_s": med("latency_p95_s"), "other_load_cores": med("other_load_cores"),
                            "cpu_ms_per_rollout": {"gym_servers": cpu("gym_servers"), "client": cpu("client"),
                                                   "standins": cpu("standins")}})

    table = Table(title=f"Backend-bound: {args.standins} stand-ins x --max-num-seqs {args.max_num_seqs}, "
                        f"--latency-ms {args.latency_ms:g}; bound {bound:,.0f} rollouts/s; {args.rollouts} rollouts",
                  title_justify="left")
    for col in ("mode", "conc", "rollouts/s (in run)", "% of bound", "rollouts/s (whole cmd)", "% of bound (cmd)",
                "p50 ms", "p95 ms", "CPU ms/rollout: gym servers", "collector / client", "stand-ins",
                "other load (cores)"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in summary:
        cpu = r["cpu_ms_per_rollout"]
        table.add_row(r["mode"], str(r["concurrency"]), C.fmt(r["in_run_rollouts_per_s"], 0),
                      C.fmt(r["pct_of_bound_in_run"], 1, "%"), C.fmt(r["rollouts_per_s"], 0),
                      C.fmt(r["pct_of_bound_cmd"], 1, "%"),
                      C.fmt(r["latency_p50_s"] and r["latency_p50_s"] * 1000, 1),
                      C.fmt(r["latency_p95_s"] and r["latency_p95_s"] * 1000, 1),
                      C.fmt(cpu["gym_servers"] if r["mode"] != "direct" else None, 2), C.fmt(cpu["client"], 2),
                      C.fmt(cpu["standins"], 2), C.fmt(r["other_load_cores"], 2))
    C.console.print(table)
    tgt = []
    for r in summary:
        if r["mode"] == "default":
            pct = r["pct_of_bound_in_run"]
            tgt.append((f"default graph, conc {r['concurrency']}: % of capacity bound", f">= {TARGET_PCT:g}%",
                        C.fmt(pct, 1, "%"), None if pct is None else pct >= TARGET_PCT))
    C.console.print(C.targets_table("Targets (rollouts/s as the collector measures it, startup excluded)", tgt))
    return C.finish(NAME, command, args, tgt, bound_rollouts_per_s=bound, summary=summary, runs=runs)


if __name__ == "__main__":
    sys.exit(C.run_main(main))
