"""The simulated vLLM engine: a scheduler with max_num_seqs slots, counters, one completion.

No HTTP here: app.py turns a StandinError into vLLM's error JSON.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from nemo_gym_cli.serving.protocol import content_text
from nemo_gym_cli.testing.vllm_standin.model import (Generation, aborted, generate, pick_tool, reasoning_text,
                                                     text_answer)
from nemo_gym_cli.testing.vllm_standin.prefix_cache import PrefixCache
from nemo_gym_cli.testing.vllm_standin.tokenizer import render_prompt, tokenize_text

MAX_SESSIONS = 100_000


@dataclass
class StandinConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "standin-model"
    latency_ms: float = 0.0
    per_token_ms: float = 0.0
    max_num_seqs: int = 256
    tool_call_turns: int = 1
    reasoning: bool = False
    script: list[dict] = field(default_factory=list)  # rules, already loaded
    context_length: int = 32768
    port_file: str | None = None
    access_log: bool = False
    prefix_caching: bool = True  # as reported by vllm:cache_config_info
    scale_out: bool = True  # render/generate/derender (vLLM's --enable-scale-out); pause API always on


def _matches(match: str | list[str], text: str) -> bool:
    return match in text if isinstance(match, str) else all(m in text for m in match)


class StandinError(Exception):
    """An answer vLLM gives as an HTTP error (context too long, a scripted status)."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.err_type = status, message, err_type


def error_type(status: int) -> str:
    return {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError"}.get(
        status, "InternalServerError" if status >= 500 else "BadRequestError"
    )


