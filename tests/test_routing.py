"""The session router over real sockets: three tiny in-process vLLM stand-ins on free ports,
called through the model adapter's own Upstream (its HTTP client and its error mapping: refused,
reset and 502/503/504 fail over, other statuses are the caller's error)."""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections import Counter, defaultdict

import pytest
from aiohttp import web
from prometheus_client import generate_latest

from nemo_gym_cli.routing import (Backend, BackendUnavailable, NoHealthyBackend, Router, RoutingSettings, SessionTable,
                                  make_policy)
from nemo_gym_cli.model_adapter.server import UpstreamModel
from nemo_gym_cli.model_adapter.upstream import Upstream, UpstreamError
from nemo_gym_cli.serving.client import ServerClient
from nemo_gym_cli.testing.harness import wait_until_async

POLICIES = ["least_loaded", "round_robin", "hash"]


class FakeVLLM:
    """Answers GET /health and POST /v1/chat/completions (after ``delay`` s); records which
    session (X-Session-ID) each completed request came from."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.status = 200  # set e.g. 503 to play a backend that is up but cannot serve
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
        if self.status != 200:
            return web.json_response({"error": f"HTTP {self.status} from {self.name}"}, status=self.status)
        await asyncio.sleep(self.delay)
        self.hits.append(request.headers.get("X-Session-ID"))
        return web.json_response({"backend": self.name})


async def turn(up: Upstream, session_id: str | None, group_key: str | None = None, **body) -> str:
    """One chat completion through the adapter's Upstream; the name of the backend that answered."""
    answer, _ = await up.post("/chat/completions", {"messages": [], **body}, session_id=session_id, group_key=group_key)
    return answer["backend"]


def sessions_by_backend(vllms: list[FakeVLLM]) -> dict[str, set[str]]:
    """backend name -> ids of the sessions that completed a request there."""
    return {v.name: set(v.hits) for v in vllms}


def backends_of_session(vllms: list[FakeVLLM]) -> dict[str, set[str]]:
    seen = defaultdict(set)
    for v in vllms:
        for sid in v.hits:
            seen[sid].add(v.name)
    return seen


@pytest.fixture
async def vllms():
    servers = [FakeVLLM(f"b{i}") for i in range(3)]
    for s in servers:
        await s.start()
    yield servers
    for s in servers:
        await s.stop()


@pytest.fixture
async def make_upstream(vllms):
    made: list[Upstream] = []

    def make(policy: str = "least_loaded", **settings) -> Upstream:
        """The Upstream a model adapter builds from its config (routing_policy, probe_interval_s, ...)."""
        settings.setdefault("probe_interval_s", 0.02)
        settings.setdefault("health_interval_s", 0)  # passive only, unless a test is about active checks
        config = {"base_url": [v.url for v in vllms], "model": "m", "routing_policy": policy, **settings}
        up = UpstreamModel("policy_model", config, client=ServerClient({"max_retries": 0})).upstream
        made.append(up)
        return up

    yield make
    for up in made:
        await up.server.on_shutdown()
        await up.server.client.close()


def backend_state(router: Router, vllm: FakeVLLM) -> dict:
    return next(b for b in router.snapshot()["backends"] if b["url"] == vllm.url)


# -- placement and stickiness ----------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
async def test_every_turn_of_a_session_goes_to_one_backend(policy, vllms, make_upstream):
    up = make_upstream(policy=policy)

    async def episode(sid: str) -> None:
        for _ in range(4):
            await turn(up, sid)

    await asyncio.gather(*(episode(f"{policy}-{i}") for i in range(12)))

    seen = backends_of_session(vllms)
    assert len(seen) == 12
    assert all(len(names) == 1 for names in seen.values()), seen
    assert sum(len(v.hits) for v in vllms) == 48


async def test_least_loaded_sends_fewer_new_sessions_to_a_slow_backend(vllms, make_upstream):
    vllms[0].delay, vllms[1].delay, vllms[2].delay = 0.045, 0.015, 0.015
    up = make_upstream(policy="least_loaded")
    todo = iter(range(72))

    async def worker() -> None:  # a rollout collector with 12 rollouts in flight
        for i in todo:
            sid = f"s{i}"
            for _ in range(2):
                await turn(up, sid)
            up.release(sid)

    await asyncio.gather(*(worker() for _ in range(12)))

    counts = {name: len(sids) for name, sids in sessions_by_backend(vllms).items()}
    assert sum(counts.values()) == 72
    assert counts["b0"] < 0.6 * min(counts["b1"], counts["b2"]), counts


