"""Base classes of the three server types. An environment subclasses one of these in its app.py."""

from __future__ import annotations

from typing import Any

from nemo_gym_cli.serving.base import BaseServer
from nemo_gym_cli.serving.protocol import HTTPError, RequestContext, route


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
