"""The stand-in's token-in/token-out routes (vLLM 0.32 `--enable-scale-out`) and RL pause API
(`VLLM_SERVER_DEV_MODE=1`), in vLLM's JSON shapes:

- POST /v1/chat/completions/render: chat request -> {token_ids, sampling_params, ...}
- POST /inference/v1/generate: {token_ids, sampling_params} -> choices[0].{token_ids, logprobs.content
  [{token_id, logprob, rank, top_logprobs}], finish_reason, weight_versions}
- POST /v1/chat/completions/derender: {model, chat_request, generate_response} -> ChatCompletion
- POST /pause?mode=abort|wait|keep, POST /resume, GET /is_paused
- POST /update_weight_version {"new_version"}, POST /finish_weight_update {"weight_version"},
  GET /weight_info: the label vLLM puts on the tokens generated from then on (`weight_versions`)

The "model" decides its answer from the chat messages, which generate never sees: render puts that
decision in `standin_plan` (passed back to generate with the rest of the render answer, as vLLM's
own extras are), generate turns it into tokens (ending with the end-of-turn token), and derender
decides again from its chat request and parses the ids it is given (stateless, as vLLM's is: any
stand-in derenders what another generated). A generation continued after an abort (its partial
tokens at the end of the prompt) goes on where it stopped.
"""

from __future__ import annotations

from aiohttp import web

from nemo_gym_cli.testing.vllm_standin import responses
from nemo_gym_cli.testing.vllm_standin.engine import Standin, StandinError
from nemo_gym_cli.testing.vllm_standin.model import _logprob, generate
from nemo_gym_cli.testing.vllm_standin.tokenizer import end_of_turn_id

PAUSE_MODES = ("abort", "wait", "keep")


def sampling_params(body: dict) -> dict:
    """vLLM's SamplingParams fields of a Chat Completions request (what render answers)."""
    logprobs = body.get("top_logprobs") or 0 if body.get("logprobs") else None
    return {"temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0), "seed": body.get("seed"),
            "stop": body.get("stop") or [], "max_tokens": body.get("max_tokens", body.get("max_completion_tokens")),
            "logprobs": logprobs, "structured_outputs": None}


async def handle_render(request: web.Request, standin: Standin, body: dict, entry: dict) -> dict:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise StandinError(400, "Field 'messages' is required and must be a list")
    tools = body.get("tools") or []
    prompt_ids, text, tool, reasoning = standin.decide(messages, tools, body.get("tool_choice"),
                                                       body.get("max_tokens"), body.get("add_generation_prompt", True))
    return {"request_id": f"chatcmpl-{responses._short_hash(prompt_ids)}", "token_ids": prompt_ids,
            "sampling_params": sampling_params(body), "model": body.get("model"),
            "standin_plan": {"text": text, "tool": tool, "reasoning": reasoning}}


def _already_generated(token_ids: list[int], output_ids: list[int]) -> int:
    """How many of output_ids already end the prompt (a continuation after an abort)."""
    for k in range(min(len(token_ids), len(output_ids) - 1), 0, -1):
        if token_ids[-k:] == output_ids[:k]:
            return k
    return 0


async def handle_generate(request: web.Request, standin: Standin, body: dict, entry: dict) -> dict:
    token_ids, sampling, plan = body.get("token_ids"), body.get("sampling_params"), body.get("standin_plan")
    if not isinstance(token_ids, list) or not token_ids or not isinstance(sampling, dict):
        raise StandinError(400, "Fields 'token_ids' (non-empty list) and 'sampling_params' are required")
    entry["sampling_params"] = sampling
    if not isinstance(plan, dict):
        raise StandinError(400, "the stand-in generates only from a render answer (no 'standin_plan')")
    max_tokens = sampling.get("max_tokens")
    standin.check_length(token_ids, max_tokens)
    # The whole answer as the first call would have made it, then the part still to come.
    full = generate(plan["text"], plan["tool"], plan["reasoning"], None)
    output_ids = full.output_ids + [end_of_turn_id()]
    done = _already_generated(token_ids, output_ids)
    budget = len(output_ids) - done if not isinstance(max_tokens, int) else min(max_tokens, len(output_ids) - done)
    cached, produced, versions = await standin.schedule(token_ids, budget)
    new = output_ids[done:done + produced]
    finish = "abort" if produced < budget else ("length" if done + produced < len(output_ids) else "stop")
    standin.success["abort" if finish == "abort" else finish] += 1
    ends = [start for _, start in versions[1:]] + [len(new)]
    spans = [{"version": v, "start": start, "end": end} for (v, start), end in zip(versions, ends) if end > start]
    logprobs = None
    if sampling.get("logprobs") is not None:
        logprobs = {"content": [{"token_id": t, "logprob": _logprob(t), "rank": 1,
                                 "top_logprobs": [{"token_id": t, "logprob": _logprob(t), "rank": 1}]} for t in new]}
    return {"request_id": f"generate-tokens-{body.get('request_id') or responses._short_hash(token_ids)}",
            "model": standin.config.model, "output_mode": "tokens",
            "usage": {"prompt_tokens": len(token_ids), "completion_tokens": len(new),
                      "total_tokens": len(token_ids) + len(new), "prompt_tokens_details": {"cached_tokens": cached}},
            "choices": [{"index": 0, "finish_reason": finish, "stop_reason": None, "token_ids": new,
                         "logprobs": logprobs, "weight_versions": spans}]}


