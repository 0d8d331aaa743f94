"""Responses API <-> vLLM Chat Completions conversion (responses_api_models/vllm_model/conversion.py)."""

import copy
import itertools

import pytest
from openai.types.responses import Response

from responses_api_models.vllm_model.conversion import (
    chat_to_response,
    chat_to_response_output,
    incomplete_response,
    is_context_length_error,
    responses_to_chat,
    split_think,
)

MODEL = "Qwen/Qwen3-8B"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


def tool_call(call_id: str, arguments: str, name: str = "get_weather") -> dict:
    """A Chat Completions tool call."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def counting_ids():
    counter = itertools.count()
    return lambda prefix: f"{prefix}_{next(counter)}"


def chat_completion(message: dict, finish_reason: str = "stop", **extra) -> dict:
    """A vLLM ChatCompletion body answering with `message`."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason, **extra}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }


def validate(response: dict) -> Response:
    return Response.model_validate(response)


# ----------------------------------------------------------------------------- request


def test_str_input_becomes_one_user_message_and_model_is_forced():
    chat = responses_to_chat({"input": "hi", "model": "whatever-the-caller-said"}, model=MODEL)
    assert chat == {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def test_message_parts_convert_to_chat_parts():
    params = {
        "input": [
            {"role": "system", "content": [{"type": "input_text", "text": "be brief"}]},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                ],
            },
            {"role": "user", "content": "plain string stays"},
        ]
    }
    assert responses_to_chat(params, model=MODEL)["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {"role": "user", "content": "plain string stays"},
    ]


def test_assistant_message_parts_become_a_plain_string():
    params = {
        "input": [
            {"role": "user", "content": "hi"},
            {
                "type": "message",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": "Hello", "annotations": []},
                    {"type": "output_text", "text": " there", "annotations": []},
                ],
            },
        ]
    }
    assert responses_to_chat(params, model=MODEL)["messages"][1] == {"role": "assistant", "content": "Hello there"}


def test_developer_role_kept_or_replaced():
    params = {"input": [{"role": "developer", "content": "rules"}, {"role": "user", "content": "go"}]}
    assert responses_to_chat(params, model=MODEL)["messages"][0] == {"role": "developer", "content": "rules"}
    replaced = responses_to_chat(params, model=MODEL, replace_developer_role_with_system=True)
    assert replaced["messages"][0] == {"role": "system", "content": "rules"}


