"""ng_init_env: the environment it writes passes its own test as written (a real pytest over real
servers, in a folder outside the project), lint, and ng_run's config checks; bad names are refused."""

from __future__ import annotations

import subprocess

import yaml

from nemo_gym_cli.testing.harness import BIN, PROJECT_ROOT, PY, VLLM_MODEL, run_cli, weather_env

GENERATED_TEST_TIMEOUT_S = 180  # its ng_run start and collection take ~10 s on a busy 2-core machine


def test_a_new_environment_passes_its_own_test_lint_and_the_config_checks(tmp_path):
    made = run_cli("ng_init_env", ["word_env"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    env = tmp_path / "resources_servers" / "word_env"
    written = sorted(str(p.relative_to(env)) for p in env.rglob("*") if p.is_file())
    assert written == ["README.md", "__init__.py", "app.py", "configs/word_env.yaml", "data/example.jsonl",
                       "tests/test_word_env.py"]

    lint = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "--config", str(PROJECT_ROOT / "pyproject.toml"), str(env)],
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # ng_run's config as it composes it: the instance, its field, the agent wired to policy_model.
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(weather_env(["http://127.0.0.1:9/v1"])))
    dumped = run_cli("ng_dump_config", [f"+config_paths=[{VLLM_MODEL},resources_servers/word_env/configs/word_env.yaml]"],
                     cwd=tmp_path)
    assert dumped.returncode == 0, dumped.stderr
    config = yaml.safe_load(dumped.stdout)
    assert config["word_env"]["resources_servers"]["word_env"]["max_tool_calls"] == 4
    agent = config["word_env_simple_agent"]["responses_api_agents"]["simple_agent"]
    assert agent["resources_server"] == {"type": "resources_servers", "name": "word_env"}
    assert agent["model_server"] == {"type": "responses_api_models", "name": "policy_model"}

    # Its test as a user runs it, from that folder (no pytest config of ours); it starts ng_run on the config.
    tested = subprocess.run([PY, "-m", "pytest", "-p", "no:cacheprovider", "-q", "resources_servers/word_env/tests"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=GENERATED_TEST_TIMEOUT_S)
    assert tested.returncode == 0, tested.stdout[-4000:] + tested.stderr[-2000:]
    assert "3 passed" in tested.stdout


def test_a_name_that_is_not_an_identifier_or_an_existing_folder_is_refused(tmp_path):
    for name in ("1st_env", "my-env", "class"):
        refused = run_cli("ng_init_env", [name], cwd=tmp_path)
        assert refused.returncode == 2 and f"'{name}' is not a valid Python identifier" in refused.stderr
    assert not (tmp_path / "resources_servers").exists()

    (tmp_path / "resources_servers" / "taken").mkdir(parents=True)
    (tmp_path / "resources_servers" / "taken" / "app.py").write_text("# mine\n")
    refused = run_cli("ng_init_env", ["taken"], cwd=tmp_path)
    assert refused.returncode == 2 and "already exists" in refused.stderr
    assert [p.name for p in (tmp_path / "resources_servers" / "taken").iterdir()] == ["app.py"]
    assert (tmp_path / "resources_servers" / "taken" / "app.py").read_text() == "# mine\n"
