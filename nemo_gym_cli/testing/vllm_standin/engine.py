"""The simulated vLLM engine: a scheduler with max_num_seqs slots, counters, one completion.

No HTTP here: app.py turns a StandinError into vLLM's error JSON.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from nemo_gym_cli.serving.protocol import content_text
from nemo_gym_cli.testing.vllm_standin.model import (Generation, aborted, generate, pick_tool, reasoning_text,
                                                     text_answer)
from nemo_gym_cli.testing.vllm_standin.prefix_cache import PrefixCache
from nemo_gym_cli.testing.vllm_standin.tokenizer import render_prompt, tokenize_text

MAX_SESSIONS = 100_000
REQUEST_LOG = 10_000  # the last requests, for tests (GET /standin/requests)


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
    scale_out: bool = True  # render/generate/derender (vLLM's --enable-scale-out)
    dev_mode: bool = True  # vLLM's VLLM_SERVER_DEV_MODE=1: pause API and weight-version routes


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
                                     "resume", "is_paused", "update_weight_version", "finish_weight_update",
                                     "weight_info"), 0)
        self.success = {"stop": 0, "length": 0, "abort": 0}
        self.sessions: dict[str, int] = {}
        self.requests: deque[dict] = deque(maxlen=REQUEST_LOG)  # {route, session[, sampling_params]}
        # vLLM's RL pause API: new requests wait while paused; mode=abort ends the running ones now,
        # mode=keep freezes them until /resume, mode=wait lets them finish.
        self.paused = False
        self.pause_mode: str | None = None
        self.aborted_requests = 0
        self.weight_version = "default"  # vLLM's label until a trainer sets one (/update_weight_version)
        self._resumed: asyncio.Event | None = None  # set while serving (created on the server's loop)
        self._pausing: asyncio.Event | None = None  # set (then replaced) by each pause
        self._idle: asyncio.Event | None = None  # set while nothing runs (pause(mode=wait) waits for it)

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        if self._resumed is None:
            self._resumed, self._pausing, self._idle = asyncio.Event(), asyncio.Event(), asyncio.Event()
            self._resumed.set()
            self._idle.set()
        return self._resumed, self._idle

    async def pause(self, mode: str) -> None:
        resumed, idle = self._events()
        self.paused, self.pause_mode = True, mode
        resumed.clear()
        self._pausing.set()  # the running requests look at pause_mode
        self._pausing = asyncio.Event()
        if mode == "wait":
            await idle.wait()

    def resume(self) -> None:
        self.paused = False
        self._events()[0].set()

    def log_request(self, route: str, session_id: str | None) -> dict:
        entry = {"route": route, "session": session_id}
        self.requests.append(entry)
        return entry

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

    async def schedule(self, prompt_ids: list[int], output_tokens: int) -> tuple[int, int, list[tuple[str, int]]]:
        """Wait for a free sequence slot (vLLM's max_num_seqs), 'run'; (cached tokens, tokens
        produced: fewer than output_tokens when a pause aborted it, [(weight version, index of the
        first token it made)])."""
        resumed, idle = self._events()
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
            versions = [(self.weight_version, 0)]
            return hits, await self._run(output_tokens, versions), versions
        finally:
            self.running -= 1
            if not self.running:
                idle.set()
            self.sem.release()

    async def _run(self, output_tokens: int, versions: list[tuple[str, int]]) -> int:
        """The simulated generation time (latency + per token): pause(abort) cuts it short,
        pause(keep) freezes it until /resume (tokens after it carry the weight version then set).
        Returns the tokens produced."""
        latency_s, per_token_s = self.config.latency_ms / 1000, self.config.per_token_ms / 1000
        total = latency_s + per_token_s * output_tokens
        spent = 0.0
        while spent < total:
            pausing, t0 = self._pausing, time.monotonic()
            try:
                await asyncio.wait_for(pausing.wait(), total - spent)
            except TimeoutError:
                break
            spent += time.monotonic() - t0
            made = min(output_tokens - 1, max(0, int((spent - latency_s) / per_token_s))) if per_token_s > 0 else 0
            if self.pause_mode == "abort":
                self.aborted_requests += 1
                return made
            if self.pause_mode == "keep":
                await self._resumed.wait()
                if self.weight_version != versions[-1][0]:
                    if versions[-1][1] == made:  # no token under the old version
                        versions.pop()
                    versions.append((self.weight_version, made))
        return output_tokens

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
        cached, produced, _ = await self.schedule(prompt_ids, len(gen.pieces))
        if produced < len(gen.pieces):
            gen = aborted(gen, produced)
        self.success[gen.finish_reason if gen.finish_reason in ("length", "abort") else "stop"] += 1
        return gen, prompt_ids, cached
