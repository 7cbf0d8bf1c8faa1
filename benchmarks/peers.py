"""Recovery against peers: the same foreign service under a plain respawn loop, supervisord,
circus and Tron with its shipped default policy, killed while healthy, all in one run.

The child (benchmarks/child_service.py: Python + aiohttp, ``GET /health`` answers JSON with
its pid) is supervised six ways at once, each on its own loopback port:

  plain loop        benchmarks/respawn_loop.py: wait() on the child, start it again at once.
                    The floor for any supervisor that brings a program back with a cold start.
  supervisord       ``autorestart=true``, ``startsecs=0``; its other defaults
  circus cd=5       circusd with one watcher, its default ``check_delay`` (5 s)
  circus cd=1       the same with ``check_delay = 1``
  Tron              a ``command`` service under the SHIPPED DEFAULT policy (mesh.toml's
                    [policy], nothing overridden), with an HTTP liveness probe as a
                    service-level setting (0.2 s interval, 0.3 s timeout, 2 failures)
  Tron (tuned)      the same service under a tuned policy, labelled as such: max_restarts 100,
                    restart_window 0.001 s (the policy this benchmark used before issue 8: no
                    failure ever counts towards a crash loop)

Method (issue 8, "Done means"). Every supervisor's child is SIGKILLed ``--kills`` times,
about 2 s (SPACING, +-0.3 s) apart, and only once it has been healthy longer than
``min_uptime`` (1 s) + 0.2-0.5 s: each kill hits a stable incarnation. The supervisors run
side by side and their kill schedules interleave in time (one loop, no threads; at least
0.1 s between any two kills), so the machine's noise lands on all of them, and each kill
falls at a random phase of every peer's own timers. After a kill the loop polls that
child's port every 5 ms:

  kill -> healthy       a NEW pid answers /health (100 ms request timeout)
  kill -> new process   that pid's fork time (/proc/<pid>/stat starttime against
                        CLOCK_BOOTTIME taken at the kill; 10 ms resolution, so a fork
                        reads 0-10 ms early)

Then a paired phase (``--pairs``, 10): the plain loop's child and Tron's child are SIGKILLed
at the same instant, about 2 s apart, each time once both have been healthy > min_uptime.
Their replacements cold-start side by side under the same load, so the per-kill difference
(Tron minus plain loop) is free of most of the cold start's noise, which on a shared 2-core
machine is hundreds of ms from one kill to the next and swamps a 50 ms difference between
two medians taken at different moments. It also spreads whatever CPU Tron's daemon spends
during the restart over both children, so it does not show that cost (the supervisor CPU
column does).

Then the hang case: the child is SIGSTOPped once under every supervisor at the same time
and each is watched for 20 s for a new pid answering /health.

Everything started here carries a per-run tag on its command line (the config paths of the
supervisors, ``--tag`` of the children); at the end every supervisor is stopped, anything
still alive with the tag (or the mesh's home) is killed by pid and reported.

    .venv/bin/python -m benchmarks.peers [--kills 15] [--pairs 10] [--seed 1] [--json benchmarks/results/peers.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import psutil

from tron.common.config import Policy
from benchmarks import finish
from tron.scripts.stats import percentile
from tron.common.processes import describe, kill_tree
from tests.harness import cleanup, make_mesh

HERE = Path(__file__).resolve().parent
CHILD = HERE / "child_service.py"
LOOP = HERE / "respawn_loop.py"
BIN = Path(sys.executable).parent

SPACING = 2.0             # seconds between two kills of the same child
SPACING_JITTER = 0.3
STABLE_MARGIN = (0.2, 0.5)  # a kill comes at least min_uptime + this long after the child was healthy
KILL_GAP = 0.1            # between any two kills (of different supervisors)
HEALTH_POLL = 0.005       # /health poll of a child being recovered
HEALTH_TIMEOUT = 0.1      # per /health request
RECOVERY_TIMEOUT = 30.0   # a kill not recovered by then is recorded as a failure
HANG_WINDOW = 20.0        # how long a SIGSTOPped child is watched
READY_TIMEOUT = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

TUNED_POLICY = {"max_restarts": 100, "restart_window": 0.001}
TRON_LIVENESS = {"interval": 0.2, "timeout": 0.3, "failure_threshold": 2}


# -- probes -------------------------------------------------------------------------------------

def get_health(port: int, timeout: float = HEALTH_TIMEOUT) -> dict | None:
    """The child's /health body, or None (refused, timed out, not 200, not JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read()
        return json.loads(body) if resp.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def forked_at(pid: int) -> float | None:
    """When ``pid`` was forked, on CLOCK_BOOTTIME, to 1/CLK_TCK (the kernel's starttime,
    truncated: a fork reads up to one tick early). No polling of the process table needed."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19]) / CLK_TCK  # field 22, counted after the comm field


# -- the supervisors ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_argv(port: int, tag: str) -> list[str]:
    return [sys.executable, str(CHILD), "--port", str(port), "--tag", tag]


class Peer:
    """One supervisor running the child on ``port``; ``pid`` is the supervisor process."""

    label = ""

    def __init__(self, workdir: Path, tag: str) -> None:
        self.workdir = workdir
        self.tag = tag
        self.port = 0
        self.pid: int | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> list[str]:
        """Stop the supervisor and its children; return what had to be killed."""
        raise NotImplementedError

    def cpu_seconds(self) -> float | None:
        """User + system CPU of the supervisor process itself (not its children)."""
        try:
            t = psutil.Process(self.pid).cpu_times()
        except psutil.Error:
            return None
        return t.user + t.system

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> int:
        """Until the child answers /health and is in the supervisor's process tree; its pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = get_health(self.port, 0.5)
            if body:
                try:
                    kids = {p.pid for p in psutil.Process(self.pid).children(recursive=True)}
                except psutil.Error:
                    kids = set()
                if body.get("pid") in kids:
                    return body["pid"]
            time.sleep(0.02)
        raise RuntimeError(f"{self.label}: the child never answered /health on port {self.port}")


