"""The head server's routes, spelled once: graph/head.py serves these paths and every caller goes
through HeadClient (children register, clients find servers by name, collections publish their
progress, ng_status and the collectors read the lists and the config)."""

from __future__ import annotations

from typing import Any

from nemo_gym_cli.serving.errors import ServerCallError


class HeadClient:
    HEALTH = "/health"
    SERVERS = "/servers"  # every replica: name, label, url, pid, replica, node, host, server_type, ...
    CONFIG = "/config"  # the graph's config, secrets masked
    REGISTER = "/register"  # a child's replica, once it serves
    COLLECTIONS = "/collections"  # the running collections' progress, for ng_status
    PROGRESS = "/collections/progress"  # one collection's numbers, posted about once a second
    GLOBAL_CONFIG_YAML = "/global_config_dict_yaml"  # NeMo Gym's route: the config with each server's host and port
    SERVER_INSTANCES = "/server_instances"  # NeMo Gym's route: one entry per replica
    # A command's lookups when it starts (the config, the agents): a short wait and one retry.
    LOOKUP_TIMEOUT_S, LOOKUP_RETRIES = 5, 1

    def __init__(self, client: Any, head_url: str | None = None):
        """`client`: a ServerClient (its timeouts, retries and pools); `head_url`: its own by default."""
        self.client = client
        self.url = (head_url or client.head_url or "").rstrip("/") or None

    async def _call(self, method: str, path: str, body: Any = None, *, timeout_s: float, retries: int | None = None) -> Any:
        if not self.url:
            raise ServerCallError("head server", "(none)", "no head server address configured")
        return await self.client.request_json(method, self.url + path, body, server="head server", timeout_s=timeout_s,
                                              retries=retries)

    async def health(self, timeout_s: float, retries: int | None = 0) -> dict:
        return await self._call("GET", self.HEALTH, timeout_s=timeout_s, retries=retries)

    async def servers(self, timeout_s: float = 10, retries: int | None = None) -> list[dict]:
        return await self._call("GET", self.SERVERS, timeout_s=timeout_s, retries=retries)

    async def config(self, timeout_s: float = LOOKUP_TIMEOUT_S, retries: int | None = LOOKUP_RETRIES) -> dict:
        return await self._call("GET", self.CONFIG, timeout_s=timeout_s, retries=retries)

    async def register(self, entry: dict, timeout_s: float = 10) -> None:
        await self._call("POST", self.REGISTER, entry, timeout_s=timeout_s)

    async def collections(self, timeout_s: float, retries: int | None = 0) -> list[dict]:
        return await self._call("GET", self.COLLECTIONS, timeout_s=timeout_s, retries=retries)

    async def publish_progress(self, body: dict, timeout_s: float, retries: int | None = 0) -> None:
        await self._call("POST", self.PROGRESS, body, timeout_s=timeout_s, retries=retries)
