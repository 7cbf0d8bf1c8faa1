"""A crash wave: K of N SDK agents SIGKILLed at the same instant; how soon is each healthy
again? Independent restarts should proceed in parallel, not one after another.

The mesh: llm-sim, gateway, root, architect, ``--directors`` directors and N programmers
spread over them (the built-in roles, forked from the fork server, shipped policy). After
the mesh is up and quiet, K random programmers get SIGKILL in one loop; the daemon's
``/status`` is polled every 5 ms, and each one's time is from the kill to the first status
that shows it running with a new pid (running = its new incarnation answered /health).
Repeated ``--waves`` times, one mesh.

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

from benchmarks import finish
from scripts.stats import percentile
from tests.harness import REPO, cleanup, make_mesh, wait_for


def services(agents: int, directors: int) -> dict:
    base = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
    out = {k: base[k] for k in ("llm-sim", "gateway", "root", "architect")}
    for d in range(directors):
        out[f"director-{d}"] = {"role": "director", "port": 6200 + d, "parent": "architect"}
    for i in range(agents):
        out[f"programmer-{i}"] = {"role": "programmer", "port": 6300 + i, "parent": f"director-{i % directors}"}
    return out


def wave(mesh, names: list[str]) -> list[float]:
    rows = {s["name"]: s for s in mesh.status()["services"]}
    old = {n: rows[n]["pid"] for n in names}
    began = time.monotonic()
    for n in names:
        os.kill(old[n], signal.SIGKILL)
    back: dict[str, float] = {}
    deadline = began + 60
    while len(back) < len(names) and time.monotonic() < deadline:
        now = time.monotonic()
        for s in mesh.status()["services"]:
            if s["name"] in old and s["name"] not in back and s["state"] == "running" and s["pid"] \
                    and s["pid"] != old[s["name"]]:
                back[s["name"]] = now - began
        time.sleep(0.005)
    missing = [n for n in names if n not in back]
    if missing:
        raise RuntimeError(f"not back within 60 s: {missing}")
    return [back[n] * 1000 for n in names]


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
    with tempfile.TemporaryDirectory(prefix="tron-wave-") as tmp:
        mesh = make_mesh(Path(tmp), services=services(args.agents, args.directors), fast=False,
                         policy={"start_timeout": 120.0})
        try:
            began = time.monotonic()
            mesh.tron("up", "--detach", timeout=300, check=True)
            up = time.monotonic() - began
            print(f"  {args.agents + args.directors + 4} services up in {up:.1f}s", file=sys.stderr)
            programmers = [f"programmer-{i}" for i in range(args.agents)]
            for w in range(args.waves):
                time.sleep(3)  # quiet: the previous wave's restarts are over
                wait_for(lambda: all(s["state"] == "running" for s in mesh.status()["services"]), 60, "all running")
                ms = wave(mesh, rng.sample(programmers, args.kill))
                samples.append(ms)
                print(f"  wave {w + 1}: median {percentile(ms, 0.5):.0f} ms, max {max(ms):.0f} ms", file=sys.stderr)
        finally:
            leftovers = cleanup(mesh)
    flat = [x for s in samples for x in s]
    print(f"{args.kill} of {args.agents} agents SIGKILLed at once, {args.waves} waves ({os.cpu_count()} cores): "
          f"kill -> running again: median {percentile(flat, 0.5):.0f} ms, p90 {percentile(flat, 0.9):.0f} ms, "
          f"max {max(flat):.0f} ms")
    return finish(args.json, {"up_s": up, "waves_ms": samples}, leftovers)


if __name__ == "__main__":
    sys.exit(main())
