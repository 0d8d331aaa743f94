"""The error and retry vocabulary of calls between servers and to model backends: which
failures mean "unavailable", which were never sent, which statuses are worth another try, the
error a failed call raises, and the backoff between tries. serving/client.py, routing/ and the
model adapters all speak it."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp

from nemo_gym_cli.serving.http11 import NotSent

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Error types our servers give when *their* upstream failed after their own retries: retrying
# here too would multiply the tries at every hop (agent -> judge env -> judge model -> vLLM).
ALREADY_RETRIED = frozenset({"upstream_error", "upstream_unavailable"})
# "The server is unavailable": refused, reset, timed out, or closed mid-answer. One tuple for
# every caller: server calls here, a model adapter's calls to its backends and their /health probes.
UNAVAILABLE_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError)
# The request never reached the server: safe to send again, whatever it is.
NOT_SENT_ERRORS = (NotSent, aiohttp.ClientConnectorError)
# Answers that say the server did not process the request.
NOT_PROCESSED_STATUSES = frozenset({429})


class ServerCallError(Exception):
    """A call that failed after its last try; names the server, URL and cause.

    `failure` says how a connection failed: "refused", "not_sent", "reset", "timeout", "gone" (the replica
    holding the call's session went away), "frozen" (the replica stopped answering /health),
    "unavailable" (no replica came back in time) or
    "other"; None for an HTTP error status."""

    def __init__(self, server: str, url: str, message: str, status: int | None = None, error_type: str | None = None,
                 failure: str | None = None):
        self.server, self.url, self.status, self.message, self.error_type = server, url, status, message, error_type
        self.failure = failure
        what = f"HTTP {status}" if status else "connection failed"
        super().__init__(f"{server} ({url}): {what}: {message}")


def failure_kind(e: BaseException) -> str:
    """How a connection failed: refused (nothing listens), not_sent (could not connect otherwise),
    reset (closed under the call), timeout, other."""
    if isinstance(e, NOT_SENT_ERRORS):
        cause = e.__cause__ if isinstance(e, NotSent) else e.os_error
        return "refused" if isinstance(cause, ConnectionRefusedError) else "not_sent"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, aiohttp.ServerDisconnectedError)):
        return "reset"
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    return "other"


def error_message(data: Any, fallback: str) -> str:
    """The message of an OpenAI/vLLM/our `{"error": {...}}` body, or of vLLM's older `{"message"}`."""
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if data.get("message"):
            return str(data["message"])
        if data.get("detail"):
            return str(data["detail"])
    return fallback


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    return random.uniform(0, min(cap, base * (2**attempt)))
