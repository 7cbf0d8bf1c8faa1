"""A crash wave: K of N SDK agents SIGKILLed at the same instant; how soon is each healthy
again? Independent restarts should proceed in parallel, not one after another.

The mesh: llm-sim, gateway, root, architect, ``--directors`` directors and N programmers
spread over them (the built-in roles, forked from the fork server, shipped policy). After
the mesh is up and quiet, K random programmers get SIGKILL in one loop; the registry's file
is read (read-only, every 20 ms: the daemon is not asked while it restarts them) until each
has a new session that passed its health check, and each one's time is from the kill to that
session's ``healthy_mono`` (when the daemon's check of its /health passed: the moment /status
starts to say running); /status then confirms each runs again with a new pid.
Repeated ``--waves`` times, one mesh. Beside the times, the CPU each wave cost per restart:
the daemon's, the fork server's, the log pump's, the parents' (the directors, which decide)
and the new incarnations' own (fork to now), and the whole machine's from the kill until the
last was healthy: on two cores, what a wave costs in CPU bounds how fast it can be over.
Before the waves, the daemon's CPU over 5 s of the quiet mesh (its agents' beats, its probes
and housekeeping): what it spends before a wave adds to it. After them,
each restart's steps as the daemon recorded them (exit recorded, alert, restart decided,
spawned, healthy: ms from the kill), to show where a wave's time goes.

    .venv/bin/python -m benchmarks.crash_wave [--agents 100] [--kill 20] [--waves 3]
                                           [--json benchmarks/results/crash_wave.json]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import psutil

from benchmarks import finish, machine_cpu
from tron.scripts.stats import percentile
from tests.harness import REPO, cleanup, make_mesh, wait_for


def services(agents: int, directors: int) -> dict:
    base = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
    out = {k: base[k] for k in ("llm-sim", "gateway", "root", "architect")}
    for d in range(directors):
        out[f"director-{d}"] = {"role": "director", "port": 6200 + d, "parent": "architect"}
    for i in range(agents):
        out[f"programmer-{i}"] = {"role": "programmer", "port": 6300 + i, "parent": f"director-{i % directors}"}
    return out


def cpu_of(pids: dict[str, int | None]) -> dict[str, float]:
    """CPU seconds (user + system) each process has used so far; 0 for one that is gone."""
    out = {}
    for who, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[who] = t.user + t.system
        except (psutil.Error, TypeError, ValueError):
            out[who] = 0.0
    return out


IDLE_SPAN = 5.0  # s of a quiet mesh over which the daemon's CPU is measured


def helpers(status: dict) -> dict[str, int | None]:
    """The processes every restart of a wave goes through: the daemon, its fork server and
    log pump, and the parents (directors), which decide."""
    rows = {s["name"]: s for s in status["services"]}
    return {"daemon": status["daemon"]["pid"], "fork server": (status.get("fork_server") or {}).get("pid"),
            "log pump": (status.get("logs") or {}).get("pid"),
            **{n: r["pid"] for n, r in rows.items() if n.startswith("director-")}}


# A restart's steps, as the daemon recorded them (events, each at its CLOCK_MONOTONIC reading):
# the killed process recorded gone (once the loop got to it), its alert, the restart its
# parent answered carried out, the new incarnation handed its start; then healthy (its
# session's healthy_mono).
STAGES = {"session_ended": "exit recorded", "alert_raised": "alert", "child_restart": "restart decided",
          "spawned": "spawned"}


SAMPLE = 0.005  # s between two readings of the machine's CPU while a wave is watched


def wave(mesh, names: list[str], cpu: dict | None = None, poll: float = 0.02,
         stages: dict[str, list[float]] | None = None, record: dict | None = None) -> list[float]:
    """Kill ``names`` at once; ms from the kill to each one running again. ``cpu``: filled
    with the CPU ms each helper spent on the wave, and the new incarnations' own. ``stages``:
    each restart's steps (STAGES, then "healthy"), ms from the kill, appended to. ``record``:
    filled with the status the wave started from, the killed pids, the kill's and the last
    healthy's CLOCK_MONOTONIC readings (wave_timeline.py reads perf's samples between them)."""
    status = mesh.status()
    rows = {s["name"]: s for s in status["services"]}
    old = {n: rows[n]["pid"] for n in names}
    watched = helpers(status)
    before = cpu_of(watched)
    machine0 = machine_cpu()
    began = time.monotonic()
    if record is not None:
        record.update(status=status, killed=old, began=began)
    for n in names:
        os.kill(old[n], signal.SIGKILL)
    # Watched in the registry's file, read-only: nothing asks the daemon while it restarts
    # them (a /status of 109 services cost it more CPU than a restart). When each new
    # incarnation passed its health check: its session's healthy_mono, the daemon's
    # CLOCK_MONOTONIC reading, shared with this process (written a moment later: the
    # daemon records behind, registry/journal.py).
    marks = ",".join("?" * len(names))
    sql = (f"SELECT agent, MIN(healthy_mono) AS at FROM sessions WHERE healthy_mono > ? AND agent IN ({marks}) "
           "GROUP BY agent")
    healthy: dict[str, float] = {}
    deadline = began + 60
    with mesh.db() as db:
        spent = [(began, machine0)]  # (when, the machine's CPU seconds so far), every SAMPLE s
        polled = began
        while len(healthy) < len(names) and time.monotonic() < deadline:
            time.sleep(SAMPLE)
            spent.append((time.monotonic(), machine_cpu()))
            if spent[-1][0] - polled >= poll:
                polled = spent[-1][0]
                healthy = {r["agent"]: r["at"] for r in db.execute(sql, (began, *names))}
        # The whole machine's CPU from the kill until the last was healthy (the first poll at
        # or after it; the registry says so a little later, it records behind): on its cores,
        # a wave can be no shorter than this CPU spread over all of them.
        last = max(healthy.values(), default=began)
        if record is not None:
            record["last"] = last
        machine_ms = next(((c - machine0) * 1000 for t, c in spent if t >= last), (spent[-1][1] - machine0) * 1000)
        seen_ms = (last - began) * 1000
        if stages is not None:  # recorded before each healthy_mono (the journal writes in order)
            steps = f"SELECT agent, kind, MIN(mono) AS at FROM events WHERE mono > ? AND agent IN ({marks}) " \
                    f"AND kind IN ({','.join('?' * len(STAGES))}) GROUP BY agent, kind"
            for r in db.execute(steps, (began, *names, *STAGES)):
                stages.setdefault(STAGES[r["kind"]], []).append((r["at"] - began) * 1000)
            stages.setdefault("healthy", []).extend((at - began) * 1000 for at in healthy.values())
    missing = [n for n in names if n not in healthy]
    if missing:
        raise RuntimeError(f"not healthy again within 60 s: {missing}")
    # And the daemon says so too: each one running, with a new pid.
    now = {s["name"]: s for s in mesh.status()["services"]}
    wrong = [n for n in names if now[n]["state"] != "running" or now[n]["pid"] in (None, old[n])]
    if wrong:
        raise RuntimeError(f"healthy in the registry but not running again with a new pid: {wrong}")
    if cpu is not None:
        cpu["machine"], cpu["seen after"] = machine_ms, seen_ms
        after = cpu_of(watched)
        spent = {who: (after[who] - before[who]) * 1000 for who in watched}
        cpu["daemon"] = spent.pop("daemon")
        cpu["fork server"] = spent.pop("fork server")
        cpu["log pump"] = spent.pop("log pump")
        cpu["parents"] = sum(spent.values())
        fresh = {s["name"]: s["pid"] for s in now.values() if s["name"] in old}
        cpu["new incarnations"] = sum(cpu_of(fresh).values()) * 1000
    return [(healthy[n] - began) * 1000 for n in names]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.crash_wave")
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--kill", type=int, default=20)
    ap.add_argument("--directors", type=int, default=5)
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    samples: list[list[float]] = []
    cpus: list[dict[str, float]] = []
    machines: list[tuple[float, float]] = []  # per wave: the machine's CPU ms until the last was healthy, and when
    stages: dict[str, list[float]] = {}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tron-wave-") as tmp:
        mesh = make_mesh(Path(tmp), services=services(args.agents, args.directors), fast=False,
                         policy={"start_timeout": 120.0})
        try:
            began = time.monotonic()
            mesh.tron("up", "--detach", timeout=300, check=True)
            up = time.monotonic() - began
            print(f"  {args.agents + args.directors + 4} services up in {up:.1f}s", file=sys.stderr)
            programmers = [f"programmer-{i}" for i in range(args.agents)]
            # The steady state: the fork server's warm heir serves (WARM_AFTER_UP s after up).
            wait_for(lambda: (mesh.status().get("fork_server") or {"warm": True})["warm"], 300, "the fork server warm")
            # What the quiet mesh costs the daemon (its beats, probes, housekeeping), the room a wave starts from.
            time.sleep(3)
            daemon = {"daemon": mesh.status()["daemon"]["pid"]}
            before = cpu_of(daemon)["daemon"]
            time.sleep(IDLE_SPAN)
            idle_ms = (cpu_of(daemon)["daemon"] - before) * 1000 / IDLE_SPAN
            print(f"  the quiet mesh: daemon CPU {idle_ms:.0f} ms per second", file=sys.stderr)
            for w in range(args.waves):
                time.sleep(3)  # quiet: the previous wave's restarts are over
                wait_for(lambda: all(s["state"] == "running" for s in mesh.status()["services"]), 60, "all running")
                cpu: dict[str, float] = {}
                ms = wave(mesh, rng.sample(programmers, args.kill), cpu, stages=stages)
                samples.append(ms)
                cpus.append(cpu)
                machine, seen = cpu.pop("machine"), cpu.pop("seen after")
                machines.append((machine, seen))
                print(f"  wave {w + 1}: median {percentile(ms, 0.5):.0f} ms, max {max(ms):.0f} ms; the machine's CPU "
                      f"until the last was healthy ({seen:.0f} ms): {machine:.0f} ms; CPU ms per restart: "
                      + ", ".join(f"{k} {v / args.kill:.1f}" for k, v in cpu.items()), file=sys.stderr)
        finally:
            leftovers = cleanup(mesh)
    flat = [x for s in samples for x in s]
    print(f"{args.kill} of {args.agents} agents SIGKILLed at once, {args.waves} waves ({os.cpu_count()} cores): "
          f"kill -> running again: median {percentile(flat, 0.5):.0f} ms, p90 {percentile(flat, 0.9):.0f} ms, "
          f"max {max(flat):.0f} ms; load {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print("each restart's steps, ms from the kill (median / max): " + ", ".join(
        f"{k} {percentile(stages[k], 0.5):.0f} / {max(stages[k]):.0f}" for k in [*STAGES.values(), "healthy"]
        if stages.get(k)))
    cores = os.cpu_count() or 1
    print(f"the machine's CPU from the kill until the last was healthy, median of waves: "
          f"{percentile([m for m, _ in machines], 0.5):.0f} ms in {percentile([s for _, s in machines], 0.5):.0f} ms "
          f"(spread over {cores} cores: {percentile([m for m, _ in machines], 0.5) / cores:.0f} ms at the least; "
          f"read every {SAMPLE * 1000:.0f} ms, in ticks of {1000 / os.sysconf('SC_CLK_TCK'):.0f} ms)")
    print(f"daemon CPU with the mesh quiet: {idle_ms:.0f} ms per second")
    print("CPU ms per restart (all waves): " + ", ".join(
        f"{k} {sum(c[k] for c in cpus) / (args.kill * len(cpus)):.1f}" for k in cpus[0]))
    return finish(args.json, {"up_s": up, "waves_ms": samples, "cpu_ms": cpus, "idle_daemon_ms_per_s": idle_ms,
                              "stages_ms": stages, "machine_cpu_ms": machines},
                  leftovers)


if __name__ == "__main__":
    sys.exit(main())
