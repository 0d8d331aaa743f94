"""Processes the harness starts: console scripts, free ports, polling for readiness, stopping."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from nemo_gym_cli.config.paths import PROJECT_ROOT
PY = sys.executable
BIN = Path(sys.executable).parent  # the console scripts installed with the project


def script(name: str) -> str:
    """Path of a console script installed next to this Python (ng_run, ng_vllm_standin, ...)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install the project into this Python (pip install -e {PROJECT_ROOT})")
    return str(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GaveUp(Exception):
    """Raised by a wait_until predicate when waiting longer cannot help (the process died)."""


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy (returned); exceptions count as "not yet"
    except GaveUp. TimeoutError names `what` and the last error."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except GaveUp:
            raise
        except Exception as e:  # not up yet
            last = e
        time.sleep(interval)  # poll interval, not a readiness guess
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what} (last error: {last})")


async def wait_until_async(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    """wait_until inside an event loop: the loop runs while it waits. Returns predicate()'s first
    truthy value; TimeoutError names `what` after `timeout` s (an exception from it is raised)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := predicate()):
        if loop.time() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)  # poll interval, not a readiness guess
    return result


def start_process(argv: list[str], log_path: Path, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start `argv` in its own session (so stop_process can signal its whole group), output to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15, group: bool = True) -> int | None:
    """Signal the process (its whole group by default), wait up to `timeout`, then SIGKILL the group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    return proc.returncode


def run_cli(name: str, args: list[str], cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a console script (ng_collect_rollouts, ng_dump_config, ...) to completion."""
    return subprocess.run([script(name), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
