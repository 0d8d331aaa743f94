"""The vllm_model adapter alone: requests/s through it vs straight to the stand-ins.

3 zero-latency stand-ins; ng_run with only vllm_model.yaml (policy_model). A load generator at
fixed concurrency sends N single-turn requests, each its own session:
  direct     POST <stand-in>/v1/chat/completions, rotating over the 3 stand-ins
  adapter    POST <adapter>/v1/responses (Responses -> Chat -> vLLM -> Responses, routed)
  adapter    POST <adapter>/v1/chat/completions (pass-through, routed)
Directs and adapter runs alternate (direct, adapter, adapter-chat, direct, ...) so machine
noise hits both; the ratio is adapter req/s over the mean direct req/s. Also the spread of the
adapter's requests over the 3 backends (from the stand-ins' counters).

python -m bench.adapter [--requests 5000] [--concurrency 100] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import orjson
from rich.table import Table

from bench.common import (VLLM_MODEL, NgRun, console, machine_info, repro_command, start_standins, stop_all,
                          write_results)

QUESTION = "What is the weather like in Paris today? Answer in one short sentence."


async def load(urls: list[str], bodies: list[bytes], n: int, concurrency: int) -> tuple[float, list[float]]:
    """n POSTs at fixed concurrency, body i % len(bodies) to url i % len(urls); each its own session."""
    latencies: list[float] = []
    counter = iter(range(n))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def worker() -> None:
            for i in counter:
                headers = {"Content-Type": "application/json", "X-Session-ID": uuid.uuid4().hex}
                t0 = time.perf_counter()
                async with http.post(urls[i % len(urls)], data=bodies[i % len(bodies)], headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{urls[i % len(urls)]}: HTTP {resp.status}")
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (direct, adapter, adapter chat)")
    args = parser.parse_args()
    command = repro_command(parser, args, "bench/adapter.py")
    work = Path(tempfile.mkdtemp(prefix="bench_adapter_"))
    try:
        standins = start_standins(work, [[] for _ in range(3)])
        graph = NgRun(work, "graph", [s.url for s in standins], config_paths=(VLLM_MODEL,)).wait_ready()
        adapter = next(s["url"] for s in orjson.loads(__import__("urllib.request").request.urlopen(
            f"http://127.0.0.1:{graph.head_port}/servers").read()) if s["name"] == "policy_model")
        chat = orjson.dumps({"model": "standin-model", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0.0})
        responses = orjson.dumps({"input": QUESTION, "temperature": 0.0})
        cases = {
            "direct (chat to stand-ins)": ([f"{s.url}/chat/completions" for s in standins], [chat]),
            "adapter /v1/responses": ([f"{adapter}/v1/responses"], [responses]),
            "adapter /v1/chat/completions": ([f"{adapter}/v1/chat/completions"], [chat]),
        }
        asyncio.run(load(*cases["adapter /v1/responses"], 500, args.concurrency))  # warm up connections
        results: dict[str, list[tuple[float, list[float]]]] = {k: [] for k in cases}
        before = [s.stats()["requests"] for s in standins]
        adapter_requests = 0
        for _ in range(args.repeats):
            for name, (urls, bodies) in cases.items():
                results[name].append(asyncio.run(load(urls, bodies, args.requests, args.concurrency)))
                adapter_requests += args.requests if name.startswith("adapter") else 0
        after = [s.stats()["requests"] for s in standins]
        direct_per_backend = args.requests * args.repeats // 3
        spread = [a - b - direct_per_backend for a, b in zip(after, before)]

        table = Table(title=f"vllm_model adapter vs direct: {args.requests} requests x {args.repeats}, "
                            f"concurrency {args.concurrency}, 3 stand-ins")
        for col in ("path", "req/s (each round)", "median req/s", "ratio to direct", "p50 ms", "p95 ms"):
            table.add_column(col, justify="right" if col != "path" else "left")
        direct_rps = statistics.median(args.requests / wall for wall, _ in results["direct (chat to stand-ins)"])
        summary = {}
        for name, runs in results.items():
            rps = [args.requests / wall for wall, _ in runs]
            lat = sorted(x for _, lats in runs for x in lats)
            med = statistics.median(rps)
            summary[name] = {"rps": rps, "median_rps": med, "ratio": med / direct_rps,
                             "p50_ms": 1000 * lat[len(lat) // 2], "p95_ms": 1000 * lat[int(0.95 * len(lat))]}
            table.add_row(name, ", ".join(f"{x:.0f}" for x in rps), f"{med:.0f}", f"{med / direct_rps:.2f}",
                          f"{summary[name]['p50_ms']:.1f}", f"{summary[name]['p95_ms']:.1f}")
        console.print(table)
        spread_table = Table(title="adapter requests per backend (new sessions placed least-loaded)")
        spread_table.add_column("backend")
        spread_table.add_column("requests", justify="right")
        spread_table.add_column("share", justify="right")
        for s, n in zip(standins, spread):
            spread_table.add_row(s.url, str(n), f"{100 * n / max(1, adapter_requests):.1f}%")
        console.print(spread_table)
        console.print(f"reproduce: {command}")
        write_results("adapter", {"command": command, "machine": machine_info(), "results": summary,
                                  "spread": dict(zip([s.url for s in standins], spread))})
        return 0
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
