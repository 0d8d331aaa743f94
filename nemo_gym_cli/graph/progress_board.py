"""The head server's board of running collections: each collector posts its progress about once
a second (`POST /collections/progress`); `ng_status --watch` reads it (`GET /collections`)."""

from __future__ import annotations

import time
from typing import Any

NUMBERS = ("done", "failed", "total", "rollouts_per_s", "mean_reward", "concurrency", "in_flight", "elapsed_s")
TEXTS = ("id", "agent", "output", "state", "reason")  # reason: why a collection failed
KEEP_FINISHED_S = 300.0  # an ended (or lost) collection stays visible this long
SILENT_S = 10.0  # a running one that stopped posting (ten missed heartbeats: killed) is shown as "lost"
MAX_ENTRIES = 100


class CollectionsBoard:
    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def update(self, body: Any) -> None:
        """Raises ValueError naming the field for a body that is not a progress report."""
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not body["id"]:
            raise ValueError("expected a JSON object with a string 'id'")
        entry: dict[str, Any] = {}
        for key in TEXTS:
            value = body.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"field '{key}' must be a string")
            entry[key] = value[:500] if value else value
        for key in NUMBERS:
            value = body.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"field '{key}' must be a number")
            entry[key] = value
        entry["updated_at"] = time.time()
        self.entries[entry["id"]] = entry
        self._prune()

    def list(self) -> list[dict[str, Any]]:
        self._prune()
        now = time.time()
        return [{**e, "state": "lost", "reason": f"no progress report for {now - e['updated_at']:.0f} s (the collector "
                                                  f"was killed, or cannot reach the head server)"}
                if e["state"] == "running" and now - e["updated_at"] > SILENT_S else e
                for e in self.entries.values()]

    def _prune(self) -> None:
        now = time.time()
        for key, e in list(self.entries.items()):
            if now - e["updated_at"] > KEEP_FINISHED_S:
                del self.entries[key]
        while len(self.entries) > MAX_ENTRIES:
            del self.entries[min(self.entries, key=lambda k: self.entries[k]["updated_at"])]
