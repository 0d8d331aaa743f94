"""openai_model: pass-through to an OpenAI-compatible upstream (`/responses`, `/chat/completions`).

Same config keys as vllm_model, so switching between them is changing one config path.
"""

from __future__ import annotations

from typing import Any

from nemo_gym_cli.server import HTTPError, RequestContext, route
from nemo_gym_cli.servers import ResponsesAPIModel
from nemo_gym_cli.upstream import Upstream


class OpenAIModel(ResponsesAPIModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model = str(self.config_field("model", str))
        self.upstream = Upstream(self)

    async def on_shutdown(self) -> None:
        await self.upstream.close()

    @route("/v1/responses")
    async def responses(self, body: Any, ctx: RequestContext) -> Any:
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object (Responses create params)")
        return await self.upstream.call(ctx, "/responses", {**body, "model": self.model})

    @route("/v1/chat/completions")
    async def chat_completions(self, body: Any, ctx: RequestContext) -> Any:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise HTTPError(400, "request body must be Chat Completions params with a 'messages' list")
        return await self.upstream.call(ctx, "/chat/completions", {**body, "model": self.model})

    @route("/release_session")
    async def release_session(self, body: Any, ctx: RequestContext) -> Any:
        self.upstream.release(ctx.session_id)
        return {}
