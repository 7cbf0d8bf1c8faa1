"""Where a crash wave's CPU goes, process by process and 10 ms by 10 ms: every CPU of the
machine sampled by ``perf`` (``perf record -a``, CLOCK_MONOTONIC, so its samples line up with
the daemon's clock) over crash waves run as ``crash_wave.py`` runs them (its mesh, its kill,
its registry read), and each sample between the kill and the last restart's health check
charged to who ran: the daemon's loop (its main thread) and its other threads, the killed
agents (the kernel tearing their memory down before their exit is known), the new
incarnations, the parents that decide (directors), the fork server, its standbys, the log
pump, the agents still running, this benchmark, ``perf`` itself, the kernel's own threads,
and idle. User and kernel time apart.

Wall time is noisy on shared machines; the CPU each part spends in the window is much less
so, and says what a change to one of them can win: on two cores a wave cannot be over
sooner than the CPU spent in it, spread over both, and idle time says how far the parts
wait on each other instead.

Needs ``perf`` (Debian: ``apt-get install linux-perf``) and the right to sample every CPU
(root, or ``kernel.perf_event_paranoid`` <= 0). Sampling costs a little CPU of its own
(``perf`` is shown): compare runs made the same way.

    .venv/bin/python -m benchmarks.wave_timeline [--agents 100] [--kill 20] [--waves 4]
                                                 [--freq 4000] [--json benchmarks/results/wave_timeline.json]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks import finish
from benchmarks.crash_wave import helpers, services, wave
from tests.harness import cleanup, make_mesh, wait_for

BUCKET = 0.010  # s: the timeline's step
KERNEL = 0xFFFF800000000000  # an instruction pointer at or above this is the kernel's (x86-64, arm64)
SAMPLE = re.compile(r"^\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):\s+([0-9a-f]+)")
# The timeline's columns: a letter per group of roles.
COLUMNS = {"D": ("daemon loop",), "d": ("daemon threads",), "K": ("killed (teardown)",),
           "N": ("new incarnations",), "P": ("parents",), "i": ("idle",)}


def perf_usable() -> str | None:
    """Why perf cannot sample this machine's CPUs here; None when it can."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: apt-get install linux-perf)"
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run(["perf", "record", "-a", "-k", "CLOCK_MONOTONIC", "-o", f"{tmp}/probe.data", "--",
                                "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"perf cannot sample every CPU here: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def roles_before(status: dict, killed: dict[str, int]) -> tuple[dict[int, str], dict[int, str]]:
    """pid -> role of the mesh's processes as the wave starts, and the daemon's tid -> role."""
    pids: dict[int, str] = {}
    for name, pid in helpers(status).items():
        if pid:
            pids[pid] = "parents" if name.startswith("director-") else name
    for row in status["services"]:
        if row["pid"] and row["pid"] not in pids:
            pids[row["pid"]] = "agents running" if row["name"].startswith("programmer-") else "other services"
    for pid in killed.values():
        pids[pid] = "killed (teardown)"
    daemon = status["daemon"]["pid"]
    tids = {int(t): "daemon loop" if int(t) == daemon else "daemon threads" for t in os.listdir(f"/proc/{daemon}/task")}
    pids[os.getpid()] = "benchmark"
    return pids, tids


def roles_after(pids: dict[int, str], status: dict, names: list[str], home: str) -> None:
    """The new incarnations (the services' pids now), and the fork server's new standbys."""
    for row in status["services"]:
        if row["name"] in names and row["pid"]:
            pids[row["pid"]] = "new incarnations"
    for proc in psutil.process_iter(["pid", "environ"]):
        try:
            if proc.pid not in pids and (proc.info["environ"] or {}).get("TRON_HOME") == home:
                pids[proc.pid] = "standbys"
        except psutil.Error:
            continue


def other(comm: str) -> str:
    """A process of no role, by its name without the per-CPU or per-queue part (``kworker/1:0H-kblockd``:
    ``kworker``): kernel threads, ``perf``, anything else the machine runs."""
    return re.split(r"[/:-]", comm, maxsplit=1)[0] or comm


def charge(data: Path, began: float, last: float, pids: dict[int, str], tids: dict[int, str],
           freq: int) -> tuple[dict[str, float], list[collections.Counter[str]]]:
    """ms of CPU per role (" [k]" for the kernel's part) between the kill and ``last``, and
    the samples per role in each BUCKET from the kill."""
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,pid,tid,time,ip"], capture_output=True,
                            text=True, check=True).stdout
    spent: collections.Counter[str] = collections.Counter()
    buckets: list[collections.Counter[str]] = [collections.Counter()
                                               for _ in range(int((last - began) / BUCKET) + 1)]
    for line in script.splitlines():
        m = SAMPLE.match(line)
        if m is None:
            continue
        t = float(m.group(4))
        if not began <= t <= last:
            continue
        pid, tid = int(m.group(2)), int(m.group(3))
        role = "idle" if pid == 0 else tids.get(tid) or pids.get(pid) or f"other: {other(m.group(1))}"
        kernel = pid != 0 and int(m.group(5), 16) >= KERNEL
        spent[role + (" [k]" if kernel else "")] += 1
        buckets[int((t - began) / BUCKET)][role] += 1
    return {k: v * 1000 / freq for k, v in spent.items()}, buckets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.wave_timeline")
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--kill", type=int, default=20)
    ap.add_argument("--directors", type=int, default=5)
    ap.add_argument("--waves", type=int, default=4)
    ap.add_argument("--freq", type=int, default=4000, help="samples per second per CPU")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    why = perf_usable()
    if why:
        print(f"wave_timeline: {why}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    waves: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tron-timeline-") as tmp:
        mesh = make_mesh(Path(tmp), services=services(args.agents, args.directors), fast=False,
                         policy={"start_timeout": 120.0})
        try:
            mesh.tron("up", "--detach", timeout=300, check=True)
            wait_for(lambda: (mesh.status().get("fork_server") or {"warm": True})["warm"], 300, "the fork server warm")
            programmers = [f"programmer-{i}" for i in range(args.agents)]
            for w in range(args.waves):
                time.sleep(3)  # quiet: the previous wave's restarts are over
                wait_for(lambda: all(s["state"] == "running" for s in mesh.status()["services"]), 60, "all running")
                data = Path(tmp) / f"wave{w}.data"
                perf = subprocess.Popen(["perf", "record", "-a", "-k", "CLOCK_MONOTONIC", "-F", str(args.freq),
                                         "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    time.sleep(0.5)  # perf is sampling
                    names = rng.sample(programmers, args.kill)
                    marks: dict = {}
                    ms = wave(mesh, names, record=marks)
                    time.sleep(0.05)
                finally:
                    perf.send_signal(signal.SIGINT)
                    perf.wait(60)
                pids, tids = roles_before(marks["status"], marks["killed"])
                roles_after(pids, mesh.status(), names, str(mesh.home))
                spent, buckets = charge(data, marks["began"], marks["last"], pids, tids, args.freq)
                window = (marks["last"] - marks["began"]) * 1000
                waves.append({"window_ms": window, "median_ms": statistics.median(ms), "spent_ms": spent,
                              "timeline": [dict(b) for b in buckets]})
                busy = sum(v for k, v in spent.items() if k != "idle")
                print(f"  wave {w + 1}: all back in {window:.0f} ms (median {statistics.median(ms):.0f}); CPU in it "
                      f"{busy:.0f} ms, idle {spent.get('idle', 0):.0f} ms", file=sys.stderr)
        finally:
            leftovers = cleanup(mesh)
    report(waves, args)
    return finish(args.json, {"waves": waves, "freq": args.freq}, leftovers)


def report(waves: list[dict], args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    windows = [w["window_ms"] for w in waves]
    print(f"{args.kill} of {args.agents} agents SIGKILLed at once, {len(waves)} waves, {cores} cores, perf at "
          f"{args.freq} Hz: all back in (median) {statistics.median(windows):.0f} ms")
    roles = sorted({k for w in waves for k in w["spent_ms"]},
                   key=lambda k: -statistics.median(w["spent_ms"].get(k, 0.0) for w in waves))
    print("CPU ms from the kill until the last was healthy, median of waves (per restart):")
    for role in roles:
        med = statistics.median(w["spent_ms"].get(role, 0.0) for w in waves)
        if med >= 0.5:
            print(f"  {med:7.1f} ({med / args.kill:5.2f})  {role}")
    busy = statistics.median(sum(v for k, v in w["spent_ms"].items() if k != "idle") for w in waves)
    print(f"  busy {busy:.0f} ms: on {cores} cores no shorter than {busy / cores:.0f} ms")
    # The median wave's timeline: what ran, 10 ms at a time (samples per bucket; all cores).
    wave = sorted(waves, key=lambda w: w["window_ms"])[len(waves) // 2]
    full = args.freq * BUCKET * cores
    print(f"the median wave ({wave['window_ms']:.0f} ms), each {BUCKET * 1000:.0f} ms: share of the machine's CPU "
          "(D daemon loop, d its threads, K killed, N new incarnations, P parents, o others, i idle)")
    for n, bucket in enumerate(wave["timeline"]):
        known = {c: sum(bucket.get(r, 0) for r in rs) for c, rs in COLUMNS.items()}
        known["o"] = sum(bucket.values()) - sum(known.values())
        print(f"  {n * BUCKET * 1000:4.0f} ms " + " ".join(f"{c} {100 * known[c] / full:3.0f}%"
                                                          for c in ("D", "d", "K", "N", "P", "o", "i")))


if __name__ == "__main__":
    sys.exit(main())
