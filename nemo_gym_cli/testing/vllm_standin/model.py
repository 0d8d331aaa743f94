"""The stand-in's deterministic "model": tool call or text, then output tokens and logprobs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nemo_gym_cli.serving.protocol import content_text
from nemo_gym_cli.testing.vllm_standin.tokenizer import VOCAB_SIZE, piece_id, token_pieces, tool_function


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
        return [piece_id(piece) for piece, _ in self.pieces]


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


def aborted(gen: Generation, produced: int) -> Generation:
    """What a pause (mode=abort) leaves of a generation: its first `produced` tokens, as text."""
    pieces = gen.pieces[:produced]
    reasoning_tokens = min(gen.reasoning_tokens, produced)
    text = " ".join(piece for piece, _ in pieces[reasoning_tokens:])
    reasoning = " ".join(piece for piece, _ in pieces[:reasoning_tokens]) if gen.reasoning is not None else None
    return Generation(text, reasoning, None, "abort", pieces, reasoning_tokens)


def reasoning_text(messages: list, tool: dict | None) -> str:
    plan = f"call the tool {tool.get('name', '')}" if tool is not None else "answer directly"
    return f"The user asked: {last_user_text(messages)[:40]}. I should {plan}."


def _logprob(token_id: int, rank: int = 0) -> float:
    # Deterministic, negative, and decreasing with rank so top_logprobs look sorted.
    return -round(0.01 + (token_id * 7919 % 1000) / 500 + rank, 4)


def logprobs_content(pieces: list[tuple[str, int]], top_n: int) -> list[dict]:
    entries = []
    for piece, _ in pieces:
        token_id = piece_id(piece)
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
