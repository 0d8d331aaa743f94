"""A deterministic stand-in for a vLLM OpenAI-compatible server (vLLM 0.32 response shapes).

Why it exists: tests, benchmarks and the README demo need "a vLLM" on machines without a
GPU. It answers with the same JSON shapes as vLLM, simulates the parts of vLLM that the
rollout stack reacts to (scheduler queueing, prefix cache hits, context-length 400s,
/tokenize, /metrics) and is fast enough that benchmarks measure our stack, not this fake.

Run it with `ng_vllm_standin --port 0 --port-file /tmp/port` or
`python -m nemo_gym_cli.testing.vllm_standin`. See `build_parser()` for the flags.

Behaviour in one paragraph: with tools and tool_choice "required" (or a named function)
it always calls a tool; with tool_choice "auto" it calls the first tool while fewer than
--tool-call-turns tool results follow the last user message; otherwise it answers
"The answer is: <last user message>" (or "Based on the tool result: ..." right after a
tool result). A --script file of rules overrides that: {"match": <substring of the prompt>, and
"content": <text> | "status": <HTTP error> | "tool_call": {"name", "arguments": <raw string>},
optionally "reasoning": <text>}; the first matching rule wins.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

VOCAB_SIZE = 50_000
BLOCK_SIZE = 16  # vLLM's default KV block size; prefix caching works on full blocks
PREFIX_CACHE_BLOCKS = 10_000
MAX_SESSIONS = 100_000
JSON = "application/json"

# ---------------------------------------------------------------------------------------
# Tokenizer: words and single punctuation characters, each mapped to a stable id.
# Whitespace is dropped, so a piece boundary always falls on whitespace or punctuation.
# ---------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_piece_ids: dict[str, int] = {}  # crc32 is cheap, but a dict hit is cheaper on hot paths


def _piece_id(piece: str) -> int:
    token_id = _piece_ids.get(piece)
    if token_id is None:
        if len(_piece_ids) > 200_000:  # bound memory when fed endless unique text
            _piece_ids.clear()
        token_id = _piece_ids[piece] = zlib.crc32(piece.encode()) % VOCAB_SIZE
    return token_id


def tokenize_text(text: str) -> list[int]:
    """Token ids of `text` (the stand-in's whole tokenizer)."""
    return [_piece_id(piece) for piece in _TOKEN_RE.findall(text)]


def token_pieces(text: str) -> list[tuple[str, int]]:
    """(piece, end offset) per token: output text needs offsets for max_tokens truncation."""
    return [(m.group(), m.end()) for m in _TOKEN_RE.finditer(text)]


# ---------------------------------------------------------------------------------------
# Prompt rendering: a ChatML-like template. Rendering is append-only across turns (turn 2's
# prompt starts with turn 1's prompt), which is what makes the prefix cache hit.
# ---------------------------------------------------------------------------------------


def content_text(content: Any) -> str:
    """Text of a message content: a string, or a list of parts with "text"."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "".join(texts)
    return str(content)


def tool_function(tool: dict) -> dict:
    """The {name, description, parameters} of a chat-style or Responses-style (flat) tool."""
    fn = tool.get("function")
    return fn if isinstance(fn, dict) else tool


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()


def render_prompt(messages: list, tools: list | None, add_generation_prompt: bool = True) -> str:
    out = []
    if tools:
        # Tools go first, like chat templates that put them in the system prompt.
        out.append("<|im_start|>tools\n")
        for tool in tools:
            fn = tool_function(tool)
            params = orjson.dumps(fn.get("parameters") or {}).decode()
            out.append(f"{fn.get('name', '')} {fn.get('description') or ''} {params}\n")
        out.append("<|im_end|>\n")
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        out.append(f"<|im_start|>{msg.get('role', 'user')}\n")
        out.append(content_text(msg.get("content")))
        for call in msg.get("tool_calls") or ():
            fn = call.get("function") or {}
            out.append(f"\n<tool_call>{fn.get('name', '')} {_arguments_text(fn.get('arguments', ''))}</tool_call>")
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# ---------------------------------------------------------------------------------------
# Deterministic "model": decide tool call vs text, build the output text.
# ---------------------------------------------------------------------------------------


def tool_results_since_last_user(messages: list) -> int:
    """How many tool results the model has already seen in this episode."""
    count = 0
    for msg in reversed(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role == "user":
            break
        if role == "tool":
            count += 1
    return count


def last_user_text(messages: list) -> str:
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return content_text(msg.get("content"))
    return ""


def text_answer(messages: list) -> str:
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "tool":
        return "Based on the tool result: " + content_text(last.get("content"))[:60]
    return "The answer is: " + last_user_text(messages)[:40]


def _example_value(name: str, schema: Any) -> Any:
    schema = schema if isinstance(schema, dict) else {}
    if schema.get("enum"):
        return schema["enum"][0]  # any other value would be invalid for the tool
    kind = schema.get("type")
    if isinstance(kind, list):  # e.g. ["string", "null"]
        kind = next((k for k in kind if k != "null"), None)
    if kind in ("number", "integer"):
        return 1
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return {}
    return "San Francisco" if name == "city" else "value"


def example_arguments(parameters: Any) -> str:
    props = parameters.get("properties") if isinstance(parameters, dict) else None
    args = {name: _example_value(name, schema) for name, schema in (props or {}).items()}
    return json.dumps(args)  # json.dumps spacing, like vLLM's tool parsers


def _forced_tool_name(tool_choice: Any) -> str | None:
    """Name from a specific-function tool_choice (chat: {function: {name}}, Responses: {name})."""
    if not isinstance(tool_choice, dict):
        return None
    fn = tool_choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
    return name if isinstance(name, str) else None


def pick_tool(tools: list, tool_choice: Any, messages: list, tool_call_turns: int) -> dict | None:
    """The tool function to call this turn, or None for a text answer."""
    functions = [tool_function(t) for t in tools or () if isinstance(t, dict) and t.get("type", "function") == "function"]
    if not functions or tool_choice == "none":
        return None
    forced = _forced_tool_name(tool_choice)
    if forced is None and tool_choice != "required":
        if tool_choice not in (None, "auto") or tool_results_since_last_user(messages) >= tool_call_turns:
            return None
    if forced is not None:
        return next((fn for fn in functions if fn.get("name") == forced), {"name": forced})
    return functions[0]


@dataclass(slots=True)
class Generation:
    content: str  # "" for a tool call
    reasoning: str | None
    tool_call: tuple[str, str] | None  # (name, arguments json)
    finish_reason: str  # "stop" | "tool_calls" | "length"
    pieces: list[tuple[str, int]]  # output tokens (reasoning first), for logprobs
    reasoning_tokens: int

    @property
    def output_ids(self) -> list[int]:
        return [_piece_id(piece) for piece, _ in self.pieces]


def _truncate(text: str, pieces: list[tuple[str, int]], budget: int) -> tuple[str, list]:
    pieces = pieces[:budget]
    return (text[: pieces[-1][1]] if pieces else ""), pieces


def generate(text: str, tool: dict | None, reasoning: str | None, max_tokens: Any) -> Generation:
    """Turn the decided answer into output tokens, honouring max_tokens like vLLM would."""
    budget = max_tokens if isinstance(max_tokens, int) and max_tokens >= 0 else None
    call = None
    if tool is not None:
        call = (tool.get("name", ""), tool["raw_arguments"] if "raw_arguments" in tool else example_arguments(tool.get("parameters")))
        # What the model "emits"; the tool parser turns it into tool_calls.
        text = f'<tool_call>\n{{"name": {json.dumps(call[0])}, "arguments": {call[1]}}}\n</tool_call>'
    r_pieces = token_pieces(reasoning) if reasoning else []
    if budget is not None and len(r_pieces) > budget:
        # Ran out of tokens while thinking: no answer at all.
        reasoning, r_pieces = _truncate(reasoning, r_pieces, budget)
        return Generation("", reasoning, None, "length", r_pieces, len(r_pieces))
    pieces = token_pieces(text)
    if budget is not None and len(pieces) > budget - len(r_pieces):
        # A cut-off tool call does not parse, so vLLM returns the raw text as content.
        text, pieces = _truncate(text, pieces, budget - len(r_pieces))
        return Generation(text, reasoning, None, "length", r_pieces + pieces, len(r_pieces))
    if call is not None:
        return Generation("", reasoning, call, "tool_calls", r_pieces + pieces, len(r_pieces))
    return Generation(text, reasoning, None, "stop", r_pieces + pieces, len(r_pieces))


def _reasoning_text(messages: list, tool: dict | None) -> str:
    plan = f"call the tool {tool.get('name', '')}" if tool is not None else "answer directly"
    return f"The user asked: {last_user_text(messages)[:40]}. I should {plan}."


def _logprob(token_id: int, rank: int = 0) -> float:
    # Deterministic, negative, and decreasing with rank so top_logprobs look sorted.
    return -round(0.01 + (token_id * 7919 % 1000) / 500 + rank, 4)


def logprobs_content(pieces: list[tuple[str, int]], top_n: int) -> list[dict]:
    entries = []
    for piece, _ in pieces:
        token_id = _piece_id(piece)
        token_bytes = list(piece.encode())
        top = []
        if top_n:
            top = [{"token": f"token_id:{token_id}", "logprob": _logprob(token_id), "bytes": token_bytes}]
            for rank in range(1, top_n):
                alt = (token_id + rank) % VOCAB_SIZE
                top.append({"token": f"token_id:{alt}", "logprob": _logprob(token_id, rank), "bytes": []})
        entries.append(
            {"token": f"token_id:{token_id}", "logprob": _logprob(token_id), "bytes": token_bytes, "top_logprobs": top}
        )
    return entries


def _short_hash(ids: list[int]) -> str:
    # hash() of a tuple of ints is stable across processes (no hash randomization for ints).
    return f"{hash(tuple(ids)) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


# ---------------------------------------------------------------------------------------
# Simulated vLLM engine state: prefix cache, scheduler queue, counters.
# ---------------------------------------------------------------------------------------


class PrefixCache:
    """LRU of prompt-prefix hashes at block granularity, like vLLM's automatic prefix caching."""

    def __init__(self, capacity: int = PREFIX_CACHE_BLOCKS, block_size: int = BLOCK_SIZE):
        self.capacity = capacity
        self.block_size = block_size
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.queries = 0
        self.hits = 0

    def lookup_and_insert(self, ids: list[int]) -> int:
        """Cached prompt tokens for `ids` (longest run of leading cached blocks); caches all blocks."""
        size, blocks = self.block_size, self.blocks
        prefix_hash, hit_tokens, still_hitting = 0, 0, True
        for start in range(0, len(ids) - size + 1, size):
            prefix_hash = hash((prefix_hash, *ids[start : start + size]))
            if prefix_hash in blocks:
                blocks.move_to_end(prefix_hash)
                if still_hitting:
                    hit_tokens += size
            else:
                still_hitting = False
                blocks[prefix_hash] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
        self.queries += len(ids)
        self.hits += hit_tokens
        return hit_tokens


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


class Standin:
    """All mutable state of one server. Counters are plain ints: increments stay cheap."""

    def __init__(self, config: StandinConfig):
        self.config = config
        self.cache = PrefixCache()
        self.sem: asyncio.Semaphore | None = None  # created on the server's loop
        self.running = 0
        self.waiting = 0
        self.counts = {"chat": 0, "responses": 0, "tokenize": 0}
        self.success = {"stop": 0, "length": 0, "abort": 0}
        self.sessions: dict[str, int] = {}

    def record_session(self, request: web.Request) -> None:
        sid = request.headers.get("X-Session-ID")
        if not sid:
            return
        sessions = self.sessions
        count = sessions.pop(sid, 0)  # pop + re-insert keeps the dict in LRU order
        if not count and len(sessions) >= MAX_SESSIONS:
            del sessions[next(iter(sessions))]
        sessions[sid] = count + 1

    def script_rule(self, messages: list) -> dict | None:
        if not self.config.script:
            return None
        text = "\n".join(content_text(m.get("content")) for m in messages if isinstance(m, dict))
        return next((rule for rule in self.config.script if rule["match"] in text), None)

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
        try:
            hits = self.cache.lookup_and_insert(prompt_ids)
            delay = (self.config.latency_ms + self.config.per_token_ms * output_tokens) / 1000
            if delay > 0:
                await asyncio.sleep(delay)
            return hits
        finally:
            self.running -= 1
            self.sem.release()

    async def complete(self, messages: list, tools: list, tool_choice: Any, max_tokens: Any, add_gen: bool = True):
        """Shared core of chat and responses: returns (Generation, prompt_ids, cached) or an error."""
        prompt_ids = tokenize_text(render_prompt(messages, tools, add_gen))
        limit = self.config.context_length
        if len(prompt_ids) > limit:
            completion = max_tokens if isinstance(max_tokens, int) else 0
            return error_response(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + completion} tokens ({len(prompt_ids)} in the messages, {completion} in the "
                "completion). Please reduce the length of the messages or completion.",
            )
        rule = self.script_rule(messages)
        if rule is not None and rule.get("status", 200) >= 400:
            return error_response(rule["status"], rule.get("message", "scripted error"), _error_type(rule["status"]))
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
            reasoning = _reasoning_text(messages, tool) if self.config.reasoning else None
        gen = generate(text, tool, reasoning, max_tokens)
        cached = await self.schedule(prompt_ids, len(gen.pieces))
        self.success["length" if gen.finish_reason == "length" else "stop"] += 1
        return gen, prompt_ids, cached

    def metrics_text(self) -> str:
        label = f'model_name="{self.config.model}"'
        seqs = self.config.max_num_seqs
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{label}}} {float(self.running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{label}}} {float(self.waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{label}}} {self.running / seqs if seqs else 0.0}",
            "# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.",
            "# TYPE vllm:prefix_cache_queries counter",
            f"vllm:prefix_cache_queries_total{{{label}}} {float(self.cache.queries)}",
            "# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.",
            "# TYPE vllm:prefix_cache_hits counter",
            f"vllm:prefix_cache_hits_total{{{label}}} {float(self.cache.hits)}",
            "# HELP vllm:num_preemptions Cumulative number of preemptions from the engine.",
            "# TYPE vllm:num_preemptions counter",
            f"vllm:num_preemptions_total{{{label}}} 0.0",
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
            "# TYPE vllm:cache_config_info gauge",
            f'vllm:cache_config_info{{block_size="{BLOCK_SIZE}",enable_prefix_caching="{self.config.prefix_caching}"}} 1.0',
            "# HELP vllm:request_success Count of successfully processed requests.",
            "# TYPE vllm:request_success counter",
        ]
        for reason, count in self.success.items():
            lines.append(f'vllm:request_success_total{{finished_reason="{reason}",{label}}} {float(count)}')
        lines += [
            "# HELP standin_requests Chat completions and responses requests received by the stand-in.",
            "# TYPE standin_requests counter",
            f"standin_requests_total{{{label}}} {float(self.counts['chat'] + self.counts['responses'])}",
        ]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# HTTP layer
