"""The summary table fits an 80-column terminal: no line wider, no pass@k value split over lines."""

import io

from rich.console import Console

from nemo_gym_cli.collect.report import summary_table

PASS_AT_K = {"1": 0.3333, "2": 0.5, "4": 0.6667, "8": 0.875, "16": 0.9375, "32": 0.96875, "64": 1.0}


def data(per_agent: dict) -> dict:
    return {"rollouts": 1280, "failures": 3, "retries": 5, "max_attempts": 3, "skipped_already_done": 0,
            "means": {"reward": 0.4375, "num_steps": 2.5}, "rollouts_per_s": 41.7, "latency_p50_s": 1.82,
            "latency_p95_s": 4.1, "concurrency": 100,
            "token_exact_turns": 2556, "token_exact_fallbacks": 12, "per_agent": per_agent, "interrupted": False,
            "requests_per_backend": {"http://127.0.0.1:45678/v1": 1700, "http://127.0.0.1:45679/v1": 1650},
            "errors_per_backend": {"http://127.0.0.1:45679/v1": {"malformed": 2}}}


def test_the_summary_table_fits_80_columns_and_its_pass_at_k_values_do_not_wrap():
    agents = {name: {"rollouts": 640, "failures": 1, "repeats": 64, "means": {"reward": 0.4}, "pass@k": PASS_AT_K}
              for name in ("math_verify_simple_agent", "simple_weather_simple_agent")}
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(
        summary_table(data(agents), None, "rollouts.jsonl", "rollouts_failures.jsonl"))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    text = "\n".join(lines)
    for k, v in PASS_AT_K.items():  # each value whole on one line, for both agents
        assert sum(f"pass@{k} {v:.4f}" in line for line in lines) == 2, text
    assert sum("2556 (12 not exact)" in line for line in lines) == 1, text
    assert "agent math_verify_simple_agent" in text and "640 rollouts, 1 failed" in text and "0.4000" in text


def test_the_summary_table_is_as_narrow_as_its_content():
    agents = {"a": {"rollouts": 2, "failures": 0, "repeats": 1, "means": {}, "pass@k": {"1": 1.0}}}
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(summary_table(data(agents), "a", "o.jsonl", "o_failures.jsonl"))
    assert max(len(line) for line in out.getvalue().splitlines()) < 100  # not stretched to the terminal's 200
