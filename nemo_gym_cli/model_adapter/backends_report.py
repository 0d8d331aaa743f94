"""`GET /backends` of a model adapter: the router's view of each backend plus the backend's
own vLLM gauges, scraped on demand (in parallel, short timeout) so a view is always current."""

from __future__ import annotations

import asyncio
from typing import Any

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

    scraped = await asyncio.gather(*(gauges(b) for b in router.backends))
    for entry, (values, why) in zip(view["backends"], scraped):
        entry["vllm"] = values
        entry["metrics_error"] = why
    view["model"] = model
    return view