# ---------------------------------------------------------------------------------------


def _error_type(status: int) -> str:
    return {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError"}.get(
        status, "InternalServerError" if status >= 500 else "BadRequestError"
    )


def error_response(status: int, message: str, err_type: str = "BadRequestError") -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": None, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=JSON)


def json_response(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type=JSON)


async def read_json(request: web.Request) -> dict | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        return error_response(400, f"Invalid JSON body: {exc}")
    if not isinstance(body, dict):
        return error_response(400, "Request body must be a JSON object")
    if body.get("stream"):
        return error_response(400, "stream=true is not supported by the vLLM stand-in")
    return body


def _chat_message(gen: Generation, prompt_ids: list[int]) -> dict:
    tool_calls = []
    if gen.tool_call is not None:
        name, arguments = gen.tool_call
        tool_calls.append(
            {
                "id": f"chatcmpl-tool-{_short_hash(prompt_ids)}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return {
        "role": "assistant",
        "content": gen.content,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": tool_calls,
        "reasoning": gen.reasoning,  # vLLM 0.32 name
        "reasoning_content": gen.reasoning,  # older vLLM name, same text
    }


async def handle_chat(request: web.Request) -> web.Response:
    standin: Standin = request.app["standin"]
    standin.counts["chat"] += 1
    standin.record_session(request)
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    messages = body.get("messages")
    if not isinstance(messages, list):
        return error_response(400, "Field 'messages' is required and must be a list")
    result = await standin.complete(
        messages,
        body.get("tools") or [],
        body.get("tool_choice"),
        body.get("max_tokens", body.get("max_completion_tokens")),
        body.get("add_generation_prompt", True),
    )
    if isinstance(result, web.Response):
        return result
    gen, prompt_ids, cached = result
    logprobs = None
    if body.get("logprobs"):
        logprobs = {"content": logprobs_content(gen.pieces, int(body.get("top_logprobs") or 0))}
    choice = {
        "index": 0,
        "message": _chat_message(gen, prompt_ids),
        "logprobs": logprobs,
        "finish_reason": gen.finish_reason,
        "stop_reason": None,
    }
    completion_tokens = len(gen.pieces)
    response = {
        "id": f"chatcmpl-{os.urandom(16).hex()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or standin.config.model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {
            "prompt_tokens": len(prompt_ids),
            "total_tokens": len(prompt_ids) + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }
    if body.get("return_token_ids"):  # vLLM >= 0.10.2 extension
        response["prompt_token_ids"] = prompt_ids
        choice["token_ids"] = gen.output_ids
    return json_response(response)


def responses_input_to_messages(input_: Any, instructions: Any) -> list[dict]:
    """Responses input items -> chat messages (consecutive assistant output merges into one)."""
    messages: list[dict] = []
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(input_, str):
        messages.append({"role": "user", "content": input_})
        return messages
    assistant: dict | None = None
    for item in input_ if isinstance(input_, list) else ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "function_call":
            if assistant is None:
                assistant = {"role": "assistant", "content": "", "tool_calls": []}
                messages.append(assistant)
            assistant["tool_calls"].append(
                {
                    "id": item.get("call_id"),
                    "type": "function",
                    "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "")},
                }
            )
        elif kind == "function_call_output":
            assistant = None
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content_text(item.get("output"))})
        elif "role" in item and kind in (None, "message"):
            if item["role"] == "assistant":
                if assistant is None:
                    assistant = {"role": "assistant", "content": "", "tool_calls": []}
                    messages.append(assistant)
                assistant["content"] += content_text(item.get("content"))
            else:
                assistant = None
                messages.append({"role": item["role"], "content": content_text(item.get("content"))})
        # reasoning and other item types carry nothing the stand-in needs
    return messages


