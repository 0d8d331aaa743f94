"""The server client's choice of replica, against real sockets in this process: a head server
that lists replicas, replicas that answer, refuse, reset, die mid-call or come back elsewhere.
(tests/test_replicas.py and test_restarts.py do the same through real ng_run graphs.)"""

from __future__ import annotations

import asyncio
import collections
import socket

import pytest
from aiohttp import web

from nemo_gym_cli.serving.client import ServerClient
from nemo_gym_cli.serving.errors import ServerCallError
from nemo_gym_cli.testing.harness import wait_until_async

FAST = {"max_retries": 0, "backoff_base_s": 0.01, "resolve_timeout_s": 10}


class Head:
    """A head server whose listing the test edits."""

    def __init__(self):
        self.listing: list[dict] = []
        self.delay_s = 0.0  # how long a lookup takes (a loaded head)

    def set(self, name: str, urls: list[str | None]) -> None:
        self.listing = [{"name": name, "replica": i, "url": url, "pid": 1000 + i if url else None,
                         "state": "ready" if url else "restarting"} for i, url in enumerate(urls)]

    async def servers(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay_s)
        return web.json_response(self.listing)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


class Replica:
    """A replica that answers POST /work with its number; `gate` holds answers until set."""

    def __init__(self, number: int):
        self.number, self.hits, self.sessions = number, 0, []
        self.gate = asyncio.Event()
        self.gate.set()

    async def work(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.sessions.append(request.headers.get("X-Session-ID"))
        await self.gate.wait()
        return web.json_response({"replica": self.number})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/work", self.work)
        app.router.add_get("/health", self.health)
        self.runner, self.url = await serve(app)
        return self.url

    async def stop(self) -> None:
        await self.runner.cleanup()


class RawReplica:
    """Takes a POST and closes the connection without answering; `then_die` also stops listening
    (a process killed mid-call); `dying` resets every connection, /health too (a process being
    killed: the kernel still completes handshakes on its closing listen socket, nothing answers);
    otherwise /health keeps answering (a live server)."""

    def __init__(self, then_die: bool, dying: bool = False):
        self.then_die, self.dying, self.posts = then_die, dying, 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"POST"):
            self.posts += 1
            if self.then_die:
                self.server.close()
            writer.transport.abort()  # RST: closed under the call
            return
        if self.dying:
            writer.transport.abort()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()


def free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed


@pytest.fixture
async def head():
    h = Head()
    app = web.Application()
    app.router.add_get("/servers", h.servers)
    runner, url = await serve(app)
    h.url = url
    yield h
    await runner.cleanup()


@pytest.fixture
async def client(head):
    c = ServerClient(FAST, head.url)
    yield c
    await c.close()


async def test_calls_spread_by_least_in_flight_and_a_session_sticks(head, client):
    replicas = [Replica(0), Replica(1)]
    head.set("env", [await r.start() for r in replicas])
    for r in replicas:
        r.gate.clear()
    calls = [asyncio.ensure_future(client.post("env", "/work", {})) for _ in range(10)]
    await wait_until_async(lambda: sum(r.hits for r in replicas) >= 10, 10, "the 10 calls to reach the replicas")
    assert [r.hits for r in replicas] == [5, 5]  # each call went to the one with fewer in flight
    for r in replicas:
        r.gate.set()
    await asyncio.gather(*calls)

    answers = {(await client.post("env", "/work", {}, session_id="s1"))["replica"] for _ in range(6)}
    assert len(answers) == 1
    answered = collections.Counter([(await client.post("env", "/work", {}, session_id=f"n{i}"))["replica"] for i in range(10)])
    assert answered == {0: 5, 1: 5}  # new sessions (nothing in flight) take turns
    for r in replicas:
        await r.stop()


async def test_a_refused_replica_is_left_and_the_call_goes_to_another(head, client):
    good = Replica(1)
    head.set("env", [free_port_url(), await good.start()])
    answers = [await client.post("env", "/work", {}, session_id=f"s{i}") for i in range(6)]
    assert answers == [{"replica": 1}] * 6
    assert [r.index for r in client.resolver.names["env"].live] == [1]
    await good.stop()


async def test_a_reset_from_a_live_server_is_never_sent_to_another_replica(head, client):
    resetter, good = RawReplica(then_die=False), Replica(1)
    head.set("env", [await resetter.start(), await good.start()])
    failed = 0
    for i in range(8):
        try:
            await client.post("env", "/work", {})
        except ServerCallError as e:
            assert e.failure == "reset", e
            failed += 1
    assert failed >= 1 and failed == resetter.posts  # every call the resetter took failed there...
    assert good.hits == 8 - failed  # ...and was not re-sent: it may have acted on it
    assert len(client.resolver.names["env"].live) == 2  # still alive, still used
    resetter.server.close()
    await good.stop()


