"""How long a `tron` command takes, from its launch to its exit, against a running mesh: what an
operator waits for at the terminal, and what a script that calls `tron` in a loop pays. The
daemon answers these in a few milliseconds; the rest is the command line's own start-up.

One default mesh (shipped mesh.toml and policy) is started; then each command is run ``--reps``
times, with this checkout's code and, with ``--baseline DIR`` (``git archive COMMIT | tar -x -C
DIR``: first on PYTHONPATH, the virtualenv stays this one's), with that code, taking turns
command by command so the machine's noise lands on both. Both run as ``python -m
tron.scripts.tron``. Per command: the median wall time and the median CPU (user + system) of
the process.

    .venv/bin/python -m benchmarks.cli_latency [--reps 9] [--baseline DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import finish
from tron.scripts.stats import percentile
from tests.harness import REPO, cleanup, make_mesh

COMMANDS = [
    ("status",),
    ("status", "--json"),
    ("restart", "programmer-2"),
    ("stop", "programmer-2"),
    ("start", "programmer-2"),
    ("audit",),
    ("history",),
    ("report",),
    ("provider", "list"),
    ("--help",),
]


def run(mesh, code: Path, args: tuple[str, ...]) -> tuple[float, float, int]:
    """One command with ``code`` first on PYTHONPATH: (wall s, CPU s, exit code)."""
    env = {**mesh.env, "PYTHONPATH": str(code)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tron.scripts.tron", "--config", str(mesh.config), *args],
                          env=env, cwd=code, capture_output=True, timeout=60)
    took = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return took, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cli_latency")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--baseline", type=Path, help="a checkout of another commit: its rows beside this one's")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    codes = [("this", REPO)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    walls: dict[str, dict[str, list[float]]] = {label: {} for label, _ in codes}
    cpus: dict[str, dict[str, list[float]]] = {label: {} for label, _ in codes}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tron-cli-") as tmp:
        mesh = make_mesh(Path(tmp))
        try:
            mesh.up()
            for rep in range(args.reps):
                for cmd in COMMANDS:
                    order = codes if rep % 2 == 0 else codes[::-1]
                    for label, code in order:
                        took, cpu, rc = run(mesh, code, cmd)
                        name = " ".join(cmd)
                        if rc != 0:
                            failed.append(f"{label}: tron {name} exited {rc}")
                        walls[label].setdefault(name, []).append(took)
                        cpus[label].setdefault(name, []).append(cpu)
                        if cmd[0] == "stop":  # the start after it needs it stopped, not stopping
                            time.sleep(0.2)
                print(f"  rep {rep + 1}/{args.reps} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        finally:
            leftovers = cleanup(mesh)
    heads = "".join(f" {label + ' wall ms':>18} {label + ' CPU ms':>17}" for label, _ in codes)
    print(f"{'command':<22}{heads}   (median of {args.reps}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")
    for cmd in COMMANDS:
        name = " ".join(cmd)
        cells = "".join(f" {percentile(walls[label][name], 0.5) * 1000:>18.0f} "
                        f"{percentile(cpus[label][name], 0.5) * 1000:>17.0f}" for label, _ in codes)
        print(f"tron {name:<17}{cells}")
    if failed:
        print("FAILED: " + "; ".join(sorted(set(failed))), file=sys.stderr)
    code = finish(args.json, {"wall_s": walls, "cpu_s": cpus, "failed": failed}, leftovers)
    return code or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