async def test_ties_rotate_instead_of_picking_the_first_backend(vllms, make_upstream):
    up = make_upstream(policy="least_loaded", group_affinity=False)
    assert {await turn(up, f"new-{i}") for i in range(3)} == {"b0", "b1", "b2"}

    anonymous = [await turn(up, None) for _ in range(6)]  # no session: no pin
    assert Counter(anonymous) == {"b0": 2, "b1": 2, "b2": 2}
    assert up.router.snapshot()["sessions"] == 3


async def test_round_robin_deals_new_sessions_in_turn(vllms, make_upstream):
    up = make_upstream(policy="round_robin")
    placed = [await turn(up, f"rr-{i}") for i in range(30)]
    assert Counter(placed) == {"b0": 10, "b1": 10, "b2": 10}
    assert placed[:3] == ["b0", "b1", "b2"]


async def test_hash_spreads_sessions_and_is_stable_across_routers(vllms, make_upstream):
    ids = [f"rollout-{i}" for i in range(300)]
    first = make_upstream(policy="hash")
    placed = await asyncio.gather(*(turn(first, sid) for sid in ids))
    counts = Counter(placed)
    assert set(counts) == {"b0", "b1", "b2"} and min(counts.values()) > 60, counts

    # a fresh router (think: the adapter restarted) maps every session the same way,
    # and the mapping does not depend on Python's per-process hash salt
    second = make_upstream(policy="hash")
    again = await asyncio.gather(*(turn(second, sid) for sid in ids))
    assert again == placed
    assert placed == [f"b{zlib.crc32(sid.encode()) % 3}" for sid in ids]


async def test_hash_falls_over_to_the_next_backend_in_ring_order(vllms, make_upstream):
    up = make_upstream(policy="hash", probe_interval_s=5)
    sid = next(f"h{i}" for i in range(100) if zlib.crc32(f"h{i}".encode()) % 3 == 1)
    await vllms[1].stop()
    assert await turn(up, sid) == "b2"


# -- failure and recovery --------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_backend_dies_mid_run_and_every_rollout_still_completes(policy, vllms, make_upstream):
    up = make_upstream(policy=policy, probe_interval_s=0.05)
    sids = [f"{policy}-{i}" for i in range(12)]
    await asyncio.gather(*(turn(up, sid) for sid in sids))
    home = {sid: next(iter(names)) for sid, names in backends_of_session(vllms).items()}
    victim = vllms[1]
    stranded = [sid for sid in sids if home[sid] == victim.name]
    assert stranded

    # turn 2: the victim is killed while it holds requests
    victim.delay = 5.0
    second = [asyncio.create_task(turn(up, sid)) for sid in sids]
    await wait_until_async(lambda: backend_state(up.router, victim)["in_flight"] == len(stranded), 3,
                           "the stranded calls to be in flight on the victim")
    await victim.stop()
    placed = dict(zip(sids, await asyncio.gather(*second)))

    for sid in sids:
        if sid in stranded:
            assert placed[sid] != victim.name
        else:
            assert placed[sid] == home[sid]
    state = backend_state(up.router, victim)
    assert state["healthy"] is False and state["down_reason"]
    assert state["failovers"] == len(stranded)
    assert state["requests"]["unavailable"] == len(stranded)
    assert state["sessions"] == 0 and state["in_flight"] == 0

    # turn 3: the re-pinned sessions stay where they landed
    third = dict(zip(sids, await asyncio.gather(*(turn(up, sid) for sid in sids))))
    assert third == placed

    # the victim comes back on the same port: the /health probe marks it up again
    victim.delay = 0.0
    await victim.start()
    await wait_until_async(lambda: backend_state(up.router, victim)["healthy"], 3, "the victim to be marked up again")
    # and takes new sessions again, under every policy
    if policy == "least_loaded":  # the idle, session-free backend gets the next new session
        assert await turn(up, "after-restart") == victim.name
    elif policy == "hash":  # a session that hashes to it lands on it again
        sid = next(f"back-{i}" for i in range(100) if zlib.crc32(f"back-{i}".encode()) % 3 == 1)
        assert await turn(up, sid) == victim.name
    else:  # round_robin deals it its turn among three new sessions
        assert {await turn(up, f"after-restart-{i}") for i in range(3)} == {"b0", "b1", "b2"}