def test_instructions_become_a_leading_system_message():
    chat = responses_to_chat({"instructions": "You are terse.", "input": "hi"}, model=MODEL)
    assert chat["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]


def test_consecutive_assistant_items_merge_into_one_message_and_flush_at_tool_output():
    params = {
        "input": [
            {"role": "user", "content": "weather in Paris and Rome?"},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "two cities"}]},
            {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "get_weather",
             "arguments": '{"city": "Paris"}', "status": "completed"},
            {"type": "function_call", "id": "fc_2", "call_id": "call_b", "name": "get_weather",
             "arguments": '{"city": "Rome"}', "status": "completed"},
            {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_b",
             "output": [{"type": "input_text", "text": "rain"}, {"type": "input_text", "text": "y"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Done."}]},
        ]
    }
    messages = responses_to_chat(params, model=MODEL)["messages"]
    assert messages == [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "<think>two cities</think>Checking.",
            "tool_calls": [
                tool_call("call_a", '{"city": "Paris"}'),
                tool_call("call_b", '{"city": "Rome"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "rainy"},
        {"role": "assistant", "content": "Done."},
    ]


def test_tool_calls_without_text_have_empty_string_content():
    params = {
        "input": [
            {"role": "user", "content": "go"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        ]
    }
    assert responses_to_chat(params, model=MODEL)["messages"][1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }


def test_reasoning_text_content_is_used_when_there_is_no_summary():
    params = {
        "input": [
            {"role": "user", "content": "q"},
            {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "raw thoughts"}]},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert responses_to_chat(params, model=MODEL)["messages"][1] == {
        "role": "assistant",
        "content": "<think>raw thoughts</think>a",
    }


def test_sampling_params_tools_and_tool_choice():
    params = {
        "input": "hi",
        "max_output_tokens": 256,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 3,
        "stop": ["</answer>"],
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
        "top_k": 20,
        "tools": [WEATHER_TOOL, {"type": "function", "name": "noop", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False,
        # Responses-only fields: dropped.
        "store": True,
        "previous_response_id": "resp_0",
        "metadata": {"k": "v"},
        "truncation": "disabled",
        "text": {"format": {"type": "text"}},
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"effort": "low"},
        "user": "u",
        "background": False,
        "service_tier": "auto",
        "stream": True,
    }
    chat = responses_to_chat(params, model=MODEL)
    assert chat == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 256,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 3,
        "stop": ["</answer>"],
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
        "top_k": 20,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": WEATHER_TOOL["parameters"],
                    "strict": True,
                },
            },
            {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    }


@pytest.mark.parametrize("choice", ["auto", "none", "required"])
def test_string_tool_choice_passes_through(choice):
    chat = responses_to_chat({"input": "hi", "tools": [WEATHER_TOOL], "tool_choice": choice}, model=MODEL)
    assert chat["tool_choice"] == choice


def test_no_tools_means_no_tool_choice_upstream():
    params = {"input": "hi", "tools": [], "tool_choice": "auto", "parallel_tool_calls": True}
    chat = responses_to_chat(params, model=MODEL)
    assert "tools" not in chat and "tool_choice" not in chat and "parallel_tool_calls" not in chat
    with pytest.raises(ValueError):
        responses_to_chat({"input": "hi", "tool_choice": "required"}, model=MODEL)


def test_chat_template_kwargs_and_extra_body():
    kwargs = {"enable_thinking": False}
    chat = responses_to_chat(
        {"input": "hi", "temperature": 1.0},
        model=MODEL,
        chat_template_kwargs=kwargs,
        extra_body={"top_k": 5, "temperature": 0.0, "repetition_penalty": 1.1},
    )
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}
    assert chat["chat_template_kwargs"] is not kwargs
    assert chat["top_k"] == 5 and chat["repetition_penalty"] == 1.1
    assert chat["temperature"] == 1.0  # the request wins over config extras


def test_request_params_are_not_mutated():
    params = {
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "q"}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "prompt_token_ids": [1]},
        ],
        "tools": [WEATHER_TOOL],
    }
    before = copy.deepcopy(params)
    responses_to_chat(params, model=MODEL, return_token_id_information=True, replace_developer_role_with_system=True)
    assert params == before


def test_unsupported_item_type_raises():
    with pytest.raises(ValueError):
        responses_to_chat({"input": [{"type": "web_search_call", "id": "x"}]}, model=MODEL)


# ----------------------------------------------------------------------------- response


def test_plain_answer_gives_one_message_item():
    output = chat_to_response_output(chat_completion({"content": "Paris."}), id_factory=counting_ids())
    assert output == [
        {
            "type": "message",
            "id": "msg_0",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Paris.", "annotations": []}],
        }
    ]


def test_reasoning_from_two_think_blocks():
    content = "<think>first</think>mid <think>second</think> end"
    output = chat_to_response_output(chat_completion({"content": content}), id_factory=counting_ids())
    assert output[0] == {
        "type": "reasoning",
        "id": "rs_0",
        "summary": [{"type": "summary_text", "text": "first"}, {"type": "summary_text", "text": "second"}],
        "status": "completed",
    }
    assert output[1]["content"][0]["text"] == "mid  end"
    assert len(output) == 2


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_from_vllm_field_comes_first(field):
    message = {"content": "<think>inline</think>answer", field: "parsed"}
    output = chat_to_response_output(chat_completion(message))
    assert [s["text"] for s in output[0]["summary"]] == ["parsed", "inline"]
    assert output[0]["id"].startswith("rs_") and output[1]["id"].startswith("msg_")
    assert output[1]["content"][0]["text"] == "answer"


def test_unterminated_think_is_all_reasoning():
    output = chat_to_response_output(chat_completion({"content": "<think>still thinking when cut"}, "length"))
    assert output[0]["summary"] == [{"type": "summary_text", "text": "still thinking when cut"}]
    assert len(output) == 1  # no text: no empty message after the reasoning
    assert split_think("a<think>b</think>c<think>d") == (["b", "d"], "ac")


