"""How much work one child failure costs the ladder: ``decide()`` calls (in every process
of the mesh) and the daemon's store reads on the failure's path, per failure.

The default mesh with the test policy (tests/harness.py FAST_POLICY: max_restarts 3 in a
60 s window). programmer-1 (parent director-code, then architect, then root) is SIGKILLed
four times, each after the previous restart has settled:

    a_idle          killed with no task                      (an idle failure, restarted)
    b_mid_task      killed while a task of a run is in flight (restarted with its task)
    c_crash_loop    the 3rd failure in the window             (starts a crash-loop episode,
                                                               whose escalation climbs to the root)
    d_in_episode    the 4th                                   (inside the episode: restarted)

Counting is done by benchmarks/ladder_counts_site/sitecustomize.py, loaded in every mesh
process through PYTHONPATH; nothing in Tron is changed or asked. The numbers are counts,
not timings: the machine's load does not change them (unless it is so loaded that an alert
delivery times out and goes on to the next ancestor, which the breakdown then shows).

    .venv/bin/python -m benchmarks.ladder_counts [--json benchmarks/results/ladder_counts.json]

An older checkout is measured the same way, from an exported copy of it (its own code first
on PYTHONPATH, this folder's instrumentation before that):
``cd OLD && PYTHONPATH=$NEW/benchmarks/ladder_counts_site:$PWD $NEW/.venv/bin/python $NEW/benchmarks/ladder_counts.py``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.harness import cleanup, make_mesh, wait_for

SITE = Path(__file__).resolve().parent / "ladder_counts_site"
NAME = "programmer-1"


def settle(mesh, old: int) -> None:
    """The service back with a new pid, and the ladder's steps over (an escalation's climb
    answers after the restart): a count taken later would mix two failures."""
    mesh.wait_replaced(NAME, old)
    wait_for(lambda: mesh.service(NAME)["state"] == "running", 30, f"{NAME} running")
    time.sleep(3.0)  # not a test: a quiet moment so that every step of this failure has landed


def measure(counts: Path) -> None:
    def mark(label: str) -> None:
        with open(counts, "a") as f:
            f.write(f"MARK {label}\n")

    mesh = make_mesh(Path(tempfile.mkdtemp(prefix="tron-ladder-counts-")))
    try:
        mesh.up()
        time.sleep(2.0)  # start-up's own reads and beats are not a failure's
        mark("a_idle")
        settle(mesh, mesh.kill(NAME))
        mark("-")
        mesh.http("PUT", mesh.url("llm-sim") + "/sim/faults/anthropic", {"kind": "latency", "latency_ms": 1500})
        code, body = mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": "resume me"})
        assert code == 202, body
        wait_for(lambda: mesh.service(NAME)["task"], 30, f"{NAME} to take its task")
        mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults/anthropic")
        mark("b_mid_task")
        settle(mesh, mesh.kill(NAME))
        mark("-")
        wait_for(lambda: mesh.http("GET", mesh.url("gateway") + f"/runs/{body['run_id']}")[1]["status"] != "running",
                 60, "the run to end")
        mark("c_crash_loop")
        settle(mesh, mesh.kill(NAME))
        assert mesh.service(NAME)["crash_looping"], "the 3rd failure in the window should start an episode"
        mark("d_in_episode")
        settle(mesh, mesh.kill(NAME))
        mark("-")
    finally:
        left = cleanup(mesh)
        if left:
            print(f"LEFT BEHIND (killed): {left}", file=sys.stderr)


def summary(counts: Path) -> dict[str, dict]:
    sections: dict[str, list[list[str]]] = {}
    current = None
    for line in counts.read_text().splitlines():
        if line.startswith("MARK "):
            current = line.split()[1]
            sections.setdefault(current, [])
        elif current and current != "-":
            sections[current].append(line.split(" ", 3)[1:])
    out = {}
    for label, rows in sections.items():
        if label == "-":
            continue
        decides = collections.Counter(f"{r[1]}:{r[2]}" for r in rows if r[0] == "decide")
        reads = collections.Counter(f"{r[1]} <- {r[2]}" for r in rows if r[0] == "read")
        out[label] = {"decide": sum(decides.values()), "reads": sum(reads.values()),
                      "decisions": dict(decides), "by_read": dict(reads)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if os.environ.get("TRON_LADDER_COUNTS") is None:  # re-run with the instrumentation on the path
        counts = Path(tempfile.mkstemp(prefix="ladder-counts-", suffix=".txt")[1])
        env = dict(os.environ, TRON_LADDER_COUNTS=str(counts),
                   PYTHONPATH=os.pathsep.join(p for p in (str(SITE), os.getcwd(), os.environ.get("PYTHONPATH")) if p))
        os.execve(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env)
    counts = Path(os.environ["TRON_LADDER_COUNTS"])
    measure(counts)
    results = summary(counts)
    print(f"{'failure':<14} {'decide()':>9} {'store reads':>12}")
    for label, r in results.items():
        print(f"{label:<14} {r['decide']:>9} {r['reads']:>12}")
        for k, n in r["decisions"].items():
            print(f"{'':<16}decide {k} x{n}")
        for k, n in r["by_read"].items():
            print(f"{'':<16}read {k} x{n}")
    from benchmarks import finish
    return finish(args.json, results, [])


if __name__ == "__main__":
    sys.exit(main())
