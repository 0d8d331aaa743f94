"""vLLM 0.32's JSON shapes: chat completion, Responses object, model list, error body.

Plain dicts from a Generation; the ids are derived from the prompt so reruns are comparable.
"""

from __future__ import annotations

import os
import time
from typing import Any

from nemo_gym_cli.testing.vllm_standin.engine import StandinConfig
from nemo_gym_cli.testing.vllm_standin.model import Generation, logprobs_content


def _short_hash(ids: list[int]) -> str:
    # hash() of a tuple of ints is stable across processes (no hash randomization for ints).
    return f"{hash(tuple(ids)) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def error_body(status: int, message: str, err_type: str = "BadRequestError") -> dict:
    return {"error": {"message": message, "type": err_type, "param": None, "code": status}}


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


def chat_completion(body: dict, gen: Generation, prompt_ids: list[int], cached: int, model: str) -> dict:
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
        "model": body.get("model") or model,
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
    return response


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


def responses_object(body: dict, tools: list, tool_choice: Any, gen: Generation, prompt_ids: list[int], cached: int,
                     model: str) -> dict:
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
        "model": body.get("model") or model,
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
    return response


def model_list(config: StandinConfig) -> dict:
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
    return {"object": "list", "data": [model]}
