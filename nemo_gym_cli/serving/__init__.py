"""Serving: the public surface for plug-ins (environments, agents, model adapters).

A plug-in imports only from here:
`from nemo_gym_cli.serving import SimpleResourcesServer, ServerConfig, route, require`.
It gives the server base class and the three server kinds, their config types, the wire
protocol and its one header check (check_header: no CR/LF/NUL), the error of a failed call, the
model-adapter base class and its config, the weight-sync pause helpers (model_adapter/pause.py),
and the helpers every environment needs (the text of the model's answer, a path in the project).
"""

from nemo_gym_cli.config.paths import resolve_path
from nemo_gym_cli.config.typed import ServerConfig, ServerRef
from nemo_gym_cli.serving.base import BaseServer
from nemo_gym_cli.serving.errors import ServerCallError
from nemo_gym_cli.serving.http11 import InvalidRequest, check_header
from nemo_gym_cli.serving.kinds import ResponsesAPIAgent, ResponsesAPIModel, SimpleResourcesServer
from nemo_gym_cli.serving.protocol import (GROUP_HEADER, SESSION_HEADER, HTTPError, RequestContext, content_text,
                                           last_assistant_text, last_message_text, new_session_id, require, route)

# The model-adapter framework (model_adapter/) sits on routing/, which itself speaks this
# package's errors: its names load on first use, so importing either package first works.
_MODEL_ADAPTER = {"UpstreamModel": "server", "UpstreamConfig": "upstream", "check_chat_completion": "server",
                  "check_response": "server", "ABORTED": "pause", "PAUSE_MODES": "pause", "forward_pause": "pause",
                  "wait_until_serving": "pause"}


def __getattr__(name: str):
    if name in _MODEL_ADAPTER:
        import importlib

        return getattr(importlib.import_module(f"nemo_gym_cli.model_adapter.{_MODEL_ADAPTER[name]}"), name)
    raise AttributeError(f"module 'nemo_gym_cli.serving' has no attribute '{name}'")


__all__ = [
    "ABORTED", "GROUP_HEADER", "PAUSE_MODES", "SESSION_HEADER", "BaseServer", "HTTPError", "InvalidRequest",
    "RequestContext", "ResponsesAPIAgent", "ResponsesAPIModel", "ServerCallError", "ServerConfig", "ServerRef",
    "SimpleResourcesServer", "UpstreamConfig", "UpstreamModel", "check_chat_completion", "check_header",
    "check_response", "content_text", "forward_pause", "last_assistant_text", "last_message_text", "new_session_id",
    "require", "resolve_path", "route", "wait_until_serving",
]
