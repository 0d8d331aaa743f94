"""Token-exact turns over stock vLLM's token-in/token-out API (vLLM >= 0.32, `--enable-scale-out`).

Turn 1: `render` (the server's chat template and tool-choice settings) -> `generate` (token ids
in, token ids + logprobs + weight versions out) -> `derender` (vLLM's own tool/reasoning parsers).
Turn k > 1: the prompt is the previous model turn's exact `prompt_token_ids + generation_token_ids`
(read from the history's last model item, which the agent sends back: no server-side state),
then the rendered tokens of what came after it (tool outputs, user messages, the generation
prompt), spliced at the chat template's end-of-turn token. Re-templating the history instead
would re-render the model's own output differently (a generated `<tool_call>{...}` comes back as
`<tool_call>\\n{...}\\n</tool_call>`), so turn k would be conditioned on tokens the model never
produced. Where the splice cannot be made the turn is rendered afresh and says so.

A generation aborted by a weight sync (`finish_reason: "abort"`) is continued from its partial
tokens with the remaining budget once the backend serves again; `weight_versions` keeps one
span per version. Under structured outputs (a forced tool call) the grammar cannot resume in
the middle of an output, so that turn is generated again from its prompt instead.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from nemo_gym_cli.serving import ABORTED, RequestContext, check_chat_completion, wait_until_serving
from responses_api_models.vllm_model.conversion import TOKEN_FIELDS

RENDER = "/chat/completions/render"  # under base_url (/v1)
GENERATE = "/inference/v1/generate"  # at the server's root
DERENDER = "/chat/completions/derender"  # under base_url


def check_render(answer: Any) -> str | None:
    if not isinstance(answer, dict) or not _ids(answer.get("token_ids")) or not isinstance(answer.get("sampling_params"), dict):
        return "without 'token_ids' and 'sampling_params' (is this vLLM >= 0.32 with --enable-scale-out?)"
    return None


def check_generate(answer: Any) -> str | None:
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "without 'choices'"
    token_ids = choices[0].get("token_ids")
    if token_ids is not None and not _ids(token_ids, allow_empty=True):
        return "with choices[0].token_ids that is not a list of token ids"
    return None


def _ids(value: Any, allow_empty: bool = False) -> bool:
    return isinstance(value, list) and (allow_empty or bool(value)) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)


def last_model_turn(messages: list[dict]) -> tuple[list[int] | None, list[int] | None, str | None]:
    """What a turn extends: (prompt ids, generation ids, None) of the history's last assistant message.

    (None, None, None): nothing to extend, the whole history is this turn's prompt. That is a first
    turn: no assistant message, or only id-less ones before the last user message (few-shot examples
    or an earlier conversation that the dataset row brings).
    (None, None, why): the last assistant message is one of this episode's model turns (it follows
    the last user message, there is no user message, or an earlier assistant message carried ids)
    but has no valid ids: the agent dropped or changed them, so the turn cannot be spliced.
    """
    last = last_user = None
    carried = False
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant":
            last = i
            carried = carried or any(key in message for key in TOKEN_FIELDS)
        elif role == "user":
            last_user = i
    if last is None:
        return None, None, None
    prompt, generation = messages[last].get("prompt_token_ids"), messages[last].get("generation_token_ids")
    if _ids(prompt) and _ids(generation):
        return prompt, generation, None
    if carried or last_user is None or last > last_user:
        return None, None, ("the history's last model turn carries no valid prompt_token_ids and generation_token_ids "
                            "(the agent dropped or changed them)")
    return None, None, None


def _turns(ids: list[int], end_of_turn: int) -> list[list[int]]:
    """`ids` cut after every end-of-turn token: one piece per rendered message (the last piece is
    whatever follows the last end-of-turn token)."""
    pieces, start = [], 0
    for i, token in enumerate(ids):
        if token == end_of_turn:
            pieces.append(ids[start:i + 1])
            start = i + 1
    pieces.append(ids[start:])
    return pieces


def splice(prev_prompt: list[int], prev_generation: list[int], rendered: list[int]) -> tuple[list[int] | None, str | None]:
    """The previous turn's exact ids + the rendered tokens after its end-of-turn token, or (None, why).

    `rendered` is the whole history rendered by the server's template, with the generation prompt.
    The previous generation's last token is its end-of-turn token (vLLM keeps the EOS it stopped
    on); the generation prompt is what follows the last one in the previous prompt. Cut both the
    exact ids and `rendered` after each end-of-turn token: message by message they must agree,
    except the model's own turns (those start with the generation prompt), where the exact ids
    stand and the template's re-rendering is dropped. What `rendered` has after them is new."""
    end_of_turn = prev_generation[-1]
    exact_turns = _turns(prev_prompt + prev_generation, end_of_turn)[:-1]  # the generation closes the last
    generation_prompt = _turns(prev_prompt, end_of_turn)[-1]
    if len(exact_turns) < 2 or not generation_prompt:
        return None, ("the last model turn did not end with the chat template's end-of-turn token "
                      "(cut off by max_output_tokens or a stop string?)")
    rendered_turns = _turns(rendered, end_of_turn)
    g = len(generation_prompt)
    for exact, again in zip(exact_turns, rendered_turns[:len(exact_turns)]):
        model_turn = exact[:g] == generation_prompt and again[:g] == generation_prompt
        if exact != again and not model_turn:
            return None, ("the history before the last model turn renders to other tokens than the turns saw "
                          "(the history was edited, or the chat template rewrites earlier turns)")
    new = [token for piece in rendered_turns[len(exact_turns):] for token in piece]
    if len(rendered_turns) <= len(exact_turns) or new[len(new) - g:] != generation_prompt:
        return None, "the rendered history does not end with a new generation prompt after the last model turn"
    return prev_prompt + prev_generation + new, None


