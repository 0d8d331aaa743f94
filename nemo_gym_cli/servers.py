"""Base classes of the three server types. An environment subclasses one of these in its app.py."""

from __future__ import annotations

from typing import Any

from nemo_gym_cli.server import BaseServer, HTTPError, RequestContext, route
from nemo_gym_cli.upstream import Upstream


class SimpleResourcesServer(BaseServer):
    """Tools are routes (`@route("/get_weather")`); /seed_session starts an episode, /verify scores it."""

    @route("/seed_session")
    async def seed_session(self, body: Any, ctx: RequestContext) -> Any:
        return {}

    @route("/verify")
    async def verify(self, body: Any, ctx: RequestContext) -> Any:
        raise HTTPError(501, f"{self.name}: /verify is not implemented", "server_error")


class ResponsesAPIModel(BaseServer):
    """A policy or judge model: OpenAI Responses and Chat Completions over some backend."""

    @route("/v1/responses")
    async def responses(self, body: Any, ctx: RequestContext) -> Any:
        raise HTTPError(501, f"{self.name}: /v1/responses is not implemented", "server_error")

    @route("/v1/chat/completions")
    async def chat_completions(self, body: Any, ctx: RequestContext) -> Any:
        raise HTTPError(501, f"{self.name}: /v1/chat/completions is not implemented", "server_error")

    @route("/release_session")
    async def release_session(self, body: Any, ctx: RequestContext) -> Any:
        """Rollouts ended: forget their sessions (`{"session_ids": [...]}`), if pinned anywhere."""
        return {}


class ResponsesAPIAgent(BaseServer):
    """Runs episodes: /v1/responses (one episode) and /run (seed, episode, verify)."""

    @route("/v1/responses")
    async def responses(self, body: Any, ctx: RequestContext) -> Any:
        raise HTTPError(501, f"{self.name}: /v1/responses is not implemented", "server_error")

    @route("/run")
    async def run(self, body: Any, ctx: RequestContext) -> Any:
        raise HTTPError(501, f"{self.name}: /run is not implemented", "server_error")


class UpstreamModel(ResponsesAPIModel):
    """A model adapter over OpenAI-compatible upstream servers (`base_url`, `api_key`, `model`):
    Chat Completions pass through with session routing; /release_session frees the pin."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model = str(self.config_field("model", str))
        self.upstream = Upstream(self)

    async def on_shutdown(self) -> None:
        await self.upstream.close()

    @route("/v1/chat/completions")
    async def chat_completions(self, body: Any, ctx: RequestContext) -> Any:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise HTTPError(400, "request body must be Chat Completions params with a 'messages' list")
        return await self.upstream.call(ctx, "/chat/completions", {**body, "model": self.model})

    @route("/release_session")
    async def release_session(self, body: Any, ctx: RequestContext) -> Any:
        """Body `{"session_ids": [...]}` (a batch, from the agent) or the request's own session."""
        ids = body.get("session_ids") if isinstance(body, dict) else None
        for session_id in ids if isinstance(ids, list) else [ctx.session_id]:
            self.upstream.release(session_id)
        return {}
