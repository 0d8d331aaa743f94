"""Replicas of a CPU-heavy environment: rollouts/s and CPU per rollout, 1 vs 2 local replicas.

The weather graph with `cpu_weather` (bench/envs/): simple_weather whose /verify burns a fixed
2 ms of CPU (its own CPU clock), as an environment that grades in-process does. Stand-ins with
no latency, so the CPU of the graph is the bound. `replicas: 1` vs `replicas: 2` of the
environment (local processes, `ng_run` default mode), concurrency 100, each in one run, the
order alternating between rounds. On a 2-core machine the gain is bounded by the cores (every
process of the graph, the collector and the stand-ins share them), so the report also gives
the figure on paper for a cluster from the measured CPU per rollout.

    python -m bench.replicas
    python -m bench.replicas --rollouts 4000 --concurrency 100 --rounds 2 --verify-cpu-ms 2 --nodes 4 --cores-per-node 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import urllib.request
from pathlib import Path

from rich.table import Table

from bench import common as C

NAME = "replicas"
ENVS = Path(__file__).resolve().parent / "envs"
CPU_WEATHER = "resources_servers/cpu_weather/configs/cpu_weather.yaml"
ENV_NAME, AGENT_NAME = "cpu_weather", "cpu_weather_agent"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--replicas", default="1,2", help="environment replica counts to compare")
    p.add_argument("--rounds", type=int, default=1, help="repeat every measurement; the table shows medians")
    p.add_argument("--verify-cpu-ms", type=float, default=2.0, help="CPU each /verify burns")
    p.add_argument("--standins", type=int, default=2)
    p.add_argument("--nodes", type=int, default=4, help="cluster size for the figure on paper")
    p.add_argument("--cores-per-node", type=int, default=2, help="cores per node for the figure on paper")
    p.add_argument("--keep-tmp", action="store_true")
    return p


def servers(graph: C.NgRun) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{graph.head_port}/servers", timeout=10) as resp:
        return json.loads(resp.read())


def start_graph(work: Path, replicas: int, urls: list[str], verify_cpu_ms: float) -> C.NgRun:
    cwd = work / f"ng_run_r{replicas}"
    # A user's own environment folder beside their configs: ng_run finds it from its cwd.
    shutil.copytree(ENVS, cwd, dirs_exist_ok=True)
    key = f"{ENV_NAME}.resources_servers.cpu_weather"
    graph = C.NgRun(work, cwd.name, urls, config_paths=(C.VLLM_MODEL, CPU_WEATHER),
                    extra_args=[f"++{key}.replicas={replicas}", f"++{key}.verify_cpu_ms={verify_cpu_ms:g}"])
    return graph.wait_ready()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = C.repro_command(parser, args, __file__)
    counts = C.parse_int_list(args.replicas)
    C.print_header("bench/replicas.py", command)
    runs: list[dict] = []
    with C.bench_session(NAME, args.keep_tmp) as (work, sampler):
        rows = C.write_jsonl(work.path / "rows.jsonl", (C.weather_row(i) for i in range(args.rollouts)))
        standins = C.start_standins(work.path, [[]] * args.standins)
        urls = [s.url for s in standins]
        graphs = {n: start_graph(work.path, n, urls, args.verify_cpu_ms) for n in counts}
        env_pids = {n: {s["pid"] for s in servers(g) if s["name"] == ENV_NAME} for n, g in graphs.items()}
        for rnd in range(args.rounds):
            for n in counts if rnd % 2 == 0 else reversed(counts):
                out = work.path / f"r{rnd}_replicas{n}.jsonl"
                argv = [C.script("ng_collect_rollouts"), f"+agent_name={AGENT_NAME}", f"+input_jsonl_fpath={rows}",
                        f"+output_jsonl_fpath={out}", f"+concurrency={args.concurrency}",
                        f"+head_server.port={graphs[n].head_port}", "+progress=false"]
                groups = {"gym_servers": graphs[n].processes,
                          "standins": lambda: [p for s in standins for p in s.processes()]}
                res = C.run_measured(argv, work.path, out.stem, sampler, groups)
                done = C.count_lines(out)
                if res.returncode != 0 or done != args.rollouts:
                    C.fail(f"[red]replicas {n}: exit {res.returncode}, {done}/{args.rollouts}[/red]", res.tail())
                by_pid = res.group_cpu_s_by_pid["gym_servers"]
                env_cpu = sum(by_pid.get(pid, 0.0) for pid in env_pids[n])
                metrics = C.read_json(C.metrics_path_of(out))
                runs.append({
                    "round": rnd, "replicas": n, "rollouts": done, "wall_s": res.wall_s,
                    "rollouts_per_s": done / res.wall_s, "in_run_rollouts_per_s": metrics.get("rollouts_per_s"),
                    "cpu_ms_per_rollout": {k: 1000 * v / max(done, 1) for k, v in {
                        "environment": env_cpu, "other_gym_servers": res.group_cpu_s["gym_servers"] - env_cpu,
                        "collector": res.cpu_s, "standins": res.group_cpu_s["standins"]}.items()},
                    "env_cpu_per_replica_s": sorted(by_pid.get(pid, 0.0) for pid in env_pids[n]),
                    "other_load_cores": res.other_load_cores,
                })
                C.console.print(f"  replicas {n}: {metrics.get('rollouts_per_s')} rollouts/s in run, "
                                f"{done / res.wall_s:.0f} whole command")
                out.unlink(missing_ok=True)

    C.begin_report()
    summary = []
    for n in counts:
        mine = [r for r in runs if r["replicas"] == n]
        cpu = {k: C.median(r["cpu_ms_per_rollout"][k] for r in mine) for k in mine[0]["cpu_ms_per_rollout"]} if mine else {}
        summary.append({"replicas": n, "in_run_rollouts_per_s": C.median(r["in_run_rollouts_per_s"] for r in mine),
                        "rollouts_per_s": C.median(r["rollouts_per_s"] for r in mine), "cpu_ms_per_rollout": cpu,
                        "env_cpu_per_replica_s": mine[-1]["env_cpu_per_replica_s"] if mine else [],
                        "other_load_cores": C.median(r["other_load_cores"] for r in mine)})
    table = Table(title=f"cpu_weather (/verify burns {args.verify_cpu_ms:g} ms CPU), local replicas, concurrency "
                        f"{args.concurrency}, {args.rollouts} rollouts, {args.standins} zero-latency stand-ins",
                  title_justify="left")
    for col in ("env replicas", "rollouts/s (in run)", "x vs first", "rollouts/s (whole cmd)",
                "CPU ms/rollout: environment", "other gym servers", "collector", "stand-ins", "total",
                "env CPU s per replica", "other load (cores)"):
        table.add_column(col, justify="right")
    first = summary[0]["in_run_rollouts_per_s"] if summary else None
    for r in summary:
        cpu = r["cpu_ms_per_rollout"]
        total = sum(cpu.values()) if cpu else None
        r["cpu_ms_per_rollout_total"] = total
        table.add_row(str(r["replicas"]), C.fmt(r["in_run_rollouts_per_s"], 0),
                      C.fmt(r["in_run_rollouts_per_s"] / first if first and r["in_run_rollouts_per_s"] else None, 2, "x"),
                      C.fmt(r["rollouts_per_s"], 0), C.fmt(cpu.get("environment")), C.fmt(cpu.get("other_gym_servers")),
                      C.fmt(cpu.get("collector")), C.fmt(cpu.get("standins")), C.fmt(total),
                      " / ".join(f"{s:.1f}" for s in r["env_cpu_per_replica_s"]), C.fmt(r["other_load_cores"], 2))
    C.console.print(table)
    paper = on_paper(summary[-1], args) if summary and summary[-1]["cpu_ms_per_rollout"] else None
    if paper:
        C.console.print(paper["text"])
    report = C.end_report()
    path = C.write_results(NAME, {"report": report, "benchmark": NAME, "command": command, "machine": C.machine_info(),
                                  "settings": vars(args), "summary": summary, "on_paper": paper, "runs": runs})
    C.print_footer(command, path)
    return C.exit_code()


def on_paper(measured: dict, args: argparse.Namespace) -> dict:
    """Rollouts/s a cluster could reach from the measured CPU per rollout, if CPU is the bound
    (network and the model's GPUs not counted): the head server and the collector stay on the
    ng_run node, the servers' replicas go where Ray puts them."""
    cpu = measured["cpu_ms_per_rollout"]
    env_ms, servers_ms, collector_ms = cpu["environment"], cpu["other_gym_servers"], cpu["collector"]
    node = args.cores_per_node * 1000  # CPU ms per second of one node
    cores = args.nodes * args.cores_per_node
    # A: only the environment scales out (its replicas on the other nodes); agent, model adapter
    # and collector share the ng_run node.
    env_out = min(node / (servers_ms + collector_ms), (args.nodes - 1) * node / env_ms)
    # B: every server's replicas over all nodes; the collector's share of the ng_run node counted.
    all_out = min(node / collector_ms, args.nodes * node / (env_ms + servers_ms + collector_ms))
    text = (f"On paper, {args.nodes} nodes x {args.cores_per_node} cores, from the measured CPU per rollout "
            f"(environment {env_ms:.2f} ms, agent + model adapter {servers_ms:.2f} ms, collector {collector_ms:.2f} ms; "
            f"the model on GPUs, not counted): (A) environment replicas on the {args.nodes - 1} other nodes, the rest "
            f"on the ng_run node: {env_out:,.0f} rollouts/s; (B) agent, model adapter and environment replicated over "
            f"all {cores} cores: {all_out:,.0f} rollouts/s (this machine, 2 cores for everything: "
            f"{2000 / (env_ms + servers_ms + collector_ms + cpu['standins']):,.0f}).")
    return {"nodes": args.nodes, "cores_per_node": args.cores_per_node, "env_ms": env_ms, "servers_ms": servers_ms,
            "collector_ms": collector_ms, "env_scaled_rollouts_per_s": env_out, "all_scaled_rollouts_per_s": all_out,
            "text": text}


if __name__ == "__main__":
    sys.exit(C.run_main(main))
