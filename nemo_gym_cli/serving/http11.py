"""A lean HTTP/1.1 keep-alive client for JSON calls over plain http:// (our hops, vLLM).

Why: aiohttp's client costs ~60-80 us of CPU per request, which is most of the CPU our servers
spend per rollout (the bench/throughput.py profile). Our calls are simple: POST/GET a JSON
body, read the whole response. This client writes the request in one call and hands the
response to `httptools` (llhttp, as uvicorn uses): strict Content-Length and chunk sizes, 1xx
skipped. https:// and anything unusual go to aiohttp.

Errors:
- `InvalidRequest` (ValueError): a header name or value with CR, LF or NUL, or a bad target;
  raised before anything is written.
- `NotSent` (ConnectionError): the request never reached the server (refused, connect failed
  or timed out): always safe to send again.
- `ProtocolError`: the server's answer is not valid HTTP/1.1 or is larger than the cap; names
  the server. Never a success.
- ConnectionResetError / TimeoutError: the request went out and no complete answer came back;
  the server may have acted on it.
A kept-alive connection found closed when taken from the pool is never used, also when the peer
closed it a moment ago and the event loop has not yet seen that (the socket's TCP state tells). One that closes
without a byte of answer after the request went out (keep-alive race) is re-sent on a new
connection only for an idempotent call (GET, or `idempotent=True`): a POST may have run.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from typing import NamedTuple
from urllib.parse import urlsplit

import httptools

from nemo_gym_cli.config.paths import base_defaults

MAX_HEADER_BYTES = 64 * 1024
# A connection idle longer than this is closed, not reused: uvicorn (vLLM) closes idle ones after
# 5 s, and a request written into a connection the server is closing gets no answer.
MAX_IDLE_S = 4.0
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TCP_ESTABLISHED = 1  # tcpi_state of a connection neither side has closed (Linux <netinet/tcp.h>)
_BAD_IN_HEADER = ("\r", "\n", "\0")


class BodyCap(NamedTuple):
    """The most bytes an answer's body may have, and the setting that says so (named in the error)."""

    limit: int
    setting: str

    def refuse(self, where: str, size: int | None = None) -> "ProtocolError":
        said = f"of {size} bytes is" if size is not None else "is"
        return ProtocolError(f"{where}: response body {said} over the {self.limit}-byte cap ({self.setting})")


class ProtocolError(Exception):
    """The server sent something that is not a valid HTTP/1.1 response (or too large a one)."""


class InvalidRequest(ValueError):
    """A request that must not be written: CR/LF/NUL in a header, or a bad target."""


class NotSent(ConnectionError):
    """The request never reached the server: safe to send again whatever it is."""


class StaleConnection(ConnectionResetError):
    """A reused connection closed after the request was written, before any byte of an answer."""


def check_header(name: str, value: str) -> None:
    """Refuse header names/values that could end the header (CR, LF) or confuse a parser (NUL)."""
    for text in (name, value):
        if any(c in text for c in _BAD_IN_HEADER):
            raise InvalidRequest(f"header {name!r}: CR, LF and NUL are not allowed in header names or values")
    if not name or ":" in name or " " in name:
        raise InvalidRequest(f"header name {name!r} is not a valid token")


