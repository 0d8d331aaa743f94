"""ng_status: the servers a running ng_run knows, and whether each answers now."""

from __future__ import annotations

import asyncio


from rich.table import Table

from nemo_gym_cli.serving.client import ServerCallError, ServerClient
from nemo_gym_cli.serving.logs import make_console
from nemo_gym_cli.config import head_url


async def show_status(config: dict) -> int:
    console = make_console()
    client = ServerClient({"max_retries": 0, "connect_timeout_s": 3}, head_url(config))
    try:
        try:
            servers = await client.servers()
        except ServerCallError as e:
            console.print(f"ng_status: no head server at {client.head_url} ({e.message}).\n"
                          f"Start the graph with: ng_run \"+config_paths=[...]\" "
                          f"(or point at it with +head_server.host=... +head_server.port=...)", style="red", markup=False)
            return 1

        async def check(s: dict) -> str:
            if not s.get("url"):
                return "no url"
            try:
                await client.request_json("GET", f"{s['url']}/health", server=s["name"], timeout_s=3, retries=0)
                return "[green]up[/green]"
            except ServerCallError as e:
                return f"[red]down[/red] ({e.message})"

        answers = await asyncio.gather(*(check(s) for s in servers))
        table = Table(title=f"head server {client.head_url}")
        for col in ("name", "type", "impl", "url", "pid", "state", "restarts", "answers"):
            table.add_column(col)
        for s, answer in zip(servers, answers):
            name = s["name"] if not s.get("replica") else f"{s['name']}#{s['replica']}"
            table.add_row(name, s["server_type"], s["impl"], s.get("url") or "-", str(s.get("pid") or "-"), s["state"],
                          str(s.get("restarts", 0)), answer)
        console.print(table)
        return 0 if all("up" in a for a in answers) else 1
    finally:
        await client.close()
