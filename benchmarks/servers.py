"""Real servers from Debian under Tron (issue 10): redis, nginx and PostgreSQL, per server.

One mesh, started from the shipped example ``examples/servers/mesh.toml`` exactly as
tests/integration/test_foreign.py starts it (a temporary home the postgres user can reach,
a free port offset), under the shipped default policy (mesh.toml, nothing overridden).
Measured, per server:

- cold start: Tron's ``spawned`` event -> the session's ``running`` transition (its
  ``healthy_mono``), first start, both on the daemon's monotonic clock (for PostgreSQL the
  first start includes ``initdb``); and spawn -> probe passes after each kill (the
  ``cold_start`` field of the daemon's ``recovered`` event);
- kill -9 of the main process, N times, each kill of a server >= 2 s after its previous one
  and only once the incarnation has been running > min_uptime + 0.3 s: kill -> the server
  serves again from a new process tree (redis: raw ``PING`` -> ``+PONG``; nginx: ``GET /``
  -> 200; PostgreSQL: a psycopg connection and ``SELECT 1``), counted only when no process
  of the old tree still holds a listening socket on the port (nginx's workers outlive their
  master and keep answering); the daemon's own failure -> healthy (its ``recovered``
  event); and whether any process of the old tree survives the recovery
  (``tree_of(old_pid, old_incarnation, everywhere=True)``, plus the pids read before the kill);
- SIGSTOP of the main process, once: stop -> the ``alert_raised`` event (detection, its
  reason) -> serving again from a new pid; SIGCONT in a ``finally`` if the pid still exists.

    .venv/bin/python -m benchmarks.servers --kills 5 --json benchmarks/results/servers.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import psutil

from tron.common.config import Policy
from tron.scripts.stats import summary
from tron.common.processes import holds_socket
from tron.services.daemon.sockdiag import listening_inodes
from tron.common.processes import tree_of
from tests.harness import REPO, cleanup, make_mesh, server_answers, wait_for

EXAMPLE = REPO / "examples" / "servers"
NAMES = ("redis", "nginx", "postgres")
POLL = 0.005  # between serving checks: a recovery is a few hundred ms at most
# What ends one sample (a timeout of wait_for, a daemon not answering, a process gone): reported, and the run goes on.
SAMPLE_ERRORS = (AssertionError, OSError, psutil.Error, KeyError, IndexError, ValueError)


def serving(port: int, name: str) -> bool:
    return server_answers(port, name, timeout=0.5)


def old_tree_listens(port: int, old: set[int]) -> bool:
    """Does a process of the old tree still hold a listener on the port?"""
    inodes = listening_inodes(port)
    return bool(inodes) and bool(holds_socket({p for p in old if psutil.pid_exists(p)}, inodes))


def serving_from_new_tree(mesh, name: str, old: set[int]) -> bool:
    port = mesh.port(name)
    return not old_tree_listens(port, old) and serving(port, name)


def survivors_of(pid: int, incarnation: str, old: set[int]) -> list[int]:
    alive = {p.pid for p in tree_of(pid, incarnation, everywhere=True)}
    for p in old:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                alive.add(p)
        except psutil.Error:
            pass
    return sorted(alive)


def event(mesh, kind: str, incarnation: str, timeout: float = 15) -> dict:
    row = wait_for(lambda: next(iter(mesh.rows(
        "SELECT mono, payload FROM events WHERE kind = ? AND incarnation = ? ORDER BY id", (kind, incarnation))), None),
        timeout, f"the {kind} event of {incarnation}", interval=0.02)
    return {"mono": row["mono"], **json.loads(row["payload"])}


def settle(mesh, name: str, min_uptime: float, last_kill: float | None) -> None:
    """Running, healthy > min_uptime + 0.3 s by the daemon's clock, >= 2 s since the last kill."""
    def stable():
        s = mesh.service(name)
        if s["state"] != "running" or not s.get("incarnation"):
            return False
        rows = mesh.rows("SELECT healthy_mono FROM sessions WHERE incarnation = ?", (s["incarnation"],))
        return bool(rows) and rows[0]["healthy_mono"] is not None \
            and time.monotonic() - rows[0]["healthy_mono"] > min_uptime + 0.3
    wait_for(stable, 60, f"{name} stable", interval=0.05)
    if last_kill is not None:
        time.sleep(max(0.0, last_kill + 2.0 - time.monotonic()))


