"""openai_model: pass-through to an OpenAI-compatible upstream (`/responses`, `/chat/completions`).

Same config keys as vllm_model, so switching between them is changing one config path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_gym_cli.serving import HTTPError, RequestContext, UpstreamConfig, UpstreamModel, check_response, route


@dataclass(kw_only=True)
class OpenAIModelConfig(UpstreamConfig):
    health_interval_s: float = 0  # OpenAI has no /health: only a failed request marks a server down


class OpenAIModel(UpstreamModel):
    config_type = OpenAIModelConfig
    vllm_backends = False  # preflight checks reachability and the model only; no vLLM gauges

    @route("/v1/responses")
    async def responses(self, body: Any, ctx: RequestContext) -> Any:
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object (Responses create params)")
        return await self.upstream.call(ctx, "/responses", {**body, "model": self.model}, check=check_response)
