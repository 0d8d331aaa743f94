"""Our side of NeMo Gym's contract, where no NeMo Gym install is needed (so it runs everywhere):
session cookies on every answer, the per-session cookie jar of our server client, where server
folders are looked up and which runtime serves them, NeMo Gym's head route /server_instances and
our agents' /aggregate_metrics when the environment has none. (tests/test_nemo_gym.py runs NeMo
Gym's own servers.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from nemo_gym_cli.config import ConfigError, compose
from nemo_gym_cli.config.specs import NEMO_GYM, OURS
from nemo_gym_cli.serving import cookies
from nemo_gym_cli.serving.client import ServerClient
from nemo_gym_cli.testing.harness import (PROJECT_ROOT, WEATHER, WEATHER_AGENT, Graph, StandIn, VLLM_MODEL, http_json,
                                          load_environment, served, weather_env)
from responses_api_agents.simple_agent.app import mean_metrics

ECHO = PROJECT_ROOT / "tests" / "fixtures" / "graph" / "resources_servers" / "ng_test_echo"
NEMO_APP = "from nemo_gym.base_resources_server import SimpleResourcesServer\n"  # how a NeMo Gym environment begins
# The fields of nemo-gym 0.4.0's ServerInstanceDisplayConfig (nemo_gym/server_utils.py), what its
# `/server_instances` answers per server and its ng_status reads.
NEMO_SERVER_INSTANCE_FIELDS = {"config_path", "dir_path", "entrypoint", "host", "name", "pid", "port", "process_name",
                               "server_type", "start_time", "status", "uptime_seconds", "url"}


# ------------------------------------------------------------------ our session cookie, on every answer
async def test_our_servers_send_their_session_cookie_on_every_answer():
    async with served(load_environment(ECHO)("echo", {})) as (url, _), aiohttp.ClientSession() as http:
        async def call(path: str = "/echo", data: bytes = b"{}", **headers: str) -> tuple[int, list[str]]:
            async with http.post(url + path, data=data, headers=headers) as resp:
                return resp.status, resp.headers.getall("Set-Cookie", [])

        status, minted = await call()
        assert status == 200 and len(minted) == 1 and minted[0].startswith("ng_session_id=")
        # Not minted: the caller's own session (header or cookie) comes back, turn after turn.
        for _ in range(3):
            assert await call(**{"X-Session-ID": "rollout-7"}) == (200, ["ng_session_id=rollout-7; HttpOnly; Path=/"])
            assert await call(Cookie="ng_session_id=abc123") == (200, ["ng_session_id=abc123; HttpOnly; Path=/"])
        # Error answers too (NeMo's agents keep only the last answer's cookies).
        assert await call(data=b"{not json", **{"X-Session-ID": "rollout-7"}) == (400, ["ng_session_id=rollout-7; HttpOnly; Path=/"])
        assert (await call("/boom", **{"X-Session-ID": "rollout-7"}))[1] == ["ng_session_id=rollout-7; HttpOnly; Path=/"]
        # A session id that is no cookie value is never echoed into a header.
        assert await call(**{"X-Session-ID": "a b;c=d"}) == (200, [])


# ------------------------------------------------------------------ our client's cookie jar, per session
class StatefulEnv:
    """Keeps an episode's state in a cookie, as NeMo Gym's servers do (a Starlette session cookie):
    POST /add {n} adds n to the count in its cookie and answers the count and the cookies it got."""

    COOKIE = "StatefulEnv___stateful"

    def __init__(self, extra_cookies: list[str] = ()):
        self.extra_cookies = list(extra_cookies)

    async def add(self, request: web.Request) -> web.Response:
        count = int(request.cookies.get(self.COOKIE, "0")) + int((await request.json())["n"])
        resp = web.json_response({"count": count, "cookies": dict(request.cookies)})
        resp.headers.add("Set-Cookie", f"{self.COOKIE}={count}; path=/; samesite=lax; httponly")
        resp.headers.add("Set-Cookie", "ng_session_id=theirs; Path=/")  # our own session cookie: never kept
        for header in self.extra_cookies:
            resp.headers.add("Set-Cookie", header)
        return resp


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def env_and_client():
    """A stateful environment registered as `env` with a head server, and a server client of ours."""
    envs = [StatefulEnv()]  # a test swaps in another

    async def add(request: web.Request) -> web.Response:
        return await envs[0].add(request)

    async def servers(request: web.Request) -> web.Response:
        return web.json_response([{"name": "env", "replica": 0, "url": env_url, "pid": 1, "state": "ready"}])

    app = web.Application()
    app.router.add_post("/add", add)
    env_runner, env_url = await serve_app(app)
    head = web.Application()
    head.router.add_get("/servers", servers)
    head_runner, head_url = await serve_app(head)
    client = ServerClient({"max_retries": 0}, head_url)
    yield envs, client
    await client.close()
    await env_runner.cleanup()
    await head_runner.cleanup()


async def test_our_client_keeps_the_cookies_a_server_sets_per_session_and_forgets_them_at_release(env_and_client):
    _, client = env_and_client

    async def add(session: str | None, n: int) -> dict:
        return await client.post("env", "/add", {"n": n}, session_id=session)

    assert [(await add("a", 1))["count"], (await add("b", 10))["count"], (await add("a", 2))["count"],
            (await add("b", 20))["count"]] == [1, 10, 3, 30]  # two episodes, interleaved, each its own state
    assert (await add("a", 0))["cookies"] == {StatefulEnv.COOKIE: "3"}  # ng_session_id=theirs was not kept
    assert (await add(None, 5))["count"] == 5 and (await add(None, 5))["count"] == 5  # no session: no jar
    client.forget_sessions(["a"])  # the rollout ended
    assert (await add("a", 1))["count"] == 1 and (await add("b", 0))["count"] == 30


async def test_our_clients_cookie_jar_keeps_only_valid_cookies_within_its_limits(env_and_client):
    envs, client = env_and_client
    many = [f"c{i}=v{i}" for i in range(cookies.MAX_PER_SESSION + 4)]
    envs[0] = StatefulEnv(["bad name=x", "semi=a;b", 'quote=a"b', "nosep", *many])
    await client.post("env", "/add", {"n": 1}, session_id="s")
    sent = (await client.post("env", "/add", {"n": 1}, session_id="s"))["cookies"]
    assert sent[StatefulEnv.COOKIE] == "1" and len(sent) == cookies.MAX_PER_SESSION  # the first 16 valid ones
    assert not {"bad name", "bad", "quote", "nosep"} & set(sent) and sent.get("semi") == "a"  # "; b" is an attribute
    assert [k for k in sent if k.startswith("c")] == [f"c{i}" for i in range(cookies.MAX_PER_SESSION - 2)]

    client.cookies = cookies.SessionCookies(max_sessions=2)  # the least recently used session goes first
    envs[0] = StatefulEnv()
    for session in ("x", "y"):
        await client.post("env", "/add", {"n": 1}, session_id=session)
    assert (await client.post("env", "/add", {"n": 1}, session_id="x"))["count"] == 2  # x used: y is the oldest
    await client.post("env", "/add", {"n": 1}, session_id="z")
    assert (await client.post("env", "/add", {"n": 1}, session_id="y"))["count"] == 1  # z's new jar pushed out y's
    assert (await client.post("env", "/add", {"n": 1}, session_id="z"))["count"] == 2
    assert (await client.post("env", "/add", {"n": 1}, session_id="x"))["count"] == 1  # y's new jar pushed out x's


# ------------------------------------------------------------------ where server folders are found
def write_env(root: Path, impl: str, app: str, config_name: str | None = None) -> Path:
    """resources_servers/<impl>/ under root: app.py and configs/<impl>.yaml naming it; returns the config."""
    folder = root / "resources_servers" / impl
    (folder / "configs").mkdir(parents=True)
    (folder / "app.py").write_text(app)
    config = folder / "configs" / f"{config_name or impl}.yaml"
    config.write_text(yaml.safe_dump({impl: {"resources_servers": {impl: {"entrypoint": "app.py"}}}}))
    return config


def specs_of(cwd: Path, *args: str, validate: bool = False) -> dict:
    return compose(list(args), command="ng_run", cwd=cwd, validate=validate, env_yaml_roots=[cwd]).servers


def test_a_server_folder_in_the_current_folder_comes_first(tmp_path):
    ours = PROJECT_ROOT / "resources_servers" / "simple_weather"
    shutil.copytree(ours, tmp_path / "resources_servers" / "simple_weather")
    spec = specs_of(tmp_path, f"+config_paths=[{WEATHER}]")["simple_weather"]
    assert (spec.folder, spec.runtime) == (tmp_path / "resources_servers" / "simple_weather", OURS)
    assert specs_of(tmp_path / "resources_servers", f"+config_paths=[{WEATHER}]")["simple_weather"].folder == ours


def test_a_folder_written_for_nemo_gym_is_a_nemo_gym_server_and_needs_its_python(tmp_path):
    write_env(tmp_path, "my_env", NEMO_APP)
    config = "+config_paths=[resources_servers/my_env/configs/my_env.yaml]"
    spec = specs_of(tmp_path, config)["my_env"]
    assert (spec.folder, spec.runtime) == (tmp_path / "resources_servers" / "my_env", NEMO_GYM)
    with pytest.raises(ConfigError) as e:
        specs_of(tmp_path, config, validate=True)
    assert any(f"is a NeMo Gym server ({spec.folder})" in p and "+nemo_gym.python=" in p for p in e.value.problems), e.value
    assert specs_of(tmp_path, config, "+my_env.resources_servers.my_env.runtime=ours")["my_env"].runtime == OURS


def test_a_server_of_a_users_environments_repository_is_found_next_to_the_config_naming_it(tmp_path):
    repo, elsewhere = tmp_path / "my_environments", tmp_path / "work"
    config = write_env(repo, "my_env", NEMO_APP)
    elsewhere.mkdir()
    spec = specs_of(elsewhere, f"+config_paths=[{config}]")["my_env"]
    assert (spec.folder, spec.runtime) == (repo / "resources_servers" / "my_env", NEMO_GYM)
    # The current folder still comes first.
    write_env(elsewhere, "my_env", "# ours\n", config_name="unused")
    assert specs_of(elsewhere, f"+config_paths=[{config}]")["my_env"].folder == elsewhere / "resources_servers" / "my_env"


def test_a_runtime_that_does_not_exist_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        specs_of(tmp_path, f"+config_paths=[{WEATHER},{VLLM_MODEL}]", "+simple_weather.resources_servers.simple_weather.runtime=docker",
                 "+policy_base_url=http://127.0.0.1:1/v1", "+policy_api_key=x", "+policy_model_name=m", validate=True)
    assert any("'simple_weather.resources_servers.simple_weather.runtime' must be one of ours, nemo_gym, got 'docker'" in p
               for p in e.value.problems), e.value


# ------------------------------------------------------------------ NeMo Gym's head and agent routes on our graph
@pytest.fixture(scope="module")
def weather(tmp_path_factory):
    work = tmp_path_factory.mktemp("weather")
    standin = StandIn(work)
    graph = None
    try:
        graph = Graph(work, [VLLM_MODEL, WEATHER], weather_env([standin]))
        yield graph
    finally:
        if graph is not None:
            graph.stop()
            graph.kill_leftovers()
        standin.stop()


def test_our_head_answers_nemo_gyms_server_instances(weather):
    status, instances = http_json(weather.head + "/server_instances")
    assert status == 200
    servers = {s["name"]: s for s in weather.servers()}
    assert sorted(i["process_name"] for i in instances) == sorted(servers)
    for inst in instances:
        assert NEMO_SERVER_INSTANCE_FIELDS <= set(inst), inst
        entry = servers[inst["process_name"]]
        assert inst["url"] == entry["url"] == f"http://{inst['host']}:{inst['port']}" and inst["pid"] == entry["pid"]
        assert (inst["server_type"], inst["name"], inst["config_path"]) == (entry["server_type"], entry["impl"], entry["name"])
        assert inst["status"] == "success" and inst["entrypoint"] == "app.py" and inst["uptime_seconds"] >= 0
        assert Path(inst["dir_path"]) == PROJECT_ROOT / inst["server_type"] / inst["name"]


def test_our_agent_computes_the_means_when_the_environment_has_no_aggregate_metrics(weather):
    rows = [{"_ng_task_index": 0, "reward": 1.0, "turns": 2}, {"_ng_task_index": 0, "reward": 0.0, "turns": 4},
            {"_ng_task_index": 1, "reward": 1.0, "turns": 6}]
    agent = weather.url(WEATHER_AGENT)
    status, body = http_json(agent + "/aggregate_metrics", {"verify_responses": rows})
    assert status == 200, body
    assert body == mean_metrics(rows)  # simple_weather has no /aggregate_metrics: a 404, then the means here
    assert body["key_metrics"] == {"mean/reward": pytest.approx(2 / 3)} and body["agent_metrics"]["mean/turns"] == 4.0
    assert body["group_level_metrics"] == [{"_ng_task_index": 0, "mean/reward": 0.5, "mean/turns": 3.0},
                                           {"_ng_task_index": 1, "mean/reward": 1.0, "mean/turns": 6.0}]
    assert http_json(weather.url("simple_weather") + "/aggregate_metrics", {"verify_responses": rows})[0] == 404
    assert http_json(agent + "/aggregate_metrics", {"rows": rows})[0] == 400
