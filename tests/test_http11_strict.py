"""The lean client against a raw-socket server: every malformed answer is a clear error that
names the server (never a success), 1xx is skipped, caps hold, headers that could inject are
refused before a byte is written, and a POST is never sent twice."""

from __future__ import annotations

import asyncio

import pytest

from nemo_gym_cli.serving.http11 import InvalidRequest, LeanHTTP, NotSent, ProtocolError
from nemo_gym_cli.testing.harness import wait_until_async
from nemo_gym_cli.testing.harness.rawhttp import RawServer, response

OK = response(200, b'{"ok": true}')


@pytest.fixture
def raw():
    servers: list[RawServer] = []

    def start(answer) -> RawServer:
        s = RawServer(answer)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


@pytest.mark.parametrize("answer, error", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n{}", "Invalid character in Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n{}", "Invalid character in Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", "Duplicate Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n{}\r\n0\r\n\r\n", "Invalid character in chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", "Invalid character in chunk size"),
    (b"HTTP/1.1 200 OK\r\nNoColonHere\r\nContent-Length: 2\r\n\r\n{}", "Invalid header token"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: notchunked\r\nContent-Length: 2\r\n\r\n{}", "Transfer-Encoding"),
    (b"SMTP ready\r\n\r\n", "Expected HTTP/"),
])
async def test_a_malformed_answer_is_an_error_naming_the_server(raw, answer, error):
    server = raw(lambda *_: answer)
    http = LeanHTTP()
    with pytest.raises(ProtocolError) as info:
        await http.request("GET", server.url + "/x", timeout=5)
    assert f"127.0.0.1:{server.port}" in str(info.value) and error in str(info.value)
    http.close()


async def test_1xx_answers_are_skipped(raw):
    server = raw(lambda *_: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)
    http = LeanHTTP()
    assert await http.request("POST", server.url + "/x", b"{}", timeout=5) == (200, b'{"ok": true}')
    assert await http.request("POST", server.url + "/x", b"{}", timeout=5) == (200, b'{"ok": true}')  # same connection
    assert len(server.requests) == 2
    http.close()


async def test_bytes_after_an_answer_retire_the_connection(raw):
    server = raw(lambda *_: OK + b"HTTP/1.1 200 OK\r\nContent-Le")  # an answer, then the start of another
    http = LeanHTTP()
    for _ in range(3):
        assert await http.request("GET", server.url + "/x", timeout=5) == (200, b'{"ok": true}')
    assert len(server.requests) == 3 and not next(iter(http.pools.values())).idle
    http.close()


