"""Preflight of a model adapter's backends, run once when ng_run starts (before "ready").

Every backend URL is checked in parallel, bounded to a few seconds in all:
- `GET <base>/models` must answer and list the configured model (else an error naming what
  the URL serves); an unreachable URL among reachable ones is a warning and the router takes
  it out of rotation (its probe brings it back); all unreachable is an error.
- vLLM backends only: `GET <root>/metrics` -> a warning when `vllm:cache_config_info` does
  not say `enable_prefix_caching="True"` (sticky sessions then buy nothing); `max_model_len`
  from /models is noted.
- token-exact adapters only: every backend must serve vLLM's token-in/token-out routes
  (`/v1/chat/completions/render`, `/inference/v1/generate`), else an error naming the URL and
  `--enable-scale-out` (ng_run exits 2 rather than fail every turn later).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from nemo_gym_cli.routing.backend import Backend
from nemo_gym_cli.model_adapter.vllm_gauges import scrape

SCALE_OUT_ROUTES = ("/v1/chat/completions/render", "/inference/v1/generate")  # paths under the root URL


def _served_models(data: Any) -> list[dict] | None:
    """The `data` list of an OpenAI /models answer, or None when the answer is not one."""
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return None
    return [m for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)]


async def check_scale_out(client, backend: Backend, model: str, headers: dict, timeout_s: float) -> str | None:
    """None when the backend serves render and generate, else what is wrong. Render gets a tiny
    chat (200 with token ids); generate an empty body (a validation error proves the route)."""
    probes = ({"model": model, "messages": [{"role": "user", "content": "preflight"}]}, {})
    for path, body in zip(SCALE_OUT_ROUTES, probes):
        url = backend.root_url + path
        try:
            status, raw = await asyncio.wait_for(client.raw_request("POST", url, orjson.dumps(body), headers, timeout_s),
                                                 timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - no answer: reported like a missing route
            status, raw = None, f"{type(e).__name__}: {e}".encode()
        if status == 404 or status is None or (path.endswith("/render") and status != 200):
            said = f"HTTP {status}" if status is not None else raw.decode(errors="replace")
            return (f"{url} is not served ({said}): token_exact needs vLLM >= 0.32 started with --enable-scale-out "
                    f"(or set token_exact: false)")
    return None


async def check_backend(client, backend: Backend, model: str, headers: dict, *, vllm: bool,
                        timeout_s: float, token_exact: bool = False) -> dict[str, Any]:
    """One backend: reachable? serves `model`? (vLLM: prefix caching on? max_model_len?)"""
    entry: dict[str, Any] = {"url": backend.url, "reachable": False, "serves": None, "error": None,
                             "max_model_len": None, "prefix_caching": None}
    metrics = asyncio.ensure_future(scrape(client, backend.root_url, headers, timeout_s)) if vllm else None
    try:
        status, raw = await asyncio.wait_for(
            client.raw_request("GET", backend.url + "/models", None, headers, timeout_s), timeout_s)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to answer means unreachable
        entry["error"] = f"GET /models: {'timed out' if isinstance(e, asyncio.TimeoutError) else f'{type(e).__name__}: {e}'}"
        status, raw = None, b""
    if status is not None:
        entry["reachable"] = True
        try:
            served = _served_models(orjson.loads(raw)) if status == 200 else None
        except orjson.JSONDecodeError:
            served = None
        if served is None:
            entry["error"] = f"GET /models -> HTTP {status}, not an OpenAI model list"
        else:
            entry["serves"] = [m["id"] for m in served]
            mine = next((m for m in served if m["id"] == model), None)
            if mine is None:
                entry["error"] = f"{backend.url} serves {entry['serves']}; the config asks for {model}"
            elif isinstance(mine.get("max_model_len"), int):
                entry["max_model_len"] = mine["max_model_len"]
    if metrics is not None:
        gauges, _ = await metrics
        entry["prefix_caching"] = gauges["prefix_caching"]
    if token_exact and entry["reachable"] and not entry["error"]:
        entry["error"] = await check_scale_out(client, backend, model, headers, timeout_s)
    return entry


async def preflight(upstream, model: str, *, vllm: bool, timeout_s: float, token_exact: bool = False) -> dict[str, Any]:
    """Check every backend of `upstream`; returns {backends, errors, warnings}. Unreachable
    backends (when others answer) are marked down in the router, so no session lands there."""
    router, client = upstream.router, upstream.server.client
    entries = await asyncio.gather(*(check_backend(client, b, model, upstream.headers, vllm=vllm, timeout_s=timeout_s,
                                                   token_exact=token_exact) for b in router.backends))
    errors: list[str] = []
    warnings: list[str] = []
    reachable = [e for e in entries if e["reachable"]]
    for backend, entry in zip(router.backends, entries):
        if not entry["reachable"]:
            if reachable:
                router.mark_down(backend, f"preflight: {entry['error']}")
                warnings.append(f"{backend.url} is unreachable ({entry['error']}); starting without it and probing it")
            continue
        if entry["error"]:
            errors.append(entry["error"])
        elif vllm and entry["prefix_caching"] is not True:
            said = "is off" if entry["prefix_caching"] is False else "is not reported (no vllm:cache_config_info)"
            warnings.append(f"{backend.url}: prefix caching {said}; sticky sessions buy nothing without it "
                            f"(start vLLM with --enable-prefix-caching)")
    if not reachable:
        errors.append("no backend answers: " + "; ".join(f"{e['url']}: {e['error']}" for e in entries))
    for backend, entry in zip(router.backends, entries):
        entry["state"] = "up" if backend.healthy else "down"
    return {"model": model, "backends": entries, "errors": errors, "warnings": warnings}
