"""What a killed ng_run leaves behind, and ending it: each graph has a state folder
(`<tmp>/ng_run_*`) whose `graph.json` names ng_run's pid and every child process it started
(pid and start time). A child normally ends with its ng_run (it gets SIGTERM when ng_run dies,
even by SIGKILL), but one that was stopped (SIGSTOP) at that moment keeps the signal pending
and holds its port. The next ng_run finds such folders, ends the processes still listed there
(SIGKILL to each child's process group: it ends a stopped process too), says so, and removes
the folder. A pid is only signalled while it still names the process recorded (same start
time, our child module on its command line), never a process that reused the number.

The folder holds no secrets: children get the resolved config through a pipe (processes.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import orjson
import psutil

PREFIX = "ng_run_"
STATE_FILE = "graph.json"
CHILD_MODULE = "nemo_gym_cli.graph.child"


def started_at(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class GraphState:
    """`graph.json` of one running graph, rewritten whenever a child starts."""

    def __init__(self, folder: Path):
        self.path = folder / STATE_FILE
        self.state = {"ng_run": {"pid": os.getpid(), "started": started_at(os.getpid())}, "children": {}}
        self._write()

    def child_started(self, label: str, pid: int) -> None:
        self.state["children"][label] = {"pid": pid, "started": started_at(pid)}
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(self.state))
        os.replace(tmp, self.path)  # a reader never sees half a file


def _same_process(entry: dict, module: str | None = None) -> psutil.Process | None:
    try:
        proc = psutil.Process(int(entry["pid"]))
        if entry.get("started") is None or abs(proc.create_time() - float(entry["started"])) > 0.01:
            return None
        if module is not None and module not in " ".join(proc.cmdline()):
            return None
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError, ValueError):
        return None


def _ports(proc: psutil.Process) -> list[int]:
    try:
        return sorted({c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN})
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def end_leftovers(tmp_root: Path | None = None) -> list[str]:
    """End what graphs whose ng_run is gone left behind; one line per graph cleaned up."""
    root = Path(tmp_root or tempfile.gettempdir())
    lines = []
    for folder in sorted(root.glob(PREFIX + "*")):
        try:
            if not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            state = orjson.loads((folder / STATE_FILE).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue  # not a graph folder of ours, or one still being written
        owner = state.get("ng_run") or {}
        if _same_process(owner) is not None:
            continue  # its ng_run still runs: not a leftover
        ended = []
        for label, entry in (state.get("children") or {}).items():
            proc = _same_process(entry, CHILD_MODULE)
            if proc is None:
                continue
            stopped = proc.status() == psutil.STATUS_STOPPED
            ports = _ports(proc)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its process group: what it started too
            except (ProcessLookupError, PermissionError):
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    continue
            held = f", holding port {', '.join(map(str, ports))}" if ports else ""
            ended.append(f"'{label}' (pid {proc.pid}{', stopped' if stopped else ''}{held})")
        shutil.rmtree(folder, ignore_errors=True)
        if ended:
            lines.append(f"ended {len(ended)} server process{'es' if len(ended) > 1 else ''} left by an earlier ng_run "
                         f"(pid {owner.get('pid')}, no longer running): {', '.join(ended)}; removed {folder}")
    return lines
