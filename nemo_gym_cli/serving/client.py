"""The server client: call another server of the graph by name.

JSON over http:// goes through the lean keep-alive client (serving/http11.py); https:// through
one shared aiohttp.ClientSession per process. Both obey `http_client`: a per-host connection
cap, a response-size cap, and headers checked for CR/LF/NUL before anything is written.
Names resolve through the head server. A server that lives in this process is called directly
(local dispatch), with the same errors and retries as over HTTP.

Every call has a timeout and bounded retries (exponential backoff, full jitter). A call is
sent again only when the server cannot have acted on it, or when it is safe to repeat:
- any call: the connection was refused or never opened (`NotSent`), or the answer was 429 (a
  call by name that was refused goes to another replica instead: nothing listens there);
- idempotent calls also after a reset, a timeout or a 5xx. Idempotent are GET and the POSTs
  a caller marks `idempotent=True`: a model's /v1/responses and /v1/chat/completions
  (inference has no side effects) and /release_session. Everything else (/seed_session,
  tools, /verify, /run) runs at most once per call; the collector's own retries
  (`+max_attempts`) decide about whole rollouts.
A call by name goes to one replica of the server (serving/replicas.py: least in flight, a
session stays on its replica). Its timeout is the server's liveness, not a fixed time: a
replica with calls in flight that has answered none for `stall_s` is probed on /health, and
one that misses `liveness_failures` probes in a row is frozen: its calls are cut off at once
(failure "frozen") and it is left for its restarted process, while a long call of a server
whose /health answers runs to its end. A replica that is gone (it refused the call, or reset it and
then refused or reset a probe: its process is dead or dying, and what it did died with it) is left for another
one, or for its restarted process; a session that lived on it fails, naming why.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from nemo_gym_cli.config.paths import base_defaults
from nemo_gym_cli.config.typed import load_config
from nemo_gym_cli.serving.cookies import SessionCookies
from nemo_gym_cli.serving.errors import (ALREADY_RETRIED, NOT_PROCESSED_STATUSES, NOT_SENT_ERRORS, RETRY_STATUSES,
                                         UNAVAILABLE_ERRORS, ServerCallError, backoff_delay, error_message,
                                         failure_kind)
from nemo_gym_cli.serving.head_client import HeadClient
from nemo_gym_cli.serving.http11 import IDEMPOTENT_METHODS, BodyCap, InvalidRequest, LeanHTTP, ProtocolError, check_header
from nemo_gym_cli.serving.protocol import SESSION_HEADER, HTTPError
from nemo_gym_cli.serving.replicas import LOOKUP_WAIT_S, Replica, Replicas, Resolver

if TYPE_CHECKING:
    from nemo_gym_cli.serving.base import BaseServer

MAX_FAILOVERS = 3  # a call by name moves on from a gone replica at most this often
WATCH_INTERVAL_S = 1.0  # how often the liveness watchdog looks for replicas whose calls stall


@dataclass(kw_only=True)
class HttpClientConfig:
    """`http_client` of the config. What each field does and its default: conf/base.yaml, the one
    place for them (a caller's partial dict is laid over those defaults)."""

    timeout_s: float
    connect_timeout_s: float
    max_retries: int
    backoff_base_s: float
    backoff_max_s: float
    connector_limit: int
    connector_limit_per_host: int
    max_response_bytes: int
    resolve_timeout_s: float
    stall_s: float
    liveness_timeout_s: float
    liveness_failures: int

    @classmethod
    def of(cls, given: "HttpClientConfig | dict | None") -> "HttpClientConfig":
        if isinstance(given, HttpClientConfig):
            return given
        return load_config(cls, {**base_defaults()["http_client"], **(given or {})}, "http_client")


def make_http_session(cfg: HttpClientConfig, limit: int | None = None) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=limit if limit is not None else cfg.connector_limit,
        limit_per_host=cfg.connector_limit_per_host,
        ttl_dns_cache=300,
        enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s, sock_connect=cfg.connect_timeout_s)
    # orjson for bodies we send; responses are read as bytes and parsed with orjson too.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, json_serialize=lambda o: orjson.dumps(o).decode(),
                                 cookie_jar=aiohttp.DummyCookieJar())


