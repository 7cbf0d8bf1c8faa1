"""Issue 14's last row: a parent delegating tasks to a child that is killed under it, with
the child's listening socket held by the daemon (the default for agents) and without it
(``socket = "none"``), side by side in one run.

Two meshes under the SHIPPED DEFAULT policy, each ``llm-sim``, ``gateway``, ``root`` and
``programmer-1`` (its parent the root): every run goes gateway -> root, the root delegates
one task to programmer-1 (two LLM steps on llm-sim, a checkpoint after each), and the
result climbs back. They differ in one line: programmer-1's ``socket``.

Method. For each row, ``--clients`` threads submit runs back to back (``POST /runs`` to the
gateway, then the daemon's ``GET /runs/{id}`` every 10 ms until the run ends), first
``--baseline`` seconds with no kill, then while programmer-1's main process is SIGKILLed
(the pid the daemon's /status names) every 1.5-2 s, never before its replacement has been
running for min_uptime + 0.2-0.4 s (so no kill counts as a crash of an unstable
incarnation). The rows take turns in blocks of ``BLOCK`` kills, the order shuffled per
block, so the machine's noise lands on both. After the last kill the clients' runs are
waited for (nothing is abandoned), and each row's registry is read: how many runs ended
done or failed, how many tasks a kill carried over to the next incarnation (attempt > 1),
and how many of the root's pushes of a task to programmer-1 failed (the root's log):
refused (nothing listening) or cut off (the child died with the request in hand). Either
way the daemon hands the task to the next incarnation when it is healthy.

    .venv/bin/python -m benchmarks.delegation [--kills 20] [--seed 1] [--json benchmarks/results/delegation.json]
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import finish, take_turns
from benchmarks.peers import machine_facts
from tron.common.config import Policy
from tron.scripts.stats import percentile
from tests.harness import cleanup, make_mesh

BLOCK = 5
SPACING = (1.5, 2.0)
STABLE_MARGIN = (0.2, 0.4)
POLL = 0.01
RUN_TIMEOUT = 120.0
CHILD = "programmer-1"


def services(socket: str | None) -> dict:
    child = {"role": "programmer", "port": 6130, "parent": "root"}
    if socket:
        child["socket"] = socket
    return {"llm-sim": {"role": "llm_sim", "port": 6190}, "gateway": {"role": "gateway", "port": 6120},
            "root": {"role": "root", "port": 6100}, CHILD: child}


class Row:
    def __init__(self, workdir: Path, label: str, socket: str | None) -> None:
        self.label = label
        self.mesh = make_mesh(workdir / label.split()[0], fast=False, services=services(socket))
        self.baseline: list[float] = []
        self.under: list[float] = []
        self.ends: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.kills: list[dict] = []
        self.kills_left = 0
        self.run_ids: list[str] = []

    def child(self) -> dict:
        return self.mesh.service(CHILD)

    def running_pid(self, other_than: int | None = None, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.child()
            if s["state"] == "running" and s["pid"] and s["pid"] != other_than:
                return s["pid"]
            time.sleep(POLL)
        raise RuntimeError(f"{self.label}: {CHILD} not running again within {timeout} s")


class Clients:
    """``n`` threads submitting runs back to back; each run's latency and end are noted."""

    def __init__(self, row: Row, n: int) -> None:
        self.row, self.n = row, n
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def __enter__(self) -> "Clients":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(RUN_TIMEOUT + 10)

    def _note(self, key: str) -> None:
        with self.lock:
            self.row.errors[key] = self.row.errors.get(key, 0) + 1

    def _loop(self) -> None:
        mesh = self.row.mesh
        while not self.stop.is_set():
            t0 = time.monotonic()
            code, body = mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": "delegate under kills"})
            if code != 202:
                self._note(f"submit {code}")
                time.sleep(0.1)
                continue
            run_id = body["run_id"]
            with self.lock:
                self.row.run_ids.append(run_id)
            status, run = "running", {}
            while time.monotonic() - t0 < RUN_TIMEOUT:  # a run is waited for to its end, whatever happens
                code, run = mesh.http("GET", mesh.url("daemon") + f"/runs/{run_id}", token=False)
                if code == 200 and run["status"] != "running":
                    status = run["status"]
                    break
                time.sleep(POLL)
            if status != "done":
                failure = run.get("failure") or {}
                self._note(f"{status}: {failure.get('reason')} ({failure.get('agent')}; {run_id})")
            with self.lock:
                self.row.ends[status] = self.row.ends.get(status, 0) + 1
                if status == "done":
                    self.latencies.append(time.monotonic() - t0)


def block(row: Row, n: int, baseline: float, args, rng: random.Random, min_uptime: float) -> None:
    pid = row.running_pid()
    with Clients(row, args.clients) as clients:
        time.sleep(baseline)
    row.baseline += clients.latencies
    with Clients(row, args.clients) as clients:
        t0 = time.monotonic()
        next_kill = t0 + rng.uniform(0.3, 0.6)
        for _ in range(n):
            time.sleep(max(0.0, next_kill - time.monotonic()))
            pid = row.running_pid()
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            row.kills_left -= 1
            new = row.running_pid(other_than=pid)
            back = time.monotonic()
            row.kills.append({"at": round(t_kill - t0, 4), "old_pid": pid, "new_pid": new,
                              "running_again": round(back - t_kill, 4)})
            next_kill = max(t_kill + rng.uniform(*SPACING), back + min_uptime + rng.uniform(*STABLE_MARGIN))
        time.sleep(max(0.0, t_kill + rng.uniform(*SPACING) - time.monotonic()))
    row.under += clients.latencies


