"""Calls from a model adapter to its OpenAI-compatible upstream(s) (vLLM servers, OpenAI).

One Router over the configured base URLs (sticky sessions, load-aware placement, failover,
active health checks); each attempt has a timeout; 429 and 500 are retried on the same backend
with backoff, while refused/reset/timed-out connections and 502/503/504 fail over to another
backend (inference calls are safe to repeat). An answer that is not valid HTTP, not JSON, larger
than `max_answer_bytes` (refused unread when its Content-Length says so), or fails the caller's
check (e.g. a 200 without `choices`) is a MalformedAnswer: never passed on as a success, counted
as `malformed` for that backend, retried on another one; the router marks a backend that keeps
doing it down (RoutingSettings.malformed_answers). With no other backend it fails that request
with a 502 naming the backend.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

import orjson

from nemo_gym_cli.config.secrets import NO_API_KEY
from nemo_gym_cli.config.typed import ServerConfig
from nemo_gym_cli.routing import (UNAVAILABLE_STATUSES, Backend, BackendUnavailable, MalformedAnswer, Router,
                                  RoutingSettings)
from nemo_gym_cli.serving.base import BaseServer
from nemo_gym_cli.serving.errors import UNAVAILABLE_ERRORS, backoff_delay, error_message
from nemo_gym_cli.serving.http11 import BodyCap, ProtocolError
from nemo_gym_cli.serving.protocol import GROUP_HEADER, SESSION_HEADER, HTTPError, RequestContext

RETRY_SAME_BACKEND = frozenset({429, 500})
# A check of a parsed 2xx answer: None if usable, else what is wrong with it.
Check = Callable[[Any], "str | None"]


class UpstreamError(Exception):
    """The upstream answered with an error that is the request's fault (4xx) or persisted (5xx)."""

    def __init__(self, status: int, message: str, backend: str):
        super().__init__(f"{backend}: HTTP {status}: {message}")
        self.status, self.message, self.backend = status, message, backend


def _snippet(raw: bytes) -> str:
    return repr(raw[:120]) + (f"... ({len(raw)} bytes)" if len(raw) > 120 else "")


@dataclass(kw_only=True)
class UpstreamConfig(ServerConfig, RoutingSettings):
    """Where and how a model adapter calls its OpenAI-compatible upstream servers: base_url and
    the routing fields are RoutingSettings (routing/router.py); every default of the others is
    here, one line each."""

    model: str  # the model name the upstream serves (sent in every request)
    api_key: str | None = None  # sent as a Bearer token unless empty or "EMPTY"
    timeout_s: float = 600  # per upstream request
    # An upstream answer (one Chat Completion) larger than this is refused, unread when its Content-Length
    # says so, so a backend sending garbage cannot fill the adapter's memory. 32 MiB holds a 32k-token
    # generation with top-5 logprobs; http_client.max_response_bytes (1 GiB) caps our own servers' answers.
    max_answer_bytes: int = 32 * 1024 * 1024
    max_retries: int = 3  # 429/500 retried on the same backend; refused/reset/timeouts fail over
    preflight_timeout_s: float = 5  # ng_run's check of every backend (all in parallel) takes at most this long


