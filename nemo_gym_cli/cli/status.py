"""ng_status: the servers a running ng_run knows and whether each answers now, every model
adapter's backends (router state + vLLM's own gauges), and the collections in progress.
`--watch` redraws it in place every second until Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from nemo_gym_cli.config import MODEL_SERVERS, head_url
from nemo_gym_cli.graph.head import node_label
from nemo_gym_cli.serving.client import ServerClient
from nemo_gym_cli.serving.errors import ServerCallError
from nemo_gym_cli.serving.head_client import HeadClient
from nemo_gym_cli.serving.logs import make_console

HELP = """usage: ng_status [--watch] [+head_server.port={head_server[port]}]

Ask the head server of a running ng_run for its servers and check that each answers now; show
every model adapter's backends (up/down, in flight, sessions, requests, failovers, and vLLM's
running, waiting, KV cache, prefix-cache hit rate, preemptions) and the collections in progress.
--watch redraws it in place every second until Ctrl-C.
"""

WATCH_INTERVAL_S = 1.0
ANSWER_TIMEOUT_S = 3  # a server (or the head server) slower than this to answer is shown down
DASH = "-"


@dataclass
class Snapshot:
    servers: list[dict]
    answers: list[str | None]  # None: answers /health; else why not
    backends: dict[str, dict | str] = field(default_factory=dict)  # model server -> /backends view, or why not
    collections: list[dict] = field(default_factory=list)

    @property
    def all_up(self) -> bool:
        return all(a is None for a in self.answers)


async def take_snapshot(client: ServerClient) -> Snapshot:
    """Raises ServerCallError when the head server does not answer."""
    servers = await client.servers()

    async def health(s: dict) -> str | None:
        if not s.get("url"):
            return "no url"
        try:
            await client.request_json("GET", s["url"] + s["probe_path"], server=s["name"], timeout_s=ANSWER_TIMEOUT_S, retries=0)
            return None
        except ServerCallError as e:
            return e.message

    async def backends(s: dict) -> dict | str:
        try:
            return await client.request_json("GET", f"{s['url']}/backends", server=s["name"], timeout_s=ANSWER_TIMEOUT_S, retries=0)
        except ServerCallError as e:
            return e.message

    async def collections() -> list[dict]:
        try:
            return await HeadClient(client).collections(timeout_s=ANSWER_TIMEOUT_S)
        except ServerCallError:
            return []  # an older head server

    models = [s for s in servers if s.get("server_type") == MODEL_SERVERS and s.get("url")]
    answers, views, running = await asyncio.gather(
        asyncio.gather(*(health(s) for s in servers)), asyncio.gather(*(backends(s) for s in models)), collections())
    return Snapshot(servers, list(answers), {s["name"]: v for s, v in zip(models, views)}, running)


def _num(value, fmt: str = "{:g}") -> str:
    return DASH if value is None else fmt.format(value)


def servers_table(snap: Snapshot, head: str) -> Table:
    table = Table(title=f"head server {head}")
    for col in ("name", "type", "impl", "url", "node", "pid", "state", "restarts", "answers"):
        table.add_column(col)
    for s, why in zip(snap.servers, snap.answers):
        answer = Text("up", style="green") if why is None else Text(f"down ({why})", style="red")
        table.add_row(Text(s["label"]), s["server_type"], Text(s["impl"]), Text(s.get("url") or DASH),
                      Text(node_label(s)), str(s.get("pid") or DASH), s["state"], str(s.get("restarts", 0)), answer)
    return table


def backends_table(snap: Snapshot) -> Table:
    table = Table(title="model backends")
    for col in ("server", "backend", "state", "in flight", "sessions", "requests", "failovers",
                "running", "waiting", "KV cache", "prefix hits", "preempted"):
        table.add_column(col, justify="left" if col in ("server", "backend", "state") else "right")
    for name, view in snap.backends.items():
        if isinstance(view, str):
            table.add_row(Text(name), DASH, Text(f"no /backends ({view})", style="yellow"), *[DASH] * 9)
            continue
        for b in view.get("backends", []):
            g = b.get("vllm") or {}
            if not b.get("healthy"):
                state = Text(f"down ({b.get('down_reason')})", style="red")
            elif b.get("paused"):  # a weight sync: it answers /health, its requests wait or come back aborted
                state = Text("paused", style="yellow")
            else:
                state = Text("up", style="green")
            requests = b.get("requests") or {}
            table.add_row(Text(name), Text(b["url"]), state, str(b.get("in_flight", DASH)), str(b.get("sessions", DASH)),
                          str(sum(requests.values())), str(b.get("failovers", DASH)),
                          _num(g.get("running")), _num(g.get("waiting")), _num(g.get("kv_cache_usage"), "{:.0%}"),
                          _num(g.get("prefix_cache_hit_rate"), "{:.0%}"), _num(g.get("preemptions")))
    return table


def collections_table(snap: Snapshot) -> Table:
    table = Table(title="collections")
    for col in ("agent", "output", "state", "done", "failed", "rollouts/s", "mean reward", "concurrency"):
        table.add_column(col, justify="right" if col not in ("agent", "output", "state") else "left")
    for c in snap.collections:
        done = f"{c.get('done')}/{c['total']}" if c.get("total") else str(c.get("done"))
        state = f"{c.get('state')}: {c['reason']}" if c.get("reason") else str(c.get("state"))  # why it failed or was lost
        table.add_row(Text(str(c.get("agent"))), Text(str(c.get("output"))), Text(state), done, str(c.get("failed")),
                      _num(c.get("rollouts_per_s")), _num(c.get("mean_reward"), "{:.3f}"), _num(c.get("concurrency")))
    return table


def render(snap: Snapshot, head: str) -> Group:
    parts = [servers_table(snap, head)]
    if snap.backends:
        parts.append(backends_table(snap))
    if snap.collections:
        parts.append(collections_table(snap))
    return Group(*parts)


async def show_status(config: dict, watch: bool = False) -> int:
    console = make_console()
    if not console.is_terminal:
        console.width = 240  # the backends table is wide; piped output should not squeeze it
    client = ServerClient({"max_retries": 0, "connect_timeout_s": ANSWER_TIMEOUT_S}, head_url(config))
    try:
        try:
            snap = await take_snapshot(client)
        except ServerCallError as e:
            console.print(f"ng_status: no head server at {client.head_url} ({e.message}).\n"
                          f"Start the graph with: ng_run \"+config_paths=[...]\" "
                          f"(or point at it with +head_server.host=... +head_server.port=...)", style="red", markup=False)
            return 1
        if not watch:
            console.print(render(snap, client.head_url))
            return 0 if snap.all_up else 1
        return await _watch(console, client, snap)
    finally:
        await client.close()


async def _watch(console, client: ServerClient, snap: Snapshot) -> int:
    """Redraw every second until Ctrl-C / SIGTERM (exit 0); a head server gone away is shown, not fatal."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        with Live(render(snap, client.head_url), console=console, auto_refresh=False) as live:
            while True:
                done, _ = await asyncio.wait([stopped], timeout=WATCH_INTERVAL_S)
                if done:
                    break
                fetch = asyncio.ensure_future(take_snapshot(client))
                done, _ = await asyncio.wait([fetch, stopped], return_when=asyncio.FIRST_COMPLETED)
                if fetch not in done:  # stopped mid-fetch
                    fetch.cancel()
                    await asyncio.gather(fetch, return_exceptions=True)
                    break
                try:
                    view = render(fetch.result(), client.head_url)
                except ServerCallError as e:
                    view = Text(f"head server {client.head_url} does not answer ({e.message}); retrying", style="red")
                live.update(view, refresh=True)
    finally:
        stopped.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