def test_without_reasoning_parser_content_is_kept_verbatim():
    content = "<think>x</think>answer"
    output = chat_to_response_output(chat_completion({"content": content}), uses_reasoning_parser=False)
    assert len(output) == 1 and output[0]["content"][0]["text"] == content
    output = chat_to_response_output(chat_completion({"content": "a", "reasoning": "r"}), uses_reasoning_parser=False)
    assert output[0]["summary"] == [{"type": "summary_text", "text": "r"}]


@pytest.mark.parametrize("message", [{"content": None}, {"content": ""}, {}])
def test_empty_content_still_yields_a_message_item(message):
    output = chat_to_response_output(chat_completion(message))
    assert [item["type"] for item in output] == ["message"]
    assert output[0]["content"] == [{"type": "output_text", "text": "", "annotations": []}]


def test_tool_calls_become_function_call_items():
    message = {
        "content": None,
        "tool_calls": [
            tool_call("chatcmpl-tool-1", '{"city":"Paris"}'),
            tool_call("chatcmpl-tool-2", '{"city":"Rome"}'),
        ],
    }
    output = chat_to_response_output(chat_completion(message, "tool_calls"), id_factory=counting_ids())
    assert output == [  # no text: no message item before the calls
        {"type": "function_call", "id": "fc_0", "call_id": "chatcmpl-tool-1", "name": "get_weather",
         "arguments": '{"city":"Paris"}', "status": "completed"},
        {"type": "function_call", "id": "fc_1", "call_id": "chatcmpl-tool-2", "name": "get_weather",
         "arguments": '{"city":"Rome"}', "status": "completed"},
    ]


def test_whitespace_survives_both_directions_byte_for_byte():
    text = "  leading and trailing \n\n"
    output = chat_to_response_output(chat_completion({"content": text}))
    assert output[0]["content"][0]["text"] == text
    messages = responses_to_chat({"input": [{"role": "user", "content": "q"}, *output]}, model=MODEL)["messages"]
    assert messages[-1] == {"role": "assistant", "content": text}

    thought = "\n  mull it over \n"
    content = f"<think>{thought}</think>\n\n{text}"
    output = chat_to_response_output(chat_completion({"content": content}))
    assert output[0]["summary"][0]["text"] == thought
    assert output[1]["content"][0]["text"] == f"\n\n{text}"
    messages = responses_to_chat({"input": [{"role": "user", "content": "q"}, *output]}, model=MODEL)["messages"]
    assert messages[-1] == {"role": "assistant", "content": content}


def test_multi_step_tool_calls_round_trip_to_the_messages_vllm_sent():
    """Each Response's output appended to the next request converts back to vLLM's own message."""
    vllm_turns = [
        {
            "role": "assistant",
            "content": "<think>Need Paris and Rome.</think>\n\nLet me check.",
            "tool_calls": [
                tool_call("chatcmpl-tool-a", '{"city": "Paris"}'),
                tool_call("chatcmpl-tool-b", '{"city": "Rome"}'),
            ],
        },
        {
            "role": "assistant",
            "content": "<think>One more.</think>",
            "tool_calls": [
                tool_call("chatcmpl-tool-c", '{"city": "Oslo"}'),
            ],
        },
        {"role": "assistant", "content": "<think>Summarise.</think>Sunny, rainy, snowy."},
    ]
    tool_results = {"chatcmpl-tool-a": "sunny", "chatcmpl-tool-b": "rainy", "chatcmpl-tool-c": "snowy"}

    request = {"input": [{"role": "user", "content": "Weather in Paris, Rome, Oslo?"}], "tools": [WEATHER_TOOL]}
    expected_messages = [{"role": "user", "content": "Weather in Paris, Rome, Oslo?"}]
    for vllm_message in vllm_turns:
        chat = responses_to_chat(request, model=MODEL)
        assert chat["messages"] == expected_messages

        response = chat_to_response(chat_completion(vllm_message), request, model=MODEL)
        validate(response)
        calls = [item for item in response["output"] if item["type"] == "function_call"]
        outputs = [
            {"type": "function_call_output", "call_id": call["call_id"], "output": tool_results[call["call_id"]]}
            for call in calls
        ]
        request = {**request, "input": request["input"] + response["output"] + outputs}

        expected_messages = expected_messages + [vllm_message] + [
            {"role": "tool", "tool_call_id": o["call_id"], "content": o["output"]} for o in outputs
        ]
    assert responses_to_chat(request, model=MODEL)["messages"] == expected_messages


