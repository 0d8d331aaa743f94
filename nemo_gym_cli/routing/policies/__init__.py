"""Routing policies, one per file, picked by name from config."""

from __future__ import annotations

from .base import Policy
from .hash import Hash
from .least_loaded import LeastLoaded
from .round_robin import RoundRobin

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LeastLoaded, RoundRobin, Hash)}


def make_policy(name: str) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        valid = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown routing policy {name!r}; valid policies: {valid}") from None
    return cls()


__all__ = ["POLICIES", "Hash", "LeastLoaded", "Policy", "RoundRobin", "make_policy"]
