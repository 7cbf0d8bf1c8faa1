"""How long `tron up` takes to a healthy mesh: start by dependencies (the default since
issue 24) beside the sequential start it replaces (``[mesh] start = "tree"``), interleaved
so the machine's noise lands on both.

  default mesh      the shipped mesh.toml and policy; from launching `tron up --detach`
                    to its exit 0 (it exits once every service is running).
  one never ready   the same mesh plus a command service, placed first in the start
                    order, whose startup probe never passes (start_timeout 5 s, to keep
                    the run short: labelled); from the launch to the moment every *other*
                    service is running (polled every 20 ms).
  first run         (--first-run) the default mesh, and right after `tron up` exits a run
                    through the gateway: from the launch to the run done. What the agents
                    forked before the fork server had the LLM SDKs pay at their first call
                    (they import them then) shows here.
  kill after up     (--kill-after-up) the default mesh; 1 s after `tron up` exits, while the
                    fork server's SDK warm-up runs, programmer-1 is SIGKILLed: from the kill
                    to its new pid answering /health (the harness's wait_replaced, polled).
                    A restart in those seconds used to wait in the server's backlog for the
                    import; the warm heir (spawner.py ``_hand_to_heir``) takes it off.

Each row also says the CPU the whole machine spent (``/proc/stat``, every process: the daemon,
the fork servers, the agents, the CLI) from the launch to the mesh down again: what a mesh
costs a small machine beside the time it takes.

``--baseline DIR``: the same rows with the code of another checkout (``git archive COMMIT |
tar -x -C DIR``: it goes first on PYTHONPATH, the virtualenv stays this one's), taking turns
with this checkout's, so that a loaded machine still compares the two in one run.

    .venv/bin/python -m benchmarks.mesh_start [--reps 5] [--baseline DIR] [--first-run] [--kill-after-up]
                                              [--only-default]
                                              [--json benchmarks/results/mesh_start.json]
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

from benchmarks import finish, machine_cpu
from tron.scripts.stats import percentile
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


KILL_AFTER_UP = 1.0  # s after `tron up` exits: inside the fork server's SDK warm-up (1-2 s) on these cores


def one(tmp: Path, start: str, never_ready: bool, code: Path | None = None,
        first_run: bool | str = False) -> tuple[float, float, list]:
    """Seconds from launching `tron up` to what the row measures; the machine's CPU seconds
    from then to the mesh down; what was left behind. ``code``: the checkout whose code runs
    (None: this one)."""
    cpu = machine_cpu()
    mesh = mesh_for(tmp, start, never_ready)
    if code is not None:
        mesh.env["PYTHONPATH"] = str(code)
    others = [n for n in mesh.spec["services"] if n != "stuck"]
    began = time.monotonic()
    proc = subprocess.Popen([*TRON, "--config", str(mesh.config), "up", "--detach"], env=mesh.env,
                            cwd=code or REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if never_ready:
            def up() -> bool:
                try:
                    rows = {s["name"]: s for s in mesh.status()["services"]}
                except (OSError, AssertionError, KeyError):
                    return False
                return all(rows[n]["state"] == "running" for n in others)
            wait_for(up, 300, "every other service running", interval=0.02)
            took = time.monotonic() - began
        else:
            exit_code = proc.wait(300)  # generous: a loaded machine is still measured
            took = time.monotonic() - began
            if exit_code != 0:
                raise RuntimeError(f"tron up exited {exit_code}")
            if first_run == "kill":
                time.sleep(KILL_AFTER_UP)  # when the kill lands, not a wait for a result
                old = mesh.kill("programmer-1")
                killed = time.monotonic()
                mesh.wait_replaced("programmer-1", old, timeout=120)
                took = time.monotonic() - killed
            elif first_run:
                status, body = mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": "build it"})
                if status != 202:
                    raise RuntimeError(f"the run was refused: {status} {body}")
                url = mesh.url("gateway") + f"/runs/{body['run_id']}"
                run = wait_for(lambda: (r := mesh.http("GET", url)[1]) and r["status"] != "running" and r, 300,
                               "the first run to end", interval=0.02)
                took = time.monotonic() - began
                if run["status"] != "done":
                    raise RuntimeError(f"the first run ended {run['status']}")
        proc.wait(60)
    finally:
        leftovers = cleanup(mesh)
    return took, machine_cpu() - cpu, leftovers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mesh_start")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--baseline", type=Path, help="a checkout of another commit: its rows beside this one's")
    ap.add_argument("--first-run", action="store_true", help="add: up, then a run through the gateway to done")
    ap.add_argument("--kill-after-up", action="store_true",
                    help="add: up, then programmer-1 killed 1 s later, to healthy again")
    ap.add_argument("--only-default", action="store_true", help="only the default mesh started by dependencies")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    kinds = [("dependencies", False, False)]
    if not args.only_default:
        kinds += [("tree", False, False), ("dependencies", True, False), ("tree", True, False)]
    if args.first_run:
        kinds.append(("dependencies", False, True))
    if args.kill_after_up:
        kinds.append(("dependencies", False, "kill"))
    codes: list[tuple[str, Path | None]] = [("", None)]
    if args.baseline:
        codes.append(("baseline ", args.baseline.resolve()))
    rows = [(label, code, *kind) for kind in kinds for label, code in codes]

    def name(label: str, start: str, stuck: bool, first_run: bool | str) -> str:
        what = "kill after up -> healthy" if first_run == "kill" else "first run done" if first_run \
            else "one never ready" if stuck else "default mesh"
        return f"{label}{start} {what}"

    samples: dict[str, list[float]] = {name(label, *kind): [] for label, _, *kind in rows}
    cpus: dict[str, list[float]] = {row: [] for row in samples}
    leftovers: list = []
    with tempfile.TemporaryDirectory(prefix="tron-start-") as tmp:
        for rep in range(args.reps):
            for i, (label, code, start, stuck, first_run) in enumerate(rows):
                took, cpu, left = one(Path(tmp) / f"{rep}-{i}", start, stuck, code, first_run)
                samples[name(label, start, stuck, first_run)].append(took)
                cpus[name(label, start, stuck, first_run)].append(cpu)
                leftovers += left
            print(f"  rep {rep + 1}/{args.reps} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    print(f"{'row':<45} {'median s':>9} {'min':>6} {'max':>6} {'machine CPU s':>14}  (n={args.reps}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")
    for row, xs in samples.items():
        print(f"{row:<45} {percentile(xs, 0.5):>9.2f} {min(xs):>6.2f} {max(xs):>6.2f} "
              f"{percentile(cpus[row], 0.5):>14.2f}")
    return finish(args.json, {"samples": samples, "machine_cpu_s": cpus}, leftovers)


if __name__ == "__main__":
    sys.exit(main())
