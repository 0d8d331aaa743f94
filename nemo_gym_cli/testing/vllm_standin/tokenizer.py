"""The stand-in's tokenizer and chat template.

Tokens are words and single punctuation characters, each mapped to a stable id; whitespace is
dropped, so a piece boundary always falls on whitespace or punctuation. The template's markers
(`<|im_start|>`, `<|im_end|>`) are one token each, like a real tokenizer's special tokens; a
generation ends with END_OF_TURN, as vLLM keeps the EOS token it stopped on. The template is
ChatML-like and append-only across turns (turn 2's prompt starts with turn 1's prompt), which
is what makes the prefix cache hit.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import orjson

from nemo_gym_cli.serving.protocol import content_text

VOCAB_SIZE = 50_000

_TOKEN_RE = re.compile(r"<\|im_start\|>|<\|im_end\|>|\w+|[^\w\s]")
END_OF_TURN_TEXT = "<|im_end|>"
_piece_ids: dict[str, int] = {}  # crc32 is cheap, but a dict hit is cheaper on hot paths


def piece_id(piece: str) -> int:
    token_id = _piece_ids.get(piece)
    if token_id is None:
        if len(_piece_ids) > 200_000:  # bound memory when fed endless unique text
            _piece_ids.clear()
        token_id = _piece_ids[piece] = zlib.crc32(piece.encode()) % VOCAB_SIZE
    return token_id


def end_of_turn_id() -> int:
    return piece_id(END_OF_TURN_TEXT)


def tokenize_text(text: str) -> list[int]:
    """Token ids of `text` (the stand-in's whole tokenizer)."""
    return [piece_id(piece) for piece in _TOKEN_RE.findall(text)]


def token_pieces(text: str) -> list[tuple[str, int]]:
    """(piece, end offset) per token: output text needs offsets for max_tokens truncation."""
    return [(m.group(), m.end()) for m in _TOKEN_RE.finditer(text)]


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
