"""pytest fixtures over the harness, loaded for every test folder by pyproject's
`addopts = "-p nemo_gym_cli.testing.harness.fixtures"` (tests/ and each environment's tests/).

- `standins(n, *flags)`: local vLLM stand-ins (`ng_vllm_standin`), stopped at teardown.
- `graph(config_paths, env=..., args=...)`: a real `ng_run` in the test's temporary directory,
  with its own head server port; waits until every server answers, stops it at teardown.
- `mode`: "processes" and "colocated" (NG_TEST_BOTH_MODES=0: processes only).
- `figures`: lines a test measured (wall times, counts), shown at the end of the run in a
  "figures" section, with or without -q or -s (CI logs keep them).
Set NG_TEST_COLOCATE=1 to run every `graph` with +colocate=true.
"""

from __future__ import annotations

import os

import pytest

from nemo_gym_cli.testing.harness.graph import Graph
from nemo_gym_cli.testing.harness.standin import StandIn

FIGURES = pytest.StashKey[list]()


@pytest.fixture
def standins(tmp_path):
    started: list[StandIn] = []

    def start(n: int = 1, *flags: str, **options) -> list[StandIn]:
        new = [StandIn(tmp_path, *flags, **options) for _ in range(n)]  # options: host
        started.extend(new)
        return new

    yield start
    for s in started:
        s.stop()


@pytest.fixture(params=["processes", "colocated"] if os.environ.get("NG_TEST_BOTH_MODES", "1") == "1" else ["processes"])
def mode(request) -> str:
    return request.param


@pytest.fixture
def graph(tmp_path):
    started: list[Graph] = []

    def start(config_paths: list[str], env: dict | None = None, args: list[str] = (), colocate: bool = False,
              wait: bool = True, timeout: float = 60, **options) -> Graph:
        colocate = colocate or os.environ.get("NG_TEST_COLOCATE") == "1"
        g = Graph(tmp_path, list(config_paths), env, list(args), colocate, wait=False, **options)  # head_port, host, process_env
        started.append(g)  # stopped at teardown even when it never gets ready
        if wait:
            g.wait_ready(timeout)
        return g

    yield start
    for g in started:
        g.stop()
        g.kill_leftovers()


@pytest.fixture(scope="session")
def figures(pytestconfig) -> list[str]:
    return pytestconfig.stash.setdefault(FIGURES, [])


def pytest_terminal_summary(terminalreporter, config) -> None:
    lines = config.stash.get(FIGURES, [])
    if lines:
        terminalreporter.section("figures")
        for line in lines:
            terminalreporter.write_line(line)
