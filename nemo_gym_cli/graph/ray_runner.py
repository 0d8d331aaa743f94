"""ng_run on an existing Ray cluster (`+ray.address=auto|ray://...|host:port`): every server
replica is a Ray actor (ray_replica.py) placed by Ray, with Ray's own vocabulary.

ng_run is the Ray driver. Per instance, `ray_actor_options` go straight to `.options()`
(num_cpus, num_gpus, resources, label selectors, max_restarts, ...); `ray.placement: spread`
asks Ray to spread each instance's replicas over nodes, `pack` puts one instance's replicas
in one placement group packed onto as few nodes as fit. Ray restarts
a replica whose process dies (`max_restarts`, default 3); the restarted actor serves and
registers again, and the head server counts the restart. Stopping ng_run stops every actor it
started (and Ray removes them when the driver exits anyway). The head server and the
collector stay on the ng_run node; actors reach the head server at `ray.head_server_host`,
by default this machine's address on the cluster network (head_server_host() says how).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import os
import socket
from typing import Any, Callable

from nemo_gym_cli.config import ServerSpec
from nemo_gym_cli.config.specs import NEMO_GYM
from nemo_gym_cli.graph.processes import LAST_LINES

PLACEMENTS = ("spread", "pack")
DEFAULT_ACTOR_OPTIONS = {"max_restarts": 3, "max_concurrency": 4}  # ready/wait/stop calls may overlap
INSTALL_HINT = "pip install -e '.[ray]'"
RESTART_POLL_S = 0.2
LOOPBACK = ("127.", "localhost", "[::1]", "::1")
# The head's Ray Client server forks a server per client from a multi-threaded gRPC process; with
# gRPC's fork support on, that child sometimes crashes before it starts.
CLIENT_SERVER_HINT = ("\n(the head node's Ray Client server could not start a server for this client; a known cause is "
                      "gRPC's fork support: start the head with GRPC_ENABLE_FORK_SUPPORT=0 in its environment, or retry)")


class RayUnavailable(Exception):
    """Ray is not installed, or the cluster cannot be reached: a one-line reason for the user."""


def ray_address(config: dict) -> str | None:
    return ((config.get("ray") or {}).get("address")) or None


def placement_of(config: dict) -> str:
    return str(config["ray"]["placement"])  # its default is in conf/ng_run.yaml


def check_ray_config(config: dict, specs: dict[str, ServerSpec]) -> list[str]:
    """Problems with `ray.*` (address, placement) and `ray_actor_options`, one line each."""
    problems = []
    for name, spec in specs.items():
        options = spec.config.get("ray_actor_options")
        if options is not None and not isinstance(options, dict):
            problems.append(f"'{name}.{spec.server_type}.{spec.impl}.ray_actor_options' must be a mapping of Ray "
                            f"actor options (num_cpus, num_gpus, resources, ...), got {options!r}")
    if placement_of(config) not in PLACEMENTS:
        problems.append(f"'ray.placement' must be one of {', '.join(PLACEMENTS)}, got {placement_of(config)!r}")
    if ray_address(config) and config.get("colocate"):
        problems.append("+ray.address and +colocate=true do not go together: on Ray every server replica is an actor")
    nemo = [s.where for s in specs.values() if s.runtime == NEMO_GYM]
    if ray_address(config) and nemo:
        problems.append(f"'ray.address' and NeMo Gym servers ({', '.join(nemo)}) do not go together: a NeMo Gym "
                        f"server reads the host:port of every server it calls once, at start, but on Ray our servers "
                        f"are actors that Ray places (and places again when it restarts them) on any node. Drop "
                        f"+ray.address: ng_run then runs every server on this machine and starts one Ray cluster for "
                        f"the NeMo Gym servers, or give them yours with +nemo_gym.ray_address=<its address>")
    return problems


def is_client_address(address: str) -> bool:
    """A Ray Client address (ray://host:port): the driver runs here but is no node of the cluster."""
    return address.startswith("ray://")


def connect(config: dict) -> Any:
    """Attach to the cluster at `ray.address` as its driver; returns the `ray` module."""
    address = str(ray_address(config))
    if address.removeprefix("ray://").startswith(LOOPBACK):
        # Ray rewrites a loopback address to this host's outward IP unless told the cluster
        # lives on loopback (as a one-machine test cluster with node_ip_address 127.0.0.1 does).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every replica's lines, not "[repeated 2x across cluster]"
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(f"+ray.address={address} needs Ray, which is not installed here ({e}): {INSTALL_HINT}") from None
    try:
        ray.init(address=address, namespace=str(config["ray"]["namespace"]),  # its default: conf/ng_run.yaml
                 log_to_driver=True, logging_level="WARNING", configure_logging=False)
    except Exception as e:  # ConnectionError, a version mismatch, a bad address ...
        hint = CLIENT_SERVER_HINT if "Starting Ray client server failed" in str(e) else ""
        raise RayUnavailable(f"cannot attach to the Ray cluster at {address}: {type(e).__name__}: {e}{hint}") from None
    return ray


def head_server_host(ray: Any, config: dict) -> str:
    """The address actors reach the head server at: `ray.head_server_host` if set, else this
    machine's address on the cluster network. A driver attached through the GCS is a node, so
    that is its node address; a Ray Client driver (ray://) is not, so it is the local address on
    the route to the head node (what the kernel would send from). Never loopback for a cluster
    whose nodes are not on loopback: no other node could reach it."""
    configured = (config.get("ray") or {}).get("head_server_host")
    if configured:
        return str(configured)
    if not is_client_address(str(ray_address(config))):
        return str(ray.util.get_node_ip_address())
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    head = next((n for n in nodes if "node:__internal_head__" in (n.get("Resources") or {})), nodes[0] if nodes else None)
    if head is None:
        raise RayUnavailable("the Ray cluster reports no live node")
    try:
        host = route_source(str(head["NodeManagerAddress"]))
    except OSError as e:  # no route from here to the head node
        raise RayUnavailable(f"no route from this machine to the Ray head node {head['NodeManagerAddress']} "
                             f"({e.strerror}): set +ray.head_server_host=<an address of this machine that every node reaches>") from None
    if _is_loopback(host) and not all(_is_loopback(str(n["NodeManagerAddress"])) for n in nodes):
        raise RayUnavailable(f"this machine reaches the Ray head node {head['NodeManagerAddress']} only over loopback, "
                             f"which other nodes cannot use to reach the head server: set +ray.head_server_host=<an address "
                             f"of this machine that every node reaches>")
    return host


def route_source(ip: str) -> str:
    """The local address this machine sends from to reach `ip` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((ip, 9))
        return str(s.getsockname()[0])


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def expose(head: Any, host: str, port: int) -> None:
    """Serve the head server on `host` too (it keeps its loopback address for ng_status and the collector)."""
    from aiohttp import web

    from nemo_gym_cli.graph.build import LISTEN_BACKLOG

    try:
        await web.TCPSite(head.running.runner, host, port, backlog=LISTEN_BACKLOG).start()
    except OSError as e:
        raise RayUnavailable(f"cannot serve the head server for the actors on {host}:{port} ({e.strerror}): "
                             f"+ray.head_server_host must be an address of this machine") from None


async def _result(ref: Any, timeout_s: float | None = None) -> Any:
    """The value of a Ray object ref, awaited without blocking the loop. Our wait may time out or
    be cancelled; Ray's own future is left to complete (Ray Client's callback thread raises
    InvalidStateError into the log when it finds that future cancelled)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def relay(done: Any) -> None:
        try:
            loop.call_soon_threadsafe(_settle, waiter, done)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    ref.future().add_done_callback(relay)
    return await (asyncio.wait_for(waiter, timeout_s) if timeout_s else waiter)


