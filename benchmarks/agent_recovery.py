"""Kill-and-recover of our own agents on real meshes under the shipped default policy: the
fork server against a plain spawn, side by side (two meshes up at once, kills alternating
between them, so the machine's noise lands on both).

For each kill: SIGKILL (or SIGSTOP) an agent, then poll its /health every 5 ms until a new
pid answers on the same port. Kill-to-detected and kill-to-spawned come from the
registry's events (CLOCK_MONOTONIC is shared by every process on the machine); the cold
start of the new incarnation (spawn to /health) comes from the daemon's 'recovered'
event. The policy is mesh.toml's, nothing overridden: the kills rotate over five agents,
so each agent is killed about every 15 s, long after it has been healthy for min_uptime,
and each failure is restarted at once. Killed that often, an agent counts as
crash-looping (3 failures in 60 s): that changes nothing for a stable incarnation, and
the episodes are counted in the report.

    .venv/bin/python -m benchmarks.agent_recovery [--kills N] [--stops N] [--json FILE]

Note on "cold start": for a forked agent it is fork-to-/health; for a plain spawn it is
exec-to-/health including imports (the SDKs load in a background thread after /health
answers, so they are not in it).
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

from benchmarks import finish
from tron.scripts.stats import percentile, summary
from tests.harness import cleanup, make_mesh, wait_for

AGENTS = ["gateway", "root", "architect", "director-code", "programmer-1"]


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
    st = summary([s[key] for s in samples])
    return f"{st['p50'] * 1000:.0f} ms (p90 {st['p90'] * 1000:.0f}, max {st['max'] * 1000:.0f})"


def lifecycle(mesh) -> dict:
    """What the service lifecycle made of the kills: crash-loop episodes, failures of
    incarnations that were never stable, and the longest restart delay decided."""
    delays = [json.loads(r["detail"]).get("delay", 0.0) for r in
              mesh.rows("SELECT detail FROM retry_history WHERE retry_type = 'child_restart'")]
    def count(sql: str) -> int:
        return mesh.rows(sql)[0]["n"]

    return {"crash_loop_episodes": count("SELECT COUNT(*) AS n FROM events WHERE kind = 'crash_loop_started'"),
            "crash_loop_escalation_rows": count("SELECT COUNT(*) AS n FROM retry_history WHERE retry_type = "
                                                "'escalation' AND reason = 'crash_looping'"),
            "failures": count("SELECT COUNT(*) AS n FROM alerts"),
            "unstable_failures": count("SELECT COUNT(*) AS n FROM alerts WHERE stable = 0"),
            "max_restart_delay": max(delays, default=0.0)}


def report(label: str, samples: list[dict], stops: list[dict], policy: dict, life: dict) -> None:
    print(f"{label}: SIGKILL, {len(samples)} kills over {', '.join(AGENTS)}")
    for key in ("kill_to_detected", "kill_to_spawned", "cold_start", "kill_to_healthy"):
        print(f"  {key:<17} {summarise(samples, key)}")
    overhead = [s["kill_to_healthy"] - s["cold_start"] for s in samples]
    print(f"  lifecycle         {life['failures']} failures ({life['unstable_failures']} unstable), longest restart "
          f"delay {life['max_restart_delay']:.2f} s, {life['crash_loop_episodes']} crash-loop episodes "
          f"({life['crash_loop_escalation_rows']} escalation rows)")
    print(f"  daemon overhead   {percentile(overhead, 0.5) * 1000:.0f} ms (kill_to_healthy - cold_start)")
    if stops:
        print(f"{label}: SIGSTOP of programmer-2, {len(stops)} stops, beat timeout {policy['heartbeat_interval']} s x "
              f"{policy['miss_threshold']}")
        for key in ("kill_to_detected", "kill_to_healthy"):
            print(f"  {key:<17} {summarise(stops, key)}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=4, help="SIGKILLs per agent and per mesh")
    ap.add_argument("--stops", type=int, default=5, help="SIGSTOPs of programmer-2 (fork-server mesh)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain SIGTERM still runs the cleanup below
    load0 = os.getloadavg()[0]
    results = {"fork": [], "plain": []}
    leaks = []
    with tempfile.TemporaryDirectory() as tmp:
        meshes = {"fork": make_mesh(Path(tmp) / "fork", fast=False),
                  "plain": make_mesh(Path(tmp) / "plain", fast=False)}
        cfg = meshes["plain"].config
        cfg.write_text(cfg.read_text().replace("[mesh]\n", "[mesh]\nfork_server = false\n"))
        try:
            for m in meshes.values():
                m.up()
            time.sleep(3)  # plain-spawned agents load the SDKs in the background after /health
            for _ in range(args.kills):
                for name in AGENTS:
                    for mode, m in meshes.items():
                        results[mode].append(one(m, name, signal.SIGKILL))
                        time.sleep(0.3 if mode == "fork" else 2.5)  # let the new incarnation settle
            stops = [one(meshes["fork"], "programmer-2", signal.SIGSTOP) for _ in range(args.stops)]
            life = {mode: lifecycle(m) for mode, m in meshes.items()}
        finally:
            for m in meshes.values():
                leaks += cleanup(m)
    print(f"shipped default policy; load {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    report("fork server", results["fork"], stops, meshes["fork"].policy, life["fork"])
    report("plain spawn", results["plain"], [], meshes["plain"].policy, life["plain"])
    f = percentile([s["kill_to_healthy"] for s in results["fork"]], 0.5)
    p = percentile([s["kill_to_healthy"] for s in results["plain"]], 0.5)
    print(f"kill_to_healthy median: fork {f * 1000:.0f} ms vs plain {p * 1000:.0f} ms (ratio {f / p:.2f})")
    return finish(args.json, {"policy": meshes["fork"].policy, "loadavg": [load0, os.getloadavg()[0]],
                              "lifecycle": life, "fork": results["fork"], "plain": results["plain"],
                              "sigstop": stops}, leaks)


if __name__ == "__main__":
    sys.exit(main())
