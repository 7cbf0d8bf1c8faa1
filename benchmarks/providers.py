"""Providers in trouble, before and after the provider desk (issue 19), on the default mesh
with the shipped defaults, side by side in one run.

"before" is the commit the issue was measured on (``--before``, default c372d1f), checked
out into a temporary git worktree and run from there with this checkout's virtual
environment; "after" is this checkout. Each scenario uses a fresh mesh.

  down       both providers answer 500, ``on_all_down = "fail"`` (before: no such setting,
             the ladder restarts and switches): ``--runs`` runs one after another. Time
             from submission to the run's end (the first run, and the median of the
             later ones), process restarts (child_restart rows, and services whose pid
             changed), provider switches and requests the providers received.
  wave       ``--wave`` runs submitted at once while anthropic answers 429 with
             ``retry-after: 3`` for 6 s (the fault is cleared from here after 6 s: the
             older llm-sim has no duration): requests answered 429 (llm-sim's counters),
             process restarts, crash-loop episodes, runs completed, time to the last run.
  resume     (after only: parking is new) both providers down, the shipped
             ``on_all_down = "park"``: a run parks; the faults are cleared; time from the
             clear and from the provider_closed event to the run's end.
  own        ``--wave`` tasks, each its own agent calling llm-sim through the real
             anthropic SDK with its own retries honouring retry-after (max_retries 10),
             under the same 429: "every agent retries on its own", for the wave's row.

    .venv/bin/python -m benchmarks.providers [--runs 4] [--wave 10] [--json benchmarks/results/providers.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import finish
from tron.scripts.stats import percentile
from tests.harness import REPO, TRON, Mesh, cleanup, make_mesh, wait_for

BEFORE = "c372d1f"


class BeforeMesh(Mesh):
    """The same mesh, run by the code of an older commit (a worktree) in this venv."""

    tree: Path

    def tron(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        env = {**self.env, "PYTHONPATH": str(self.tree)}
        proc = subprocess.run([*TRON, "--config", str(self.config), *args], env=env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.tree)
        if check and proc.returncode != 0:
            raise AssertionError(f"tron {' '.join(args)} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
        return proc


def new_mesh(tmp: Path, tree: Path | None, **kw) -> Mesh:
    mesh = make_mesh(tmp, fast=False, **kw)
    if tree is not None:
        mesh.__class__ = BeforeMesh
        mesh.tree = tree
        mesh.env["PYTHONPATH"] = str(tree)
    return mesh


def fault(mesh: Mesh, provider: str, kind: str, **kw) -> None:
    code, body = mesh.http("PUT", mesh.url("llm-sim") + f"/sim/faults/{provider}", {"kind": kind, **kw})
    if code != 200:
        raise RuntimeError(f"llm-sim refused the fault: {body}")


def counters(mesh: Mesh) -> dict:
    return {p: v["counters"] for p, v in mesh.http("GET", mesh.url("llm-sim") + "/sim/faults", token=False)[1]
            ["providers"].items()}


def submit(mesh: Mesh, prompt: str) -> tuple[str, float]:
    t0 = time.monotonic()
    code, body = mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": prompt})
    if code != 202:
        raise RuntimeError(f"the gateway refused the run: {code} {body}")
    return body["run_id"], t0


def ended(mesh: Mesh, run_id: str, timeout: float = 900) -> tuple[dict, float]:
    run = wait_for(lambda: (r := mesh.http("GET", mesh.url("gateway") + f"/runs/{run_id}", token=False)[1])
                   and r["status"] != "running" and r, timeout, f"run {run_id} to end", interval=0.01)
    return run, time.monotonic()


def pids(mesh: Mesh) -> dict[str, int]:
    return {s["name"]: s["pid"] for s in mesh.status()["services"]}


def ladder_counts(mesh: Mesh) -> dict[str, int]:
    return {r["retry_type"]: r["n"] for r in mesh.rows(
        "SELECT retry_type, COUNT(*) AS n FROM retry_history GROUP BY retry_type")}


def settle(mesh: Mesh) -> None:
    mesh.up()
    time.sleep(2.5)  # the agents finish loading the SDKs, as a mesh in service has


def scenario_down(tmp: Path, tree: Path | None, runs: int) -> dict:
    providers = {} if tree is not None else {"on_all_down": "fail"}
    mesh = new_mesh(tmp, tree, providers=providers)
    try:
        settle(mesh)
        before = pids(mesh)
        fault(mesh, "anthropic", "error")
        fault(mesh, "ollama", "error")
        sent0 = counters(mesh)
        times, reasons = [], []
        for n in range(runs):
            run_id, t0 = submit(mesh, f"outage run {n}")
            run, t1 = ended(mesh, run_id)
            times.append(t1 - t0)
            reasons.append((run.get("failure") or {}).get("reason"))
            print(f"    run {n}: {run['status']} after {t1 - t0:.2f} s", file=sys.stderr, flush=True)
        sent = counters(mesh)
        after = pids(mesh)
        counts = ladder_counts(mesh)
        looping = mesh.rows("SELECT COUNT(*) AS n FROM events WHERE kind = 'crash_loop_started'")[0]["n"]
        return {"first_s": times[0], "later_s": times[1:], "later_median_s": percentile(times[1:], 0.5),
                "reasons": reasons, "child_restarts": counts.get("child_restart", 0),
                "pids_changed": sorted(n for n in before if before[n] != after.get(n)),
                "switches": counts.get("llm_change", 0), "provider_retries": counts.get("provider_retry", 0),
                "crash_loop_episodes": looping,
                "requests": {p: sent[p]["requests"] - sent0[p]["requests"] for p in ("anthropic", "ollama")}}
    finally:
        leftovers.extend(cleanup(mesh))


def scenario_wave(tmp: Path, tree: Path | None, wave: int) -> dict:
    mesh = new_mesh(tmp, tree)
    try:
        settle(mesh)
        before = pids(mesh)
        sent0 = counters(mesh)["anthropic"]
        # The limit lifts after 6 s: cleared from here, as the older llm-sim has no duration_ms.
        fault(mesh, "anthropic", "rate-limit", retry_after_ms=3000)
        lift = threading.Timer(6.0, lambda: mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults/anthropic"))
        lift.start()
        t0 = time.monotonic()
        ids: list[str] = []
        threads = [threading.Thread(target=lambda n=n: ids.append(submit(mesh, f"wave {n}")[0])) for n in range(wave)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [ended(mesh, r) for r in ids]
        last = max(t for _, t in results) - t0
        lift.join()
        sent = counters(mesh)["anthropic"]
        counts = ladder_counts(mesh)
        after = pids(mesh)
        looping = mesh.rows("SELECT COUNT(*) AS n FROM events WHERE kind = 'crash_loop_started'")[0]["n"]
        return {"done": sum(r["status"] == "done" for r, _ in results), "runs": wave, "last_run_end_s": last,
                "rate_limited": sent["faults_injected"] - sent0["faults_injected"],
                "requests": sent["requests"] - sent0["requests"], "child_restarts": counts.get("child_restart", 0),
                "pids_changed": sorted(n for n in before if before[n] != after.get(n)),
                "switches": counts.get("llm_change", 0), "crash_loop_episodes": looping}
    finally:
        leftovers.extend(cleanup(mesh))


def scenario_resume(tmp: Path) -> dict:
    mesh = new_mesh(tmp, None)
    try:
        settle(mesh)
        fault(mesh, "anthropic", "error")
        fault(mesh, "ollama", "error")
        run_id, _ = submit(mesh, "parked run")
        wait_for(lambda: mesh.rows("SELECT 1 FROM tasks WHERE run_id = ? AND status = 'parked'", (run_id,)), 120,
                 "a task to park", interval=0.02)
        time.sleep(1.0)  # parked for a moment, as in an outage
        cleared = time.monotonic()
        mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")
        run, t_end = ended(mesh, run_id)
        closed = mesh.rows("SELECT MIN(mono) AS m FROM events WHERE kind = 'provider_closed'")[0]["m"]
        finished = mesh.rows("SELECT MAX(mono) AS m FROM events WHERE kind = 'task_done' AND run_id = ?",
                             (run_id,))[0]["m"]
        return {"status": run["status"], "clear_to_done_s": t_end - cleared,
                "closed_to_done_s": (finished - closed) if closed and finished else None}
    finally:
        leftovers.extend(cleanup(mesh))


def scenario_own(tmp: Path, wave: int) -> dict:
    """Every agent on its own: the SDK's retries, honouring retry-after, no shared hold."""
    mesh = new_mesh(tmp, None, services={"llm-sim": {"role": "llm_sim", "port": 6190}})
    try:
        mesh.up()
        sim = mesh.url("llm-sim")
        sent0 = counters(mesh)["anthropic"]
        fault(mesh, "anthropic", "rate-limit", retry_after_ms=3000)
        lift = threading.Timer(6.0, lambda: mesh.http("DELETE", sim + "/sim/faults/anthropic"))
        lift.start()

        async def wave_of_agents() -> list[bool]:
            import anthropic

            client = anthropic.AsyncAnthropic(base_url=sim, api_key="sim-key", max_retries=10, timeout=30)

            async def one(n: int) -> bool:
                reply = await client.messages.create(model="claude-sonnet-4-5", max_tokens=64,
                                                     messages=[{"role": "user", "content": f"task {n}"}])
                return bool(reply.content)

            try:
                return await asyncio.gather(*(one(n) for n in range(wave)))
            finally:
                await client.close()

        t0 = time.monotonic()
        done = asyncio.run(wave_of_agents())
        took = time.monotonic() - t0
        lift.join()
        sent = counters(mesh)["anthropic"]
        return {"done": sum(done), "runs": wave, "last_run_end_s": took,
                "rate_limited": sent["faults_injected"] - sent0["faults_injected"],
                "requests": sent["requests"] - sent0["requests"]}
    finally:
        leftovers.extend(cleanup(mesh))


