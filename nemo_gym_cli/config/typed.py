"""Typed server config: each server kind declares a dataclass of its fields, checked at startup.

A server class names its config type (`config_type = VLLMModelConfig`). A field's default lives
in exactly one place: the dataclass (one commented line each), unless the YAML that users copy
lists every field with its value (NeMo Gym's environment configs do), in which case the field
has no default in code. `load_config` turns an instance's plain dict into the dataclass and
reports every problem at once, naming the key: a wrong type, a missing field, a typo of a known
field ("did you mean"). Keys that belong to the graph (entrypoint, host, replicas...) or to NeMo
Gym's own config vocabulary are accepted and not handed to the dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from nemo_gym_cli.config.compose import ConfigError
from nemo_gym_cli.config.paths import parse_url_list

# Keys of an instance that the graph reads (or NeMo Gym configs carry), not the server itself.
GRAPH_KEYS = frozenset({
    "entrypoint", "host", "port", "replicas", "restart", "ray_actor_options", "runtime",
    # NeMo Gym's own instance keys (its configs carry them; our kinds accept and ignore them)
    "datasets", "domain", "description", "verified", "verified_url", "license", "value", "num_workers", "name",
})


@dataclasses.dataclass(kw_only=True)
class ServerConfig:
    """Base of every server kind's config (a kind without fields of its own uses it as is)."""


class UrlList(list):
    """One URL, a comma-separated string of URLs, or a list: always a list of stripped URLs."""


@dataclasses.dataclass(kw_only=True)
class ServerRef:
    """Another server of the graph: `{type: resources_servers, name: my_env}`."""

    type: str
    name: str


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(kind))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(kind))
    if kind is type(None):
        return "null"
    if dataclasses.is_dataclass(kind):
        return "a mapping"
    return getattr(origin or kind, "__name__", str(kind))


def _check(value: Any, kind: Any, where: str, problems: list[str]) -> Any:
    """The value converted to `kind` (int -> float only), or a problem naming `where`."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if kind is UrlList:
        if isinstance(value, (str, list)) and parse_url_list(value):
            return UrlList(parse_url_list(value))
        problems.append(f"'{where}' must be a URL, a comma-separated string of URLs or a list of URLs, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(kind):
            sub: list[str] = []
            out = _check(value, option, where, sub)
            if not sub:
                return out
    elif origin is Literal:
        if value in typing.get_args(kind):
            return value
    elif kind is type(None):
        if value is None:
            return None
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is list or kind is list:
        if isinstance(value, list):
            (item,) = typing.get_args(kind) or (Any,)
            return [_check(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    elif origin is dict or kind is dict:
        if isinstance(value, dict):
            return value
    elif dataclasses.is_dataclass(kind):
        if isinstance(value, dict):
            return _build(kind, value, where, problems)
    elif isinstance(kind, type) and isinstance(value, kind):
        return value
    problems.append(f"'{where}' must be {_type_name(kind)}, got {value!r}")
    return value


def _build(cls: type, raw: dict, where: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _check(raw[name], hints[name], f"{where}.{name}", problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"'{where}.{name}' is required but not set")
    for key in raw:
        if key in fields or key in GRAPH_KEYS:
            continue
        hint = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.8)
        if hint:  # a typo of a real field would otherwise be silently ignored
            problems.append(f"'{where}.{key}' is not a field of this server (did you mean '{hint[0]}'?)")
    if problems:
        return None
    return cls(**values)


def url_list_fields(cls: type) -> list[str]:
    """The fields of a config dataclass typed UrlList (e.g. a model adapter's base_url)."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints.get(f.name) is UrlList]


def load_config(cls: type, raw: dict, where: str) -> Any:
    """`raw` (an instance's fields) as a `cls` dataclass; ConfigError lists every problem."""
    problems: list[str] = []
    config = _build(cls, raw, where, problems)
    if problems:
        raise ConfigError(problems)
    return config


def config_problems(cls: type, raw: dict, where: str) -> list[str]:
    try:
        load_config(cls, raw, where)
    except ConfigError as e:
        return e.problems
    return []
