"""vllm_model: the Responses API over one or many vLLM servers' Chat Completions API.

Each session (one rollout) stays on one vLLM server (prefix cache); new sessions go to the
least loaded healthy server; a dying server's sessions move and their request is retried.
`token_exact: true` runs each turn over vLLM's token-in/token-out API instead (token_exact.py).
A turn that a weight sync aborted is never returned as finished: it waits for the backend and
goes on. POST /pause and /resume pause or resume every backend at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_gym_cli.serving import (PAUSE_MODES, HTTPError, RequestContext, UpstreamConfig, UpstreamModel, forward_pause,
                                  route)
from responses_api_models.vllm_model.conversion import (
    chat_to_response,
    incomplete_response,
    is_context_length_error,
    responses_to_chat,
)
from responses_api_models.vllm_model.token_exact import token_exact_turn


@dataclass(kw_only=True)
class VLLMModelConfig(UpstreamConfig):
    """NeMo Gym's vllm_model fields, beside UpstreamConfig's (its routing fields are RoutingSettings, routing/router.py)."""

    return_token_id_information: bool = False  # prompt/generation token ids and logprobs on every turn (RL training)
    # Each turn over vLLM's render/generate/derender (vLLM >= 0.32 started with --enable-scale-out):
    # later turns extend the previous turn's exact prompt + generation ids instead of re-templating
    # the history; token ids, logprobs and weight_versions on every turn (implies the token fields).
    token_exact: bool = False
    uses_reasoning_parser: bool = True  # vLLM runs a reasoning parser: its reasoning becomes reasoning items
    replace_developer_role_with_system: bool = False  # for chat templates without a developer role
    chat_template_kwargs: dict | None = None  # passed to vLLM's chat template (e.g. enable_thinking)
    extra_body: dict | None = None  # merged into every Chat Completions request


class VLLMModel(UpstreamModel):
    config_type = VLLMModelConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.token_exact = cfg.token_exact
        self.return_token_id_information = cfg.return_token_id_information or cfg.token_exact
        self.uses_reasoning_parser = cfg.uses_reasoning_parser
        self.replace_developer_role_with_system = cfg.replace_developer_role_with_system
        self.chat_template_kwargs = cfg.chat_template_kwargs or None
        self.extra_body = cfg.extra_body or None

    @route("/v1/responses")
    async def responses(self, body: Any, ctx: RequestContext) -> Any:
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object (Responses create params)")
        try:
            chat_params = responses_to_chat(
                body, model=self.model,
                replace_developer_role_with_system=self.replace_developer_role_with_system,
                uses_reasoning_parser=self.uses_reasoning_parser,
                return_token_id_information=self.return_token_id_information,
                chat_template_kwargs=self.chat_template_kwargs, extra_body=self.extra_body,
            )
        except (ValueError, TypeError, KeyError) as e:
            raise HTTPError(400, f"cannot convert the request to Chat Completions: {e}") from None
        try:
            if self.token_exact:
                chat, token_fields = await token_exact_turn(self.upstream, ctx, chat_params, model=self.model,
                                                            timeout_s=self.config.timeout_s)
            else:
                chat, token_fields = await self.chat_until_finished(ctx, chat_params), None
        except HTTPError as e:
            if is_context_length_error(e.status, e.message):
                # The episode cannot go on, but it ended cleanly: the agent stops and verifies.
                return incomplete_response(body, model=self.model, reason="max_output_tokens", message=e.message)
            raise
        if token_fields is not None:
            response = chat_to_response(chat, body, model=self.model, uses_reasoning_parser=self.uses_reasoning_parser)
            response["output"][-1].update(token_fields)
            return response
        prompt_token_ids = None
        if self.return_token_id_information:
            prompt_token_ids = await self._prompt_token_ids(ctx, chat_params)
        return chat_to_response(
            chat, body, model=self.model, uses_reasoning_parser=self.uses_reasoning_parser,
            return_token_id_information=self.return_token_id_information, prompt_token_ids=prompt_token_ids,
        )

    @route("/pause")
    async def pause(self, body: Any, ctx: RequestContext) -> Any:
        """Pause every backend (a weight sync): `?mode=abort|wait|keep` or `{"mode": ...}`, passed through."""
        mode = ctx.query.get("mode") or (body.get("mode") if isinstance(body, dict) else None) or None
        if mode is not None and mode not in PAUSE_MODES:
            raise HTTPError(400, f"mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
        return await self._forward("pause", mode)

    @route("/resume")
    async def resume(self, body: Any, ctx: RequestContext) -> Any:
        return await self._forward("resume", None)

    async def _forward(self, action: str, mode: str | None) -> Any:
        answer = await forward_pause(self.client, self.upstream.router.backends, self.upstream.headers, action, mode,
                                     self.config.timeout_s)
        if not answer["ok"]:
            failed = "; ".join(f"{b['url']}: {b['error']}" for b in answer["backends"] if not b["ok"])
            raise HTTPError(502, f"{self.name}: {action} failed on some backends: {failed}", "upstream_error",
                            {"backends": answer["backends"]})
        return answer

    async def _prompt_token_ids(self, ctx: RequestContext, chat_params: dict) -> list[int]:
        """Prompt ids from vLLM's /tokenize on the same server (the session is pinned to it)."""
        request = {"model": self.model, "messages": chat_params["messages"], "add_generation_prompt": True}
        for key in ("tools", "chat_template_kwargs"):
            if key in chat_params:
                request[key] = chat_params[key]
        tokenized = await self.upstream.call(ctx, "/tokenize", request, at_root=True, check=_check_tokenized)
        return tokenized["tokens"]


def _check_tokenized(answer: Any) -> str | None:
    if not isinstance(answer, dict) or not isinstance(answer.get("tokens"), list):
        return "without a 'tokens' list"
    return None
