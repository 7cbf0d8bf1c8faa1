"""Logs and drills across nodes (issue 27, item 4): the daemon's log endpoint and drill
signal through a Ray node agent, beside the same on one machine.

One run, side by side: a two-node ``ray.cluster_utils.Cluster`` bound to loopback and two
meshes of the same three services (llm-sim, root, a programmer "worker"): one with the
local spawner, one with ``[cluster] engine = "ray"`` whose worker is pinned to the worker
node. Measured, alternating between the two meshes:

- ``GET /services/worker/log`` with a cursor and nothing new (what a follower pays per
  poll), and a first read of the last 20 lines (``tron logs worker``), the client's clock;
- a backlog of ``--megabytes`` MB appended to the worker's log, read to its end in 256 KiB
  chunks through the endpoint (what ``tron logs -f`` catching up costs);
- ``tron drill kill worker``: the fault sent through the daemon (the node agent on Ray),
  its recovery time as the drill reports it (fault sent -> a new incarnation healthy),
  beside a plain ``kill -9`` of the same pid from this process (-> a new pid answers
  /health), which is what the drill sent before issue 27: the two should agree.

    .venv/bin/python -m benchmarks.log_follow --polls 200 --drills 5 --megabytes 8 --json benchmarks/results/log_follow.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.cluster_recovery import SERVICES, two_nodes  # the same two nodes and mesh
from tron.scripts.stats import summary
from tests.harness import cleanup, make_mesh, wait_for


def get_log(mesh, **query) -> tuple[float, dict]:
    from urllib.parse import urlencode

    t0 = time.perf_counter()
    code, body = mesh.http("GET", mesh.url("daemon") + "/services/worker/log?" + urlencode(query), timeout=30)
    took = time.perf_counter() - t0
    assert code == 200, body
    return took, body


def catch_up(mesh, megabytes: int) -> dict:
    """Append a backlog to the worker's log, then read it all through the endpoint."""
    _, start = get_log(mesh, lines=0)
    line = json.dumps({"ts": "2026-01-01T00:00:00", "level": "info", "msg": "x" * 200}) + "\n"
    with open(mesh.home / "logs" / "worker.log", "a") as f:
        f.write(line * (megabytes * 1024 * 1024 // len(line)))
    cursor = {k: start[k] for k in ("inode", "offset", "node")}
    t0, read, chunks = time.perf_counter(), 0, 0
    while True:
        _, body = get_log(mesh, **cursor)
        read += len(body["data"].encode())
        chunks += 1
        cursor = {k: body[k] for k in ("inode", "offset", "node")}
        if not body["more"]:
            break
    took = time.perf_counter() - t0
    return {"bytes": read, "chunks": chunks, "seconds": took, "mb_per_s": read / took / 1e6}


def drill_kill(mesh) -> dict:
    wait_for(lambda: mesh.service("worker")["state"] == "running", 60, "worker running")
    time.sleep(1.5)  # past min_uptime, so the kill is a stable incarnation's
    proc = mesh.tron("drill", "kill", "worker", "--json", timeout=180)
    result = json.loads(proc.stdout)
    detected = [e["t"] for e in result["timeline"] if e["event"] == "detected"]
    return {"verdict": result["verdict"], "recovery_s": result.get("recovery_seconds"),
            "detected_s": detected[0] if detected else None,
            "fault": next(e["detail"] for e in result["timeline"] if e["event"] == "fault injected")}


def kill_direct(mesh) -> dict:
    """kill -9 from here (the old drill's way; the same machine on loopback)."""
    import signal

    wait_for(lambda: mesh.service("worker")["state"] == "running", 60, "worker running")
    time.sleep(1.5)
    before = mesh.service("worker")
    t0 = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    wait_for(lambda: (h := mesh.health("worker")) and h.get("incarnation") not in (None, before["incarnation"]), 120,
             "worker back", interval=0.005)
    return {"recovery_s": time.monotonic() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--polls", type=int, default=200)
    ap.add_argument("--drills", type=int, default=5)
    ap.add_argument("--megabytes", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cluster, worker_node = two_nodes()
    tmp = Path(tempfile.mkdtemp(prefix="tron-bench-logs-"))
    local = make_mesh(tmp / "local", services=SERVICES, fast=False)
    pinned = {**SERVICES, "worker": {**SERVICES["worker"], "node": worker_node.node_id[:8]}}
    remote = make_mesh(tmp / "ray", services=pinned, fast=False, cluster={"engine": "ray", "address": cluster.address})
    meshes = {"local": local, "ray": remote}
    out: dict = {"poll": {"local": [], "ray": []}, "tail": {"local": [], "ray": []}, "catch_up": {},
                 "drills": {"local": [], "ray": []}, "direct": {"local": [], "ray": []}, "load": []}
    try:
        for mesh in meshes.values():
            mesh.up()
        assert remote.service("worker")["node"] == worker_node.node_id, "the worker must run on the worker node"
        out["load"].append(os.getloadavg())
        cursors = {label: {k: get_log(m, lines=0)[1][k] for k in ("inode", "offset", "node")}
                   for label, m in meshes.items()}
        for i in range(args.polls):
            for label in ("local", "ray") if i % 2 == 0 else ("ray", "local"):
                out["poll"][label].append(get_log(meshes[label], **cursors[label])[0])
                out["tail"][label].append(get_log(meshes[label], lines=20)[0])
        for label, mesh in meshes.items():
            out["catch_up"][label] = catch_up(mesh, args.megabytes)
        out["load"].append(os.getloadavg())
        for i in range(args.drills):
            for label in ("local", "ray") if i % 2 == 0 else ("ray", "local"):
                out["drills"][label].append(drill_kill(meshes[label]))
                out["direct"][label].append(kill_direct(meshes[label]))
        out["load"].append(os.getloadavg())
    finally:
        leftovers = cleanup(local) + cleanup(remote)
        cluster.shutdown()
    out["leftovers"] = leftovers
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    print(render(out))
    return 0


def render(out: dict) -> str:
    def ms(values):
        s = summary([v * 1000 for v in values if v is not None], 1)
        return f"{s['p50']:.1f} ms (p90 {s['p90']:.1f}, max {s['max']:.1f}, n={s['n']})" if s else "-"

    lines = ["| what | local spawner | Ray, worker node (through its node agent) |", "|---|---|---|"]
    lines.append(f"| `GET /services/worker/log`, cursor, nothing new | {ms(out['poll']['local'])} | "
                 f"{ms(out['poll']['ray'])} |")
    lines.append(f"| the same, last 20 lines | {ms(out['tail']['local'])} | {ms(out['tail']['ray'])} |")
    c = out["catch_up"]
    lines.append("| a backlog read to its end in 256 KiB chunks | " + " | ".join(
        f"{c[k]['mb_per_s']:.0f} MB/s ({c[k]['bytes'] / 1e6:.1f} MB, {c[k]['chunks']} chunks)" if k in c else "-"
        for k in ("local", "ray")) + " |")
    for key, what in (("detected_s", "`tron drill kill`: fault sent -> detected"),
                      ("recovery_s", "`tron drill kill`: fault sent -> healthy (the drill's figure)")):
        lines.append(f"| {what} | {ms([d[key] for d in out['drills']['local']])} | "
                     f"{ms([d[key] for d in out['drills']['ray']])} |")
    lines.append(f"| kill -9 from the benchmark's process -> new incarnation answers /health | "
                 f"{ms([d['recovery_s'] for d in out['direct']['local']])} | "
                 f"{ms([d['recovery_s'] for d in out['direct']['ray']])} |")
    verdicts = {k: [d["verdict"] for d in v] for k, v in out["drills"].items()}
    lines.append(f"\nverdicts {verdicts}; load {out['load']}; leftovers {out['leftovers']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
