"""Servers of the graph in a process of their own (started and supervised by ng_run).

python -m nemo_gym_cli.graph.child CONFIG_JSON INSTANCE_NAME [REPLICA]   one replica of one server
python -m nemo_gym_cli.graph.child CONFIG_JSON --colocated               every server, one process

Binds its own port (0 unless configured), registers {name, url, pid, replica, node} with the
head server, serves until SIGTERM/SIGINT, then shuts down cleanly. Co-located servers call
each other without HTTP (local dispatch).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import traceback

import orjson

from nemo_gym_cli.config import head_url, secret_values, server_specs
from nemo_gym_cli.graph.build import COLOCATED_ARG, RunningServer, bind_address, build_server, serve
from nemo_gym_cli.serving.base import BaseServer
from nemo_gym_cli.serving.client import ServerCallError, ServerClient
from nemo_gym_cli.serving.logs import setup_logging
from nemo_gym_cli.serving.runtime import run_async

async def main_async(config: dict, names: list[str], replica: int) -> int:
    specs = server_specs(config)
    local: dict[str, BaseServer] = {}
    client = ServerClient(config.get("http_client"), head_url(config), local_servers=local if len(names) > 1 else None)
    running: list[RunningServer] = []
    try:
        for name in names:  # build all first: a co-located server may call another from on_startup
            local[name] = build_server(specs[name], config, client)
        for name in names:
            running.append(await serve(local[name], *bind_address(specs[name], config)))
    except Exception as e:
        # A config mistake or a busy port: one clear line; a bug in the server: its traceback too.
        if not isinstance(e, (ValueError, TypeError, KeyError, OSError)):
            traceback.print_exc()
        spec = specs[name]
        print(f"server '{name}' ({spec.server_type}/{spec.impl}) cannot start: {type(e).__name__}: {e}", file=sys.stderr)
        for r in running:
            await r.stop()
        await client.close()
        return 1
    node = socket.gethostname()
    for name, r in zip(names, running):
        try:
            await client.request_json("POST", f"{client.head_url}/register",
                                      {"name": name, "url": r.url, "pid": os.getpid(), "replica": replica, "node": node},
                                      server="head server", timeout_s=10)
        except ServerCallError as e:
            print(f"server '{name}' cannot register with the head server: {e}", file=sys.stderr)
            return 1
        where = f" (replica {replica})" if replica else (" (colocated)" if len(names) > 1 else "")
        local[name].log.info("serving %s/%s at %s%s", specs[name].server_type, specs[name].impl, r.url, where)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for r in running:
        await r.stop()
    await client.close()
    return 0


def main() -> None:
    config_path, target = sys.argv[1], sys.argv[2]
    with open(config_path, "rb") as f:
        config = orjson.loads(f.read())
    names = list(server_specs(config)) if target == COLOCATED_ARG else [target]
    replica = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    setup_logging(secrets=secret_values(config))
    sys.exit(run_async(main_async(config, names, replica)))


if __name__ == "__main__":
    main()
