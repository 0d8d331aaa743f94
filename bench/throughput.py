"""Throughput and CPU cost of the gym vs a direct client, on zero-latency vLLM stand-ins.

The full graph (ng_run: vllm_model over N stand-ins + simple_weather + simple_agent) is run in
the default mode (one process per server) and co-located (+colocate=true); ng_collect_rollouts
drives simple_weather_simple_agent. The baseline is bench/direct_client.py: the same two chat
calls per rollout straight to the stand-ins, same concurrency, no servers in between.
Both graphs stay up for the whole run; for every concurrency the modes run back to back
(direct, default, colocated; the order rotates each round), so they share the machine's
state. Rollouts/s = rollouts / wall time of the whole command (collector or direct client),
ng_run startup excluded.

    python bench/throughput.py                      # 3000 rollouts at concurrency 10,100,400
    python bench/throughput.py --rollouts 1000 --concurrency 100 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.table import Table  # noqa: E402

import common as C  # noqa: E402

NAME = "throughput"
MODES = ("direct", "default", "colocated")
TARGETS = {  # at concurrency 100
    "ratio": {"default": 0.3, "colocated": 0.5},
    "gym_cpu_ms": {"default": 2.0, "colocated": 1.0},
}
TARGET_CONCURRENCY = 100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=3000, help="rollouts per measurement (distinct rows)")
    p.add_argument("--concurrency", default="10,100,400", help="comma-separated concurrency levels")
    p.add_argument("--modes", default=",".join(MODES), help="subset of direct,default,colocated")
    p.add_argument("--standins", type=int, default=3, help="number of vLLM stand-ins")
    p.add_argument("--rounds", type=int, default=3, help="repeat every measurement; the table shows medians")
    p.add_argument("--warmup", type=int, default=200, help="rollouts per mode before measuring (not reported)")
    p.add_argument("--profile", action="store_true",
                   help="also py-spy the ng_run children (default mode) at concurrency 100 (needs py-spy)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary working directory")
    return p


def mode_of(graph: C.NgRun) -> str:
    return "colocated" if graph.colocate else "default"


def measure(mode: str, concurrency: int, n: int, rows: Path, work: Path, graphs: dict, standins: list,
            sampler: C.Sampler, tag: str) -> dict:
    out = work / f"{tag}_{mode}_c{concurrency}.jsonl"
    groups = {"standins": lambda: [p for s in standins for p in s.processes()]}
    if mode == "direct":
        argv = C.direct_argv([s.url for s in standins], rows, out, concurrency, ["--limit", str(n)])
    else:
        graph = graphs[mode]
        groups["gym_servers"] = graph.processes
        argv = C.collector_argv(graph.head_port, rows, out, concurrency, [f"+limit={n}"])
    res = C.run_measured(argv, work, f"{tag}_{mode}_c{concurrency}", sampler, groups)
    by_process = {}
    if mode != "direct":
        names = graphs[mode].names_by_pid
        for pid, cpu in res.group_cpu_s_by_pid.get("gym_servers", {}).items():
            by_process[names.get(pid, str(pid))] = cpu
    metrics = C.read_json(C.metrics_path_of(out))
    done = C.count_lines(out)
    if res.returncode != 0 or done != n:
        C.fail(f"[red]{mode} c={concurrency}: exit {res.returncode}, {done}/{n} rollouts[/red]", res.tail())
    row = {
        "mode": mode, "concurrency": concurrency, "rollouts": done, "failures": metrics.get("failures"),
        "returncode": res.returncode, "wall_s": res.wall_s,
        "rollouts_per_s": done / res.wall_s if res.wall_s else None,
        "in_run_rollouts_per_s": metrics.get("rollouts_per_s"),
        "latency_p50_s": metrics.get("latency_p50_s"), "latency_p95_s": metrics.get("latency_p95_s"),
        "cpu_s": {"client": res.cpu_s, **res.group_cpu_s},
        "peak_rss_mb": {"client": res.maxrss_mb, "client_sampled": res.sampled_peak_rss_mb, **res.group_peak_rss_mb},
        "peak_rss_one_process_mb": res.group_peak_one_rss_mb,
        "other_load_cores": res.other_load_cores,
        "gym_cpu_s_by_process": by_process,
        "argv": res.argv,
    }
    per = 1000 / done if done else None
    if n == 0:
        row["cpu_ms_per_rollout"] = {}
        out.unlink(missing_ok=True)
        return row
    row["cpu_ms_per_rollout"] = {k: (v * per if per else None) for k, v in row["cpu_s"].items()}
    if mode != "direct" and per:
        row["cpu_ms_per_rollout"]["gym_total"] = (res.cpu_s + res.group_cpu_s["gym_servers"]) * per
    out.unlink(missing_ok=True)
    return row


def summarize(runs: list[dict], modes: list[str], concurrencies: list[int]) -> list[dict]:
    """Median over rounds per (mode, concurrency); the ratio is paired within a round."""
    rows = []
    for c in concurrencies:
        for mode in modes:
            mine = [r for r in runs if r["mode"] == mode and r["concurrency"] == c]
            if not mine:
                continue
            ratios = []
            for r in mine:
                d = next((x for x in runs if x["mode"] == "direct" and x["concurrency"] == c and x["round"] == r["round"]), None)
                if d and d["rollouts_per_s"] and r["rollouts_per_s"]:
                    ratios.append(r["rollouts_per_s"] / d["rollouts_per_s"])
            med = lambda f: C.median(f(r) for r in mine)  # noqa: E731
            rows.append({
                "mode": mode, "concurrency": c, "rounds": len(mine),
                "rollouts_per_s": med(lambda r: r["rollouts_per_s"]),
                "in_run_rollouts_per_s": med(lambda r: r["in_run_rollouts_per_s"]),
                "ratio_to_direct": C.median(ratios),
                "latency_p50_s": med(lambda r: r["latency_p50_s"]),
                "latency_p95_s": med(lambda r: r["latency_p95_s"]),
                "cpu_ms_per_rollout": {k: med(lambda r, k=k: r["cpu_ms_per_rollout"].get(k))
                                       for k in ("gym_servers", "client", "gym_total", "standins")},
                "peak_rss_mb": {k: med(lambda r, k=k: r["peak_rss_mb"].get(k)) for k in ("gym_servers", "client", "standins")},
                "peak_rss_one_process_mb": {k: med(lambda r, k=k: r["peak_rss_one_process_mb"].get(k))
                                            for k in ("gym_servers", "standins")},
                "other_load_cores": med(lambda r: r["other_load_cores"]),
                "gym_cpu_ms_per_rollout_by_process": {
                    k: med(lambda r, k=k: r["gym_cpu_s_by_process"].get(k, 0) * 1000 / r["rollouts"] if r["rollouts"] else None)
                    for k in mine[0].get("gym_cpu_s_by_process", {})},
                "failures": sum(r["failures"] or 0 for r in mine),
            })
    return rows


def render(summary: list[dict], args) -> Table:
    table = Table(title=f"Throughput: {args.rollouts} weather rollouts, {args.standins} zero-latency stand-ins "
                        f"(median of {args.rounds} round(s))", title_justify="left")
    cols = [("mode", "left"), ("conc", "right"), ("rollouts/s", "right"), ("vs direct", "right"),
            ("in-run r/s", "right"), ("p50 ms", "right"), ("p95 ms", "right"),
            ("CPU ms/rollout: gym servers", "right"), ("collector / client", "right"), ("gym total", "right"),
            ("stand-ins", "right"), ("peak RSS MB: gym servers (sum)", "right"), ("collector / client", "right"),
            ("stand-in (max)", "right"), ("other load (cores)", "right")]
    for name, justify in cols:
        table.add_column(name, justify=justify)
    last_c = None
    for r in summary:
        if last_c is not None and r["concurrency"] != last_c:
            table.add_section()
        last_c = r["concurrency"]
        cpu, rss = r["cpu_ms_per_rollout"], r["peak_rss_mb"]
        table.add_row(
            r["mode"], str(r["concurrency"]), C.fmt(r["rollouts_per_s"], 0),
            C.fmt(r["ratio_to_direct"], 2) if r["mode"] != "direct" else "1.00",
            C.fmt(r["in_run_rollouts_per_s"], 0),
            C.fmt(None if r["latency_p50_s"] is None else r["latency_p50_s"] * 1000, 1),
            C.fmt(None if r["latency_p95_s"] is None else r["latency_p95_s"] * 1000, 1),
            C.fmt(cpu.get("gym_servers"), 2), C.fmt(cpu.get("client"), 2), C.fmt(cpu.get("gym_total"), 2),
            C.fmt(cpu.get("standins"), 2),
            C.fmt(rss.get("gym_servers"), 0), C.fmt(rss.get("client"), 0),
            C.fmt(r["peak_rss_one_process_mb"].get("standins"), 0),
            C.fmt(r["other_load_cores"], 2),
        )
    return table


def targets(summary: list[dict]) -> list[tuple[str, str, str, bool | None]]:
    out = []
    for mode in ("default", "colocated"):
        r = next((x for x in summary if x["mode"] == mode and x["concurrency"] == TARGET_CONCURRENCY), None)
        ratio = r and r["ratio_to_direct"]
        cpu = r and r["cpu_ms_per_rollout"].get("gym_total")
        out.append((f"rollouts/s vs direct, {mode}, conc {TARGET_CONCURRENCY}", f">= {TARGETS['ratio'][mode]}",
                    C.fmt(ratio, 3), None if ratio is None else ratio >= TARGETS["ratio"][mode]))
        out.append((f"gym CPU per rollout (ng_run+children+collector), {mode}, conc {TARGET_CONCURRENCY}",
                    f"<= {TARGETS['gym_cpu_ms'][mode]} ms", C.fmt(cpu, 2, " ms"),
                    None if cpu is None else cpu <= TARGETS["gym_cpu_ms"][mode]))
    return out


PROFILE_CATEGORIES = (  # first match wins; matched against the leaf frame "function (file:line)"
    # On loopback a send also runs the receiving side's TCP processing, so this is a hop's kernel cost.
    ("aiohttp: socket writes (transport.write)", ("aiohttp/http_writer",)),
    ("aiohttp: HTTP server (parsing, dispatch, responses)", ("aiohttp/web_", "aiohttp/_http_parser", "aiohttp/http_parser",
                                                            "aiohttp/base_protocol")),
    ("aiohttp: HTTP client (requests, pool, timers)", ("aiohttp/",)),
    ("multidict / yarl (headers, URLs)", ("multidict", "yarl/")),
    ("prometheus_client (metrics)", ("prometheus_client",)),
    ("event loop: uvloop C code (epoll, reads) / asyncio", ("asyncio/", "uvloop", "<frozen", "selectors")),
    ("JSON (orjson / json)", ("orjson", "json/")),
    ("gym: routing", ("nemo_gym_cli/routing",)),
    ("gym: server base / client (incl. local-call JSON copies)", ("nemo_gym_cli/server.py", "nemo_gym_cli/client.py",
                                                                      "nemo_gym_cli/servers.py")),
    ("gym: model adapter (conversion, upstream)", ("responses_api_models/", "nemo_gym_cli/upstream.py")),
    ("gym: agent / resources", ("responses_api_agents/", "resources_servers/")),
    ("gym: other", ("nemo_gym_cli/",)),
)


def profile_graphs(graphs: dict, rows: Path, work: Path, concurrency: int, n: int) -> dict:
    """py-spy (record, --nonblocking) every process of each ng_run while a collector runs at
    `concurrency`: top functions by self time, and self time by category."""
    import shutil
    import signal
    import subprocess

    py_spy = shutil.which("py-spy") or (str(C.BIN / "py-spy") if (C.BIN / "py-spy").exists() else None)
    if not py_spy:
        return {"error": "py-spy not found (pip install py-spy into this venv)"}
    result: dict = {}
    for mode, graph in graphs.items():
        pids = {}
        for name, pid in graph.pids().items():
            pids.setdefault(pid, name)  # colocated: one pid for every server
        spies = {}
        for pid, name in pids.items():
            out = work / f"profile_{mode}_{name}.txt"
            spies[f"{mode}: {name} (pid {pid})"] = (subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(out), "--rate", "250",
                 "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out)
        time.sleep(1.0)  # let py-spy attach
        out_path = work / f"profile_{mode}.jsonl"
        t0 = time.perf_counter()
        subprocess.run(C.collector_argv(graph.head_port, rows, out_path, concurrency, [f"+limit={n}"]), cwd=work,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        for label, (proc, out) in spies.items():
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if not out.exists():
                result[label] = {"error": err.decode(errors="replace")[-500:]}
                continue
            result[label] = top_functions(out)
            result[label]["collector_wall_s"] = round(wall, 2)
        out_path.unlink(missing_ok=True)
    return result


def top_functions(raw_path: Path, top: int = 15) -> dict:
    """From py-spy's raw output (collapsed stacks, active threads only): % self time per function
    and per category, and % inclusive time per function."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    cats: dict[str, int] = {}
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        self_t[leaf] = self_t.get(leaf, 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
        cat = next((c for c, keys in PROFILE_CATEGORIES if any(k in leaf for k in keys)), "other (stdlib, C)")
        cats[cat] = cats.get(cat, 0) + n
    pct = lambda n: round(100 * n / total, 1) if total else 0.0  # noqa: E731
    return {
        "samples": total,
        "self": [(f, pct(n)) for f, n in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]],
        "inclusive": [(f, pct(n)) for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]],
        "categories": [(c, pct(n)) for c, n in sorted(cats.items(), key=lambda kv: -kv[1])],
    }


