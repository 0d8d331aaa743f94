"""NeMo Gym's own environments, unmodified, in our graph (nemo-gym 0.4.0 in its own Python 3.12 venv).

One graph for the module (NeMo Gym servers and their Ray head are heavy on 2 cores): three of NeMo
Gym's environments from its install (mcqa: stateless, single turn; example_multi_step: tool calls;
example_session_state_mgmt: per-session state under NeMo's session cookie), our simple_agent and
vllm_model from NeMo Gym's own config paths, plus NeMo's own simple_agent (`runtime: nemo_gym`)
against our model adapter, over two scripted stand-ins that answer some rows right, some wrong.
Two more graphs (mcqa alone) for what would disturb that one: a killed ng_run's leftovers, a frozen
Ray head. (tests/test_nemo_gym_contract.py has what needs no NeMo Gym install.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import orjson
import psutil
import pytest
import yaml

from nemo_gym_cli.config import ConfigError, compose
from nemo_gym_cli.config.nemo_gym import nemo_gym_tree
from nemo_gym_cli.config.specs import NEMO_GYM, OURS
from nemo_gym_cli.graph.build import config_problems
from nemo_gym_cli.testing.harness import (Graph, StandIn, free_port, http_json, run_cli, script as console_script,
                                          start_process, wait_until)
from nemo_gym_cli.testing.harness.nemo_gym import ensure_nemo_gym

MCQA = "resources_servers/mcqa/configs/mcqa.yaml"
MULTI_STEP = "resources_servers/example_multi_step/configs/example_multi_step.yaml"
COUNTER = "resources_servers/example_session_state_mgmt/configs/example_session_state_mgmt.yaml"
VLLM_MODEL = "responses_api_models/vllm_model/configs/vllm_model.yaml"
COUNTER_ENV = "example_session_state_mgmt_resources_server"
NEMO_AGENT = "nemo_counter_agent"  # NeMo Gym's own simple_agent, on the counter environment
NEMO_AGENT_YAML = {NEMO_AGENT: {"responses_api_agents": {"simple_agent": {
    "runtime": "nemo_gym", "entrypoint": "app.py",
    "resources_server": {"type": "resources_servers", "name": COUNTER_ENV},
    "model_server": {"type": "responses_api_models", "name": "policy_model"}}}}}
RIGHT_ROWS = (0, 1, 2)  # the stand-ins answer these rows right, rows 3 and 4 wrong


@pytest.fixture(scope="module")
def nemo_python() -> str:
    python, why = ensure_nemo_gym()
    if python is None:
        pytest.skip(why)
    return python


def rows(python: str, config_path: str) -> list[dict]:
    data = nemo_gym_tree(python) / Path(config_path).parent.parent / "data" / "example.jsonl"
    return [json.loads(line) for line in data.read_text().splitlines() if line.strip()]


def script(python: str) -> list[dict]:
    """Stand-in rules (the first match wins; a list matches when all its substrings are in the prompt)."""
    rules = []
    for i, row in enumerate(rows(python, MCQA)):  # a boxed letter, right or not
        letter = row["expected_answer"] if i in RIGHT_ROWS else ("A" if row["expected_answer"] != "A" else "B")
        rules.append({"match": row["responses_create_params"]["input"][-1]["content"][-120:], "content": f"\\boxed{{{letter}}}"})
    for i, row in enumerate(rows(python, MULTI_STEP)):  # two lookups, then the values (right order or not)
        query = row["responses_create_params"]["input"][-1]["content"]
        values = row["expected_synonym_values"] if i in RIGHT_ROWS else row["expected_synonym_values"][::-1]
        first, second = row["expected_synonyms"]
        rules += [{"match": [query, '"success":true'], "content": "Done."},
                  {"match": [query, '"synonym_value":407'],
                   "tool_call": {"name": "extract_synonym_values", "arguments": json.dumps({"synonym_values": values})}},
                  {"match": [query, '"synonym_value":711'],
                   "tool_call": {"name": "get_synonym_value", "arguments": json.dumps({"synonym": second})}},
                  {"match": query, "tool_call": {"name": "get_synonym_value", "arguments": json.dumps({"synonym": first})}}]
    for i, row in enumerate(rows(python, COUNTER)):  # add (the right amount or not), read the counter, answer
        query = row["responses_create_params"]["input"][-1]["content"]
        add = row["expected_count"] - row["initial_count"] + (0 if i in RIGHT_ROWS else 1)
        rules += [{"match": [query, '"count":'], "content": "Done."},
                  {"match": [query, '"success":true'], "tool_call": {"name": "get_counter_value", "arguments": "{}"}},
                  {"match": query, "tool_call": {"name": "increment_counter", "arguments": json.dumps({"count": add})}}]
    return rules


@pytest.fixture(scope="module")
def nemo_graph(nemo_python, tmp_path_factory):
    work = tmp_path_factory.mktemp("nemo_gym")
    (work / "script.json").write_text(json.dumps(script(nemo_python)))
    (work / "nemo_agent.yaml").write_text(yaml.safe_dump(NEMO_AGENT_YAML))
    standins = [StandIn(work, "--script", str(work / "script.json"), name=f"standin{i}") for i in (1, 2)]
    env = {"policy_base_url": ",".join(s.url for s in standins), "policy_api_key": "sk-nemo-test-secret",
           "policy_model_name": "standin-model"}
    graph = None
    try:
        graph = Graph(work, [MCQA, MULTI_STEP, COUNTER, VLLM_MODEL, "nemo_agent.yaml"], env,
                      [f"+nemo_gym.python={nemo_python}", "+restarts.backoff_s=0.1", "+stop_grace_s=3"], timeout=180)
        yield graph, standins, work
    finally:
        if graph is not None:
            graph.stop()
            graph.kill_leftovers()
        for s in standins:
            s.stop()


def collect(graph: Graph, work: Path, name: str, agent: str, config_path: str, *args: str) -> list[dict]:
    """Our collector on NeMo Gym's data path as its docs type it (relative, no +nemo_gym.python: the
    file is found in the NeMo Gym tree of the running graph's nemo_gym.python)."""
    out = work / f"{name}.jsonl"
    data = Path(config_path).parent.parent / "data" / "example.jsonl"
    assert not (work / data).exists()
    done = run_cli("ng_collect_rollouts", [f"+agent_name={agent}", f"+input_jsonl_fpath={data}", f"+output_jsonl_fpath={out}",
                                           f"+head_server.port={graph.head_port}", "+progress=false", *args], work, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return sorted((json.loads(line) for line in out.read_text().splitlines()),
                  key=lambda r: (r["_ng_task_index"], r["_ng_rollout_index"]))


def expected_rewards(n: int = 5) -> list[float]:
    return [1.0 if i in RIGHT_ROWS else 0.0 for i in range(n)]


# ------------------------------------------------------------------ config: lookup and runtimes
def test_nemo_config_paths_need_nemo_gym_python(tmp_path):
    with pytest.raises(ConfigError) as e:
        compose([f"+config_paths=[{MCQA},{VLLM_MODEL}]"], command="ng_run", cwd=tmp_path, env_yaml_roots=[tmp_path])
    assert any(MCQA in p and "+nemo_gym.python=" in p and "pip install nemo-gym==0.4.0" in p for p in e.value.problems)


def test_nemo_config_paths_resolve_in_the_nemo_gym_tree(nemo_python, tmp_path):
    (tmp_path / "nemo_agent.yaml").write_text(yaml.safe_dump(NEMO_AGENT_YAML))
    composed = compose([f"+config_paths=[{MCQA},{COUNTER},{VLLM_MODEL},nemo_agent.yaml]", f"+nemo_gym.python={nemo_python}",
                        "+policy_base_url=http://127.0.0.1:1/v1", "+policy_api_key=x", "+policy_model_name=m"],
                       command="ng_run", cwd=tmp_path, env_yaml_roots=[tmp_path])
    specs = composed.servers
    tree = nemo_gym_tree(nemo_python)
    assert specs["mcqa"].runtime == NEMO_GYM and specs["mcqa"].folder == tree / "resources_servers" / "mcqa"
    assert specs["mcqa_simple_agent"].runtime == OURS and specs["policy_model"].runtime == OURS  # ours: found in our tree
    assert specs[NEMO_AGENT].runtime == NEMO_GYM and specs[NEMO_AGENT].folder == tree / "responses_api_agents" / "simple_agent"
    assert config_problems(specs, composed.sources) == []  # NeMo's keys (datasets, domain, ...) are accepted


def test_ray_address_with_nemo_gym_servers_is_refused_before_anything_starts(nemo_python, tmp_path):
    done = run_cli("ng_run", [f"+config_paths=[{MCQA},{VLLM_MODEL}]", f"+nemo_gym.python={nemo_python}",
                              "+ray.address=127.0.0.1:1", "+policy_base_url=http://127.0.0.1:1/v1", "+policy_api_key=x",
                              "+policy_model_name=m", f"+head_server.port={free_port()}"], tmp_path, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert ("'ray.address' and NeMo Gym servers (mcqa.resources_servers.mcqa) do not go together" in out
            and "Drop +ray.address" in out), out


# ------------------------------------------------------------------ the graph
def test_nemo_servers_run_under_nemo_gyms_contract(nemo_graph, nemo_python):
    graph, _, _ = nemo_graph
    servers = {s["name"]: s for s in graph.servers()}
    assert servers["mcqa"]["runtime"] == NEMO_GYM and servers["mcqa_simple_agent"]["runtime"] == OURS
    assert all(s["state"] == "ready" and s["pid"] for s in servers.values())
    # Its config dict: every server's host and port, the head, dry_run and the one Ray cluster.
    env = dict(e.split("=", 1) for e in Path(f"/proc/{servers['mcqa']['pid']}/environ").read_text().split("\0") if "=" in e)
    assert env["NEMO_GYM_CONFIG_PATH"] == "mcqa"
    nemo_dict = yaml.safe_load(env["NEMO_GYM_CONFIG_DICT"])
    for name, entry in servers.items():
        (fields,) = next(iter(nemo_dict[name].values())).values()
        assert entry["url"] == f"http://{fields['host']}:{fields['port']}", name
    assert nemo_dict["head_server"]["port"] == graph.head_port and nemo_dict["dry_run"] is False
    ray_address = nemo_dict["ray_head_node_address"]
    for name in ("mcqa", COUNTER_ENV, NEMO_AGENT):  # one cluster for all of them
        env_n = Path(f"/proc/{servers[name]['pid']}/environ").read_text()
        assert f"ray_head_node_address: {ray_address}" in env_n
    # The secret is only in that variable: not on a command line, not in the logs.
    for name in servers:
        assert "sk-nemo-test-secret" not in Path(f"/proc/{servers[name]['pid']}/cmdline").read_text()
    assert "sk-nemo-test-secret" not in graph.output()
    assert "[mcqa] " in graph.output()  # prefixed like ours


def test_one_ray_cluster_serves_every_nemo_server(nemo_graph):
    graph, _, _ = nemo_graph
    nemo = [s for s in graph.servers() if s["runtime"] == NEMO_GYM]
    assert len(nemo) == 4
    tree = psutil.Process(graph.proc.pid).children(recursive=True)
    assert [p.name() for p in tree].count("gcs_server") == 1 and [p.name() for p in tree].count("raylet") == 1


def test_our_head_answers_server_instances_as_nemo_gyms_head_does(nemo_graph, nemo_python):
    graph, _, _ = nemo_graph
    status, instances = http_json(graph.head + "/server_instances")
    assert status == 200
    # Each entry is a valid ServerInstanceDisplayConfig of NeMo Gym's own (what its head answers, its status reads).
    check = ("import json, sys; from nemo_gym.server_utils import ServerInstanceDisplayConfig as C; "
             "print(json.dumps([C.model_validate(i).model_dump(mode='json') for i in json.load(sys.stdin)]))")
    done = subprocess.run([nemo_python, "-c", check], input=json.dumps(instances), capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")})
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = {i["process_name"]: i for i in json.loads(done.stdout)}
    servers = {s["name"]: s for s in graph.servers()}
    assert set(parsed) == set(servers)
    mcqa = parsed["mcqa"]
    assert (mcqa["server_type"], mcqa["name"], mcqa["status"]) == ("resources_servers", "mcqa", "success")
    assert mcqa["pid"] == servers["mcqa"]["pid"]
    assert mcqa["url"] == servers["mcqa"]["url"] == f"http://{mcqa['host']}:{mcqa['port']}"
    assert Path(mcqa["dir_path"]) == nemo_gym_tree(nemo_python) / "resources_servers" / "mcqa"


def test_three_nemo_environments_through_our_collector(nemo_graph, nemo_python):
    graph, _, work = nemo_graph
    mcqa = collect(graph, work, "mcqa", "mcqa_simple_agent", MCQA)
    assert [r["reward"] for r in mcqa] == expected_rewards()
    assert [r["extracted_answer"] for r in mcqa[:3]] == [r["expected_answer"] for r in rows(nemo_python, MCQA)[:3]]
    steps = collect(graph, work, "multi_step", "example_multi_step_simple_agent", MULTI_STEP)
    assert [r["reward"] for r in steps] == expected_rewards()
    assert [r["parsed_synonym_values"] for r in steps] == [[711, 407]] * 3 + [[407, 711]] * 2  # from the tools' answers
    counter = collect(graph, work, "counter", "example_session_state_mgmt_simple_agent", COUNTER)
    assert [r["reward"] for r in counter] == expected_rewards()  # seed, increment and verify saw one session's state
    for row, out in zip(rows(nemo_python, COUNTER), counter):
        reads = [o["output"] for o in out["response"]["output"] if o["type"] == "function_call_output"]
        added = row["expected_count"] - row["initial_count"] + (0 if out["_ng_task_index"] in RIGHT_ROWS else 1)
        assert json.loads(reads[-1]) == {"count": row["initial_count"] + added}


def test_nemo_simple_agent_against_our_model_adapter_keeps_each_rollout_on_one_backend(nemo_graph, nemo_python):
    graph, standins, work = nemo_graph
    before = [s.sessions() for s in standins]
    out = collect(graph, work, "nemo_agent", NEMO_AGENT, COUNTER, "+num_repeats=4")
    assert [r["reward"] for r in out] == [reward for reward in expected_rewards() for _ in range(4)]
    new = [{k: v - b.get(k, 0) for k, v in s.sessions().items() if v - b.get(k, 0)} for s, b in zip(standins, before)]
    assert not set(new[0]) & set(new[1])  # no session on both backends
    turns = [n for per_backend in new for n in per_backend.values()]
    assert len(turns) == 20 and set(turns) == {3}  # every rollout: 3 turns, one session, one backend
    assert all(new), "both backends served rollouts"


def test_nemo_gyms_collector_runs_against_our_head(nemo_graph, nemo_python):
    graph, _, work = nemo_graph
    collector = Path(nemo_python).parent / "ng_collect_rollouts"
    data = nemo_gym_tree(nemo_python) / "resources_servers" / "mcqa" / "data" / "example.jsonl"
    run_dir = work / "nemo_collector"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(
        [str(collector), "+agent_name=mcqa_simple_agent", f"+input_jsonl_fpath={data}",
         f"+output_jsonl_fpath={run_dir / 'out.jsonl'}", f"+head_server={{host:127.0.0.1,port:{graph.head_port}}}"],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = sorted((json.loads(line) for line in (run_dir / "out.jsonl").read_text().splitlines()), key=lambda r: r["_ng_task_index"])
    assert [r["reward"] for r in out] == expected_rewards()
    (metrics,) = orjson.loads((run_dir / "out_aggregate_metrics.json").read_bytes())
    assert metrics["key_metrics"]["mean/reward"] == pytest.approx(0.6)
    # mcqa's own /aggregate_metrics, via our agent: its pass@k and majority (in %), which our means never have
    assert metrics["key_metrics"]["pass@1/accuracy"] == metrics["key_metrics"]["majority@1/accuracy"] == pytest.approx(60.0)
    config_text = http_json(graph.head + "/global_config_dict_yaml")[1]
    assert "sk-nemo-test-secret" not in config_text and yaml.safe_load(config_text)["policy_api_key"] != "sk-nemo-test-secret"


def test_kill_a_nemo_server_mid_run(nemo_graph, nemo_python):
    graph, _, work = nemo_graph
    before = {s["name"]: s for s in graph.servers()}[COUNTER_ENV]
    out = work / "killed.jsonl"
    data = nemo_gym_tree(nemo_python) / "resources_servers" / "example_session_state_mgmt" / "data" / "example.jsonl"
    proc = start_process([console_script("ng_collect_rollouts"), "+agent_name=example_session_state_mgmt_simple_agent",
                          f"+input_jsonl_fpath={data}", f"+output_jsonl_fpath={out}", "+num_repeats=40", "+concurrency=4",
                          f"+head_server.port={graph.head_port}", "+progress=false"], work / "killed.log", cwd=work)
    try:
        wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 20, 120, "20 rollouts written")
        os.kill(before["pid"], signal.SIGKILL)
        assert proc.wait(timeout=240) == 0, (work / "killed.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 200 and len({(r["_ng_task_index"], r["_ng_rollout_index"]) for r in lines}) == 200
    assert sorted(r["reward"] for r in lines) == sorted(reward for reward in expected_rewards() for _ in range(40))
    after = {s["name"]: s for s in graph.servers()}[COUNTER_ENV]
    assert after["restarts"] == 1 and after["url"] == before["url"] and after["pid"] != before["pid"]


# ------------------------------------------------------------------ a graph of mcqa alone: leftovers, the Ray head
def mcqa_graph(work: Path, python: str, standin: StandIn, tmpdir: Path | None = None, args: tuple[str, ...] = ()) -> Graph:
    """`tmpdir`: ng_run's TMPDIR, where graphs keep their state folders: only ng_runs sharing it end
    each other's leftovers (not those of every other test running on this machine)."""
    env = {"policy_base_url": standin.url, "policy_api_key": "EMPTY", "policy_model_name": "standin-model"}
    return Graph(work, [MCQA, VLLM_MODEL], env,
                 [f"+nemo_gym.python={python}", "+restarts.backoff_s=0.1", "+stop_grace_s=3", *args],
                 timeout=180, process_env={**os.environ, "TMPDIR": str(tmpdir)} if tmpdir else None)


def ray_head_of(graph: Graph) -> psutil.Process:
    """The `ray start --head` process ng_run started for the NeMo Gym servers."""
    (head,) = [p for p in psutil.Process(graph.proc.pid).children() if "ray.scripts.scripts" in " ".join(p.cmdline())]
    return head


def named(procs: list[psutil.Process], name: str) -> list[psutil.Process]:
    return [p for p in procs if p.name() == name]


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_next_ng_run_ends_a_stopped_nemo_server_and_ray_head_a_killed_ng_run_left(nemo_python, tmp_path):
    standin, graphs = StandIn(tmp_path), []
    state = Path(tempfile.mkdtemp(prefix="ngt_"))  # short: Ray's socket paths live below it
    try:
        graphs.append(mcqa_graph(tmp_path, nemo_python, standin, state))
        killed = graphs[0]
        mcqa = psutil.Process({s["name"]: s for s in killed.servers()}["mcqa"]["pid"])
        port = int({s["name"]: s for s in killed.servers()}["mcqa"]["url"].rsplit(":", 1)[1])
        head = ray_head_of(killed)
        cluster = head.children(recursive=True)
        (gcs,) = named(cluster, "gcs_server")
        for proc in (mcqa, head):
            proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: mcqa.status() == head.status() == psutil.STATUS_STOPPED, 10, "mcqa and the Ray head stopped")
        os.kill(killed.proc.pid, signal.SIGKILL)
        killed.proc.wait(10)
        # The stopped ones keep their SIGTERM pending: they outlive ng_run, mcqa holding its port, the head its cluster.
        assert mcqa.status() == head.status() == psutil.STATUS_STOPPED and not port_free(port) and not gone(gcs)

        graphs.append(mcqa_graph(tmp_path, nemo_python, standin, state))
        out = graphs[1].output()
        assert f"ended 2 processes left by an earlier ng_run (pid {killed.proc.pid}, no longer running)" in out, out
        held = re.search(rf"'mcqa' \(pid {mcqa.pid}, stopped, holding port ([0-9, ]+)\)", out)  # its own, and its Ray driver's
        assert held and str(port) in held.group(1).split(", "), out
        assert f"'ray head' (pid {head.pid}, stopped, with " in out, out  # its gcs_server, raylet, agents, workers
        wait_until(lambda: all(gone(p) for p in [mcqa, head, *cluster]), 15, "every leftover process ended")
        wait_until(lambda: port_free(port), 15, f"port {port} free")
    finally:
        for graph in graphs:
            graph.stop()
            graph.kill_leftovers()
        standin.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_a_frozen_ray_head_is_restarted_the_nemo_server_rejoins_it_and_a_stop_leaves_nothing(nemo_python, tmp_path):
    standin = StandIn(tmp_path)
    graph = mcqa_graph(tmp_path, nemo_python, standin)
    try:
        before = {s["name"]: s for s in graph.servers()}["mcqa"]
        head = ray_head_of(graph)
        command = head.cmdline()
        agent = command[command.index("--dashboard-agent-listen-port") + 1]
        wait_until(lambda: http_json(f"http://127.0.0.1:{agent}/api/healthz", timeout=5)[0] == 200, 120, "the Ray head healthy")
        (gcs,) = named(head.children(recursive=True), "gcs_server")
        gcs.send_signal(signal.SIGSTOP)  # the cluster freezes; ray start itself still runs

        def rejoined() -> bool:
            mcqa = {s["name"]: s for s in graph.servers()}["mcqa"]
            return mcqa["pid"] != before["pid"] and mcqa["state"] == "ready"

        wait_until(rejoined, 180, "mcqa restarted into a new Ray cluster")
        out = graph.output()
        assert "'ray head' stopped answering /api/healthz" in out and "restarting it" in out, out
        assert "server 'mcqa' exited unexpectedly with code -9, killed because its Ray cluster (the ray head) was restarted" in out
        after = {s["name"]: s for s in graph.servers()}["mcqa"]
        assert after["url"] == before["url"] and after["restarts"] == 1
        assert gone(head) and gone(gcs)  # the frozen cluster is gone; one new one, on the same address
        tree = psutil.Process(graph.proc.pid).children(recursive=True)
        assert len(named(tree, "gcs_server")) == 1 and ray_head_of(graph).cmdline() == command
        rollouts = collect(graph, tmp_path, "after_restart", "mcqa_simple_agent", MCQA)
        assert len(rollouts) == 5  # mcqa serves again (the stand-in boxes no letter: reward 0)

        tree = psutil.Process(graph.proc.pid).children(recursive=True)  # NeMo's server, Ray's cluster and workers, ours
        assert graph.stop() == 0
        wait_until(lambda: all(gone(p) for p in tree), 15, "no process of the graph outlives ng_run")
    finally:
        graph.stop()
        graph.kill_leftovers()
        standin.stop()


def test_nemo_servers_join_the_users_ray_cluster_given_as_nemo_gym_ray_address(nemo_python, tmp_path):
    """+nemo_gym.ray_address: NeMo Gym's servers use the user's cluster (their ray_head_node_address)
    and ng_run starts none. The user's cluster here: a Ray head run with NeMo Gym's Python."""
    port, temp = free_port(), Path(tempfile.mkdtemp(prefix="ngu_"))  # short: Ray's socket paths live below it
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    users = subprocess.Popen([nemo_python, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()",
                              "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                              "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                              "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(temp)],
                             env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    standin, graph = StandIn(tmp_path), None
    try:
        wait_until(lambda: not port_free(port) or users.poll() is not None, 90, "the user's Ray head listening")
        assert users.poll() is None, "the user's Ray head did not start"
        graph = mcqa_graph(tmp_path, nemo_python, standin, args=(f"+nemo_gym.ray_address=127.0.0.1:{port}",))
        mcqa = {s["name"]: s for s in graph.servers()}["mcqa"]
        nemo_dict = yaml.safe_load(dict(e.split("=", 1) for e in Path(f"/proc/{mcqa['pid']}/environ").read_text().split("\0")
                                        if "=" in e)["NEMO_GYM_CONFIG_DICT"])
        assert nemo_dict["ray_head_node_address"] == f"127.0.0.1:{port}"
        assert named(psutil.Process(graph.proc.pid).children(recursive=True), "gcs_server") == []  # ng_run started none
        # mcqa is a driver of the user's cluster: connected to its GCS.
        assert any(c.raddr and c.raddr.port == port for c in psutil.Process(mcqa["pid"]).net_connections("tcp"))
        assert len(collect(graph, tmp_path, "users_cluster", "mcqa_simple_agent", MCQA)) == 5
        assert graph.stop() == 0
        assert users.poll() is None  # the user's cluster is the user's: ng_run leaves it running
    finally:
        if graph is not None:
            graph.stop()
            graph.kill_leftovers()
        cluster = psutil.Process(users.pid).children(recursive=True) if users.poll() is None else []
        users.kill()
        for proc in cluster:
            try:
                proc.kill()
            except psutil.Error:
                pass
        users.wait(10)
        standin.stop()
        shutil.rmtree(temp, ignore_errors=True)
