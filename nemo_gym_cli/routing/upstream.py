"""Calls from a model adapter to its OpenAI-compatible upstream(s) (vLLM servers, OpenAI).

One Router over the configured base URLs (sticky sessions, load-aware placement, failover);
each attempt has a timeout; 429 and 500 are retried on the same backend with backoff, while
refused/reset/timed-out connections and 502/503/504 fail over to another backend.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson

from nemo_gym_cli.serving.client import backoff_delay, error_message
from nemo_gym_cli.config.typed import ServerConfig, UrlList
from nemo_gym_cli.routing import UNAVAILABLE_STATUSES, Backend, BackendUnavailable, Router
from nemo_gym_cli.serving.base import BaseServer
from nemo_gym_cli.serving.protocol import GROUP_HEADER, SESSION_HEADER, HTTPError, RequestContext

CONNECTION_FAILURES = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError)
RETRY_SAME_BACKEND = frozenset({429, 500})


class UpstreamError(Exception):
    """The upstream answered with an error that is the request's fault (4xx) or persisted (5xx)."""

    def __init__(self, status: int, message: str, backend: str):
        super().__init__(f"{backend}: HTTP {status}: {message}")
        self.status, self.message, self.backend = status, message, backend


@dataclass(kw_only=True)
class UpstreamConfig(ServerConfig):
    """Where and how a model adapter calls its OpenAI-compatible upstream servers. Every default
    of these fields is here, one line each."""

    base_url: UrlList  # one URL, a comma-separated string of URLs, or a list: one backend each
    model: str  # the model name the upstream serves (sent in every request)
    api_key: str | None = None  # sent as a Bearer token unless empty or "EMPTY"
    timeout_s: float = 600  # per upstream request
    max_retries: int = 3  # 429/500 retried on the same backend; refused/reset/timeouts fail over
    routing_policy: Literal["least_loaded", "round_robin", "hash"] = "least_loaded"  # new sessions; all sticky
    group_affinity: bool = True  # the repeats of one prompt on one backend while load allows
    group_affinity_slack: int = 4  # ...unless that backend has this many more in flight than the least loaded
    session_ttl_s: float = 1800  # a session idle this long is forgotten
    max_sessions: int = 100_000  # sessions remembered at most (least recently used go first)
    probe_interval_s: float = 0.5  # a backend marked down is probed on /health this often
    wait_for_backend_s: float = 30  # with every backend down, a request waits this long for one
    preflight_timeout_s: float = 5  # ng_run's check of every backend (all in parallel) takes at most this long


class Upstream:
    """A model adapter's calls to its backends: one Router over the configured URLs."""

    def __init__(self, server: BaseServer):
        cfg: UpstreamConfig = server.config
        self.server = server
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key and cfg.api_key != "EMPTY":
            self.headers["Authorization"] = f"Bearer {cfg.api_key}"
        self.timeout_s = cfg.timeout_s
        self.max_retries = cfg.max_retries
        self.router = Router(
            cfg.base_url,
            policy=cfg.routing_policy,
            session_ttl_s=cfg.session_ttl_s,
            max_sessions=cfg.max_sessions,
            group_affinity=cfg.group_affinity,
            group_affinity_slack=cfg.group_affinity_slack,
            probe_interval_s=cfg.probe_interval_s,
            wait_for_backend_s=cfg.wait_for_backend_s,
            http_session=lambda: server.client.http,
            registry=server.registry,
        )

    async def post(self, path: str, payload: Any, *, session_id: str | None, group_key: str | None = None,
                   at_root: bool = False) -> tuple[Any, Backend]:
        """POST to `<base_url><path>` (or `<root_url><path>`, e.g. vLLM's /tokenize) of the
        session's backend; returns (parsed JSON, backend)."""
        data = orjson.dumps(payload)
        headers = {**self.headers, SESSION_HEADER: session_id} if session_id else self.headers

        async def attempt(backend: Backend) -> tuple[Any, Backend]:
            url = (backend.root_url if at_root else backend.url) + path
            for retry in range(self.max_retries + 1):
                try:
                    status, raw = await self.server.client.raw_request("POST", url, data, headers, self.timeout_s)
                except CONNECTION_FAILURES as e:
                    raise BackendUnavailable(f"{type(e).__name__}: {e}".rstrip(": ")) from None
                if status < 400:
                    return orjson.loads(raw), backend
                if status in UNAVAILABLE_STATUSES:
                    raise BackendUnavailable(f"HTTP {status}")
                if status not in RETRY_SAME_BACKEND or retry == self.max_retries:
                    try:
                        parsed = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        parsed = None
                    raise UpstreamError(status, error_message(parsed, raw[:500].decode(errors="replace")), backend.url)
                await asyncio.sleep(backoff_delay(retry, 0.25, 4.0))
            raise AssertionError("unreachable")

        return await self.router.call(session_id, attempt, group_key=group_key)

    async def call(self, ctx: RequestContext, path: str, payload: Any, *, at_root: bool = False) -> Any:
        """post() for a request handler: the session and group of the request, errors as HTTPError
        (the upstream's status and message; 503 when no backend could take it)."""
        group = ctx.headers.get(GROUP_HEADER) if ctx.headers else None
        name = self.server.name
        try:
            data, _ = await self.post(path, payload, session_id=ctx.session_id, group_key=group, at_root=at_root)
            return data
        except BackendUnavailable as e:
            raise HTTPError(503, f"{name}: no upstream server could take the request: {e}", "upstream_unavailable") from None
        except UpstreamError as e:
            raise HTTPError(e.status, f"{name}: upstream {e.backend} answered HTTP {e.status}: {e.message}",
                            "upstream_error") from None

    def release(self, session_id: str | None) -> None:
        self.router.release(session_id)

    async def close(self) -> None:
        await self.router.close()
