"""Node loss by partition, and the fencing margin (issue 27, item 2).

A Ray head, the daemon and its SQLite registry in the root network namespace; a Ray worker
node in a network namespace of its own (tests/netns.py), joined by a veth. Each round: a
fresh mesh (llm-sim and root on the head, the programmer "worker" on the worker node), the
veth taken down, and, on one monotonic clock (the daemon's events carry it too):

- fenced: the cut -> the worker's old process gone (its node agent's lease lapsed and it
  ended its child, on the far side of the cut);
- detected: the cut -> the daemon's alert for the old incarnation;
- replaced: the cut -> the daemon's ``spawned`` event of the new incarnation (on the head);
- healthy: the cut -> the new incarnation answers /health on the head (the client's view);
- margin: replaced - fenced (> 0: the old incarnation was gone before its replacement started).

Then the link comes back, the worker node (declared dead by Ray, its raylet gone) is started
again for the next round. Ray's health checks: 0.5 s x 3 (its defaults, 3 s x 5, add ~13 s
to "replaced"). The test policy: heartbeat 0.25 s x 8 = 2 s detection, lease 1.75 s.

    .venv/bin/python -m benchmarks.partition --rounds 5 --json benchmarks/results/partition.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tron.scripts.client import http
from tron.scripts.stats import summary
from tests import netns
from tests.harness import cleanup, make_mesh, wait_for

SERVICES = {"llm-sim": {"role": "llm_sim", "port": 6190, "resources": {"head": 1}},
            "root": {"role": "root", "port": 6100, "resources": {"head": 1}},
            "worker": {"role": "programmer", "port": 6130, "parent": "root"}}


def serving(mesh, node: str, host: str, not_incarnation: str | None = None) -> dict | None:
    s = mesh.service("worker")
    if s["state"] != "running" or s["node"] != node or s["incarnation"] == not_incarnation:
        return None
    code, peer = http("POST", mesh.url("daemon") + "/auth/peer", {"to": "worker"}, token=mesh.token, timeout=5)
    try:
        code, body = http("GET", f"http://{host}:{mesh.port('worker')}/health", token=peer["token"], timeout=2)
    except OSError:
        return None
    return s if code == 200 and body.get("incarnation") == s["incarnation"] else None


def one_round(cluster: netns.NetCluster, root: Path, i: int) -> dict:
    worker, head = cluster.worker(), cluster.head.head_node.node_id
    mesh = make_mesh(root / f"r{i}", services=SERVICES, cluster={"engine": "ray", "address": cluster.address},
                     policy={"start_timeout": 40.0})
    mesh.config.write_text(mesh.config.read_text().replace(
        "[mesh]\n", f'[mesh]\nbind = "0.0.0.0"\nadvertise = "{cluster.net.host_ip}"\n', 1))
    try:
        mesh.up()
        old = wait_for(lambda: serving(mesh, worker, cluster.net.node_ip), 60, "the worker on its node")
        time.sleep(1.0)  # a steady state: beats and lease renewals flowing
        t0 = time.monotonic()
        cluster.net.link(False)
        fenced = None
        while True:
            now = time.monotonic()
            if fenced is None and not psutil.pid_exists(old["pid"]):
                fenced = now - t0
            if serving(mesh, head, cluster.net.host_ip, old["incarnation"]):
                healthy = time.monotonic() - t0
                break
            if now - t0 > 120:
                raise RuntimeError("the worker did not come back on the head in 120 s")
            time.sleep(0.01)
        cluster.net.link(True)
        rows = mesh.rows("SELECT kind, incarnation, mono FROM events WHERE agent = 'worker' AND mono >= ? "
                         "ORDER BY id", (t0,))
        detected = next(r["mono"] for r in rows if r["kind"] == "alert_raised" and r["incarnation"] == old["incarnation"])
        replaced = next(r["mono"] for r in rows if r["kind"] == "spawned" and r["incarnation"] != old["incarnation"])
        if fenced is None:
            fenced = wait_for(lambda: not psutil.pid_exists(old["pid"]), 30, "the old process to end") and \
                (time.monotonic() - t0)
        return {"fenced": fenced, "detected": detected - t0, "replaced": replaced - t0, "healthy": healthy,
                "margin": (replaced - t0) - fenced}
    finally:
        cluster.net.clear()
        left = cleanup(mesh)
        if left:
            print(f"round {i}: processes left behind and killed: {left}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    why = netns.capability()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    net = netns.NetNode()
    cluster = None
    rounds = []
    try:
        cluster = netns.NetCluster(net)
        root = Path(tempfile.mkdtemp(prefix="tron-partition-"))
        for i in range(args.rounds):
            r = one_round(cluster, root, i)
            rounds.append(r)
            print(f"round {i}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r.items()), flush=True)
    finally:
        if cluster is not None:
            cluster.close()
        net.close()
    out = {"rounds": rounds, "load": os.getloadavg(), "policy": {"heartbeat_interval": 0.25, "miss_threshold": 8,
                                                                   "lease": 1.75, "detection": 2.0},
           "ray_health_check": "0.5 s x 3",
           "median_ms": {k: summary([r[k] * 1000 for r in rounds], 1)["p50"] for k in rounds[0]}}
    print(json.dumps(out["median_ms"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