leftovers: list[str] = []


def report(r: dict, args) -> list[str]:
    lines = [f"shipped defaults; {args.runs} runs per outage, a wave of {args.wave}; before = {args.before}; "
             f"load {os.getloadavg()[0]:.2f}", "",
             "| measure | before | after |", "|---|---|---|"]
    if args.only != "wave":
        lines += down_rows(r["down"]["before"], r["down"]["after"], args)
    lines += wave_rows(r["wave"]["before"], r["wave"]["after"], r["own"], args)
    if args.only != "wave":
        lines += resume_row(r["resume"])
    return lines


def down_rows(b: dict, a: dict, args) -> list[str]:
    return [f"| both providers down: the first run ends after | {b['first_s']:.2f} s | {a['first_s']:.2f} s |",
             f"| both providers down: each later run ends after (median) | {b['later_median_s']:.2f} s | "
             f"{a['later_median_s']:.2f} s |",
             f"| both providers down: process restarts ({args.runs} runs) | {b['child_restarts']} "
             f"({len(b['pids_changed'])} services' pids changed) | {a['child_restarts']} "
             f"({len(a['pids_changed'])} changed) |",
             f"| both providers down: provider switches / requests sent | {b['switches']} / "
             f"{sum(b['requests'].values())} | {a['switches']} / {sum(a['requests'].values())} |",
             f"| both providers down: crash-loop episodes | {b['crash_loop_episodes']} | {a['crash_loop_episodes']} |"]


