"""The base of model adapters over OpenAI-compatible upstream servers (vllm_model, openai_model)."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from nemo_gym_cli.model_adapter.backends_report import backends_report
from nemo_gym_cli.model_adapter.backend_checks import preflight as check_backends
from nemo_gym_cli.model_adapter.pause import ABORTED, wait_until_serving
from nemo_gym_cli.model_adapter.upstream import Upstream, UpstreamConfig
from nemo_gym_cli.serving.kinds import ResponsesAPIModel
from nemo_gym_cli.serving.protocol import HTTPError, RequestContext, route


def check_chat_completion(answer: Any) -> str | None:
    """A Chat Completion we can use has a non-empty `choices` list whose first item has a `message`."""
    if not isinstance(answer, dict):
        return f"with JSON that is not an object ({type(answer).__name__})"
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        return "without 'choices'" if choices is None else "with an empty or invalid 'choices'"
    first = choices[0]
    if not isinstance(first, dict) or not isinstance(first.get("message"), dict):
        return "without choices[0].message"
    return None


def check_response(answer: Any) -> str | None:
    """A Responses API answer we can use is an object with an `output` list."""
    if not isinstance(answer, dict) or not isinstance(answer.get("output"), list):
        return "without an 'output' list"
    return None


class UpstreamModel(ResponsesAPIModel):
    """A model adapter over OpenAI-compatible upstream servers (`base_url`, `api_key`, `model`):
    Chat Completions pass through with session routing; /release_session frees the pin.
    /preflight (ng_run calls it once) checks every backend; /backends is the live view of them."""

    vllm_backends: ClassVar[bool] = True  # False: no /metrics to read (OpenAI)

    config_type = UpstreamConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model = self.config.model
        self.upstream = Upstream(self)

    async def on_startup(self) -> None:
        self.upstream.start()  # the backends' health checks

    async def on_shutdown(self) -> None:
        await self.upstream.close()

    @route("/v1/chat/completions")
    async def chat_completions(self, body: Any, ctx: RequestContext) -> Any:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise HTTPError(400, "request body must be Chat Completions params with a 'messages' list")
        return await self.chat_until_finished(ctx, {**body, "model": self.model})

    async def chat_until_finished(self, ctx: RequestContext, chat_params: dict) -> dict:
        """One Chat Completions call. A weight sync's abort (200, `finish_reason: "abort"`, partial
        text) is no answer: once its backend serves again (bounded by timeout_s) it runs again."""
        deadline = time.monotonic() + self.config.timeout_s
        aborts = 0
        while True:
            chat, backend = await self.upstream.exchange(ctx, "/chat/completions", chat_params, check=check_chat_completion,
                                                         deadline=deadline)
            if chat["choices"][0].get("finish_reason") != ABORTED:
                return chat
            await wait_until_serving(self.client, backend, self.upstream.headers, attempt=aborts, deadline=deadline,
                                     what=self.name)
            aborts += 1

    @route("/release_session")
    async def release_session(self, body: Any, ctx: RequestContext) -> Any:
        """Body `{"session_ids": [...]}` (a batch, from the agent) or the request's own session."""
        ids = body.get("session_ids") if isinstance(body, dict) else None
        for session_id in ids if isinstance(ids, list) else [ctx.session_id]:
            self.upstream.release(session_id)
        return {}

    @route("/preflight")
    async def preflight(self, body: Any, ctx: RequestContext) -> Any:
        return await check_backends(self.upstream, self.model, vllm=self.vllm_backends,
                                    timeout_s=self.config.preflight_timeout_s,
                                    token_exact=getattr(self.config, "token_exact", False))

    @route("/backends", "GET")
    async def backends(self, body: Any, ctx: RequestContext) -> Any:
        return await backends_report(self.upstream, self.model, vllm=self.vllm_backends)
