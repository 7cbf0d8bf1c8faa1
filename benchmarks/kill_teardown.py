"""What the kernel spends ending a SIGKILLed agent, before anyone can know it died.

A process's pidfd turns readable only once the kernel has torn its memory down (exit_mm
comes before the exit is signalled). An agent forked from the warm fork server maps the
server's whole heap (the agent code, aiohttp, pydantic and the LLM SDKs: ~100 MB), so its
page tables are the server's size, and they are torn down at its death, on whichever
core is free: in a crash wave, twenty of them at once, beside the restarts.

Here a parent loads what the warm fork server loads (forkserver.PRELOAD, then the SDKs'
warm-up), freezes its heap for the GC as the server does, and forks children that touch
their objects (as a running agent does, with its reference counts) and wait. Measured:
kill -> pidfd readable, one at a time (median), and ``--wave`` children killed in one loop
(until the first and until the last is gone), with the machine's CPU time over the wave.
Beside it, the same for the children of a bare interpreter (nothing imported).

    .venv/bin/python -m benchmarks.kill_teardown [--kills 30] [--wave 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import finish
from tests.harness import REPO

CHILD = r"""
import gc, importlib, json, os, select, signal, sys, time
from benchmarks import machine_cpu  # the machine's CPU seconds so far
heavy = sys.argv[1] in ("heavy", "huge")
if heavy:
    from tron.services.daemon.forkserver import PRELOAD
    for name in PRELOAD:
        importlib.import_module(name)
    from tron.common.providers.client import warm_up
    warm_up()
gc.freeze()
if sys.argv[1] == "huge":  # as the fork server does (hugepages.py)
    from tron.services.daemon.hugepages import collapse
    collapse()
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


def fork_waiting():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        # What a standby does before it waits (and so every agent forked from the server):
        # its start rehearsed, which writes into the pages an agent's start touches.
        if heavy:
            from tron.services.daemon.forkserver import _rehearse
            _rehearse(MESH, "programmer-1")
        for o in gc.get_objects():  # and its reference counts touch the objects it made
            pass
        os.write(w, b"x")
        signal.pause()
        os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    return pid, os.pidfd_open(pid)


def gone(fds):
    left, at = set(fds), {}
    while left:
        for fd in select.select(list(left), [], [])[0]:
            at[fd] = time.perf_counter()
            left.discard(fd)
    return at


kills, wave, MESH = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
one = []
for _ in range(kills):
    pid, fd = fork_waiting()
    time.sleep(0.02)
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    one.append((gone([fd])[fd] - t0) * 1000)
    os.close(fd)
    os.waitpid(pid, 0)
children = [fork_waiting() for _ in range(wave)]
time.sleep(0.2)
b0, t0 = machine_cpu(), time.perf_counter()
for pid, _ in children:
    os.kill(pid, signal.SIGKILL)
at = gone([fd for _, fd in children])
spent = (machine_cpu() - b0) * 1000
for pid, fd in children:
    os.close(fd)
    os.waitpid(pid, 0)
print(json.dumps({"rss_mb": rss, "one_ms": one, "wave_first_ms": (min(at.values()) - t0) * 1000,
                  "wave_last_ms": (max(at.values()) - t0) * 1000, "wave_cpu_ms": spent}))
"""


NAMES = {"bare": "a bare interpreter", "heavy": "the warm fork server's heap, 4 KiB pages",
         "huge": "the same in huge pages (shipped: hugepages.py)"}


def run(kind: str, kills: int, wave: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(kills), str(wave), str(REPO / "mesh.toml")],
                         capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"{kind}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kill_teardown")
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--wave", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="each kind measured this many times, taking turns")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results: dict[str, list[dict]] = {"bare": [], "heavy": [], "huge": []}
    for _ in range(args.rounds):
        for kind in results:
            results[kind].append(run(kind, args.kills, args.wave))
    print(f"SIGKILL -> pidfd readable ({os.cpu_count()} cores), {args.rounds} rounds taking turns, medians:")
    print("| child of | its RSS | one kill | a wave of %d: first gone | last gone | machine CPU for the wave |"
          % args.wave)
    print("|---|---|---|---|---|---|")
    for kind, rounds in results.items():
        med = statistics.median
        print(f"| {NAMES[kind]} "
              f"| {med(r['rss_mb'] for r in rounds):.0f} MB "
              f"| {med(x for r in rounds for x in r['one_ms']):.2f} ms "
              f"| {med(r['wave_first_ms'] for r in rounds):.1f} ms | {med(r['wave_last_ms'] for r in rounds):.1f} ms "
              f"| {med(r['wave_cpu_ms'] for r in rounds):.0f} ms |")
    gc.collect()
    return finish(args.json, results, [])


if __name__ == "__main__":
    sys.exit(main())
