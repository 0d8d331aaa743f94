"""One server replica inside a Ray actor (the Ray counterpart of child.py; see ray_runner.py).

The actor serves the same aiohttp server as a child process would, on its own event loop in
a thread of its own, bound to its node's address (or the instance's `host`), and registers
`{name, url, pid, replica, node, host}` with the head server, node being the Ray node id and
host its address (what Ray says this node is at: reachable from the other nodes). Ray runs
`__init__` again when it restarts the actor, so a restarted replica serves and registers again
by itself. The driver (ng_run) only asks it when it is ready, waits for it to end, stops it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading

from nemo_gym_cli.config import secret_values, server_specs
from nemo_gym_cli.graph.host import host_servers
from nemo_gym_cli.serving.logs import ScrubbingStream, setup_logging
from nemo_gym_cli.serving.runtime import run_async


class ReplicaActor:
    """A Ray actor class once wrapped by `ray.remote` (ray_runner.py does; Ray is optional)."""

    def __init__(self, config: dict, name: str, replica: int):
        import ray  # only ever imported inside a Ray worker

        self.config, self.name, self.replica = config, name, replica
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.info: dict = {}
        self.error: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.serving = threading.Event()  # set once serving and registered, or failed
        self.ended = threading.Event()
        secrets = secret_values(config)
        setup_logging(secrets=secrets)
        if secrets:  # what the server prints goes to Ray's logs and the driver: mask it there
            sys.stdout, sys.stderr = ScrubbingStream(sys.stdout, secrets), ScrubbingStream(sys.stderr, secrets)
        threading.Thread(target=self._thread, name=f"{name}#{replica}", daemon=True).start()

    def _thread(self) -> None:
        try:
            run_async(serve_replica(self))
        except BaseException as e:  # noqa: BLE001 - reported to the driver through ready()/wait_stopped()
            self.error = f"{type(e).__name__}: {e}"
            print(f"server '{self.name}' replica {self.replica} cannot serve: {self.error}", file=sys.stderr)
        finally:
            self.serving.set()
            self.ended.set()

    # ------------------------------------------------------------ called by the driver
    def ready(self, timeout_s: float) -> dict:
        """Whether it serves (registered with the head server), and where: {pid, node, ip, error, serving}."""
        self.serving.wait(timeout_s)
        return {**self.info, "ip": self.node_ip, "node": self.node_id, "pid": os.getpid(), "error": self.error,
                "serving": bool(self.info) and self.error is None and not self.ended.is_set()}

    def wait_stopped(self) -> str | None:
        """Blocks until the server ends; its error, if it failed."""
        self.ended.wait()
        return self.error

    def stop(self, timeout_s: float) -> bool:
        """Stop serving (the server's shutdown hooks run); whether it ended within `timeout_s`."""
        loop, stop_event = self.loop, self.stop_event
        if loop is not None and stop_event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        return self.ended.wait(timeout_s)


async def serve_replica(actor: ReplicaActor) -> None:
    """The replica's server on the actor's own loop (not a method: a coroutine method would make
    Ray run the actor as an async actor, whose blocking calls would stall one another)."""
    actor.loop, actor.stop_event = asyncio.get_running_loop(), asyncio.Event()
    spec = server_specs(actor.config)[actor.name]
    # The node's address, so that other nodes reach it; 0.0.0.0 only if the instance asks.
    bind_host = str(spec.config.get("host") or actor.node_ip)

    def serving() -> None:
        actor.info = {"pid": os.getpid(), "replica": actor.replica}
        actor.serving.set()

    code = await host_servers(actor.config, [actor.name], actor.replica, actor.stop_event, bind_host=bind_host,
                              node=actor.node_id, host=actor.node_ip, advertise_host=actor.node_ip,
                              on_serving=serving)
    if code != 0:
        raise RuntimeError(f"server '{actor.name}' could not start or register (exit code {code}; its lines above say why)")
