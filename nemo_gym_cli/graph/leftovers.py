"""What a killed ng_run leaves behind, and ending it: each graph has a state folder
(`<tmp>/ng_run_*`) whose `graph.json` names ng_run's pid and every child process it started
(pid, start time and command line): our servers, NeMo Gym's servers and the Ray head started for
them. A child normally ends with its ng_run (it gets SIGTERM when ng_run dies, even by SIGKILL),
but one that was stopped (SIGSTOP) at that moment keeps the signal pending and holds its port
(a stopped Ray head keeps its whole cluster). The next ng_run finds such folders, ends the
processes still listed there (SIGKILL to each child's process group and to every process below
it: it ends a stopped process too), says so, and removes the folder. A pid is only signalled
while it still names the process recorded (same start time, same command line), never a process
that reused the number.

The folder holds no secrets: children get the resolved config through a pipe (processes.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import orjson
import psutil

from nemo_gym_cli.graph.processes import descendants, kill_tree

PREFIX = "ng_run_"
STATE_FILE = "graph.json"


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

    def child_started(self, label: str, pid: int, command: list[str]) -> None:
        self.state["children"][label] = {"pid": pid, "started": started_at(pid), "command": command}
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(self.state))
        os.replace(tmp, self.path)  # a reader never sees half a file


def _same_process(entry: dict, command: bool = True) -> psutil.Process | None:
    """The process an entry names, if it still runs: same pid, start time and (`command`) command line
    (an entry written by an ng_run older than the command record is matched by pid and start time)."""
    try:
        proc = psutil.Process(int(entry["pid"]))
        if entry.get("started") is None or abs(proc.create_time() - float(entry["started"])) > 0.01:
            return None
        if command and "command" in entry and proc.cmdline() != list(entry["command"]):
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
        if _same_process(owner, command=False) is not None:
            continue  # its ng_run still runs: not a leftover
        ended = []
        for label, entry in (state.get("children") or {}).items():
            proc = _same_process(entry)
            if proc is None:
                continue
            stopped = proc.status() == psutil.STATUS_STOPPED
            ports, below = _ports(proc), descendants(proc.pid)
            kill_tree(proc.pid, [proc, *below])  # its process group, and what it started in other groups
            held = f", holding port {', '.join(map(str, ports))}" if ports else ""
            started = f", with {len(below)} process{'es' if len(below) > 1 else ''} it started" if below else ""
            ended.append(f"'{label}' (pid {proc.pid}{', stopped' if stopped else ''}{held}{started})")
        shutil.rmtree(folder, ignore_errors=True)
        if ended:
            lines.append(f"ended {len(ended)} process{'es' if len(ended) > 1 else ''} left by an earlier ng_run "
                         f"(pid {owner.get('pid')}, no longer running): {', '.join(ended)}; removed {folder}")
    return lines