def _without_token_fields(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TOKEN_FIELDS} if m.get("role") == "assistant" else m
            for m in messages]


def _constrained(sampling_params: dict) -> bool:
    """Structured outputs on (a forced tool call, a response format): the grammar starts at the output's start."""
    so = sampling_params.get("structured_outputs")
    return isinstance(so, dict) and any(v not in (None, False, "") for k, v in so.items()
                                        if k not in ("disable_any_whitespace", "disable_additional_properties",
                                                     "whitespace_pattern"))


@dataclass
class Generation:
    """The generated tokens of one turn, over every generate call it took."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # vLLM's logprobs.content entries
    weight_versions: list[dict] = field(default_factory=list)  # [{version, start, end}] over token_ids
    aborts: int = 0  # generate calls a pause aborted

    def extend(self, choice: dict) -> None:
        offset = len(self.token_ids)
        new = choice.get("token_ids") or []
        self.token_ids += new
        self.logprobs += ((choice.get("logprobs") or {}).get("content") or [])[:len(new)]
        for span in choice.get("weight_versions") or ():
            start, end = span.get("start", 0) + offset, span.get("end", 0) + offset
            last = self.weight_versions[-1] if self.weight_versions else None
            if last is not None and last["version"] == span.get("version") and last["end"] == start:
                last["end"] = end  # one version across an abort: one span
            else:
                self.weight_versions.append({"version": span.get("version"), "start": start, "end": end})

    def restart(self) -> None:
        self.token_ids, self.logprobs, self.weight_versions = [], [], []


async def token_exact_turn(upstream, ctx: RequestContext, chat_params: dict, *, model: str,
                           timeout_s: float) -> tuple[dict, dict]:
    """One model turn: (ChatCompletion from derender, token fields for the turn's last output item)."""
    deadline = time.monotonic() + timeout_s
    minted = ctx.session_id is None  # every call of a turn goes to one backend: give it a session
    if minted:
        ctx = RequestContext(uuid.uuid4().hex, ctx.headers)
    try:
        return await _turn(upstream, ctx, chat_params, model, deadline)
    finally:
        if minted:
            upstream.release(ctx.session_id)


async def _turn(upstream, ctx: RequestContext, chat_params: dict, model: str, deadline: float) -> tuple[dict, dict]:
    chat_request = {**chat_params, "messages": _without_token_fields(chat_params["messages"])}
    rendered = await upstream.call(ctx, RENDER, chat_request, check=check_render)
    prompt = rendered["token_ids"]
    prev_prompt, prev_generation, why_not = last_model_turn(chat_params["messages"])
    if prev_prompt is not None:
        spliced, why_not = splice(prev_prompt, prev_generation, prompt)
        prompt = spliced or prompt
    sampling = dict(rendered["sampling_params"])
    if sampling.get("logprobs") is None:
        sampling["logprobs"] = 0  # the sampled token's logprob: training needs it
    budget = sampling.get("max_tokens")
    if isinstance(budget, int) and "max_tokens" not in chat_params:  # render's default fills the context
        budget = max(1, budget - (len(prompt) - len(rendered["token_ids"])))
    constrained = _constrained(sampling)
    request = {k: v for k, v in rendered.items() if k not in ("token_ids", "sampling_params", "request_id")}
    generation = Generation()
    answer: dict = {}
    while True:
        params = sampling if budget is None else {**sampling, "max_tokens": budget - len(generation.token_ids)}
        body = {**request, "model": model, "token_ids": prompt + generation.token_ids, "sampling_params": params}
        answer, backend = await upstream.exchange(ctx, GENERATE, body, at_root=True, check=check_generate,
                                                  deadline=deadline)
        choice = answer["choices"][0]
        generation.extend(choice)
        if choice.get("finish_reason") != ABORTED:
            break
        generation.aborts += 1
        if constrained:
            generation.restart()
        elif budget is not None and len(generation.token_ids) >= budget:
            break  # the whole budget came back before the abort landed: nothing to continue
        await wait_until_serving(upstream.server.client, backend, upstream.headers, attempt=generation.aborts - 1,
                                 deadline=deadline, what=upstream.server.name)
    finish_reason = choice.get("finish_reason")
    if finish_reason == ABORTED:
        finish_reason = "length"  # only reached with the budget spent
    final = {**choice, "token_ids": generation.token_ids, "logprobs": {"content": generation.logprobs},
             "weight_versions": generation.weight_versions, "finish_reason": finish_reason}
    usage = dict(answer.get("usage") or {})
    usage.update(prompt_tokens=len(prompt), completion_tokens=len(generation.token_ids),
                 total_tokens=len(prompt) + len(generation.token_ids))
    generate_response = {**answer, "choices": [final], "usage": usage}
    chat = await upstream.call(ctx, DERENDER, {"model": model, "chat_request": chat_request,
                                               "generate_response": generate_response}, check=check_chat_completion)
    chat["usage"] = usage
    chat["choices"][0]["finish_reason"] = "length" if finish_reason == "length" else chat["choices"][0].get("finish_reason")
    fields: dict[str, Any] = {
        "prompt_token_ids": prompt,
        "generation_token_ids": generation.token_ids,
        "generation_log_probs": [float(e.get("logprob", 0.0)) for e in generation.logprobs],
        "weight_versions": generation.weight_versions,
        "token_exact": why_not is None,
    }
    if why_not is not None:
        fields["token_exact_reason"] = why_not
    if generation.aborts:
        fields["aborted_generations"] = generation.aborts
    return chat, fields
