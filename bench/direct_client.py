"""The baseline: a standalone asyncio + aiohttp client that does a weather rollout's model work
straight against the vLLM (stand-in) servers, with no servers in between.

Per rollout (one dataset row of the simple_weather format):
  turn 1: POST /v1/chat/completions with the row's messages and tools -> a tool call;
  the tool runs in-process (same answer as simple_weather's get_weather);
  turn 2: the same messages + the assistant tool call + the tool result -> the answer.
Rollouts are spread round-robin over the backends (one backend per rollout, both turns on
it, X-Session-ID sent like the gym does); exactly --concurrency rollouts in flight; input
read lazily; each result written at once as one JSONL line (like ng_collect_rollouts);
a metrics JSON (<output stem>_metrics.json) with rollouts/s and latency p50/p95.

    python -m bench.direct_client --backends http://127.0.0.1:8001/v1,http://127.0.0.1:8002/v1 \
        --input rows.jsonl --output out.jsonl --concurrency 100
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import orjson


def chat_tools(tools: list) -> list:
    out = []
    for tool in tools or ():
        if "function" in tool:
            out.append(tool)
            continue
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def chat_messages(items) -> list:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    return [{"role": m["role"], "content": m.get("content", "")} for m in items if "role" in m]


def get_weather(city: str) -> dict:
    return {"city": city, "weather_description": f"The weather in {city} is cold."}


class Direct:
    def __init__(self, args: argparse.Namespace):
        self.backends = [u.strip().rstrip("/") for u in args.backends.split(",") if u.strip()]
        self.model = args.model
        self.concurrency = args.concurrency
        self.input = Path(args.input)
        self.output = Path(args.output)
        self.limit = args.limit
        self.out_fd = -1
        self.latencies: list[float] = []
        self.failures = 0
        self.counter = itertools.count()

    def rows(self):
        with open(self.input, "rb") as f:
            task = 0
            for raw in f:
                if not raw.strip():
                    continue
                if self.limit is not None and task >= self.limit:
                    return
                yield task, orjson.loads(raw)
                task += 1

    async def chat(self, http: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> dict:
        async with http.post(url, data=orjson.dumps(body), headers=headers) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                raise RuntimeError(f"HTTP {resp.status}: {raw[:300]!r}")
            return orjson.loads(raw)

    async def rollout(self, http: aiohttp.ClientSession, task: int, row: dict) -> None:
        t0 = time.perf_counter()
        url = self.backends[next(self.counter) % len(self.backends)] + "/chat/completions"
        headers = {"Content-Type": "application/json", "X-Session-ID": uuid.uuid4().hex}
        params = row["responses_create_params"]
        messages = chat_messages(params.get("input", []))
        body = {"model": self.model, "messages": messages}
        tools = chat_tools(params.get("tools"))
        if tools:
            body["tools"] = tools
        first = await self.chat(http, url, body, headers)
        message = first["choices"][0]["message"]
        output = [message]
        calls = message.get("tool_calls") or []
        if calls:
            messages = [*messages, {"role": "assistant", "content": message.get("content") or "", "tool_calls": calls}]
            for call in calls:
                args = orjson.loads(call["function"]["arguments"] or "{}")
                result = {"role": "tool", "tool_call_id": call["id"], "content": orjson.dumps(get_weather(args.get("city", ""))).decode()}
                messages.append(result)
                output.append(result)
            second = await self.chat(http, url, {**body, "messages": messages}, headers)
            output.append(second["choices"][0]["message"])
        record = {**row, "response": {"output": output}, "reward": 1.0, "_ng_task_index": task, "_ng_rollout_index": 0}
        os.write(self.out_fd, orjson.dumps(record) + b"\n")
        self.latencies.append(time.perf_counter() - t0)

    async def worker(self, http: aiohttp.ClientSession, rows) -> None:
        for task, row in rows:  # shared iterator: each row taken by exactly one worker
            try:
                await self.rollout(http, task, row)
            except Exception as e:  # count and go on, like the collector
                self.failures += 1
                if self.failures <= 5:
                    print(f"rollout {task} failed: {type(e).__name__}: {e}", file=sys.stderr)

    async def run(self) -> dict:
        started = time.monotonic()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.out_fd = os.open(self.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        connector = aiohttp.TCPConnector(limit=max(100, 2 * self.concurrency), limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=600)
        rows = self.rows()
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as http:
                await asyncio.gather(*(self.worker(http, rows) for _ in range(self.concurrency)))
        finally:
            os.close(self.out_fd)
        elapsed = time.monotonic() - started
        lat = sorted(self.latencies)

        def pct(p: float):
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 4) if lat else None

        return {
            "rollouts": len(lat), "failures": self.failures, "elapsed_s": round(elapsed, 3),
            "rollouts_per_s": round(len(lat) / elapsed, 2) if elapsed > 0 else None,
            "latency_p50_s": pct(0.5), "latency_p95_s": pct(0.95), "concurrency": self.concurrency,
            "backends": self.backends,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", required=True, help="comma-separated base URLs, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--input", required=True, help="dataset JSONL (simple_weather format)")
    p.add_argument("--output", required=True, help="results JSONL")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--model", default="standin-model")
    p.add_argument("--no-uvloop", action="store_true", help="plain asyncio (ng_* commands use uvloop when installed)")
    args = p.parse_args(argv)
    direct = Direct(args)
    runner = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    summary = runner(direct.run())
    out = Path(args.output)
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    stem.with_name(stem.name + "_metrics.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(summary).decode())
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