class Standin:
    """All mutable state of one server. Counters are plain ints: increments stay cheap."""

    def __init__(self, config: StandinConfig):
        self.config = config
        self.cache = PrefixCache()
        self.sem: asyncio.Semaphore | None = None  # created on the server's loop
        self.running = 0
        self.peak_running = 0  # most requests ever running at once: tests read it instead of sampling
        self.waiting = 0
        self.counts = dict.fromkeys(("chat", "responses", "tokenize", "render", "generate", "derender", "pause",
                                     "resume", "is_paused"), 0)
        self.success = {"stop": 0, "length": 0, "abort": 0}
        self.sessions: dict[str, int] = {}
        # vLLM's RL pause API: new requests wait while paused; mode=abort ends the running ones now.
        self.paused = False
        self.aborted_requests = 0
        self._resumed: asyncio.Event | None = None  # set while serving (created on the server's loop)
        self._abort: asyncio.Event | None = None  # set (then replaced) by each pause(mode=abort)
        self._idle: asyncio.Event | None = None  # set while nothing runs (pause(mode=wait) waits for it)
        self.generations: dict[tuple, tuple[Generation, list[int]]] = {}  # generated ids -> what derender parses

    def _events(self) -> tuple[asyncio.Event, asyncio.Event, asyncio.Event]:
        if self._resumed is None:
            self._resumed, self._abort, self._idle = asyncio.Event(), asyncio.Event(), asyncio.Event()
            self._resumed.set()
            self._idle.set()
        return self._resumed, self._abort, self._idle

    async def pause(self, mode: str) -> None:
        resumed, abort, idle = self._events()
        self.paused = True
        resumed.clear()
        if mode == "abort":
            abort.set()
            self._abort = asyncio.Event()
        elif mode == "wait":
            await idle.wait()

    def resume(self) -> None:
        self.paused = False
        self._events()[0].set()

    def remember(self, output_ids: list[int], gen: Generation, prompt_ids: list[int]) -> None:
        if len(self.generations) >= MAX_SESSIONS:
            del self.generations[next(iter(self.generations))]
        self.generations[tuple(output_ids)] = (gen, prompt_ids)

    def record_session(self, session_id: str | None) -> None:
        if not session_id:
            return
        sessions = self.sessions
        count = sessions.pop(session_id, 0)  # pop + re-insert keeps the dict in LRU order
        if not count and len(sessions) >= MAX_SESSIONS:
            del sessions[next(iter(sessions))]
        sessions[session_id] = count + 1

    def script_rule(self, messages: list) -> dict | None:
        if not self.config.script:
            return None
        text = "\n".join(content_text(m.get("content")) for m in messages if isinstance(m, dict))
        return next((rule for rule in self.config.script if _matches(rule["match"], text)), None)

    async def schedule(self, prompt_ids: list[int], output_tokens: int) -> tuple[int, int]:
        """Wait for a free sequence slot (vLLM's max_num_seqs), 'run'; (cached tokens, tokens
        produced: fewer than output_tokens when a pause aborted it)."""
        resumed, abort, idle = self._events()
        await resumed.wait()
        if self.sem is None:
            self.sem = asyncio.Semaphore(self.config.max_num_seqs)
        self.waiting += 1
        try:
            await self.sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        idle.clear()
        if self.running > self.peak_running:
            self.peak_running = self.running
        try:
            hits = self.cache.lookup_and_insert(prompt_ids)
            produced = output_tokens
            latency_s, per_token_s = self.config.latency_ms / 1000, self.config.per_token_ms / 1000
            delay = latency_s + per_token_s * output_tokens
            if delay > 0:
                t0 = time.monotonic()
                try:  # simulated generation time, cut short by pause(mode=abort)
                    await asyncio.wait_for(self._abort.wait(), delay)
                    ran = time.monotonic() - t0 - latency_s
                    produced = min(output_tokens - 1, max(0, int(ran / per_token_s))) if per_token_s > 0 else 0
                    self.aborted_requests += 1
                except TimeoutError:
                    pass
            if produced == output_tokens:
                await resumed.wait()  # pause(mode=keep): a request finishes only after /resume
            return hits, produced
        finally:
            self.running -= 1
            if not self.running:
                idle.set()
            self.sem.release()

    def decide(self, messages: list, tools: list, tool_choice: Any, max_tokens: Any,
               add_gen: bool = True) -> tuple[list[int], str, dict | None, str | None]:
        """(prompt ids, text, tool, reasoning): what the "model" answers these messages; raises StandinError."""
        prompt_ids = tokenize_text(render_prompt(messages, tools, add_gen))
        self.check_length(prompt_ids, max_tokens)
        rule = self.script_rule(messages)
        if rule is not None and rule.get("status", 200) >= 400:
            raise StandinError(rule["status"], rule.get("message", "scripted error"), error_type(rule["status"]))
        if rule is None:
            tool = pick_tool(tools, tool_choice, messages, self.config.tool_call_turns)
        elif "tool_call" in rule:  # a scripted call, arguments verbatim (may be invalid JSON on purpose)
            tool = {"name": rule["tool_call"].get("name", ""), "raw_arguments": str(rule["tool_call"].get("arguments", "{}"))}
        else:
            tool = None
        text = rule["content"] if rule is not None else ("" if tool is not None else text_answer(messages))
        if rule is not None and "reasoning" in rule:
            reasoning = rule["reasoning"]
        else:
            reasoning = reasoning_text(messages, tool) if self.config.reasoning else None
        return prompt_ids, text, tool, reasoning

    def check_length(self, prompt_ids: list[int], max_tokens: Any) -> None:
        limit = self.config.context_length
        if len(prompt_ids) > limit:
            completion = max_tokens if isinstance(max_tokens, int) else 0
            raise StandinError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + completion} tokens ({len(prompt_ids)} in the messages, {completion} in the "
                "completion). Please reduce the length of the messages or completion.",
            )

    async def complete(
        self, messages: list, tools: list, tool_choice: Any, max_tokens: Any, add_gen: bool = True
    ) -> tuple[Generation, list[int], int]:
        """Shared core of chat and responses: (Generation, prompt_ids, cached tokens); raises StandinError."""
        prompt_ids, text, tool, reasoning = self.decide(messages, tools, tool_choice, max_tokens, add_gen)
        gen = generate(text, tool, reasoning, max_tokens)
        cached, produced = await self.schedule(prompt_ids, len(gen.pieces))
        if produced < len(gen.pieces):
            gen = aborted(gen, produced)
        self.success[gen.finish_reason if gen.finish_reason in ("length", "abort") else "stop"] += 1
        return gen, prompt_ids, cached
