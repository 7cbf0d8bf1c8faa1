"""Where one agent's restart spends its time: kill -> healthy, stage by stage.

The default mesh (fork server, shipped policy). Each kill is a SIGKILL of an agent whose
parent is an agent too (so the whole path runs: the daemon alerts the parent over HTTP,
the parent reads its view and asks the daemon to restart), then /health is polled every
2 ms until a new pid answers. The stages come from the logs every process writes (their
``ts``, wall clock in ms, shared by every process on the machine):

    exited      the daemon saw the process end (its pidfd)          daemon.log "process exited"
    alerted     the alert is persisted                               daemon.log "alert"
    received    the parent has the alert                             comms.jsonl "alert_received"
    decided     the parent decided (after reading its view)          <parent>.log "decision"
    restarting  the daemon took the restart, the old tree is gone    daemon.log "... -> starting"
    spawned     a standby took the spawn (or the fork server forked)  daemon.log "spawned"
    serving     the new incarnation listens                          <agent>.log "serving"
    healthy     its first beat, or its /health, reached the daemon   daemon.log "... -> running"
    seen        this script's own /health poll saw the new pid

    .venv/bin/python -m benchmarks.restart_path [--kills 20] [--json benchmarks/results/restart_path.json]

It reads only log lines that existing code writes, so the same file measures an older
checkout too: ``cd OLD && PYTHONPATH=$PWD /path/to/.venv/bin/python /path/to/benchmarks/restart_path.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from benchmarks import finish
from tron.scripts.stats import percentile
from tests.harness import cleanup, make_mesh, wait_for

AGENTS = ["programmer-1", "director-code", "programmer-2", "director-docs", "architect"]
STAGES = ["exited", "alerted", "received", "decided", "restarting", "spawned", "serving", "healthy", "seen"]


def lines(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "ts" in row:
            row["_t"] = datetime.fromisoformat(row["ts"].replace("Z", "+00:00")).timestamp()
            out.append(row)
    return out


def first(rows: list[dict], after: float, until: float, match) -> float | None:
    # ts has ms precision: a line of the same millisecond as the kill counts as after it.
    return next((r["_t"] for r in rows if after - 0.001 <= r["_t"] <= until and match(r)), None)


def stages(logs: Path, name: str, parent: str, killed: float, seen: float) -> dict:
    daemon, comms = lines(logs / "daemon.log"), lines(logs / "comms.jsonl")
    own, boss = lines(logs / f"{name}.log"), lines(logs / f"{parent}.log")
    until = seen + 1.0
    at = {
        "exited": first(daemon, killed, until, lambda r: r["msg"] == "process exited" and r.get("offender") == name),
        "alerted": first(daemon, killed, until, lambda r: r["msg"] == "alert" and r.get("offender") == name),
        "received": first(comms, killed, until, lambda r: r.get("kind") == "alert_received" and r.get("agent") == name),
        "decided": first(boss, killed, until, lambda r: r["msg"] == "decision" and r.get("offender") == name),
        "restarting": first(daemon, killed, until,
                            lambda r: r["msg"].endswith("-> starting") and r.get("offender") == name),
        "spawned": first(daemon, killed, until, lambda r: r["msg"] == "spawned" and r.get("offender") == name),
        "serving": first(own, killed, until, lambda r: r["msg"] == "serving"),
        "healthy": first(daemon, killed, until, lambda r: r["msg"].endswith("-> running") and r.get("offender") == name),
        "seen": seen,
    }
    return {k: None if v is None else round((v - killed) * 1000, 1) for k, v in at.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.restart_path")
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs in all, rotating over five agents")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    samples: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tron-path-") as tmp:
        mesh = make_mesh(Path(tmp), fast=False)
        parents = {n: s["parent"] for n, s in mesh.spec["services"].items() if "parent" in s}
        try:
            mesh.up()
            # The steady state: the fork server's warm heir serves (WARM_AFTER_UP s after up).
            wait_for(lambda: (mesh.status().get("fork_server") or {"warm": True})["warm"], 120, "the fork server warm")
            time.sleep(1)
            for i in range(args.kills):
                name = AGENTS[i % len(AGENTS)]
                old = mesh.service(name)["pid"]
                killed = time.time()
                os.kill(old, signal.SIGKILL)
                wait_for(lambda: (h := mesh.health(name)) and h["pid"] != old, 60, f"{name} back", interval=0.002)
                seen = time.time()
                # The next kill finds a quiet mesh: its log lines are written, and the standby
                # of its next start is in place (made half a second after a start, it would
                # otherwise be made during the next kill's restart, on the same two cores).
                # (Code from before standbys, run with --baseline-style PYTHONPATH: half a second.)
                standby = getattr(mesh, "standby", None)
                deadline = time.monotonic() + (5.0 if standby else 0.5)
                while (standby is None or standby(name) is None) and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.2)
                samples.append({"service": name, **stages(mesh.home / "logs", name, parents[name], killed, seen)})
        finally:
            leftovers = cleanup(mesh)
    print(f"{len(samples)} SIGKILLs over {', '.join(AGENTS)}; shipped policy, fork server; "
          f"load {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'stage':<11} {'since kill, median':>18} {'p90':>6} {'stage alone, median':>20}")
    previous = None
    for stage in STAGES:
        xs = [s[stage] for s in samples if s[stage] is not None]
        if not xs:
            print(f"{stage:<11} {'-':>18}")
            continue
        gaps = [s[stage] - s[previous] for s in samples if previous and s[stage] is not None
                and s[previous] is not None]
        alone = f"{percentile(gaps, 0.5):.1f}" if gaps else "-"
        print(f"{stage:<11} {percentile(xs, 0.5):>15.1f} ms {percentile(xs, 0.9):>6.1f} {alone:>17} ms")
        previous = stage
    return finish(args.json, {"samples": samples}, leftovers)


if __name__ == "__main__":
    sys.exit(main())
