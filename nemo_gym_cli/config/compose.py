"""Config composition: conf/ defaults < config_paths files < env.yaml < CLI overrides.

We use Hydra's override *grammar* (so `+k=v`, `++k=v`, `~k`, lists and dicts parse exactly as
NeMo Gym users type them) but not `@hydra.main`: no outputs/ folder, no chdir, no logging
takeover, and `+k=v` works whether or not a default for `k` exists. The result is a plain,
resolved dict: servers read it without OmegaConf on the hot path.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

from nemo_gym_cli.config.nemo_gym import INSTALL_HINT, NemoGymUnavailable, nemo_gym_tree, python_from_layers
from nemo_gym_cli.config.paths import CONF_DIR, conf_files, resolve_path, search_roots
from nemo_gym_cli.config.secrets import mask_secrets
from nemo_gym_cli.config.specs import ServerSpec, server_specs, validate_servers


class ConfigError(ValueError):
    """Every problem found in a config, reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))

    def render(self) -> str:
        lines = [f"Config error{'s' if len(self.problems) > 1 else ''} ({len(self.problems)}):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


# ---------------------------------------------------------------- CLI overrides


@dataclass
class Override:
    kind: str  # "set" | "delete"
    key: str
    value: Any
    text: str


def parse_overrides(args: list[str]) -> list[Override]:
    """Parse Hydra override syntax. A comma is part of the value (we never multirun)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, OverrideType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out, problems = [], []
    for arg in args:
        try:
            ov = parser.parse_override(arg)
        except HydraException as e:
            problems.append(f"command line: cannot parse '{arg}': {str(e).splitlines()[0]}")
            continue
        if ov.type == OverrideType.DEL:
            out.append(Override("delete", ov.key_or_group, None, arg))
            continue
        value = ov.value()
        if isinstance(value, ChoiceSweep):
            if not value.simple_form:
                problems.append(f"command line: '{arg}': sweeps are not supported (we never multirun)")
                continue
            value = arg.split("=", 1)[1]  # `a,b` is one string, e.g. comma-separated URLs
        elif ov.is_sweep_override():
            problems.append(f"command line: '{arg}': sweeps are not supported (we never multirun)")
            continue
        out.append(Override("set", ov.key_or_group, value, arg))
    if problems:
        raise ConfigError(problems)
    return out


# ---------------------------------------------------------------- YAML files


def load_yaml(path: Path, what: str) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"{what} {where}: YAML syntax error: {problem}"]) from None
    except OSError as e:
        raise ConfigError([f"{what} {path}: cannot read: {e.strerror}"]) from None
    if cfg is None:
        return OmegaConf.create({})
    if not isinstance(cfg, DictConfig):
        raise ConfigError([f"{what} {path}: expected a mapping at the top level, got a {type(cfg).__name__}"])
    return cfg


def _as_path_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, ListConfig)):
        return [str(v) for v in value]
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    raise ConfigError([f"{where}: config_paths must be a list of paths, got {value!r}"])


def _load_config_paths(paths: list[str], cwd: Path, problems: list[str], nemo_python: str | None = None) -> list[tuple[Path, DictConfig]]:
    """Each file's own config_paths are loaded before it, so the including file wins. A relative
    path is looked for in the current folder, our project, then the NeMo Gym tree of `nemo_python`."""
    loaded: list[tuple[Path, DictConfig]] = []
    seen: set[Path] = set()
    extra_roots: list[Path] = []
    if nemo_python:
        try:
            extra_roots.append(nemo_gym_tree(nemo_python))
        except NemoGymUnavailable:
            pass  # reported by validate_servers

    def visit(raw: str, included_from: str, stack: tuple[Path, ...]) -> None:
        path = resolve_path(raw, cwd=cwd, extra_roots=extra_roots)
        if path is None:
            roots = [*search_roots(cwd), *extra_roots]
            looked = ", ".join(str(r / raw) for r in roots) if not Path(raw).is_absolute() else raw
            hint = "" if nemo_python else f"; if it is a NeMo Gym config, {INSTALL_HINT}"
            problems.append(f"{included_from}: config path '{raw}' not found (looked in: {looked}){hint}")
            return
        if path in stack:
            problems.append(f"{included_from}: config path '{raw}' includes itself (cycle)")
            return
        if path in seen:
            return
        seen.add(path)
        try:
            cfg = load_yaml(path, "config file")
        except ConfigError as e:
            problems.extend(e.problems)
            return
        nested = cfg.pop("config_paths", None) if "config_paths" in cfg else None
        try:
            for sub in _as_path_list(nested, f"{path}: config_paths"):
                visit(sub, f"{path}: config_paths", stack + (path,))
        except ConfigError as e:
            problems.extend(e.problems)
        loaded.append((path, cfg))

    for raw in paths:
        visit(raw, "config_paths", ())
    return loaded


def find_env_yaml(cwd: Path, roots: list[Path] | None = None) -> Path | None:
    """The first env.yaml in `roots` (default: the current directory, then the project root)."""
    for root in search_roots(cwd) if roots is None else roots:
        if (root / "env.yaml").is_file():
            return root / "env.yaml"
    return None


# ---------------------------------------------------------------- composition


@dataclass
class Composed:
    config: dict  # resolved, plain data, secrets intact
    sources: dict[str, str] = field(default_factory=dict)  # top-level key -> where it was set last
    env_yaml: Path | None = None
    cwd: Path | None = None

    @property
    def servers(self) -> dict[str, ServerSpec]:
        return server_specs(self.config, self.sources, self.cwd)


def compose(
    args: list[str],
    *,
    command: str,
    cwd: Path | None = None,
    strict_cli: bool = False,
    validate: bool = True,
    env_yaml_roots: list[Path] | None = None,
) -> Composed:
    """Compose, resolve and (optionally) validate. Raises ConfigError listing every problem.

    env_yaml_roots: where env.yaml is looked for (default: cwd, then the project root); tests
    pass their own directory so a developer's env.yaml at the project root cannot leak in.
    strict_cli: a command-line key must already be known (from conf/ defaults, env.yaml or
    config files): `+concurency=10` is then an error with "did you mean", never ignored.
    """
    cwd = cwd or Path.cwd()
    problems: list[str] = []
    overrides = parse_overrides(args)

    layers: list[tuple[str, DictConfig]] = []
    for name in ("base", command):
        for path in conf_files(name) if (CONF_DIR / f"{name}.yaml").is_file() else []:
            layer = load_yaml(path, "defaults")
            layer.pop("defaults", None)  # the files it builds on, loaded just before it
            layers.append((f"conf/{path.name}", layer))

    env_path = find_env_yaml(cwd, env_yaml_roots)
    env_cfg = load_yaml(env_path, "env file") if env_path else OmegaConf.create({})

    # config_paths: the command line wins, then env.yaml, then defaults.
    paths: Any = None
    for ov in overrides:
        if ov.kind == "set" and ov.key == "config_paths":
            paths = ov.value
    if paths is None and "config_paths" in env_cfg:
        paths = env_cfg.config_paths
    if paths is None:
        for _, layer in layers:
            if "config_paths" in layer:
                paths = layer.config_paths
    path_list = _as_path_list(OmegaConf.to_container(paths) if isinstance(paths, ListConfig) else paths, "config_paths")
    nemo_python = python_from_layers(overrides, env_cfg, *(layer for _, layer in reversed(layers)))
    for path, cfg in _load_config_paths(path_list, cwd, problems, nemo_python):
        layers.append((str(path), cfg))
    if env_path:
        layers.append((str(env_path), env_cfg))

    merged = OmegaConf.create({})
    sources: dict[str, str] = {}
    for where, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            problems.append(f"{where}: cannot merge: {e}")
        for key in layer.keys():
            sources[str(key)] = where
    merged["config_paths"] = path_list

    allowed_cli_keys = set(merged.keys()) | {"config_paths"} if strict_cli else None
    for ov in overrides:
        top = ov.key.split(".")[0]
        if allowed_cli_keys is not None and top not in allowed_cli_keys:
            hint = difflib.get_close_matches(top, sorted(allowed_cli_keys), n=1)
            problems.append(
                f"command line: unknown option '{ov.text}'"
                + (f" (did you mean '+{hint[0]}'?)" if hint else f" (known: {', '.join(sorted(allowed_cli_keys))})")
            )
            continue
        if ov.key == "config_paths":
            continue
        try:
            if ov.kind == "delete":
                _delete_key(merged, ov.key)
            else:
                OmegaConf.update(merged, ov.key, ov.value, merge=True, force_add=True)
        except (OmegaConfBaseException, KeyError) as e:
            problems.append(f"command line: cannot apply '{ov.text}': {e}")
        sources[top] = "command line"

    resolved = _resolve_all(merged, sources, problems)
    composed = Composed(resolved, sources, env_path, cwd)
    if validate:  # every problem at once, even with earlier ones
        problems.extend(validate_servers(resolved, sources, cwd))
    if problems:
        raise ConfigError(problems)
    return composed


def _delete_key(cfg: DictConfig, dotted: str) -> None:
    parent_key, _, leaf = dotted.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if parent is None or leaf not in parent:
        raise KeyError(f"'{dotted}' is not set")
    del parent[leaf]


def _how_to_set(key: str) -> str:
    return f"set it in env.yaml ({key}: ...) or on the command line (+{key}=...)"


def _resolve_all(cfg: DictConfig, sources: dict[str, str], problems: list[str]) -> dict:
    """Resolve every value, collecting every missing one (`???` or an unset ${key}) at once."""

    def where(path: str) -> str:
        return sources.get(path.split(".")[0], "config")

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, DictConfig):
            out = {}
            for key in node.keys():
                sub = f"{path}.{key}" if path else str(key)
                try:
                    child = node._get_node(key)
                    if child._is_missing():
                        top = sub.split(".")[0]
                        hint = f"; {_how_to_set(sub)}" if top == sub else ""
                        problems.append(f"{where(sub)}: '{sub}' is required but not set (???){hint}")
                        continue
                    if child._is_interpolation():
                        value = node[key]
                        out[key] = walk(value, sub) if isinstance(value, (DictConfig, ListConfig)) else value
                    else:
                        out[key] = walk(child, sub)
                except MissingMandatoryValue as e:
                    missing = _missing_key_from(e) or sub
                    problems.append(f"{where(sub)}: '{sub}' needs '{missing}', which is not set; {_how_to_set(missing)}")
                except InterpolationResolutionError as e:
                    missing = _missing_key_from(e)
                    if missing:
                        problems.append(f"{where(sub)}: '{sub}' uses ${{{missing}}}, which is not set; {_how_to_set(missing)}")
                    else:
                        problems.append(f"{where(sub)}: '{sub}': {str(e).splitlines()[0]}")
            return out
        if isinstance(node, ListConfig):
            out_list = []
            for i in range(len(node)):
                try:
                    value = node[i]
                except OmegaConfBaseException as e:
                    problems.append(f"{where(path)}: '{path}[{i}]': {str(e).splitlines()[0]}")
                    continue
                out_list.append(walk(value, f"{path}[{i}]") if isinstance(value, (DictConfig, ListConfig)) else value)
            return out_list
        if hasattr(node, "_value"):
            return node._value()
        return node

    return walk(cfg, "")


def _missing_key_from(e: Exception) -> str | None:
    import re

    m = re.search(r"Interpolation key '([^']+)' not found", str(e))
    if m:
        return m.group(1)
    m = re.search(r"Missing mandatory value: ?([\w.]+)", str(e))
    return m.group(1) if m else None


def dump_yaml(config: dict) -> str:
    return yaml.safe_dump(mask_secrets(config), sort_keys=False, default_flow_style=False, allow_unicode=True)
