"""Weight syncs: vLLM's RL pause API (`VLLM_SERVER_DEV_MODE=1`) as a model adapter sees it.

A trainer pauses vLLM to load new weights: `POST /pause?mode=abort|wait|keep`, `POST /resume`,
`GET /is_paused`. A paused backend still answers /health, so it is never "down"; a request it
aborted (200, `finish_reason: "abort"`) is not a finished turn: the caller waits here until the
backend serves again and goes on. `forward_pause()` sends one pause or resume to every backend.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from nemo_gym_cli.routing.backend import Backend
from nemo_gym_cli.serving.errors import backoff_delay
from nemo_gym_cli.serving.protocol import HTTPError

PAUSE_MODES = ("abort", "wait", "keep")  # vLLM's PauseMode
ABORTED = "abort"  # the finish_reason of a request that a pause (mode=abort) ended
PROBE_TIMEOUT_S = 2.0  # one GET /is_paused
POLL_BASE_S, POLL_CAP_S = 0.05, 1.0  # backoff between polls while paused (and between blind retries)


async def is_paused(client, backend: Backend, headers: dict, timeout_s: float = PROBE_TIMEOUT_S) -> bool | None:
    """The backend's GET /is_paused: True/False, or None when it cannot say (no dev mode, refused,
    malformed, not JSON): the caller then retries with backoff instead. A probe that times out
    while the router still counts the backend healthy is taken as paused: a loaded or pausing
    server answers late, and a blind re-send would wait in its paused engine past the deadline."""
    try:
        status, raw = await client.raw_request("GET", backend.root_url + "/is_paused", None, headers, timeout_s)
        answer = orjson.loads(raw) if status == 200 else None
    except TimeoutError:
        return True if backend.healthy else None  # a backend the router marked down: the re-send fails over
    except Exception:  # noqa: BLE001 - refused, malformed, not JSON: it does not say
        return None
    paused = answer.get("is_paused") if isinstance(answer, dict) else None
    return paused if isinstance(paused, bool) else None


async def wait_until_serving(client, backend: Backend, headers: dict, *, attempt: int, deadline: float,
                             what: str) -> None:
    """After an aborted request: return once `backend` serves again (GET /is_paused says false),
    or after one backoff step when it cannot say. Raises HTTPError 503 at `deadline` (the
    request's own timeout), so a pause that never ends fails the turn instead of hanging it."""
    polls = attempt
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HTTPError(503, f"{what}: {backend.url} aborted the request (paused for a weight sync?) and did not "
                                 f"serve again within the request timeout", "upstream_paused")
        paused = await is_paused(client, backend, headers, min(PROBE_TIMEOUT_S, remaining))
        if paused is False:
            return
        await asyncio.sleep(min(backoff_delay(polls, POLL_BASE_S, POLL_CAP_S), max(0.0, deadline - time.monotonic())))
        polls += 1
        if paused is None:  # no /is_paused: one backoff step, then the caller tries again
            return


async def forward_pause(client, backends: list[Backend], headers: dict, action: str, mode: str | None,
                  timeout_s: float) -> dict[str, Any]:
    """POST /pause (with `mode`) or /resume to every backend at once; one entry per backend."""
    query = f"?mode={mode}" if action == "pause" and mode else ""

    async def one(backend: Backend) -> dict[str, Any]:
        entry: dict[str, Any] = {"url": backend.url, "ok": False, "status": None, "answer": None, "error": None}
        try:
            status, raw = await client.raw_request("POST", f"{backend.root_url}/{action}{query}", b"", headers,
                                                   timeout_s)
        except Exception as e:  # noqa: BLE001 - reported per backend, the others still go
            entry["error"] = f"{type(e).__name__}: {e}".rstrip(": ")
            return entry
        entry["status"] = status
        try:
            entry["answer"] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            entry["answer"] = raw[:200].decode(errors="replace")
        entry["ok"] = status == 200
        if not entry["ok"]:
            entry["error"] = (f"HTTP {status}" + (" (start vLLM with VLLM_SERVER_DEV_MODE=1 for the pause API)"
                                                  if status == 404 else ""))
        return entry

    entries = await asyncio.gather(*(one(b) for b in backends))
    return {"action": action, "mode": mode if action == "pause" else None, "ok": all(e["ok"] for e in entries),
            "backends": list(entries)}
