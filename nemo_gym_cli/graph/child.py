"""One server of the graph in its own process (started by ng_run).

python -m nemo_gym_cli.graph.child CONFIG_JSON INSTANCE_NAME

Binds its own port (0 unless configured), registers {name, url, pid} with the head server,
serves until SIGTERM/SIGINT, then shuts down cleanly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import orjson

from nemo_gym_cli.serving.client import ServerClient
from nemo_gym_cli.config import head_url, secret_values, server_specs
from nemo_gym_cli.graph.build import bind_address, build_server, serve
from nemo_gym_cli.serving.logs import setup_logging
from nemo_gym_cli.serving.runtime import run_async


async def main_async(config: dict, name: str) -> int:
    spec = server_specs(config)[name]
    client = ServerClient(config.get("http_client"), head_url(config))
    host, port = bind_address(spec, config)
    try:
        server = build_server(spec, config, client)
        running = await serve(server, host, port)
    except (ValueError, TypeError, KeyError, OSError) as e:  # ConfigError is a ValueError
        # A config mistake or a busy port: one clear line, not a traceback.
        print(f"server '{name}' ({spec.server_type}/{spec.impl}) cannot start: {type(e).__name__}: {e}", file=sys.stderr)
        await client.close()
        return 1
    await client.request_json("POST", f"{client.head_url}/register",
                              {"name": name, "url": running.url, "pid": os.getpid()}, server="head server", timeout_s=10)
    server.log.info("serving %s/%s at %s", spec.server_type, spec.impl, running.url)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()
    await client.close()
    return 0


def main() -> None:
    config_path, name = sys.argv[1], sys.argv[2]
    with open(config_path, "rb") as f:
        config = orjson.loads(f.read())
    setup_logging(secrets=secret_values(config))
    sys.exit(run_async(main_async(config, name)))


if __name__ == "__main__":
    main()