class _Connection(asyncio.Protocol):
    __slots__ = ("transport", "pool", "parser", "waiter", "body", "body_size", "head_size", "status", "framed",
                 "headers_done", "keep_alive", "got_bytes", "closed", "reused", "idle_since", "counted", "cap",
                 "cookies")

    def __init__(self, pool: "_Pool"):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.reused = False
        self.counted = True  # in pool.open until discarded
        self.idle_since = 0.0
        self.cap = pool.cap  # this exchange's (roundtrip sets it)
        self._reset()

    def _reset(self) -> None:
        self.body: list[bytes] = []
        self.body_size = 0
        self.head_size = 0
        self.status = 0
        self.framed = False  # Content-Length or Transfer-Encoding seen (else the body ends at EOF)
        self.headers_done = False
        self.keep_alive = False
        self.got_bytes = False
        self.cookies: list[bytes] | None = None  # Set-Cookie values of this answer

    # ---- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._fail(cause if isinstance(cause, ProtocolError) else ProtocolError(f"{self.pool.where}: {cause}"))
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError(f"{self.pool.where}: unexpected protocol upgrade (HTTP {self.status})"))
        except httptools.HttpParserError as e:
            self._fail(ProtocolError(f"{self.pool.where}: malformed HTTP response: {e}"))
        else:
            if not self.headers_done:
                self.head_size += len(data)
                if self.head_size > MAX_HEADER_BYTES:
                    self._fail(ProtocolError(f"{self.pool.where}: response headers larger than 64 KiB"))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool.discard(self)
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        where = self.pool.where
        if self.headers_done and not self.framed and self.status not in (204, 304):
            waiter.set_result((self.status, b"".join(self.body)))  # a body that runs to EOF
        elif not self.got_bytes and self.reused:
            waiter.set_exception(StaleConnection(f"{where} closed a kept-alive connection without answering"))
        elif not self.got_bytes:
            waiter.set_exception(ConnectionResetError(f"{where} closed the connection without answering ({exc or 'EOF'})"))
        else:
            waiter.set_exception(ConnectionResetError(
                f"{where} closed the connection mid-response: truncated after {self.body_size} body bytes"))

    def _fail(self, error: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        self.close()

    # ---- httptools callbacks
    def on_message_begin(self) -> None:
        if self.headers_done:  # bytes after the final answer: never reuse this connection
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self.framed = True
            if name == b"content-length" and value.isdigit() and int(value) > self.cap.limit:
                raise self.cap.refuse(self.pool.where, int(value))  # refused before a byte of it is read
        elif name == b"set-cookie":
            if self.cookies is None:
                self.cookies = []
            self.cookies.append(value)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status >= 200:
            self.headers_done = True
            self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.body_size > self.cap.limit:
            raise self.cap.refuse(self.pool.where)
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        if not self.headers_done:  # a 1xx interim answer: the real one follows
            self.framed = False
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result((self.status, self.body[0] if len(self.body) == 1 else b"".join(self.body)))

    # ---- use
    async def roundtrip(self, request: bytes, cap: BodyCap) -> tuple[int, bytes]:
        self._reset()
        self.cap = cap
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def peer_closed(self) -> bool:
        """The peer closed (its FIN or RST is in the kernel) but the event loop has not run our
        reader yet: a loaded process can take a pooled connection in that window, and a request
        written there gets no answer. One getsockopt per reuse; False where TCP_INFO is unknown."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None or not hasattr(socket, "TCP_INFO"):
            return False
        try:
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED
        except OSError:
            return True

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self.pool.discard(self)


class _Pool:
    """Keep-alive connections to one host:port, at most `limit` open at once (0: no cap)."""

    def __init__(self, host: str, port: int, limit: int, max_body: int):
        self.host, self.port, self.limit = host, port, limit
        self.cap = BodyCap(max_body, "http_client.max_response_bytes")
        self.where = f"{host}:{port}"
        self.idle: list[_Connection] = []
        self.open = 0  # connections open or opening, idle or busy
        self.waiters: deque[asyncio.Future] = deque()
        shown = f"[{host}]" if ":" in host else host  # an IPv6 literal
        self.host_header = f"Host: {shown}:{port}\r\n".encode()

    def take(self) -> _Connection | None:
        """An idle connection that is still open at both ends and was used recently, or None."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < MAX_IDLE_S and not conn.peer_closed():
                conn.reused = True
                return conn
            conn.close()
        return None

    async def connect(self, timeout: float, uncapped: bool = False) -> _Connection:
        """A new connection, waiting for a free slot under the cap. Raises NotSent on failure."""
        while self.limit and self.open >= self.limit and not uncapped:
            conn = self.take()
            if conn is not None:
                return conn
            slot = asyncio.get_running_loop().create_future()
            self.waiters.append(slot)
            try:
                await slot
            except BaseException:
                if slot.done() and not slot.cancelled():
                    self._wake()  # pass the slot we were given on
                raise
        self.open += 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except (OSError, TimeoutError) as e:
            self.open -= 1
            self._wake()
            cause = "connect timed out" if isinstance(e, TimeoutError) else (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            raise NotSent(f"cannot connect to {self.where}: {cause}") from e
        except BaseException:
            self.open -= 1
            self._wake()
            raise
        return conn

    def give_back(self, conn: _Connection) -> None:
        if conn.closed or not conn.keep_alive:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        if self.waiters:
            self._wake()

    def discard(self, conn: _Connection) -> None:
        """A connection closed: free its slot (once)."""
        if conn.counted:
            conn.counted = False
            self.open -= 1
            if self.waiters:
                self._wake()

    def _wake(self) -> None:
        while self.waiters:
            slot = self.waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                return

    def close_idle(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class LeanHTTP:
    """request(method, url, body, headers, timeout) -> (status, body bytes) over keep-alive pools.

    `per_host_limit` caps the open connections per host:port (0: no cap; callers over it wait
    for one); `max_response_bytes` caps a response body.
    """

    def __init__(self, connect_timeout: float | None = None, per_host_limit: int = 0, max_response_bytes: int | None = None):
        defaults = base_defaults()["http_client"]  # connect_timeout_s and max_response_bytes: their one home
        self.connect_timeout = defaults["connect_timeout_s"] if connect_timeout is None else connect_timeout
        self.per_host_limit = per_host_limit
        self.max_response_bytes = defaults["max_response_bytes"] if max_response_bytes is None else max_response_bytes
        self.pools: dict[tuple[str, int], _Pool] = {}

    def supports(self, url: str) -> bool:
        return url.startswith("http://")

    def build(self, method: str, url: str, body: bytes | None, headers: dict | None) -> tuple[_Pool, bytes]:
        """The pool and the request bytes; raises InvalidRequest for what must not be written."""
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        pool = self.pools.get((host, port))
        if pool is None:
            pool = self.pools[(host, port)] = _Pool(host, port, self.per_host_limit, self.max_response_bytes)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if not target.isprintable() or " " in target or not method.isalpha():
            raise InvalidRequest(f"{method} {target!r}: the method must be letters and the target printable, without spaces")
        head = [f"{method} {target} HTTP/1.1\r\n".encode(), pool.host_header]
        for name, value in (headers or {}).items():
            value = str(value)
            if not name.isprintable() or not value.isprintable() or ":" in name or not name:
                check_header(name, value)
            head.append(f"{name}: {value}\r\n".encode())
        if body is not None:
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        return pool, b"".join(head) + (body or b"")

    async def request(self, method: str, url: str, body: bytes | None = None, headers: dict | None = None,
                      timeout: float | None = None, *, idempotent: bool | None = None,
                      uncapped: bool = False, cap: BodyCap | None = None,
                      set_cookies: list[str] | None = None) -> tuple[int, bytes]:
        """`idempotent` (default: GET/HEAD/OPTIONS) allows re-sending after a keep-alive race;
        `uncapped` opens a connection beyond the per-host cap instead of waiting (health checks);
        `cap` is a smaller body cap for this call (default: max_response_bytes); `set_cookies`
        gets the answer's Set-Cookie values."""
        pool, request = self.build(method, url, body, headers)
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        async with asyncio.timeout(timeout):
            for attempt in (1, 2):
                conn = pool.take()
                if conn is None:
                    conn = await pool.connect(self.connect_timeout, uncapped)
                try:
                    result = await conn.roundtrip(request, cap or pool.cap)
                except StaleConnection:
                    conn.close()
                    pool.close_idle()  # most likely closed too (idle timeout, restart)
                    if idempotent and attempt == 1:
                        continue
                    raise
                except BaseException:
                    conn.close()  # e.g. a timeout mid-response: the connection is unusable
                    raise
                if set_cookies is not None and conn.cookies:
                    set_cookies.extend(v.decode("latin-1") for v in conn.cookies)
                pool.give_back(conn)
                return result
            raise ConnectionResetError(f"{pool.where} closed two connections in a row before answering")

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close_idle()
        self.pools.clear()
