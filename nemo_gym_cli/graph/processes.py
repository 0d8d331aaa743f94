"""A unit of the graph as a child process of ng_run (`python -m nemo_gym_cli.graph.child ...`).

Its output is scrubbed of secrets, prefixed with its label on ng_run's stderr, appended to
`<log_dir>/<label>.log` when configured, and its last lines kept for the report when it dies.
It runs in its own process group (stopping it stops what it started, also what it started in
other groups: Ray's workers; what it leaves behind when it exits goes too) and gets SIGTERM if
ng_run itself dies, even by SIGKILL. The resolved config (secrets included) reaches it through
its stdin, never a file: nothing with secrets outlives the graph on disk.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Callable

import psutil

from nemo_gym_cli.serving.logs import scrub

LAST_LINES = 40


def _die_with_parent() -> None:
    """Child side of fork: get SIGTERM if ng_run itself dies (even by SIGKILL). Linux only."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalProcess:
    """A ReplicaRunner (see supervisor.py) for one child process; each start() is a new process."""

    def __init__(self, label: str, members: list[tuple[str, int]], child_args: list[str], secrets: set[str],
                 log_dir: str | None, *, command: list[str] | None = None, cwd: str | None = None,
                 env: dict[str, str] | None = None, config: bytes | None = None,
                 on_started: Callable[[str, int, list[str]], None] | None = None):
        """`child_args` of our child module; or `command` run as is (NeMo Gym's servers, a Ray
        head) in `cwd`, with `env` as its whole environment. `config`: the resolved config as JSON,
        written to its stdin (child.py reads it there); `on_started(label, pid, command)`: told of
        every new process (the graph's leftovers record)."""
        self.label, self.members, self.child_args, self.secrets = label, members, child_args, secrets
        self.command = command or [sys.executable, "-m", "nemo_gym_cli.graph.child", *child_args]
        self.cwd, self.env = cwd, env
        self.config, self.on_started = config, on_started
        self.log_path = Path(log_dir) / f"{label}.log" if log_dir else None
        self.proc: asyncio.subprocess.Process | None = None
        self.pump: asyncio.Task | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=LAST_LINES)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self) -> None:
        self.lines.clear()  # the report of a death shows the lines of that life
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, cwd=self.cwd,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL if self.config is None else asyncio.subprocess.PIPE,
            env=self.env or {**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True, preexec_fn=_die_with_parent,
        )
        if self.on_started is not None:
            self.on_started(self.label, self.proc.pid, self.command)
        self.pump = asyncio.create_task(self._pump(self.proc))
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.write(self.config)
                await self.proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # it died at once: wait() reports how
            finally:
                self.proc.stdin.close()

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        prefix = f"[{self.label}] "
        log_file = open(self.log_path, "a") if self.log_path else None
        try:
            while line := await proc.stdout.readline():
                text = scrub(line.decode(errors="replace").rstrip("\n"), self.secrets)
                self.lines.append(text)
                sys.stderr.write(prefix + text + "\n")
                if log_file:
                    log_file.write(text + "\n")
                    log_file.flush()
        finally:
            if log_file:
                log_file.close()

    async def wait(self) -> str:
        assert self.proc is not None and self.pump is not None
        code = await self.proc.wait()
        _signal_group(self.proc, signal.SIGKILL)  # what it left behind (a Ray head's agents, a server's workers)
        await asyncio.shield(self.pump)  # its last lines
        return f"with code {code}"

    def failed(self) -> bool:
        return self.proc is not None and self.proc.returncode not in (None, 0)

    def last_lines(self) -> list[str]:
        return list(self.lines)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            kill_tree(self.proc.pid, descendants(self.proc.pid))  # ends a stopped (SIGSTOP) process too

    async def stop(self, grace_s: float) -> None:
        proc = self.proc
        if proc is None:
            return
        started = descendants(proc.pid)  # before they are orphaned: some are in groups of their own
        if proc.returncode is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except asyncio.TimeoutError:
                sys.stderr.write(f"ng_run: '{self.label}' did not stop within {grace_s:.0f} s; killing it\n")
        kill_tree(proc.pid, started)  # whatever it started, too
        await proc.wait()
        if self.pump is not None:
            await asyncio.gather(self.pump, return_exceptions=True)


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below pid now, in any process group (Ray's raylet starts its workers in groups
    of their own)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def kill_tree(group: int, found: list[psutil.Process]) -> None:
    """SIGKILL the process group and each process found below its leader (psutil checks that a
    pid still names the process it found)."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in found:
        try:
            proc.kill()
        except psutil.Error:
            pass
