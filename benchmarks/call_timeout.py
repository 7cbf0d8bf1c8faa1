"""How near its timeout a `call_llm` against a provider that never answers ends (issue 28:
the SDK client has an explicit timeout; how near is a figure, so it lives here, not in the
tests). A mesh of llm-sim and one class of the user's (the Caller of
tests/integration/test_agent_promises.py: one `call_llm` per task), `[providers] timeout`
set to each value asked, the test harness's fast policy.

Each round runs one task with no fault (the baseline) and one whose first request llm-sim
holds for ever (`hang`, times 1), which the ladder retries in place once the call ends. It
measures how long llm-sim held the hung request (its `hanging` gauge, polled every 10 ms
from here: 1 from the request's arrival until the client gave up) and how much longer the
hung task took than the baseline.

    .venv/bin/python -m benchmarks.call_timeout [--rounds 5] [--timeouts 1 3] [--json benchmarks/results/call_timeout.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import finish
from tests.harness import cleanup, make_mesh, wait_for
from tests.integration.test_agent_promises import CALLER_AGENT
from tests.integration.test_own_agents import ended, run_task


def hanging(mesh) -> int:
    return mesh.http("GET", mesh.url("llm-sim") + "/sim/faults")[1]["providers"]["anthropic"]["counters"]["hanging"]


def one_task(mesh, prompt: str) -> float:
    t0 = time.monotonic()
    run_id, _ = run_task(mesh, "caller", prompt)
    run = ended(mesh, run_id, timeout=120)
    assert run["status"] == "done", run
    return time.monotonic() - t0


def hung_task(mesh, prompt: str) -> tuple[float, float]:
    """(seconds llm-sim held the request, seconds the task took)."""
    code, body = mesh.http("PUT", mesh.url("llm-sim") + "/sim/faults/anthropic", {"kind": "hang", "times": 1})
    assert code == 200, body
    t0 = time.monotonic()
    run_id, _ = run_task(mesh, "caller", prompt)
    wait_for(lambda: hanging(mesh) == 1, 30, "the request to hang", interval=0.01)
    held_from = time.monotonic()
    wait_for(lambda: hanging(mesh) == 0, 120, "the client to give up", interval=0.01)
    held = time.monotonic() - held_from
    run = ended(mesh, run_id, timeout=120)
    assert run["status"] == "done", run
    return held, time.monotonic() - t0


def measure(timeout: float, rounds: int, where: Path) -> dict:
    pkg = where / "mine"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "caller.py").write_text(CALLER_AGENT)
    services = {"llm-sim": {"role": "llm_sim", "port": 6190},
                "caller": {"agent": "mine.caller:Caller", "port": 6162, "agent_path": [str(where)]}}
    mesh = make_mesh(where / "mesh", services=services, providers={"timeout": timeout, "chain": ["anthropic"]})
    samples = {"timeout": timeout, "held": [], "extra": []}
    try:
        mesh.up()
        one_task(mesh, "warm up")
        for n in range(rounds):
            base = one_task(mesh, f"baseline {n}")
            held, took = hung_task(mesh, f"hung {n}")
            samples["held"].append(round(held, 3))
            samples["extra"].append(round(took - base, 3))
            print(f"  timeout {timeout}: round {n + 1}/{rounds} held {held:.3f}s, +{took - base:.3f}s",
                  file=sys.stderr, flush=True)
    finally:
        samples["leftovers"] = cleanup(mesh)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeouts", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results, leftovers = [], []
    with tempfile.TemporaryDirectory(prefix="tron-call-timeout-") as tmp:
        for i, timeout in enumerate(args.timeouts):
            r = measure(timeout, args.rounds, Path(tmp) / str(i))
            leftovers += r.pop("leftovers")
            results.append(r)
    print("| `[providers] timeout` | llm-sim held the hung request: median (max) | the hung task's extra time: "
          "median (max) |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['timeout']:g} s | {statistics.median(r['held']):.2f} s ({max(r['held']):.2f} s) | "
              f"{statistics.median(r['extra']):.2f} s ({max(r['extra']):.2f} s) |")
    return finish(args.json, {"rounds": args.rounds, "results": results}, leftovers)


if __name__ == "__main__":
    raise SystemExit(main())
