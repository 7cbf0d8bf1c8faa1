"""The ladder end to end at the default policy: fault to provider switch, fault to
permanent failure, compared with the README's worst-case formula.

Each repetition uses a fresh mesh (the restart window is per agent, so a reused mesh
would start with restarts already on record). The architect plans on Ollama so that an
Anthropic fault hits only the programmers' calls.

  switch:    Anthropic answers 529 overloaded; time from the fault to the first llm_change
             row, and to the run completing on Ollama.
  permanent: both providers answer 500; time from the fault to the permanent_failure row
             and to the gateway marking the run failed.

    python benchmarks/ladder_timing.py [--reps N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import Policy  # noqa: E402
from common.policy import worst_case_attempts  # noqa: E402
from tests.harness import REPO, cleanup, make_mesh, wait_for  # noqa: E402

DEFAULT = tomllib.loads((REPO / "mesh.toml").read_text())
SERVICES = {**DEFAULT["services"], "architect": {**DEFAULT["services"]["architect"], "provider": "ollama"}}


def first_row(mesh, retry_type: str, after: float) -> float | None:
    rows = mesh.rows("SELECT mono FROM retry_history WHERE retry_type = ? AND mono > ? ORDER BY mono LIMIT 1",
                     (retry_type, after))
    return rows[0]["mono"] if rows else None


def run_once(kind: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mesh = make_mesh(Path(tmp), fast=False, services=SERVICES)
        try:
            mesh.up()
            time.sleep(2.5)  # let the agents finish loading the SDKs, as a mesh in service has
            sim = mesh.url("llm-sim") + "/sim/faults/"
            t0 = time.monotonic()
            if kind == "switch":
                mesh.http("PUT", sim + "anthropic", {"kind": "overloaded"})
            else:
                mesh.http("PUT", sim + "anthropic", {"kind": "error"})
                mesh.http("PUT", sim + "ollama", {"kind": "error"})
            code, body = mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": "measure the ladder"})
            run_id = body["run_id"]
            run = wait_for(lambda: (r := mesh.http("GET", mesh.url("gateway") + f"/runs/{run_id}", token=False)[1])
                           and r["status"] != "running" and r, 600, "the run to end", interval=0.01)
            t_end = time.monotonic()
            row = "llm_change" if kind == "switch" else "permanent_failure"
            t_row = wait_for(lambda: first_row(mesh, row, t0), 30, f"a {row} row")
            attempts = mesh.rows("SELECT MAX(attempt) AS a FROM tasks WHERE run_id = ?", (run_id,))[0]["a"]
            return {"kind": kind, "status": run["status"], "fault_to_row": t_row - t0, "fault_to_end": t_end - t0,
                    "max_attempt": attempts}
        finally:
            leaks = cleanup(mesh)
            if leaks:
                raise SystemExit(f"left behind: {leaks}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    policy = Policy(**DEFAULT["policy"])
    results = {k: [run_once(k) for _ in range(args.reps)] for k in ("switch", "permanent")}
    backoffs = sum(min(policy.backoff_initial * policy.backoff_factor ** (k - 1), policy.backoff_max)
                   for k in range(1, policy.max_restarts))
    print(f"default policy: max_restarts {policy.max_restarts}, max_provider_switches "
          f"{policy.max_provider_switches}, backoff sum {backoffs:.2f} s (+-{policy.backoff_jitter:.0%}), "
          f"worst case {worst_case_attempts(policy)} attempts")
    for kind, rows in results.items():
        to_row = statistics.median(r["fault_to_row"] for r in rows)
        to_end = statistics.median(r["fault_to_end"] for r in rows)
        label = "switch (llm_change row)" if kind == "switch" else "permanent_failure row"
        print(f"{kind:<9} fault -> {label}: median {to_row:.2f} s; fault -> run {rows[0]['status']}: median "
              f"{to_end:.2f} s; max attempt {max(r['max_attempt'] for r in rows)} ({len(rows)} runs)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
