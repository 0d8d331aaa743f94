"""The server graph in a config: instances `{name: {server_type: {impl: {...}}}}`, and their checks."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_gym_cli.config.nemo_gym import (INSTALL_HINT, config_file_tree, imports_nemo_gym, nemo_gym_problems,
                                          nemo_gym_python, nemo_gym_roots)
from nemo_gym_cli.config.paths import PROJECT_ROOT, base_defaults, search_roots

MODEL_SERVERS, RESOURCES_SERVERS, AGENT_SERVERS = "responses_api_models", "resources_servers", "responses_api_agents"
SERVER_TYPES = (MODEL_SERVERS, RESOURCES_SERVERS, AGENT_SERVERS)
RESTART_POLICIES = ("on-failure", "never")
# Which code serves an instance: ours (a BaseServer subclass, in this Python) or NeMo Gym's own
# server (its FastAPI app, unmodified, in the Python of `nemo_gym.python`); see locate_impl.
OURS, NEMO_GYM = "ours", "nemo_gym"
RUNTIMES = (OURS, NEMO_GYM)


@dataclass
class ServerSpec:
    name: str  # instance name, e.g. policy_model
    server_type: str  # responses_api_models | resources_servers | responses_api_agents
    impl: str  # folder name, e.g. vllm_model
    config: dict  # the fields under <impl>
    folder: Path | None = None  # resolved impl folder
    runtime: str = OURS  # OURS | NEMO_GYM (locate_impl)

    @property
    def where(self) -> str:
        """The instance's key path, as errors name it: `policy_model.responses_api_models.vllm_model`."""
        return f"{self.name}.{self.server_type}.{self.impl}"

    @property
    def module(self) -> str:
        return f"{self.server_type}.{self.impl}.{Path(self.config.get('entrypoint', 'app.py')).stem}"

    @property
    def replicas(self) -> int:
        """How many processes serve this instance (`replicas: N`, default 1; checked by validate_servers)."""
        value = self.config.get("replicas", 1)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1

    def label(self, replica: int) -> str:
        """How logs and reports name one replica: `env`, or `env#1` when it has several."""
        return self.name if self.replicas == 1 else f"{self.name}#{replica}"

    @property
    def restart(self) -> str:
        """`on-failure` (default): ng_run restarts it when it crashes; `never`: a crash stops the graph."""
        return str(self.config.get("restart", "on-failure"))


def _looks_like_server(value: Any) -> bool:
    """{<type>: {<impl>: {...}}}: one key, whose value is one dict of dicts."""
    return (
        isinstance(value, dict)
        and len(value) == 1
        and isinstance(next(iter(value.values())), dict)
        and len(next(iter(value.values()))) == 1
        and isinstance(next(iter(next(iter(value.values())).values())), dict)
    )


def server_specs(config: dict, sources: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, ServerSpec]:
    """Every server instance of the config; `sources` (top-level key -> config file) lets a NeMo
    Gym server be found in the tree of the config file that names it."""
    specs = {}
    nemo_roots = None
    for name, value in config.items():
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SERVER_TYPES:
            server_type, impls = next(iter(value.items()))
            if isinstance(impls, dict) and len(impls) == 1:
                impl, fields = next(iter(impls.items()))
                if isinstance(fields, dict):
                    if nemo_roots is None:
                        nemo_roots = nemo_gym_roots(config)
                    runtime, folder = locate_impl(server_type, impl, fields, cwd=cwd, nemo_roots=nemo_roots,
                                                  config_file=(sources or {}).get(name))
                    specs[name] = ServerSpec(name, server_type, impl, fields, folder, runtime)
    return specs


def locate_impl(server_type: str, impl: str, fields: dict, *, cwd: Path | None = None, nemo_roots: list[Path] = (),
                config_file: str | None = None) -> tuple[str, Path | None]:
    """(runtime, folder) of `<server_type>/<impl>`, looked up in the current folder, our project,
    the NeMo Gym tree, then the tree of the config file naming it. A folder of our project is
    ours; one in the current folder is ours unless its entrypoint imports nemo_gym; one found
    only in a NeMo Gym tree (or a config file's) is NeMo Gym's. `runtime:` on the instance
    forces either (nemo_gym skips our project's folder of the same name)."""
    forced = fields.get("runtime")
    entrypoint = str(fields.get("entrypoint", "app.py"))
    if forced != NEMO_GYM:
        for root in search_roots(cwd):
            folder = root / server_type / impl
            if folder.is_dir():
                nemo = forced != OURS and root.resolve() != PROJECT_ROOT and imports_nemo_gym(folder / entrypoint)
                return (NEMO_GYM if nemo else OURS), folder
        if forced == OURS:
            return OURS, None
    roots = [r for r in search_roots(cwd) if r.resolve() != PROJECT_ROOT] if forced == NEMO_GYM else []
    tree = config_file_tree(config_file, server_type, impl)
    for root in [*roots, *nemo_roots, *([tree] if tree else [])]:
        folder = root / server_type / impl
        if folder.is_dir():
            return NEMO_GYM, folder
    return (NEMO_GYM if forced == NEMO_GYM else OURS), None


