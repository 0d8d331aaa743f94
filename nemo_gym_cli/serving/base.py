"""The server base class: every box of the graph is one of these.

A subclass declares routes with `@route("/path")`; a handler takes the parsed JSON body and a
RequestContext and returns JSON-compatible data (or raises HTTPError). The same handler is
served over HTTP by aiohttp and called directly by a client in the same process (local
dispatch), so both paths behave the same. Everything generic lives here: /health, /metrics,
orjson bodies, JSON errors without tracebacks, the session id of the request.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Awaitable, Callable, ClassVar

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nemo_gym_cli.config.paths import base_defaults
from nemo_gym_cli.config.typed import ServerConfig, load_config
from nemo_gym_cli.serving.protocol import JSON, SESSION_COOKIE, SESSION_HEADER, HTTPError, RequestContext, new_session_id

_COOKIE_VALUE = re.compile(r"[A-Za-z0-9._~+/=-]{1,256}")  # RFC 6265 cookie-octets we echo back
disable_created_metrics()  # the *_created series are noise in every scrape

Handler = Callable[[Any, RequestContext], Awaitable[Any]]


class BaseServer:
    server_type: ClassVar[str] = ""
    config_type: ClassVar[type] = ServerConfig  # a kind with fields of its own names its dataclass here

    def __init__(self, name: str, config: dict, *, global_config: dict | None = None, client: Any = None,
                 config_where: str | None = None):
        self.name = name
        self.config = load_config(self.config_type, config, config_where or name)
        self.global_config = global_config or {}
        self.client = client
        self.log = logging.getLogger(f"nemo_gym.{name}")
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("ng_server_requests", "Requests handled", ["route", "status"], registry=self.registry)
        self._latency = Histogram("ng_server_request_seconds", "Handler latency", ["route"], registry=self.registry,
                                  buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60, 600))
        self.routes: dict[tuple[str, str], Handler] = {("GET", "/health"): self.health}
        for cls in reversed(type(self).__mro__):
            for attr, fn in vars(cls).items():
                if hasattr(fn, "_ng_route"):
                    self.routes[fn._ng_route] = getattr(self, attr)
        self._route_metrics = {key: (self._latency.labels(key[1]), {}) for key in self.routes}

    # ------------------------------------------------------------ lifecycle hooks
    async def on_startup(self) -> None:
        """Open connections, load data. Called before the server takes requests."""

    async def on_shutdown(self) -> None:
        """Close what on_startup opened."""

    async def health(self, body: Any, ctx: RequestContext) -> Any:
        return {"status": "ok", "name": self.name}

    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------ local dispatch
    async def dispatch(self, method: str, path: str, body: Any, session_id: str | None, headers: dict | None = None) -> Any:
        """Call a handler without HTTP. Raises HTTPError exactly as the HTTP path answers."""
        handler = self.routes.get((method, path))
        if handler is None:
            raise HTTPError(404 if not any(p == path for _, p in self.routes) else 405,
                            f"{self.name}: no route {method} {path}", "not_found")
        t0 = time.perf_counter()
        status = 200
        try:
            return await handler(body, RequestContext(session_id, headers))
        except HTTPError as e:
            status = e.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            self._observe((method, path), status, time.perf_counter() - t0)

    def _observe(self, key: tuple[str, str], status: int, seconds: float) -> None:
        hist, counters = self._route_metrics[key]
        hist.observe(seconds)
        counter = counters.get(status)
        if counter is None:
            counter = counters[status] = self._requests.labels(key[1], str(status))
        counter.inc()

    # ------------------------------------------------------------ HTTP
    def make_app(self) -> web.Application:
        # A request may be as large as an answer our clients accept: http_client.max_response_bytes.
        cap = self.client.max_response_bytes if self.client is not None else base_defaults()["http_client"]["max_response_bytes"]
        app = web.Application(client_max_size=cap)
        for (method, path), handler in self.routes.items():
            app.router.add_route(method, path, self._http_handler((method, path), handler))
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    def _http_handler(self, key: tuple[str, str], handler: Handler):
        async def handle(request: web.Request) -> web.StreamResponse:
            t0 = time.perf_counter()
            session_id = request.headers.get(SESSION_HEADER) or request.cookies.get(SESSION_COOKIE)
            if session_id is None:
                session_id = new_session_id()
            try:
                raw = await request.read()
                try:
                    body = orjson.loads(raw) if raw else {}
                except orjson.JSONDecodeError as e:
                    raise HTTPError(400, f"request body is not valid JSON: {e}") from None
                result = await handler(body, RequestContext(session_id, request.headers, request.query))
                response = web.Response(body=orjson.dumps(result), content_type=JSON)
            except HTTPError as e:
                response = web.Response(status=e.status, body=orjson.dumps(e.body()), content_type=JSON)
            except Exception as e:  # full traceback in our log, never to the client
                self.log.exception("%s %s failed", request.method, request.path)
                err = HTTPError(500, f"{self.name}: {type(e).__name__}: {e}", "server_error")
                response = web.Response(status=500, body=orjson.dumps(err.body()), content_type=JSON)
            # On every answer, not only when minted: a client that keeps only the last answer's
            # cookies (NeMo Gym's agents) keeps its session. A plain string: http.cookies' Morsel
            # formatting costs more than the request. (An X-Session-ID that is not a cookie value
            # is not echoed: it would not make a valid header.)
            if (session_id.isascii() and session_id.isalnum()) or _COOKIE_VALUE.fullmatch(session_id):
                response.headers["Set-Cookie"] = f"{SESSION_COOKIE}={session_id}; HttpOnly; Path=/"
            self._observe(key, response.status, time.perf_counter() - t0)
            return response

        return handle

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics_text(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _not_found(self, request: web.Request) -> web.Response:
        known = sorted({p for _, p in self.routes} | {"/metrics"})
        status = 405 if request.path in known else 404
        err = HTTPError(status, f"{self.name}: no route {request.method} {request.path} (routes: {', '.join(known)})", "not_found")
        return web.Response(status=status, body=orjson.dumps(err.body()), content_type=JSON)
