"""equivalence_llm_judge with separate policy and judge servers (the guide's command shape).

Two vLLM stand-ins: the policy one answers "The answer is: <first 40 chars of the question>";
the judge one runs with --script, so its verdict depends on what the judge prompt contains.
"""

from __future__ import annotations

import json

import pytest
import yaml

from nemo_gym_cli.testing.harness import PROJECT_ROOT, VLLM_MODEL, http_json, run_cli

JUDGE_MODEL = "responses_api_models/vllm_model/configs/vllm_judge_model.yaml"
JUDGE_ENV = "resources_servers/equivalence_llm_judge/configs/equivalence_llm_judge.yaml"
AGENT = "equivalence_llm_judge_simple_agent"
SERVER = "++equivalence_llm_judge.resources_servers.equivalence_llm_judge"  # CLI override prefix


def start(standins, graph, tmp_path, rules: list[dict], args: list[str] = (), colocate: bool = False):
    """A policy stand-in, a scripted judge stand-in and the graph of the guide's command."""
    (script := tmp_path / "judge_rules.json").write_text(json.dumps(rules))
    policy, = standins(1, "--model", "policy-model")
    judge, = standins(1, "--model", "judge-model", "--script", str(script))
    env = {"policy_base_url": policy.url, "policy_api_key": "EMPTY", "policy_model_name": "policy-model",
           "judge_base_url": judge.url, "judge_api_key": "EMPTY", "judge_model_name": "judge-model"}
    g = graph([VLLM_MODEL, JUDGE_MODEL, JUDGE_ENV], env=env, args=list(args), colocate=colocate)
    return policy, judge, g


def row(question: str, expected: str | None = None, **extra) -> dict:
    r = {"responses_create_params": {"input": [{"role": "user", "content": question}]}, **extra}
    return r if expected is None else {**r, "expected_answer": expected}


def run(g, body: dict) -> tuple[int, dict]:
    return http_json(g.url(AGENT) + "/run", body, timeout=60)


def judge_prompt(evaluation: dict) -> str:
    return evaluation["responses_create_params"]["input"][-1]["content"]


def test_the_judge_decides_the_reward_on_its_own_server(standins, graph, tmp_path, mode):
    policy, judge, g = start(standins, graph, tmp_path, [
        {"match": "mark-eq", "content": "Both say the same. [[A=B]]"},
        {"match": "mark-neq", "content": "They differ. [[A!=B]]"},
    ], colocate=mode == "colocated")

    status, out = run(g, row("mark-eq: What is the capital of France?", "Paris", uid=7))
    assert status == 200, out
    assert out["reward"] == 1.0 and out["expected_answer"] == "Paris" and out["uid"] == 7
    [ev] = out["judge_evaluations"]
    assert ev["verdict"] == "equal" and "[[A=B]]" in ev["response"]["output"][-1]["content"][0]["text"]
    sent = ev["responses_create_params"]
    assert sent["temperature"] == 0.0 and sent["max_output_tokens"] == 512  # judge_responses_create_params
    assert [m["role"] for m in sent["input"]] == ["user"]  # no judge_system_message configured
    prompt = judge_prompt(ev)
    for part in ("mark-eq: What is the capital of France?", "Paris", "The answer is: mark-eq: What is the capital of France?"):
        assert part in prompt  # question, gold answer, the policy's whole answer (no regex)

    status, out = run(g, row("mark-neq: What is the capital of Spain?", "Madrid"))
    assert status == 200 and out["reward"] == 0.0 and [e["verdict"] for e in out["judge_evaluations"]] == ["not_equal"]

    # No rule matches: the judge stand-in echoes text without a label -> not equal, with a note.
    status, out = run(g, row("What is the capital of Peru?", "Lima"))
    assert status == 200 and out["reward"] == 0.0
    [ev] = out["judge_evaluations"]
    assert ev["verdict"] == "unparsed" and "neither" in ev["note"]

    # Per-row template_metadata.output_regex: the judge sees only the extracted answer.
    status, out = run(g, row("mark-eq capital of Italy: Rome", "Rome", template_metadata={"output_regex": "Italy: ([A-Za-z]+)"}))
    assert status == 200 and out["reward"] == 1.0
    prompt = judge_prompt(out["judge_evaluations"][0])
    assert "Rome" in prompt and "The answer is:" not in prompt
    status, out = run(g, row("mark-neq capital of Chile?", "Santiago", template_metadata={"output_regex": "Santiago"}))
    assert status == 200 and out["reward"] == 0.0
    assert "[NO VALID ANSWER EXTRACTED]" in judge_prompt(out["judge_evaluations"][0])

    # A row without expected_answer is a 400 naming the field (the episode itself ran).
    status, out = run(g, row("mark-eq: no gold answer here"))
    assert status == 400 and "expected_answer" in out["error"]["message"]

    # Six episodes on the policy stand-in, five judge calls on the judge stand-in, none crossed.
    assert policy.stats()["requests"] == 6 and judge.stats()["requests"] == 5
    assert all(count == 1 for count in judge.sessions().values())  # judge calls share no session