class TronPeer(Peer):
    def __init__(self, workdir: Path, tag: str, label: str, policy: dict | None) -> None:
        super().__init__(workdir, tag)
        self.label = label
        self.policy = policy  # None: the shipped defaults, nothing written over them
        self.mesh = None

    def start(self) -> None:
        command = ["{python}", str(CHILD), "--port", "{port}", "--tag", self.tag]
        liveness = {"url": "http://127.0.0.1:{port}/health", **TRON_LIVENESS}
        services = {"child": {"command": command, "port": 6150, "liveness": liveness}}
        home = self.workdir / self.label.replace(" ", "-").replace("(", "").replace(")", "")
        self.mesh = make_mesh(home, fast=False, services=services, policy=self.policy)
        self.port = self.mesh.port("child")
        self.mesh.up()
        self.pid = self.mesh.status()["daemon"]["pid"]

    def daemon_steps(self, samples: list[dict]) -> None:
        """Add to each of this peer's kills when the daemon persisted the alert and when it
        spawned the replacement, from its registry events (CLOCK_MONOTONIC is one clock for
        every process of the machine)."""
        events = self.mesh.rows("SELECT kind, mono FROM events WHERE agent = 'child' AND kind IN "
                                "('alert_raised', 'spawned') ORDER BY mono")
        sessions = {r["pid"]: r for r in self.mesh.rows("SELECT s.pid, s.healthy_mono, a.stable FROM sessions s "
                                                        "LEFT JOIN alerts a ON a.incarnation = s.incarnation "
                                                        "WHERE s.agent = 'child'")}
        for s in samples:
            if s["peer"] != self.label:
                continue
            old = sessions.get(s["old_pid"], {})
            # how long Tron itself had seen the killed incarnation healthy, and whether it called it stable
            s["tron_healthy_for_at_kill"] = None if old.get("healthy_mono") is None \
                else s["killed_mono"] - old["healthy_mono"]
            s["tron_stable"] = None if old.get("stable") is None else bool(old["stable"])
            for kind, key in (("alert_raised", "to_alert"), ("spawned", "to_spawned")):
                mono = next((e["mono"] for e in events if e["kind"] == kind and e["mono"] > s["killed_mono"]), None)
                s[key] = None if mono is None else mono - s["killed_mono"]

    def state(self) -> dict:
        """What Tron says about the child, and what its registry recorded."""
        svc = self.mesh.service("child")
        rows = self.mesh.rows("SELECT retry_type, reason, case_id FROM retry_history WHERE agent_id = 'child'")
        return {"crash_looping": svc["crash_looping"], "restarts": svc["restarts"], "state": svc["state"],
                "child_restart_rows": sum(r["retry_type"] == "child_restart" for r in rows),
                "crash_loop_escalations": sum(r["retry_type"] == "escalation" and r["reason"] == "crash_looping"
                                              for r in rows),
                "cases": sorted({r["case_id"] for r in rows}),
                "unstable_alerts": self.mesh.rows("SELECT COUNT(*) AS n FROM alerts WHERE agent = 'child' "
                                                  "AND stable = 0")[0]["n"],
                "policy": self.mesh.policy}

    def stop(self) -> list[str]:
        return cleanup(self.mesh) if self.mesh else []


