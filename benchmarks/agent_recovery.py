"""Kill-and-recover of our own agents on a real mesh, at the default detection settings.

For each kill: SIGKILL (or SIGSTOP) an agent, then poll its /health every 5 ms until a new
pid answers on the same port. Kill-to-detected and kill-to-spawned come from the
registry's events (CLOCK_MONOTONIC is shared by every process on the machine); the cold
start of the new incarnation (spawn to /health) comes from the daemon's 'recovered'
event. The restart window is made tiny so repeated kills never escalate and the
first-restart-is-immediate rule applies to each.

    python benchmarks/agent_recovery.py [--kills N] [--stops N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.harness import cleanup, make_mesh, wait_for  # noqa: E402

AGENTS = ["gateway", "root", "architect", "director-code", "programmer-1"]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def event_after(mesh, kind: str, agent: str, after: float) -> dict:
    rows = mesh.rows("SELECT mono, payload FROM events WHERE kind = ? AND agent = ? AND mono > ? ORDER BY id LIMIT 1",
                     (kind, agent, after))
    return rows[0] if rows else None


def one(mesh, name: str, sig: int) -> dict:
    old = mesh.service(name)["pid"]
    t0 = time.monotonic()
    os.kill(old, sig)
    fresh = wait_for(lambda: (h := mesh.health(name)) and h["pid"] != old and h, 60, f"{name} back", interval=0.005)
    t_healthy = time.monotonic()
    alert = wait_for(lambda: event_after(mesh, "alert_raised", name, t0), 5, "alert event")
    spawned = wait_for(lambda: event_after(mesh, "spawned", name, t0), 5, "spawn event")
    recovered = wait_for(lambda: event_after(mesh, "recovered", name, t0), 5, "recovered event")
    if sig == signal.SIGSTOP:
        try:
            os.kill(old, signal.SIGCONT)
        except ProcessLookupError:
            pass
    return {
        "service": name, "signal": signal.Signals(sig).name, "new_pid": fresh["pid"],
        "kill_to_detected": alert["mono"] - t0,
        "kill_to_spawned": spawned["mono"] - t0,
        "kill_to_healthy": t_healthy - t0,
        "cold_start": json.loads(recovered["payload"])["cold_start"],
    }


def summarise(samples: list[dict], key: str) -> str:
    v = [s[key] for s in samples]
    return f"{statistics.median(v) * 1000:.0f} ms (p90 {pct(v, 90) * 1000:.0f})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=4, help="SIGKILLs per agent")
    ap.add_argument("--stops", type=int, default=5, help="SIGSTOPs of programmer-2")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mesh = make_mesh(Path(tmp), fast=False, policy={"max_restarts": 100, "restart_window": 0.001})
        try:
            mesh.up()
            samples = []
            for _ in range(args.kills):
                for name in AGENTS:
                    samples.append(one(mesh, name, signal.SIGKILL))
                    time.sleep(0.3)  # let the new incarnation finish its SDK import
            stops = [one(mesh, "programmer-2", signal.SIGSTOP) for _ in range(args.stops)]
        finally:
            leaks = cleanup(mesh)
    print(f"SIGKILL, {len(samples)} kills over {', '.join(AGENTS)}:")
    for key in ("kill_to_detected", "kill_to_spawned", "cold_start", "kill_to_healthy"):
        print(f"  {key:<17} {summarise(samples, key)}")
    overhead = [s["kill_to_healthy"] - s["cold_start"] for s in samples]
    print(f"  daemon overhead   {statistics.median(overhead) * 1000:.0f} ms (kill_to_healthy - cold_start)")
    print(f"SIGSTOP of programmer-2, {len(stops)} stops, beat timeout {mesh.policy['heartbeat_interval']} s x "
          f"{mesh.policy['miss_threshold']}:")
    for key in ("kill_to_detected", "kill_to_healthy"):
        print(f"  {key:<17} {summarise(stops, key)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"sigkill": samples, "sigstop": stops}, indent=2))
    if leaks:
        print(f"LEFT BEHIND: {leaks}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
