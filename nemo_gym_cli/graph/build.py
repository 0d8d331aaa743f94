"""Build server instances from their specs and serve them on their own ports."""

from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass

from aiohttp import web

from nemo_gym_cli.serving.client import ServerClient
from nemo_gym_cli.config import ServerSpec
from nemo_gym_cli.config.specs import OURS
from nemo_gym_cli.config.paths import parse_url_list
from nemo_gym_cli.config.typed import config_problems as typed_config_problems
from nemo_gym_cli.config.typed import url_list_fields
from nemo_gym_cli.serving.base import BaseServer

# `python -m nemo_gym_cli.graph.child CONFIG_JSON --colocated`: every server in that one process.
COLOCATED_ARG = "--colocated"
# ... CONFIG_JSON `-`: the config comes on stdin (ng_run never writes it, with its secrets, to disk).
STDIN_ARG = "-"


def load_server_class(spec: ServerSpec) -> type[BaseServer]:
    """The BaseServer subclass defined in `<server_type>/<impl>/<entrypoint>`."""
    if spec.folder is not None:
        # A user's own environment folder (e.g. ./resources_servers/my_env) joins the package,
        # ahead of the project's folders, as config validation found it (cwd first).
        package = importlib.import_module(spec.server_type)
        type_dir = str(spec.folder.parent)
        if type_dir not in package.__path__:  # (a namespace package's __path__ has no insert)
            package.__path__ = [type_dir, *[p for p in package.__path__ if p != type_dir]]
    module = importlib.import_module(spec.module)
    classes = [
        obj for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, BaseServer) and obj.__module__ == module.__name__ and not inspect.isabstract(obj)
    ]
    if len(classes) != 1:
        names = ", ".join(c.__name__ for c in classes) or "none"
        raise TypeError(f"{spec.module}: expected exactly one BaseServer subclass, found {names}")
    return classes[0]


def config_problems(specs: dict[str, ServerSpec], sources: dict[str, str]) -> list[str]:
    """Every instance's fields checked against its server kind's config dataclass, all at once.
    (NeMo Gym's servers check their own, with pydantic, in their own Python.)"""
    problems = []
    for spec in specs.values():
        if spec.runtime != OURS:
            continue
        where = sources.get(spec.name, "config")
        try:
            cls = load_server_class(spec)
        except Exception as e:  # an import error in the user's app.py: name it, go on
            problems.append(f"{where}: '{spec.where}': cannot load {spec.module}: {type(e).__name__}: {e}")
            continue
        problems += [f"{where}: {p}" for p in typed_config_problems(cls.config_type, spec.config, spec.where)]
    return problems


def as_the_servers_read_it(config: dict, specs: dict[str, ServerSpec]) -> dict:
    """The config with each URL-list field (`base_url: "http://a/v1,http://b/v1"`) shown as the URLs
    its server uses: a list when there are several, the one URL otherwise (what ng_dump_config prints).
    A server whose class does not load is shown as written (ng_run names that problem)."""
    shown = copy.deepcopy(config)
    for spec in specs.values():
        if spec.runtime != OURS:
            continue
        try:
            names = url_list_fields(load_server_class(spec).config_type)
        except Exception:  # noqa: BLE001 - reported by config_problems, not here
            continue
        fields = shown[spec.name][spec.server_type][spec.impl]
        for name in names:
            urls = parse_url_list(fields.get(name)) if isinstance(fields.get(name), (str, list)) else []
            if urls:
                fields[name] = urls if len(urls) > 1 else urls[0]
    return shown


def build_server(spec: ServerSpec, global_config: dict, client: ServerClient) -> BaseServer:
    cls = load_server_class(spec)
    server = cls(spec.name, spec.config, global_config=global_config, client=client, config_where=spec.where)
    server.server_type = spec.server_type
    return server


def bind_address(spec: ServerSpec, global_config: dict) -> tuple[str, int]:
    host = spec.config.get("host") or global_config["default_host"]  # its default: conf/base.yaml
    return str(host), int(spec.config.get("port") or 0)


@dataclass
class RunningServer:
    server: BaseServer
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.server.on_shutdown()


LISTEN_BACKLOG = 4096  # pending connections per listening socket (a burst of rollouts connects at once)


async def serve(server: BaseServer, host: str, port: int) -> RunningServer:
    """Start the server's hooks and bind its port (0 = any free port); returns its URL."""
    await server.on_startup()
    runner = web.AppRunner(server.make_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
    await site.start()
    bound = runner.addresses[0][1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return RunningServer(server, runner, f"http://{shown}:{bound}")
