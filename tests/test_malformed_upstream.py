"""vllm_model in a real graph over a raw-socket "vLLM" that answers badly: each bad answer fails
that request with a 502 naming the backend and what was wrong (there is no other backend to
retry on), counts as `malformed` for that backend, and the adapter goes on serving (never a
crash, never a partial success; the last healthy backend is never marked down for it)."""

from __future__ import annotations

import json

import pytest

from nemo_gym_cli.testing.harness import VLLM_MODEL, http_json
from nemo_gym_cli.testing.harness.rawhttp import RawServer, response

GOOD = {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
ANSWERS = {
    "NOTJSON": response(200, b"<html>upstream proxy error</html>"),
    "NOCHOICES": response(200, json.dumps({"id": "c2", "object": "chat.completion"}).encode()),
    "EMPTYCHOICES": response(200, json.dumps({**GOOD, "choices": []}).encode()),
    "TRUNCATEDJSON": response(200, json.dumps(GOOD).encode()[:40]),
    "BADHTTP": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n{}",
}


@pytest.fixture(scope="module")
def bad_vllm():
    def answer(method, path, headers, body):
        if path == "/health":
            return response(200, b"")
        text = body.decode(errors="replace")
        for marker, raw in ANSWERS.items():
            if marker in text:
                return raw
        return response(200, json.dumps(GOOD).encode())

    server = RawServer(answer)
    yield server
    server.close()


@pytest.fixture
def adapter(graph, bad_vllm):
    env = {"policy_base_url": bad_vllm.url + "/v1", "policy_api_key": "EMPTY", "policy_model_name": "m"}
    # +preflight=false: the raw server answers garbage to /models too; the requests are under test
    return graph([VLLM_MODEL], env=env, args=["+preflight=false"]).url("policy_model")


def outcomes(adapter_url: str) -> dict[str, float]:
    _, text = http_json(adapter_url + "/metrics")
    out = {}
    for line in text.splitlines():
        if line.startswith("ng_model_backend_requests_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("marker, problem", [
    ("NOTJSON", "with a body that is not JSON: b'<html>upstream proxy error"),
    ("NOCHOICES", "without 'choices'"),
    ("EMPTYCHOICES", "with an empty or invalid 'choices'"),
    ("TRUNCATEDJSON", "with a body that is not JSON"),
    ("BADHTTP", "malformed HTTP response: Invalid character in Content-Length"),
])
def test_a_bad_answer_fails_the_request_and_counts_against_the_backend(adapter, bad_vllm, marker, problem):
    for route, body in (("/v1/responses", {"input": f"say {marker}"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"say {marker}"}]})):
        status, error = http_json(adapter + route, body)
        assert status == 502, error
        message = error["error"]["message"]
        assert bad_vllm.url in message and problem in message, message
    assert outcomes(adapter) == {"ok": 0.0, "error": 0.0, "unavailable": 0.0, "malformed": 2.0}
    # the adapter is fine and the backend still up: the next good answer goes through
    status, good = http_json(adapter + "/v1/responses", {"input": "say hello"})
    assert status == 200 and good["output"][-1]["content"][0]["text"] == "fine"
    assert http_json(adapter + "/health")[0] == 200
