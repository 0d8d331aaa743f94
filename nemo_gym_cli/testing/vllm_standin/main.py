"""`ng_vllm_standin`: flags, --script rules, and serving until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

from aiohttp import web

from nemo_gym_cli.serving.runtime import run_async
from nemo_gym_cli.testing.vllm_standin.app import build_app
from nemo_gym_cli.testing.vllm_standin.engine import StandinConfig


def load_script(path: str) -> list[dict]:
    """Rules from a JSON list (or one object) or JSONL: {"match", "content"} or {"match", "status"};
    "match" is a substring of the prompt, or a list of substrings that must all be in it."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except ValueError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    rules = data if isinstance(data, list) else [data]
    for rule in rules:
        match = rule.get("match") if isinstance(rule, dict) else None
        if not (isinstance(match, str) or (isinstance(match, list) and match and all(isinstance(m, str) for m in match))):
            raise ValueError(f"{path}: every rule needs a 'match': a string or a list of strings: {rule!r}")
        if not {"content", "status", "tool_call", "reasoning"} & rule.keys():
            raise ValueError(f"{path}: rule needs 'content', 'status', 'tool_call' or 'reasoning': {rule!r}")
        rule.setdefault("content", "")
    return rules


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ng_vllm_standin", description="Deterministic fake vLLM OpenAI server.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = pick a free port")
    p.add_argument("--model", default="standin-model", help="served model name (any name is accepted)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="base latency per request")
    p.add_argument("--per-token-ms", type=float, default=0.0, help="extra latency per output token")
    p.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once; the rest queue")
    p.add_argument("--tool-call-turns", type=int, default=1, help="tool calls per episode under tool_choice=auto")
    p.add_argument("--reasoning", action="store_true", help="emit reasoning / reasoning_content")
    p.add_argument("--script", metavar="FILE", help="JSON/JSONL rules {match, content|status|tool_call[, reasoning]}")
    p.add_argument("--context-length", type=int, default=32768, help="max prompt tokens (else HTTP 400)")
    p.add_argument("--port-file", metavar="PATH", help="write the bound port here (useful with --port 0)")
    p.add_argument("--access-log", action="store_true", help="log every request (off: it costs throughput)")
    p.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false",
                   help="report prefix caching as off in vllm:cache_config_info (as vLLM's flag does)")
    p.add_argument("--no-enable-scale-out", dest="scale_out", action="store_false",
                   help="no render/generate/derender routes (vLLM without --enable-scale-out)")
    p.add_argument("--no-dev-mode", dest="dev_mode", action="store_false",
                   help="no /pause, /resume, /is_paused or weight-version routes (vLLM without VLLM_SERVER_DEV_MODE=1); "
                        "/standin/pause still pauses it")
    return p


def config_from_args(argv: list[str] | None = None) -> StandinConfig:
    args = build_parser().parse_args(argv)
    return StandinConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        latency_ms=args.latency_ms,
        per_token_ms=args.per_token_ms,
        max_num_seqs=max(1, args.max_num_seqs),
        tool_call_turns=args.tool_call_turns,
        reasoning=args.reasoning,
        script=load_script(args.script) if args.script else [],
        context_length=args.context_length,
        port_file=args.port_file,
        access_log=args.access_log,
        prefix_caching=args.prefix_caching,
        scale_out=args.scale_out,
        dev_mode=args.dev_mode,
    )


def _write_port_file(path: str, port: int) -> None:
    # Write then rename, so a poller never reads a half-written number.
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, path)


async def serve(config: StandinConfig) -> None:
    runner_kwargs = {} if config.access_log else {"access_log": None}
    runner = web.AppRunner(build_app(config), **runner_kwargs)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    if config.port_file:
        _write_port_file(config.port_file, port)
    print(f"vllm stand-in listening on http://{config.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    config = config_from_args(argv)
    if config.access_log:
        import logging

        logging.basicConfig(level=logging.INFO)
    run_async(serve(config))
    sys.exit(0)