def test_token_ids_extracted_onto_the_last_item_and_sent_back():
    logprobs = {
        "content": [
            {"token": "token_id:101", "logprob": -0.5, "bytes": None, "top_logprobs": []},
            {"token": "token_id:7", "logprob": 0.0, "bytes": None, "top_logprobs": []},
        ]
    }
    message = {
        "content": "ok",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    output = chat_to_response_output(
        chat_completion(message, "tool_calls", logprobs=logprobs),
        return_token_id_information=True,
        prompt_token_ids=[1, 2, 3],
    )
    assert [item["type"] for item in output] == ["message", "function_call"]
    assert "generation_token_ids" not in output[0]
    assert output[-1]["prompt_token_ids"] == [1, 2, 3]
    assert output[-1]["generation_token_ids"] == [101, 7]
    assert output[-1]["generation_log_probs"] == [-0.5, 0.0]

    params = {
        "input": [
            {"role": "user", "content": "go"},
            *output,
            {"type": "function_call_output", "call_id": "call_1", "output": "done"},
        ]
    }
    chat = responses_to_chat(params, model=MODEL, return_token_id_information=True)
    assert chat["logprobs"] is True and chat["return_tokens_as_token_ids"] is True
    assert chat["messages"][1] == {
        "role": "assistant",
        "content": "ok",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        "prompt_token_ids": [1, 2, 3],
        "generation_token_ids": [101, 7],
        "generation_log_probs": [-0.5, 0.0],
    }
    # Without the flag the ids stay on our side.
    plain = responses_to_chat(params, model=MODEL)
    assert "prompt_token_ids" not in plain["messages"][1] and "logprobs" not in plain


def test_token_ids_need_return_tokens_as_token_ids():
    logprobs = {"content": [{"token": "hello", "logprob": -1.0}]}
    with pytest.raises(ValueError):
        chat = chat_completion({"content": "hello"}, logprobs=logprobs)
        chat_to_response_output(chat, return_token_id_information=True)


def test_full_response_parses_with_the_openai_sdk():
    request = {
        "input": "Weather in Paris?",
        "instructions": "Be terse.",
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
        "temperature": 0.6,
        "top_p": 0.95,
        "max_output_tokens": 1024,
        "metadata": {"task": "7"},
    }
    message = {
        "content": "<think>call it</think>",
        "tool_calls": [tool_call("call_9", '{"city": "Paris"}')],
    }
    chat = chat_completion(message, "tool_calls")
    chat["usage"]["prompt_tokens_details"] = {"cached_tokens": 8}
    response = chat_to_response(chat, request, model=MODEL)
    parsed = validate(response)
    assert response["id"].startswith("resp_") and response["object"] == "response"
    assert response["created_at"] == 1700000000 and response["model"] == MODEL
    assert parsed.status == "completed" and parsed.incomplete_details is None and parsed.error is None
    assert [item.type for item in parsed.output] == ["reasoning", "function_call"]  # no empty message
    assert parsed.output[1].call_id == "call_9"
    assert parsed.usage.input_tokens == 12 and parsed.usage.output_tokens == 5 and parsed.usage.total_tokens == 17
    assert parsed.usage.input_tokens_details.cached_tokens == 8
    assert parsed.usage.output_tokens_details.reasoning_tokens == 0
    assert parsed.instructions == "Be terse." and parsed.metadata == {"task": "7"}
    assert parsed.tools[0].name == "get_weather" and parsed.tool_choice == "auto"
    assert (parsed.temperature, parsed.top_p, parsed.max_output_tokens) == (0.6, 0.95, 1024)


def test_response_defaults_for_a_bare_request():
    chat = chat_completion({"content": "hi"})
    del chat["usage"], chat["created"]
    response = chat_to_response(chat, {"input": "hi"}, model=MODEL)
    parsed = validate(response)
    assert response["tools"] == [] and response["tool_choice"] == "auto" and response["parallel_tool_calls"] is True
    assert response["instructions"] is None and response["metadata"] == {}
    assert parsed.usage.total_tokens == 0 and response["created_at"] > 0


def test_token_id_fields_on_items_still_parse_with_the_sdk():
    logprobs = {"content": [{"token": "token_id:5", "logprob": -0.1}]}
    response = chat_to_response(
        chat_completion({"content": "x"}, logprobs=logprobs),
        {"input": "q"},
        model=MODEL,
        return_token_id_information=True,
        prompt_token_ids=[9],
    )
    validate(response)
    assert response["output"][-1]["generation_token_ids"] == [5]


def test_finish_reason_length_is_incomplete():
    response = chat_to_response(chat_completion({"content": "<think>cut"}, "length"), {"input": "q"}, model=MODEL)
    parsed = validate(response)
    assert parsed.status == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [item["type"] for item in response["output"]] == ["reasoning"]


def test_incomplete_response_for_context_overflow():
    request = {"input": "very long", "tools": [WEATHER_TOOL], "max_output_tokens": 10}
    response = incomplete_response(request, model=MODEL, reason="max_output_tokens", message="prompt too long")
    parsed = validate(response)
    assert parsed.status == "incomplete" and parsed.incomplete_details.reason == "max_output_tokens"
    assert response["incomplete_details"]["message"] == "prompt too long"
    assert len(response["output"]) == 1
    assert response["output"][0]["role"] == "assistant"
    assert response["output"][0]["content"] == [{"type": "output_text", "text": "", "annotations": []}]


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (400, "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens. "
              "Please reduce the length of the messages or completion.", True),
        (400, '{"error": {"message": "The prompt (total length 9000) is too long to fit into the model"}}', True),
        (400, "Input length 9000 exceeds the model's max length", True),
        (400, "The decoder prompt (length 5000) is longer than the maximum model length of 4096.", True),
        (400, "tool_choice requires tools", False),
        (500, "maximum context length exceeded", False),
        (400, "", False),
    ],
)
def test_is_context_length_error(status, body, expected):
    assert is_context_length_error(status, body) is expected


