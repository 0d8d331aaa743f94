"""Routing policies over unequal backends: wall time, stickiness, spread and prefix-cache hits.

Three stand-ins, one of them slow (--latency-ms 30 --per-token-ms 1.5, 3x the fast ones'
--latency-ms 10 --per-token-ms 0.5; listed first in policy_base_url, so "first in the list"
would hurt). Episodes of mixed length: the stand-in's tool-call count (--tool-call-turns) is a
per-server flag, so the length is set per ROW instead: every --long-every'th row has
tool_choice "required" (the stand-in then calls the tool on every turn) and the agent stops it
after --long-steps model turns (++...simple_agent.max_steps); the other rows are the usual
2-turn weather episode (tool call, answer). Every row starts with --context-words row-specific
words, so the prefix cache has something to serve beyond the shared tools/system prefix.

For each routing policy (default graph, ++policy_model...routing_policy=...): wall time of the
collector, sessions per backend, % of sessions whose turns all hit one backend (a session id
seen by exactly one stand-in, from /standin/sessions), prefix-cache hit rate (deltas of
vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total over all stand-ins). Then
+num_repeats with group affinity on vs off (least_loaded). Stand-ins and ng_run are restarted
for every run (fresh caches and counters).

    python -m bench.routing
    python -m bench.routing --rollouts 600 --concurrency 32 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from bench import common as C

NAME = "routing"
POLICIES = ("least_loaded", "round_robin", "hash")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=1500,
                   help="rollouts per run (policy runs: distinct rows); short runs are dominated by start and tail")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--latency-ms", type=float, default=10.0, help="fast stand-ins' --latency-ms")
    p.add_argument("--per-token-ms", type=float, default=0.5, help="fast stand-ins' --per-token-ms")
    p.add_argument("--slow-factor", type=float, default=3.0, help="the slow stand-in's latencies = this x the fast ones'")
    p.add_argument("--standins", type=int, default=3, help="stand-ins in all; the first is the slow one")
    p.add_argument("--long-every", type=int, default=4, help="every Nth row is a long episode (0: none)")
    p.add_argument("--long-steps", type=int, default=6, help="model turns of a long episode (agent max_steps)")
    p.add_argument("--context-words", type=int, default=120, help="row-specific words at the start of each prompt")
    p.add_argument("--num-repeats", type=int, default=8, help="repeats per row for the group-affinity runs")
    p.add_argument("--rounds", type=int, default=2, help="repeat every run (interleaved); the table shows medians")
    p.add_argument("--keep-tmp", action="store_true")
    return p


def standin_flags(args, slow: bool) -> list[str]:
    f = args.slow_factor if slow else 1.0
    return ["--latency-ms", f"{args.latency_ms * f:g}", "--per-token-ms", f"{args.per_token_ms * f:g}"]


def rows_for(args, n: int):
    for i in range(n):
        long = args.long_every and i % args.long_every == args.long_every - 1
        yield C.weather_row(i, context_words=args.context_words, tool_choice="required" if long else None)


def one_run(args, work: Path, rows: Path, label: str, extra_ngrun: list[str], extra_collect: list[str],
            sampler: C.Sampler, expected: int) -> dict:
    """Fresh stand-ins + fresh ng_run, one collector run, then read the stand-ins' counters."""
    run_dir = work / label
    run_dir.mkdir()
    standins = C.start_standins(run_dir, [standin_flags(args, slow=(i == 0)) for i in range(args.standins)])
    try:
        graph = C.NgRun(run_dir, "ng_run", [s.url for s in standins],
                        extra_args=[f"++{C.AGENT_KEY}.max_steps={args.long_steps}", *extra_ngrun]).wait_ready()
        before = [s.metrics() for s in standins]
        out = run_dir / "rollouts.jsonl"
        groups = {"gym_servers": graph.processes, "standins": lambda: C.processes_of(standins)}
        res = C.run_measured(C.collector_argv(graph.head_port, rows, out, args.concurrency, extra_collect),
                             run_dir, "collect", sampler, groups)
        after = [s.metrics() for s in standins]
        sessions = [s.sessions() for s in standins]
        stats = [s.stats() for s in standins]
        graph.stop()
    finally:
        for s in standins:
            s.stop()
    metrics = C.read_json(C.metrics_path_of(out))
    done = C.count_lines(out)
    if res.returncode != 0 or done != expected:
        C.fail(f"[red]{label}: exit {res.returncode}, {done}/{expected} rollouts[/red]", res.tail())
    seen: dict[str, int] = {}
    for per in sessions:
        for sid in per:
            seen[sid] = seen.get(sid, 0) + 1
    one = sum(1 for n in seen.values() if n == 1)
    d = lambda i, k: after[i].get(k, 0.0) - before[i].get(k, 0.0)  # noqa: E731
    hits = sum(d(i, "vllm:prefix_cache_hits_total") for i in range(len(standins)))
    queries = sum(d(i, "vllm:prefix_cache_queries_total") for i in range(len(standins)))
    turns = sum(st["requests"] for st in stats)
    return {
        "label": label, "rollouts": done, "returncode": res.returncode, "wall_s": res.wall_s,
        "in_run_s": metrics.get("elapsed_s"), "rollouts_per_s": metrics.get("rollouts_per_s"),
        "latency_p50_s": metrics.get("latency_p50_s"), "latency_p95_s": metrics.get("latency_p95_s"),
        "sessions": len(seen), "sessions_one_backend": one,
        "sticky_pct": 100 * one / len(seen) if seen else None,
        "sessions_per_backend": [len(s) for s in sessions],
        "requests_per_backend": [st["requests"] for st in stats],
        "model_requests": turns,
        "prefix_hits": hits, "prefix_queries": queries,
        "hit_rate_pct": 100 * hits / queries if queries else None,
        "cpu_s": {"collector": res.cpu_s, **res.group_cpu_s},
        "other_load_cores": res.other_load_cores,
        "ngrun_argv": graph.argv,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = C.repro_command(parser, args, __file__)
    policies = [p for p in C.parse_str_list(args.policies) if p in POLICIES]
    C.print_header("bench/routing.py", command)
    slow = standin_flags(args, True)
    fast = standin_flags(args, False)
    C.console.print(f"stand-ins: 1 slow ({' '.join(slow)}) + {args.standins - 1} fast ({' '.join(fast)}); "
                    f"every {args.long_every}th row a long episode ({args.long_steps} model turns, tool_choice=required), "
                    f"others 2 turns; {args.context_words} row-specific words per prompt; concurrency {args.concurrency}")
    runs: list[dict] = []
    with C.bench_session("routing", args.keep_tmp) as (work, sampler):
        rows = C.write_jsonl(work.path / "rows.jsonl", rows_for(args, args.rollouts))
        group_rows = max(1, args.rollouts // args.num_repeats)
        grows = C.write_jsonl(work.path / "group_rows.jsonl", rows_for(args, group_rows))
        plan = [(f"policy={p}", "policy", p, [f"++{C.MODEL_KEY}.routing_policy={p}"], [], args.rollouts) for p in policies]
        for on in (True, False):
            plan.append((f"num_repeats={args.num_repeats} group_affinity={'on' if on else 'off'}", "affinity",
                         "on" if on else "off",
                         [f"++{C.MODEL_KEY}.routing_policy=least_loaded", f"++{C.MODEL_KEY}.group_affinity={str(on).lower()}"],
                         [f"+num_repeats={args.num_repeats}"], group_rows * args.num_repeats))
        for rnd in range(args.rounds):
            order = plan if rnd % 2 == 0 else list(reversed(plan))  # alternate the order between rounds
            for label, kind, value, ngrun_args, collect_args, expected in order:
                src = grows if kind == "affinity" else rows
                r = one_run(args, work.path, src, f"r{rnd}_{kind}_{value}", ngrun_args, collect_args, sampler, expected)
                r.update(round=rnd, kind=kind, value=value, name=label)
                runs.append(r)
                C.console.print(f"  round {rnd} {label:<40} wall {r['wall_s']:6.2f} s, in run {r['in_run_s']} s, "
                                f"sticky {C.fmt(r['sticky_pct'], 1)}%, hit rate {C.fmt(r['hit_rate_pct'], 1)}%, "
                                f"sessions/backend {r['sessions_per_backend']}")

    C.begin_report()

    summary = []
    for kind, value in [("policy", p) for p in policies] + [("affinity", "on"), ("affinity", "off")]:
        mine = [r for r in runs if r["kind"] == kind and r["value"] == value]
        if not mine:
            continue
        med = lambda k: C.median(r[k] for r in mine)  # noqa: E731
        n_b = len(mine[0]["sessions_per_backend"])
        summary.append({
            "kind": kind, "value": value, "name": mine[0]["name"], "runs": len(mine),
            "wall_s": med("wall_s"), "in_run_s": med("in_run_s"), "rollouts_per_s": med("rollouts_per_s"),
            "latency_p50_s": med("latency_p50_s"), "latency_p95_s": med("latency_p95_s"),
            "sticky_pct_min": min(r["sticky_pct"] or 0 for r in mine),
            "sessions_per_backend": [C.median(r["sessions_per_backend"][i] for r in mine) for i in range(n_b)],
            "requests_per_backend": [C.median(r["requests_per_backend"][i] for r in mine) for i in range(n_b)],
            "hit_rate_pct": med("hit_rate_pct"), "other_load_cores": med("other_load_cores"),
        })

    table = Table(title=f"Routing: {args.rollouts} rollouts/run, concurrency {args.concurrency}, 1 slow + "
                        f"{args.standins - 1} fast stand-ins, mixed episode lengths (median of {args.rounds} round(s))",
                  title_justify="left")
    for col in ("run", "wall s (cmd)", "in-run s", "rollouts/s", "p50 ms", "p95 ms", "sticky sessions",
                "sessions per backend (slow, fast...)", "requests per backend", "prefix hit rate", "other load (cores)"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in summary:
        if r["kind"] == "affinity" and r["value"] == "on":
            table.add_section()
        table.add_row(r["name"], C.fmt(r["wall_s"], 2), C.fmt(r["in_run_s"], 2), C.fmt(r["rollouts_per_s"], 0),
                      C.fmt(r["latency_p50_s"] and r["latency_p50_s"] * 1000, 0),
                      C.fmt(r["latency_p95_s"] and r["latency_p95_s"] * 1000, 0),
                      C.fmt(r["sticky_pct_min"], 1, "%"),
                      " / ".join(f"{x:.0f}" for x in r["sessions_per_backend"]),
                      " / ".join(f"{x:.0f}" for x in r["requests_per_backend"]),
                      C.fmt(r["hit_rate_pct"], 1, "%"), C.fmt(r["other_load_cores"], 2))
    C.console.print(table)

    by = {(r["kind"], r["value"]): r for r in summary}
    tgt = []
    for r in summary:
        if r["kind"] == "policy":
            tgt.append((f"{r['value']}: sessions with every turn on one backend", "100%",
                        C.fmt(r["sticky_pct_min"], 2, "%"), r["sticky_pct_min"] >= 100.0))
    ll, rr = by.get(("policy", "least_loaded")), by.get(("policy", "round_robin"))
    if ll and rr:
        for key, what in (("wall_s", "whole command"), ("in_run_s", "in run")):
            if ll[key] and rr[key]:
                gain = 100 * (1 - ll[key] / rr[key])
                tgt.append((f"least_loaded wall time below round_robin ({what})", ">= 15%", C.fmt(gain, 1, "%"), gain >= 15))
    on, off = by.get(("affinity", "on")), by.get(("affinity", "off"))
    if on and off and on["hit_rate_pct"] is not None and off["hit_rate_pct"] is not None:
        tgt.append(("group affinity raises the prefix hit rate", "on > off",
                    f"{on['hit_rate_pct']:.1f}% vs {off['hit_rate_pct']:.1f}%", on["hit_rate_pct"] > off["hit_rate_pct"]))
    C.console.print(C.targets_table("Targets", tgt))
    return C.finish(NAME, command, args, tgt, standin_flags={"slow": slow, "fast": fast}, summary=summary, runs=runs)


if __name__ == "__main__":
    sys.exit(C.run_main(main))
