"""vLLM's own Prometheus metrics, scraped from a backend's `<root>/metrics` on demand.

Only what the rollout stack reacts to: requests running and waiting, KV-cache usage, the
prefix-cache hit rate, preemptions, and whether prefix caching is on (`vllm:cache_config_info`).
A backend that serves none of these (OpenAI, a proxy) gives nulls, never an error.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# Newest name first: vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc.
KV_CACHE_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
SCRAPE_TIMEOUT_S = 2.0
EMPTY = {"running": None, "waiting": None, "kv_cache_usage": None, "prefix_cache_hit_rate": None,
         "prefix_cache_queries": None, "prefix_cache_hits": None, "preemptions": None, "prefix_caching": None}


def parse(text: str) -> dict[str, Any]:
    """The gauges we use from a Prometheus text exposition (summed over engines / label sets)."""
    sums: dict[str, float] = {}
    prefix_caching: bool | None = None
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("vllm:"):
            continue
        for sample in family.samples:
            if sample.name == "vllm:cache_config_info":
                flag = str(sample.labels.get("enable_prefix_caching", "")).lower()
                prefix_caching = (prefix_caching is not False) and flag == "true"
            elif not sample.name.endswith(("_created", "_bucket", "_count", "_sum")):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    kv = next((sums[n] for n in KV_CACHE_USAGE if n in sums), None)
    queries, hits = sums.get("vllm:prefix_cache_queries_total"), sums.get("vllm:prefix_cache_hits_total")
    return {
        "running": sums.get("vllm:num_requests_running"),
        "waiting": sums.get("vllm:num_requests_waiting"),
        "kv_cache_usage": kv,
        "prefix_cache_hit_rate": hits / queries if queries and hits is not None else None,
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "preemptions": sums.get("vllm:num_preemptions_total"),
        "prefix_caching": prefix_caching,
    }


async def scrape(client, root_url: str, headers: dict | None = None,
                 timeout_s: float = SCRAPE_TIMEOUT_S) -> tuple[dict[str, Any], str | None]:
    """(gauges, None) or (all-null gauges, why not): one GET <root>/metrics, no retry."""
    url = root_url + "/metrics"
    try:
        status, raw = await asyncio.wait_for(client.raw_request("GET", url, None, headers, timeout_s), timeout_s)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable is an answer here, not a failure
        return dict(EMPTY), f"GET /metrics: {type(e).__name__}: {e}".rstrip(": ")
    if status != 200:
        return dict(EMPTY), f"GET /metrics -> HTTP {status}"
    try:
        return parse(raw.decode(errors="replace")), None
    except ValueError as e:  # not Prometheus text (an OpenAI-style endpoint's HTML, JSON...)
        return dict(EMPTY), f"GET /metrics: not Prometheus text ({e})"
