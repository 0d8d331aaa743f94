"""The session router over real sockets: three tiny in-process vLLM stand-ins on free ports,
called through a real aiohttp ClientSession the way the model adapter calls vLLM."""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections import Counter, defaultdict

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from nemo_gym_cli.routing import (UNAVAILABLE_EXCEPTIONS, UNAVAILABLE_STATUSES, Backend, BackendUnavailable,
                                  NoHealthyBackend, Router, SessionTable, make_policy)

POLICIES = ["least_loaded", "round_robin", "hash"]


class FakeVLLM:
    """Answers GET /health and POST /v1/chat/completions (after ``delay`` s); records which
    session (X-Session-ID) each completed request came from."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.health_delay = 0.0
        self.hits: list[str | None] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, shutdown_timeout=0.05)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]  # same port again on a restart

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.health_delay)  # a frozen server: its /health never answers in time
        return web.Response(text="ok")

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("bad_request"):
            return web.json_response({"error": "context length exceeded"}, status=400)
        await asyncio.sleep(self.delay)
        self.hits.append(request.headers.get("X-Session-ID"))
        return web.json_response({"backend": self.name})


class HTTPError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def chat(client: aiohttp.ClientSession, session_id: str | None, **body):
    """The attempt the adapter hands to Router.call: one chat completion on ``backend``."""

    async def attempt(backend: Backend) -> str:
        headers = {"X-Session-ID": session_id} if session_id else {}
        try:
            async with client.post(backend.url + "/chat/completions", json=body, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status in UNAVAILABLE_STATUSES:
                    raise BackendUnavailable(f"HTTP {resp.status}")
                if resp.status != 200:
                    raise HTTPError(resp.status)
                return (await resp.json())["backend"]
        except UNAVAILABLE_EXCEPTIONS as e:
            raise BackendUnavailable(f"{type(e).__name__}: {e}") from e

    return attempt


async def turn(router: Router, client, session_id: str | None, group_key: str | None = None) -> str:
    return await router.call(session_id, chat(client, session_id), group_key=group_key)


def sessions_by_backend(vllms: list[FakeVLLM]) -> dict[str, set[str]]:
    """backend name -> ids of the sessions that completed a request there."""
    return {v.name: set(v.hits) for v in vllms}


def backends_of_session(vllms: list[FakeVLLM]) -> dict[str, set[str]]:
    seen = defaultdict(set)
    for v in vllms:
        for sid in v.hits:
            seen[sid].add(v.name)
    return seen


async def until(predicate, timeout: float = 3.0) -> None:
    """Poll (bounded) until predicate() holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def vllms():
    servers = [FakeVLLM(f"b{i}") for i in range(3)]
    for s in servers:
        await s.start()
    yield servers
    for s in servers:
        await s.stop()


@pytest.fixture
async def client():
    async with aiohttp.ClientSession() as session:
        yield session


def prober(client: aiohttp.ClientSession):
    """The health checks' GET, through the same client as the calls (as the adapter does)."""

    async def probe(url: str, timeout_s: float) -> int:
        async with client.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return resp.status

    return probe


@pytest.fixture
async def make_router(vllms, client):
    routers: list[Router] = []

    def make(**kwargs) -> Router:
        kwargs.setdefault("probe_interval_s", 0.02)
        kwargs.setdefault("health_interval_s", 0)  # passive only, unless a test is about active checks
        router = Router([v.url for v in vllms], probe=prober(client), **kwargs)
        routers.append(router)
        return router

    yield make
    for router in routers:
        await router.close()


def backend_state(router: Router, vllm: FakeVLLM) -> dict:
    return next(b for b in router.snapshot()["backends"] if b["url"] == vllm.url)


# -- placement and stickiness ----------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
async def test_every_turn_of_a_session_goes_to_one_backend(policy, vllms, client, make_router):
    router = make_router(policy=policy)

    async def episode(sid: str) -> None:
        for _ in range(4):
            await turn(router, client, sid)

    await asyncio.gather(*(episode(f"{policy}-{i}") for i in range(12)))

    seen = backends_of_session(vllms)
    assert len(seen) == 12
    assert all(len(names) == 1 for names in seen.values()), seen
    assert sum(len(v.hits) for v in vllms) == 48


async def test_least_loaded_sends_fewer_new_sessions_to_a_slow_backend(vllms, client, make_router):
    vllms[0].delay, vllms[1].delay, vllms[2].delay = 0.045, 0.015, 0.015
    router = make_router(policy="least_loaded")
    todo = iter(range(72))

    async def worker() -> None:  # a rollout collector with 12 rollouts in flight
        for i in todo:
            sid = f"s{i}"
            for _ in range(2):
                await turn(router, client, sid)
            router.release(sid)

    await asyncio.gather(*(worker() for _ in range(12)))

    counts = {name: len(sids) for name, sids in sessions_by_backend(vllms).items()}
    assert sum(counts.values()) == 72
    assert counts["b0"] < 0.6 * min(counts["b1"], counts["b2"]), counts


