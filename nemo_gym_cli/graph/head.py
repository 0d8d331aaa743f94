"""The head server: the registry of the graph, living in the ng_run process.

Children bind their own port and register `{name, url, pid}` here (no bind-then-close port
race); clients resolve names through `GET /servers`. `GET /config` shows the resolved config
with secrets masked. It is one of our servers: same routing, JSON errors and /metrics.
"""

from __future__ import annotations

import time
from typing import Any

from nemo_gym_cli.config import ServerSpec, mask_secrets
from nemo_gym_cli.graph.build import RunningServer, serve
from nemo_gym_cli.graph.collections import CollectionsBoard
from nemo_gym_cli.serving.base import BaseServer
from nemo_gym_cli.serving.protocol import HTTPError, RequestContext, route


class HeadServer(BaseServer):
    def __init__(self, config: dict, specs: dict[str, ServerSpec]):
        super().__init__("head server", {}, global_config=config)
        self.masked_config = mask_secrets(config)
        self.started_at = time.time()
        self.servers: dict[str, dict] = {
            name: {"name": name, "server_type": s.server_type, "impl": s.impl, "url": None, "pid": None, "state": "starting"}
            for name, s in specs.items()
        }
        self.running: RunningServer | None = None
        self.collections = CollectionsBoard()  # progress of running ng_collect_rollouts
        self.url = ""

    async def start(self, host: str, port: int) -> str:
        self.running = await serve(self, host, port)
        self.url = self.running.url
        return self.url

    async def stop(self) -> None:
        if self.running is not None:
            await self.running.stop()

    def register(self, name: str, url: str, pid: int) -> None:
        entry = self.servers.get(name)
        if entry is None:
            raise KeyError(name)
        entry.update(url=url, pid=pid, state="registered")

    def set_state(self, name: str, state: str) -> None:
        self.servers[name]["state"] = state

    @route("/health", "GET")
    async def health(self, body: Any, ctx: RequestContext) -> Any:
        return {"status": "ok", "servers": len(self.servers)}

    @route("/servers", "GET")
    async def list_servers(self, body: Any, ctx: RequestContext) -> Any:
        return list(self.servers.values())

    @route("/config", "GET")
    async def show_config(self, body: Any, ctx: RequestContext) -> Any:
        return self.masked_config

    @route("/register")
    async def register_server(self, body: Any, ctx: RequestContext) -> Any:
        try:
            self.register(str(body["name"]), str(body["url"]), int(body.get("pid") or 0))
        except (KeyError, TypeError, ValueError) as e:
            raise HTTPError(400, f"bad registration ({type(e).__name__}: {e}); expected {{name, url, pid}} of a configured server") from None
        return {}

    @route("/collections/progress")
    async def collection_progress(self, body: Any, ctx: RequestContext) -> Any:
        try:
            self.collections.update(body)
        except ValueError as e:
            raise HTTPError(400, f"bad collection progress: {e}") from None
        return {}

    @route("/collections", "GET")
    async def list_collections(self, body: Any, ctx: RequestContext) -> Any:
        return self.collections.list()
