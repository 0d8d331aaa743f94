"""Configuration as users type it: conf/ defaults < config_paths files < env.yaml < command line.

Most stories call `compose()` directly with the user's folder as cwd (fast); the console-script
stories run `ng_dump_config` / `ng_run` for real to check exit codes, messages and that no
traceback and no Hydra `outputs/` folder ever reaches the user.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from nemo_gym_cli.testing.harness import BIN, PROJECT_ROOT, VLLM_MODEL, WEATHER, run_cli
from nemo_gym_cli.config import ConfigError, compose
from nemo_gym_cli.config.typed import load_config
from nemo_gym_cli.graph.build import load_server_class

JUDGE_MODEL = "responses_api_models/vllm_model/configs/vllm_judge_model.yaml"
JUDGE_ENV = "resources_servers/equivalence_llm_judge/configs/equivalence_llm_judge.yaml"

JUDGE_ENV_YAML = {"judge_base_url": "http://judge-server:8000/v1", "judge_api_key": "EMPTY",
                  "judge_model_name": "Qwen/Qwen3-30B-A3B"}
POLICY_ENV = {"policy_base_url": "http://vllm-1:8000/v1", "policy_api_key": "EMPTY", "policy_model_name": "m"}


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def write_env(folder: Path, values: dict) -> None:
    (folder / "env.yaml").write_text(yaml.safe_dump(values))


def config_of(tmp_path: Path, *args: str, command: str = "ng_run", **kwargs) -> dict:
    return compose(list(args), command=command, cwd=tmp_path, **kwargs).config


def problems_of(tmp_path: Path, *args: str, command: str = "ng_run") -> list[str]:
    with pytest.raises(ConfigError) as info:
        compose(list(args), command=command, cwd=tmp_path)
    return info.value.problems


def the_problem(problems: list[str], *needles: str) -> str:
    """The one reported problem that mentions every needle (fails with the whole list if none)."""
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}; got:\n" + "\n".join(problems)
    return hits[0]


# ------------------------------------------------------------------ precedence


def test_each_layer_overrides_the_one_below(tmp_path):
    # conf/ng_run.yaml defines ready_timeout_s and stop_grace_s; the files, env.yaml and the
    # command line each take over a bit more of `layer`.
    write(tmp_path, "first.yaml", """
        ready_timeout_s: 5
        only_in_first: 1
        layer: {a: first, b: first, c: first, d: first}
    """)
    write(tmp_path, "second.yaml", """
        layer: {b: second, c: second, d: second}
    """)
    write_env(tmp_path, {"layer": {"c": "env", "d": "env"}})

    cfg = config_of(tmp_path, "+config_paths=[first.yaml,second.yaml]", "+layer.d=cli")

    assert cfg["layer"] == {"a": "first", "b": "second", "c": "env", "d": "cli"}
    assert cfg["ready_timeout_s"] == 5  # a config file beats conf/
    assert cfg["stop_grace_s"] == 10  # untouched conf/ default survives
    assert cfg["only_in_first"] == 1
    assert cfg["config_paths"] == ["first.yaml", "second.yaml"]


def test_the_command_line_beats_env_yaml_and_conf_defaults(tmp_path):
    write_env(tmp_path, {"stop_grace_s": 3})
    assert config_of(tmp_path)["stop_grace_s"] == 3  # env.yaml beats conf/
    assert config_of(tmp_path, "+stop_grace_s=1")["stop_grace_s"] == 1  # CLI beats env.yaml


def test_both_collectors_take_their_retry_and_shutdown_defaults_from_one_file(tmp_path):
    shared = yaml.safe_load((PROJECT_ROOT / "conf/collection.yaml").read_text())
    for command in ("ng_collect_rollouts", "ng_reverify"):
        own = yaml.safe_load((PROJECT_ROOT / f"conf/{command}.yaml").read_text())
        assert own["defaults"] == ["collection"] and not set(own) & set(shared), command  # written once
        composed = compose(["+input_jsonl_fpath=a", "+output_jsonl_fpath=b", "+max_attempts=5"], command=command,
                           cwd=tmp_path, env_yaml_roots=[tmp_path], validate=False)
        assert {k: composed.config[k] for k in shared} == {**shared, "max_attempts": 5}, command
        assert composed.sources["retry_backoff_s"] == "conf/collection.yaml" and "defaults" not in composed.config


def test_each_commands_help_shows_the_defaults_its_conf_files_hold(tmp_path):
    shared = yaml.safe_load((PROJECT_ROOT / "conf/collection.yaml").read_text())
    port = yaml.safe_load((PROJECT_ROOT / "conf/base.yaml").read_text())["head_server"]["port"]
    ready = yaml.safe_load((PROJECT_ROOT / "conf/ng_run.yaml").read_text())["ready_timeout_s"]
    wanted = {
        "ng_collect_rollouts": [f"+max_attempts={shared['max_attempts']}", f"+graph_wait_s={shared['graph_wait_s']}",
                                f"+shutdown_grace_s={shared['shutdown_grace_s']}", f"+head_server.port={port}",
                                "+num_repeats={_default:1,"],
        "ng_reverify": [f"+max_attempts={shared['max_attempts']}"],
        "ng_run": [f"+ready_timeout_s={ready}", f"+head_server.port={port}"],
        "ng_status": [f"+head_server.port={port}"],
    }
    for command, parts in wanted.items():
        done = run_cli(command, ["--help"], cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr)
        for part in parts:
            assert part in done.stdout, (command, part)


def test_a_files_own_config_paths_come_first_so_the_includer_wins(tmp_path):
    write(tmp_path, "base.yaml", """
        key: from_base
        only_in_base: true
        nested: {x: base, y: base}
    """)
    write(tmp_path, "includer.yaml", """
        config_paths: [base.yaml]
        key: from_includer
        nested: {y: includer}
    """)
    write(tmp_path, "later.yaml", """
        nested: {x: later}
    """)

    cfg = config_of(tmp_path, "+config_paths=[includer.yaml,later.yaml]")

    assert cfg["key"] == "from_includer"
    assert cfg["only_in_base"] is True
    assert cfg["nested"] == {"x": "later", "y": "includer"}
    # The top-level config_paths is what the user asked for, not the included file's list.
    assert cfg["config_paths"] == ["includer.yaml", "later.yaml"]


def test_plus_works_for_keys_conf_already_defines(tmp_path):
    # Hydra's own `+` refuses an existing key; users write `+` everywhere, as the guide does.
    cfg = config_of(tmp_path, "+head_server.port=12000", "+ready_timeout_s=5", "+colocate=true")
    assert cfg["head_server"] == {"host": "127.0.0.1", "port": 12000}
    assert cfg["ready_timeout_s"] == 5
    assert cfg["colocate"] is True

    collect = config_of(tmp_path, "+concurrency=7", "+num_repeats=4", "+agent_name=a", "+input_jsonl_fpath=in.jsonl",
                        "+output_jsonl_fpath=out.jsonl", command="ng_collect_rollouts", validate=False)
    assert collect["concurrency"] == 7
    assert collect["num_repeats"] == 4


def test_double_plus_adds_or_overrides(tmp_path):
    cfg = config_of(tmp_path, "++ready_timeout_s=7", "++brand_new_key=hello")
    assert cfg["ready_timeout_s"] == 7
    assert cfg["brand_new_key"] == "hello"


def test_dotted_keys_change_one_leaf_and_keep_its_siblings(tmp_path):
    cfg = config_of(tmp_path, "+http_client.max_retries=9", "+brand.deep.key=1")
    assert cfg["http_client"]["max_retries"] == 9
    assert cfg["http_client"]["connector_limit"] == 4096  # siblings from conf/ are kept
    assert cfg["brand"] == {"deep": {"key": 1}}


def test_list_and_dict_values_on_the_command_line(tmp_path):
    write(tmp_path, "a.yaml", "from_a: 1\n")
    write(tmp_path, "b.yaml", "from_b: 2\n")
    cfg = config_of(tmp_path, "+config_paths=[a.yaml,b.yaml]", "+some_list=[1,2,3]",
                    "+responses_create_params={temperature:0.5}")
    assert cfg["config_paths"] == ["a.yaml", "b.yaml"]
    assert (cfg["from_a"], cfg["from_b"]) == (1, 2)
    assert cfg["some_list"] == [1, 2, 3]
    assert cfg["responses_create_params"] == {"temperature": 0.5}

    # ng_collect_rollouts defines responses_create_params: {} in conf/: `+` fills it in.
    collect = config_of(tmp_path, "+responses_create_params={temperature:0.5,max_output_tokens:64}",
                        "+agent_name=a", "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out.jsonl",
                        command="ng_collect_rollouts", validate=False)
    assert collect["responses_create_params"] == {"temperature": 0.5, "max_output_tokens": 64}


# ------------------------------------------------------------------ env.yaml and URLs


def test_env_yaml_in_the_current_directory_feeds_interpolation(tmp_path):
    write_env(tmp_path, {**POLICY_ENV, "policy_api_key": "sk-real-key-123"})
    cfg = config_of(tmp_path, f"+config_paths=[{VLLM_MODEL}]")
    model = cfg["policy_model"]["responses_api_models"]["vllm_model"]
    assert model["base_url"] == "http://vllm-1:8000/v1"
    assert model["api_key"] == "sk-real-key-123"  # compose keeps secrets; only printing masks them
    assert model["model"] == "m"
    assert cfg["policy_base_url"] == "http://vllm-1:8000/v1"  # env.yaml keys are top-level keys


def test_without_env_yaml_the_unset_url_is_explained(tmp_path):
    # env.yaml is looked for in tmp_path only: a developer's env.yaml at the project root stays out
    with pytest.raises(ConfigError) as info:
        compose([f"+config_paths=[{VLLM_MODEL}]"], command="ng_run", cwd=tmp_path, env_yaml_roots=[tmp_path])
    problems = info.value.problems
    problem = the_problem(problems, "policy_base_url")
    assert "env.yaml" in problem and "+policy_base_url=" in problem
    assert "base_url" in problem  # names the key that needs it
    assert "vllm_model.yaml" in problem  # and the file it is in


def test_env_yaml_is_looked_for_in_each_root_in_turn(tmp_path):
    work, root = tmp_path / "work", tmp_path / "root"
    work.mkdir(), root.mkdir()
    write_env(root, POLICY_ENV)  # like an env.yaml at the project root, found after the working directory
    composed = compose([f"+config_paths=[{VLLM_MODEL}]"], command="ng_run", cwd=work, env_yaml_roots=[work, root])
    assert composed.env_yaml == root / "env.yaml"
    write_env(work, {**POLICY_ENV, "policy_model_name": "from-work"})
    composed = compose([f"+config_paths=[{VLLM_MODEL}]"], command="ng_run", cwd=work, env_yaml_roots=[work, root])
    assert composed.config["policy_model_name"] == "from-work"


def typed_config_of(tmp_path: Path, *args: str, name: str = "policy_model"):
    """The instance's config as its server reads it (the kind's dataclass)."""
    spec = compose(list(args), command="ng_run", cwd=tmp_path).servers[name]
    return load_config(load_server_class(spec).config_type, spec.config, spec.where)


def test_comma_separated_urls_in_env_yaml_become_a_list(tmp_path):
    write_env(tmp_path, {**POLICY_ENV,
                         "policy_base_url": "http://vllm-1:8000/v1, http://vllm-2:8000/v1 ,http://vllm-3:8000/v1"})
    model = typed_config_of(tmp_path, f"+config_paths=[{VLLM_MODEL}]")
    assert model.base_url == ["http://vllm-1:8000/v1", "http://vllm-2:8000/v1", "http://vllm-3:8000/v1"]


def test_comma_separated_urls_on_the_command_line_are_one_value_not_a_sweep(tmp_path):
    args = [f"+config_paths=[{VLLM_MODEL}]", "+policy_base_url=http://a:8000/v1,http://b:8000/v1",
            "+policy_api_key=EMPTY", "+policy_model_name=m"]
    assert typed_config_of(tmp_path, *args).base_url == ["http://a:8000/v1", "http://b:8000/v1"]

    result = run_cli("ng_dump_config", args, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    dumped = yaml.safe_load(result.stdout)
    assert dumped["policy_base_url"] == "http://a:8000/v1,http://b:8000/v1"  # the value as the user wrote it: one string
    # ...and the adapter's field as it reads it (issue 16 point 6): one list of both URLs, not a sweep
    assert dumped["policy_model"]["responses_api_models"]["vllm_model"]["base_url"] == ["http://a:8000/v1", "http://b:8000/v1"]
    assert "sweep" not in (result.stdout + result.stderr).lower()


def test_a_yaml_list_of_urls_works_as_in_the_guide(tmp_path):
    # Option 2 of the guide's load balancing section, verbatim.
    write(tmp_path, "fleet.yaml", """
        policy_model:
          responses_api_models:
            vllm_model:
              entrypoint: app.py
              base_url:
                - http://vllm-1:8000/v1
                - http://vllm-2:8000/v1
                - http://vllm-3:8000/v1
              api_key: ${policy_api_key}
              model: ${policy_model_name}
    """)
    write_env(tmp_path, {"policy_api_key": "EMPTY", "policy_model_name": "meta-llama/Llama-3.1-8B-Instruct"})
    model = typed_config_of(tmp_path, "+config_paths=[fleet.yaml]")
    assert model.base_url == ["http://vllm-1:8000/v1", "http://vllm-2:8000/v1", "http://vllm-3:8000/v1"]
    assert model.model == "meta-llama/Llama-3.1-8B-Instruct"


def test_the_guides_weather_config_composes(tmp_path):
    write_env(tmp_path, {"policy_base_url": "http://vllm-1:8000/v1,http://vllm-2:8000/v1,http://vllm-3:8000/v1",
                         "policy_api_key": "EMPTY", "policy_model_name": "meta-llama/Llama-3.1-8B-Instruct"})
    composed = compose([f"+config_paths=[{VLLM_MODEL},{WEATHER}]"], command="ng_run", cwd=tmp_path)
    assert set(composed.servers) == {"policy_model", "simple_weather", "simple_weather_simple_agent"}
    agent = composed.servers["simple_weather_simple_agent"]
    assert (agent.server_type, agent.impl) == ("responses_api_agents", "simple_agent")


# ------------------------------------------------------------------ validation errors


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    write(tmp_path, "broken.yaml", "ok: 1\nlist: [1, 2\nnext: 3\n")
    problem = the_problem(problems_of(tmp_path, "+config_paths=[broken.yaml]"), "broken.yaml")
    assert "line " in problem
    assert str(tmp_path / "broken.yaml") in problem


def test_missing_config_path_says_where_it_looked(tmp_path):
    problem = the_problem(problems_of(tmp_path, "+config_paths=[configs/nope.yaml]"), "configs/nope.yaml")
    assert "not found" in problem
    assert str(tmp_path / "configs/nope.yaml") in problem
    assert str(PROJECT_ROOT / "configs/nope.yaml") in problem


def test_a_missing_nested_config_path_names_the_including_file(tmp_path):
    write(tmp_path, "includer.yaml", "config_paths: [gone.yaml]\nx: 1\n")
    problem = the_problem(problems_of(tmp_path, "+config_paths=[includer.yaml]"), "gone.yaml")
    assert "includer.yaml" in problem


def test_unknown_server_type_suggests_the_right_one(tmp_path):
    write(tmp_path, "typo.yaml", """
        weather:
          resource_servers:
            simple_weather:
              entrypoint: app.py
    """)
    problem = the_problem(problems_of(tmp_path, "+config_paths=[typo.yaml]"), "resource_servers")
    assert "did you mean 'resources_servers'" in problem
    assert "typo.yaml" in problem and "weather" in problem


def test_an_impl_folder_that_does_not_exist(tmp_path):
    write(tmp_path, "typo.yaml", """
        weather:
          resources_servers:
            simple_weathr:
              entrypoint: app.py
    """)
    problem = the_problem(problems_of(tmp_path, "+config_paths=[typo.yaml]"), "simple_weathr")
    assert "typo.yaml" in problem
    assert "weather.resources_servers.simple_weathr" in problem
    assert "simple_weather" in problem.replace("simple_weathr", "")  # did you mean


def test_a_server_without_entrypoint(tmp_path):
    write(tmp_path, "noentry.yaml", """
        weather:
          resources_servers:
            simple_weather:
              some_field: 1
    """)
    problem = the_problem(problems_of(tmp_path, "+config_paths=[noentry.yaml]"), "entrypoint")
    assert "noentry.yaml" in problem and "weather.resources_servers.simple_weather" in problem


def test_a_ref_to_a_server_not_in_the_config_suggests_one(tmp_path):
    write_env(tmp_path, POLICY_ENV)
    write(tmp_path, "agent.yaml", """
        my_agent:
          responses_api_agents:
            simple_agent:
              entrypoint: app.py
              resources_server: {type: resources_servers, name: weather}
              model_server: {type: responses_api_models, name: polcy_model}
        weather:
          resources_servers:
            simple_weather:
              entrypoint: app.py
    """)
    problem = the_problem(problems_of(tmp_path, f"+config_paths=[{VLLM_MODEL},agent.yaml]"), "polcy_model")
    assert "did you mean 'policy_model'" in problem
    assert "agent.yaml" in problem and "my_agent.responses_api_agents.simple_agent.model_server" in problem


def test_a_value_left_at_triple_question_marks(tmp_path):
    write(tmp_path, "needs.yaml", """
        weather:
          resources_servers:
            simple_weather:
              entrypoint: app.py
              dataset_path: ???
    """)
    problem = the_problem(problems_of(tmp_path, "+config_paths=[needs.yaml]"), "weather.resources_servers.simple_weather.dataset_path")
    assert "needs.yaml" in problem
    assert "not set" in problem or "required" in problem


def test_every_problem_is_reported_at_once(tmp_path):
    """One run tells the user everything that is wrong, not one thing per try."""
    write(tmp_path, "broken.yaml", "a: [1\nb: 2\n")
    write(tmp_path, "graph.yaml", """
        weather:
          resources_servers:
            simple_weather:
              entrypoint: app.py
              dataset_path: ???
              base_url: ${policy_base_url}
        typo_type:
          resource_servers:
            simple_weather:
              entrypoint: app.py
        typo_impl:
          resources_servers:
            simple_weathr:
              entrypoint: app.py
        no_entry:
          resources_servers:
            simple_weather: {x: 1}
        agent:
          responses_api_agents:
            simple_agent:
              entrypoint: app.py
              resources_server: {type: resources_servers, name: weathr}
              model_server: {type: responses_api_models, name: policy_model}
    """)
    problems = problems_of(tmp_path, "+config_paths=[graph.yaml,broken.yaml,missing.yaml]")
    the_problem(problems, "broken.yaml", "line ")
    the_problem(problems, "missing.yaml", "not found")
    the_problem(problems, "dataset_path")
    the_problem(problems, "policy_base_url", "env.yaml")
    the_problem(problems, "resource_servers", "did you mean")
    the_problem(problems, "simple_weathr")
    the_problem(problems, "no_entry", "entrypoint")
    the_problem(problems, "weathr", "did you mean 'weather'")
    the_problem(problems, "policy_model")


def test_console_scripts_report_config_errors_with_exit_code_2_and_no_traceback(tmp_path):
    write(tmp_path, "graph.yaml", """
        typo_type:
          resource_servers:
            simple_weather:
              entrypoint: app.py
        typo_impl:
          resources_servers:
            simple_weathr:
              entrypoint: app.py
    """)
    args = ["+config_paths=[graph.yaml]", "+head_server.port=1"]  # ng_run must not even try to bind
    for script in ("ng_dump_config", "ng_run"):
        result = run_cli(script, args, cwd=tmp_path, timeout=60)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output
        assert "Traceback" not in output
        assert "resource_servers" in output and "did you mean 'resources_servers'" in output
        assert "simple_weathr" in output
        assert "graph.yaml" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.yaml"]  # no outputs/, .hydra/, logs


def test_a_bad_override_is_a_clear_error_too(tmp_path):
    result = run_cli("ng_dump_config", ["+config_paths=[a.yaml", "+x=1"], cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "+config_paths=[a.yaml" in result.stderr


def test_a_ref_to_a_judge_model_that_was_not_included_names_judge_model(tmp_path):
    """Forgetting the judge model's config must say that `judge_model` is missing, not fail later."""
    write_env(tmp_path, {**POLICY_ENV, **JUDGE_ENV_YAML})
    # The guide's judge setup, with the weather server standing in for the judge environment.
    write(tmp_path, "judged_env.yaml", """
        judged_weather:
          resources_servers:
            simple_weather:
              entrypoint: app.py
              judge_model_server:
                type: responses_api_models
                name: judge_model
    """)
    problem = the_problem(problems_of(tmp_path, f"+config_paths=[{VLLM_MODEL},judged_env.yaml]"), "judge_model")
    assert "judged_weather.resources_servers.simple_weather.judge_model_server" in problem
    assert "judged_env.yaml" in problem
    # ...and with the judge model's config included, it composes.
    cfg = config_of(tmp_path, f"+config_paths=[{VLLM_MODEL},{JUDGE_MODEL},judged_env.yaml]")
    assert cfg["judge_model"]["responses_api_models"]["vllm_model"]["model"] == "Qwen/Qwen3-30B-A3B"