async def test_ties_rotate_instead_of_picking_the_first_backend(vllms, client, make_router):
    router = make_router(policy="least_loaded", group_affinity=False)
    assert {await turn(router, client, f"new-{i}") for i in range(3)} == {"b0", "b1", "b2"}

    anonymous = [await turn(router, client, None) for _ in range(6)]  # no session: no pin
    assert Counter(anonymous) == {"b0": 2, "b1": 2, "b2": 2}
    assert router.snapshot()["sessions"] == 3


async def test_round_robin_deals_new_sessions_in_turn(vllms, client, make_router):
    router = make_router(policy="round_robin")
    placed = [await turn(router, client, f"rr-{i}") for i in range(30)]
    assert Counter(placed) == {"b0": 10, "b1": 10, "b2": 10}
    assert placed[:3] == ["b0", "b1", "b2"]


async def test_hash_spreads_sessions_and_is_stable_across_routers(vllms, client, make_router):
    ids = [f"rollout-{i}" for i in range(300)]
    first = make_router(policy="hash")
    placed = await asyncio.gather(*(turn(first, client, sid) for sid in ids))
    counts = Counter(placed)
    assert set(counts) == {"b0", "b1", "b2"} and min(counts.values()) > 60, counts

    # a fresh router (think: the adapter restarted) maps every session the same way,
    # and the mapping does not depend on Python's per-process hash salt
    second = make_router(policy="hash")
    again = await asyncio.gather(*(turn(second, client, sid) for sid in ids))
    assert again == placed
    assert placed == [f"b{zlib.crc32(sid.encode()) % 3}" for sid in ids]


async def test_hash_falls_over_to_the_next_backend_in_ring_order(vllms, client, make_router):
    router = make_router(policy="hash", probe_interval_s=5)
    sid = next(f"h{i}" for i in range(100) if zlib.crc32(f"h{i}".encode()) % 3 == 1)
    await vllms[1].stop()
    assert await turn(router, client, sid) == "b2"


# -- failure and recovery --------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_backend_dies_mid_run_and_every_rollout_still_completes(policy, vllms, client, make_router):
    router = make_router(policy=policy, probe_interval_s=0.05)
    sids = [f"{policy}-{i}" for i in range(12)]
    await asyncio.gather(*(turn(router, client, sid) for sid in sids))
    home = {sid: next(iter(names)) for sid, names in backends_of_session(vllms).items()}
    victim = vllms[1]
    stranded = [sid for sid in sids if home[sid] == victim.name]
    assert stranded

    # turn 2: the victim is killed while it holds requests
    victim.delay = 5.0
    second = [asyncio.create_task(turn(router, client, sid)) for sid in sids]
    await until(lambda: backend_state(router, victim)["in_flight"] == len(stranded))
    await victim.stop()
    placed = dict(zip(sids, await asyncio.gather(*second)))

    for sid in sids:
        if sid in stranded:
            assert placed[sid] != victim.name
        else:
            assert placed[sid] == home[sid]
    state = backend_state(router, victim)
    assert state["healthy"] is False and state["down_reason"]
    assert state["failovers"] == len(stranded)
    assert state["requests"]["unavailable"] == len(stranded)
    assert state["sessions"] == 0 and state["in_flight"] == 0

    # turn 3: the re-pinned sessions stay where they landed
    third = dict(zip(sids, await asyncio.gather(*(turn(router, client, sid) for sid in sids))))
    assert third == placed

    # the victim comes back on the same port: the /health probe marks it up again
    victim.delay = 0.0
    await victim.start()
    await until(lambda: backend_state(router, victim)["healthy"])
    placed_new = await turn(router, client, "after-restart")
    if policy == "least_loaded":  # the idle, session-free backend gets the next new session
        assert placed_new == victim.name


async def test_all_backends_down_raises_no_healthy_backend_in_bounded_time(vllms, client, make_router):
    router = make_router(wait_for_backend_s=0.3, probe_interval_s=0.05)
    for v in vllms:
        await v.stop()

    t0 = time.monotonic()
    with pytest.raises(NoHealthyBackend) as info:
        await turn(router, client, "doomed")
    elapsed = time.monotonic() - t0

    assert 0.3 <= elapsed < 2.0
    assert isinstance(info.value, BackendUnavailable)
    for v in vllms:
        assert v.url in str(info.value)
    assert all(not b["healthy"] for b in router.snapshot()["backends"])


