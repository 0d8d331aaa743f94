"""What crosses the wire between our servers: headers, errors, the request context, routes.

Shared by the server base class and the client, so neither imports the other.
"""

from __future__ import annotations

import uuid
from typing import Any

SESSION_HEADER = "X-Session-ID"
GROUP_HEADER = "X-Group-ID"  # the repeats of one prompt: the router may place them together
SESSION_COOKIE = "ng_session_id"  # a plain HTTP client with a cookie jar keeps its session
JSON = "application/json"

class HTTPError(Exception):
    """Raise from a handler to answer with a JSON error: {"error": {"message", "type"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.extra = status, message, type, extra or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, **self.extra}}


class RequestContext:
    __slots__ = ("session_id", "headers", "query")

    def __init__(self, session_id: str | None, headers: Any = None, query: Any = None):
        self.session_id = session_id
        self.headers = headers or {}
        self.query = query or {}  # the URL's query parameters (e.g. /pause?mode=keep)


def content_text(content: Any) -> str:
    """Text of an OpenAI message content: a string, or the "text" of each part of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part if isinstance(part, str) else part["text"]
            for part in content
            if isinstance(part, str) or (isinstance(part, dict) and isinstance(part.get("text"), str))
        )
    return ""


def last_message_text(items: Any, role: str) -> str:
    """The text of the last message with `role` (and any text) among Responses API input or
    output items ("" if none); a plain string input is the user's message."""
    if isinstance(items, str):
        return items if role == "user" else ""
    for item in reversed(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("type", "message") == "message" and item.get("role", "assistant") == role:
            text = content_text(item.get("content"))
            if text:
                return text
    return ""


def last_assistant_text(output: Any) -> str:
    """The model's answer: the text of the last assistant message of a Responses API `output`."""
    return last_message_text(output, "assistant")


def new_session_id() -> str:
    return uuid.uuid4().hex


def route(path: str, method: str = "POST"):
    """Mark a method of a BaseServer subclass as the handler of `METHOD path`."""

    def mark(fn):
        fn._ng_route = (method.upper(), path)
        return fn

    return mark


def require(body: Any, key: str, kind: type | tuple[type, ...] = object, where: str = "request body") -> Any:
    """Edge validation with a clear 400 instead of pydantic."""
    if not isinstance(body, dict):
        raise HTTPError(400, f"{where} must be a JSON object, got {type(body).__name__}")
    if key not in body:
        raise HTTPError(400, f"{where}: missing required field '{key}'")
    value = body[key]
    if kind is not object and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise HTTPError(400, f"{where}: field '{key}' must be {names}, got {type(value).__name__}")
    return value
