"""A mixed-environment collection vs a weather-only one, and math_verify's grading rate.

One graph (ng_run, one process per server) holds weather, math_verify and
equivalence_llm_judge, with the policy on N zero-latency vLLM stand-ins (scripted: math
prompts get a boxed answer) and the judge on one more stand-in. On that same graph, and so on
the same stand-ins, ng_collect_rollouts runs a weather-only file and a mixed file (a third
each of weather, math and judged rows, rows naming their agents) at the same concurrency, one
after the other, alternating each round. Rollouts/s = rollouts / the collector's wall time.

Then math_verify alone: `--verifies` /verify calls (a mix of right, wrong and unparseable
answers) straight to the math_verify server at concurrency 16; verifies/s with its default
2 grading workers.

    python bench/multienv.py                      # 1500 rollouts per run, concurrency 100, 2 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.table import Table  # noqa: E402

import common as C  # noqa: E402

NAME = "multienv"
MATH = "resources_servers/math_verify/configs/math_verify.yaml"
JUDGE_MODEL = "responses_api_models/vllm_model/configs/vllm_judge_model.yaml"
JUDGE_ENV = "resources_servers/equivalence_llm_judge/configs/equivalence_llm_judge.yaml"
ANSWERS = [("156", r"12 * 13 = 156, so \boxed{156}"), (r"\frac{3}{4}", r"\boxed{0.75}"), ("157", r"\boxed{156}"),
           ("2", "I am not sure."), ("x^2+2x+1", r"\boxed{(x+1)^2}"), (r"\sqrt{2}", r"\boxed{\sqrt{2}}")]


def ref(name: str) -> dict:
    return {"type": "responses_api_agents", "name": name}


def mixed_row(i: int) -> dict:
    kind = i % 3
    if kind == 0:
        return {**C.weather_row(i), "agent_ref": ref(C.WEATHER_AGENT)}
    if kind == 1:
        return {"responses_create_params": {"input": f"MATH-{i}: compute 12 * 13"}, "expected_answer": "156",
                "agent_ref": ref("math_verify_simple_agent")}
    return {"responses_create_params": {"input": f"mark-eq {i}: capital of France?"}, "expected_answer": "Paris",
            "agent_ref": ref("equivalence_llm_judge_simple_agent")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=1500, help="rollouts per collection")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--standins", type=int, default=3, help="policy stand-ins (the judge has one more)")
    p.add_argument("--rounds", type=int, default=2, help="repeat both collections; the table shows medians")
    p.add_argument("--verifies", type=int, default=600, help="/verify calls straight to math_verify")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary working directory")
    return p


async def verify_rate(url: str, n: int, concurrency: int) -> tuple[float, float]:
    from nemo_gym_cli.serving.client import ServerClient

    client = ServerClient({"max_retries": 0})
    rewards: list[float] = []

    async def one(i: int) -> None:
        gold, text = ANSWERS[i % len(ANSWERS)]
        body = {"expected_answer": gold, "response": {"output": [
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": f"({i}) {text}"}]}]}}
        rewards.append((await client.request_json("POST", url + "/verify", body, timeout_s=120, retries=0))["reward"])

    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            await one(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return n / wall, sum(rewards) / len(rewards)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = C.repro_command(parser, args, __file__)
    C.print_header("Mixed environments vs weather only; math_verify verifies/s", command)
    with C.bench_session(NAME, args.keep_tmp) as (work, sampler):
        rules = work.path / "policy.json"
        rules.write_text(json.dumps([{"match": "MATH-", "content": r"12 * 13 = 156, so the answer is \boxed{156}."}]))
        judge_rules = work.path / "judge.json"
        judge_rules.write_text(json.dumps([{"match": "mark-eq", "content": "[[A=B]]"}]))
        policy = C.start_standins(work.path, [["--script", str(rules)]] * args.standins, prefix="policy")
        judge, = C.start_standins(work.path, [["--script", str(judge_rules)]], prefix="judge")
        graph = C.NgRun(work.path, "graph", [s.url for s in policy],
                        config_paths=(C.VLLM_MODEL, JUDGE_MODEL, C.WEATHER, MATH, JUDGE_ENV),
                        extra_args=[f"+judge_base_url={judge.url}", "+judge_api_key=EMPTY", "+judge_model_name=judge-model"]
                        ).wait_ready()
        files = {"weather only": C.write_jsonl(work.path / "weather.jsonl", (C.weather_row(i) for i in range(args.rollouts))),
                 "mixed (weather + math_verify + judge)": C.write_jsonl(work.path / "mixed.jsonl",
                                                                        (mixed_row(i) for i in range(args.rollouts)))}
        C.begin_report()
        runs: dict[str, list[dict]] = {name: [] for name in files}
        for rnd in range(args.rounds):
            order = list(files) if rnd % 2 == 0 else list(reversed(files))
            for name in order:
                out = work.path / f"out_{rnd}_{len(runs[name])}_{'mixed' if 'mixed' in name else 'weather'}.jsonl"
                argv = C.collector_argv(graph.head_port, files[name], out, args.concurrency, ["+progress=false"])
                res = C.run_measured(argv, graph.cwd, out.stem, sampler)
                if res.returncode != 0:
                    C.fail(f"{name}: collector exited {res.returncode}", res.tail())
                metrics = C.read_json(C.metrics_path_of(out))
                runs[name].append({"wall_s": res.wall_s, "rollouts": metrics.get("rollouts", 0),
                                   "rps": metrics.get("rollouts", 0) / res.wall_s, "per_agent": metrics.get("per_agent", {})})
        math_url = next(s["url"] for s in json.loads(C.http_get(f"http://127.0.0.1:{graph.head_port}/servers"))
                        if s["name"] == "math_verify")
        verifies_per_s, mean_reward = asyncio.run(verify_rate(math_url, args.verifies, 16))

    table = Table(title=f"concurrency {args.concurrency}, {args.rollouts} rollouts per run, {args.standins} policy stand-ins "
                        f"(medians of {args.rounds})")
    for col in ("collection", "rollouts/s", "vs weather only", "wall s", "per agent (rollouts, mean reward)"):
        table.add_column(col)
    base = C.median(r["rps"] for r in runs["weather only"])
    results = {}
    for name, rs in runs.items():
        rps = C.median(r["rps"] for r in rs)
        agents = rs[-1]["per_agent"] if rs else {}
        table.add_row(name, C.fmt(rps, 0), C.fmt(rps / base if base else None, 2), C.fmt(C.median(r["wall_s"] for r in rs), 1),
                      "; ".join(f"{a}: {v['rollouts']}, {v['means'].get('reward', 0):.2f}" for a, v in agents.items()))
        results[name] = {"rollouts_per_s": rps, "runs": rs}
    C.console.print(table)
    C.console.print(f"math_verify /verify: {verifies_per_s:.0f} verifies/s ({args.verifies} answers, concurrency 16, "
                    f"2 grading workers; mean reward {mean_reward:.2f})")
    path = C.write_results(NAME, {"args": vars(args), "collections": results, "math_verify_verifies_per_s": verifies_per_s})
    C.print_footer(command, path)
    return C.exit_code()


if __name__ == "__main__":
    sys.exit(C.run_main(main))