async def test_a_call_waits_for_a_backend_to_come_back(vllms, client, make_router):
    router = make_router(wait_for_backend_s=5.0, probe_interval_s=0.02)
    for v in vllms:
        await v.stop()
    call = asyncio.create_task(turn(router, client, "patient"))
    await until(lambda: not any(b["healthy"] for b in router.snapshot()["backends"]))
    assert not call.done()

    await vllms[2].start()
    assert await asyncio.wait_for(call, 3.0) == "b2"


async def test_max_failovers_bounds_the_retries(vllms, client, make_router):
    router = make_router(max_failovers=1, probe_interval_s=5)
    tried = []

    async def always_unavailable(backend: Backend):
        tried.append(backend.url)
        raise BackendUnavailable("connection reset")

    with pytest.raises(BackendUnavailable, match="connection reset"):
        await router.call("s", always_unavailable)
    assert len(tried) == 2 and len(set(tried)) == 2


async def test_a_caller_error_propagates_and_the_backend_stays_up(vllms, client, make_router):
    router = make_router()
    with pytest.raises(HTTPError) as info:
        await router.call("s1", chat(client, "s1", bad_request=True))
    assert info.value.status == 400

    boom = ValueError("bad tool call")

    async def buggy(backend: Backend):
        raise boom

    with pytest.raises(ValueError) as raised:
        await router.call("s1", buggy)
    assert raised.value is boom

    snap = router.snapshot()
    assert all(b["healthy"] for b in snap["backends"])
    assert sum(b["requests"]["error"] for b in snap["backends"]) == 2
    assert sum(b["failovers"] for b in snap["backends"]) == 0
    assert sum(b["in_flight"] for b in snap["backends"]) == 0


# -- the session table -----------------------------------------------------------------------


async def test_session_table_is_bounded_by_an_lru_cap(vllms, client, make_router):
    router = make_router(max_sessions=10)
    for i in range(100):
        await turn(router, client, f"s{i}")

    snap = router.snapshot()
    assert snap["sessions"] == 10
    assert sum(b["sessions"] for b in snap["backends"]) == 10
    assert all(f"s{i}" in router.sessions for i in range(90, 100))


async def test_released_sessions_are_forgotten(vllms, client, make_router):
    router = make_router()
    await turn(router, client, "a")
    await turn(router, client, "b")
    router.release("a")
    router.release("a")
    router.release("never-seen")
    router.release(None)

    snap = router.snapshot()
    assert snap["sessions"] == 1
    assert sum(b["sessions"] for b in snap["backends"]) == 1


async def test_idle_sessions_expire_after_the_ttl(vllms, client, make_router):
    router = make_router(session_ttl_s=0.1)
    await turn(router, client, "idle")
    assert router.snapshot()["sessions"] == 1
    await asyncio.sleep(0.15)
    snap = router.snapshot()
    assert snap["sessions"] == 0
    assert all(b["sessions"] == 0 for b in snap["backends"])


def test_session_table_expiry_is_lazy_and_keeps_counts_right():
    now = [0.0]
    table = SessionTable(ttl_s=10, max_sessions=3, clock=lambda: now[0])
    b0, b1 = Backend("http://a/v1", 0), Backend("http://b/v1", 1)
    table.pin("x", b0)
    table.pin("y", b0)
    now[0] = 6
    assert table.get("x") is b0  # touched: its idle clock restarts
    table.pin("y", b1)  # re-pin moves the count
    assert (b0.sessions, b1.sessions) == (1, 1)
    now[0] = 12
    table.pin("z", b1)
    table.pin("w", b1)
    table.pin("v", b1)  # over the cap: the least recently used ("x") goes
    assert "x" not in table and len(table) == 3
    assert (b0.sessions, b1.sessions) == (0, 3)
    now[0] = 30
    assert table.get("z") is None  # everything idle past the TTL
    assert len(table) == 0 and b1.sessions == 0


# -- group affinity --------------------------------------------------------------------------


async def test_group_affinity_places_the_repeats_of_a_prompt_together(vllms, client, make_router):
    router = make_router()
    homes = {await turn(router, client, f"p1-r{i}", group_key="p1") for i in range(6)}
    assert len(homes) == 1
    other = {await turn(router, client, f"p2-r{i}", group_key="p2") for i in range(6)}
    assert len(other) == 1 and other != homes  # the next group goes to a less loaded backend

    spread = make_router(group_affinity=False)
    assert len({await turn(spread, client, f"p3-r{i}", group_key="p3") for i in range(3)}) == 3


