"""The head server: the registry of the graph, living in the ng_run process.

Children bind their own port and register `{name, url}` here (no bind-then-close port race);
clients resolve names through `GET /servers`. `GET /config` shows the resolved config with
secrets masked.
"""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from nemo_gym_cli.config import ServerSpec, mask_secrets
from nemo_gym_cli.server import JSON


class HeadServer:
    def __init__(self, config: dict, specs: dict[str, ServerSpec]):
        self.masked_config = mask_secrets(config)
        self.started_at = time.time()
        self.servers: dict[str, dict] = {
            name: {"name": name, "server_type": s.server_type, "impl": s.impl, "url": None, "pid": None, "state": "starting"}
            for name, s in specs.items()
        }
        self.runner: web.AppRunner | None = None
        self.url = ""

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/servers", self._servers)
        app.router.add_get("/config", self._config)
        app.router.add_post("/register", self._register)
        return app

    async def start(self, host: str, port: int) -> str:
        self.runner = web.AppRunner(self.make_app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        bound = self.runner.addresses[0][1]
        self.url = f"http://{host}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def register(self, name: str, url: str, pid: int) -> None:
        entry = self.servers.get(name)
        if entry is None:
            raise KeyError(name)
        entry.update(url=url, pid=pid, state="registered")

    def set_state(self, name: str, state: str) -> None:
        self.servers[name]["state"] = state

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"status": "ok", "servers": len(self.servers)}), content_type=JSON)

    async def _servers(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(list(self.servers.values())), content_type=JSON)

    async def _config(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.masked_config), content_type=JSON)

    async def _register(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            self.register(str(body["name"]), str(body["url"]), int(body.get("pid") or 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            err = {"error": {"message": f"bad registration ({type(e).__name__}: {e}); expected {{name, url, pid}} of a configured server", "type": "invalid_request_error"}}
            return web.Response(status=400, body=orjson.dumps(err), content_type=JSON)
        return web.Response(body=b"{}", content_type=JSON)
