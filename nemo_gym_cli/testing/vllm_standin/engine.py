"""The simulated vLLM engine: a scheduler with max_num_seqs slots, counters, one completion.

No HTTP here: app.py turns a StandinError into vLLM's error JSON.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from nemo_gym_cli.serving.protocol import content_text
from nemo_gym_cli.testing.vllm_standin.model import Generation, generate, pick_tool, reasoning_text, text_answer
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
        self.counts = {"chat": 0, "responses": 0, "tokenize": 0}
        self.success = {"stop": 0, "length": 0, "abort": 0}
        self.sessions: dict[str, int] = {}

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

    async def schedule(self, prompt_ids: list[int], output_tokens: int) -> int:
        """Wait for a free sequence slot (vLLM's max_num_seqs), 'run', return cached tokens."""
        if self.sem is None:
            self.sem = asyncio.Semaphore(self.config.max_num_seqs)
        self.waiting += 1
        try:
            await self.sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        if self.running > self.peak_running:
            self.peak_running = self.running
        try:
            hits = self.cache.lookup_and_insert(prompt_ids)
            delay = (self.config.latency_ms + self.config.per_token_ms * output_tokens) / 1000
            if delay > 0:
                await asyncio.sleep(delay)  # simulated generation time, not synchronisation
            return hits
        finally:
            self.running -= 1
            self.sem.release()

    async def complete(
        self, messages: list, tools: list, tool_choice: Any, max_tokens: Any, add_gen: bool = True
    ) -> tuple[Generation, list[int], int]:
        """Shared core of chat and responses: (Generation, prompt_ids, cached tokens); raises StandinError."""
        prompt_ids = tokenize_text(render_prompt(messages, tools, add_gen))
        limit = self.config.context_length
        if len(prompt_ids) > limit:
            completion = max_tokens if isinstance(max_tokens, int) else 0
            raise StandinError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + completion} tokens ({len(prompt_ids)} in the messages, {completion} in the "
                "completion). Please reduce the length of the messages or completion.",
            )
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
        gen = generate(text, tool, reasoning, max_tokens)
        cached = await self.schedule(prompt_ids, len(gen.pieces))
        self.success["length" if gen.finish_reason == "length" else "stop"] += 1
        return gen, prompt_ids, cached