class ServerClient:
    def __init__(self, http_config: dict | None = None, head_url: str | None = None, local_servers: dict[str, "BaseServer"] | None = None):
        self.http_config = cfg = HttpClientConfig.of(http_config)
        self.head_url = head_url.rstrip("/") if head_url else None
        self.local_servers: dict[str, BaseServer] = local_servers if local_servers is not None else {}
        self.max_retries = cfg.max_retries
        self.backoff_base = cfg.backoff_base_s
        self.backoff_max = cfg.backoff_max_s
        self._session: aiohttp.ClientSession | None = None
        self.timeout_s = cfg.timeout_s
        self.max_response_bytes = cfg.max_response_bytes
        # JSON calls over http:// (our servers, vLLM) use the lean client; the rest aiohttp.
        self.lean = LeanHTTP(connect_timeout=cfg.connect_timeout_s,
                             per_host_limit=cfg.connector_limit_per_host or cfg.connector_limit,
                             max_response_bytes=self.max_response_bytes)
        # How long a call by name waits for a replica to come back (ng_run restarts with up to 8 s backoff).
        self.resolve_timeout_s = cfg.resolve_timeout_s
        self.resolver = Resolver(self.servers)
        self._watchdog: asyncio.Task | None = None
        self.cookies = SessionCookies()  # what servers set per session (NeMo Gym's stateful environments)

    @property
    def http(self) -> aiohttp.ClientSession:
        """The one shared client session of this process (created on first use, in the running loop)."""
        if self._session is None or self._session.closed:
            self._session = make_http_session(self.http_config)
        return self._session

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.lean.close()
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def raw_request(self, method: str, url: str, data: bytes | None, headers: dict | None,
                          timeout_s: float | None, *, idempotent: bool | None = None,
                          cap: BodyCap | None = None, set_cookies: list[str] | None = None) -> tuple[int, bytes]:
        """One HTTP exchange, no retries: (status, body); `set_cookies` gets the answer's
        Set-Cookie values. Raises UNAVAILABLE_ERRORS (NotSent when nothing went out),
        ProtocolError for a malformed or oversized answer (over `cap`, default
        http_client.max_response_bytes), InvalidRequest for a header with CR/LF/NUL."""
        if self.lean.supports(url):
            return await self.lean.request(method, url, data, headers, timeout_s or self.timeout_s, idempotent=idempotent,
                                           cap=cap, set_cookies=set_cookies)
        for name, value in (headers or {}).items():
            check_header(name, str(value))
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        cap = cap or BodyCap(self.max_response_bytes, "http_client.max_response_bytes")
        async with self.http.request(method, url, data=data, headers=headers, timeout=timeout) as resp:
            if resp.content_length is not None and resp.content_length > cap.limit:
                raise cap.refuse(url, resp.content_length)
            if set_cookies is not None:
                set_cookies.extend(resp.headers.getall("Set-Cookie", ()))
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > cap.limit:
                    raise cap.refuse(url)
            return resp.status, bytes(body)

    async def health_status(self, url: str, timeout_s: float) -> int:
        """`GET url` -> HTTP status, for health checks: through the same clients as requests,
        but never waiting behind the per-host connection cap (a probe stuck behind slow calls
        would make a slow backend look dead)."""
        if self.lean.supports(url):
            return (await self.lean.request("GET", url, None, None, timeout_s, uncapped=True))[0]
        return (await self.raw_request("GET", url, None, None, timeout_s))[0]

    # ------------------------------------------------------------ name resolution
    async def servers(self) -> list[dict]:
        return await HeadClient(self).servers()

    async def replicas(self, name: str, wait: bool = True, new_session: bool = False) -> Replicas:
        """The replicas of a name; waits (bounded) while none serves, e.g. during a restart. A name
        missing a replica is looked up again; a `new_session` waits for that lookup (bounded, see
        serving/replicas.py), since it stays on the replica it gets."""
        reps = self.resolver.names.get(name)
        if reps is not None and reps.live and reps.degraded:
            lookup = self.resolver.maybe_refresh()
            if lookup is not None and new_session:
                await asyncio.wait([lookup], timeout=LOOKUP_WAIT_S)
                reps = self.resolver.names.get(name)
        if reps is not None and reps.live:
            return reps
        deadline = asyncio.get_running_loop().time() + self.resolve_timeout_s
        while True:
            await self.resolver.refresh()
            reps = self.resolver.names.get(name)
            if reps is None:
                known = ", ".join(sorted(self.resolver.known)) or "none"
                raise ServerCallError(name, self.head_url or "", f"no server named '{name}' is registered (known: {known})", 404)
            if reps.live or not wait:
                return reps
            if asyncio.get_running_loop().time() > deadline:
                raise ServerCallError(name, self.head_url or "", f"no replica of '{name}' is serving (waited "
                                      f"{self.resolve_timeout_s:g} s for one to come back)", failure="unavailable")
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------ calls
    async def post(self, server: str, path: str, body: Any = None, *, session_id: str | None = None,
                   headers: dict | None = None, timeout_s: float | None = None,
                   retry_statuses: frozenset[int] = RETRY_STATUSES, idempotent: bool = False) -> Any:
        """POST by server name: to the session's replica, else the least busy one. `idempotent=True`
        only for calls that are safe to run twice (see the module docstring): it allows re-sending
        after a reset, a timeout or a 5xx. A call moves on from a replica that is gone (refused it,
        or reset it and then a probe found nothing serving: its process is dead); see serving/replicas.py."""
        local = self.local_servers.get(server)
        if local is not None:
            return await self._local_call(local, "POST", path, body, session_id, retry_statuses, headers, idempotent)
        set_cookies: list[str] | None = None
        if session_id:
            headers = {**(headers or {}), SESSION_HEADER: session_id}
            cookie = self.cookies.header(server, session_id)
            if cookie:
                headers["Cookie"] = cookie
            set_cookies = []
        for failovers in range(MAX_FAILOVERS + 1):
            reps = self.resolver.names.get(server)
            if reps is None or not reps.live or reps.degraded:  # (the common case skips a coroutine)
                new_session = session_id is not None and (reps is None or reps.pinned(session_id) is None)
                reps = await self.replicas(server, new_session=new_session)
            fresh = False  # this call made the session's pin: nothing of the session is on it yet
            if session_id is None:
                replica = reps.least_loaded()
            else:
                replica = reps.pinned(session_id)
                if replica is None:
                    replica, fresh = reps.least_loaded(), True
                    reps.pin(session_id, replica)
                elif replica.gone:
                    reps.unpin(session_id)
                    raise ServerCallError(server, replica.url, f"replica {replica.index} of '{server}' is gone (crashed "
                                          f"or restarted) and session {session_id} was there", failure="gone")
            task = asyncio.current_task()
            if not replica.in_flight:
                replica.answered_at = time.monotonic()  # the stall clock starts with its first call in flight
            replica.in_flight += 1
            replica.calls.add(task)
            if self._watchdog is None:
                self._watchdog = asyncio.ensure_future(self._watch_liveness())
            try:
                return await self.request_json("POST", replica.url + path, body, headers=headers, server=server,
                                               timeout_s=timeout_s, retry_statuses=retry_statuses, idempotent=idempotent,
                                               set_cookies=set_cookies, refused_is_final=True)
            except asyncio.CancelledError:
                if replica.frozen is None or task not in replica.calls or task.uncancel() > 0:
                    raise  # cancelled by its caller, not cut off by the watchdog
                raise ServerCallError(server, replica.url, f"replica {replica.index} of '{server}' stopped answering "
                                      f"/health ({replica.frozen}); the call was cut off", failure="frozen") from None
            except ServerCallError as e:
                if e.failure not in ("refused", "reset") or failovers == MAX_FAILOVERS or not await self._is_gone(replica, e):
                    raise
                self.resolver.mark_gone(replica)
                if session_id is not None and not fresh:
                    reps.unpin(session_id)
                    raise ServerCallError(server, replica.url, f"replica {replica.index} of '{server}' went away during "
                                          f"the call, with session {session_id} ({e.message})", failure="gone") from None
                if session_id is not None:
                    reps.unpin(session_id)  # re-pinned on the next replica
            finally:
                replica.in_flight -= 1
                replica.calls.discard(task)
                replica.answered_at = time.monotonic()
                if set_cookies:
                    self.cookies.store(server, session_id, set_cookies)
                    set_cookies.clear()
        raise AssertionError("unreachable")

    def forget_sessions(self, session_ids: list[str]) -> None:
        """Rollouts ended: drop the cookies their servers set."""
        self.cookies.forget(session_ids)

    async def _watch_liveness(self) -> None:
        """Probe replicas whose calls stall; cut off the calls of one that stopped answering."""
        cfg = self.http_config
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            stalled = [r for reps in self.resolver.names.values() for r in reps.live
                       if r.in_flight and now - r.answered_at > cfg.stall_s]
            if not stalled:
                continue
            results = await asyncio.gather(*(self.health_problem(r.url, cfg.liveness_timeout_s) for r in stalled))
            for replica, why in zip(stalled, results):
                if why is None:
                    replica.misses, replica.answered_at = 0, time.monotonic()  # alive, just slow: look again later
                    continue
                replica.misses += 1
                if replica.misses >= cfg.liveness_failures and not replica.gone:
                    replica.frozen = f"{replica.misses} probes in a row: {why}"
                    self.resolver.mark_gone(replica)
                    for task in list(replica.calls):
                        task.cancel()

    async def health_problem(self, url: str, timeout_s: float, path: str = "/health") -> str | None:
        """Liveness of a server of the graph (also ng_run's supervisor's probe): None if `GET url+path`
        answers within timeout_s, else why not. Any answer below 500 is alive: NeMo Gym's servers
        have no /health (a 404), and liveness is about answering at all."""
        try:
            async with asyncio.timeout(timeout_s):
                status = await self.health_status(url + path, timeout_s)
        except TimeoutError:
            return f"no answer within {timeout_s:g} s"
        except Exception as e:  # noqa: BLE001 - refused, reset, malformed: all "not answering"
            return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return None if status < 500 else f"HTTP {status}"

    async def _is_gone(self, replica: Replica, error: ServerCallError) -> bool:
        """Refused: nothing listens there. Reset: gone only if a probe finds nothing serving too
        (a live server that reset one connection may have acted on the call: never send it twice).
        The probe is refused once the process is dead, and reset without an answer while it is
        being killed: its closing listen socket still completes handshakes, and a live server
        always answers /health."""
        if replica.gone or error.failure == "refused":
            return True
        try:
            await self.health_status(replica.url + "/health", 2)
        except Exception as e:
            return failure_kind(e) in ("refused", "reset")
        return False

    async def post_each(self, server: str, path: str, body: Any = None, **kwargs) -> list[Any]:
        """The same call to every live replica of a server (e.g. releasing sessions); returns the
        answers; raises the first error after all calls ended."""
        local = self.local_servers.get(server)
        if local is not None:
            return [await self.post(server, path, body, **kwargs)]
        reps = await self.replicas(server)
        results = await asyncio.gather(*(self.request_json("POST", r.url + path, body, server=server, **kwargs)
                                         for r in reps.live), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    async def _local_call(self, server: "BaseServer", method: str, path: str, body: Any, session_id: str | None,
                          retry_statuses: frozenset[int], headers: dict | None = None, idempotent: bool = False) -> Any:
        # The JSON round trip gives the callee its own copy of the body, exactly as HTTP would
        # (and rejects what JSON cannot carry). Handlers return fresh data, so the result is
        # handed over as is: copying it too cost 7% of a co-located graph's CPU.
        payload = orjson.loads(orjson.dumps(body)) if body is not None else {}
        try:
            for name, value in (headers or {}).items():
                check_header(name, str(value))  # as over HTTP: what could not be sent is not passed on
        except InvalidRequest as e:
            raise ServerCallError(server.name, f"local:{path}", f"request refused before sending: {e}", 400,
                                  "invalid_request_error") from None
        if not idempotent:
            retry_statuses = retry_statuses & NOT_PROCESSED_STATUSES
        for attempt in range(self.max_retries + 1):
            try:
                return await server.dispatch(method, path, payload, session_id, headers)
            except HTTPError as e:
                status, message, etype = e.status, e.message, e.type
            except Exception as e:
                server.log.exception("%s %s failed", method, path)
                status, message, etype = 500, f"{server.name}: {type(e).__name__}: {e}", "server_error"
            if status not in retry_statuses or etype in ALREADY_RETRIED or attempt == self.max_retries:
                raise ServerCallError(server.name, f"local:{path}", message, status, etype)
            await asyncio.sleep(backoff_delay(attempt, self.backoff_base, self.backoff_max))
        raise AssertionError("unreachable")

    async def request_json(self, method: str, url: str, body: Any = None, *, headers: dict | None = None,
                           server: str = "", timeout_s: float | None = None, retries: int | None = None,
                           retry_statuses: frozenset[int] = RETRY_STATUSES, idempotent: bool | None = None,
                           set_cookies: list[str] | None = None, refused_is_final: bool = False) -> Any:
        """One HTTP call with timeout and bounded retries (only where safe, see the module
        docstring); returns the parsed JSON body (`set_cookies` gets the Set-Cookie values).
        `refused_is_final`: a refused connection is not tried again here (a call by name moves on
        to another replica at once: nothing listens at this one's address any more)."""
        retries = self.max_retries if retries is None else retries
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        if not idempotent:
            retry_statuses = retry_statuses & NOT_PROCESSED_STATUSES
        data = orjson.dumps(body) if body is not None else None
        hdrs = {"Content-Type": "application/json", **(headers or {})} if data is not None else headers
        for attempt in range(retries + 1):
            try:
                status, raw = await self.raw_request(method, url, data, hdrs, timeout_s, idempotent=idempotent,
                                                     set_cookies=set_cookies)
                try:
                    parsed = orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    parsed = None
                    if status < 400:
                        raise ServerCallError(server, url, f"response is not JSON: {raw[:200]!r}", status) from None
                if status < 400:
                    return parsed
                message = error_message(parsed, raw[:500].decode(errors="replace"))
                etype = parsed.get("error", {}).get("type") if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict) else None
                if status not in retry_statuses or etype in ALREADY_RETRIED or attempt == retries:
                    raise ServerCallError(server, url, message, status, etype)
            except InvalidRequest as e:
                raise ServerCallError(server, url, f"request refused before sending: {e}", 400, "invalid_request_error") from None
            except ProtocolError as e:
                raise ServerCallError(server, url, f"malformed answer: {e}") from None
            except UNAVAILABLE_ERRORS as e:
                sent = not isinstance(e, NOT_SENT_ERRORS)
                final = refused_is_final and failure_kind(e) == "refused"
                if attempt == retries or (sent and not idempotent) or final:
                    cause = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                    if isinstance(e, asyncio.TimeoutError):
                        cause = "timed out"
                    if sent and not idempotent:
                        raise ServerCallError(server, url, f"{cause} (not re-sent: {method} may have run)",
                                              failure=failure_kind(e)) from None
                    raise ServerCallError(server, url, f"{cause} (after {attempt + 1} tries)", failure=failure_kind(e)) from None
            await asyncio.sleep(backoff_delay(attempt, self.backoff_base, self.backoff_max))
        raise AssertionError("unreachable")