class ProcessPeer(Peer):
    """A peer that is one supervisor process we start (not daemonised) and stop."""

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.port = free_port()
        with open(self.workdir / f"{self.name}.out", "ab") as out:
            proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.workdir, start_new_session=True)
        self.popen, self.pid = proc, proc.pid

    def stop(self) -> list[str]:
        if self.pid is None:
            return []
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            children = []
        for p in children:  # a SIGSTOPped child cannot act on the supervisor's SIGTERM
            try:
                p.send_signal(signal.SIGCONT)
            except psutil.Error:
                pass
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        return end_leftovers(children)

    @property
    def name(self) -> str:
        return self.label.replace(" ", "_").replace("=", "")


class PlainLoopPeer(ProcessPeer):
    label = "plain loop"

    def argv(self) -> list[str]:
        return [sys.executable, str(LOOP), "--", *child_argv(self.port, self.tag)]


class SupervisordPeer(ProcessPeer):
    label = "supervisord"

    def argv(self) -> list[str]:
        conf = self.workdir / "supervisord.conf"
        conf.write_text("\n".join([
            "[supervisord]",
            "nodaemon = true",
            f"logfile = {self.workdir / 'supervisord.log'}",
            f"pidfile = {self.workdir / 'supervisord.pid'}",
            f"childlogdir = {self.workdir}",
            "",
            "[program:child]",
            f"command = {' '.join(child_argv(self.port, self.tag))}",
            "autorestart = true",
            "startsecs = 0",
            "",
        ]))
        return [sys.executable, str(BIN / "supervisord"), "-n", "-c", str(conf)]


class CircusPeer(ProcessPeer):
    def __init__(self, workdir: Path, tag: str, check_delay: float | None) -> None:
        super().__init__(workdir, tag)
        self.check_delay = check_delay  # None: circus's default (5 s)
        self.label = f"circus cd={check_delay or 5:g}"

    def argv(self) -> list[str]:
        conf = self.workdir / f"{self.name}.ini"
        lines = [
            "[circus]",
            f"endpoint = tcp://127.0.0.1:{free_port()}",
            f"pubsub_endpoint = tcp://127.0.0.1:{free_port()}",
            f"logoutput = {self.workdir / (self.name + '.log')}",
        ]
        if self.check_delay is not None:
            lines.append(f"check_delay = {self.check_delay:g}")
        lines += ["", "[watcher:child]", f"cmd = {' '.join(child_argv(self.port, self.tag))}", "numprocesses = 1", ""]
        conf.write_text("\n".join(lines))
        return [sys.executable, str(BIN / "circusd"), str(conf)]


# -- leftovers ------------------------------------------------------------------------------------