async def handle_derender(request: web.Request, standin: Standin, body: dict, entry: dict) -> dict:
    answer, chat_request = body.get("generate_response"), body.get("chat_request")
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(chat_request, dict):
        raise StandinError(400, "Fields 'chat_request' and 'generate_response' (with choices) are required")
    messages = chat_request.get("messages")
    if not isinstance(messages, list):
        raise StandinError(400, "Field 'chat_request.messages' is required and must be a list")
    token_ids = choices[0].get("token_ids") or []
    prompt_ids, text, tool, reasoning = standin.decide(messages, chat_request.get("tools") or [],
                                                       chat_request.get("tool_choice"), None,
                                                       chat_request.get("add_generation_prompt", True))
    gen = generate(text, tool, reasoning, None)
    output_ids = gen.output_ids + [end_of_turn_id()]
    if token_ids != output_ids[:len(token_ids)]:
        raise StandinError(400, "the stand-in derenders only what its model generates for this chat request")
    if len(token_ids) < len(output_ids) - 1:  # cut off by max_tokens: the text so far, unparsed
        gen = generate(text, tool, reasoning, len(token_ids))
    chat = responses.chat_completion({"logprobs": False}, gen, prompt_ids, 0, standin.config.model)
    chat["usage"] = answer.get("usage") or chat["usage"]
    return chat


async def handle_pause(request: web.Request, standin: Standin, body: dict | None, entry: dict) -> dict:
    mode = request.query.get("mode", "abort")
    if mode not in PAUSE_MODES:
        raise StandinError(400, f"Invalid mode {mode!r}")
    await standin.pause(mode)
    return {"status": "paused"}


async def handle_resume(request: web.Request, standin: Standin, body: dict | None, entry: dict) -> dict:
    standin.resume()
    return {"status": "resumed"}


async def handle_is_paused(request: web.Request, standin: Standin, body: dict | None, entry: dict) -> dict:
    return {"is_paused": standin.paused}


def _version(body: dict | None, key: str, required: bool) -> str | None:
    version = body.get(key) if isinstance(body, dict) else None
    if (version is not None or required) and not isinstance(version, str):
        raise StandinError(400, f"Field '{key}' must be a string")
    return version


async def handle_update_weight_version(request: web.Request, standin: Standin, body: dict | None, entry: dict) -> dict:
    standin.weight_version = _version(body, "new_version", True)
    return {"success": True, "new_version": standin.weight_version}


async def handle_finish_weight_update(request: web.Request, standin: Standin, body: dict | None, entry: dict) -> dict:
    version = _version(body, "weight_version", False)
    if version is not None:
        standin.weight_version = version
    return {"message": "Weight update finished"}


async def handle_weight_info(request: web.Request, standin: Standin, body: dict | None, entry: dict) -> dict:
    return {"weight_version": standin.weight_version}


SCALE_OUT_ROUTES = [("POST", "/v1/chat/completions/render", handle_render),
                    ("POST", "/inference/v1/generate", handle_generate),
                    ("POST", "/v1/chat/completions/derender", handle_derender)]
DEV_MODE_ROUTES = [("POST", "/pause", handle_pause), ("POST", "/resume", handle_resume),
                   ("GET", "/is_paused", handle_is_paused),
                   ("POST", "/update_weight_version", handle_update_weight_version),
                   ("POST", "/finish_weight_update", handle_finish_weight_update),
                   ("GET", "/weight_info", handle_weight_info)]