def test_swap_check_extraction_regexes_and_a_template_from_the_working_directory(standins, graph, tmp_path):
    (tmp_path / "judge_template.txt").write_text("QUESTION={question}\nGOLD={expected_answer}\nGEN={generated_answer}\n")
    _, judge, g = start(standins, graph, tmp_path, [
        {"match": "GOLD=swapgold", "content": "[[A=B]]"},    # first pass says equal...
        {"match": "GEN=swapgold", "content": "[[A!=B]]"},    # ...the swapped pass does not
        {"match": "GOLD=steady", "content": "[[A=B]]"},
        {"match": "GOLD=right", "content": "[[A!=B]]"},
    ], args=[f"{SERVER}.check_twice_swap=true", f"{SERVER}.reward_if_swap_fails=0.25",
             f"{SERVER}.judge_prompt_template_fpath=judge_template.txt",  # relative to the working directory
             f"{SERVER}.question_extract_regex='Question: (.*)'",
             f"{SERVER}.response_extract_regex='ans=([a-z]+)'",
             f"{SERVER}.judge_system_message='You are a strict judge.'"])
    # The policy answers "The answer is: ans=<word>; Question: ..." (first 40 chars of the question).

    status, out = run(g, row("ans=swapgen; Question: swap test", "swapgold"))
    assert status == 200, out
    assert out["reward"] == 0.25  # reward_if_swap_fails
    first, swapped = out["judge_evaluations"]
    assert [first["verdict"], swapped["verdict"]] == ["equal", "not_equal"]
    assert judge_prompt(first) == "QUESTION=swap test\nGOLD=swapgold\nGEN=swapgen\n"
    assert judge_prompt(swapped) == "QUESTION=swap test\nGOLD=swapgen\nGEN=swapgold\n"
    assert first["responses_create_params"]["input"][0] == {"role": "system", "content": "You are a strict judge."}

    status, out = run(g, row("ans=steady; Question: swap ok", "steady"))
    assert status == 200 and out["reward"] == 1.0 and [e["verdict"] for e in out["judge_evaluations"]] == ["equal", "equal"]

    status, out = run(g, row("ans=wrong; Question: swap no", "right"))
    assert status == 200 and out["reward"] == 0.0 and len(out["judge_evaluations"]) == 1  # no swap after "not equal"

    # A row's own regex wins over response_extract_regex; a question regex that misses keeps the whole message.
    status, out = run(g, row("ans=blue; which colour is it", "blue", template_metadata={"output_regex": "colour ([a-z]+)"}))
    assert status == 200
    assert judge_prompt(out["judge_evaluations"][0]) == "QUESTION=ans=blue; which colour is it\nGOLD=blue\nGEN=is\n"
    assert judge.stats()["requests"] == 6


def test_a_failing_judge_fails_the_rollout_instead_of_scoring_it(standins, graph, tmp_path, mode):
    _, judge, g = start(standins, graph, tmp_path, [{"match": "JUDGE_ERROR", "status": 500}], args=[
        "++judge_model.responses_api_models.vllm_model.max_retries=0",          # keep the test fast:
        "++judge_model.responses_api_models.vllm_model.wait_for_backend_s=0.2",  # retries stay bounded,
        "+http_client.max_retries=1", "+http_client.backoff_base_s=0.01",       # just quicker
    ], colocate=mode == "colocated")

    status, out = run(g, row("JUDGE_ERROR: what is 2+2?", "4"))
    assert status >= 500 and "reward" not in out, out
    assert "judge_model" in out["error"]["message"] and "equivalence_llm_judge" in out["error"]["message"]
    assert judge.stats()["requests"] >= 1  # the judge was asked (and failed), not skipped

    judge.stop()
    status, out = run(g, row("what is 3+3?", "6"))
    assert status >= 500 and "reward" not in out, out
    assert "judge_model" in out["error"]["message"]


def test_without_the_judge_model_config_nothing_starts(tmp_path):
    (tmp_path / "env.yaml").write_text(yaml.safe_dump({"policy_base_url": "http://127.0.0.1:9/v1", "policy_api_key": "EMPTY",
                                                       "policy_model_name": "m"}))
    for command in ("ng_dump_config", "ng_run"):
        proc = run_cli(command, [f"+config_paths=[{VLLM_MODEL},{JUDGE_ENV}]", "+head_server.port=9"], tmp_path, timeout=60)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert "judge_model" in proc.stderr and "Traceback" not in proc.stderr


def test_config_mistakes_are_startup_errors_naming_the_key(tmp_path):
    from resources_servers.equivalence_llm_judge.app import EquivalenceLLMJudgeResourcesServer as Server

    config = yaml.safe_load((PROJECT_ROOT / JUDGE_ENV).read_text())["equivalence_llm_judge"]["resources_servers"]["equivalence_llm_judge"]
    assert Server("ok", config).template.count("{generated_answer}") == 1
    for key, value in [("judge_prompt_template_fpath", "prompt_templates/missing.txt"),
                       ("response_extract_regex", "(unclosed"), ("judge_model_server", None)]:
        with pytest.raises(ValueError, match=key):
            Server("eq", {**config, key: value})
    (bad := tmp_path / "bad.txt").write_text("{question} {answer}")
    with pytest.raises(ValueError, match="judge_prompt_template_fpath"):
        Server("eq", {**config, "judge_prompt_template_fpath": str(bad)})


def test_the_example_dataset_has_five_questions_with_answers():
    example = PROJECT_ROOT / "resources_servers/equivalence_llm_judge/data/example.jsonl"
    rows = [json.loads(line) for line in example.read_text().splitlines()]
    assert len(rows) == 5
    for r in rows:
        assert r["expected_answer"] and r["responses_create_params"]["input"][-1]["role"] == "user"
        assert "tools" not in r["responses_create_params"]