def _settle(waiter: asyncio.Future, done: Any) -> None:
    if waiter.done():  # our wait timed out or was cancelled
        return
    error = done.exception()
    if error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(done.result())


class RayReplicas:
    """Makes one ReplicaRunner (supervisor.py) per replica; owns the instances' placement groups.

    Used as ng_run's runner factory: `factory(spec, replica)` (actors get the config as an
    argument). `head` is ng_run's HeadServer, already started.
    """

    def __init__(self, ray: Any, config: dict, head: Any, say: Callable[[str], None]):
        from nemo_gym_cli.graph.ray_replica import ReplicaActor

        self.ray, self.config, self.head, self.say = ray, config, head, say
        self.ready_timeout_s = float(config["ready_timeout_s"])
        self.actor_class = ray.remote(ReplicaActor)
        self.groups: dict[str, Any] = {}
        self.head_host = head_server_host(ray, config)
        self._actor_config: dict | None = None
        self._exposing = asyncio.Lock()

    async def actor_config(self) -> dict:
        """The config actors get: the head server at an address every node can reach."""
        async with self._exposing:
            if self._actor_config is None:
                host, (bound, port) = self.head_host, self.head.host_and_port
                if host != bound and bound not in ("0.0.0.0", "::"):
                    await expose(self.head, host, port)
                self._actor_config = {**self.config, "head_server": {**(self.config.get("head_server") or {}),
                                                                     "host": host, "port": port}}
            return self._actor_config

    def on_restart(self, name: str, replica: int, dead_pid: int | None) -> None:
        """A replica's actor died and Ray restarts it: clients stop picking it until it registers again."""
        entry = self.head.servers.get((name, replica))
        if entry is not None and entry["pid"] == dead_pid:  # (not if the new one registered already)
            self.head.mark_restarting(name, replica)

    def runner(self, spec: ServerSpec, replica: int) -> "RayReplica":
        options = {**DEFAULT_ACTOR_OPTIONS, **(spec.config.get("ray_actor_options") or {})}
        if "scheduling_strategy" not in options:
            if placement_of(self.config) == "pack" and spec.replicas > 1:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    self._group(spec, options), placement_group_bundle_index=replica)
            else:
                options["scheduling_strategy"] = "SPREAD"
        return RayReplica(self, spec, replica, options)

    def _group(self, spec: ServerSpec, options: dict) -> Any:
        """One PACK placement group per instance, one bundle per replica (the actor's own resources)."""
        if spec.name not in self.groups:
            from ray.util.placement_group import placement_group

            bundle = {"CPU": float(options.get("num_cpus", 1)), "GPU": float(options.get("num_gpus", 0)),
                      **{k: float(v) for k, v in (options.get("resources") or {}).items()}}
            bundle = {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.01}
            self.groups[spec.name] = placement_group([bundle] * spec.replicas, strategy="PACK", name=f"ng_{spec.name}")
        return self.groups[spec.name]

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self.groups.values():
            try:
                remove_placement_group(group)
            except Exception:  # the cluster went away: nothing left to remove
                pass
        self.groups.clear()


