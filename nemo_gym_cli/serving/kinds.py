"""Base classes of the three server types. An environment subclasses one of these in its app.py."""

from __future__ import annotations

from typing import Any

from nemo_gym_cli.serving.base import BaseServer
from nemo_gym_cli.serving.protocol import HTTPError, RequestContext, route


def _not_implemented(server: BaseServer, path: str) -> HTTPError:
    return HTTPError(501, f"{server.name}: {path} is not implemented", "server_error")


class SimpleResourcesServer(BaseServer):
    """Tools are routes (`@route("/get_weather")`); /seed_session starts an episode, /verify scores it."""

    @route("/seed_session")
    async def seed_session(self, body: Any, ctx: RequestContext) -> Any:
        return {}

    @route("/verify")
    async def verify(self, body: Any, ctx: RequestContext) -> Any:
        raise _not_implemented(self, "/verify")


class _ServesResponses(BaseServer):
    """What a model and an agent both serve: the OpenAI Responses API."""

    @route("/v1/responses")
    async def responses(self, body: Any, ctx: RequestContext) -> Any:
        raise _not_implemented(self, "/v1/responses")


class ResponsesAPIModel(_ServesResponses):
    """A policy or judge model: OpenAI Responses and Chat Completions over some backend."""

    @route("/v1/chat/completions")
    async def chat_completions(self, body: Any, ctx: RequestContext) -> Any:
        raise _not_implemented(self, "/v1/chat/completions")

    @route("/release_session")
    async def release_session(self, body: Any, ctx: RequestContext) -> Any:
        """Rollouts ended: forget their sessions (`{"session_ids": [...]}`), if pinned anywhere."""
        return {}


class ResponsesAPIAgent(_ServesResponses):
    """Runs episodes: /v1/responses (one episode) and /run (seed, episode, verify)."""

    @route("/run")
    async def run(self, body: Any, ctx: RequestContext) -> Any:
        raise _not_implemented(self, "/run")
