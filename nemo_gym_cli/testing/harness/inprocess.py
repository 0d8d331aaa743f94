"""One of our servers served in the test's own event loop, on a free port (no ng_run needed)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import AsyncIterator

from nemo_gym_cli.config import ServerSpec
from nemo_gym_cli.graph.build import load_server_class, serve
from nemo_gym_cli.serving.base import BaseServer
from nemo_gym_cli.serving.client import ServerClient


@contextlib.asynccontextmanager
async def served(server: BaseServer) -> AsyncIterator[tuple[str, ServerClient]]:
    """Yields (the server's URL, a client without retries); stops both afterwards.

        async with served(SimpleWeatherResourcesServer("simple_weather", {})) as (url, client):
            await client.request_json("POST", url + "/verify", row)
    """
    running = await serve(server, "127.0.0.1", 0)
    client = ServerClient({"max_retries": 0})
    try:
        yield running.url, client
    finally:
        await client.close()
        await running.stop()


def load_environment(folder: str | Path) -> type[BaseServer]:
    """The server class in `<folder>/app.py` (e.g. `.../resources_servers/my_env`, in this project or
    anywhere else), imported as ng_run imports it: as `resources_servers.my_env.app`."""
    folder = Path(folder).resolve()
    return load_server_class(ServerSpec(folder.name, folder.parent.name, folder.name, {}, folder))
