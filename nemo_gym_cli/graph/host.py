"""Host servers of the graph in the running event loop: build, serve, register, serve until told
to stop. The body of a child process (child.py) and of any other kind of replica (a Ray actor).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import traceback
from typing import Callable

from nemo_gym_cli.config import head_url, server_specs
from nemo_gym_cli.graph.build import RunningServer, bind_address, build_server, serve
from nemo_gym_cli.serving.base import BaseServer
from nemo_gym_cli.serving.client import ServerClient
from nemo_gym_cli.serving.head_client import HeadClient
from nemo_gym_cli.serving.errors import ServerCallError


async def host_servers(config: dict, names: list[str], replica: int, stop: asyncio.Event, *,
                       bind_host: str | None = None, node: str | None = None, host: str | None = None,
                       advertise_host: str | None = None,
                       on_serving: Callable[[], None] | None = None) -> int:
    """Serve `names` (more than one: co-located, calling each other without HTTP) as `replica`
    until `stop` is set; returns an exit code (1: could not start or register).

    bind_host: the address to bind instead of the configured one (a Ray node's address);
    node: what /servers shows as the replica's node (default: this host's name);
    host: the address of the machine it runs on, shown with the node (a Ray node's address);
    advertise_host: the address others reach it at when it binds every address (0.0.0.0);
    on_serving: called once every server serves and is registered.
    """
    specs = server_specs(config)
    local: dict[str, BaseServer] = {}
    client = ServerClient(config.get("http_client"), head_url(config), local_servers=local if len(names) > 1 else None)
    running: list[RunningServer] = []
    try:
        for name in names:  # build all first: a co-located server may call another from on_startup
            local[name] = build_server(specs[name], config, client)
        for name in names:
            configured_host, port = bind_address(specs[name], config)
            running.append(await serve(local[name], bind_host or configured_host, port))
            if advertise_host and (bind_host or configured_host) in ("0.0.0.0", ""):
                running[-1].url = running[-1].url.replace("//127.0.0.1:", f"//{advertise_host}:")
    except Exception as e:
        # A config mistake or a busy port: one clear line; a bug in the server: its traceback too.
        if not isinstance(e, (ValueError, TypeError, KeyError, OSError)):
            traceback.print_exc()
        spec = specs[name]
        print(f"server '{name}' ({spec.server_type}/{spec.impl}) cannot start: {type(e).__name__}: {e}", file=sys.stderr)
        await _stop(running, client)
        return 1
    node = node or socket.gethostname()
    for name, r in zip(names, running):
        try:
            await HeadClient(client).register({"name": name, "url": r.url, "pid": os.getpid(), "replica": replica, "node": node,
                                             "host": host})
        except ServerCallError as e:
            print(f"server '{name}' cannot register with the head server: {e}", file=sys.stderr)
            await _stop(running, client)
            return 1
        where = f" (replica {replica})" if replica else (" (colocated)" if len(names) > 1 else "")
        local[name].log.info("serving %s/%s at %s%s", specs[name].server_type, specs[name].impl, r.url, where)
    if on_serving is not None:
        on_serving()
    await stop.wait()
    await _stop(running, client)
    return 0


async def _stop(running: list[RunningServer], client: ServerClient) -> None:
    for r in running:
        await r.stop()
    await client.close()
