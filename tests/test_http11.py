"""The lean HTTP/1.1 client against real servers: keep-alive reuse, chunked bodies, a server that
closes idle connections, refused connections and timeouts."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from aiohttp import web

from nemo_gym_cli.serving.http11 import LeanHTTP, NotSent
from nemo_gym_cli.testing.harness import wait_until_async


PEERS = web.AppKey("peers", list)  # client port of each /echo request: which connection it came on
RELEASE = web.AppKey("release", asyncio.Event)


async def start(app: web.Application, **kwargs) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, **kwargs)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def echo(request: web.Request) -> web.Response:
    request.app[PEERS].append(request.transport.get_extra_info("peername")[1])
    return web.Response(body=await request.read() + request.headers.get("X-Tag", "").encode())


async def chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for part in (b'{"a": ', b'"' + b"x" * 70000 + b'"', b"}"):
        await response.write(part)
    await response.write_eof()
    return response


async def stuck(request: web.Request) -> web.Response:
    await request.app[RELEASE].wait()  # answers only at teardown: the client must time out first
    return web.Response(text="late")


def make_app() -> web.Application:
    app = web.Application()
    app[PEERS], app[RELEASE] = [], asyncio.Event()
    app.router.add_post("/echo", echo)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/stuck", stuck)
    return app


@pytest.fixture
def app() -> web.Application:
    return make_app()


@pytest.fixture
async def server(app):
    runner, url = await start(app)
    yield url
    app[RELEASE].set()
    await runner.cleanup()


async def test_requests_reuse_keep_alive_connections(server, app):
    http = LeanHTTP()
    results = await asyncio.gather(*(http.request("POST", f"{server}/echo", b"body%d" % i, {"X-Tag": "!"}, 5) for i in range(50)))
    assert results == [(200, b"body%d!" % i) for i in range(50)]
    opened = set(app[PEERS])  # the connections the server saw (client ports)
    pool = next(iter(http.pools.values()))
    # How many connections a burst of 50 needs depends on timing (and any per-host cap), at most
    # one per request; exact: every one the burst opened is back in the pool, ready for reuse.
    assert len(opened) <= 50
    assert len(pool.idle) == len(opened)
    app[PEERS].clear()
    for i in range(20):  # sequential calls: one pooled connection, reused, none opened
        assert await http.request("POST", f"{server}/echo", b"again", None, 5) == (200, b"again")
    assert len(set(app[PEERS])) == 1 and set(app[PEERS]) <= opened
    assert len(pool.idle) == len(opened)
    http.close()


async def test_chunked_bodies_and_status_codes(server):
    http = LeanHTTP()
    status, body = await http.request("GET", f"{server}/chunked", None, None, 5)
    assert status == 200 and body == b'{"a": "' + b"x" * 70000 + b'"}'
    status, body = await http.request("GET", f"{server}/nowhere", None, None, 5)
    assert status == 404
    http.close()


async def test_idle_connections_the_server_closed_are_replaced_transparently():
    app = make_app()
    # keepalive_timeout=0.2: the server closes idle connections quickly (like uvicorn's 5 s)
    runner, server = await start(app, keepalive_timeout=0.2)
    http = LeanHTTP()
    try:
        await asyncio.gather(*(http.request("POST", f"{server}/echo", b"x", None, 5) for _ in range(10)))
        assert next(iter(http.pools.values())).idle  # pooled connections the server will close
        await wait_until_async(lambda: not runner.server.connections, 10, "the server to close its idle connections")
        closed = set(app[PEERS])
        for _ in range(3):
            assert await http.request("POST", f"{server}/echo", b"fresh", None, 5) == (200, b"fresh")
        assert not set(app[PEERS][-3:]) & closed  # served on new connections
    finally:
        http.close()
        await runner.cleanup()


class ClosingServer(threading.Thread):
    """A raw HTTP server on its own thread: it answers each request with keep-alive, then, once
    `close_now` is set, closes that connection and sets `closed`."""

    def __init__(self):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.close_now, self.closed = threading.Event(), threading.Event()
        self.served = 0

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\r\n\r\nok"):  # the head and the 2-byte body
                    data += conn.recv(4096)
                self.served += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
                self.close_now.wait(10)
            self.closed.set()


async def test_a_pooled_connection_the_peer_just_closed_is_never_written_to():
    server = ClosingServer()
    server.start()
    http = LeanHTTP()
    try:
        assert await http.request("POST", f"{server.url}/x", b"ok", None, 5) == (200, b"done")
        (pool,) = http.pools.values()
        assert len(pool.idle) == 1
        # The server closes the kept-alive connection while this event loop is blocked, so the
        # loop has not seen the FIN when the next request takes a connection from the pool.
        server.close_now.set()
        assert server.closed.wait(5), "the server did not close its connection"
        # A POST is never re-sent after a keep-alive race (it may have run): it must not be
        # written into the closed connection in the first place.
        assert await http.request("POST", f"{server.url}/x", b"ok", None, 5) == (200, b"done")
        assert server.served == 2
    finally:
        server.close_now.set()
        http.close()
        server.listener.close()


async def test_refused_and_timed_out_requests_raise(server):
    http = LeanHTTP()
    with pytest.raises(NotSent, match="127.0.0.1:1: ConnectionRefusedError"):
        await http.request("GET", "http://127.0.0.1:1/health", None, None, 5)
    with pytest.raises(TimeoutError):
        await http.request("GET", f"{server}/stuck", None, None, 0.3)
    assert await http.request("POST", f"{server}/echo", b"ok", None, 5) == (200, b"ok")  # still usable
    http.close()