class Upstream:
    """A model adapter's calls to its backends: one Router over the configured URLs."""

    def __init__(self, server: BaseServer):
        cfg: UpstreamConfig = server.config
        self.server = server
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key and cfg.api_key != NO_API_KEY:
            self.headers["Authorization"] = f"Bearer {cfg.api_key}"
        self.timeout_s = cfg.timeout_s
        self.max_retries = cfg.max_retries
        self.answer_cap = BodyCap(cfg.max_answer_bytes, "max_answer_bytes")
        self.router = Router(cfg, probe=lambda url, timeout_s: server.client.health_status(url, timeout_s),  # the requests' client
                             registry=server.registry)

    def start(self) -> None:
        self.router.start()

    async def post(self, path: str, payload: Any, *, session_id: str | None, group_key: str | None = None,
                   at_root: bool = False, check: Check | None = None, deadline: float | None = None) -> tuple[Any, Backend]:
        """POST to `<base_url><path>` (or `<root_url><path>`, e.g. vLLM's /tokenize) of the
        session's backend; returns (parsed JSON, backend). `check` vets a 2xx answer. `deadline`
        (monotonic): each attempt's timeout, and the wait for a backend when all are down, end there
        at the latest (a turn sent again after a weight sync's abort keeps the turn's own timeout)."""
        data = orjson.dumps(payload)
        headers = {**self.headers, SESSION_HEADER: session_id} if session_id else self.headers

        async def attempt(backend: Backend) -> tuple[Any, Backend]:
            url = (backend.root_url if at_root else backend.url) + path
            for retry in range(self.max_retries + 1):
                try:
                    timeout_s = self.timeout_s if deadline is None else max(0.001, min(self.timeout_s, deadline - time.monotonic()))
                    status, raw = await self.server.client.raw_request("POST", url, data, headers, timeout_s,
                                                                       idempotent=True, cap=self.answer_cap)
                except ProtocolError as e:
                    raise MalformedAnswer(f"sent a malformed answer ({e})", backend.url) from None
                except UNAVAILABLE_ERRORS as e:
                    raise BackendUnavailable(f"{type(e).__name__}: {e}".rstrip(": ")) from None
                if status < 400:
                    try:
                        parsed = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        raise MalformedAnswer(f"answered HTTP {status} with a body that is not JSON: {_snippet(raw)}",
                                              backend.url) from None
                    problem = check(parsed) if check is not None else None
                    if problem:
                        raise MalformedAnswer(f"answered HTTP {status} {problem}: {_snippet(raw)}", backend.url)
                    return parsed, backend
                if status in UNAVAILABLE_STATUSES:
                    raise BackendUnavailable(f"HTTP {status}")
                if status not in RETRY_SAME_BACKEND or retry == self.max_retries:
                    try:
                        parsed = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        parsed = None
                    raise UpstreamError(status, error_message(parsed, raw[:500].decode(errors="replace")), backend.url)
                await asyncio.sleep(backoff_delay(retry, self.server.client.backoff_base, self.server.client.backoff_max))  # http_client's
            raise AssertionError("unreachable")

        return await self.router.call(session_id, attempt, group_key=group_key, deadline=deadline)

    async def call(self, ctx: RequestContext, path: str, payload: Any, *, at_root: bool = False,
                   check: Check | None = None) -> Any:
        """post() for a request handler: the session and group of the request, errors as HTTPError
        (the upstream's status and message; 503 when no backend could take it)."""
        return (await self.exchange(ctx, path, payload, at_root=at_root, check=check))[0]

    async def exchange(self, ctx: RequestContext, path: str, payload: Any, *, at_root: bool = False,
                       check: Check | None = None, deadline: float | None = None) -> tuple[Any, Backend]:
        """call(), and the backend that answered (to wait on it when it was paused)."""
        group = ctx.headers.get(GROUP_HEADER) if ctx.headers else None
        name = self.server.name
        try:
            return await self.post(path, payload, session_id=ctx.session_id, group_key=group, at_root=at_root,
                                   check=check, deadline=deadline)
        except BackendUnavailable as e:
            raise HTTPError(503, f"{name}: no upstream server could take the request: {e}", "upstream_unavailable") from None
        except MalformedAnswer as e:
            raise HTTPError(502, f"{name}: upstream {e.backend} {e.message}", "upstream_error") from None
        except UpstreamError as e:
            raise HTTPError(e.status, f"{name}: upstream {e.backend} answered HTTP {e.status}: {e.message}",
                            "upstream_error") from None

    def release(self, session_id: str | None) -> None:
        self.router.release(session_id)

    async def close(self) -> None:
        await self.router.close()