def tagged_processes(tag: str) -> list[psutil.Process]:
    """Every live process (but this one) with the run's tag on its command line."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and tag in " ".join(p.info["cmdline"] or []) \
                    and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` that still run (the same process as when found, not a zombie)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            continue
    return alive


def end_leftovers(procs: list[psutil.Process]) -> list[str]:
    """SIGKILL whatever of ``procs`` still runs; name each one."""
    left = still_running(procs)
    names = describe(left)
    kill_tree(left)
    return names


# -- the kills: one loop, every supervisor on its own schedule ------------------------------------

@dataclass
class Track:
    """One supervisor's kill schedule and the kill in flight, if any."""

    peer: Peer
    kills_left: int
    pid: int = 0                    # the child that answered /health last
    healthy_at: float = 0.0         # monotonic: when this loop first saw it healthy
    next_kill: float = 0.0
    last_kill: float | None = None
    killed_at: float | None = None  # monotonic, of the kill in flight
    killed_boot: float = 0.0        # CLOCK_BOOTTIME of the same instant
    next_poll: float = 0.0
    pending: dict = field(default_factory=dict)  # what is known of the kill in flight at its start
    samples: list[dict] = field(default_factory=list)


def schedule_next(t: Track, now: float, rng: random.Random, min_uptime: float) -> None:
    """About SPACING after the last kill, and never before the child has been stable."""
    spaced = (t.last_kill if t.last_kill is not None else now) + SPACING + rng.uniform(-SPACING_JITTER, SPACING_JITTER)
    t.next_kill = max(spaced, t.healthy_at + min_uptime + rng.uniform(*STABLE_MARGIN))


def kill_rounds(peers: list[Peer], kills: int, rng: random.Random, min_uptime: float) -> list[dict]:
    tracks = [Track(p, kills) for p in peers]
    start = time.monotonic()
    offsets = [i * SPACING / len(tracks) for i in range(len(tracks))]
    rng.shuffle(offsets)
    for t, off in zip(tracks, offsets):  # first kills spread over one spacing, in a random order
        t.pid = t.peer.wait_ready()
        t.healthy_at = time.monotonic()  # healthy since then at least
        t.next_kill = max(start + off, t.healthy_at + min_uptime + rng.uniform(*STABLE_MARGIN))
    last_any = 0.0
    done = 0
    while any(t.kills_left or t.killed_at is not None for t in tracks):
        order = tracks[:]
        rng.shuffle(order)  # no supervisor is always polled first
        for t in order:
            now = time.monotonic()
            if t.killed_at is not None:
                if now >= t.next_poll:
                    t.next_poll = now + HEALTH_POLL
                    body = get_health(t.peer.port)
                    if body and body.get("pid") != t.pid:
                        healthy = time.monotonic()
                        fork = forked_at(body["pid"])
                        t.samples.append({"peer": t.peer.label, "kill": len(t.samples) + 1, "old_pid": t.pid,
                                          "new_pid": body["pid"], "healthy": healthy - t.killed_at,
                                          "new_process": None if fork is None else fork - t.killed_boot,
                                          **t.pending})
                        t.pid, t.healthy_at, t.killed_at = body["pid"], healthy, None
                        schedule_next(t, healthy, rng, min_uptime)
                        done += 1
                        if done % len(tracks) == 0:
                            print(f"  {done}/{kills * len(tracks)} kills recovered", file=sys.stderr, flush=True)
                    elif now - t.killed_at > RECOVERY_TIMEOUT:
                        t.samples.append({"peer": t.peer.label, "kill": len(t.samples) + 1, "old_pid": t.pid,
                                          "new_pid": None, "healthy": None, "new_process": None, **t.pending})
                        t.killed_at, t.kills_left = None, 0  # one that never came back is not killed again
            elif t.kills_left and now >= t.next_kill and now - last_any >= KILL_GAP:
                body = get_health(t.peer.port, 0.5)
                if not body or body.get("pid") != t.pid:
                    t.next_kill = now + 0.05  # not answering as we last saw it: look again shortly
                    continue
                t.pending = {"healthy_for_at_kill": now - t.healthy_at,
                             "since_previous_kill": None if t.last_kill is None else now - t.last_kill}
                t.killed_boot, t.killed_at = boottime(), time.monotonic()
                t.pending["killed_mono"] = t.killed_at
                os.kill(t.pid, signal.SIGKILL)
                t.last_kill = last_any = t.killed_at
                t.next_poll = t.killed_at + 0.001
                t.kills_left -= 1
        time.sleep(0.001)
    return [s for t in tracks for s in t.samples]


