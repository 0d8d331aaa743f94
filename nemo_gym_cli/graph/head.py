"""The head server: the registry of the graph, living in the ng_run process.

Every replica of every server binds its own port and registers `{name, url, pid, replica,
node, host}` here (no bind-then-close port race); node: the Ray node id, or this host's name
for a local process; host: the address of the machine it runs on, for a Ray actor. Clients
resolve names through `GET /servers`, one entry per replica, labelled as logs name it (`name`,
or `name#i` for one of several: ServerSpec.label). A replica that exits loses its url until it
registers again; a restart (counted in `restarts`) keeps its entry. `GET /config` shows the
resolved config with secrets masked. It is one of our servers: same routing, JSON errors and
/metrics.

It also answers NeMo Gym's head routes, so NeMo Gym's own ng_collect_rollouts runs against our
graph: `GET /global_config_dict_yaml` (the masked config as a YAML string, each server's host and
port from its registration) and `GET /server_instances`.
"""

from __future__ import annotations

import copy
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import yaml

from nemo_gym_cli.config import ServerSpec, mask_secrets
from nemo_gym_cli.config.specs import NEMO_GYM
from nemo_gym_cli.graph.build import RunningServer, serve
from nemo_gym_cli.graph.progress_board import CollectionsBoard
from nemo_gym_cli.serving.head_client import HeadClient
from nemo_gym_cli.serving.base import BaseServer
from nemo_gym_cli.serving.protocol import HTTPError, RequestContext, route

SERVING = ("registered", "ready")  # states in which a replica's url answers


def node_label(entry: dict) -> str:
    """Where a registered replica runs, for tables: its host address and Ray node id, or its node."""
    node, host = entry.get("node") or "-", entry.get("host")
    return f"{host} (node {node[:12]})" if host and host != node else node


class HeadServer(BaseServer):
    def __init__(self, config: dict, specs: dict[str, ServerSpec]):
        super().__init__("head server", {}, global_config=config)
        self.masked_config = mask_secrets(config)
        self.specs = specs
        self.started_at = time.time()
        # probe_path: what answers when it serves, and while it lives (NeMo Gym's servers have no /health, only GET /).
        self.servers: dict[tuple[str, int], dict] = {
            (name, r): {"name": name, "label": s.label(r), "server_type": s.server_type, "impl": s.impl, "replica": r,
                        "url": None, "pid": None, "node": None, "host": None, "state": "starting", "restarts": 0,
                        "runtime": s.runtime, "probe_path": "/" if s.runtime == NEMO_GYM else "/health"}
            for name, s in specs.items() for r in range(s.replicas)
        }
        self.running: RunningServer | None = None
        self.collections = CollectionsBoard()  # progress of running ng_collect_rollouts
        self.url = ""

    @property
    def host_and_port(self) -> tuple[str, int]:
        """Where it listens, from its URL (the port it got when the configured one was 0)."""
        url = urlsplit(self.url)
        return str(url.hostname), int(url.port or 0)

    async def start(self, host: str, port: int) -> str:
        self.running = await serve(self, host, port)
        self.url = self.running.url
        return self.url

    async def stop(self) -> None:
        if self.running is not None:
            await self.running.stop()

    def register(self, name: str, url: str, pid: int, replica: int = 0, node: str | None = None,
                 host: str | None = None) -> dict:
        entry = self.servers.get((name, replica))
        if entry is None:
            raise KeyError(f"{name} replica {replica}")
        restarted = entry["state"] == "restarting"
        if not restarted and entry["pid"] not in (None, pid):
            # Restarted by someone else (e.g. Ray restarts its actors): count it here.
            entry["restarts"] += 1
            restarted = True
        # A first registration becomes "ready" once ng_run's /health probe answers; a restarted
        # replica registers only once it serves, so it is ready at once.
        entry.update(url=url, pid=pid, node=node or socket.gethostname(), host=host,
                     state="ready" if restarted else "registered")
        return entry

    def set_state(self, name: str, replica: int, state: str) -> None:
        entry = self.servers[(name, replica)]
        entry["state"] = state
        if state not in SERVING:
            entry["url"] = None  # clients must not pick a replica that is not there

    def mark_restarting(self, name: str, replica: int) -> None:
        self.set_state(name, replica, "restarting")
        self.servers[(name, replica)]["restarts"] += 1

    @route(HeadClient.HEALTH, "GET")
    async def health(self, body: Any, ctx: RequestContext) -> Any:
        return {"status": "ok", "servers": len({name for name, _ in self.servers})}

    @route(HeadClient.SERVERS, "GET")
    async def list_servers(self, body: Any, ctx: RequestContext) -> Any:
        return list(self.servers.values())

    @route(HeadClient.CONFIG, "GET")
    async def show_config(self, body: Any, ctx: RequestContext) -> Any:
        return self.masked_config

    @route(HeadClient.REGISTER)
    async def register_server(self, body: Any, ctx: RequestContext) -> Any:
        try:
            node, host = body.get("node"), body.get("host")
            self.register(str(body["name"]), str(body["url"]), int(body.get("pid") or 0), int(body.get("replica") or 0),
                          str(node) if node else None, str(host) if host else None)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise HTTPError(400, f"bad registration ({type(e).__name__}: {e}); expected {{name, url, pid, replica, node, host}} "
                                 f"of a configured server replica") from None
        return {}

    @route(HeadClient.PROGRESS)
    async def collection_progress(self, body: Any, ctx: RequestContext) -> Any:
        try:
            self.collections.update(body)
        except ValueError as e:
            raise HTTPError(400, f"bad collection progress: {e}") from None
        return {}

    @route(HeadClient.COLLECTIONS, "GET")
    async def list_collections(self, body: Any, ctx: RequestContext) -> Any:
        return self.collections.list()

    # ------------------------------------------------------------ NeMo Gym's head routes
    def _first_live(self, name: str) -> dict | None:
        return next((e for (n, _), e in self.servers.items() if n == name and e["url"]), None)

    @route(HeadClient.GLOBAL_CONFIG_YAML, "GET")
    async def global_config_dict_yaml(self, body: Any, ctx: RequestContext) -> Any:
        """The masked config as YAML (a JSON string, as NeMo Gym's head answers), with every serving
        server's host and port (its first live replica) and this head server's address."""
        config = copy.deepcopy(self.masked_config)
        for name, spec in self.specs.items():
            entry = self._first_live(name)
            if entry is None or name not in config:
                continue
            url = urlsplit(entry["url"])
            fields = config[name][spec.server_type][spec.impl]
            fields["host"], fields["port"] = url.hostname, url.port
        host, port = self.host_and_port
        config["head_server"] = {**(config.get("head_server") or {}), "host": host, "port": port}
        return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)

    @route(HeadClient.SERVER_INSTANCES, "GET")
    async def server_instances(self, body: Any, ctx: RequestContext) -> Any:
        """NeMo Gym's view of the servers: one entry per replica."""
        out = []
        for (name, _), e in self.servers.items():
            spec = self.specs[name]
            url = urlsplit(e["url"]) if e["url"] else None
            out.append({"process_name": name, "config_path": name, "server_type": e["server_type"], "name": e["impl"],
                        "dir_path": str(spec.folder) if spec.folder else None,
                        "entrypoint": spec.config.get("entrypoint"), "host": url.hostname if url else None,
                        "port": url.port if url else None, "url": e["url"], "pid": e["pid"], "start_time": self.started_at,
                        "status": "success" if e["state"] in SERVING else "connection_error",
                        "uptime_seconds": time.time() - self.started_at, "replica": e["replica"], "runtime": e["runtime"]})
        return out
