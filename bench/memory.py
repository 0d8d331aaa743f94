"""Does the collector's memory stay flat as the dataset grows? Peak RSS of ng_collect_rollouts.

One co-located graph (+colocate=true, the fastest) over zero-latency stand-ins; for every
concurrency and every row count, ng_collect_rollouts runs over a JSONL of that many distinct
rows. The collector's peak RSS comes from the kernel (ru_maxrss of that exact process, via
os.wait4) and is cross-checked by sampling it with psutil every 50 ms; the sampled timeline
(in the JSON results) shows whether it grows during the run.

    python -m bench.memory                                   # 1k, 10k, 100k rows at concurrency 100, 1000
    python -m bench.memory --rows 1000,10000 --concurrency 100
"""

from __future__ import annotations

import argparse
import sys

from rich.table import Table

from bench import common as C

NAME = "memory"
FLAT_PCT = 10.0
MAX_MB = 150.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1000,10000,100000", help="comma-separated input row counts")
    p.add_argument("--concurrency", default="100,1000")
    p.add_argument("--mode", default="colocated", choices=("colocated", "default"), help="graph mode of ng_run")
    p.add_argument("--standins", type=int, default=3)
    p.add_argument("--keep-tmp", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = C.repro_command(parser, args, __file__)
    row_counts = C.parse_int_list(args.rows)
    concurrencies = C.parse_int_list(args.concurrency)
    C.print_header("bench/memory.py", command)
    runs: list[dict] = []
    with C.bench_session("memory", args.keep_tmp) as (work, sampler):
        files = {n: C.write_jsonl(work.path / f"rows_{n}.jsonl", (C.weather_row(i) for i in range(n))) for n in row_counts}
        standins = C.start_standins(work.path, [[] for _ in range(args.standins)])
        graph = C.NgRun(work.path, f"ng_run_{args.mode}", [s.url for s in standins],
                        colocate=(args.mode == "colocated")).wait_ready()
        for c in concurrencies:
            for n in row_counts:
                out = work.path / f"out_c{c}_n{n}.jsonl"
                res = C.run_measured(C.collector_argv(graph.head_port, files[n], out, c), work.path, out.stem, sampler,
                                     {"gym_servers": graph.processes}, timeline=True)
                metrics = C.read_json(C.metrics_path_of(out))
                done = C.count_lines(out)
                if res.returncode != 0 or done != n:
                    C.fail(f"[red]c={c} rows={n}: exit {res.returncode}, {done}/{n}[/red]", res.tail())
                tl = res.timeline
                # RSS half way through vs at the end: growth during the run
                early = next((rss for t, rss in tl if t >= 0.5 * res.wall_s), None)
                late = tl[-1][1] if tl else None
                step = max(1, len(tl) // 200)
                runs.append({
                    "concurrency": c, "rows": n, "rollouts": done, "returncode": res.returncode, "wall_s": res.wall_s,
                    "rollouts_per_s": metrics.get("rollouts_per_s"),
                    "collector_peak_rss_mb": res.maxrss_mb, "collector_sampled_peak_rss_mb": res.sampled_peak_rss_mb,
                    "rss_at_half_mb": C.mb(early), "rss_at_end_mb": C.mb(late),
                    "collector_cpu_s": res.cpu_s, "gym_servers_cpu_s": res.group_cpu_s.get("gym_servers"),
                    "gym_servers_peak_rss_mb": res.group_peak_rss_mb.get("gym_servers"),
                    "other_load_cores": res.other_load_cores,
                    "timeline_s_mb": [(t, round(rss / 2**20, 1)) for t, rss in tl[::step]],
                })
                C.console.print(f"  conc {c:>5} rows {n:>7}: peak RSS {res.maxrss_mb:6.1f} MB, "
                                f"{metrics.get('rollouts_per_s')} rollouts/s, {res.wall_s:.1f} s")
                out.unlink(missing_ok=True)

    C.begin_report()

    table = Table(title=f"Collector memory: ng_collect_rollouts peak RSS ({args.mode} graph, zero-latency stand-ins)",
                  title_justify="left")
    for col in ("conc", "input rows", "rollouts/s", "wall s", "peak RSS MB (ru_maxrss)", "sampled peak MB",
                "RSS half way MB", "RSS at end MB", "vs smallest row count", "gym servers peak RSS MB"):
        table.add_column(col, justify="right")
    tgt = []
    for c in concurrencies:
        mine = [r for r in runs if r["concurrency"] == c]
        if not mine:
            continue
        base = mine[0]["collector_peak_rss_mb"]
        for r in mine:
            table.add_row(str(c), f"{r['rows']:,}", C.fmt(r["rollouts_per_s"], 0), C.fmt(r["wall_s"], 1),
                          C.fmt(r["collector_peak_rss_mb"], 1), C.fmt(r["collector_sampled_peak_rss_mb"], 1),
                          C.fmt(r["rss_at_half_mb"], 1), C.fmt(r["rss_at_end_mb"], 1),
                          C.fmt(100 * (r["collector_peak_rss_mb"] / base - 1), 1, "%"),
                          C.fmt(r["gym_servers_peak_rss_mb"], 0))
        table.add_section()
        peaks = [r["collector_peak_rss_mb"] for r in mine]
        spread = 100 * (max(peaks) / min(peaks) - 1)
        counts = ", ".join(f"{r['rows']:,}" for r in mine)
        tgt.append((f"conc {c}: peak RSS flat across {counts} rows",
                    f"within {FLAT_PCT:g}%", C.fmt(spread, 1, "%"), spread <= FLAT_PCT))
        tgt.append((f"conc {c}: peak RSS", f"< {MAX_MB:g} MB", C.fmt(max(peaks), 1, " MB"), max(peaks) < MAX_MB))
    C.console.print(table)
    C.console.print(C.targets_table("Targets", tgt))
    return C.finish(NAME, command, args, tgt, runs=runs)


if __name__ == "__main__":
    sys.exit(C.run_main(main))