def run_guide_snippet(snippet: str, cwd: Path) -> subprocess.CompletedProcess:
    """A shell snippet from the guide, as a user pastes it (ng_run swapped for ng_dump_config)."""
    return subprocess.run(["bash", "-c", textwrap.dedent(snippet).replace("ng_run ", "ng_dump_config ")], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})


def test_the_guides_judge_command(tmp_path):
    write_env(tmp_path, {**POLICY_ENV, **JUDGE_ENV_YAML})
    full = run_guide_snippet("""
        config_paths="responses_api_models/vllm_model/configs/vllm_model.yaml,\\
        responses_api_models/vllm_model/configs/vllm_judge_model.yaml,\\
        resources_servers/equivalence_llm_judge/configs/equivalence_llm_judge.yaml"

        ng_run "+config_paths=[${config_paths}]"
    """, tmp_path)
    assert full.returncode == 0, full.stderr
    assert "judge_model" in yaml.safe_load(full.stdout)

    without_judge = run_cli("ng_dump_config", [f"+config_paths=[{VLLM_MODEL},{JUDGE_ENV}]"], cwd=tmp_path, timeout=60)
    assert without_judge.returncode == 2, without_judge.stdout + without_judge.stderr
    assert "judge_model" in without_judge.stderr
    assert "Traceback" not in without_judge.stderr


