"""`GET /backends` of a model adapter: the router's view of each backend plus the backend's
own vLLM gauges and pause state (GET /is_paused), read on demand (in parallel, short timeout) so a
view is always current. A paused backend (a weight sync) is up, with `paused: true`."""

from __future__ import annotations

import asyncio
from typing import Any

from nemo_gym_cli.model_adapter.pause import is_paused
from nemo_gym_cli.model_adapter.vllm_gauges import EMPTY, scrape

VIEW_SCRAPE_TIMEOUT_S = 1.0


async def backends_report(upstream, model: str, *, vllm: bool) -> dict[str, Any]:
    router = upstream.router
    view = router.snapshot()

    async def gauges(backend) -> tuple[dict, str | None]:
        if not vllm:
            return dict(EMPTY), None
        if not backend.healthy:  # a down backend would only cost the timeout
            return dict(EMPTY), "down"
        return await scrape(upstream.server.client, backend.root_url, upstream.headers, VIEW_SCRAPE_TIMEOUT_S)

    async def paused(backend) -> bool | None:
        if not vllm or not backend.healthy:
            return None
        return await is_paused(upstream.server.client, backend, upstream.headers, VIEW_SCRAPE_TIMEOUT_S)

    scraped = await asyncio.gather(*(gauges(b) for b in router.backends), *(paused(b) for b in router.backends))
    n = len(router.backends)
    for entry, (values, why), pause in zip(view["backends"], scraped[:n], scraped[n:]):
        entry["vllm"] = values
        entry["metrics_error"] = why
        entry["paused"] = pause  # None: not known (no VLLM_SERVER_DEV_MODE, or down)
    view["model"] = model
    return view
