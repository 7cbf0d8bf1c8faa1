"""The task ladder end to end under the shipped default policy: restarts with the task (level
1, the parent), escalation hop by hop, provider switch at the root (level 2), permanent
failure (level 3), each step timed from the task's first failure.

Each repetition uses a fresh mesh (restart windows, crash-loop episodes and provider
choices are per service and would carry over). The architect plans on Ollama so that an
Anthropic fault hits only the programmers' calls. The fault is injected into llm-sim, then
a run is submitted to the gateway.

  switch     Anthropic answers 529 overloaded. The task followed is programmer-1's: its
             ladder rows (retry_history, by task id) from its first failure (the first
             alert naming the task, or since issue 19 its first provider_retry row: a
             provider failure is retried in place, no process is killed) to the
             llm_change row; then the run completes on Ollama.
  permanent  both providers answer 500. The task followed is the one that gets the
             permanent_failure row (with both down, the architect's plan fails first); then
             the gateway marks the run failed.

Times come from the registry (alerts.mono, retry_history.mono; the daemon's
CLOCK_MONOTONIC) and from this process's clock for the run's end; medians of --reps.
Side effects on the service lifecycle are counted too: the programmers' restarts are
unstable failures, so they can start a crash-loop episode (one escalation row each).

``--fast-row`` adds a labelled extra row under the test harness's fast policy (backoff
0.05 s to a 0.2 s cap), for comparison with the integration tests; it is not a default.

    .venv/bin/python -m benchmarks.ladder_timing [--reps 3] [--fast-row] [--json benchmarks/results/ladder_timing.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from tron.common.config import Policy
from tron.common.ladder import worst_case_attempts
from tron.scripts.stats import percentile
from tests.harness import FAST_POLICY, REPO, cleanup, make_mesh, wait_for

DEFAULT = tomllib.loads((REPO / "mesh.toml").read_text())
SERVICES = {**DEFAULT["services"], "architect": {**DEFAULT["services"]["architect"], "provider": "ollama"}}
STEP = {"child_restart": "restart", "escalation": "escalate", "llm_change": "switch", "provider_retry": "retry in place",
        "permanent_failure": "permanent failure", "operator_restart": "operator restart"}


def followed_task(mesh, run_id: str, kind: str) -> str | None:
    if kind == "switch":
        rows = mesh.rows("SELECT task_id FROM tasks WHERE run_id = ? AND agent = 'programmer-1'", (run_id,))
    else:
        rows = mesh.rows("SELECT task_id FROM retry_history WHERE run_id = ? AND retry_type = 'permanent_failure' "
                         "ORDER BY mono LIMIT 1", (run_id,))
    return rows[0]["task_id"] if rows else None


def run_once(kind: str, fast: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mesh = make_mesh(Path(tmp), fast=fast, services=SERVICES)
        try:
            mesh.up()
            time.sleep(2.5)  # let the agents finish loading the SDKs, as a mesh in service has
            sim = mesh.url("llm-sim") + "/sim/faults/"
            mesh.http("PUT", sim + "anthropic", {"kind": "overloaded" if kind == "switch" else "error"})
            if kind == "permanent":
                mesh.http("PUT", sim + "ollama", {"kind": "error"})
            t0 = time.monotonic()
            code, body = mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": "measure the ladder"})
            if code != 202:
                raise RuntimeError(f"the gateway refused the run: {code} {body}")
            run_id = body["run_id"]
            run = wait_for(lambda: (r := mesh.http("GET", mesh.url("gateway") + f"/runs/{run_id}", token=False)[1])
                           and r["status"] != "running" and r, 600, "the run to end", interval=0.01)
            t_end = time.monotonic()
            task_id = wait_for(lambda: followed_task(mesh, run_id, kind), 30, "the task to follow")
            decisive = "llm_change" if kind == "switch" else "permanent_failure"
            rows = wait_for(lambda: (r := mesh.rows(
                "SELECT retry_type, reason, case_id, hop, mono, from_provider, to_provider FROM retry_history "
                "WHERE task_id = ? ORDER BY mono, id", (task_id,))) and any(x["retry_type"] == decisive for x in r)
                and r, 30, f"a {decisive} row")
            agent = mesh.rows("SELECT agent FROM tasks WHERE task_id = ?", (task_id,))[0]["agent"]
            # A process failure's first sign is TRON's alert; a provider failure raises none (the
            # healthy agent is not killed): its first sign is the first ladder row of the task.
            first = mesh.rows("SELECT MIN(m) AS m FROM (SELECT MIN(mono) AS m FROM alerts WHERE task_id = ? "
                              "UNION ALL SELECT MIN(mono) FROM retry_history WHERE task_id = ?)",
                              (task_id, task_id))[0]["m"]
            attempt = mesh.rows("SELECT attempt FROM tasks WHERE task_id = ?", (task_id,))[0]["attempt"]
            loops = mesh.rows("SELECT agent_id, COUNT(*) AS n FROM retry_history WHERE run_id IS NULL AND "
                              "retry_type = 'escalation' AND reason = 'crash_looping' GROUP BY agent_id")
            looping = [s["name"] for s in mesh.status()["services"] if s["crash_looping"]]
            episodes = mesh.rows("SELECT agent, COUNT(*) AS n FROM events WHERE kind = 'crash_loop_started' "
                                 "GROUP BY agent")
            steps = [{"step": STEP.get(r["retry_type"], r["retry_type"]), "case": r["case_id"], "hop": r["hop"],
                      "reason": r["reason"], "to_provider": r["to_provider"], "at": r["mono"] - first} for r in rows]
            # when each next attempt began (the backoff a restart row decided is waited out before it)
            resumed = mesh.rows("SELECT mono, payload FROM events WHERE kind = 'task_resumed' AND task_id = ?",
                                (task_id,))
            steps += [{"step": f"attempt {json.loads(e['payload'])['attempt']}", "case": "", "hop": "", "reason": "",
                       "to_provider": None, "at": e["mono"] - first} for e in resumed]
            steps.sort(key=lambda s: s["at"])
            return {"kind": kind, "fast": fast, "status": run["status"], "agent": agent, "task_id": task_id,
                    "submit_to_first_failure": first - t0, "first_failure_to_decisive":
                    next(s["at"] for s in steps if s["step"] == STEP[decisive]),
                    "first_failure_to_run_end": t_end - first, "submit_to_run_end": t_end - t0,
                    "attempt": attempt, "steps": steps,
                    "crash_loop_escalations": {r["agent_id"]: r["n"] for r in loops},
                    "crash_loop_episodes": {r["agent"]: r["n"] for r in episodes}, "crash_looping_at_end": looping}
        finally:
            leaks = cleanup(mesh)
            if leaks:
                raise SystemExit(f"left behind: {leaks}")


def timeline(steps: list[dict]) -> str:
    """``restart +0.00, restart +0.51, ...`` for one repetition."""
    out = []
    for s in steps:
        label = s["step"] + (f" {s['hop']}" if s["hop"] else "")
        label += f" to {s['to_provider']}" if s["to_provider"] else ""
        out.append(f"{label} +{s['at']:.2f}")
    return ", ".join(out)


def med(rows: list[dict], key: str) -> float:
    return percentile([r[key] for r in rows], 0.5)


def report(results: dict, policy: Policy, fast_policy: Policy | None) -> list[str]:
    lines = [f"default policy: max_restarts {policy.max_restarts}, max_provider_switches "
             f"{policy.max_provider_switches}, backoff {policy.backoff_initial:g} s x{policy.backoff_factor:g} to "
             f"{policy.backoff_max:g} s (+-{policy.backoff_jitter:.0%}), min_uptime {policy.min_uptime:g} s, "
             f"worst case {worst_case_attempts(policy)} attempts; load {os.getloadavg()[0]:.2f}", "",
             "| policy | scenario | n | followed task | first failure -> decisive row, median | first failure -> "
             "run ends | submit -> run ends | attempts | crash-loop episodes (escalation rows) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (kind, fast), rows in results.items():
        decisive = "llm_change (switch)" if kind == "switch" else "permanent_failure"
        loops = sorted({f"{a} {n} ({r['crash_loop_escalations'].get(a, 0)})" for r in rows
                        for a, n in r["crash_loop_episodes"].items()})
        lines.append(f"| {'fast (test harness), extra' if fast else '**shipped defaults**'} | {kind} | {len(rows)} | "
                     f"{rows[0]['agent']} | {decisive}: {med(rows, 'first_failure_to_decisive'):.2f} s | run "
                     f"{rows[0]['status']}: {med(rows, 'first_failure_to_run_end'):.2f} s | "
                     f"{med(rows, 'submit_to_run_end'):.2f} s | {max(r['attempt'] for r in rows)} | "
                     f"{', '.join(loops) or 'none'} |")
    lines.append("")
    for (kind, fast), rows in results.items():
        for i, r in enumerate(rows, 1):
            lines.append(f"- {'fast' if fast else 'defaults'} {kind} #{i} ({r['agent']}): {timeline(r['steps'])}")
    if fast_policy is not None:
        lines.append(f"- fast policy: backoff {fast_policy.backoff_initial:g} s to {fast_policy.backoff_max:g} s, "
                     f"heartbeat {fast_policy.heartbeat_interval:g} s x{fast_policy.miss_threshold}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fast-row", action="store_true", help="add a labelled row under the test harness's fast policy")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain SIGTERM still runs the cleanup below
    policy = Policy(**DEFAULT["policy"])
    fast_policy = Policy(**{**DEFAULT["policy"], **FAST_POLICY}) if args.fast_row else None
    results: dict[tuple[str, bool], list[dict]] = {}
    for fast in ([False, True] if args.fast_row else [False]):
        for kind in ("switch", "permanent"):
            results[(kind, fast)] = []
    for _ in range(args.reps):  # interleaved: every variant once per repetition
        for key in results:
            results[key].append(run_once(*key))
            print(f"  {key[0]}{' (fast)' if key[1] else ''}: {results[key][-1]['first_failure_to_decisive']:.2f} s",
                  file=sys.stderr, flush=True)
    print("\n".join(report(results, policy, fast_policy)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"policy": policy.model_dump(), "loadavg_end": os.getloadavg(),
                                         "runs": [r for rows in results.values() for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
