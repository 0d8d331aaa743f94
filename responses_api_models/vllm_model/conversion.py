"""Pure conversions between the OpenAI Responses API and vLLM's Chat Completions API.

Plain dicts in, plain dicts out: no I/O, no pydantic, no mutation of the arguments.
These run on every model call, so they stay simple loops over the items.

Request:  ``responses_to_chat(params, model=...)`` -> Chat Completions create params.
Response: ``chat_to_response(chat, params, model=...)`` -> an OpenAI ``Response`` dict
(``chat_to_response_output`` gives just its ``output`` items).
Context overflow: ``is_context_length_error`` + ``incomplete_response`` end an episode
cleanly instead of failing it.

Semantics follow NeMo Gym's vllm_model adapter. Whitespace is never stripped, so a
Response's output fed back as the next request's input rebuilds the assistant message
vLLM sent (``<think>`` blocks come back in front of the text).
"""

import json
import time
import uuid
from typing import Any, Callable

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")

# Responses-only fields that Chat Completions lacks; dropped from the request.
_DROPPED = frozenset(
    {
        "store",
        "previous_response_id",
        "metadata",
        "truncation",
        "text",
        "include",
        "reasoning",
        "user",
        "background",
        "service_tier",
        "prompt",
        "conversation",
        "max_tool_calls",
        "prompt_cache_key",
        "safety_identifier",
        # The adapter always wants one JSON ChatCompletion back.
        "stream",
        "stream_options",
    }
)
# Handled explicitly by responses_to_chat.
_HANDLED = frozenset(
    {"input", "instructions", "model", "max_output_tokens", "tools", "tool_choice", "parallel_tool_calls"}
)
_CONTEXT_LENGTH_MARKERS = (
    "maximum context length",
    "context length",
    "reduce the length",
    "too long",
    "exceeds the model's max",
    "maximum model length",
)
_ASSISTANT_ITEM_TYPES = frozenset({"reasoning", "function_call"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------
# Responses create params -> Chat Completions create params
# ---------------------------------------------------------------------------


def responses_to_chat(
    params: dict,
    *,
    model: str,
    replace_developer_role_with_system: bool = False,
    uses_reasoning_parser: bool = True,
    return_token_id_information: bool = False,
    chat_template_kwargs: dict | None = None,
    extra_body: dict | None = None,
) -> dict:
    """Convert Responses create params to Chat Completions create params for vLLM.

    Unknown top-level keys (vLLM sampling extras such as ``top_k``, ``min_p``) pass through;
    keys whose value is None are treated as unset. Raises ValueError on input it cannot map.
    ``uses_reasoning_parser`` is accepted for symmetry with the response side: reasoning items
    go back as ``<think>`` blocks either way (the only form that rebuilds the content vLLM sent).
    """
    messages: list[dict] = []
    instructions = params.get("instructions")
    if isinstance(instructions, str):
        if instructions:
            messages.append({"role": "system", "content": instructions})
    elif instructions:  # the Responses API also allows a list of input items here
        _convert_input(instructions, messages, replace_developer_role_with_system, return_token_id_information)
    _convert_input(params.get("input"), messages, replace_developer_role_with_system, return_token_id_information)

    chat: dict[str, Any] = {"model": model, "messages": messages}
    for key, value in params.items():
        if value is None or key in _DROPPED or key in _HANDLED:
            continue
        chat[key] = value
    if "top_logprobs" in chat and "logprobs" not in chat:
        chat["logprobs"] = True

    max_output_tokens = params.get("max_output_tokens")
    if max_output_tokens is not None:
        chat["max_tokens"] = max_output_tokens

    tools = params.get("tools")
    tool_choice = params.get("tool_choice")
    if tools:
        chat["tools"] = [_convert_tool(tool) for tool in tools]
        if tool_choice is not None:
            chat["tool_choice"] = _convert_tool_choice(tool_choice)
        if params.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = params["parallel_tool_calls"]
    elif tool_choice not in (None, "auto", "none"):
        raise ValueError(f"tool_choice={tool_choice!r} needs at least one tool")
    # else: no tools -> no tool_choice either (vLLM rejects tool_choice without tools).

    if return_token_id_information:
        chat["logprobs"] = True
        chat["return_tokens_as_token_ids"] = True  # vLLM flag: logprob tokens read "token_id:<int>"
    if chat_template_kwargs:
        chat["chat_template_kwargs"] = dict(chat_template_kwargs)
    if extra_body:
        for key, value in extra_body.items():
            chat.setdefault(key, value)  # what the request set wins over config defaults
    return chat


class _AssistantTurn:
    """Consecutive assistant output items, merged into one chat message."""

    __slots__ = ("active", "content", "tool_calls", "tokens")

    def __init__(self) -> None:
        self.active = False
        self.content: list[str] = []
        self.tool_calls: list[dict] = []
        self.tokens: dict | None = None

    def flush(self, messages: list[dict]) -> None:
        if not self.active:
            return
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tokens:
            message.update(self.tokens)
        messages.append(message)
        self.active = False
        self.content = []
        self.tool_calls = []
        self.tokens = None


def _convert_input(
    items: Any, messages: list[dict], replace_developer: bool, return_token_id_information: bool
) -> None:
    if items is None:
        return
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return

    turn = _AssistantTurn()
    for item in items:
        item_type = item.get("type")
        role = item.get("role")
        if item_type in _ASSISTANT_ITEM_TYPES or (role == "assistant" and item_type in (None, "message")):
            turn.active = True
            if item_type == "function_call":
                turn.tool_calls.append(
                    {
                        "id": item["call_id"],
                        "type": "function",
                        "function": {"name": item["name"], "arguments": item["arguments"]},
                    }
                )
            elif item_type == "reasoning":
                # Each summary (or reasoning_text) entry goes back as its own <think> block,
                # in front of the text that follows it: that is the content vLLM produced.
                for text in _reasoning_texts(item):
                    turn.content.append(f"{THINK_OPEN}{text}{THINK_CLOSE}")
            else:
                turn.content.append(_assistant_text(item.get("content")))
            # NeMo Gym puts prompt/generation token ids and logprobs on the last output item
            # of a turn. Send them back on the merged assistant message under the same keys:
            # NeMo Gym's vLLM-side patches read them to keep the token history exact.
            if return_token_id_information:
                for key in TOKEN_FIELDS:
                    if item.get(key) is not None:
                        if turn.tokens is None:
                            turn.tokens = {}
                        turn.tokens[key] = item[key]
            continue

        turn.flush(messages)
        if item_type == "function_call_output":
            output = _tool_output(item.get("output"))
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif role is not None and item_type in (None, "message"):
            if role == "developer" and replace_developer:
                role = "system"
            elif role not in ("user", "system", "developer"):
                raise ValueError(f"unsupported message role: {role!r}")
            messages.append({"role": role, "content": _input_content(item.get("content"))})
        else:
            raise ValueError(f"unsupported input item type: {item_type!r}")
    turn.flush(messages)


def _reasoning_texts(item: dict) -> list[str]:
    texts = [part.get("text", "") for part in item.get("summary") or ()]
    if not texts:  # vLLM's own Responses output keeps reasoning in content[reasoning_text]
        texts = [part.get("text", "") for part in item.get("content") or () if part.get("type") == "reasoning_text"]
    return texts


def _joined_text(content: Any, fields: tuple[str, ...] = ("text",)) -> str:
    """None -> "", a string as it is, a list of parts -> each part's first non-empty `fields` value, joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(next((part[f] for f in fields if part.get(f)), "") for part in content)


def _assistant_text(content: Any) -> str:
    return _joined_text(content, ("text", "refusal"))


def _input_content(content: Any) -> Any:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        part_type = part.get("type")
        if part_type in ("input_text", "output_text"):
            parts.append({"type": "text", "text": part["text"]})
        elif part_type == "input_image":
            image_url = {"url": part.get("image_url")}
            if part.get("detail") is not None:
                image_url["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image_url})
        else:
            parts.append(part)  # already a chat part (text, image_url, input_audio...): vLLM validates it
    return parts


def _tool_output(output: Any) -> str:
    return _joined_text(output) if output is None or isinstance(output, (str, list)) else json.dumps(output)


def _convert_tool(tool: dict) -> dict:
    if "function" in tool:  # already Chat Completions shaped
        return tool
    if tool.get("type") != "function":
        raise ValueError(f"unsupported tool type: {tool.get('type')!r} (only function tools)")
    function = {}
    for key in ("name", "description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _convert_tool_choice(tool_choice: Any) -> Any:
    if isinstance(tool_choice, str):
        return tool_choice
    if tool_choice.get("type") == "function":
        if "function" in tool_choice:
            return tool_choice
        return {"type": "function", "function": {"name": tool_choice["name"]}}
    raise ValueError(f"unsupported tool_choice: {tool_choice!r}")


# ---------------------------------------------------------------------------
# ChatCompletion -> Response
# ---------------------------------------------------------------------------


def split_think(content: str) -> tuple[list[str], str]:
    """Every ``<think>...</think>`` block in order, and the content without them.

    An unterminated ``<think>`` (generation cut off) makes the rest of the content reasoning.
    Nothing is stripped.
    """
    start = content.find(THINK_OPEN)
    if start < 0:
        return [], content
    blocks: list[str] = []
    rest: list[str] = []
    pos = 0
    while start >= 0:
        rest.append(content[pos:start])
        end = content.find(THINK_CLOSE, start + len(THINK_OPEN))
        if end < 0:
            blocks.append(content[start + len(THINK_OPEN) :])
            pos = len(content)
            break
        blocks.append(content[start + len(THINK_OPEN) : end])
        pos = end + len(THINK_CLOSE)
        start = content.find(THINK_OPEN, pos)
    rest.append(content[pos:])
    return blocks, "".join(rest)


def chat_to_response_output(
    chat: dict,
    *,
    uses_reasoning_parser: bool = True,
    return_token_id_information: bool = False,
    prompt_token_ids: list[int] | None = None,
    id_factory: Callable[[str], str] = new_id,
) -> list[dict]:
    """Output items of the first choice: [reasoning], [message], function_call*.

    The message is there when the turn has text, or when it would otherwise be empty.

    With ``uses_reasoning_parser`` false the content is kept verbatim (no ``<think>`` parsing,
    as NeMo Gym does); vLLM's ``reasoning`` / ``reasoning_content`` field is used either way.
    """
    choices = chat.get("choices") or ()
    choice = choices[0] if choices else {}
    message = choice.get("message") or {}
    content = message.get("content") or ""

    reasoning: list[str] = []
    field = message.get("reasoning") or message.get("reasoning_content")
    if field:
        reasoning.append(field)
    if uses_reasoning_parser:
        blocks, content = split_think(content)
        reasoning.extend(blocks)

    output: list[dict] = []
    if reasoning:
        output.append(
            {
                "type": "reasoning",
                "id": id_factory("rs"),
                "summary": [{"type": "summary_text", "text": text} for text in reasoning],
                "status": "completed",
            }
        )
    tool_calls = message.get("tool_calls") or ()
    # NeMo Gym's rule: a message only when there is text, or when nothing else would be emitted
    # (a turn that is only tool calls is [reasoning] function_call..., no empty message first).
    if content or not (reasoning or tool_calls):
        output.append(
            {
                "type": "message",
                "id": id_factory("msg"),
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": content, "annotations": []}],
            }
        )
    for tool_call in tool_calls:
        function = tool_call.get("function") or {}
        arguments = function.get("arguments")
        if arguments is None:
            arguments = ""
        elif not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        output.append(
            {
                "type": "function_call",
                "id": id_factory("fc"),
                "call_id": tool_call.get("id") or id_factory("call"),
                "name": function.get("name", ""),
                "arguments": arguments,
                "status": "completed",
            }
        )

    if return_token_id_information:
        generation_token_ids, generation_log_probs = _generation_tokens(choice)
        if prompt_token_ids is None:
            prompt_token_ids = chat.get("prompt_token_ids") or choice.get("prompt_token_ids") or []
        last = output[-1]
        last["prompt_token_ids"] = prompt_token_ids
        last["generation_token_ids"] = generation_token_ids
        last["generation_log_probs"] = generation_log_probs
    return output


def _generation_tokens(choice: dict) -> tuple[list[int], list[float]]:
    logprobs = (choice.get("logprobs") or {}).get("content") or ()
    token_ids: list[int] = []
    log_probs: list[float] = []
    for entry in logprobs:
        token = entry["token"]
        if not token.startswith("token_id:"):
            raise ValueError(f"logprob token {token!r} is not 'token_id:<int>'; was return_tokens_as_token_ids sent?")
        token_ids.append(int(token[9:]))
        log_probs.append(float(entry["logprob"]))
    if not logprobs and choice.get("token_ids"):  # vLLM's return_token_ids, without logprobs
        token_ids = list(choice["token_ids"])
    return token_ids, log_probs


def chat_to_response(
    chat: dict,
    request_params: dict,
    *,
    model: str,
    uses_reasoning_parser: bool = True,
    return_token_id_information: bool = False,
    prompt_token_ids: list[int] | None = None,
    id_factory: Callable[[str], str] = new_id,
) -> dict:
    """The whole OpenAI Response for a ChatCompletion answering ``request_params``."""
    output = chat_to_response_output(
        chat,
        uses_reasoning_parser=uses_reasoning_parser,
        return_token_id_information=return_token_id_information,
        prompt_token_ids=prompt_token_ids,
        id_factory=id_factory,
    )
    choices = chat.get("choices") or ()
    finish_reason = choices[0].get("finish_reason") if choices else None
    incomplete = None
    if finish_reason == "length":
        incomplete = {"reason": "max_output_tokens"}
    elif finish_reason == "content_filter":
        incomplete = {"reason": "content_filter"}

    usage = chat.get("usage") or {}
    input_tokens = usage.get("prompt_tokens") or 0
    output_tokens = usage.get("completion_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning_tokens = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    response = _response_shell(request_params, model, id_factory, chat.get("created"))
    response["status"] = "incomplete" if incomplete else "completed"
    response["incomplete_details"] = incomplete
    response["output"] = output
    response["usage"] = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": usage.get("total_tokens") or input_tokens + output_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }
    return response


def incomplete_response(
    request_params: dict,
    *,
    model: str,
    reason: str,
    message: str,
    id_factory: Callable[[str], str] = new_id,
) -> dict:
    """An ``incomplete`` Response with one empty assistant message (e.g. prompt too long).

    ``reason`` must be one the Responses API knows (``max_output_tokens``, ``content_filter``...)
    for SDK validation; ``message`` rides along as ``incomplete_details.message``.
    """
    response = _response_shell(request_params, model, id_factory, None)
    response["status"] = "incomplete"
    response["incomplete_details"] = {"reason": reason, "message": message}
    response["output"] = [
        {
            "type": "message",
            "id": id_factory("msg"),
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "", "annotations": []}],
        }
    ]
    response["usage"] = {
        "input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    return response


def _response_shell(request_params: dict, model: str, id_factory: Callable[[str], str], created: Any) -> dict:
    tool_choice = request_params.get("tool_choice")
    parallel_tool_calls = request_params.get("parallel_tool_calls")
    return {
        "id": id_factory("resp"),
        "object": "response",
        "created_at": created or time.time(),
        "model": model,
        "status": "completed",
        "incomplete_details": None,
        "output": [],
        "usage": None,
        "error": None,
        "instructions": request_params.get("instructions"),
        "metadata": request_params.get("metadata") or {},
        "tools": request_params.get("tools") or [],
        "tool_choice": "auto" if tool_choice is None else tool_choice,
        "parallel_tool_calls": True if parallel_tool_calls is None else parallel_tool_calls,
        "temperature": request_params.get("temperature"),
        "top_p": request_params.get("top_p"),
        "max_output_tokens": request_params.get("max_output_tokens"),
    }


def is_context_length_error(status: int, body_text: str) -> bool:
    """True for vLLM's 400 answer to a prompt (plus max_tokens) that exceeds the context."""
    if status != 400 or not body_text:
        return False
    text = body_text.lower()
    return any(marker in text for marker in _CONTEXT_LENGTH_MARKERS)
