"""The server client sends a call again only when the server cannot have acted on it, or when
the call is safe to repeat: /seed_session and /verify run at most once per call, over HTTP
(a raw-socket server that counts what it read) and in-process (co-located)."""

from __future__ import annotations

import json
import time

import pytest

from nemo_gym_cli.serving import HTTPError, SimpleResourcesServer
from nemo_gym_cli.serving.client import ServerClient
from nemo_gym_cli.serving.errors import ServerCallError
from nemo_gym_cli.testing.harness.rawhttp import RawServer, response

FAST_RETRIES = {"max_retries": 3, "backoff_base_s": 0.001, "backoff_max_s": 0.01}


@pytest.fixture
def env():
    """A raw server that is both the head server (GET /servers) and the environment `env`."""
    behaviour: dict[str, object] = {}

    def answer(method, path, headers, body):
        if path == "/servers":
            return response(200, json.dumps([{"name": "env", "url": server.url}]).encode())
        what = behaviour.get(path, "ok")
        if what == "drop":
            return None  # read the request (it may have run), close without a word
        if what == "slow":
            time.sleep(1.0)
        if what == "500":
            return response(500, b'{"error": {"message": "boom", "type": "server_error"}}')
        if what == "429":
            behaviour[path] = "ok"
            return response(429, b'{"error": {"message": "later"}}')
        return response(200, b"{}")

    server = RawServer(answer)
    server.behaviour = behaviour
    yield server
    server.close()


def executed(server: RawServer, path: str) -> int:
    return sum(1 for _, p, _ in server.requests if p == path)


@pytest.mark.parametrize("path", ["/seed_session", "/verify"])
@pytest.mark.parametrize("failure, error", [
    ("drop", "not re-sent: POST may have run"),
    ("500", "HTTP 500: boom"),
    ("slow", "timed out (not re-sent"),
])
async def test_a_post_runs_at_most_once_per_call(env, path, failure, error):
    client = ServerClient(FAST_RETRIES, head_url=env.url)
    env.behaviour[path] = failure
    with pytest.raises(ServerCallError) as info:
        await client.post("env", path, {"row": 1}, session_id="s1", timeout_s=0.5)
    assert error in str(info.value) and "env" in str(info.value)
    assert executed(env, path) == 1
    await client.close()


async def test_what_cannot_have_run_or_is_safe_to_repeat_is_retried(env):
    client = ServerClient(FAST_RETRIES, head_url=env.url)
    env.behaviour["/verify"] = "429"  # "too many requests": the server says it did not run it
    assert await client.post("env", "/verify", {}) == {}
    assert executed(env, "/verify") == 2

    env.behaviour["/v1/responses"] = "500"  # a model call is inference: safe to repeat
    with pytest.raises(ServerCallError, match="HTTP 500"):
        await client.post("env", "/v1/responses", {}, idempotent=True)
    assert executed(env, "/v1/responses") == 4  # 1 + max_retries

    env.behaviour["/health"] = "drop"
    with pytest.raises(ServerCallError, match=r"after 4 tries"):
        await client.request_json("GET", env.url + "/health", server="env")
    assert executed(env, "/health") >= 4
    await client.close()


class CountingEnv(SimpleResourcesServer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    async def seed_session(self, body, ctx):
        self.calls.append("/seed_session")
        raise HTTPError(503, "seeding failed half way", "server_error")

    async def verify(self, body, ctx):
        self.calls.append("/verify")
        raise RuntimeError("verifier crashed after writing its scratch files")


async def test_co_located_calls_follow_the_same_rule():
    env = CountingEnv("env", {})
    client = ServerClient(FAST_RETRIES, local_servers={"env": env})
    for path, status in (("/seed_session", 503), ("/verify", 500)):
        with pytest.raises(ServerCallError) as info:
            await client.post("env", path, {})
        assert info.value.status == status
    assert env.calls == ["/seed_session", "/verify"]
    # a header that could not be sent over HTTP is not passed on in-process either
    with pytest.raises(ServerCallError) as info:
        await client.post("env", "/verify", {}, headers={"X-Group-ID": "7\r\nX-Session-ID: injected"})
    assert info.value.status == 400 and "CR, LF and NUL" in info.value.message
    assert env.calls == ["/seed_session", "/verify"]
    await client.close()
