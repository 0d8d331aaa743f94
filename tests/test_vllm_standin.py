"""The vLLM stand-in, run as a real subprocess and checked over real HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import aiohttp
import openai
import pytest

from nemo_gym_cli.testing.harness import StandIn, metric_sums


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "note": {"type": "string"},
            },
            "required": ["city"],
        },
    },
}
WEATHER_ARGS = {"city": "San Francisco", "days": 1, "metric": True, "note": "value"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = StandIn(tmp_path_factory.mktemp("standin"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def special_server(tmp_path_factory):
    """Small context, reasoning on, and a script of canned replies."""
    workdir = tmp_path_factory.mktemp("standin_special")
    script = workdir / "script.jsonl"
    script.write_text(
        json.dumps({"match": "JUDGE_THIS", "content": "[[A=B]]"})
        + "\n"
        + json.dumps({"match": "FAIL_THIS", "status": 500})
        + "\n"
    )
    s = StandIn(workdir, "--context-length", "200", "--reasoning", "--script", str(script), "--model", "judge")
    yield s
    s.stop()


async def post(url: str, body, headers=None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        async with http.post(url, data=data, headers=headers or {"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json(content_type=None)


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200
            return await resp.text()


def user(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------


async def test_health_and_models(server):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.root}/health") as resp:
            assert resp.status == 200 and await resp.read() == b""
        async with http.get(f"{server.root}/v1/models") as resp:
            models = await resp.json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "standin-model"
    assert models["data"][0]["max_model_len"] == 32768


async def test_chat_text_answer_shape(server):
    question = "Hello there, what is two plus two? Please answer briefly and clearly."
    status, body = await post(f"{server.root}/v1/chat/completions", {"model": "any-name", "messages": user(question)})
    assert status == 200
    assert re.fullmatch(r"chatcmpl-[0-9a-f]+", body["id"])
    assert body["object"] == "chat.completion" and isinstance(body["created"], int)
    assert body["model"] == "any-name"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    assert choice["logprobs"] is None
    msg = choice["message"]
    assert msg["role"] == "assistant"
    assert msg["content"] == "The answer is: " + question[:40]
    assert msg["tool_calls"] == []
    assert msg["reasoning"] is None
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] > 0 and "cached_tokens" in usage["prompt_tokens_details"]


async def test_tool_call_required_even_after_tool_result(server):
    messages = user("Weather please")
    for _ in range(2):  # the second round already has a tool result: still a call
        status, body = await post(
            f"{server.root}/v1/chat/completions",
            {"messages": messages, "tools": [WEATHER_TOOL], "tool_choice": "required"},
        )
        assert status == 200
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == ""
        (call,) = choice["message"]["tool_calls"]
        assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{16}", call["id"])
        assert call["type"] == "function" and call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == WEATHER_ARGS
        messages = messages + [
            choice["message"],
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ]


async def test_tool_call_auto_then_text_via_openai_sdk(server):
    client = openai.AsyncOpenAI(base_url=f"{server.root}/v1", api_key="x", max_retries=0)
    try:
        messages = user("What is the weather in Paris?")
        first = await client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
        call = first.choices[0].message.tool_calls[0]
        assert first.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "get_weather"
        messages += [
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees Celsius in San Francisco today."},
        ]
        second = await client.chat.completions.create(
            model="m", messages=messages, tools=[WEATHER_TOOL], tool_choice="auto"
        )
    finally:
        await client.close()
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "Based on the tool result: " + messages[-1]["content"][:60]
    assert not second.choices[0].message.tool_calls
    # Turn 2 repeats turn 1's prompt, so the simulated prefix cache serves part of it.
    assert second.usage.prompt_tokens_details.cached_tokens > 0


async def test_named_tool_choice_and_none(server):
    other = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
    choice = {"type": "function", "function": {"name": "lookup"}}
    _, body = await post(
        f"{server.root}/v1/chat/completions",
        {"messages": user("x"), "tools": [WEATHER_TOOL, other], "tool_choice": choice},
    )
    call = body["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call == {"name": "lookup", "arguments": '{"q": "value"}'}
    _, body = await post(
        f"{server.root}/v1/chat/completions", {"messages": user("x"), "tools": [WEATHER_TOOL], "tool_choice": "none"}
    )
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_logprobs_use_token_ids(server):
    _, body = await post(
        f"{server.root}/v1/chat/completions",
        {"messages": user("Tell me about logprobs"), "logprobs": True, "top_logprobs": 2},
    )
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"]
    for entry in entries:
        assert re.fullmatch(r"token_id:\d+", entry["token"])
        assert entry["logprob"] < 0 and isinstance(entry["bytes"], list)
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["token"] == entry["token"]


async def test_max_tokens_truncates(server):
    _, body = await post(
        f"{server.root}/v1/chat/completions",
        {"messages": user("one two three four five six"), "max_tokens": 3},
    )
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert choice["message"]["content"] == "The answer is"


async def test_tokenize_matches_chat_prompt(server):
    messages = user("Count my tokens, please: alpha, beta; gamma!")
    _, chat = await post(
        f"{server.root}/v1/chat/completions",
        {"messages": messages, "tools": [WEATHER_TOOL], "return_token_ids": True},
    )
    _, tok = await post(f"{server.root}/tokenize", {"model": "m", "messages": messages, "tools": [WEATHER_TOOL]})
    assert tok["count"] == chat["usage"]["prompt_tokens"] == len(tok["tokens"])
    assert tok["tokens"] == chat["prompt_token_ids"]
    assert tok["max_model_len"] == 32768
    _, plain = await post(f"{server.root}/tokenize", {"model": "m", "prompt": "hello, world"})
    assert plain["count"] == 3


async def test_prefix_cache_hits_on_repeat(server):
    before = metric_sums(await get_text(f"{server.root}/metrics"))
    prompt = f"unique {uuid.uuid4().hex} " + " ".join(f"word{i}" for i in range(100))
    cached = []
    for _ in range(2):
        # No system message: the first block holds the unique text, so the first call misses.
        _, body = await post(f"{server.root}/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]})
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    after = metric_sums(await get_text(f"{server.root}/metrics"))
    assert cached[0] == 0 and cached[1] > 0 and cached[1] % 16 == 0
    assert after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"] >= 2 * 100
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == cached[1]
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == 2
    assert after["standin_requests_total"] >= 2


async def test_bad_requests_get_vllm_error_shape(server):
    for body in (b"{not json", {"model": "m"}):
        status, err = await post(f"{server.root}/v1/chat/completions", body)
        assert status == 400
        assert set(err["error"]) == {"message", "type", "param", "code"}
        assert err["error"]["type"] == "BadRequestError" and err["error"]["code"] == 400


async def test_sessions_and_stats(server):
    a, b = f"sess-{uuid.uuid4().hex}", f"sess-{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.root}/standin/stats") as resp:
            before = await resp.json()
        for sid in (a, a, a, b):
            async with http.post(
                f"{server.root}/v1/chat/completions", json={"messages": user("hi")}, headers={"X-Session-ID": sid}
            ) as resp:
                assert resp.status == 200
        async with http.get(f"{server.root}/standin/sessions") as resp:
            sessions = await resp.json()
        async with http.get(f"{server.root}/standin/stats") as resp:
            after = await resp.json()
    assert sessions[a] == 3 and sessions[b] == 1
    assert after["chat"] - before["chat"] == 4
    assert after["requests"] == after["chat"] + after["responses"]
    assert after["peak_running"] >= 1


async def test_responses_api_via_openai_sdk(server):
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"], "strict": False}
    client = openai.AsyncOpenAI(base_url=f"{server.root}/v1", api_key="x", max_retries=0)
    try:
        first = await client.responses.create(model="m", input="Weather in Paris?", tools=[tool])
        (call,) = first.output
        assert first.status == "completed" and first.id.startswith("resp_")
        assert call.type == "function_call" and call.name == "get_weather"
        assert call.call_id.startswith("call_") and call.id.startswith("fc_")
        assert json.loads(call.arguments) == WEATHER_ARGS
        follow_up = [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Rainy"},
        ]
        second = await client.responses.create(model="m", input=follow_up, tools=[tool])
    finally:
        await client.close()
    assert second.output[0].type == "message"
    assert second.output_text == "Based on the tool result: Rainy"
    assert second.usage.input_tokens > 0 and second.usage.output_tokens > 0
    assert second.usage.input_tokens_details.cached_tokens > 0


async def test_script_and_reasoning(special_server):
    url = f"{special_server.root}/v1/chat/completions"
    status, body = await post(url, {"messages": user("Please JUDGE_THIS pair"), "tools": [WEATHER_TOOL], "tool_choice": "required"})
    assert status == 200
    msg = body["choices"][0]["message"]
    assert msg["content"] == "[[A=B]]" and msg["tool_calls"] == []
    assert msg["reasoning"] and msg["reasoning"] == msg["reasoning_content"]
    assert body["model"] == "judge"

    status, err = await post(url, {"messages": user("now FAIL_THIS one")})
    assert status == 500 and err["error"]["code"] == 500


async def test_context_length_error(special_server):
    status, err = await post(
        f"{special_server.root}/v1/chat/completions",
        {"messages": user("word " * 300), "max_tokens": 10},
    )
    assert status == 400
    assert set(err) == {"error"}
    error = err["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] is None
    match = re.fullmatch(
        r"This model's maximum context length is 200 tokens\. However, you requested (\d+) tokens "
        r"\((\d+) in the messages, 10 in the completion\)\. Please reduce the length of the messages or completion\.",
        error["message"],
    )
    assert match and int(match.group(1)) == int(match.group(2)) + 10 and int(match.group(2)) > 200


async def test_max_num_seqs_queueing(tmp_path):
    standin = StandIn(tmp_path, "--latency-ms", "200", "--max-num-seqs", "2")
    try:
        url = f"{standin.root}/v1/chat/completions"
        start = time.monotonic()
        await post(url, {"messages": user("solo")})
        single = time.monotonic() - start

        async def watch_waiting(done: asyncio.Event) -> float:
            seen = 0.0
            while not done.is_set():
                values = metric_sums(await get_text(f"{standin.root}/metrics"))
                seen = max(seen, values["vllm:num_requests_waiting"])
                await asyncio.sleep(0.02)
            return seen

        done = asyncio.Event()
        watcher = asyncio.create_task(watch_waiting(done))
        start = time.monotonic()
        results = await asyncio.gather(*(post(url, {"messages": user(f"q{i}")}) for i in range(4)))
        elapsed = time.monotonic() - start
        done.set()
        max_waiting = await watcher
        peak_running = standin.stats()["peak_running"]
    finally:
        assert standin.stop() == 0
    assert all(status == 200 for status, _ in results)
    assert single >= 0.2
    # Two waves of two: at least twice the 200 ms latency. No upper bound: a loaded machine only
    # makes it slower, and the stand-in's own counter shows that no more than 2 ever ran at once.
    assert elapsed >= 2 * 0.2 * 0.9, (single, elapsed)
    assert peak_running == 2
    assert max_waiting > 0


def test_sigterm_exits_cleanly(tmp_path):
    standin = StandIn(tmp_path, "--model", "x")
    assert standin.proc.poll() is None
    output_before = standin.output()
    assert re.search(r"^vllm stand-in listening on http://127\.0\.0\.1:\d+$", output_before, re.M)
    assert standin.stop() == 0