def _responses_output(gen: Generation, prompt_ids: list[int]) -> list[dict]:
    digest = _short_hash(prompt_ids)
    output: list[dict] = []
    if gen.reasoning:
        output.append(
            {
                "type": "reasoning",
                "id": f"rs_{digest}",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": gen.reasoning}],
                "encrypted_content": None,
                "status": None,
            }
        )
    if gen.tool_call is not None:
        name, arguments = gen.tool_call
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{digest}",
                "call_id": f"call_{digest}",
                "name": name,
                "arguments": arguments,
                "status": "completed",
            }
        )
    else:
        output.append(
            {
                "type": "message",
                "id": f"msg_{digest}",
                "role": "assistant",
                "status": "incomplete" if gen.finish_reason == "length" else "completed",
                "content": [{"type": "output_text", "text": gen.content, "annotations": [], "logprobs": []}],
            }
        )
    return output


async def handle_responses(request: web.Request) -> web.Response:
    standin: Standin = request.app["standin"]
    standin.counts["responses"] += 1
    standin.record_session(request)
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    if "input" not in body:
        return error_response(400, "Field 'input' is required")
    messages = responses_input_to_messages(body["input"], body.get("instructions"))
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    tool_choice = body.get("tool_choice", "auto")
    result = await standin.complete(messages, tools, tool_choice, body.get("max_output_tokens"))
    if isinstance(result, web.Response):
        return result
    gen, prompt_ids, cached = result
    incomplete = gen.finish_reason == "length"
    completion_tokens = len(gen.pieces)
    response = {
        "id": f"resp_{os.urandom(16).hex()}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if incomplete else "completed",
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "metadata": body.get("metadata") or {},
        "model": body.get("model") or standin.config.model,
        "output": _responses_output(gen, prompt_ids),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": None,
        "service_tier": "auto",
        "store": False,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": tool_choice,
        "tools": tools,
        "top_logprobs": None,
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": {
            "input_tokens": len(prompt_ids),
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": gen.reasoning_tokens},
            "total_tokens": len(prompt_ids) + completion_tokens,
        },
        "user": None,
    }
    return json_response(response)


