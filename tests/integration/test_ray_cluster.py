"""Issue 15, agents placed by Ray: a two-node ``ray.cluster_utils.Cluster`` bound to
loopback (a head and a worker node, each a real raylet), the registry on a throwaway
PostgreSQL. Placement by Ray resources and by spread; a kill -9 on the worker node is
restarted there through its node agent (the local path, not Ray's); a node loss, in a
drill and for real (``Cluster.remove_node``), puts the node's services on the surviving
node and their tasks go on from their checkpoints. Every step is a registry row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest

from tests.harness import wait_for
from tests.harness import RAY_WORKER_PORTS
from tron.services.daemon.node_agent import sweep_scratch

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'tron-mesh[cluster]' (make test does)")
from ray.cluster_utils import Cluster  # noqa: E402

FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
               "health_check_initial_delay_ms": 0}
# llm-sim and root need the head's label; the worker goes where fewest services run: the worker node.
SERVICES = {"llm-sim": {"role": "llm_sim", "port": 6190, "resources": {"head": 1}},
            "root": {"role": "root", "port": 6100, "resources": {"head": 1}},
            "worker": {"role": "programmer", "port": 6130, "parent": "root"}}


@pytest.fixture(scope="module")
def cluster():
    ports = {"min_worker_port": RAY_WORKER_PORTS[0], "max_worker_port": RAY_WORKER_PORTS[1]}  # not on a mesh's
    c = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "resources": {"head": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": FAST_HEALTH, **ports})
    c.worker = c.add_node(num_cpus=1, resources={"gpu_box": 1}, node_ip_address="127.0.0.1", **ports)
    c.wait_for_nodes()
    pids = [p.process.pid for node in c.list_all_nodes() for procs in node.all_processes.values() for p in procs]
    yield c
    pids += [p.process.pid for node in c.list_all_nodes() for procs in node.all_processes.values() for p in procs]
    c.shutdown()
    left = wait_for(lambda: not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
                    or None, 30, "the Ray cluster's processes to end", interval=0.2)
    assert left
    sweep_scratch()  # Ray ended the node agents with SIGKILL: their scratch directories go, as the next agent's would


def ray_mesh(mesh_factory, cluster, postgres, **kw):
    return mesh_factory(services=SERVICES, cluster={"engine": "ray", "address": cluster.address},
                        registry_url=postgres.database(), **kw)


def nodes(mesh) -> dict[str, dict]:
    return {n["node"]: n for n in mesh.status()["cluster"]["nodes"]}


def placed(mesh, name: str) -> str:
    return mesh.service(name)["node"]


def test_services_are_placed_on_both_nodes_and_a_kill_on_the_worker_node_restarts_there(
        mesh_factory, cluster, postgres):
    mesh = ray_mesh(mesh_factory, cluster, postgres)
    mesh.up()
    head, worker = cluster.head_node.node_id, cluster.worker.node_id
    assert placed(mesh, "llm-sim") == placed(mesh, "root") == head  # by resource
    assert placed(mesh, "worker") == worker  # by spread
    found = nodes(mesh)
    assert all(n["agent_pid"] and n["fork_server"] for n in found.values()), found
    assert mesh.service("worker")["mode"] == f"fork@{worker[:8]}"

    old = mesh.kill("worker")
    fresh = mesh.wait_replaced("worker", old)
    # the new process can answer before the node agent's reply reaches the daemon: poll
    wait_for(lambda: placed(mesh, "worker") == worker, 10, "the worker restarted on its node")
    drill = mesh.tron("drill", "kill", "worker", "--json", timeout=120)
    assert drill.returncode == 0 and json.loads(drill.stdout)["verdict"] == "pass", drill.stdout + drill.stderr
    # how fast is benchmarks/cluster_recovery.py's to measure; here: replaced, on its node, serving
    assert mesh.health("worker")["pid"] not in (old, fresh["pid"])
    wait_for(lambda: placed(mesh, "worker") == worker, 10, "the worker restarted on its node after the drill")
    done = json.loads(mesh.tron("run", "--agent", "worker", "--json", "two steps", timeout=90, check=True).stdout)
    assert mesh.rows("SELECT status FROM runs WHERE run_id = ?", (done["run_id"],)) == [{"status": "done"}]

    history = mesh.history("worker")
    assert [r["retry_type"] for r in history] == ["child_restart", "child_restart"]
    assert len({r["alert_id"] for r in history}) == 2
    spawned = mesh.rows("SELECT payload FROM events WHERE kind = 'spawned' AND agent = 'worker' ORDER BY id")
    assert all(f"@{worker[:8]}" in json.loads(e["payload"])["mode"] for e in spawned)
    report = mesh.tron("report", "--json")
    assert report.returncode == 0, report.stdout
    assert fresh["pid"] != old
    # every row exactly once on PostgreSQL: the unique keys hold with agents on two nodes
    assert mesh.rows("SELECT alert_id, retry_type, hop, COUNT(*) AS n FROM retry_history "
                     "GROUP BY alert_id, retry_type, hop HAVING COUNT(*) > 1") == []
    assert mesh.rows("SELECT agent, COUNT(*) AS n FROM sessions WHERE status != 'ended' GROUP BY agent "
                     "HAVING COUNT(*) > 1") == []


# A node agent left by a mesh gone down (its daemon killed, or gone while the agent's setup
# ran): set up by hand for another home, answering what its setup() said, then left running.
LEAVE_AGENT = """
import json, sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tron.services.daemon.node_agent import NAMESPACE, NodeAgent, actor_name
from tron.services.daemon.ray_private import join_at_loopback