def hang_once(peer: Peer) -> dict:
    """SIGSTOP the child; watch for a new pid answering /health for HANG_WINDOW seconds."""
    old = peer.wait_ready()
    t_boot, t0 = boottime(), time.monotonic()
    os.kill(old, signal.SIGSTOP)
    healthy = new_pid = None
    while time.monotonic() - t0 < HANG_WINDOW:
        body = get_health(peer.port)
        if body and body.get("pid") != old:
            healthy, new_pid = time.monotonic() - t0, body["pid"]
            break
        time.sleep(HEALTH_POLL)
    try:
        old_state = psutil.Process(old).status()
    except psutil.NoSuchProcess:
        old_state = "gone"
    try:
        os.kill(old, signal.SIGCONT)
    except ProcessLookupError:
        pass
    fork = forked_at(new_pid) if new_pid else None
    return {"peer": peer.label, "old_pid": old, "old_state_at_end": old_state, "healthy": healthy,
            "new_pid": new_pid, "new_process": None if fork is None else fork - t_boot}


def paired_kills(peers: list[Peer], n: int, rng: random.Random, min_uptime: float) -> list[dict]:
    """SIGKILL the children of ``peers`` at the same instant, ``n`` times about SPACING
    apart: their replacements cold-start side by side, under the same load, so the
    per-kill difference is free of most of the cold start's own noise."""
    pids = {p.label: p.wait_ready() for p in peers}
    healthy_at, last, rounds = time.monotonic(), None, []
    for i in range(n):
        spaced = (last or 0.0) + SPACING + rng.uniform(-SPACING_JITTER, SPACING_JITTER)
        time.sleep(max(0.0, max(spaced, healthy_at + min_uptime + rng.uniform(*STABLE_MARGIN)) - time.monotonic()))
        order = peers[:]
        rng.shuffle(order)
        for p in order:  # the child we kill must be the one we last saw healthy
            if (get_health(p.port, 0.5) or {}).get("pid") != pids[p.label]:
                pids[p.label] = p.wait_ready()
        t_boot, t0 = boottime(), time.monotonic()
        for p in order:
            os.kill(pids[p.label], signal.SIGKILL)
        last, pending, result = t0, {p.label: p for p in order}, {"round": i + 1}
        while pending and time.monotonic() - t0 < RECOVERY_TIMEOUT:
            for label, p in list(pending.items()):
                body = get_health(p.port)
                if body and body.get("pid") != pids[label]:
                    fork = forked_at(body["pid"])
                    result[label] = {"healthy": time.monotonic() - t0,
                                     "new_process": None if fork is None else fork - t_boot}
                    pids[label] = body["pid"]
                    del pending[label]
            time.sleep(HEALTH_POLL)
        result.update({label: {"healthy": None, "new_process": None} for label in pending})
        healthy_at = time.monotonic()
        rounds.append(result)
    return rounds


def paired_figures(rounds: list[dict], a: str, b: str) -> dict:
    """Per-kill ``b - a`` (kill -> healthy and kill -> new process), and its quantiles."""
    out: dict = {"n": len(rounds), "a": a, "b": b}
    for key in ("healthy", "new_process"):
        diffs = [r[b][key] - r[a][key] for r in rounds if r[a][key] is not None and r[b][key] is not None]
        if diffs:
            out[key] = {"median": percentile(diffs, 0.5), "p10": percentile(diffs, 0.1),
                        "p90": percentile(diffs, 0.9), "n": len(diffs)}
    for label in (a, b):
        vals = [r[label]["healthy"] for r in rounds if r[label]["healthy"] is not None]
        out[f"{label} healthy median"] = percentile(vals, 0.5) if vals else None
    return out


