"""Group affinity: the repeats of one prompt share a prefix, so place them on one backend
(vLLM's prefix cache then serves them) while that backend's load allows."""

from __future__ import annotations

from collections import OrderedDict

from .backend import Backend


class GroupAffinity:
    """group key -> the backend of the group's first session (bounded LRU table)."""

    __slots__ = ("slack", "max_groups", "_d")

    def __init__(self, slack: int, max_groups: int) -> None:
        if slack < 0:
            raise ValueError(f"group_affinity_slack must be >= 0, got {slack}")
        self.slack = slack
        self.max_groups = max(1, max_groups)
        self._d: OrderedDict[str, Backend] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def pick(self, group_key: str, healthy: list[Backend]) -> Backend | None:
        """The group's backend if it is healthy and its in_flight <= least in_flight + slack."""
        backend = self._d.get(group_key)
        if backend is None or not backend.healthy:
            return None
        self._d.move_to_end(group_key)
        least = min(b.in_flight for b in healthy)
        return backend if backend.in_flight <= least + self.slack else None

    def remember(self, group_key: str, backend: Backend) -> None:
        """Record where the policy placed a group, unless the group already has a healthy home
        (an overloaded group keeps its original backend)."""
        d = self._d
        current = d.get(group_key)
        if current is not None and current.healthy:
            return
        d[group_key] = backend
        d.move_to_end(group_key)
        if len(d) > self.max_groups:
            d.popitem(last=False)
