"""A crash loop under the shipped default policy: a command that exits 0.2 s after every
start, for a minute, then stops crashing.

One mesh with one ``command`` service (no liveness probe: a command without one counts as
healthy once spawned) whose program sleeps 0.2 s and exits 1, unless a flag file exists,
in which case it stays up. The policy is mesh.toml's, nothing overridden (max_restarts 3,
restart_window 60 s, backoff 0.5 s doubling to a 10 s cap, +-20 %, min_uptime 1 s). Every
incarnation dies 0.2 s after its start, before min_uptime: each failure is unstable and
the backoff grows, up to the cap.

Measured (times from the daemon's registry events, CLOCK_MONOTONIC, the same clock in
every process):

  minute        [first start, first start + --seconds]: restarts (``spawned`` events after
                the first), the delays between them, alerts, ``child_restart`` rows,
                crash-loop escalation rows (retry_type escalation, reason crash_looping) and
                ``crash_loop_started`` events; first start -> ``crash_looping`` true in the
                daemon's /status (the JSON ``tron status --json`` prints; polled every 50 ms,
                then read once with the CLI); the daemon's CPU seconds over the minute
                (psutil cpu_times of its pid, before and after)
  recovery      at the end of the minute the benchmark creates the flag file: the next
                restart (at the cap) stays up. Flag -> running for good, and last failure ->
                ``crash_looping`` false (the issue: once a whole restart_window passes with no
                failure), read from /status and the ``crash_loop_ended`` event

The bound from issue 8: no more than 60/backoff_max + max_restarts + 2 restarts a minute
(11 with the defaults).

    .venv/bin/python -m benchmarks.crash_loop [--seconds 60] [--json benchmarks/results/crash_loop.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.peers import end_leftovers, tagged_processes
from tron.common.config import Policy
from tests.harness import cleanup, make_mesh, wait_for

NAME = "crashy"
CRASHER = """\
import os, sys, time
if os.path.exists(sys.argv[1]):  # the flag: this start is the one that stays up
    while True:
        time.sleep(3600)