async def test_group_affinity_spreads_when_the_group_backend_is_overloaded(vllms, client, make_router):
    router = make_router(group_affinity_slack=2)
    home = await turn(router, client, "g-r0", group_key="g")
    for v in vllms:
        v.delay = 0.2
    placed = await asyncio.gather(*(turn(router, client, f"g-r{i}", group_key="g") for i in range(1, 7)))
    assert placed[:3] == [home] * 3  # in_flight 0, 1, 2 <= least (0) + slack (2)
    assert any(name != home for name in placed)  # then the policy spreads the rest

    for v in vllms:
        v.delay = 0.0
    assert await turn(router, client, "g-late", group_key="g") == home  # the group kept its backend


# -- config and metrics ----------------------------------------------------------------------


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid policies: hash, least_loaded, round_robin"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        Router(["http://h:8000/v1"], policy="fastest", probe=prober(None))


@pytest.mark.parametrize("url, root", [
    ("http://h1:8000/v1", "http://h1:8000"),
    ("http://h1:8000/v1/", "http://h1:8000"),
    ("http://h1:8000", "http://h1:8000"),
])
def test_backend_root_url_drops_the_v1_suffix(url, root):
    assert Backend(url, 0).root_url == root


async def test_metrics_expose_every_series(vllms, client, make_router):
    registry = CollectorRegistry()
    router = make_router(registry=registry, probe_interval_s=5)
    first = {}

    async def flaky_once(backend: Backend) -> str:
        if not first:
            first["url"] = backend.url
            raise BackendUnavailable("connection refused")
        return backend.url

    for i in range(3):
        await router.call(f"m{i}", flaky_once)
    text = generate_latest(registry).decode()

    bad = first["url"]
    for name in ("ng_model_backend_in_flight", "ng_model_backend_active_sessions", "ng_model_backend_up",
                 "ng_model_backend_request_seconds_bucket", "ng_model_backend_failovers_total"):
        for v in vllms:
            assert f'{name}{{backend="{v.url}"' in text, name
    assert f'ng_model_backend_failovers_total{{backend="{bad}"}} 1.0' in text
    assert f'ng_model_backend_up{{backend="{bad}"}} 0.0' in text
    assert f'ng_model_backend_requests_total{{backend="{bad}",outcome="unavailable"}} 1.0' in text
    assert "ng_model_sessions 3.0" in text
    ok = [registry.get_sample_value("ng_model_backend_requests_total", {"backend": v.url, "outcome": "ok"})
          for v in vllms]
    assert sum(ok) == 3
    snap = router.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert sum(b["requests"]["ok"] for b in snap["backends"]) == 3
    assert snap["sessions"] == 3 == sum(b["sessions"] for b in snap["backends"])


# -- active health checks --------------------------------------------------------------------


async def test_health_checks_cut_off_a_frozen_backend_and_reissue_its_calls(vllms, client, make_router):
    router = make_router(health_interval_s=0.05, health_timeout_s=0.5, health_failures=3, probe_interval_s=0.05)
    victim = vllms[0]
    router.start()
    assert all(b.probe_task is not None for b in router.backends)
    victim.delay = 30.0  # its generations never finish...
    stuck = [asyncio.create_task(turn(router, client, f"s{i}")) for i in range(6)]
    await until(lambda: backend_state(router, victim)["in_flight"] >= 1)
    victim.health_delay = 30.0  # ...and now its /health stops answering too: frozen
    placed = await asyncio.wait_for(asyncio.gather(*stuck), 10)
    assert victim.name not in placed
    state = backend_state(router, victim)
    assert state["healthy"] is False and "GET /health: timed out (3 checks in a row)" in state["down_reason"]
    assert state["in_flight"] == 0 and state["failovers"] >= 1

    # a caller's own cancellation stays a cancellation (not a failover)
    victim.health_delay = 0.0
    await until(lambda: backend_state(router, victim)["healthy"], timeout=5)
    vllms[1].delay = vllms[2].delay = 30.0
    mine = asyncio.create_task(turn(router, client, "cancel-me"))
    await until(lambda: sum(b.in_flight for b in router.backends) == 1)
    before = sum(b["failovers"] for b in router.snapshot()["backends"])
    mine.cancel()
    with pytest.raises(asyncio.CancelledError):
        await mine
    assert sum(b["failovers"] for b in router.snapshot()["backends"]) == before
    assert sum(b.in_flight for b in router.backends) == 0


async def test_a_slow_backend_with_a_live_health_endpoint_is_never_cut_off(vllms, client, make_router):
    router = make_router(health_interval_s=0.02, health_timeout_s=1.0, health_failures=3)
    for v in vllms:
        v.delay = 2.0  # a hundred health checks' worth per call
    placed = await asyncio.wait_for(asyncio.gather(*(turn(router, client, f"s{i}") for i in range(6))), 10)
    assert sorted(placed) == sorted(v.name for v in vllms for _ in range(2))
    snap = router.snapshot()["backends"]
    assert all(b["healthy"] and b["failovers"] == 0 and b["requests"]["ok"] == 2 for b in snap)
