"""Several hosts on one machine for multi-host tests: Linux network namespaces linked by a veth
pair, each with its own loopback and an address from 192.0.2.0/24 (TEST-NET-1: nothing leaves
the machine). Needs root with the rights to make them (why_no_namespaces says) and iproute2's `ip`.

A process runs on a host through `host.argv([...])` (`ip netns exec`, which execs: the pid is the
command's own); the test's own HTTP calls reach a host through `host.call(fn, ...)`, which runs
`fn` in a thread that joined the namespace, so its sockets live there. Leaving `linked_hosts`
ends every process still in the namespaces (by pid, from `ip netns pids`) and deletes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Iterator

CLONE_NEWNET = 0x40000000
PREFIX_LEN = 24


class Host:
    """The machine itself (the root network namespace): commands and calls run as they are."""

    name = "local"

    def argv(self, argv: list[str]) -> list[str]:
        return list(argv)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


LOCAL = Host()


class NetNS(Host):
    """One network namespace: a host with `address` on its end of the link."""

    def __init__(self, name: str, address: str):
        self.name, self.address = name, address

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        outcome: dict[str, Any] = {}

        def inside() -> None:
            try:
                _join(self.name)  # this thread only; it ends with the call
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                outcome["error"] = e

        thread = threading.Thread(target=inside, name=f"in {self.name}", daemon=True)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def pids(self) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=10)
        return [int(p) for p in done.stdout.split()]

def end_processes(hosts: list[NetNS], grace_s: float = 3) -> None:
    """SIGTERM every process in the namespaces, SIGKILL what is left after `grace_s` (Ray's own
    daemons take longer than that to exit on SIGTERM; nothing of theirs needs to survive)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        pids = [p for host in hosts for p in host.pids()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            pids = [p for host in hosts for p in host.pids() if _alive(p)]
            if pids:
                time.sleep(0.1)
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended (its parent reaps it)
    except (FileNotFoundError, IndexError):
        return False


def _join(name: str) -> None:
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if hasattr(os, "setns"):  # Python >= 3.12
            os.setns(fd, os.CLONE_NEWNET)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({name}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def why_no_namespaces() -> str | None:
    """None if this process can make linked network namespaces; else the reason, for a skip. Being
    root is not enough (a container may withhold CAP_SYS_ADMIN or CAP_NET_ADMIN): it makes a
    namespace with a veth pair in it, and says what `ip` said when it could not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` to create network namespaces"
    probe = f"ngprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
    except RuntimeError as e:
        return f"cannot create linked network namespaces here: {e}"
    finally:  # (deleting the namespace deletes the pair in it)
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


@contextlib.contextmanager
def linked_hosts(tag: str, addresses: list[str]) -> Iterator[list[NetNS]]:
    """Two namespaces `<tag>a`, `<tag>b` with `addresses`, linked by a veth pair. The tag keeps
    names unique per test run (namespace and link names are machine-wide; at most 12 characters)."""
    assert len(addresses) == 2 and len(tag) <= 12, (tag, addresses)
    hosts = [NetNS(f"{tag}{side}", address) for side, address in zip("ab", addresses)]
    made: list[NetNS] = []
    try:
        for host in hosts:
            _ip("netns", "add", host.name)
            made.append(host)
        _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for host, side in zip(hosts, "ab"):
            _ip("link", "set", f"{tag}v{side}", "netns", host.name)
            _ip("-n", host.name, "addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", f"{tag}v{side}")
            _ip("-n", host.name, "link", "set", "lo", "up")
            _ip("-n", host.name, "link", "set", f"{tag}v{side}", "up")
        yield hosts
    finally:
        end_processes(made)
        for host in made:  # deleting a namespace deletes its end of the link, and so the pair
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", f"{tag}va"], capture_output=True, timeout=10)  # if it never moved