async def handle_tokenize(request: web.Request) -> web.Response:
    standin: Standin = request.app["standin"]
    standin.counts["tokenize"] += 1
    standin.record_session(request)
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    if isinstance(body.get("messages"), list):
        # Same rendering as chat completions, so the ids equal the chat call's prompt ids.
        text = render_prompt(body["messages"], body.get("tools") or [], body.get("add_generation_prompt", True))
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    else:
        return error_response(400, "Either 'messages' (list) or 'prompt' (string) is required")
    ids = tokenize_text(text)
    return json_response(
        {"count": len(ids), "max_model_len": standin.config.context_length, "tokens": ids, "token_strs": None}
    )


async def handle_health(request: web.Request) -> web.Response:
    return web.Response()


async def handle_models(request: web.Request) -> web.Response:
    config: StandinConfig = request.app["standin"].config
    created = int(time.time())
    model = {
        "id": config.model,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": config.model,
        "parent": None,
        "max_model_len": config.context_length,
        "permission": [
            {
                "id": f"modelperm-{os.urandom(16).hex()}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
    return json_response({"object": "list", "data": [model]})


async def handle_metrics(request: web.Request) -> web.Response:
    # Prometheus text exposition format 0.0.4, the content type prometheus_client serves.
    return web.Response(
        body=request.app["standin"].metrics_text().encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def handle_sessions(request: web.Request) -> web.Response:
    return json_response(request.app["standin"].sessions)


async def handle_stats(request: web.Request) -> web.Response:
    counts = request.app["standin"].counts
    return json_response({"requests": counts["chat"] + counts["responses"], **counts})


def build_app(config: StandinConfig) -> web.Application:
    """The aiohttp app; tests may run it in-process with aiohttp's AppRunner/TestServer."""
    app = web.Application(client_max_size=64 * 1024 * 1024)  # long multi-turn prompts
    app["standin"] = Standin(config)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_post("/v1/chat/completions", handle_chat)
    app.router.add_post("/v1/responses", handle_responses)
    app.router.add_post("/tokenize", handle_tokenize)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/standin/sessions", handle_sessions)
    app.router.add_get("/standin/stats", handle_stats)
    return app


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def load_script(path: str) -> list[dict]:
    """Rules from a JSON list (or one object) or JSONL: {"match", "content"} or {"match", "status"}."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except ValueError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    rules = data if isinstance(data, list) else [data]
    for rule in rules:
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), str):
            raise ValueError(f"{path}: every rule needs a string 'match': {rule!r}")
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
    try:
        import uvloop  # measurably faster event loop; optional
    except ImportError:
        uvloop = None
    (uvloop.run if uvloop is not None else asyncio.run)(serve(config))
    sys.exit(0)


if __name__ == "__main__":
    main()
