"""vllm_model: the Responses API over one or many vLLM servers' Chat Completions API.

Each session (one rollout) stays on one vLLM server (prefix cache); new sessions go to the
least loaded healthy server; a dying server's sessions move and their request is retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_gym_cli.serving import HTTPError, RequestContext, UpstreamConfig, UpstreamModel, check_chat_completion, route
from responses_api_models.vllm_model.conversion import (
    chat_to_response,
    incomplete_response,
    is_context_length_error,
    responses_to_chat,
)


@dataclass(kw_only=True)
class VLLMModelConfig(UpstreamConfig):
    """NeMo Gym's vllm_model fields, beside the routing fields of UpstreamConfig."""

    return_token_id_information: bool = False  # prompt/generation token ids and logprobs on every turn (RL training)
    uses_reasoning_parser: bool = True  # vLLM runs a reasoning parser: its reasoning becomes reasoning items
    replace_developer_role_with_system: bool = False  # for chat templates without a developer role
    chat_template_kwargs: dict | None = None  # passed to vLLM's chat template (e.g. enable_thinking)
    extra_body: dict | None = None  # merged into every Chat Completions request


class VLLMModel(UpstreamModel):
    config_type = VLLMModelConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.return_token_id_information = cfg.return_token_id_information
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
            chat = await self.upstream.call(ctx, "/chat/completions", chat_params, check=check_chat_completion)
        except HTTPError as e:
            if is_context_length_error(e.status, e.message):
                # The episode cannot go on, but it ended cleanly: the agent stops and verifies.
                return incomplete_response(body, model=self.model, reason="max_output_tokens", message=e.message)
            raise
        prompt_token_ids = None
        if self.return_token_id_information:
            prompt_token_ids = await self._prompt_token_ids(ctx, chat_params)
        return chat_to_response(
            chat, body, model=self.model, uses_reasoning_parser=self.uses_reasoning_parser,
            return_token_id_information=self.return_token_id_information, prompt_token_ids=prompt_token_ids,
        )

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