def incarnations(mesh) -> dict[str, str]:
    return {s["name"]: s["incarnation"] for s in mesh.status()["services"]}


def kill_once(mesh, name: str) -> dict:
    before = mesh.service(name)
    others = incarnations(mesh)
    old = {p.pid for p in tree_of(before["pid"], before["incarnation"], everywhere=True)} | {before["pid"]}
    t0 = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    wait_for(lambda: serving_from_new_tree(mesh, name, old), 60, f"{name} serving from a new tree", interval=POLL)
    back = time.monotonic() - t0
    after = wait_for(lambda: (s := mesh.service(name))["incarnation"] != before["incarnation"]
                     and s["state"] == "running" and s, 30, f"{name} running again")
    recovered = event(mesh, "recovered", after["incarnation"])
    alert = mesh.rows("SELECT reason FROM alerts WHERE incarnation = ?", (before["incarnation"],))
    survivors = survivors_of(before["pid"], before["incarnation"], old)
    now = incarnations(mesh)
    return {"kill_to_serving": back, "daemon_failure_to_healthy": recovered["seconds"],
            "cold_start": recovered["cold_start"], "old_pid": before["pid"], "new_pid": after["pid"],
            "old_tree": sorted(old), "survivors": survivors, "new_pid_in_old_tree": after["pid"] in old,
            "reason": alert[0]["reason"] if alert else None,
            "others_restarted": [n for n in now if n != name and now[n] != others.get(n)]}


def stop_once(mesh, name: str) -> dict:
    before = mesh.service(name)
    old = {p.pid for p in tree_of(before["pid"], before["incarnation"], everywhere=True)} | {before["pid"]}
    t0 = time.monotonic()
    os.kill(before["pid"], signal.SIGSTOP)
    try:
        raised = event(mesh, "alert_raised", before["incarnation"], timeout=60)
        wait_for(lambda: serving_from_new_tree(mesh, name, old), 60, f"{name} serving after SIGSTOP", interval=POLL)
        back = time.monotonic() - t0
    finally:
        if psutil.pid_exists(before["pid"]):
            try:
                os.kill(before["pid"], signal.SIGCONT)
            except ProcessLookupError:
                pass
    after = wait_for(lambda: (s := mesh.service(name))["incarnation"] != before["incarnation"]
                     and s["state"] == "running" and s, 30, f"{name} running again")
    recovered = event(mesh, "recovered", after["incarnation"])
    return {"detected_s": raised["mono"] - t0, "reason": raised["reason"], "detail": raised.get("detail"),
            "stop_to_serving": back, "daemon_failure_to_healthy": recovered["seconds"],
            "cold_start": recovered["cold_start"], "old_pid": before["pid"], "new_pid": after["pid"],
            "survivors": survivors_of(before["pid"], before["incarnation"], old)}


def first_cold_starts(mesh) -> dict[str, float]:
    out = {}
    for name in NAMES:
        spawned = mesh.rows("SELECT mono, incarnation FROM events WHERE kind = 'spawned' AND agent = ? ORDER BY id "
                            "LIMIT 1", (name,))[0]
        healthy = wait_for(lambda inc=spawned["incarnation"]: mesh.rows(
            "SELECT healthy_mono FROM sessions WHERE incarnation = ?", (inc,))[0]["healthy_mono"], 30,
            f"{name} first healthy")
        out[name] = healthy - spawned["mono"]
    return out


