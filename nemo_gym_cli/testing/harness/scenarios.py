"""Scenarios several test files share: the test pair graph (tests/fixtures/graph: `echo`, and
`caller` whose /relay reaches `echo` by name), weather rows and a collection over them, and
questions about the processes a graph left behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil

from nemo_gym_cli.testing.harness.http_calls import http_json
from nemo_gym_cli.testing.harness.processes import PROJECT_ROOT, run_cli, script, wait_until
from nemo_gym_cli.testing.harness.rawhttp import RawServer, response

FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "graph"
SECRET = "sk-ECHO-SECRET-9876543210"
HF_TOKEN = "hf-ECHO-TOKEN-abcdef123456"  # set in pair.yaml
ENV = {"echo_api_key": SECRET}


def user_folder(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURES, tmp_path, dirs_exist_ok=True)
    return tmp_path


def start_pair(graph, tmp_path: Path, mode: str, args=(), config_paths=("pair.yaml",), **kwargs):
    user_folder(tmp_path)
    return graph(list(config_paths), env=ENV, args=list(args), colocate=mode == "colocated", **kwargs)


def by_name(g) -> dict[str, dict]:
    return {s["name"]: s for s in g.servers()}


def server_processes(cwd: Path) -> list[psutil.Process]:
    """Server processes started from this test's folder that are still alive."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "nemo_gym_cli.graph.child" in " ".join(proc.info["cmdline"] or []) and Path(proc.cwd()) == cwd \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_exit(g, timeout: float = 30) -> int:
    try:
        return g.proc.wait(timeout)
    except Exception:
        raise AssertionError(f"ng_run did not exit within {timeout} s:\n{g.output()}") from None


def relay(g, session: str, **body) -> tuple[int, dict]:
    """caller's /relay to echo: /echo, or /slow with `s=seconds`."""
    return http_json(g.url("caller") + "/relay", {"q": session, **body}, headers={"X-Session-ID": session}, timeout=60)


AGENT = "+agent_name=simple_weather_simple_agent"


def write_rows(path, n: int, extra: dict | None = None) -> None:
    with open(path, "w") as f:
        for i in range(n):
            row = {"responses_create_params": {"input": [{"role": "user", "content": f"weather in city {i}?"}],
                                               "tools": [{"type": "function", "name": "get_weather", "parameters": {
                                                   "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]},
                   "row_id": i, **(extra or {})}
            f.write(json.dumps(row) + "\n")


def read_lines(path) -> list[dict]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "the output ends with a partial line"
    return [json.loads(line) for line in raw.splitlines()]


def collect(g, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli("ng_collect_rollouts", [AGENT, f"+head_server.port={g.head_port}", "+progress=false", *args], cwd=g.cwd, timeout=timeout)


def collect_in_background(g, out: Path, *args: str, rows: str = "in.jsonl") -> subprocess.Popen:
    """ng_collect_rollouts over `g` into `out`, running while the test does things to the graph."""
    return subprocess.Popen([script("ng_collect_rollouts"), AGENT, "+progress=false", f"+head_server.port={g.head_port}",
                             f"+input_jsonl_fpath={rows}", f"+output_jsonl_fpath={out}", *args],
                            cwd=g.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def lines_written(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


def collect_through_fault(g, out: Path, total: int, fault, *args: str, timeout: float = 300) -> tuple[int, str, float]:
    """Collect `total` rows of in.jsonl into `out`, calling `fault(collector process)` once a quarter
    is written: (the collector's exit code, its output, seconds from the fault to its end)."""
    proc = collect_in_background(g, out, *args)
    try:
        wait_until(lambda: lines_written(out) >= total // 4, timeout, "a quarter written")
        fault(proc)
        t0 = time.monotonic()
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


GOOD_COMPLETION = {"id": "c1", "object": "chat.completion", "created": 0, "model": "standin-model",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "sunny"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def garbage_backend(n_bytes: int) -> RawServer:
    """A "vLLM" whose /health is fine and whose chat completions are HTTP 200 with `n_bytes` of
    garbage, until `.state["good"]` is set (then a good completion). Close it when done."""
    garbage = response(200, b"\x8b" * n_bytes)
    state = {"good": False}

    def answer(method, path, headers, body):
        if path == "/health":
            return response(200, b"")
        if path.endswith("/chat/completions"):
            return response(200, json.dumps(GOOD_COMPLETION).encode()) if state["good"] else garbage
        return response(404, b"{}")

    server = RawServer(answer)
    server.state = state
    return server


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs of `size` (mount's units: "64k", "16m") on `folder` for the block, unmounted after;
    OSError (PermissionError when not root) says why it cannot be mounted."""
    if os.geteuid() != 0:
        raise PermissionError("mounting a tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        raise OSError(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def resize_tmpfs(folder: Path, size: str) -> bool:
    """Give a mounted tmpfs another size; False if it cannot (e.g. smaller than what it holds)."""
    return subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], capture_output=True).returncode == 0