async def test_a_replica_that_dies_mid_call_is_left_and_the_call_re_sent(head, client):
    dying, good = RawReplica(then_die=True), Replica(1)
    head.set("env", [await dying.start(), await good.start()])
    answers = [(await client.post("env", "/work", {}, session_id=f"s{i}"))["replica"] for i in range(4)]
    assert answers == [1, 1, 1, 1] and dying.posts == 1  # the call it took was re-sent to the other
    await good.stop()


async def test_a_replica_being_killed_is_left_and_the_call_re_sent(head, client):
    dying, good = RawReplica(then_die=False, dying=True), Replica(1)
    head.set("env", [await dying.start(), await good.start()])
    answers = [(await client.post("env", "/work", {}, session_id=f"s{i}"))["replica"] for i in range(4)]
    assert answers == [1, 1, 1, 1] and dying.posts == 1  # the call it reset was re-sent to the other
    assert [r.index for r in client.resolver.names["env"].live] == [1]
    dying.server.close()
    await good.stop()


async def test_a_session_on_a_gone_replica_fails_and_new_sessions_move_on(head, client):
    replicas = [Replica(0), Replica(1)]
    head.set("env", [await r.start() for r in replicas])
    pinned = (await client.post("env", "/work", {}, session_id="kept"))["replica"]
    await replicas[pinned].stop()
    with pytest.raises(ServerCallError) as info:
        await client.post("env", "/work", {}, session_id="kept")
    assert info.value.failure == "gone" and "session kept" in info.value.message
    other = 1 - pinned
    assert [(await client.post("env", "/work", {}, session_id=f"new{i}"))["replica"] for i in range(4)] == [other] * 4
    await replicas[other].stop()


async def test_new_sessions_after_a_replica_died_idle_wait_for_its_successor_instead_of_piling_up(head, client):
    """A replica is killed while nothing calls it and comes back at a new address before the next
    burst of sessions: the burst finds the old address refused, and the sessions that were sent
    there wait for the lookup (slow here, as on a loaded head) and spread onto the successor."""
    first, second = Replica(0), Replica(1)
    head.set("env", [await first.start(), await second.start()])
    assert await client.post("env", "/work", {}) in ({"replica": 0}, {"replica": 1})  # resolved: both live
    await second.stop()
    successor = Replica(2)
    head.set("env", [first.url, await successor.start()])
    head.delay_s = 0.3
    for r in (first, successor):
        r.gate.clear()
    hits_before = first.hits
    calls = [asyncio.ensure_future(client.post("env", "/work", {}, session_id=f"s{i}")) for i in range(8)]
    await wait_until_async(lambda: first.hits - hits_before + successor.hits >= 8, 10, "the 8 sessions to reach a replica")
    assert successor.hits >= 3, (first.hits - hits_before, successor.hits)  # not all 8 on the survivor
    for r in (first, successor):
        r.gate.set()
    answers = await asyncio.gather(*calls)
    assert sorted(a["replica"] for a in answers) == sorted([0] * (first.hits - hits_before) + [2] * successor.hits)
    await first.stop()
    await successor.stop()


async def test_a_refused_replica_is_not_tried_again_with_backoff(head):
    """Refused means nothing listens there: the call moves on at once, whatever the backoff."""
    good = Replica(1)
    head.set("env", [free_port_url(), await good.start()])
    c = ServerClient({**FAST, "max_retries": 3, "backoff_base_s": 60, "backoff_max_s": 60}, head.url)
    try:
        async with asyncio.timeout(10):  # three backoffs of up to 60 s each before the fix
            answers = [await c.post("env", "/work", {}, session_id=f"s{i}") for i in range(4)]
        assert answers == [{"replica": 1}] * 4
    finally:
        await c.close()
        await good.stop()


async def test_a_call_waits_for_a_restarted_replica_at_its_new_address(head, client):
    first = Replica(0)
    head.set("env", [await first.start()])
    assert await client.post("env", "/work", {}) == {"replica": 0}
    await first.stop()
    head.set("env", [None])  # ng_run: restarting

    async def come_back() -> Replica:
        await asyncio.sleep(0.3)
        again = Replica(7)
        head.set("env", [await again.start()])
        return again

    returning = asyncio.ensure_future(come_back())
    assert await client.post("env", "/work", {}) == {"replica": 7}  # refused, resolved again, waited
    await (await returning).stop()


async def test_an_unknown_name_and_a_replica_that_never_returns_are_clear_errors(head):
    head.set("env", [None])
    c = ServerClient({**FAST, "resolve_timeout_s": 0.3}, head.url)
    try:
        with pytest.raises(ServerCallError) as info:
            await c.post("nope", "/work", {})
        assert info.value.status == 404 and "known: env" in info.value.message
        with pytest.raises(ServerCallError) as info:
            await c.post("env", "/work", {})
        assert info.value.failure == "unavailable" and "no replica of 'env' is serving" in info.value.message
    finally:
        await c.close()