def wave_rows(wb: dict, wa: dict, own: dict, args) -> list[str]:
    return [f"| {args.wave} runs at once, 429 retry-after 3 s for 6 s: requests answered 429 | {wb['rate_limited']} | "
              f"{wa['rate_limited']} (every agent on its own, SDK retries: {own['rate_limited']}) |",
              f"| same: process restarts / switches / crash-loop episodes | {wb['child_restarts']} / {wb['switches']} / "
              f"{wb['crash_loop_episodes']} | {wa['child_restarts']} / {wa['switches']} / {wa['crash_loop_episodes']} |",
              f"| same: runs completed, last one after | {wb['done']}/{wb['runs']}, {wb['last_run_end_s']:.2f} s | "
              f"{wa['done']}/{wa['runs']}, {wa['last_run_end_s']:.2f} s (on its own: {own['done']}/{own['runs']}, "
              f"{own['last_run_end_s']:.2f} s) |"]


def resume_row(res: dict) -> list[str]:
    closed = f"{res['closed_to_done_s']:.2f} s" if res["closed_to_done_s"] is not None else "-"
    return [f"| parked run after the outage ends: clear -> run done / provider closed -> run done | "
            f"(no parking: runs failed) | {res['clear_to_done_s']:.2f} s / {closed} |"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--wave", type=int, default=10)
    ap.add_argument("--before", default=BEFORE)
    ap.add_argument("--only", choices=("wave",), help="only the wave, before and after, and its own-retries row")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict = {"down": {}, "wave": {}}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        tree = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for label, code in (("before", tree), ("after", None)):  # side by side, one after the other
                if args.only != "wave":
                    print(f"  down ({label})", file=sys.stderr, flush=True)
                    results["down"][label] = scenario_down(tmp / f"down-{label}", code, args.runs)
                print(f"  wave ({label})", file=sys.stderr, flush=True)
                results["wave"][label] = scenario_wave(tmp / f"wave-{label}", code, args.wave)
            print("  resume, own", file=sys.stderr, flush=True)
            if args.only != "wave":
                results["resume"] = scenario_resume(tmp / "resume")
            results["own"] = scenario_own(tmp / "own", args.wave)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
    print("\n".join(report(results, args)))
    results["loadavg_end"] = os.getloadavg()
    return finish(args.json, results, leftovers)


if __name__ == "__main__":
    sys.exit(main())
