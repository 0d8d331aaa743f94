"""ng_run on a real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, two raylets,
every node on 127.0.0.1): replicas placed by `ray_actor_options.resources`, a collection across
nodes, a replica's process SIGKILLed mid-run and restarted by Ray, one frozen (SIGSTOP) and replaced,
no actor left after ng_run.

Select with `-m ray`; needs the ray extra (`pip install -e '.[ray]'`), else these tests skip.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
import pytest
import yaml

from nemo_gym_cli.testing.harness import PROJECT_ROOT, VLLM_MODEL, WEATHER, http_json, run_cli, script, wait_until, weather_env
from nemo_gym_cli.testing.harness.scenarios import SECRET, read_lines, relay, start_pair, write_rows

pytestmark = pytest.mark.ray

# Placement through Ray's own vocabulary: node_a and node_b are the nodes' custom resources.
PLACEMENT = {
    "policy_model": {"responses_api_models": {"vllm_model": {"ray_actor_options": {"num_cpus": 0.5, "resources": {"node_a": 1}}}}},
    "simple_weather": {"resources_servers": {"simple_weather": {
        "replicas": 2, "ray_actor_options": {"num_cpus": 0.5, "resources": {"node_b": 1}}}}},
    "simple_weather_simple_agent": {"responses_api_agents": {"simple_agent": {
        "ray_actor_options": {"num_cpus": 0.5, "resources": {"node_a": 1}}}}},
}


@pytest.fixture(scope="module")
def cluster():
    """A head node with resource node_a and a worker node with node_b, both on loopback."""
    pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")
    from ray.cluster_utils import Cluster

    common = {"num_cpus": 2, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}
    c = Cluster(initialize_head=True, head_node_args={**common, "resources": {"node_a": 10}, "include_dashboard": False})
    try:
        worker = c.add_node(**common, resources={"node_b": 10})
        c.wait_for_nodes()
        yield c.address, {"node_a": c.head_node.node_id, "node_b": worker.node_id}
    finally:
        c.shutdown()


def replica_actors() -> list[psutil.Process]:
    """Ray worker processes that host (or hosted) one of our replicas: Ray titles them `ray::ReplicaActor...`."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::ReplicaActor"):
            found.append(p)
    return found


def refused(url: str) -> bool:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