class RayReplica:
    """A ReplicaRunner (supervisor.py) for one replica as a Ray actor; each start() is a new actor."""

    def __init__(self, owner: RayReplicas, spec: ServerSpec, replica: int, options: dict):
        self.owner, self.spec, self.replica, self.options = owner, spec, replica, options
        self.label = spec.label(replica)
        self.members = [(spec.name, replica)]
        self.actor: Any = None
        self.pid: int | None = None
        self._failed = False
        self.lines: collections.deque[str] = collections.deque(maxlen=LAST_LINES)

    async def start(self) -> None:
        self._failed, self.pid = False, None
        config = await self.owner.actor_config()
        self.actor = self.owner.actor_class.options(**self.options).remote(config, self.spec.name, self.replica)

    async def wait(self) -> str:
        ray = self.owner.ray
        while True:
            actor = self.actor
            if actor is None:
                return "stopped"
            try:
                info = await _result(actor.ready.remote(self.owner.ready_timeout_s))
            except ray.exceptions.ActorUnavailableError:
                await asyncio.sleep(RESTART_POLL_S)  # Ray is restarting it: ask the new one
                continue
            except ray.exceptions.RayActorError as e:  # ActorDiedError: out of restarts, or killed
                self._failed = True
                return self._note(f"as a Ray actor that is gone for good: {_first_line(e)}")
            if info["error"]:
                self._failed = True
                return self._note(f"failed to serve: {info['error']}")
            if not info["serving"]:
                continue  # not ready yet: ask again (the head server's readiness timeout decides)
            if info["pid"] != self.pid:
                what = "restarted by Ray" if self.pid else "runs"
                url = self.owner.head.servers[(self.spec.name, self.replica)]["url"]  # as it registered
                self.owner.say(f"[{self.label}] {what} on Ray node {info['node']} ({info['ip']}), pid {info['pid']}, "
                               f"serving at {url}")
                self.pid = info["pid"]
            try:
                error = await _result(actor.wait_stopped.remote())
            except ray.exceptions.RayActorError as e:
                # Its process died; Ray restarts it (max_restarts) unless it was the last restart.
                if self.actor is None:
                    return "stopped"
                self.lines.append(f"actor process {self.pid} died: {_first_line(e)}")
                self.owner.on_restart(self.spec.name, self.replica, self.pid)
                continue
            self._failed = error is not None
            return self._note(f"with error: {error}" if error else "cleanly")

    def _note(self, how: str) -> str:
        self.lines.append(f"ended {how}")
        return how

    def failed(self) -> bool:
        return self._failed

    def last_lines(self) -> list[str]:
        return list(self.lines)

    def kill(self) -> None:
        """Kill its process; Ray restarts it (max_restarts) as after a crash, wait() sees to the rest."""
        if self.actor is not None:
            self.owner.ray.kill(self.actor, no_restart=False)

    async def stop(self, grace_s: float) -> None:
        actor, self.actor = self.actor, None
        if actor is None:
            return
        try:
            await _result(actor.stop.remote(grace_s), grace_s + 5)
        except Exception:  # already dead, restarting or stuck: kill it below
            pass
        self.owner.ray.kill(actor, no_restart=True)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
