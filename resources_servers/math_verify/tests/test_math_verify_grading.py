"""math_verify's /verify over a real socket, grading in real worker processes."""

from __future__ import annotations

import contextlib
import time

import pytest
import pytest_asyncio

from nemo_gym_cli.serving import ServerCallError
from nemo_gym_cli.testing.harness import served
from resources_servers.math_verify.app import MathVerifyResourcesServer

HUGE = r"\boxed{9^{9^{9^{9}}}}"  # a tower of powers: sympy would take ages to compare it

# (expected_answer, the model's last message, reward)
PAIRS = [
    (r"\frac{1}{2}", r"The answer is \boxed{0.5}", 1.0),  # fraction vs decimal
    ("0.5", r"\boxed{\frac{1}{2}}", 1.0),  # decimal vs fraction
    ("0.75", r"$\frac{3}{4}$", 1.0),
    (r"\frac{3}{4}", r"so \boxed{\frac{6}{8}}", 1.0),  # unreduced
    (r"\frac{3}{4}", "The answer is 3/4", 1.0),  # plain text, no box
    ("156", "12 * 13 = 156", 1.0),  # plain
    ("4", "Therefore x = 4", 1.0),
    ("-7", "The final answer is $-7$.", 1.0),
    (r"\sqrt{2}", r"\boxed{\sqrt{2}}", 1.0),
    (r"\pi", r"\boxed{\pi}", 1.0),
    ("x^2+2x+1", r"\boxed{(x+1)^2}", 1.0),  # symbolic equality
    (r"\{1,2\}", r"\boxed{\{2,1\}}", 1.0),  # sets, any order
    ("(1,2)", r"\boxed{(1, 2)}", 1.0),
    ("3", r"first I thought 2, but the final answer is \boxed{3}", 1.0),  # the boxed one counts
    ("156", r"\boxed{157}", 0.0),  # wrong
    ("3", r"\boxed{2}", 0.0),
    (r"\sqrt{2}", r"\boxed{1.414}", 0.0),  # too coarse
    ("1/3", r"\boxed{0.333}", 0.0),
    ("2", "I don't know.", 0.0),  # no answer
    ("2", r"\boxed{}", 0.0),  # empty box
]


def row(expected: str, text: str | None) -> dict:
    output = [] if text is None else [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}]
    return {"responses_create_params": {"input": "q"}, "expected_answer": expected, "response": {"output": output}, "row_id": 7}


async def start(config: dict):
    server = MathVerifyResourcesServer("math_verify", config)
    stack = contextlib.AsyncExitStack()
    url, client = await stack.enter_async_context(served(server))

    async def verify(body: dict) -> dict:
        return await client.request_json("POST", url + "/verify", body, timeout_s=60, retries=0)

    return verify, server, stack.aclose


# One server for the module (its workers take seconds to load sympy); the stuck-worker test has its own.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def math_server():
    # generous: a symbolic comparison takes ~0.5 s alone, much longer on a loaded machine
    verify, server, stop = await start({"workers": 2, "timeout_s": 60})
    yield verify, server
    await stop()


async def test_grades_answer_gold_pairs(math_server):
    verify, _ = math_server
    wrong = []
    for expected, text, reward in PAIRS:
        result = await verify(row(expected, text))
        assert result["row_id"] == 7  # the row goes back with the grade
        if result["reward"] != reward:
            wrong.append((expected, text, result))
    assert not wrong, wrong
    no_answer = await verify(row("2", "I don't know."))
    assert no_answer["extracted_answer"] is None and "no answer" in no_answer["grading_error"]
    boxed = await verify(row("156", r"\boxed{157}"))
    assert boxed["extracted_answer"] == "157" and "grading_error" not in boxed


async def test_grading_problems_are_reward_zero_with_the_reason_never_a_500(math_server):
    verify, _ = math_server
    empty = await verify(row("2", None))
    assert empty["reward"] == 0.0 and "no assistant text" in empty["grading_error"]
    bad_gold = await verify(row(r"\frac{1}{0}", r"\boxed{1}"))
    assert bad_gold["reward"] == 0.0 and bad_gold["grading_error"]
    with pytest.raises(ServerCallError) as e:  # a row without expected_answer is the row's fault: 400
        await verify({"response": {"output": []}})
    assert e.value.status == 400 and "expected_answer" in e.value.message


async def test_a_huge_expression_times_out_and_the_server_keeps_grading():
    verify, server, stop = await start({"workers": 1, "timeout_s": 2})
    try:
        t0 = time.monotonic()
        huge = await verify(row("5", HUGE))
        assert huge["reward"] == 0.0 and ("Timeout" in huge["grading_error"] or "timed out" in huge["grading_error"])
        assert time.monotonic() - t0 < 60  # ended by a timeout, not by finishing the sum
        assert (await verify(row("5", r"\boxed{5}")))["reward"] == 1.0
    finally:
        await stop()


async def test_a_stuck_worker_is_killed_and_replaced():
    # math-verify's own timeout is set far out, so only the pool's hard timeout can end it
    verify, server, stop = await start({"workers": 1, "timeout_s": 1, "inner_timeout_s": 60})
    try:
        stuck_pid = server.pool.all[0].proc.pid
        huge = await verify(row("5", HUGE))
        assert huge["reward"] == 0.0 and "timed out after 1 s" in huge["grading_error"]
        assert (await verify(row("5", r"\boxed{5}")))["reward"] == 1.0  # a fresh worker took over
        assert server.pool.replaced == 1 and server.pool.all[0].proc.pid != stuck_pid
    finally:
        await stop()