async def test_a_truncated_body_is_an_error_not_a_short_success(raw):
    # 12 of the 100 announced bytes, then the server closes the connection.
    server = raw(lambda *_: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n" + b'{"partial": ')
    http = LeanHTTP()
    with pytest.raises(ConnectionResetError, match=r"truncated after 12 body bytes"):
        await http.request("GET", server.url + "/x", timeout=5)
    http.close()


async def test_bodies_over_the_cap_are_refused(raw):
    server = raw(lambda method, path, *_: response(200, b"x" * (4096 if path == "/big" else 10)))
    http = LeanHTTP(max_response_bytes=1000)
    with pytest.raises(ProtocolError, match="4096 bytes is over the 1000-byte cap"):
        await http.request("GET", server.url + "/big", timeout=5)
    assert await http.request("GET", server.url + "/small", timeout=5) == (200, b"x" * 10)
    # chunked: no length up front, the cap is checked as the body arrives
    chunk = b"200\r\n" + b"y" * 512 + b"\r\n"  # two chunks of 512 bytes
    server.answer = lambda *_: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + chunk + b"0\r\n\r\n"
    with pytest.raises(ProtocolError, match="over the 1000-byte cap"):
        await http.request("GET", server.url + "/chunked", timeout=5)
    http.close()


@pytest.mark.parametrize("headers", [
    {"X-Group-ID": "7\r\nX-Session-ID: injected"},
    {"X-Group-ID": "7\nX-Session-ID: injected"},
    {"X-Group-ID": "a\0b"},
    {"X-Bad\r\nName": "v"},
    {"X:Colon": "v"},
])
async def test_header_injection_is_refused_before_anything_is_written(raw, headers):
    server = raw(lambda *_: OK)
    http = LeanHTTP()
    with pytest.raises(InvalidRequest, match="header"):
        await http.request("POST", server.url + "/x", b"{}", headers, timeout=5)
    with pytest.raises(InvalidRequest, match="target"):
        await http.request("POST", server.url + "/x y\r\nHost: evil", b"{}", None, timeout=5)
    assert await http.request("GET", server.url + "/after", timeout=5) == (200, b'{"ok": true}')
    assert [path for _, path, _ in server.requests] == ["/after"]  # nothing else ever reached it
    http.close()


async def test_a_post_whose_connection_dies_unanswered_is_not_sent_again(raw):
    # The server reads the request (it may have acted on it) and closes without answering.
    server = raw(lambda *_: None)
    http = LeanHTTP()
    with pytest.raises(ConnectionResetError, match="without answering"):
        await http.request("POST", server.url + "/verify", b"{}", timeout=5)
    assert len(server.requests) == 1

    # On a kept-alive connection too: one good answer, then the next POST gets no answer.
    server.answer = lambda *_: OK if len(server.requests) == 2 else None
    assert (await http.request("POST", server.url + "/seed_session", b"{}", timeout=5))[0] == 200
    with pytest.raises(ConnectionResetError):
        await http.request("POST", server.url + "/seed_session", b"{}", timeout=5)
    assert len(server.requests) == 3

    # An idempotent call in the same spot is re-sent once on a new connection.
    server.answer = lambda *_: OK if len(server.requests) in (4, 6) else None
    assert (await http.request("GET", server.url + "/health", timeout=5))[0] == 200
    assert await http.request("GET", server.url + "/health", timeout=5) == (200, b'{"ok": true}')
    assert len(server.requests) == 6
    http.close()


async def test_refused_connections_say_nothing_was_sent():
    http = LeanHTTP(connect_timeout=2)
    with pytest.raises(NotSent, match="cannot connect to 127.0.0.1:1"):
        await http.request("POST", "http://127.0.0.1:1/verify", b"{}", timeout=5)
    http.close()


async def test_the_per_host_cap_bounds_open_connections(raw):
    import threading

    gate = threading.Event()
    server = raw(lambda method, path, *_: (gate.wait(10) and OK) if path == "/x" else OK)
    http = LeanHTTP(per_host_limit=3)
    calls = [asyncio.ensure_future(http.request("POST", server.url + "/x", b"{}", timeout=20)) for _ in range(10)]
    def queued():  # the pool, once the capped calls queue in it
        pool = next(iter(http.pools.values()), None)
        return pool if pool is not None and len(pool.waiters) == 7 else None

    pool = await wait_until_async(queued, 10, "7 of the 10 calls to queue behind the cap of 3")
    assert pool is not None and pool.open == 3 and len(pool.waiters) == 7
    gate.set()
    assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 10
    assert pool.open <= 3 and len(server.requests) == 10
    # a health check is never stuck behind the cap: with 3 calls hanging, it still gets through
    gate.clear()
    blocked = [asyncio.ensure_future(http.request("POST", server.url + "/x", b"{}", timeout=20)) for _ in range(3)]
    await wait_until_async(lambda: len(server.requests) == 13, 10, "the 3 blocked calls to reach the server")
    assert await asyncio.wait_for(http.request("GET", server.url + "/health", timeout=5, uncapped=True), 10) == \
        (200, b'{"ok": true}')
    assert not any(b.done() for b in blocked)
    gate.set()
    await asyncio.gather(*blocked)
    http.close()