def run_hangs(peers: list[Peer]) -> list[dict]:
    """Every peer at once (one thread each: the peers that never replace a stopped child
    take the whole window)."""
    with ThreadPoolExecutor(len(peers)) as pool:
        return list(pool.map(hang_once, peers))


# -- the report -----------------------------------------------------------------------------------

def fmt_ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.0f}"


def summarise(samples: list[dict], hangs: list[dict], peers: list[Peer], cpu: dict) -> dict:
    out = {}
    for peer in peers:
        rows = [s for s in samples if s["peer"] == peer.label]
        entry = {"n": len(rows), "failed": sum(1 for s in rows if s["healthy"] is None), "cpu_s": cpu.get(peer.label)}
        for s in rows:
            if s.get("new_process") is not None and s["healthy"] is not None:
                s["spawn_to_healthy"] = s["healthy"] - s["new_process"]
        for key in ("new_process", "healthy", "spawn_to_healthy", "healthy_for_at_kill", "since_previous_kill",
                    "to_alert", "to_spawned"):
            vals = [s[key] for s in rows if s.get(key) is not None]
            if vals:
                entry[key] = {"median": percentile(vals, 0.5), "p90": percentile(vals, 0.9), "min": min(vals),
                              "max": max(vals)}
        hang = next((h for h in hangs if h["peer"] == peer.label), None)
        if hang:
            entry["hang"] = {"replaced": hang["healthy"] is not None, "after": hang["healthy"],
                             "new_process": hang["new_process"], "old_state_at_end": hang["old_state_at_end"]}
        out[peer.label] = entry
    return out


def hang_cell(hang: dict | None) -> str:
    if hang is None:
        return "-"
    if hang["replaced"]:
        forked = f"new process {hang['new_process']:.2f} s, " if hang["new_process"] is not None else ""
        return f"yes: {forked}healthy {hang['after']:.2f} s"
    return f"no: same pid still '{hang['old_state_at_end']}' after {HANG_WINDOW:g} s"


def cell(entry: dict, key: str) -> str:
    if key not in entry:
        return "-"
    return f"{fmt_ms(entry[key]['median'])} ({fmt_ms(entry[key]['p90'])})"


def table(summary: dict) -> str:
    lines = ["| | kills (came back) | kill -> new process, ms median (p90) | kill -> healthy, ms median (p90) "
             "| max | supervisor CPU s | SIGSTOP: replaced within 20 s? |",
             "|---|---|---|---|---|---|---|"]
    for label, entry in summary.items():
        back = entry["n"] - entry["failed"]
        worst = fmt_ms(entry["healthy"]["max"]) if "healthy" in entry else "-"
        cpu = f"{entry['cpu_s']:.2f}" if entry.get("cpu_s") is not None else "-"
        lines.append(f"| {label} | {entry['n']} ({back}) | {cell(entry, 'new_process')} | {cell(entry, 'healthy')} "
                     f"| {worst} | {cpu} | {hang_cell(entry.get('hang'))} |")
    return "\n".join(lines)


def figures(summary: dict) -> dict:
    """Issue 8's two figures for Tron's shipped defaults (and the tuned row, for scale)."""
    def med(label: str) -> float | None:
        return summary.get(label, {}).get("healthy", {}).get("median")

    plain, sup = med("plain loop"), med("supervisord")
    plain_fork = summary.get("plain loop", {}).get("new_process", {}).get("median")
    out = {}
    for label in ("Tron", "Tron (tuned)"):
        tron = med(label)
        if tron is None:
            continue
        entry = summary[label]
        out[label] = {"all_came_back": entry["failed"] == 0 and entry["n"] > 0, "kills": entry["n"],
                      "minus_plain_loop_ms": None if plain is None else (tron - plain) * 1000,
                      "over_supervisord": None if sup is None else tron / sup,
                      "over_circus_cd1": None if med("circus cd=1") is None else tron / med("circus cd=1"),
                      "over_circus_cd5": None if med("circus cd=5") is None else tron / med("circus cd=5"),
                      "new_process_minus_plain_loop_ms": None if plain_fork is None or "new_process" not in entry
                      else (entry["new_process"]["median"] - plain_fork) * 1000}
        f = out[label]
        f["minus_plain_loop_met"] = f["minus_plain_loop_ms"] is not None and f["minus_plain_loop_ms"] <= 50
        f["over_supervisord_met"] = f["over_supervisord"] is not None and f["over_supervisord"] <= 0.5
    return out


