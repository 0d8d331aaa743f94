"""The fixtures (`standins`, `graph`, `mode`) live in nemo_gym_cli/testing/harness/fixtures.py,
loaded for every test folder by pyproject's addopts; helpers come from nemo_gym_cli.testing.harness.
"""

# Re-exported only for test files on branches that still write `from conftest import ...`;
# new tests import these from nemo_gym_cli.testing.harness.
from nemo_gym_cli.testing.harness import (BIN, PROJECT_ROOT, VLLM_MODEL, WEATHER, free_port, http_json,  # noqa: F401
                                          run_cli, script, wait_until, weather_env)