def test_replicas_run_where_placed_survive_a_killed_actor_and_leave_nothing(cluster, standins, graph, tmp_path):
    t0 = time.monotonic()
    address, nodes = cluster
    (tmp_path / "placement.yaml").write_text(yaml.safe_dump(PLACEMENT))
    backends = standins(1, "--latency-ms", "40")
    g = graph([VLLM_MODEL, WEATHER, "placement.yaml"], env=weather_env(backends), args=[f"+ray.address={address}"],
              timeout=90)

    servers = g.servers()
    weather = sorted((s for s in servers if s["name"] == "simple_weather"), key=lambda s: s["replica"])
    assert [s["replica"] for s in weather] == [0, 1]
    assert all(s["node"] == nodes["node_b"] for s in weather), weather
    by_name = {s["name"]: s for s in servers}
    assert by_name["simple_weather_simple_agent"]["node"] == nodes["node_a"]
    assert by_name["policy_model"]["node"] == nodes["node_a"]
    for s in servers:  # on the node's address (loopback here), each in its own actor process
        assert s["url"].startswith("http://127.0.0.1:") and s["state"] == "ready"
        assert psutil.Process(s["pid"]).cmdline()[0].startswith("ray::ReplicaActor")
    output = g.output()
    assert f"runs on Ray node {nodes['node_b']}" in output  # ng_run says where each replica runs

    # A collection across both nodes; one environment replica's process is killed mid-run.
    write_rows(tmp_path / "in.jsonl", 120)
    out = tmp_path / "out.jsonl"
    collector = psutil.Popen([script("ng_collect_rollouts"), "+agent_name=simple_weather_simple_agent",
                              f"+head_server.port={g.head_port}", "+progress=false", "+input_jsonl_fpath=in.jsonl",
                              "+output_jsonl_fpath=out.jsonl", "+concurrency=12", "+max_attempts=5"],
                             cwd=tmp_path, stdout=open(tmp_path / "collect.log", "wb"), stderr=-2)
    wait_until(lambda: out.exists() and len(out.read_bytes().splitlines()) >= 15, 60, "the first rollouts")
    victim = weather[1]
    os.kill(victim["pid"], signal.SIGKILL)
    assert collector.wait(120) == 0, (tmp_path / "collect.log").read_text()
    rows = read_lines(out)
    assert sorted(r["_ng_task_index"] for r in rows) == list(range(120))  # no rollout lost
    assert all(r["reward"] == 1.0 for r in rows)

    # Ray restarted the actor on node_b; it registered again and the head counts the restart.
    def restarted():
        now = next(s for s in g.servers() if s["name"] == "simple_weather" and s["replica"] == 1)
        return now if now["pid"] != victim["pid"] and now["state"] == "ready" else None

    again = wait_until(restarted, 60, "the killed replica to come back")
    assert again["node"] == nodes["node_b"] and again["restarts"] >= 1
    assert http_json(again["url"] + "/health")[0] == 200
    wait_until(lambda: "[simple_weather#1] restarted by Ray on Ray node" in g.output(), 30, "ng_run to report the restart")
    status = run_cli("ng_status", [f"+head_server.port={g.head_port}"], cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr

    # A replica frozen for good (SIGSTOP): ng_run's /health probes find it; it is killed and Ray restarts it.
    frozen = next(s for s in g.servers() if s["name"] == "simple_weather" and s["replica"] == 0)
    os.kill(frozen["pid"], signal.SIGSTOP)

    def replaced():
        now = next(s for s in g.servers() if s["name"] == "simple_weather" and s["replica"] == 0)
        return now if now["pid"] != frozen["pid"] and now["state"] == "ready" else None

    wait_until(replaced, 60, "the frozen replica replaced")
    assert "'simple_weather' stopped answering /health" in g.output(), g.output()
    assert not psutil.pid_exists(frozen["pid"]) or psutil.Process(frozen["pid"]).status() == psutil.STATUS_ZOMBIE

    # Stopping ng_run removes every actor it started.
    urls = [s["url"] for s in g.servers()]
    assert g.stop() == 0, g.output()
    wait_until(lambda: not replica_actors(), 30, "no replica actor left")
    assert all(refused(url) for url in urls)
    print(f"ray graph test body: {time.monotonic() - t0:.1f} s")


def test_ray_settings_are_checked_before_attaching(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"simple_weather": {"resources_servers": {"simple_weather": {
        "entrypoint": "app.py", "ray_actor_options": "node_b"}}}}))
    done = run_cli("ng_run", ["+config_paths=[bad.yaml]", "+ray.address=127.0.0.1:1", "+ray.placement=scatter"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "simple_weather.resources_servers.simple_weather.ray_actor_options' must be a mapping" in done.stderr
    assert "'ray.placement' must be one of spread, pack, got 'scatter'" in done.stderr


def test_without_ray_installed_the_error_says_how_to_install_it(tmp_path):
    # A `ray` package that cannot be imported stands for a Python without the extra.
    (tmp_path / "shadow" / "ray").mkdir(parents=True)
    (tmp_path / "shadow" / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    done = run_cli("ng_run", [f"+config_paths=[{VLLM_MODEL},{WEATHER}]", "+policy_base_url=http://127.0.0.1:9",
                              "+policy_api_key=EMPTY", "+policy_model_name=m", "+ray.address=auto"],
                   cwd=PROJECT_ROOT, env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert done.returncode == 1
    assert "pip install -e '.[ray]'" in done.stderr and "Traceback" not in done.stderr


def test_pack_places_an_instances_replicas_together_and_secrets_stay_masked(cluster, graph, tmp_path):
    address, nodes = cluster
    echo = "++echo.resources_servers.ng_test_echo"
    g = start_pair(graph, tmp_path, "processes", timeout=90,
                   args=[f"+ray.address={address}", "+ray.placement=pack", f"{echo}.replicas=2",
                         f"{echo}.ray_actor_options={{num_cpus:1}}", f"{echo}.log_config=true", f"{echo}.print_config=true"])
    echoes = [s for s in g.servers() if s["name"] == "echo"]
    assert len(echoes) == 2 and echoes[0]["node"] == echoes[1]["node"] in nodes.values()  # one node, packed
    status, body = relay(g, "across-actors")  # caller -> echo by name, actor to actor
    assert status == 200, body
    assert body["reply"]["pid"] in {s["pid"] for s in echoes}
    # What the servers log and print reaches ng_run through Ray, secrets masked.
    wait_until(lambda: g.output().count("my config") >= 2, 30, "the replicas' log lines through Ray")
    assert SECRET not in g.output() and "hf-ECHO-TOKEN" not in g.output()
    assert g.stop() == 0, g.output()
    wait_until(lambda: not replica_actors(), 30, "no replica actor left")