async def test_all_backends_down_raises_no_healthy_backend_in_bounded_time(vllms, make_upstream):
    up = make_upstream(wait_for_backend_s=0.3, probe_interval_s=0.05)
    for v in vllms:
        await v.stop()

    t0 = time.monotonic()
    with pytest.raises(NoHealthyBackend) as info:
        await turn(up, "doomed")
    elapsed = time.monotonic() - t0

    # It waits wait_for_backend_s (0.3 s), then gives up; the upper bound only tells that wait
    # from the 30 s default and is generous for a loaded machine.
    assert 0.3 <= elapsed < 10
    assert isinstance(info.value, BackendUnavailable)
    for v in vllms:
        assert v.url in str(info.value)
    assert all(not b["healthy"] for b in up.router.snapshot()["backends"])


async def test_a_call_waits_for_a_backend_to_come_back(vllms, make_upstream):
    up = make_upstream(wait_for_backend_s=5.0, probe_interval_s=0.02)
    for v in vllms:
        await v.stop()
    call = asyncio.create_task(turn(up, "patient"))
    await wait_until_async(lambda: not any(b["healthy"] for b in up.router.snapshot()["backends"]), 3, "the victim to be marked up again")
    assert not call.done()

    await vllms[2].start()
    assert await asyncio.wait_for(call, 3.0) == "b2"


async def test_an_unavailable_status_fails_over_and_marks_the_backend_down(vllms, make_upstream):
    up = make_upstream(policy="hash", probe_interval_s=5)
    sid = next(f"u{i}" for i in range(100) if zlib.crc32(f"u{i}".encode()) % 3 == 1)  # b1's session
    vllms[1].status = 503  # up, but cannot serve: the adapter's mapping fails over
    assert await turn(up, sid) == "b2"
    state = backend_state(up.router, vllms[1])
    assert state["healthy"] is False and "503" in state["down_reason"]
    assert state["failovers"] == 1 and state["requests"]["unavailable"] == 1


async def test_max_failovers_bounds_the_retries(vllms, make_upstream):
    up = make_upstream(probe_interval_s=5)
    up.router.max_failovers = 1  # a Router setting, not an adapter config key
    tried = []

    async def always_unavailable(backend: Backend):
        tried.append(backend.url)
        raise BackendUnavailable("connection reset")

    with pytest.raises(BackendUnavailable, match="connection reset"):
        await up.router.call("s", always_unavailable)
    assert len(tried) == 2 and len(set(tried)) == 2


async def test_a_caller_error_propagates_and_the_backend_stays_up(vllms, make_upstream):
    up = make_upstream()
    with pytest.raises(UpstreamError) as info:  # the adapter's mapping: a 400 is the request's fault
        await turn(up, "s1", bad_request=True)
    assert info.value.status == 400 and "context length exceeded" in info.value.message

    boom = ValueError("bad tool call")

    async def buggy(backend: Backend):
        raise boom

    with pytest.raises(ValueError) as raised:
        await up.router.call("s1", buggy)
    assert raised.value is boom

    snap = up.router.snapshot()
    assert all(b["healthy"] for b in snap["backends"])
    assert sum(b["requests"]["error"] for b in snap["backends"]) == 2
    assert sum(b["failovers"] for b in snap["backends"]) == 0
    assert sum(b["in_flight"] for b in snap["backends"]) == 0


# -- the session table -----------------------------------------------------------------------


async def test_session_table_is_bounded_by_an_lru_cap(vllms, make_upstream):
    up = make_upstream(max_sessions=10)
    for i in range(100):
        await turn(up, f"s{i}")

    snap = up.router.snapshot()
    assert snap["sessions"] == 10
    assert sum(b["sessions"] for b in snap["backends"]) == 10
    assert all(f"s{i}" in up.router.sessions for i in range(90, 100))


async def test_released_sessions_are_forgotten(vllms, make_upstream):
    up = make_upstream()
    await turn(up, "a")
    await turn(up, "b")
    up.release("a")
    up.release("a")
    up.release("never-seen")
    up.release(None)

    snap = up.router.snapshot()
    assert snap["sessions"] == 1
    assert sum(b["sessions"] for b in snap["backends"]) == 1


async def test_idle_sessions_expire_after_the_ttl(vllms, make_upstream):
    now = [0.0]
    up = make_upstream()
    up.router.sessions = SessionTable(ttl_s=10, max_sessions=100, clock=lambda: now[0])  # an injected clock
    await turn(up, "idle")
    now[0] = 9.9
    assert up.router.snapshot()["sessions"] == 1
    now[0] = 10.1
    snap = up.router.snapshot()
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


async def test_group_affinity_places_the_repeats_of_a_prompt_together(vllms, make_upstream):
    up = make_upstream()
    homes = {await turn(up, f"p1-r{i}", group_key="p1") for i in range(6)}
    assert len(homes) == 1
    other = {await turn(up, f"p2-r{i}", group_key="p2") for i in range(6)}
    assert len(other) == 1 and other != homes  # the next group goes to a less loaded backend

    spread = make_upstream(group_affinity=False)
    assert len({await turn(spread, f"p3-r{i}", group_key="p3") for i in range(3)}) == 3


