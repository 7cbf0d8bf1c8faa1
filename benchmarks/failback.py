"""Failback: after an Anthropic outage moved the agents that called it to Ollama, how long
until they are home again once it is over, and what the daemon's probe costs.

The default mesh, the shipped policy. anthropic answers 529 (overloaded); one run goes through
(every agent that calls anthropic moves to ollama, in place); the fault stays on for
``--outage`` more seconds (the daemon's probes of it fail meanwhile), then is cleared. Timed:
from the clear until the last of them is back on anthropic (``/status``), and from when each
left. Then the probe alone: ``--probes`` probes of anthropic through the real SDK, against
this mesh's llm-sim, as the daemon runs them (``probe_in_process``): wall time and CPU (the
probe's process: an interpreter, the SDK's import, one call), median. ``--after`` sets
``failback_after`` (a tuned row: the shipped default is 60 s, which the first figure waits
by design).

    .venv/bin/python -m benchmarks.failback [--after 60] [--outage 20] [--probes 5]
                                          [--json benchmarks/results/failback.json]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import finish
from tests.harness import cleanup, make_mesh, wait_for
from tron.common.providers import ProviderSettings
from tron.services.daemon.failback import probe_in_process

CALLERS = ("architect", "programmer-1", "programmer-2")  # the default mesh's agents that call a provider


def on(mesh) -> dict[str, str]:
    return {s["name"]: s["provider"] for s in mesh.status()["services"]}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


async def probes(mesh, n: int) -> list[tuple[float, float, bool]]:
    """(wall s, CPU s, ok) of ``n`` probes of anthropic, one after another."""
    settings = ProviderSettings(sim_url=mesh.url("llm-sim"), timeout_s=30.0)
    env = {k: v for k, v in mesh.env.items() if k not in ("ANTHROPIC_API_KEY", "OLLAMA_HOST")}
    out = []
    for _ in range(n):
        cpu, wall = children_cpu(), time.monotonic()
        answer = await probe_in_process("anthropic", settings, env)
        out.append((time.monotonic() - wall, children_cpu() - cpu, bool(answer.get("ok"))))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--after", type=float, default=None, help="failback_after (default: the shipped 60 s)")
    ap.add_argument("--outage", type=float, default=20.0, help="seconds the outage lasts after the run")
    ap.add_argument("--probes", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    providers = {} if args.after is None else {"failback_after": args.after}
    results: dict = {"after": args.after if args.after is not None else 60.0, "outage": args.outage}
    with tempfile.TemporaryDirectory(prefix="tron-failback-") as tmp:
        mesh = make_mesh(Path(tmp), fast=False, providers=providers)
        leftovers: list = []
        try:
            mesh.tron("up", "--detach", timeout=300, check=True)
            code, body = mesh.http("PUT", mesh.url("llm-sim") + "/sim/faults/anthropic", {"kind": "overloaded"})
            assert code == 200, body
            code, run = mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": "build it"})
            assert code == 202, run
            wait_for(lambda: mesh.http("GET", mesh.url("gateway") + f"/runs/{run['run_id']}")[1]["status"] != "running",
                     180, "the run during the outage")
            moved = [n for n in CALLERS if on(mesh)[n] == "ollama"]
            left = {r["agent_id"]: r["timestamp"] for r in mesh.rows(
                "SELECT agent_id, MAX(timestamp) AS timestamp FROM retry_history WHERE retry_type = 'llm_change' "
                "GROUP BY agent_id")}
            print(f"  moved to ollama by the outage: {', '.join(moved)}")
            time.sleep(args.outage)
            failed_probes = len([r for r in mesh.rows("SELECT payload FROM events WHERE kind = 'provider_probed'")
                                 if '"outcome": "failed"' in r["payload"]])
            cleared = time.monotonic()
            mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults/anthropic")
            wait_for(lambda: all(on(mesh)[n] == "anthropic" for n in moved), 600, "every moved agent home",
                     interval=0.1)
            home_after = time.monotonic() - cleared
            back = mesh.rows("SELECT agent, ts FROM events WHERE kind = 'provider_failback'")
            results.update(moved=moved, home_after_clear_s=round(home_after, 2), probes_failed_during=failed_probes,
                           left=left, back={r["agent"]: r["ts"] for r in back})
            print(f"failback_after {results['after']:g} s, outage {args.outage:g} s past the run: every moved agent "
                  f"home {home_after:.1f} s after the outage ended ({failed_probes} probes failed during it)")
            samples = asyncio.run(probes(mesh, args.probes))
            walls, cpus = [s[0] for s in samples], [s[1] for s in samples]
            results["probe"] = {"wall_s": walls, "cpu_s": cpus, "ok": [s[2] for s in samples]}
            print(f"one probe of anthropic (its own process, the real SDK, llm-sim), median of {len(samples)}: "
                  f"{statistics.median(walls) * 1000:.0f} ms wall, {statistics.median(cpus) * 1000:.0f} ms CPU; "
                  f"ok {sum(s[2] for s in samples)}/{len(samples)}")
        finally:
            leftovers = cleanup(mesh)
    return finish(args.json, results, leftovers)


if __name__ == "__main__":
    sys.exit(main())
