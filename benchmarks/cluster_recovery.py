"""Recovery on a Ray cluster next to recovery on one machine (issue 15).

One run, side by side: a two-node ``ray.cluster_utils.Cluster`` bound to loopback (a head
and a worker node, each a real raylet) and two meshes of the same three services (llm-sim,
root, a programmer "worker"): one with the local spawner, one with ``[cluster] engine =
"ray"`` whose worker runs on the worker node. Measured:

- kill -9 of the worker, alternating between the two meshes: kill -> a new pid answers
  /health (the client's clock), and the daemon's own failure -> healthy (its ``recovered``
  event);
- ``tron drill node-loss`` of the worker node, N times: every process of the node dies at
  once; the drill's fault -> the worker healthy on the head;
- one real node loss at the end (``Cluster.remove_node``): the raylet and everything on the
  node killed; -> the worker running on the head. Ray notices a dead node through its
  health checks (here 0.5 s x 3; Ray's defaults are 3 s x 5, ~16 s), so this figure is
  mostly Ray's configuration, and is given with it.

    .venv/bin/python -m benchmarks.cluster_recovery --kills 10 --losses 3 --json benchmarks/results/cluster_recovery.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from tron.scripts.stats import summary
from tests.harness import cleanup, make_mesh, wait_for

HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}
SERVICES = {"llm-sim": {"role": "llm_sim", "port": 6190, "resources": {"head": 1}},
            "root": {"role": "root", "port": 6100, "resources": {"head": 1}},
            "worker": {"role": "programmer", "port": 6130, "parent": "root"}}


def two_nodes():
    """A Ray head (resource "head") and one worker node (resource "spare"), both on loopback,
    with HEALTH: (the cluster, the worker node). The caller shuts the cluster down."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "resources": {"head": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": HEALTH})
    worker_node = cluster.add_node(num_cpus=1, resources={"spare": 1}, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    return cluster, worker_node


def kill_once(mesh, name: str = "worker") -> dict:
    before = mesh.service(name)
    t0 = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    fresh = wait_for(lambda: (h := mesh.health(name)) and h["pid"] != before["pid"]
                     and h.get("incarnation") != before["incarnation"] and h, 60, f"{name} back", interval=0.002)
    back = time.monotonic() - t0
    recovered = wait_for(lambda: next(iter(mesh.rows(
        "SELECT payload FROM events WHERE kind = 'recovered' AND incarnation = ?", (fresh["incarnation"],))), None),
        10, "the recovered event", interval=0.02)
    return {"kill_to_back": back, "daemon_failure_to_healthy": json.loads(recovered["payload"])["seconds"],
            "node": mesh.service(name)["node"]}


def settle(mesh, name: str = "worker", seconds: float = 1.5) -> None:
    time.sleep(seconds)  # past min_uptime, so the next kill is a stable incarnation's
    wait_for(lambda: mesh.service(name)["state"] == "running", 30, f"{name} running")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--losses", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t_start = time.monotonic()
    cluster, worker_node = two_nodes()
    cluster_up = time.monotonic() - t_start
    tmp = Path(tempfile.mkdtemp(prefix="tron-bench-cluster-"))
    local = make_mesh(tmp / "local", services=SERVICES, fast=False)
    pinned = {**SERVICES, "worker": {**SERVICES["worker"], "node": worker_node.node_id[:8]}}
    remote = make_mesh(tmp / "ray", services=pinned, fast=False,
                       cluster={"engine": "ray", "address": cluster.address})
    out: dict = {"cluster_up_s": cluster_up, "kills": {"local": [], "ray": []}, "drill_losses": [], "load": []}
    try:
        for mesh in (local, remote):
            t0 = time.monotonic()
            mesh.up()
            out[f"up_s_{'ray' if mesh is remote else 'local'}"] = time.monotonic() - t0
        assert remote.service("worker")["node"] == worker_node.node_id, "the worker must run on the worker node"
        for i in range(args.kills):
            for label, mesh in (("local", local), ("ray", remote)) if i % 2 == 0 else (("ray", remote), ("local", local)):
                settle(mesh)
                out["kills"][label].append(kill_once(mesh))
        out["load"].append(os.getloadavg())
        for _ in range(args.losses):
            settle(remote)
            node = remote.service("worker")["node"]
            drill = remote.tron("drill", "node-loss", node[:8], "--json", timeout=180)
            result = json.loads(drill.stdout)
            out["drill_losses"].append({"verdict": result["verdict"], "recovery_s": result.get("recovery_seconds"),
                                        "from": node})
            # the drill restored the node: a restart puts the worker back on the node it names
            settle(remote)
            remote.tron("restart", "worker", timeout=60)
            wait_for(lambda: (s := remote.service("worker"))["node"] == worker_node.node_id and s["state"] == "running",
                     60, "the worker back on its node", interval=0.02)
        settle(remote)
        # The real thing: the worker node goes away (raylet and all), once.
        if remote.service("worker")["node"] == worker_node.node_id:
            t0 = time.monotonic()
            cluster.remove_node(worker_node, allow_graceful=False)
            wait_for(lambda: (s := remote.service("worker"))["node"] == cluster.head_node.node_id
                     and s["state"] == "running", 120, "the worker re-placed on the head", interval=0.01)
            out["real_loss_s"] = time.monotonic() - t0
        else:
            out["real_loss_s"] = None  # the drill left it on the head: nothing to lose on the worker node
        out["load"].append(os.getloadavg())
    finally:
        leftovers = cleanup(local) + cleanup(remote)
        cluster.shutdown()
    out["leftovers"] = leftovers
    if args.json:  # the raw samples first: a table is only a view of them
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    print(render(out))
    return 0


def render(out: dict) -> str:
    def ms(values):
        s = summary([v * 1000 for v in values], 1)
        return f"{s['p50']:.0f} ms (p90 {s['p90']:.0f}, max {s['max']:.0f}, n={s['n']})" if s else "-"

    lines = ["| what | local spawner | Ray, worker node |", "|---|---|---|"]
    for key, what in (("kill_to_back", "kill -9 -> new pid answers /health"),
                      ("daemon_failure_to_healthy", "daemon: failure noticed -> healthy")):
        lines.append(f"| {what} | {ms([k[key] for k in out['kills']['local']])} | "
                     f"{ms([k[key] for k in out['kills']['ray']])} |")
    losses = [d["recovery_s"] for d in out["drill_losses"] if d["recovery_s"] is not None]
    lines.append(f"| `tron drill node-loss` -> healthy on the head | - | {ms(losses)}; verdicts "
                 f"{[d['verdict'] for d in out['drill_losses']]} |")
    real = out.get("real_loss_s")
    lines.append(f"| `Cluster.remove_node` -> running on the head (Ray health checks 0.5 s x 3) | - | "
                 f"{'-' if real is None else f'{real * 1000:.0f} ms'} |")
    lines.append(f"\ncluster up {out['cluster_up_s']:.1f} s; mesh up: local {out.get('up_s_local', 0):.1f} s, "
                 f"ray {out.get('up_s_ray', 0):.1f} s; load {out['load']}; leftovers {out['leftovers']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