def _iter_refs(obj: Any, path: str):
    if isinstance(obj, dict):
        if set(obj.keys()) == {"type", "name"} and obj.get("type") in SERVER_TYPES:
            yield path, obj["type"], obj["name"]
            return
        if "type" in obj and "name" in obj and obj.get("type") in SERVER_TYPES:
            yield path, obj["type"], obj["name"]
        for k, v in obj.items():
            yield from _iter_refs(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _iter_refs(v, f"{path}[{i}]")


def validate_servers(config: dict, sources: dict[str, str], cwd: Path | None = None) -> list[str]:
    problems = nemo_gym_problems(config)
    specs = server_specs(config, sources, cwd)
    nemo_roots = nemo_gym_roots(config)
    for name, value in config.items():
        if name in specs or not _looks_like_server(value):
            continue
        server_type = next(iter(value))
        if server_type not in SERVER_TYPES:
            hint = difflib.get_close_matches(server_type, SERVER_TYPES, n=1)
            problems.append(
                f"{sources.get(name, 'config')}: '{name}': unknown server type '{server_type}'"
                + (f" (did you mean '{hint[0]}'?)" if hint else f" (known: {', '.join(SERVER_TYPES)})")
            )
    for name, spec in specs.items():
        where = sources.get(name, "config")
        key = f"{name}.{spec.server_type}.{spec.impl}"
        folder = spec.folder
        if spec.config.get("runtime", OURS) not in RUNTIMES:
            problems.append(f"{where}: '{key}.runtime' must be one of {', '.join(RUNTIMES)}, got {spec.config['runtime']!r}")
        if folder is None:
            roots = [*search_roots(cwd), *nemo_roots]
            folders = [r / spec.server_type for r in roots if (r / spec.server_type).is_dir()]
            existing = sorted({p.name for d in folders for p in d.iterdir() if p.is_dir() and not p.name.startswith("_")})
            hint = difflib.get_close_matches(spec.impl, existing, n=1)
            problems.append(
                f"{where}: '{key}': no folder '{spec.server_type}/{spec.impl}'"
                + (f" (did you mean '{hint[0]}'?)" if hint else f" (available: {', '.join(existing) or 'none'})")
                + ("" if nemo_gym_python(config) else f"; if it is a NeMo Gym server, {INSTALL_HINT}")
            )
        elif "entrypoint" not in spec.config:
            problems.append(f"{where}: '{key}': missing 'entrypoint' (e.g. entrypoint: app.py)")
        elif not (folder / str(spec.config["entrypoint"])).is_file():
            problems.append(f"{where}: '{key}.entrypoint': file '{folder / str(spec.config['entrypoint'])}' not found")
        problems.extend(_check_scaling(config, spec, where, key))
        if spec.runtime == NEMO_GYM:
            problems.extend(_check_nemo_gym(config, specs, spec, where, key))
        for path, ref_type, ref_name in _iter_refs(spec.config, key):
            target = specs.get(ref_name)
            if target is not None and target.server_type == ref_type:
                continue
            same_type = sorted(n for n, s in specs.items() if s.server_type == ref_type)
            hint = difflib.get_close_matches(str(ref_name), same_type, n=1)
            msg = f"{where}: '{path}' refers to {ref_type} server '{ref_name}', which is not in the config"
            if target is not None:
                msg += f" ('{ref_name}' is a {target.server_type} server)"
            elif hint:
                msg += f" (did you mean '{hint[0]}'?)"
            else:
                msg += f" (defined {ref_type} servers: {', '.join(same_type) or 'none'}; did you forget a config path?)"
            problems.append(msg)
    return problems


def _check_scaling(config: dict, spec: ServerSpec, where: str, key: str) -> list[str]:
    """`replicas` and `restart` of one instance."""
    problems = []
    replicas = spec.config.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        problems.append(f"{where}: '{key}.replicas' must be an integer >= 1, got {replicas!r}")
    elif replicas > 1 and config.get("colocate"):
        problems.append(f"{where}: '{key}.replicas' is {replicas}, but +colocate=true runs every server once, in one "
                        f"process: drop +colocate=true to run replicas (one process each), or set replicas: 1")
    elif replicas > 1 and spec.config.get("port"):
        problems.append(f"{where}: '{key}.port' is {spec.config['port']}, but its {replicas} replicas cannot share one "
                        f"port: remove 'port' (each replica binds a free one and registers it)")
    if spec.restart not in RESTART_POLICIES:
        problems.append(f"{where}: '{key}.restart' must be one of {', '.join(RESTART_POLICIES)}, got {spec.config.get('restart')!r}")
    return problems


def _check_nemo_gym(config: dict, specs: dict[str, ServerSpec], spec: ServerSpec, where: str, key: str) -> list[str]:
    """A NeMo Gym server: a Python to run it, one process, and one address for each server it calls."""
    problems = []
    if spec.folder is not None and not nemo_gym_python(config):
        problems.append(f"{where}: '{key}' is a NeMo Gym server ({spec.folder}), which runs in a Python with "
                        f"nemo-gym installed: {INSTALL_HINT}")
    if spec.config.get("replicas", 1) != 1:
        problems.append(f"{where}: '{key}.replicas': a NeMo Gym server runs as one process at one host:port "
                        f"(its own `num_workers` runs more workers behind it)")
    for path, _, ref_name in _iter_refs(spec.config, key):
        target = specs.get(ref_name)
        if target is not None and target.replicas > 1:
            problems.append(f"{where}: '{path}': NeMo Gym servers call one host:port, but '{ref_name}' has "
                            f"{target.replicas} replicas: set replicas: 1 on '{ref_name}'")
    return problems


def head_address(config: dict) -> tuple[str, int]:
    """Where the head server of the graph listens: `head_server` of the config, else the default
    in conf/base.yaml (the one place for it)."""
    head = config.get("head_server") or base_defaults()["head_server"]
    return str(head["host"]), int(head["port"])


def head_url(config: dict) -> str:
    host, port = head_address(config)
    return f"http://{host}:{port}"