def figure_lines(figs: dict, tron_state: dict) -> list[str]:
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = []
    for label, f in figs.items():
        lines.append(f"- {label}: came back after every kill: {'yes' if f['all_came_back'] else 'NO'} "
                     f"({f['kills']} kills); median minus plain loop {f['minus_plain_loop_ms']:+.0f} ms "
                     f"(target <= 50 ms: {verdict(f['minus_plain_loop_met'])}); / supervisord "
                     f"{f['over_supervisord']:.2f} (target <= 0.5: {verdict(f['over_supervisord_met'])}); "
                     f"/ circus cd=1 {f['over_circus_cd1']:.2f}, / circus cd=5 {f['over_circus_cd5']:.2f}")
    for label, f in figs.items():
        if f["new_process_minus_plain_loop_ms"] is not None:
            lines.append(f"- {label}'s own part, kill -> new process minus the plain loop's: "
                         f"{f['new_process_minus_plain_loop_ms']:+.0f} ms (medians; the rest of kill -> healthy is the "
                         f"child's cold start, the same program under every supervisor)")
    for label, st in tron_state.items():
        lines.append(f"- {label}, from the daemon's events: kill -> alert persisted {fmt_ms(st.get('to_alert'))} ms, "
                     f"kill -> replacement spawned {fmt_ms(st.get('to_spawned'))} ms (medians)")
        lines.append(f"- {label} at the end: crash_looping {st['crash_looping']}, {st['child_restart_rows']} restart "
                     f"rows, {st['crash_loop_escalations']} crash-loop escalation row(s), "
                     f"{st['unstable_alerts']} unstable failure(s); cases {', '.join(st['cases'])}")
    return lines


def machine_facts() -> dict:
    def ver(dist: str) -> str:
        try:
            return version(dist)
        except Exception:  # noqa: BLE001 - a missing package is a fact too
            return "not installed"

    return {
        "python": platform.python_version(),
        "supervisor": ver("supervisor"), "circus": ver("circus"), "pyzmq": ver("pyzmq"),
        "tornado": ver("tornado"), "aiohttp": ver("aiohttp"), "psutil": ver("psutil"),
        "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
        "kernel": platform.release(), "loadavg_start": os.getloadavg(),
    }


def paired_lines(paired: dict | None) -> list[str]:
    if not paired or "healthy" not in paired:
        return []
    h, f = paired["healthy"], paired.get("new_process")
    ok = h["median"] <= 0.050
    line = (f"- Paired ({paired['n']} kills of both children at the same instant, ~{SPACING:g} s apart): Tron minus "
            f"plain loop, kill -> healthy per kill: median {h['median'] * 1000:+.0f} ms (p10 {h['p10'] * 1000:+.0f}, "
            f"p90 {h['p90'] * 1000:+.0f}; target <= 50 ms: {'met' if ok else 'NOT met'})")
    if f:
        line += f"; kill -> new process: median {f['median'] * 1000:+.0f} ms"
    return [line]