def test_the_guides_switch_from_openai_to_vllm_changes_only_the_policy_model(tmp_path):
    write_env(tmp_path, POLICY_ENV)
    dumps = {}
    for impl in ("openai_model", "vllm_model"):
        result = run_guide_snippet(f"""
            config_paths="responses_api_models/{impl}/configs/{impl}.yaml,\\
            resources_servers/simple_weather/configs/simple_weather.yaml"
            ng_run "+config_paths=[${{config_paths}}]"
        """, tmp_path)
        assert result.returncode == 0, result.stderr
        dumps[impl] = yaml.safe_load(result.stdout)
    before, after = dumps["openai_model"], dumps["vllm_model"]
    assert list(before["policy_model"]["responses_api_models"]) == ["openai_model"]
    assert list(after["policy_model"]["responses_api_models"]) == ["vllm_model"]
    for key in ("base_url", "model", "api_key"):
        assert before["policy_model"]["responses_api_models"]["openai_model"][key] == \
            after["policy_model"]["responses_api_models"]["vllm_model"][key]
    strip = lambda d: {k: v for k, v in d.items() if k not in ("policy_model", "config_paths")}  # noqa: E731
    assert strip(before) == strip(after)


# ------------------------------------------------------------------ ng_dump_config and secrets


def test_dump_config_shows_a_comma_separated_base_url_as_the_list_the_adapter_uses(tmp_path):
    write_env(tmp_path, {**POLICY_ENV, "policy_base_url": "http://vllm-1:8000/v1, http://vllm-2:8000/v1,"})
    result = run_cli("ng_dump_config", [f"+config_paths=[{VLLM_MODEL},{WEATHER}]"], cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    model = yaml.safe_load(result.stdout)["policy_model"]["responses_api_models"]["vllm_model"]
    assert model["base_url"] == ["http://vllm-1:8000/v1", "http://vllm-2:8000/v1"]


def test_dump_config_prints_the_resolved_config_with_secrets_masked(tmp_path):
    write_env(tmp_path, {**POLICY_ENV, "policy_api_key": "sk-policy-SECRET-111"})
    write(tmp_path, "extra.yaml", """
        my_settings:
          hf_token: hf-SECRET-222
          client_secret: cs-SECRET-333
          db_password: pw-SECRET-444
          token: tk-SECRET-555
          max_tokens: 512
          prompt_token_ids: [1, 2, 3]
          num_tokens: 9
    """)
    result = run_cli("ng_dump_config", [f"+config_paths=[{VLLM_MODEL},{WEATHER},extra.yaml]"], cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    for secret in ("sk-policy-SECRET-111", "hf-SECRET-222", "cs-SECRET-333", "pw-SECRET-444", "tk-SECRET-555"):
        assert secret not in result.stdout + result.stderr

    dumped = yaml.safe_load(result.stdout)
    model = dumped["policy_model"]["responses_api_models"]["vllm_model"]
    assert model["base_url"] == "http://vllm-1:8000/v1"  # resolved, not ${policy_base_url}
    assert model["model"] == "m"
    assert model["api_key"] == "****"
    assert dumped["policy_api_key"] == "****"
    mine = dumped["my_settings"]
    assert mine["hf_token"] == mine["client_secret"] == mine["db_password"] == mine["token"] == "****"
    assert mine["max_tokens"] == 512
    assert mine["prompt_token_ids"] == [1, 2, 3]
    assert mine["num_tokens"] == 9
    assert "simple_weather_simple_agent" in dumped
    assert "head_server" in dumped  # the conf/ defaults ng_run would use are there too