def versions() -> dict[str, str]:
    pg = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    cmds = {"redis": ["redis-server", "--version"], "nginx": ["nginx", "-v"],
            "postgres": [str(pg[-1]) if pg else "postgres", "--version"]}
    out = {}
    for name, cmd in cmds.items():
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            out[name] = (proc.stdout + proc.stderr).strip()
        except OSError as err:
            out[name] = f"unavailable: {err}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t_start = time.monotonic()
    out: dict = {"versions": versions(), "load": [os.getloadavg()], "kills": {n: [] for n in NAMES},
                 "sigstop": {}, "errors": []}
    root = Path(tempfile.mkdtemp(prefix="tron-bench-servers-"))
    root.chmod(0o755)  # the postgres user must reach its state directory
    services = tomllib.loads((EXAMPLE / "mesh.toml").read_text())["services"]
    mesh = make_mesh(root / "mesh", home=root / "home", services=services, fast=False)
    for script in ("nginx.sh", "postgres.sh"):
        shutil.copy(EXAMPLE / script, mesh.config.parent / script)
    (root / "mesh").chmod(0o755)
    min_uptime = mesh.policy.get("min_uptime", Policy.model_fields["min_uptime"].default)
    out["policy"] = {**mesh.policy, "min_uptime": min_uptime}
    try:
        t0 = time.monotonic()
        mesh.up()
        out["up_s"] = time.monotonic() - t0
        for name in NAMES:
            wait_for(lambda n=name: serving(mesh.port(n), n), 30, f"{name} serving")
        out["first_cold_start"] = first_cold_starts(mesh)
        last_kill: dict[str, float | None] = {n: None for n in NAMES}
        for i in range(args.kills):
            for name in NAMES:
                try:
                    settle(mesh, name, min_uptime, last_kill[name])
                    last_kill[name] = time.monotonic()
                    out["kills"][name].append(kill_once(mesh, name))
                except SAMPLE_ERRORS as err:  # one failed sample is reported, not the end of the run
                    out["errors"].append(f"kill {i + 1} of {name}: {err!r}")
        for name in NAMES:
            try:
                settle(mesh, name, min_uptime, last_kill[name])
                out["sigstop"][name] = stop_once(mesh, name)
            except SAMPLE_ERRORS as err:
                out["errors"].append(f"SIGSTOP of {name}: {err!r}")
        out["retry_reasons"] = mesh.rows("SELECT agent_id, retry_type, reason, COUNT(*) AS n FROM retry_history "
                                         "GROUP BY agent_id, retry_type, reason")
        out["crash_loop_events"] = mesh.rows("SELECT kind, agent, mono FROM events WHERE kind LIKE 'crash_loop%' "
                                             "ORDER BY id")
        out["load"].append(os.getloadavg())
    finally:
        out["leftovers"] = cleanup(mesh)
        shutil.rmtree(root, ignore_errors=True)
    out["runtime_s"] = time.monotonic() - t_start
    if args.json:  # the raw samples first: a table is only a view of them
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))
    print(render(out))
    return 0


def render(out: dict) -> str:
    def fmt(s: dict, key: str = "p50") -> str:
        return f"{s[key]:.0f}" if s else "-"

    lines = [("| server | cold start ms: first (after kills, median) | kill -> serving ms median (max), n "
              "| daemon failure -> healthy ms median (max) | old-tree survivors | SIGSTOP detected after s (reason) "
              "| SIGSTOP -> serving s |"), "|---|---|---|---|---|---|---|"]
    for name in NAMES:
        kills = out["kills"][name]
        first = out.get("first_cold_start", {}).get(name)
        cold = summary([k["cold_start"] * 1000 for k in kills], 1)
        back = summary([k["kill_to_serving"] * 1000 for k in kills], 1)
        daemon = summary([k["daemon_failure_to_healthy"] * 1000 for k in kills], 1)
        violations = sum(1 for k in kills if k["survivors"] or k["new_pid_in_old_tree"])
        stop = out["sigstop"].get(name)
        first_ms = "-" if first is None else f"{first * 1000:.0f}"
        stop_detect = f"{stop['detected_s']:.2f} ({stop['reason']})" if stop else "-"
        stop_back = f"{stop['stop_to_serving']:.2f}" if stop else "-"
        lines.append(f"| {name} | {first_ms} ({fmt(cold)}) | {fmt(back)} ({fmt(back, 'max')}), n={len(kills)} "
                     f"| {fmt(daemon)} ({fmt(daemon, 'max')}) | {violations} of {len(kills)} | {stop_detect} "
                     f"| {stop_back} |")
    lines.append(f"\nmesh up {out.get('up_s', 0):.1f} s; runtime {out.get('runtime_s', 0):.0f} s; "
                 f"load {[tuple(round(x, 2) for x in la) for la in out['load']]}; leftovers {out['leftovers']}; "
                 f"errors {out['errors'] or 'none'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
