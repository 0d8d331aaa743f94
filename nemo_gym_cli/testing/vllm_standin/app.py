"""The stand-in's HTTP routes (aiohttp): vLLM's OpenAI endpoints plus /standin/* for tests:
/standin/sessions ({session id: requests}), /standin/stats (counters), /standin/requests (the last
requests: route, session, the sampling params a chat or generate call got), and /standin/pause,
/standin/resume (a pause the adapter cannot see: the same engine pause, also without dev mode)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from nemo_gym_cli.serving.protocol import JSON, SESSION_HEADER
from nemo_gym_cli.testing.vllm_standin import responses
from nemo_gym_cli.testing.vllm_standin.engine import Standin, StandinConfig, StandinError
from nemo_gym_cli.testing.vllm_standin.metrics import CONTENT_TYPE, metrics_text
from nemo_gym_cli.testing.vllm_standin.tokenizer import render_prompt, tokenize_text
from nemo_gym_cli.testing.vllm_standin.tokens import (DEV_MODE_ROUTES, SCALE_OUT_ROUTES, handle_pause, handle_resume,
                                                      sampling_params)
from responses_api_models.vllm_model.conversion import responses_to_chat

STANDIN = web.AppKey("standin", Standin)


def error_response(status: int, message: str, err_type: str = "BadRequestError") -> web.Response:
    return web.Response(status=status, body=orjson.dumps(responses.error_body(status, message, err_type)), content_type=JSON)


def json_response(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type=JSON)


async def read_json(request: web.Request) -> dict:
    """The request's JSON object; raises StandinError (400) for what vLLM rejects too."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise StandinError(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise StandinError(400, "Request body must be a JSON object")
    if body.get("stream"):
        raise StandinError(400, "stream=true is not supported by the vLLM stand-in")
    return body


def _begin(request: web.Request, kind: str) -> tuple[Standin, dict]:
    """Count, record the session, log the request: (the stand-in, the request's log entry)."""
    standin = request.app[STANDIN]
    standin.counts[kind] += 1
    session_id = request.headers.get(SESSION_HEADER)
    standin.record_session(session_id)
    return standin, standin.log_request(kind, session_id)


async def handle_chat(request: web.Request) -> web.Response:
    standin, entry = _begin(request, "chat")
    body = await read_json(request)
    entry["sampling_params"] = sampling_params(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise StandinError(400, "Field 'messages' is required and must be a list")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    gen, prompt_ids, cached = await standin.complete(
        messages, body.get("tools") or [], body.get("tool_choice"), max_tokens, body.get("add_generation_prompt", True)
    )
    return json_response(responses.chat_completion(body, gen, prompt_ids, cached, standin.config.model))


def _responses_messages(body: dict) -> list[dict]:
    """Responses input -> chat messages, the way our vLLM adapter converts them."""
    try:
        return responses_to_chat({"input": body["input"], "instructions": body.get("instructions")}, model="")["messages"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StandinError(400, f"Invalid 'input': {exc!r}") from None


async def handle_responses(request: web.Request) -> web.Response:
    standin, _ = _begin(request, "responses")
    body = await read_json(request)
    if "input" not in body:
        raise StandinError(400, "Field 'input' is required")
    messages = _responses_messages(body)
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    tool_choice = body.get("tool_choice", "auto")
    gen, prompt_ids, cached = await standin.complete(messages, tools, tool_choice, body.get("max_output_tokens"))
    return json_response(responses.responses_object(body, tools, tool_choice, gen, prompt_ids, cached, standin.config.model))


async def handle_tokenize(request: web.Request) -> web.Response:
    standin, _ = _begin(request, "tokenize")
    body = await read_json(request)
    if isinstance(body.get("messages"), list):
        # Same rendering as chat completions, so the ids equal the chat call's prompt ids.
        text = render_prompt(body["messages"], body.get("tools") or [], body.get("add_generation_prompt", True))
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    else:
        raise StandinError(400, "Either 'messages' (list) or 'prompt' (string) is required")
    ids = tokenize_text(text)
    return json_response({"count": len(ids), "max_model_len": standin.config.context_length, "tokens": ids, "token_strs": None})


async def handle_health(request: web.Request) -> web.Response:
    return web.Response()


async def handle_models(request: web.Request) -> web.Response:
    return json_response(responses.model_list(request.app[STANDIN].config))


async def handle_metrics(request: web.Request) -> web.Response:
    return web.Response(body=metrics_text(request.app[STANDIN]).encode(), headers={"Content-Type": CONTENT_TYPE})


async def handle_sessions(request: web.Request) -> web.Response:
    return json_response(request.app[STANDIN].sessions)


async def handle_stats(request: web.Request) -> web.Response:
    standin = request.app[STANDIN]
    counts = standin.counts
    return json_response({"requests": counts["chat"] + counts["responses"] + counts["generate"], **counts,
                          "peak_running": standin.peak_running, "aborted": standin.aborted_requests})


async def handle_requests(request: web.Request) -> web.Response:
    return json_response(list(request.app[STANDIN].requests))


def token_route(handler):
    """A render/generate/derender, pause or weight-version route: counted, session-recorded and
    logged like the others (the handler may add to its log entry)."""
    async def handle(request: web.Request) -> web.Response:
        standin, entry = _begin(request, handler.__name__.removeprefix("handle_"))
        body = await read_json(request) if request.method == "POST" and request.can_read_body else None
        return json_response(await handler(request, standin, body, entry))
    return handle


def backdoor(handler):
    """/standin/pause and /standin/resume: the engine's pause, not counted as vLLM API calls."""
    async def handle(request: web.Request) -> web.Response:
        return json_response(await handler(request, request.app[STANDIN], None, {}))
    return handle


@web.middleware
async def vllm_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except StandinError as exc:
        return error_response(exc.status, exc.message, exc.err_type)


def build_app(config: StandinConfig) -> web.Application:
    """The aiohttp app; tests may run it in-process with aiohttp's AppRunner/TestServer."""
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[vllm_errors])  # long multi-turn prompts
    app[STANDIN] = Standin(config)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_post("/v1/chat/completions", handle_chat)
    app.router.add_post("/v1/responses", handle_responses)
    app.router.add_post("/tokenize", handle_tokenize)
    app.router.add_get("/metrics", handle_metrics)
    for method, path, handler in ((SCALE_OUT_ROUTES if config.scale_out else [])
                                  + (DEV_MODE_ROUTES if config.dev_mode else [])):
        app.router.add_route(method, path, token_route(handler))
    app.router.add_get("/standin/sessions", handle_sessions)
    app.router.add_get("/standin/stats", handle_stats)
    app.router.add_get("/standin/requests", handle_requests)
    app.router.add_post("/standin/pause", backdoor(handle_pause))
    app.router.add_post("/standin/resume", backdoor(handle_resume))
    return app
