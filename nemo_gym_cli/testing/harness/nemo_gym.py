"""NeMo Gym 0.4.0 in its own venv (Python 3.12), for tests and bench/nemo_gym.py.

    from nemo_gym_cli.testing.harness.nemo_gym import ensure_nemo_gym

    python, why = ensure_nemo_gym()     # runs scripts/nemo_gym/install.sh once if needed
    if python is None:
        pytest.skip(why)                # only when no Python 3.12 exists; any other failure raises

Install:  scripts/nemo_gym/install.sh  ->  <repo>/.nemo_gym/venv (env NEMO_GYM_VENV: another place)
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from nemo_gym_cli.testing.harness.processes import PROJECT_ROOT

INSTALL_SH = PROJECT_ROOT / "scripts" / "nemo_gym" / "install.sh"
VENV = Path(os.environ.get("NEMO_GYM_VENV", PROJECT_ROOT / ".nemo_gym" / "venv"))
NO_PYTHON_312 = 3  # install.sh's exit code when no Python 3.12 exists
INSTALL_TIMEOUT_S = 900

_lock = threading.Lock()
_result: tuple[str | None, str] | None = None


def ensure_nemo_gym() -> tuple[str | None, str]:
    """(python of the venv, "") once installed; (None, why) when this machine has no Python 3.12.
    Raises RuntimeError when the install fails for another reason (that is a failure, not a skip)."""
    global _result
    with _lock:
        if _result is None:
            VENV.parent.mkdir(parents=True, exist_ok=True)
            log = VENV.parent / "install.log"
            with open(log, "w") as f:
                rc = subprocess.run(["bash", str(INSTALL_SH), str(VENV)], stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=INSTALL_TIMEOUT_S).returncode
            tail = log.read_text(errors="replace")[-800:]
            if rc == NO_PYTHON_312:
                _result = (None, f"no Python 3.12 on this machine (nemo-gym 0.4.0 needs it): {tail.strip()}")
            elif rc != 0:
                raise RuntimeError(f"{INSTALL_SH} exited {rc} (log {log}):\n{tail}")
            else:
                _result = (str(VENV / "bin" / "python"), "")
        return _result
