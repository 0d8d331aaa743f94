"""Prometheus text (a /metrics answer) read with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> list:
    """Every sample (name, labels, value) in the exposition text."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric_sums(text: str) -> dict[str, float]:
    """{sample name: sum over its label sets}, e.g. {"vllm:prefix_cache_hits_total": 96.0}."""
    out: dict[str, float] = {}
    for s in samples(text):
        out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0.0 when there are none)."""
    return sum(s.value for s in samples(text) if s.name == name and labels.items() <= s.labels.items())