def registry_facts(row: Row) -> dict:
    mesh = row.mesh
    mesh.flushed(timeout=30)
    tasks = mesh.rows("SELECT attempt, status FROM tasks WHERE agent = ?", (CHILD,))
    # The parent pushes the task to the child itself (the daemon redispatches to a new
    # incarnation): a push that found nothing listening is logged by the parent.
    log = (mesh.home / "logs" / "root.log").read_text(errors="replace").splitlines()
    pushes = [line for line in log if "dispatch of" in line and f"to {CHILD} failed" in line]
    refused = sum("Cannot connect" in line or "Connection refused" in line for line in pushes)
    restarts = {f"{r['retry_type']}:{r['reason']}": r["n"] for r in mesh.rows(
        "SELECT retry_type, reason, COUNT(*) AS n FROM retry_history WHERE agent_id = ? GROUP BY retry_type, reason",
        (CHILD,))}
    return {"child_tasks": len(tasks), "carried_over": sum(t["attempt"] > 1 for t in tasks),
            "child_tasks_failed": sum(t["status"] == "failed" for t in tasks), "pushes_refused": refused,
            "pushes_cut_off": len(pushes) - refused,
            "restarts_recorded": restarts}


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def row_summary(row: Row, facts: dict) -> dict:
    def pct(values: list[float], q: float) -> float | None:
        return percentile(values, q) if values else None

    b50, b99, u50, u99 = pct(row.baseline, 0.5), pct(row.baseline, 0.99), pct(row.under, 0.5), pct(row.under, 0.99)
    return {"kills": len(row.kills), "runs": sum(row.ends.values()), "ends": row.ends, "errors": row.errors,
            "baseline_p50": b50, "baseline_p99": b99, "kills_p50": u50, "kills_p99": u99,
            "added_p50": None if None in (b50, u50) else u50 - b50,
            "added_p99": None if None in (b99, u99) else u99 - b99,
            "running_again_median": pct([k["running_again"] for k in row.kills], 0.5), **facts}


def table(summary: dict) -> str:
    lines = ["| row | kills | runs | failed | run p50 / p99, no kills (ms) | under kills (ms) | added p50 / p99 (ms) "
             "| tasks carried over a kill | pushes refused / cut off |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, s in summary.items():
        failed = sum(n for end, n in s["ends"].items() if end != "done")
        lines.append(f"| {label} | {s['kills']} | {s['runs']} | {failed} | {ms(s['baseline_p50'])} / "
                     f"{ms(s['baseline_p99'])} | {ms(s['kills_p50'])} / {ms(s['kills_p99'])} | "
                     f"{ms(s['added_p50'])} / {ms(s['added_p99'])} | {s['carried_over']} of {s['child_tasks']} | "
                     f"{s['pushes_refused']} / {s['pushes_cut_off']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs of the child per row")
    ap.add_argument("--baseline", type=float, default=8.0, help="seconds of runs without kills per row")
    ap.add_argument("--clients", type=int, default=3, help="threads submitting runs back to back")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write every sample and the summary here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.monotonic()
    facts = machine_facts()
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix=f"delegationbench-{secrets.token_hex(4)}-"))
    rows: list[Row] = []
    leftovers: list[str] = []
    summary: dict = {}
    try:
        rows = [Row(workdir, "held socket (default)", None), Row(workdir, "own socket (socket = \"none\")", "none")]
        for r in rows:
            r.mesh.up()
            r.kills_left = args.kills
        min_uptime = Policy(**rows[0].mesh.policy).min_uptime
        print(f"2 meshes up after {time.monotonic() - started:.1f} s; {args.kills} kills each ...", file=sys.stderr)
        take_turns(rows, args.kills, BLOCK, rng,
                   lambda r, n, share: block(r, n, args.baseline * share, args, rng, min_uptime))
        summary = {r.label: row_summary(r, registry_facts(r)) for r in rows}
    finally:
        for r in rows:
            leftovers += cleanup(r.mesh)
        shutil.rmtree(workdir, ignore_errors=True)

    facts["loadavg_end"] = os.getloadavg()
    facts["seconds"] = round(time.monotonic() - started, 1)
    print(f"{args.kills} SIGKILLs of {CHILD} per row, {args.clients} clients, seed {args.seed}; python "
          f"{facts['python']}, nproc {facts['nproc']}; load {facts['loadavg_start'][0]:.2f} -> "
          f"{facts['loadavg_end'][0]:.2f}; {facts['seconds']:.0f} s\n")
    print(table(summary))
    return finish(args.json, {"facts": facts, "args": {**vars(args), "json": str(args.json), "block": BLOCK},
                              "summary": summary,
                              "rows": {r.label: {"kills": r.kills, "baseline_s": [round(x, 5) for x in r.baseline],
                                                 "under_kills_s": [round(x, 5) for x in r.under]} for r in rows}},
                  leftovers, indent=None)


if __name__ == "__main__":
    sys.exit(main())