# NeMo Gym's output rule: a message item only when the turn has text, or when nothing else
# would be emitted; a turn that is only tool calls is [reasoning] function_call...
@pytest.mark.parametrize("message, kinds", [
    ({"content": None, "tool_calls": [tool_call("c1", "{}"), tool_call("c2", "{}")]}, ["function_call", "function_call"]),
    ({"content": "", "tool_calls": [tool_call("c1", "{}")]}, ["function_call"]),
    ({"content": "<think>plan</think>", "tool_calls": [tool_call("c1", "{}")]}, ["reasoning", "function_call"]),
    ({"content": None, "reasoning": "plan", "tool_calls": [tool_call("c1", "{}")]}, ["reasoning", "function_call"]),
    ({"content": "Let me check.", "tool_calls": [tool_call("c1", "{}")]}, ["message", "function_call"]),
    ({"content": "<think>plan</think>Let me check.", "tool_calls": [tool_call("c1", "{}")]}, ["reasoning", "message", "function_call"]),
    ({"content": "<think>only thoughts</think>"}, ["reasoning"]),
    ({"content": ""}, ["message"]),  # nothing else: one empty message, so the output is never empty
    ({"content": None}, ["message"]),
])
def test_a_message_item_only_when_there_is_text_or_nothing_else(message, kinds):
    output = chat_to_response_output(chat_completion(message, "tool_calls" if message.get("tool_calls") else "stop"))
    assert [item["type"] for item in output] == kinds
    assert all(item["content"][0]["text"] for item in output if item["type"] == "message" and len(output) > 1)


def test_token_ids_ride_on_the_last_item_of_a_tool_only_turn():
    logprobs = {"content": [{"token": "token_id:5", "logprob": -0.1, "bytes": None, "top_logprobs": []}]}
    output = chat_to_response_output(chat_completion({"content": None, "tool_calls": [tool_call("c1", "{}")]}, "tool_calls",
                                                     logprobs=logprobs),
                                     return_token_id_information=True, prompt_token_ids=[1, 2])
    assert [item["type"] for item in output] == ["function_call"]
    assert output[0]["generation_token_ids"] == [5] and output[0]["prompt_token_ids"] == [1, 2]