def report(facts: dict, args, summary: dict, figs: dict, tron_state: dict, paired: dict | None = None) -> str:
    head = (f"python {facts['python']}, supervisor {facts['supervisor']}, circus {facts['circus']} "
            f"(pyzmq {facts['pyzmq']}, tornado {facts['tornado']}), aiohttp {facts['aiohttp']}, "
            f"nproc {facts['nproc']}, kernel {facts['kernel']}, load {facts['loadavg_start'][0]:.2f} -> "
            f"{facts['loadavg_end'][0]:.2f}; {args.kills} SIGKILLs per supervisor ~{SPACING:g} s apart, seed "
            f"{args.seed}, {facts['seconds']:.0f} s")
    return "\n".join([head, "", table(summary), "", *figure_lines(figs, tron_state), *paired_lines(paired)])


# -- main -----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=15, help="SIGKILLs per supervisor")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random phases and order")
    ap.add_argument("--no-tuned", action="store_true", help="leave out the Tron (tuned) row")
    ap.add_argument("--pairs", type=int, default=10,
                    help="kills of the plain loop's and Tron's children at the same instant (0: none)")
    ap.add_argument("--json", type=Path, help="write every sample and the summary here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain SIGTERM still runs the cleanup below

    started = time.monotonic()
    facts = machine_facts()
    rng = random.Random(args.seed)
    tag = f"peersbench-{secrets.token_hex(4)}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    peers: list[Peer] = [PlainLoopPeer(workdir, tag), SupervisordPeer(workdir, tag), CircusPeer(workdir, tag, None),
                         CircusPeer(workdir, tag, 1), TronPeer(workdir, tag, "Tron", None)]
    if not args.no_tuned:
        peers.append(TronPeer(workdir, tag, "Tron (tuned)", TUNED_POLICY))
    tron_peers = [p for p in peers if isinstance(p, TronPeer)]
    leftovers: list[str] = []
    samples: list[dict] = []
    hangs: list[dict] = []
    pairs: list[dict] = []
    cpu: dict[str, float] = {}
    tron_state: dict[str, dict] = {}
    try:
        for peer in peers:
            peer.start()
        for peer in peers:
            peer.wait_ready()
        min_uptime = Policy(**tron_peers[0].mesh.policy).min_uptime  # the shipped default's
        cpu0 = {p.label: p.cpu_seconds() for p in peers}
        samples = kill_rounds(peers, args.kills, rng, min_uptime)
        cpu = {p.label: round(c1 - cpu0[p.label], 3) for p in peers
               if (c1 := p.cpu_seconds()) is not None and cpu0[p.label] is not None}
        tron_state = {p.label: p.state() for p in tron_peers}
        for p in tron_peers:
            p.daemon_steps(samples)
        if args.pairs:
            print(f"{args.pairs} paired kills: plain loop and Tron at the same instant ...", file=sys.stderr,
                  flush=True)
            pairs = paired_kills([peers[0], tron_peers[0]], args.pairs, rng, min_uptime)
        print("SIGSTOP under every supervisor at once, watching for 20 s ...", file=sys.stderr, flush=True)
        hangs = run_hangs(peers)
    finally:
        for peer in peers:
            leftovers += peer.stop()
        leftovers += end_leftovers(tagged_processes(tag))
        shutil.rmtree(workdir, ignore_errors=True)

    facts["loadavg_end"] = os.getloadavg()
    facts["seconds"] = time.monotonic() - started
    summary = summarise(samples, hangs, peers, cpu)
    for label, st in tron_state.items():
        st.update({key: summary[label].get(key, {}).get("median") for key in ("to_alert", "to_spawned")})
    figs = figures(summary)
    paired = paired_figures(pairs, "plain loop", "Tron") if pairs else None
    print(report(facts, args, summary, figs, tron_state, paired))
    return finish(args.json, {
        "facts": facts, "args": {"kills": args.kills, "seed": args.seed, "spacing": SPACING,
                                 "tuned_policy": None if args.no_tuned else TUNED_POLICY,
                                 "liveness": TRON_LIVENESS},
        "summary": summary, "figures": figs, "tron_state": tron_state, "paired": paired, "paired_kills": pairs,
        "kills": samples, "hangs": hangs}, leftovers)


if __name__ == "__main__":
    sys.exit(main())
