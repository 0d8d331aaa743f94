"""Where NeMo Gym's own servers and configs are found: the `nemo_gym.python` key and its tree.

A NeMo Gym install keeps its environments next to its package: the folder that holds
`nemo_gym/` also holds `resources_servers/`, `responses_api_agents/` and `responses_api_models/`
(site-packages for a wheel, the checkout for an editable install). That folder is "the NeMo
Gym tree" of a Python. We ask that Python where its package is (`importlib.util.find_spec`,
which imports nothing), once per process.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path
from typing import Any

from nemo_gym_cli.config.paths import base_defaults

NEMO_GYM_PYTHON_KEY = "nemo_gym.python"
INSTALL_HINT = ("set +nemo_gym.python=/path/to/venv/bin/python, a Python that has nemo-gym installed "
                "(python3.12 -m venv ~/nemo_gym && ~/nemo_gym/bin/pip install nemo-gym==0.4.0; or "
                "scripts/nemo_gym/install.sh)")
PROBE_TIMEOUT_S = 30  # a cold Python on a busy machine; the probe imports nothing
_IMPORTS_NEMO_GYM = re.compile(r"^\s*(from|import)\s+nemo_gym\b", re.MULTILINE)


class NemoGymUnavailable(ValueError):
    """The configured Python cannot serve NeMo Gym servers; says why and what to set."""


def nemo_gym_python(config: dict) -> str | None:
    """`nemo_gym.python` of a (composed or partial) config, else its default in conf/base.yaml."""
    section = config.get("nemo_gym")
    if not isinstance(section, dict) or "python" not in section:
        section = base_defaults()["nemo_gym"]
    python = section.get("python")
    return str(python) if python else None


@functools.cache
def nemo_gym_tree(python: str) -> Path:
    """The folder holding `nemo_gym/` and `resources_servers/` of that Python's nemo-gym install."""
    if not Path(python).expanduser().is_file():
        raise NemoGymUnavailable(f"'{NEMO_GYM_PYTHON_KEY}' is {python}, which does not exist; {INSTALL_HINT}")
    probe = "import importlib.util as u; s = u.find_spec('nemo_gym'); print(s.origin if s else '')"
    try:
        out = subprocess.run([str(Path(python).expanduser()), "-c", probe], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NemoGymUnavailable(f"'{NEMO_GYM_PYTHON_KEY}' ({python}) cannot be run: {e}; {INSTALL_HINT}") from None
    origin = out.stdout.strip()
    if out.returncode != 0 or not origin:
        raise NemoGymUnavailable(f"'{NEMO_GYM_PYTHON_KEY}' ({python}) has no nemo-gym installed; {INSTALL_HINT}")
    return Path(origin).resolve().parent.parent


def nemo_gym_roots(config: dict) -> list[Path]:
    """[the NeMo Gym tree] when `nemo_gym.python` is set and usable, else []."""
    python = nemo_gym_python(config)
    if python is None:
        return []
    try:
        return [nemo_gym_tree(python)]
    except NemoGymUnavailable:
        return []  # validation reports it (nemo_gym_problems)


def nemo_gym_problems(config: dict) -> list[str]:
    """What is wrong with `nemo_gym.python`, if it is set."""
    python = nemo_gym_python(config)
    if python is None:
        return []
    try:
        nemo_gym_tree(python)
    except NemoGymUnavailable as e:
        return [str(e)]
    return []


def python_from_layers(overrides: list[Any], *layers: Any) -> str | None:
    """`nemo_gym.python` before the config files are merged (they are found with it): the command
    line wins, then env.yaml, then the defaults. `overrides` are compose's parsed overrides."""
    for ov in reversed(overrides):
        if ov.kind == "set" and ov.key == NEMO_GYM_PYTHON_KEY:
            return str(ov.value) if ov.value else None
        if ov.kind == "set" and ov.key == "nemo_gym" and isinstance(ov.value, dict) and "python" in ov.value:
            return str(ov.value["python"]) if ov.value["python"] else None
    for layer in layers:
        section = layer.get("nemo_gym") if layer is not None else None
        if section is not None and "python" in section:
            return str(section["python"]) if section["python"] else None
    return None


def imports_nemo_gym(entrypoint: Path) -> bool:
    """Whether a server's entrypoint is written against NeMo Gym's base classes."""
    try:
        return bool(_IMPORTS_NEMO_GYM.search(entrypoint.read_text(errors="replace")))
    except OSError:
        return False


def config_file_tree(config_file: str | None, server_type: str, impl: str) -> Path | None:
    """The tree of the config file that names a server: the nearest folder above the file that
    holds `<server_type>/<impl>/` (a user's own environments repository)."""
    if not config_file:
        return None
    path = Path(config_file)
    if not path.is_absolute() or not path.is_file():
        return None
    for parent in path.parents:
        if (parent / server_type / impl).is_dir():
            return parent
    return None
