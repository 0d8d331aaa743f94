"""equivalence_llm_judge: an LLM judge decides whether the policy's answer matches `expected_answer`.

/verify fills the prompt template with the question (the last user message of the row), the
expected answer and the generated answer (the last assistant message of the response, optionally
cut out by a regex), asks the judge model and rewards 1.0 when it answers with the equal label.
With check_twice_swap, an equal verdict is checked again with the two answers swapped (against
positional bias). A judge that cannot be reached fails /verify (502): never a silent reward 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from typing import Any

from nemo_gym_cli.serving import (HTTPError, RequestContext, ServerCallError, ServerConfig, ServerRef,
                                  SimpleResourcesServer, last_assistant_text, last_message_text, require, resolve_path,
                                  route)

NO_ANSWER = "[NO VALID ANSWER EXTRACTED]"  # what the judge sees when the answer regex finds nothing


def extract(pattern: re.Pattern | None, text: str, *, last: bool) -> str | None:
    """Group 1 (else the whole match) of the first/last match; the text itself without a pattern."""
    if pattern is None:
        return text
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    m = matches[-1] if last else matches[0]
    return m.group(1) if pattern.groups and m.group(1) is not None else m.group(0)


def has_label(text: str, label: str, other: str) -> bool:
    """`label` occurs in `text` other than inside the other label (e.g. EQUAL inside NOT EQUAL)."""
    return label in (text.replace(other, "") if label in other else text)


@dataclass(kw_only=True)
class EquivalenceLLMJudgeConfig(ServerConfig):
    """Every field is listed, with its default and what it does, in configs/equivalence_llm_judge.yaml."""

    judge_model_server: ServerRef
    judge_responses_create_params: dict
    judge_system_message: str | None
    judge_prompt_template_fpath: str
    judge_equal_label: str
    judge_not_equal_label: str
    check_twice_swap: bool
    reward_if_swap_fails: float
    question_extract_regex: str | None
    response_extract_regex: str | None
    judge_endpoint_max_concurrency: int | None


class EquivalenceLLMJudgeResourcesServer(SimpleResourcesServer):
    config_type = EquivalenceLLMJudgeConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.create_params = dict(cfg.judge_responses_create_params)
        self.template = self._load_template(cfg.judge_prompt_template_fpath)
        if not cfg.judge_equal_label or not cfg.judge_not_equal_label or cfg.judge_equal_label == cfg.judge_not_equal_label:
            raise ValueError(f"server '{self.name}': judge_equal_label and judge_not_equal_label must be two different non-empty strings")
        self.question_regex = self._regex("question_extract_regex", cfg.question_extract_regex)
        self.response_regex = self._regex("response_extract_regex", cfg.response_extract_regex)
        limit = cfg.judge_endpoint_max_concurrency
        self.judge_slots = asyncio.Semaphore(limit) if limit else contextlib.nullcontext()

    def _load_template(self, raw: str) -> str:
        path = resolve_path(raw)
        if path is None or not path.is_file():
            raise ValueError(f"server '{self.name}': config field 'judge_prompt_template_fpath': file '{raw}' not found "
                             "(looked in the current directory and the project root)")
        template = path.read_text(encoding="utf-8")
        try:
            template.format(question="", expected_answer="", generated_answer="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"server '{self.name}': judge_prompt_template_fpath '{path}': bad placeholder {e} (allowed: "
                             "{question}, {expected_answer}, {generated_answer}; write other braces as {{ }})") from None
        return template

    def _regex(self, key: str, raw: str | None) -> re.Pattern | None:
        try:
            return re.compile(raw, re.DOTALL) if raw else None
        except re.error as e:
            raise ValueError(f"server '{self.name}': config field '{key}' is not a valid regex: {e}") from None

    @route("/verify")
    async def verify(self, body: Any, ctx: RequestContext) -> Any:
        expected = str(require(body, "expected_answer", (str, int, float), where="verify request"))
        response = require(body, "response", dict, where="verify request")
        params = require(body, "responses_create_params", dict, where="verify request")
        user_text = last_message_text(params.get("input"), "user")
        question = extract(self.question_regex, user_text, last=False) or user_text

        pattern = self.response_regex
        metadata = body.get("template_metadata")
        row_regex = metadata.get("output_regex") if isinstance(metadata, dict) else None
        if row_regex:  # a per-row regex wins over the configured one
            try:
                pattern = re.compile(str(row_regex), re.DOTALL)
            except re.error as e:
                raise HTTPError(400, f"verify request: template_metadata.output_regex is not a valid regex: {e}") from None
        generated = extract(pattern, last_assistant_text(response.get("output")), last=True)
        generated = NO_ANSWER if generated is None else generated

        evaluations = [await self._judge(question, expected, generated)]
        reward = 1.0 if evaluations[0]["verdict"] == "equal" else 0.0
        if reward and self.config.check_twice_swap:
            evaluations.append(await self._judge(question, generated, expected))
            if evaluations[1]["verdict"] != "equal":
                reward = self.config.reward_if_swap_fails
        return {**body, "reward": reward, "expected_answer": expected, "judge_evaluations": evaluations}

    async def _judge(self, question: str, expected: str, generated: str) -> dict:
        cfg = self.config
        prompt = self.template.format(question=question, expected_answer=expected, generated_answer=generated)
        system = [{"role": "system", "content": cfg.judge_system_message}] if cfg.judge_system_message else []
        params = {**self.create_params, "input": [*system, {"role": "user", "content": prompt}]}
        try:
            async with self.judge_slots:  # judge calls are independent: no session id
                response = await self.client.post(cfg.judge_model_server.name, "/v1/responses", params, idempotent=True)
        except ServerCallError as e:
            raise HTTPError(502, f"{self.name}: judge model server '{cfg.judge_model_server.name}' failed: {e}", "upstream_error") from None
        text = last_assistant_text(response.get("output"))
        equal = has_label(text, cfg.judge_equal_label, cfg.judge_not_equal_label)
        not_equal = has_label(text, cfg.judge_not_equal_label, cfg.judge_equal_label)
        evaluation = {"responses_create_params": params, "response": response,
                      "verdict": "unparsed" if equal == not_equal else "equal" if equal else "not_equal"}
        if equal == not_equal:
            evaluation["note"] = f"the judge's answer contains {'both' if equal else 'neither'} of the labels: counted as not equal"
        return evaluation
