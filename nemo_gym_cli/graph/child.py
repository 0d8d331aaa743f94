"""Servers of the graph in a process of their own (started and supervised by ng_run).

python -m nemo_gym_cli.graph.child CONFIG_JSON INSTANCE_NAME [REPLICA]   one replica of one server
python -m nemo_gym_cli.graph.child CONFIG_JSON --colocated [NAME ...]    these servers (default: all), one process

CONFIG_JSON is a file, or `-`: read from stdin (as ng_run passes it, so that the config with its
secrets is never written to disk).

Binds its own port (0 unless configured), registers {name, url, pid, replica, node} with the
head server, serves until SIGTERM/SIGINT, then shuts down cleanly (host.py does the work).
"""

from __future__ import annotations

import asyncio
import signal
import sys

import orjson

from nemo_gym_cli.config import secret_values, server_specs
from nemo_gym_cli.graph.build import COLOCATED_ARG, STDIN_ARG
from nemo_gym_cli.graph.host import host_servers
from nemo_gym_cli.serving.logs import setup_logging
from nemo_gym_cli.serving.runtime import run_async


async def main_async(config: dict, names: list[str], replica: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stop_on_signals() -> None:  # once serving; before that a signal ends the process at once
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    return await host_servers(config, names, replica, stop, on_serving=stop_on_signals)


def main() -> None:
    config_path, target = sys.argv[1], sys.argv[2]
    if config_path == STDIN_ARG:
        config = orjson.loads(sys.stdin.buffer.read())
    else:
        with open(config_path, "rb") as f:
            config = orjson.loads(f.read())
    if target == COLOCATED_ARG:
        names, replica = sys.argv[3:] or list(server_specs(config)), 0
    else:
        names, replica = [target], int(sys.argv[3]) if len(sys.argv) > 3 else 0
    setup_logging(secrets=secret_values(config))
    sys.exit(run_async(main_async(config, names, replica)))


if __name__ == "__main__":
    main()
