"""How long `tron up` takes to a healthy mesh: start by dependencies (the default since
issue 24) beside the sequential start it replaces (``[mesh] start = "tree"``), interleaved
so the machine's noise lands on both.

  default mesh      the shipped mesh.toml and policy; from launching `tron up --detach`
                    to its exit 0 (it exits once every service is running).
  one never ready   the same mesh plus a command service, placed first in the start
                    order, whose startup probe never passes (start_timeout 5 s, to keep
                    the run short: labelled); from the launch to the moment every *other*
                    service is running (polled every 20 ms).

    .venv/bin/python -m benchmarks.mesh_start [--reps 5] [--json benchmarks/results/mesh_start.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from benchmarks import finish
from scripts.stats import percentile
from tests.harness import REPO, TRON, cleanup, make_mesh, wait_for

NEVER_READY = {"role": "command", "port": 6195,
               "command": ["{python}", "-c", "import time; time.sleep(3600)"],
               "startup": {"tcp": {}, "interval": 0.2, "timeout": 0.2}}


def mesh_for(tmp: Path, start: str, never_ready: bool):
    base = tomllib.loads((REPO / "mesh.toml").read_text())
    services = dict(base["services"])
    policy = {}
    if never_ready:
        services = {"stuck": NEVER_READY, **services}
        policy = {"start_timeout": 5.0}
    mesh = make_mesh(tmp, services=services, fast=False, policy=policy)
    text = mesh.config.read_text().replace("[mesh]\n", f'[mesh]\nstart = "{start}"\n', 1)
    mesh.config.write_text(text)
    return mesh


def one(tmp: Path, start: str, never_ready: bool) -> tuple[float, list]:
    mesh = mesh_for(tmp, start, never_ready)
    others = [n for n in mesh.spec["services"] if n != "stuck"]
    began = time.monotonic()
    proc = subprocess.Popen([*TRON, "--config", str(mesh.config), "up", "--detach"], env=mesh.env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if never_ready:
            def up() -> bool:
                try:
                    rows = {s["name"]: s for s in mesh.status()["services"]}
                except (OSError, AssertionError, KeyError):
                    return False
                return all(rows[n]["state"] == "running" for n in others)
            wait_for(up, 60, "every other service running", interval=0.02)
            took = time.monotonic() - began
        else:
            code = proc.wait(60)
            took = time.monotonic() - began
            if code != 0:
                raise RuntimeError(f"tron up exited {code}")
        proc.wait(60)
    finally:
        leftovers = cleanup(mesh)
    return took, leftovers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mesh_start")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = [(start, stuck) for stuck in (False, True) for start in ("dependencies", "tree")]
    samples: dict[str, list[float]] = {f"{s} {'one never ready' if n else 'default mesh'}": [] for s, n in rows}
    leftovers: list = []
    with tempfile.TemporaryDirectory(prefix="tron-start-") as tmp:
        for rep in range(args.reps):
            for start, stuck in rows:
                took, left = one(Path(tmp) / f"{start}-{stuck}-{rep}", start, stuck)
                samples[f"{start} {'one never ready' if stuck else 'default mesh'}"].append(took)
                leftovers += left
            print(f"  rep {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
    print(f"{'row':<36} {'median s':>9} {'min':>6} {'max':>6}  (n={args.reps}, {os.cpu_count()} cores)")
    for name, xs in samples.items():
        print(f"{name:<36} {percentile(xs, 0.5):>9.2f} {min(xs):>6.2f} {max(xs):>6.2f}")
    return finish(args.json, {"samples": samples}, leftovers)


if __name__ == "__main__":
    sys.exit(main())
