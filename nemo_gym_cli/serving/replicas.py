"""Names to replicas: which replica of a server each call goes to (used by the server client).

The head server lists one entry per replica. A call without a session goes to the live
replica with the fewest calls in flight from this process. A session is pinned to the
replica of its first call, because its state lives there (a resources server's seeded
episode, a model adapter's backend pin); when that replica is gone, later calls of the
session fail (the collector retries the rollout) rather than reach a replica that never saw
it. A replica is gone when it refuses connections, or resets one and then refuses or resets a probe,
or the head lists a new process for it; the listing is fetched again (once for all callers)
when a name has a replica that is not serving, at most once a second. A new session on such a
name waits for that lookup (at most LOOKUP_WAIT_S) before it picks: it stays where it starts,
and without the wait every session that starts in the moment after a replica died would pile
onto the survivors, even when the replica's successor already serves.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

PIN_GENERATION = 16384  # sessions per generation of pins; two generations are kept
REFRESH_S = 1.0  # a name with a missing replica is looked up again at most this often
LOOKUP_WAIT_S = 1.0  # how long a new session waits for that lookup before it picks among the replicas it has
SERVING = ("registered", "ready")


class Replica:
    __slots__ = ("name", "index", "url", "pid", "in_flight", "gone", "calls", "answered_at", "misses", "frozen")

    def __init__(self, name: str, index: int, url: str, pid: int | None):
        self.name, self.index, self.url, self.pid = name, index, url, pid
        self.in_flight = 0
        self.gone = False
        # Liveness (the server client's watchdog): the tasks calling it now, when a call of it last
        # ended (or its /health last answered), /health probes missed in a row, why it is frozen.
        self.calls: set[asyncio.Task] = set()
        self.answered_at = time.monotonic()
        self.misses = 0
        self.frozen: str | None = None

    @property
    def key(self) -> tuple:
        return self.name, self.index, self.url, self.pid


class Replicas:
    """The live replicas of one name, and the replica each session is pinned to."""

    __slots__ = ("name", "live", "listed", "young", "old", "turn")

    def __init__(self, name: str, live: list[Replica], listed: int):
        self.name, self.live, self.listed = name, live, listed
        self.turn = 0  # ties go round-robin: sequential calls (none in flight) spread too
        self.young: dict[str, Replica] = {}  # pins, newest generation
        self.old: dict[str, Replica] = {}

    @property
    def degraded(self) -> bool:
        return len(self.live) < self.listed

    def least_loaded(self) -> Replica:
        live = self.live
        if len(live) == 1:
            return live[0]
        self.turn = (self.turn + 1) % len(live)
        best = live[self.turn]
        for replica in live:
            if replica.in_flight < best.in_flight:
                best = replica
        return best

    def pinned(self, session_id: str) -> Replica | None:
        replica = self.young.get(session_id)
        if replica is None:
            replica = self.old.get(session_id)
            if replica is not None:
                self.young[session_id] = replica  # still in use: keep it
        return replica

    def pin(self, session_id: str, replica: Replica) -> None:
        self.young[session_id] = replica
        if len(self.young) > PIN_GENERATION:  # O(1) bound: forget the generation before last
            self.old, self.young = self.young, {}

    def unpin(self, session_id: str) -> None:
        self.young.pop(session_id, None)
        self.old.pop(session_id, None)

    def drop(self, replica: Replica) -> None:
        replica.gone = True
        self.live = [r for r in self.live if r is not replica]


class Resolver:
    """Name -> Replicas from the head server's listing, fetched once for all concurrent callers."""

    def __init__(self, fetch: Callable[[], Awaitable[list[dict]]], clock: Callable[[], float] = time.monotonic):
        self.fetch, self.clock = fetch, clock
        self.names: dict[str, Replicas] = {}
        self.known: set[str] = set()  # every configured name, serving or not
        self.gone: set[tuple] = set()  # replica processes found gone (the head may list them a little longer)
        self._lookup: asyncio.Future | None = None  # the listing being fetched, shared by its callers
        self._background: asyncio.Future | None = None  # maybe_refresh's lookup, done once applied
        self._next_refresh = 0.0

    async def refresh(self) -> None:
        if self._lookup is None:
            self._lookup = lookup = asyncio.ensure_future(self.fetch())
            lookup.add_done_callback(self._lookup_done)  # (even when every caller was cancelled)
        self._apply(await asyncio.shield(self._lookup))

    def _lookup_done(self, lookup: asyncio.Future) -> None:
        if self._lookup is lookup:
            self._lookup = None

    def _apply(self, listing: list[dict]) -> None:
        entries: dict[str, list[dict]] = {}
        for s in listing:
            entries.setdefault(str(s["name"]), []).append(s)
        self.known = set(entries)
        for name, listed in entries.items():
            before = self.names.get(name)
            current = {r.index: r for r in before.live} if before else {}
            live = []
            for s in listed:
                if not s.get("url") or s.get("state", "ready") not in SERVING:
                    continue
                replica = Replica(name, int(s.get("replica") or 0), str(s["url"]), s.get("pid"))
                if replica.key in self.gone:
                    continue
                same = current.get(replica.index)
                live.append(same if same is not None and same.key == replica.key else replica)
            reps = Replicas(name, live, len(listed))
            if before is not None:
                for r in before.live:  # a replica the head now lists with another process is gone
                    if r not in live:
                        r.gone = True
                reps.young, reps.old = before.young, before.old  # sessions stay where they are
            self.names[name] = reps

    def maybe_refresh(self) -> asyncio.Future | None:
        """A name is missing a replica: look again in the background, at most once a REFRESH_S.
        Returns the lookup under way (done once its listing is applied), None if there is none."""
        if self._background is None or self._background.done():
            now = self.clock()
            if now < self._next_refresh:
                return None
            self._next_refresh = now + REFRESH_S
            self._background = asyncio.ensure_future(self._refresh_quietly())
        return self._background

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception:
            pass  # the next call that needs it looks again, and reports the error

    def mark_gone(self, replica: Replica) -> None:
        self.gone.add(replica.key)
        reps = self.names.get(replica.name)
        if reps is not None:
            reps.drop(replica)
        replica.gone = True
        self._next_refresh = 0.0  # the next call looks for its successor at once
