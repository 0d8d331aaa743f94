"""The lean HTTP/1.1 client against real servers: keep-alive reuse, chunked bodies, a server that
closes idle connections, refused connections and timeouts."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from nemo_gym_cli.serving.http11 import LeanHTTP, NotSent


async def start(app: web.Application, **kwargs) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, **kwargs)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read() + request.headers.get("X-Tag", "").encode())


async def chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for part in (b'{"a": ', b'"' + b"x" * 70000 + b'"', b"}"):
        await response.write(part)
    await response.write_eof()
    return response


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(2)
    return web.Response(text="late")


@pytest.fixture
async def server():
    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/slow", slow)
    # keepalive_timeout=0.2: the server closes idle connections quickly (like uvicorn's 5 s)
    runner, url = await start(app, keepalive_timeout=0.2)
    yield url
    await runner.cleanup()


async def test_requests_reuse_keep_alive_connections(server):
    http = LeanHTTP()
    results = await asyncio.gather(*(http.request("POST", f"{server}/echo", b"body%d" % i, {"X-Tag": "!"}, 5) for i in range(50)))
    assert results == [(200, b"body%d!" % i) for i in range(50)]
    pool = next(iter(http.pools.values()))
    opened = len(pool.idle)
    assert 1 <= opened <= 50
    for i in range(20):  # sequential calls: one connection, reused
        assert await http.request("POST", f"{server}/echo", b"again", None, 5) == (200, b"again")
    assert len(pool.idle) == opened
    http.close()


async def test_chunked_bodies_and_status_codes(server):
    http = LeanHTTP()
    status, body = await http.request("GET", f"{server}/chunked", None, None, 5)
    assert status == 200 and body == b'{"a": "' + b"x" * 70000 + b'"}'
    status, body = await http.request("GET", f"{server}/nowhere", None, None, 5)
    assert status == 404
    http.close()


async def test_idle_connections_the_server_closed_are_replaced_transparently(server):
    http = LeanHTTP()
    await asyncio.gather(*(http.request("POST", f"{server}/echo", b"x", None, 5) for _ in range(10)))
    await asyncio.sleep(0.5)  # the server closes every idle connection meanwhile
    for _ in range(3):
        assert await http.request("POST", f"{server}/echo", b"fresh", None, 5) == (200, b"fresh")
    http.close()


async def test_refused_and_timed_out_requests_raise(server):
    http = LeanHTTP()
    with pytest.raises(NotSent, match="127.0.0.1:1: ConnectionRefusedError"):
        await http.request("GET", "http://127.0.0.1:1/health", None, None, 5)
    with pytest.raises(TimeoutError):
        await http.request("GET", f"{server}/slow", None, None, 0.3)
    assert await http.request("POST", f"{server}/echo", b"ok", None, 5) == (200, b"ok")  # still usable
    http.close()
