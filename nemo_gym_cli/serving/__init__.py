"""Serving: the server base class and the three server kinds, the wire protocol, the client.

An environment imports what it needs from here:
`from nemo_gym_cli.serving import SimpleResourcesServer, route, require`.
"""

from nemo_gym_cli.serving.base import BaseServer
from nemo_gym_cli.serving.kinds import ResponsesAPIAgent, ResponsesAPIModel, SimpleResourcesServer
from nemo_gym_cli.serving.protocol import (GROUP_HEADER, SESSION_HEADER, HTTPError, RequestContext, new_session_id,
                                           require, route)

__all__ = [
    "GROUP_HEADER", "SESSION_HEADER", "BaseServer", "HTTPError", "RequestContext", "ResponsesAPIAgent",
    "ResponsesAPIModel", "SimpleResourcesServer", "new_session_id", "require", "route",
]
