"""The end of a collection: `<stem>_metrics.json` and the summary table (totals, then one row
per agent), plus the requests each model backend served during the run and the ones it failed
(malformed answers, errors, unavailable)."""

from __future__ import annotations

from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from nemo_gym_cli.serving.client import ServerClient


async def backend_counts(client: ServerClient, urls: list[str]) -> dict[str, dict[str, float]]:
    """Requests per model backend and outcome (ok, malformed, ...), from the adapters' /metrics."""
    counts: dict[str, dict[str, float]] = {}
    for url in urls:
        try:
            status, raw = await client.raw_request("GET", f"{url}/metrics", None, None, 5)
            samples = [s for family in text_string_to_metric_families(raw.decode()) for s in family.samples]
        except Exception:  # no spread table row for an adapter that cannot tell
            continue
        for sample in samples:
            if sample.name == "ng_model_backend_requests_total":
                outcomes = counts.setdefault(sample.labels.get("backend", ""), {})
                outcome = sample.labels.get("outcome", "")
                outcomes[outcome] = outcomes.get(outcome, 0.0) + sample.value
    return counts


def spread(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, int]]:
    """What each backend did during the run: requests by outcome."""
    return {b: {o: int(n - before.get(b, {}).get(o, 0.0)) for o, n in after[b].items()} for b in sorted(after)}


def summary(collector, per_backend: dict[str, int]) -> dict[str, Any]:
    stats = collector.stats
    totals = stats.totals()
    return {
        "agent_name": collector.agent,
        "input": str(collector.input),
        "output": str(collector.output),
        "rollouts": totals["rollouts"],
        "failures": totals["failures"],
        "retries": collector.run_.retries if collector.run_ else 0,
        "max_attempts": collector.max_attempts,
        "skipped_already_done": totals["skipped_already_done"],
        "interrupted": collector.interrupted,
        "elapsed_s": totals["elapsed_s"],
        "rollouts_per_s": totals["rollouts_per_s"],
        "latency_p50_s": totals["latency_p50_s"],
        "latency_p95_s": totals["latency_p95_s"],
        "latency_mean_s": totals["latency_mean_s"],
        "concurrency": collector.limit.value if collector.auto is None else collector.auto.settled(),
        **({"concurrency_auto": collector.auto.report()} if collector.auto is not None else {}),
        "means": totals["means"],
        "token_exact_turns": totals["token_exact_turns"],
        "token_exact_fallbacks": totals["token_exact_fallbacks"],
        "requests_per_backend": {b: outcomes.get("ok", 0) for b, outcomes in per_backend.items()},
        "errors_per_backend": {b: errors for b, outcomes in per_backend.items()
                               if (errors := {o: n for o, n in outcomes.items() if o != "ok" and n})},
        "per_agent": stats.per_agent(),
    }


PASS_AT_K_PER_LINE = 2  # pass@k values on one line of the table: with the labels it fits 80 columns


def agent_rows(name: str, agent: dict) -> list[tuple[str, str]]:
    """An agent's rows: its counts, its mean reward, its pass@k (short values: the table stays narrow)."""
    rows = [(f"agent {name}", f"{agent['rollouts']} rollouts, {agent['failures']} failed")]
    if "reward" in agent["means"]:
        rows.append(("  mean reward", f"{agent['means']['reward']:.4f}"))
    if agent["pass@k"]:
        rows.append(("  pass@k", pass_at_k_lines(agent["pass@k"])))
    return rows


def pass_at_k_lines(pass_at_k: dict) -> str:
    """`pass@1 0.5000  pass@2 0.7500` lines: a table cell of its own lines, never wrapped mid-value."""
    cells = [f"pass@{k} {v:.4f}" for k, v in pass_at_k.items()]
    return "\n".join("  ".join(cells[i:i + PASS_AT_K_PER_LINE]) for i in range(0, len(cells), PASS_AT_K_PER_LINE))


def report(collector, per_backend: dict[str, int]) -> dict:

    data = summary(collector, per_backend)
    try:
        collector.metrics_path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        saved = f"metrics: {collector.metrics_path}"
    except OSError as e:  # e.g. the disk filled at the very end: the rollouts are written, say so
        saved = f"metrics: cannot write {collector.metrics_path}: {e.strerror or e} (the table above has them)"
    collector.console.print(summary_table(data, collector.agent, collector.output.name, collector.failures_path.name))
    collector.console.print(saved, markup=False)
    return data


def summary_table(data: dict, agent: str | None, output_name: str, failures_name: str):
    """The summary as a rich Table as narrow as its content (it fits an 80-column terminal)."""
    from rich.table import Table

    title = agent or ", ".join(data["per_agent"]) or "no agent"
    table = Table(title=f"Rollouts: {title} -> {output_name}", show_header=False, expand=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("rollouts written", str(data["rollouts"]))
    failures = data["failures"]
    table.add_row("failures", f"{failures}" + (f" (see {failures_name})" if failures else ""))
    table.add_row("retries", f"{data['retries']} (max_attempts {data['max_attempts']})")
    if data["skipped_already_done"]:
        table.add_row("already done (resume)", str(data["skipped_already_done"]))
    for key, value in data["means"].items():
        table.add_row(f"mean {key}", f"{value:.4f}")
    if data["token_exact_turns"] or data["token_exact_fallbacks"]:
        fallbacks = data["token_exact_fallbacks"]
        table.add_row("token-exact turns", f"{data['token_exact_turns']}" + (
            f" ({fallbacks} not exact)" if fallbacks else ""))  # why: token_exact_reason
    table.add_row("rollouts/s", f"{data['rollouts_per_s']}")
    table.add_row("latency p50 / p95 (s)", f"{data['latency_p50_s']} / {data['latency_p95_s']}")
    auto = data.get("concurrency_auto")
    table.add_row("concurrency", str(data["concurrency"]) if auto is None else
                  f"auto: settled at {auto['settled']} (max {auto['maximum']}, {len(auto['trace'])} changes)"
                  + ("" if auto["signals"] else "; no vLLM gauges, held"))
    for name, agent in data["per_agent"].items():
        for label, value in agent_rows(name, agent):
            table.add_row(label, value)
    served = data["requests_per_backend"]
    total = sum(served.values())
    for backend, n in served.items():
        errors = "".join(f", {count} {outcome}" for outcome, count in data["errors_per_backend"].get(backend, {}).items())
        table.add_row(f"model requests {backend}", (f"{n} ({100 * n / total:.0f}%)" if total else "0") + errors)
    if data["interrupted"]:
        table.add_row("interrupted", "yes: complete with +resume=true")
    return table