def print_profile(profile: dict) -> None:
    for label, prof in profile.items():
        if "error" in prof:
            C.console.print(f"profile {label}: {prof['error']}")
            continue
        t = Table(title=f"py-spy {label}: {prof['samples']} samples (250/s, active time only)", title_justify="left")
        t.add_column("top self time: function (file:line)")
        t.add_column("%", justify="right")
        t.add_column("self time by category")
        t.add_column("%", justify="right")
        selfs, cats = prof["self"][:12], prof["categories"]
        for i in range(max(len(selfs), len(cats))):
            f, p = selfs[i] if i < len(selfs) else ("", "")
            c, q = cats[i] if i < len(cats) else ("", "")
            t.add_row(f[:110], str(p), c, str(q))
        C.console.print(t)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = C.repro_command(parser, args, __file__)
    concurrencies = C.parse_int_list(args.concurrency)
    modes = [m for m in C.parse_str_list(args.modes) if m in MODES]
    C.print_header("bench/throughput.py", command)
    runs: list[dict] = []
    fixed: dict[str, dict] = {}
    profile = None
    with C.bench_session("throughput", args.keep_tmp) as (work, sampler):
        n_rows = max(args.rollouts, args.warmup)
        rows = C.write_jsonl(work.path / "rows.jsonl", (C.weather_row(i) for i in range(n_rows)))
        standins = C.start_standins(work.path, [[] for _ in range(args.standins)])
        urls = [s.url for s in standins]
        graphs: dict[str, C.NgRun] = {}
        for mode in modes:
            if mode != "direct":
                graphs[mode] = C.NgRun(work.path, f"ng_run_{mode}", urls, colocate=(mode == "colocated"))
        for g in graphs.values():
            g.wait_ready()
            g.names_by_pid = {}
            for name, pid in g.pids().items():
                g.names_by_pid[pid] = "ng_run (head)" if name == "ng_run" else (
                    "all servers (colocated)" if mode_of(g) == "colocated" else name)
            C.console.print(f"ng_run {g.name}: ready in {g.startup_s:.1f} s, processes: {len(g.processes())}")
        if args.warmup:
            for mode in modes:
                measure(mode, min(100, max(concurrencies)), args.warmup, rows, work.path, graphs, standins, sampler, "warmup")
        for mode in modes:  # fixed cost of one whole command: startup, config, connect, summary, exit
            fixed[mode] = measure(mode, 10, 0, rows, work.path, graphs, standins, sampler, "fixed")
        for rnd in range(args.rounds):
            for c in concurrencies:
                order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]
                for mode in order:
                    r = measure(mode, c, args.rollouts, rows, work.path, graphs, standins, sampler, f"r{rnd}")
                    r["round"] = rnd
                    runs.append(r)
                    C.console.print(f"  round {rnd} conc {c:>4} {mode:<9}: {r['rollouts_per_s']:8.1f} rollouts/s "
                                    f"({r['rollouts']} in {r['wall_s']:.2f} s)")
        if args.profile and graphs:
            C.console.print(f"profiling every ng_run process with py-spy at concurrency {TARGET_CONCURRENCY} ...")
            profile = profile_graphs(graphs, rows, work.path, TARGET_CONCURRENCY, args.rollouts)

    C.begin_report()

    summary = summarize(runs, modes, concurrencies)
    table = render(summary, args)
    C.console.print(table)
    if fixed:
        C.console.print("fixed cost of one whole command with 0 rollouts (startup, config, connect, summary, exit), "
                        "included above: " + "; ".join(
                            f"{m}: {f['wall_s']:.2f} s wall, {f['cpu_s']['client'] * 1000:.0f} ms CPU "
                            f"(= {f['cpu_s']['client'] * 1000 / args.rollouts:.2f} ms/rollout over {args.rollouts})"
                            for m, f in fixed.items()))
    for r in summary:
        if r["concurrency"] == TARGET_CONCURRENCY and r.get("gym_cpu_ms_per_rollout_by_process"):
            parts = sorted(r["gym_cpu_ms_per_rollout_by_process"].items(), key=lambda kv: -(kv[1] or 0))
            C.console.print(f"{r['mode']} graph at conc {TARGET_CONCURRENCY}, CPU ms/rollout by process: "
                            + ", ".join(f"{k} {C.fmt(v, 2)}" for k, v in parts)
                            + f"; collector {C.fmt(r['cpu_ms_per_rollout'].get('client'), 2)}")
    tgt = targets(summary)
    C.console.print(C.targets_table("Targets", tgt))
    if profile:
        if "error" in profile:
            C.console.print(f"profile: {profile['error']}")
        else:
            print_profile(profile)
    report = C.end_report()
    path = C.write_results(NAME, {
        "report": report,
        "benchmark": NAME, "command": command, "machine": C.machine_info(), "settings": vars(args),
        "targets": [{"target": a, "wanted": b, "measured": c, "met": d} for a, b, c, d in tgt],
        "summary": summary, "runs": runs, "fixed_cost_0_rollouts": fixed, "profile": profile,
    })
    C.print_footer(command, path)
    return C.exit_code()


if __name__ == "__main__":
    sys.exit(C.run_main(main))