time.sleep(0.2)
sys.exit(1)
"""
STATUS_POLL = 0.05


def mono_events(mesh, *kinds: str) -> list[dict]:
    marks = ",".join("?" * len(kinds))
    return mesh.rows(f"SELECT kind, mono, payload FROM events WHERE agent = ? AND kind IN ({marks}) ORDER BY mono",
                     (NAME, *kinds))


def service(mesh) -> dict:
    return mesh.service(NAME)


def run(seconds: float, workdir: Path, tag: str) -> dict:
    flag = workdir / "stop-crashing"
    command = ["{python}", "-c", CRASHER, str(flag), tag]
    mesh = make_mesh(workdir / "mesh", fast=False, services={NAME: {"command": command, "port": 6160}})
    policy = Policy(**mesh.policy)
    out: dict = {"policy": policy.model_dump(), "seconds": seconds,
                 "bound": seconds / policy.backoff_max + policy.max_restarts + 2}
    leftovers: list[str] = []
    try:
        up = mesh.tron("up", "--detach")  # 0 or 1: the service may be between two crashes when it settles
        out["tron_up_exit"] = up.returncode
        daemon = psutil.Process(mesh.status()["daemon"]["pid"])
        cpu0, cpu0_at = daemon.cpu_times(), time.monotonic()
        first = wait_for(lambda: mono_events(mesh, "spawned"), 10, "the first spawn")[0]["mono"]
        end = first + seconds

        # first start -> crash_looping true, as the daemon's /status says it
        looping_at = None
        while time.monotonic() < end:
            if looping_at is None and service(mesh)["crash_looping"]:
                looping_at = time.monotonic()
                cli = json.loads(mesh.tron("status", "--json", check=True).stdout)
                out["cli_status_when_first_seen"] = {
                    "crash_looping": next(s for s in cli["services"] if s["name"] == NAME)["crash_looping"],
                    "daemon_crash_looping": cli.get("crash_looping")}
            time.sleep(STATUS_POLL if looping_at is None else 0.5)
        cpu1, cpu1_at = daemon.cpu_times(), time.monotonic()
        flag.touch()  # from now on, the next start stays up
        flag_at = time.monotonic()

        spawned = [e["mono"] for e in mono_events(mesh, "spawned")]
        minute = [t for t in spawned if first <= t <= end]
        alerts = mesh.rows("SELECT mono, stable, reason FROM alerts WHERE agent = ? AND mono <= ?", (NAME, end))
        rows = mesh.rows("SELECT retry_type, reason, case_id, mono FROM retry_history WHERE agent_id = ? "
                         "AND mono <= ?", (NAME, end))
        started = mono_events(mesh, "crash_loop_started")
        out["minute"] = {
            "restarts": len(minute) - 1,
            "gaps_between_starts_s": [round(b - a, 3) for a, b in zip(minute, minute[1:])],
            "alerts": len(alerts), "unstable_alerts": sum(1 for a in alerts if not a["stable"]),
            "child_restart_rows": sum(r["retry_type"] == "child_restart" for r in rows),
            "crash_loop_escalation_rows": sum(r["retry_type"] == "escalation" and r["reason"] == "crash_looping"
                                              for r in rows),
            "crash_loop_started_events": len([e for e in started if e["mono"] <= end]),
            "cases": sorted({r["case_id"] for r in rows}),
            "first_start_to_crash_looping_s": None if looping_at is None else looping_at - first,
            "first_start_to_crash_loop_started_event_s": started[0]["mono"] - first if started else None,
            "failures_before_crash_looping": sum(1 for a in alerts if started and a["mono"] <= started[0]["mono"]),
            "daemon_cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 3),
            "daemon_cpu_window_s": round(cpu1_at - cpu0_at, 1),
        }

        # recovery: the next start stays up; the episode ends a restart_window after the last failure
        wait = policy.restart_window + policy.backoff_max * (1 + policy.backoff_jitter) + 15
        ended_at = wait_for(lambda: not service(mesh)["crash_looping"] and time.monotonic(), wait,
                            "crash_looping to clear", interval=0.2)
        svc = service(mesh)
        last_failure = mesh.rows("SELECT MAX(mono) AS m FROM alerts WHERE agent = ?", (NAME,))[0]["m"]
        after_flag = [t for t in (e["mono"] for e in mono_events(mesh, "spawned")) if t > flag_at]
        ended = mono_events(mesh, "crash_loop_ended")
        out["recovery"] = {
            "flag_to_staying_start_s": after_flag[0] - flag_at if after_flag else None,
            "starts_after_flag": len(after_flag),
            "last_failure_to_crash_looping_false_s": ended_at - last_failure,
            "last_failure_to_crash_loop_ended_event_s": ended[0]["mono"] - last_failure if ended else None,
            "flag_to_crash_looping_false_s": ended_at - flag_at,
            "state_at_end": svc["state"], "uptime_at_end": svc["uptime"],
            "crash_loop_escalation_rows_total": mesh.rows(
                "SELECT COUNT(*) AS n FROM retry_history WHERE agent_id = ? AND retry_type = 'escalation' "
                "AND reason = 'crash_looping'", (NAME,))[0]["n"],
        }
    finally:
        leftovers += cleanup(mesh)
        leftovers += end_leftovers(tagged_processes(tag))
    out["left_behind"] = leftovers
    return out


def report(out: dict, facts: dict) -> str:
    m, r, p = out["minute"], out["recovery"], out["policy"]

    def s(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f} s"

    bound = out["bound"]
    gaps = m["gaps_between_starts_s"]
    lines = [
        f"python {facts['python']}, nproc {facts['nproc']}, load {facts['loadavg_start'][0]:.2f} -> "
        f"{facts['loadavg_end'][0]:.2f}; shipped defaults: max_restarts {p['max_restarts']}, restart_window "
        f"{p['restart_window']:g} s, backoff {p['backoff_initial']:g} s x{p['backoff_factor']:g} to "
        f"{p['backoff_max']:g} s +-{p['backoff_jitter']:.0%}, min_uptime {p['min_uptime']:g} s",
        "",
        f"| a command that exits 0.2 s after every start, {out['seconds']:g} s | measured | issue 8 |",
        "|---|---|---|",
        f"| restarts | {m['restarts']} | <= {bound:g}: {'met' if m['restarts'] <= bound else 'NOT met'} |",
        f"| start-to-start gaps (0.2 s of life + the backoff) | {', '.join(f'{g:.2f}' for g in gaps)} s | grows "
        f"only with unstable failures, capped at {p['backoff_max']:g} s |",
        f"| first start -> crash_looping true (`tron status --json`) | {s(m['first_start_to_crash_looping_s'])} "
        f"(event: {s(m['first_start_to_crash_loop_started_event_s'])}), after {m['failures_before_crash_looping']} "
        f"failures | within max_restarts ({p['max_restarts']}) failures: "
        f"{'met' if 0 < m['failures_before_crash_looping'] <= p['max_restarts'] else 'NOT met'} |",
        f"| crash-loop escalation rows / crash_loop_started events | {m['crash_loop_escalation_rows']} / "
        f"{m['crash_loop_started_events']} | once per episode: "
        f"{'met' if m['crash_loop_escalation_rows'] == 1 else 'NOT met'} |",
        f"| alerts (unstable) / child_restart rows | {m['alerts']} ({m['unstable_alerts']}) / "
        f"{m['child_restart_rows']} | - |",
        f"| daemon CPU over those {out['seconds']:g} s | {m['daemon_cpu_s']:.2f} s in {m['daemon_cpu_window_s']:g} s "
        f"({100 * m['daemon_cpu_s'] / m['daemon_cpu_window_s']:.1f} % of a core) | - |",
        f"| flag file created -> the start that stays up | {s(r['flag_to_staying_start_s'])} "
        f"({r['starts_after_flag']} start(s) after the flag) | at most backoff_max (+jitter) |",
        f"| last failure -> crash_looping false | {s(r['last_failure_to_crash_looping_false_s'])} (event "
        f"{s(r['last_failure_to_crash_loop_ended_event_s'])}); flag -> false {s(r['flag_to_crash_looping_false_s'])} "
        f"| leaves by itself after restart_window ({p['restart_window']:g} s): "
        f"{'met' if r['last_failure_to_crash_looping_false_s'] is not None else 'NOT met'} |",
        f"| state at the end | {r['state_at_end']}, up {r['uptime_at_end']} s; crash-loop escalation rows in all "
        f"{r['crash_loop_escalation_rows_total']} | - |",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the command keeps crashing")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain SIGTERM still runs the cleanup below
    facts = {"python": platform.python_version(), "nproc": len(os.sched_getaffinity(0)),
             "kernel": platform.release(), "loadavg_start": os.getloadavg()}
    tag = f"crashbench-{secrets.token_hex(4)}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    started = time.monotonic()
    try:
        out = run(args.seconds, workdir, tag)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    facts["loadavg_end"] = os.getloadavg()
    facts["elapsed_s"] = round(time.monotonic() - started, 1)
    out["facts"] = facts
    print(report(out, facts))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    if out["left_behind"]:
        print(f"LEFT BEHIND (killed): {out['left_behind']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
