"""Where relative paths and env.yaml are looked for: the current directory, then the project root."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
CONF_DIR = PROJECT_ROOT / "conf"

def resolve_path(path: str | os.PathLike, *, cwd: Path | None = None, extra_roots: list[Path] = ()) -> Path | None:
    """Relative paths resolve against the current directory first, then the project root, then
    `extra_roots` (the NeMo Gym tree of `nemo_gym.python`, where one is configured)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    for base in (cwd or Path.cwd(), PROJECT_ROOT, *extra_roots):
        if (base / p).exists():
            return (base / p).resolve()
    return None


def search_roots(cwd: Path | None = None) -> list[Path]:
    roots = [cwd or Path.cwd(), PROJECT_ROOT]
    return [r for i, r in enumerate(roots) if r.resolve() not in [x.resolve() for x in roots[:i]]]


def parse_url_list(value: Any) -> list[str]:
    """`"http://a/v1, http://b/v1"` or a list -> list of URLs (whitespace stripped)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [u.strip() for u in value.split(",") if u.strip()]
    return [str(u).strip() for u in value if str(u).strip()]


def conf_files(name: str) -> list[Path]:
    """conf/<name>.yaml, after the conf files its `defaults:` list names (as Hydra's defaults list:
    `defaults: [collection]` is conf/collection.yaml), lowest first: a value shared by two commands
    lives in one file."""
    path = CONF_DIR / f"{name}.yaml"
    with open(path, "rb") as f:
        includes = (yaml.safe_load(f) or {}).get("defaults") or []
    return [*(p for inc in includes for p in conf_files(str(inc))), path]


@functools.cache
def conf_defaults(name: str) -> dict:
    """conf/<name>.yaml (with its `defaults:`) as plain data, for code that runs without a composed
    config: the one place for its defaults."""
    merged: dict = {}
    for path in conf_files(name):
        with open(path, "rb") as f:
            merged.update(yaml.safe_load(f) or {})
    merged.pop("defaults", None)
    return merged


def base_defaults() -> dict:
    """conf/base.yaml: the defaults every command shares (head_server, http_client)."""
    return conf_defaults("base")
