"""A lean HTTP/1.1 keep-alive client for JSON calls over plain http:// (our hops, vLLM).

Why: aiohttp's client costs ~60-80 us of CPU per request, which is most of the CPU our servers
spend per rollout (the bench/throughput.py profile). Our calls are simple: POST/GET a JSON
body, read the whole response. This client writes the request in one call and parses the
response with a small state machine on an asyncio Protocol: about half the cost. https:// and
anything unusual go to aiohttp.

Errors are the usual exceptions: ConnectionRefusedError / ConnectionResetError (OSError),
asyncio.TimeoutError, and `ProtocolError` (a ConnectionError) for a malformed response.
A request sent on a reused idle connection that the server had closed meanwhile (keep-alive
race: uvicorn closes idle connections after 5 s) is retried once on a new connection.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class ProtocolError(ConnectionError):
    """The server sent something that is not a valid HTTP/1.1 response."""


class StaleConnection(ConnectionResetError):
    """A reused connection closed before any byte of the response: safe to send again."""


class _Connection(asyncio.Protocol):
    __slots__ = ("transport", "pool", "waiter", "buffer", "status", "length", "chunked", "close_after", "reused",
                 "header_end", "closed")

    def __init__(self, pool: "_Pool"):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.buffer = bytearray()
        self.closed = False
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.length = -1
        self.chunked = False
        self.close_after = False
        self.header_end = -1

    # ---- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        try:
            body = self._parse()
        except ProtocolError as e:
            self.waiter.set_exception(e)
            self.close()
            return
        if body is not None:
            self.waiter.set_result((self.status, body))

    def connection_lost(self, exc) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.length == -1 and not self.chunked and self.header_end != -1 and self.status:
                waiter.set_result((self.status, bytes(self.buffer[self.header_end:])))  # body ran to EOF
            elif self.reused and not self.buffer:
                waiter.set_exception(StaleConnection("server closed the idle connection"))
            else:
                waiter.set_exception(ConnectionResetError(f"connection closed mid-response ({exc or 'EOF'})"))

    # ---- parsing
    def _parse(self) -> bytes | None:
        buf = self.buffer
        if self.header_end == -1:
            end = buf.find(b"\r\n\r\n")
            if end == -1:
                if len(buf) > 65536:
                    raise ProtocolError("response headers larger than 64 KiB")
                return None
            self.header_end = end + 4
            lines = bytes(buf[:end]).split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise ProtocolError(f"bad status line {lines[0][:80]!r}")
            self.status = int(parts[1])
            self.close_after = parts[0] == b"HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = True
                elif name == b"connection":
                    v = value.strip().lower()
                    self.close_after = v == b"close" or (self.close_after and v != b"keep-alive")
            if self.status in (204, 304) or 100 <= self.status < 200:
                self.length = 0
        start = self.header_end
        if self.chunked:
            return self._parse_chunked(start)
        if self.length >= 0:
            if len(buf) - start < self.length:
                return None
            body = bytes(buf[start:start + self.length])
            del buf[:start + self.length]
            return body
        return None  # no length: the body ends when the server closes (see connection_lost)

    def _parse_chunked(self, pos: int) -> bytes | None:
        buf = self.buffer
        chunks = []
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol == -1:
                return None
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", eol)
                if trailer_end == -1:
                    return None
                del buf[:trailer_end + 4]
                return b"".join(chunks)
            if len(buf) < eol + 2 + size + 2:
                return None
            chunks.append(bytes(buf[eol + 2:eol + 2 + size]))
            pos = eol + 2 + size + 2

    # ---- use
    async def roundtrip(self, request: bytes) -> tuple[int, bytes]:
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Pool:
    """Idle keep-alive connections to one host:port."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list[_Connection] = []
        shown = f"[{host}]" if ":" in host else host  # an IPv6 literal
        self.host_header = f"Host: {shown}:{port}\r\n".encode()

    async def connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        return conn

    def take(self) -> _Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and not conn.buffer:
                conn.reused = True
                return conn
            conn.close()
        return None

    def give_back(self, conn: _Connection) -> None:
        if conn.closed or conn.close_after or conn.buffer:
            conn.close()
        else:
            self.idle.append(conn)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class LeanHTTP:
    """request(method, url, body, headers, timeout) -> (status, body bytes) over keep-alive pools."""

    def __init__(self, connect_timeout: float = 10.0):
        self.connect_timeout = connect_timeout
        self.pools: dict[tuple[str, int], _Pool] = {}

    def supports(self, url: str) -> bool:
        return url.startswith("http://")

    async def request(self, method: str, url: str, body: bytes | None = None, headers: dict | None = None,
                      timeout: float | None = None) -> tuple[int, bytes]:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        pool = self.pools.get((host, port))
        if pool is None:
            pool = self.pools[(host, port)] = _Pool(host, port)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        head = [f"{method} {target} HTTP/1.1\r\n".encode(), pool.host_header]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n".encode())
        if body is not None:
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        request = b"".join(head) + (body or b"")
        async with asyncio.timeout(timeout):
            for _ in range(2):
                conn = pool.take()
                if conn is None:
                    async with asyncio.timeout(self.connect_timeout):
                        conn = await pool.connect()
                try:
                    result = await conn.roundtrip(request)
                except StaleConnection:
                    # The server closed it while idle (it never saw this request); the other idle
                    # connections are most likely closed too (idle timeout, restart): drop them all.
                    conn.close()
                    pool.close()
                    continue
                except BaseException:
                    conn.close()  # e.g. a timeout mid-response: the connection is unusable
                    raise
                pool.give_back(conn)
                return result
            raise ConnectionResetError(f"{host}:{port} closed two connections in a row before answering")

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