async def test_group_affinity_spreads_when_the_group_backend_is_overloaded(vllms, make_upstream):
    up = make_upstream(group_affinity_slack=2)
    home = await turn(up, "g-r0", group_key="g")
    for v in vllms:
        v.delay = 0.2
    placed = await asyncio.gather(*(turn(up, f"g-r{i}", group_key="g") for i in range(1, 7)))
    assert placed[:3] == [home] * 3  # in_flight 0, 1, 2 <= least (0) + slack (2)
    assert any(name != home for name in placed)  # then the policy spreads the rest

    for v in vllms:
        v.delay = 0.0
    assert await turn(up, "g-late", group_key="g") == home  # the group kept its backend


# -- config and metrics ----------------------------------------------------------------------


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid policies: hash, least_loaded, round_robin"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        Router(RoutingSettings(base_url=["http://h:8000/v1"], routing_policy="fastest"), probe=None)


@pytest.mark.parametrize("url, root", [
    ("http://h1:8000/v1", "http://h1:8000"),
    ("http://h1:8000/v1/", "http://h1:8000"),
    ("http://h1:8000", "http://h1:8000"),
])
def test_backend_root_url_drops_the_v1_suffix(url, root):
    assert Backend(url, 0).root_url == root


async def test_metrics_expose_every_series(vllms, make_upstream):
    up = make_upstream(probe_interval_s=5)
    registry = up.server.registry  # the adapter's /metrics registry
    first = {}

    async def flaky_once(backend: Backend) -> str:
        if not first:
            first["url"] = backend.url
            raise BackendUnavailable("connection refused")
        return backend.url

    for i in range(3):
        await up.router.call(f"m{i}", flaky_once)
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
    snap = up.router.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert sum(b["requests"]["ok"] for b in snap["backends"]) == 3
    assert snap["sessions"] == 3 == sum(b["sessions"] for b in snap["backends"])


# -- active health checks --------------------------------------------------------------------


async def test_health_checks_cut_off_a_frozen_backend_and_reissue_its_calls(vllms, make_upstream):
    up = make_upstream(health_interval_s=0.05, health_timeout_s=0.5, health_failures=3, probe_interval_s=0.05)
    victim = vllms[0]
    up.start()
    assert all(b.probe_task is not None for b in up.router.backends)
    victim.delay = 30.0  # its generations never finish...
    stuck = [asyncio.create_task(turn(up, f"s{i}")) for i in range(6)]
    await wait_until_async(lambda: backend_state(up.router, victim)["in_flight"] >= 1, 3, "a call in flight on the victim")
    victim.health_delay = 30.0  # ...and now its /health stops answering too: frozen
    placed = await asyncio.wait_for(asyncio.gather(*stuck), 10)
    assert victim.name not in placed
    state = backend_state(up.router, victim)
    assert state["healthy"] is False and "GET /health: timed out (3 checks in a row)" in state["down_reason"]
    assert state["in_flight"] == 0 and state["failovers"] >= 1

    # a caller's own cancellation stays a cancellation (not a failover)
    victim.health_delay = 0.0
    await wait_until_async(lambda: backend_state(up.router, victim)["healthy"], 5, "the victim to be marked up again")
    vllms[1].delay = vllms[2].delay = 30.0
    mine = asyncio.create_task(turn(up, "cancel-me"))
    await wait_until_async(lambda: sum(b.in_flight for b in up.router.backends) == 1, 3, "one call in flight")
    before = sum(b["failovers"] for b in up.router.snapshot()["backends"])
    mine.cancel()
    with pytest.raises(asyncio.CancelledError):
        await mine
    assert sum(b["failovers"] for b in up.router.snapshot()["backends"]) == before
    assert sum(b.in_flight for b in up.router.backends) == 0


async def test_a_slow_backend_with_a_live_health_endpoint_is_never_cut_off(vllms, make_upstream):
    up = make_upstream(health_interval_s=0.02, health_timeout_s=1.0, health_failures=3)
    for v in vllms:
        v.delay = 2.0  # a hundred health checks' worth per call
    placed = await asyncio.wait_for(asyncio.gather(*(turn(up, f"s{i}") for i in range(6))), 10)
    assert sorted(placed) == sorted(v.name for v in vllms for _ in range(2))
    snap = up.router.snapshot()["backends"]
    assert all(b["healthy"] and b["failovers"] == 0 and b["requests"]["ok"] == 2 for b in snap)
