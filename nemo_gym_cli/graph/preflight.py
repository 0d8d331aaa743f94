"""ng_run's side of the preflight: ask every model adapter to check its backends (they run the
checks: model_adapter/backend_checks.py), print the warnings, and stop the graph on an error (exit 2)."""

from __future__ import annotations

import asyncio

from rich.table import Table
from rich.text import Text

from nemo_gym_cli.config import MODEL_SERVERS
from nemo_gym_cli.serving.client import ServerClient
from nemo_gym_cli.serving.errors import ServerCallError


async def preflight_models(servers: list[dict], timeout_s: float = 30.0) -> tuple[list[str], list[str], dict[str, dict]]:
    """(errors, warnings, report per model server name). A model server without /preflight
    (a user's own adapter) is skipped."""
    client = ServerClient({"max_retries": 0})
    models = [s for s in servers if s.get("server_type") == MODEL_SERVERS and s.get("url")]

    async def ask(s: dict) -> dict | None:
        try:
            return await client.request_json("POST", f"{s['url']}/preflight", {}, server=s["name"], timeout_s=timeout_s, retries=0)
        except ServerCallError as e:
            if e.status == 404:
                return None
            return {"errors": [f"preflight failed: {e.message}"], "warnings": [], "backends": []}

    try:
        answers = await asyncio.gather(*(ask(s) for s in models))
    finally:
        await client.close()
    errors, warnings, reports = [], [], {}
    for s, report in zip(models, answers):
        if report is None:
            continue
        reports[s["name"]] = report
        errors += [f"{s['name']}: {e}" for e in report.get("errors", [])]
        warnings += [f"{s['name']}: {w}" for w in report.get("warnings", [])]
    return errors, warnings, reports


def backends_table(reports: dict[str, dict]) -> Table:
    table = Table(title="Model backends (preflight)")
    for col in ("server", "backend", "state", "model", "max_model_len", "prefix caching"):
        table.add_column(col)
    for name, report in reports.items():
        for b in report.get("backends", []):
            state = b.get("state", "?")
            caching = {True: "on", False: "off"}.get(b.get("prefix_caching"), "-")
            # Text, not markup: URLs and model names are data
            table.add_row(Text(name), Text(b["url"]), Text(state, style="green" if state == "up" else "red"),
                          Text(str(report.get("model", "-"))), str(b.get("max_model_len") or "-"), caching)
    return table