address, node, home = sys.argv[1:]
ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, include_dashboard=False,
         **join_at_loopback(address))
for attempt in range(40):  # the previous mesh's agent here may still be going away under its name
    agent = ray.remote(NodeAgent).options(
        name=actor_name(node), namespace=NAMESPACE, lifetime="detached", max_restarts=0, num_cpus=0,
        get_if_exists=True, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
    try:
        print(json.dumps(ray.get(agent.setup.remote(home, "", {}, True), timeout=90)))
        break
    except ray.exceptions.RayActorError:
        time.sleep(0.25)
"""


def test_a_node_agent_set_up_for_a_mesh_gone_down_is_set_up_again_for_the_next(mesh_factory, cluster, postgres,
                                                                                tmp_path):
    """The node agent's name is its node's: the next mesh's daemon finds one that a mesh gone
    down left. Set up for that other home and running nothing, it is set up again for this
    mesh (home, spawner, fork server), never handed over as it was."""
    worker = cluster.worker.node_id
    gone = tmp_path / "gone" / worker[:8]
    left = subprocess.run([sys.executable, "-c", LEAVE_AGENT, cluster.address, worker, str(gone)],
                          capture_output=True, text=True, timeout=180)
    assert left.returncode == 0 and left.stdout.strip(), left.stdout + left.stderr
    before = json.loads(left.stdout.strip().splitlines()[-1])
    assert before["home"] == str(gone) and before["fork_server"]["pid"], before

    mesh = ray_mesh(mesh_factory, cluster, postgres)
    mesh.up()
    assert placed(mesh, "worker") == worker
    found = nodes(mesh)
    assert all(n["agent_pid"] and n["fork_server"] for n in found.values()), found
    assert found[worker]["agent_pid"] == before["pid"]  # the same agent,
    assert found[worker]["fork_server"] != before["fork_server"]["pid"]  # with a fork server of this mesh
    home = psutil.Process(mesh.service("worker")["pid"]).environ()["TRON_HOME"]
    assert home.startswith(str(mesh.home)), home
    wait_for(lambda: ended(before["fork_server"]["pid"]), 30, "the gone mesh's fork server to end", interval=0.1)

    # The status follows what the node agent runs: a fork server started again is named, not the one that died.
    # The node's first server hands over to a warm heir a few seconds after setup; the one killed is the warm one.
    server = wait_for(lambda: (n := nodes(mesh)[worker])["fork_server_warm"] and n["fork_server_heir"] is None
                      and not ended(n["fork_server"]) and n["fork_server"], 60,
                      "the worker node's fork server to be warm, its heir handed over", interval=0.1)
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: (pid := nodes(mesh)[worker]["fork_server"]) not in (None, server) and not ended(pid), 30,
             "the status to name the worker node's new fork server", interval=0.1)


def ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_node_loss_drill_moves_the_nodes_services_and_says_pass(mesh_factory, cluster, postgres):
    mesh = ray_mesh(mesh_factory, cluster, postgres)
    mesh.up()
    worker = cluster.worker.node_id
    assert placed(mesh, "worker") == worker
    drill = mesh.tron("drill", "node-loss", worker[:8], "--json", timeout=180)
    result = json.loads(drill.stdout)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert result["verdict"] == "pass" and result["services"] == ["worker"]
    assert placed(mesh, "worker") == cluster.head_node.node_id
    assert not nodes(mesh)[worker]["cordoned"]  # restored when the drill ended
    alert = mesh.rows("SELECT detail FROM alerts WHERE agent = 'worker'")
    assert json.loads(alert[0]["detail"])["node_lost"] == worker
    wrong = mesh.tron("drill", "node-loss", "zzzz", timeout=60)
    assert wrong.returncode != 0 and "0 nodes match 'zzzz'" in wrong.stderr

    # A daemon killed -9 and started again adopts what the node agents still run.
    before = {name: mesh.service(name) for name in SERVICES}
    os.kill(mesh.status()["daemon"]["pid"], signal.SIGKILL)
    again = mesh.tron("up", "--detach", timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    for name, old in before.items():
        now = mesh.service(name)
        assert (now["pid"], now["incarnation"], now["node"]) == (old["pid"], old["incarnation"], old["node"])
        assert now["mode"].startswith("adopted@")
    old = mesh.kill("worker")  # and the ladder still works through the adopted node agent
    mesh.wait_replaced("worker", old)
    wait_for(lambda: placed(mesh, "worker") == cluster.head_node.node_id, 10, "the worker restarted on the head")


@pytest.fixture
def replaced_worker(cluster):
    """The test takes the worker node away for good: a new one takes its place afterwards,
    so the tests after it (in any order: make test shuffles) have a worker node again."""
    yield
    if not any(n.node_id == cluster.worker.node_id for n in cluster.list_all_nodes()):
        cluster.worker = cluster.add_node(num_cpus=1, resources={"gpu_box": 1}, node_ip_address="127.0.0.1",
                                          min_worker_port=RAY_WORKER_PORTS[0], max_worker_port=RAY_WORKER_PORTS[1])
        cluster.wait_for_nodes()


def test_a_lost_node_is_noticed_and_its_task_resumes_on_the_survivor(mesh_factory, cluster, postgres,
                                                                    replaced_worker):
    """It takes the worker node away; ``replaced_worker`` adds a new one after it."""
    mesh = ray_mesh(mesh_factory, cluster, postgres)
    mesh.up()
    worker = cluster.worker.node_id
    assert placed(mesh, "worker") == worker
    provider = mesh.service("worker")["provider"]
    code, _ = mesh.http("PUT", mesh.url("llm-sim") + f"/sim/faults/{provider}", {"kind": "latency", "latency_ms": 3000})
    assert code in (200, 201)
    run = subprocess.Popen([*mesh_tron(mesh), "run", "--agent", "worker", "--json", "four steps to resume"],
                           env=mesh.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        task = wait_for(lambda: next(iter(mesh.rows(
            "SELECT t.task_id FROM tasks t JOIN checkpoints c USING (task_id) WHERE t.agent = 'worker'")), None),
            60, "the worker's first checkpoint", interval=0.1)
        t0 = time.monotonic()
        cluster.remove_node(cluster.worker, allow_graceful=False)
        wait_for(lambda: placed(mesh, "worker") == cluster.head_node.node_id
                 and mesh.service("worker")["state"] == "running", 60, "worker re-placed on the head")
        moved = time.monotonic() - t0
        mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, out + err
    resumed = mesh.rows("SELECT payload FROM events WHERE kind = 'task_resumed' AND task_id = ?", (task["task_id"],))
    assert resumed and json.loads(resumed[-1]["payload"])["checkpoint"] >= 1
    assert mesh.rows("SELECT status FROM tasks WHERE task_id = ?", (task["task_id"],))[0]["status"] == "done"
    wait_for(lambda: not nodes(mesh)[worker]["alive"], 30, "Ray to report the node dead", interval=0.2)
    print(f"node loss -> worker running on the head: {moved:.2f}s")

    # A node that joins as the mesh goes down: the node agent the daemon was setting up there
    # goes with the mesh, and the next mesh's daemon never finds it half set up for a gone home.
    cluster.worker = cluster.add_node(num_cpus=1, resources={"gpu_box": 1}, node_ip_address="127.0.0.1",
                                      min_worker_port=RAY_WORKER_PORTS[0], max_worker_port=RAY_WORKER_PORTS[1])
    cluster.wait_for_nodes()
    wait_for(lambda: cluster.worker.node_id in nodes(mesh), 30, "the daemon to see the new node", interval=0.1)
    down = mesh.down()
    assert down.returncode == 0, down.stdout + down.stderr
    wait_for(lambda: not node_agents(cluster.worker), 30, "no node agent left on the node that joined", interval=0.2)


def node_agents(node) -> list[str]:
    """The Tron node agents (Ray actor workers, by their process title) a Ray node runs."""
    from ray._private import ray_constants

    [raylet] = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
    found = []
    for p in psutil.Process(raylet.process.pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and " ".join(p.cmdline()).startswith("ray::NodeAgent"):
                found.append(f"{p.pid} {' '.join(p.cmdline())}")
        except psutil.Error:  # gone meanwhile
            pass
    return found


def mesh_tron(mesh) -> list[str]:
    from tests.harness import TRON

    return [*TRON, "--config", str(mesh.config)]


# -- issue 27: beats through the node agents' relays -------------------------------------------


def beats(mesh) -> tuple[float, float]:
    """(accepted in batches, accepted in all), read from one scrape of the daemon's metrics."""
    with urllib.request.urlopen(mesh.url("daemon") + "/metrics", timeout=10) as r:
        values = dict(line.split()[:2] for line in r.read().decode().splitlines()
                      if line.startswith(("tron_beats_batched_total ", "tron_beats_received_total ")))
    return float(values.get("tron_beats_batched_total", 0)), float(values.get("tron_beats_received_total", 0))


def batches_keep_everyone(mesh, since: tuple[float, float]) -> None:
    """Beats keep coming in batches, two beat timeouts' worth of every service's; nearly all
    beats batched (an agent whose relay is slow to answer beats directly once; one of the
    three services beating directly throughout would make it half the batched count)."""
    enough = 2 * len(SERVICES) * mesh.policy["miss_threshold"]
    now = wait_for(lambda: (b := beats(mesh))[0] >= since[0] + enough and b, 90, "batches over two beat timeouts")
    batched, direct = now[0] - since[0], (now[1] - since[1]) - (now[0] - since[0])
    assert direct * 2 < batched, f"{direct} beats came directly, {batched} in batches"


def test_node_agents_batch_their_agents_beats_and_a_restarted_agent_beats_through_the_relay(
        mesh_factory, cluster, postgres):
    """Every node agent runs a beat relay; its agents beat to it (``TRON_BEAT_URL``) and it
    beats for them all with one ``POST /beats`` per interval under its own relay credential.
    An agent killed on the worker node comes back there and beats through the relay again."""
    mesh = ray_mesh(mesh_factory, cluster, postgres)
    mesh.up()
    worker = cluster.worker.node_id
    assert placed(mesh, "worker") == worker
    first = {name: mesh.service(name) for name in SERVICES}
    batches_keep_everyone(mesh, beats(mesh))  # nobody is restarted meanwhile
    assert {n: mesh.service(n)["incarnation"] for n in SERVICES} == {n: s["incarnation"] for n, s in first.items()}

    old = mesh.kill("worker")
    fresh = mesh.wait_replaced("worker", old)
    wait_for(lambda: placed(mesh, "worker") == worker, 10, "the worker restarted on its node")
    batches_keep_everyone(mesh, beats(mesh))  # its new incarnation too, through the same relay
    assert mesh.service("worker")["incarnation"] == fresh["incarnation"]
    refused = [r for r in mesh.rows("SELECT payload FROM events WHERE kind = 'audit'") if "relay" in r["payload"]]
    assert not refused, refused


# -- issue 27: logs and drills through the node agent -------------------------------------------


def ui_log_backlog(mesh, name: str, wanted: str) -> str:
    """The web UI's log pane of ``name``: what its event stream sends first (read through the
    node agent on a cluster), until a backlog shows ``wanted``."""
    import http.cookiejar

    code, login = mesh.http("POST", mesh.url("daemon") + "/ui/login-code", {"actor": "test@ui"})
    assert code == 201, login
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    browser.open(login["url"], timeout=10).read()

    def backlog():
        with browser.open(mesh.url("daemon") + f"/ui/events?topics=log:{name}", timeout=10) as stream:
            event = None
            for raw in stream:  # the first events: the alert bar, then the log's backlog
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "log-backlog":
                    return line if wanted in line else None
        return None
    return wait_for(backlog, 30, f"the UI's log pane of {name} to show {wanted!r}", interval=0.2)


def test_logs_and_drills_of_a_service_on_another_node_go_through_its_node_agent(mesh_factory, cluster, postgres):
    """`tron logs`, its follower and the web UI's log pane read the worker's log on its node
    through the daemon and the node agent; `tron drill kill|hang` signal it there (an audited
    daemon call), never a pid on the CLI's machine, and report its recovery."""
    mesh = ray_mesh(mesh_factory, cluster, postgres)
    mesh.up()
    worker = cluster.worker.node_id
    assert placed(mesh, "worker") == worker
    first = mesh.service("worker")

    code, chunk = mesh.http("GET", mesh.url("daemon") + "/services/worker/log?lines=1000")
    assert code == 200 and chunk["node"] == worker, chunk  # read by the worker node's agent
    assert f'"pid": {first["pid"]}' in chunk["data"] or f'"pid":{first["pid"]}' in chunk["data"], chunk
    shown = mesh.tron("logs", "worker", "-n", "1000")
    assert shown.returncode == 0, shown.stderr
    assert any(line.split("|")[0].strip() == "worker" and "serving" in line and f"pid={first['pid']}" in line
               for line in shown.stdout.splitlines()), shown.stdout
    assert "serving" in ui_log_backlog(mesh, "worker", "serving")
    for bad in ("lines=-1", "max_bytes=5", "offset=x", "node=NOT-HEX", "colour=red"):
        code, body = mesh.http("GET", mesh.url("daemon") + f"/services/worker/log?{bad}")
        assert code == 400, (bad, body)
    code, _ = mesh.http("GET", mesh.url("daemon") + "/services/nobody/log")
    assert code == 404
    code, _ = mesh.http("GET", mesh.url("daemon") + "/services/worker/log", token=False)
    assert code == 401

    # A drill's signal names the incarnation it saw: any other is refused and nothing is hit.
    for body, status in (({"signal": "kill", "incarnation": "i-not-running"}, 409),
                         ({"signal": "term", "incarnation": first["incarnation"]}, 422),
                         ({"signal": "kill"}, 422)):
        code, answer = mesh.http("POST", mesh.url("daemon") + "/services/worker/signal", body)
        assert code == status, (body, answer)
    assert mesh.service("worker")["incarnation"] == first["incarnation"]

    follower = subprocess.Popen([*mesh_tron(mesh), "logs", "-f", "-n", "1", "worker"], env=mesh.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    followed: list[str] = []
    reader = threading.Thread(target=lambda: followed.extend(iter(follower.stdout.readline, "")), daemon=True)
    try:
        started = follower.stdout.readline()
        assert started.split("|")[0].strip() == "worker", started  # it follows from here on
        reader.start()
        drill = mesh.tron("drill", "kill", "worker", "--json", timeout=120)
        result = json.loads(drill.stdout)
        assert drill.returncode == 0 and result["verdict"] == "pass", drill.stdout + drill.stderr
        [fault] = [e for e in result["timeline"] if e["event"] == "fault injected"]
        assert fault["detail"] == f"SIGKILL pid {first['pid']} on node {worker[:12]}", fault
        assert result["recovery_seconds"] > 0 and any(e["event"] == "detected" for e in result["timeline"])
        fresh = mesh.service("worker")
        assert fresh["node"] == worker and fresh["incarnation"] != first["incarnation"]

        # `tron drill hang`'s fault: SIGSTOP through the node agent; the missed beats replace it.
        code, stop = mesh.http("POST", mesh.url("daemon") + "/services/worker/signal",
                               {"signal": "stop", "incarnation": fresh["incarnation"], "reason": "test hang"})
        assert code == 200 and (stop["pid"], stop["node"]) == (fresh["pid"], worker), stop
        wait_for(lambda: mesh.service("worker")["incarnation"] not in (first["incarnation"], fresh["incarnation"])
                 and mesh.service("worker")["state"] == "running", 60, "the stopped worker replaced")
        reasons = {r["reason"] for r in mesh.rows("SELECT reason FROM alerts WHERE incarnation = ?",
                                                  (fresh["incarnation"],))}
        assert reasons <= {"heartbeat_timeout", "liveness_failed"} and reasons, reasons
        code, _ = mesh.http("POST", mesh.url("daemon") + "/services/worker/signal",
                            {"signal": "cont", "incarnation": fresh["incarnation"]})
        assert code == 409  # replaced: nothing left to let go on
        wait_for(lambda: placed(mesh, "worker") == worker, 10, "the worker back on its node")
        # The follower saw the killed worker's successor start, on its node, through the daemon.
        wait_for(lambda: any("serving" in line and f"pid={fresh['pid']}" in line for line in followed), 30,
                 "`tron logs -f worker` to show the successor starting")
    finally:
        follower.terminate()
        follower.wait(timeout=30)
        if reader.is_alive():
            reader.join(timeout=10)
    signals = [json.loads(r["payload"]) for r in mesh.rows("SELECT payload FROM events WHERE kind = 'audit'")
               if "signal_" in r["payload"]]
    assert {s["what"] for s in signals} >= {"signal_kill", "signal_stop"}, signals
