"""Recovery against peers: the same child service under Tron, supervisord and circus.

The child (benchmarks/child_service.py: Python + aiohttp, ``GET /health`` answers JSON with
its pid) is supervised four ways at once, each on its own loopback port:

  Tron           the harness's mesh with only that service, an HTTP liveness probe
                 (0.2 s interval, 0.3 s timeout, 2 failures) and a policy that never
                 escalates (max_restarts 100, restart_window 0.001: every restart is the
                 first in its window, which Tron makes with no delay)
  supervisord    ``autorestart=true``, ``startsecs=0`` (else a kill less than 1 s after a
                 start counts as a failed start: BACKOFF, and FATAL after 3); other defaults
  circus cd=5    circusd with one watcher, the default ``check_delay`` (5 s)
  circus cd=1    the same with ``check_delay = 1``

Method. Each round runs, in an order shuffled by the seeded RNG, one cold start (the child
spawned directly with Popen, no supervisor) and one SIGKILL per supervisor. Before every
step the benchmark sleeps a random 0.2-1.0 s after the previous recovery. Interleaving
the supervisors instead of running them in blocks spreads the machine's noise evenly over
all of them, and makes the kill phase uniform with respect to each supervisor's own timers
(a block of "recover, sleep 0.2-1.0 s, kill" would always kill circus 0.5-1.3 s after its
5 s tick). For each kill, one loop measures from ``os.kill``:

  kill -> new process   the pid that will answer /health first appears in the supervisor's
                        process tree (psutil: the pid list every 2 ms, each new pid's parent
                        read once); that is its fork, before its exec. Pids already in the
                        tree before the kill (Tron's fork server) do not count.
  kill -> healthy       a NEW pid answers /health (polled every 5 ms, 100 ms timeout)

The cold start row times Popen -> /health with the same /health loop: the floor that no
supervisor can beat. Then the hang case: the child is SIGSTOPped once under every
supervisor at the same time and each is watched for 20 s for a new pid answering /health.

Everything started here carries a per-run tag on its command line (the config paths of the
supervisors, ``--tag`` of the children); at the end every supervisor is stopped, anything
still alive with the tag (or the mesh's TRON_HOME) is killed by pid and reported.

    .venv/bin/python benchmarks/peers.py [--kills 20] [--seed 1] [--json benchmarks/results/peers.json]
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
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import cleanup, make_mesh  # noqa: E402

HERE = Path(__file__).resolve().parent
CHILD = HERE / "child_service.py"
BIN = Path(sys.executable).parent

PHASE = (0.2, 1.0)        # random sleep between a recovery and the next kill
PID_POLL = 0.002          # process-table poll
HEALTH_POLL = 0.005       # /health poll
HEALTH_TIMEOUT = 0.1      # per /health request
RECOVERY_TIMEOUT = 30.0   # a kill not recovered by then is recorded as a failure
HANG_WINDOW = 20.0        # how long a SIGSTOPped child is watched
READY_TIMEOUT = 60.0

TRON_POLICY = {"max_restarts": 100, "restart_window": 0.001}  # 100: the config's cap
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


class ProcTable:
    """The process tree from psutil: the pid list on every call; a pid's parent is read
    when the pid first appears, and again only if that parent has gone (an orphan is
    reparented: Tron's double-forking fork server relies on that). A vanished pid is
    forgotten, so a recycled pid is read afresh."""

    def __init__(self) -> None:
        self._parent: dict[int, int | None] = {}

    def descendants(self, root: int) -> set[int]:
        alive = set(psutil.pids())
        gone = self._parent.keys() - alive
        for pid in gone:
            del self._parent[pid]
        for pid in alive:
            if pid not in self._parent or self._parent[pid] in gone:
                try:
                    self._parent[pid] = psutil.Process(pid).ppid()
                except psutil.Error:
                    self._parent[pid] = None
        kids: dict[int, list[int]] = {}
        for pid, parent in self._parent.items():
            kids.setdefault(parent, []).append(pid)
        found, todo = set(), [root]
        while todo:
            for kid in kids.get(todo.pop(), []):
                if kid not in found:
                    found.add(kid)
                    todo.append(kid)
        return found


class NewProcesses:
    """Pids that join a supervisor's process tree after construction, each stamped (in
    seconds from ``t0``) when first seen."""

    def __init__(self, supervisor: int) -> None:
        self.supervisor = supervisor
        self.table = ProcTable()
        self.before = self.table.descendants(supervisor)
        self.first_seen: dict[int, float] = {}

    def poll(self, t0: float) -> None:
        fresh = self.table.descendants(self.supervisor) - self.before
        stamp = time.monotonic() - t0
        for pid in fresh:
            self.first_seen.setdefault(pid, stamp)


@dataclass
class Recovery:
    new_process: float | None  # seconds from t0 to the fork of the process that became healthy
    healthy: float | None      # seconds from t0 to a new pid answering /health
    healthy_pid: int | None


def watch_recovery(port: int, t0: float, *, old: int | None, tree: NewProcesses | None, timeout: float) -> Recovery:
    """Until a pid other than ``old`` answers /health (polled every 5 ms), or ``timeout``.

    Meanwhile ``tree`` (the supervisor's process tree, its baseline taken before the
    kill) is polled every 2 ms; kill -> new process is the first-seen stamp of the pid
    that turns out healthy, so a helper of the supervisor (such as Tron's fork server) or
    a short-lived intermediate process never counts."""
    next_health = t0
    while time.monotonic() - t0 < timeout:
        if tree is not None:
            tree.poll(t0)
        if time.monotonic() >= next_health:
            next_health = time.monotonic() + HEALTH_POLL
            body = get_health(port)
            if body and body.get("pid") != old:
                healthy = time.monotonic() - t0
                return Recovery(tree.first_seen.get(body["pid"]) if tree else None, healthy, body["pid"])
        time.sleep(PID_POLL)
    return Recovery(None, None, None)


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

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> int:
        """Until the child answers /health and is the supervisor's child; its pid."""
        deadline = time.monotonic() + timeout
        procs = ProcTable()
        while time.monotonic() < deadline:
            body = get_health(self.port, 0.5)
            if body and body.get("pid") in procs.descendants(self.pid):
                return body["pid"]
            time.sleep(0.02)
        raise RuntimeError(f"{self.label}: the child never answered /health on port {self.port}")


class TronPeer(Peer):
    label = "Tron"

    def __init__(self, workdir: Path, tag: str) -> None:
        super().__init__(workdir, tag)
        self.mesh = None

    def start(self) -> None:
        command = ["{python}", str(CHILD), "--port", "{port}", "--tag", self.tag]
        liveness = {"url": "http://127.0.0.1:{port}/health", **TRON_LIVENESS}
        services = {"child": {"command": command, "port": 6150, "liveness": liveness}}
        self.mesh = make_mesh(self.workdir / "tron", fast=False, services=services, policy=TRON_POLICY)
        self.port = self.mesh.port("child")
        self.mesh.up()
        self.pid = self.mesh.status()["daemon"]["pid"]

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
            _signal(p, signal.SIGCONT)
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        return [describe(p) for p in children if _kill_if_alive(p)]

    @property
    def name(self) -> str:
        return self.label.replace(" ", "_").replace("=", "")


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


def describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid}:{' '.join(p.cmdline())[:100]}"
    except psutil.Error:
        return str(p.pid)


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def _kill_if_alive(p: psutil.Process) -> bool:
    """SIGKILL ``p`` (same pid and start time as when found) if it still runs."""
    try:
        if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
            return False
        p.kill()
        return True
    except psutil.Error:
        return False


# -- the measurements -----------------------------------------------------------------------------

def cold_start(tag: str) -> dict:
    """Popen -> /health answering, with no supervisor."""
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen(child_argv(port, tag), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        rec = watch_recovery(port, t0, old=None, tree=None, timeout=RECOVERY_TIMEOUT)
    finally:
        proc.terminate()
        proc.wait(10)
    return {"peer": "cold start", "healthy": rec.healthy, "pid": proc.pid}


def kill_once(peer: Peer) -> dict:
    """SIGKILL the child and time its replacement."""
    old = peer.wait_ready()
    tree = NewProcesses(peer.pid)
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    rec = watch_recovery(peer.port, t0, old=old, tree=tree, timeout=RECOVERY_TIMEOUT)
    return {"peer": peer.label, "old_pid": old, **asdict(rec)}


def run_rounds(peers: list[Peer], kills: int, rng: random.Random, tag: str) -> list[dict]:
    samples = []
    for round_no in range(kills):
        steps: list[Peer | None] = [None, *peers]  # None: a cold start
        rng.shuffle(steps)
        for step in steps:
            time.sleep(rng.uniform(*PHASE))
            sample = cold_start(tag) if step is None else kill_once(step)
            samples.append({"round": round_no, **sample})
        done = [s for s in samples if s["round"] == round_no]
        print(f"round {round_no + 1}/{kills}: " + ", ".join(
            f"{s['peer']} {fmt_s(s['healthy'])}" for s in done), file=sys.stderr, flush=True)
    return samples


def hang_once(peer: Peer) -> dict:
    """SIGSTOP the child; watch for a new pid answering /health for HANG_WINDOW seconds."""
    old = peer.wait_ready()
    tree = NewProcesses(peer.pid)
    t0 = time.monotonic()
    os.kill(old, signal.SIGSTOP)
    rec = watch_recovery(peer.port, t0, old=old, tree=tree, timeout=HANG_WINDOW)
    try:
        old_state = psutil.Process(old).status()
    except psutil.NoSuchProcess:
        old_state = "gone"
    try:
        os.kill(old, signal.SIGCONT)
    except ProcessLookupError:
        pass
    return {"peer": peer.label, "old_pid": old, "old_state_at_end": old_state, **asdict(rec)}


def run_hangs(peers: list[Peer]) -> list[dict]:
    """Every peer at once (one thread each: the peers that never replace a stopped child
    take the whole window)."""
    with ThreadPoolExecutor(len(peers)) as pool:
        return list(pool.map(hang_once, peers))


# -- the report -----------------------------------------------------------------------------------

def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


def fmt_s(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.0f} ms"


def summarise(samples: list[dict], hangs: list[dict], labels: list[str]) -> dict:
    out = {}
    for label in ["cold start", *labels]:
        rows = [s for s in samples if s["peer"] == label]
        entry = {"n": len(rows), "failed": sum(1 for s in rows if s["healthy"] is None)}
        for s in rows:
            if s.get("new_process") is not None and s["healthy"] is not None:
                s["spawn_to_healthy"] = s["healthy"] - s["new_process"]
        for key in ("new_process", "healthy", "spawn_to_healthy"):
            vals = [s[key] for s in rows if s.get(key) is not None]
            if vals:
                entry[key] = {"median": statistics.median(vals), "p90": p90(vals)}
        hang = next((h for h in hangs if h["peer"] == label), None)
        if hang:
            entry["hang"] = {"replaced": hang["healthy"] is not None, "after": hang["healthy"],
                             "new_process": hang["new_process"], "old_state_at_end": hang["old_state_at_end"]}
        out[label] = entry
    return out


def hang_cell(hang: dict | None) -> str:
    if hang is None:
        return "-"
    if hang["replaced"]:
        forked = f"new process at {hang['new_process']:.2f} s, " if hang["new_process"] is not None else ""
        return f"yes: {forked}healthy at {hang['after']:.2f} s"
    return f"no: same pid still '{hang['old_state_at_end']}' after {HANG_WINDOW:g} s"


def stat_cells(entry: dict, key: str) -> list[str]:
    if key not in entry:
        return ["-", "-"]
    return [fmt_s(entry[key]["median"]), fmt_s(entry[key]["p90"])]


def table(summary: dict) -> str:
    lines = ["| | n | kill->new process median | p90 | kill->healthy median | p90 | SIGSTOP: replaced within 20 s? |",
             "|---|---|---|---|---|---|---|"]
    for label, entry in summary.items():
        name = "cold start (Popen->/health)" if label == "cold start" else label
        n = f"{entry['n']}" + (f" ({entry['failed']} failed)" if entry["failed"] else "")
        cells = [name, n, *stat_cells(entry, "new_process"), *stat_cells(entry, "healthy"),
                 hang_cell(entry.get("hang"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(summary: dict) -> list[str]:
    def med(label: str, key: str = "healthy") -> float | None:
        return summary.get(label, {}).get(key, {}).get("median")

    tron, cold = med("Tron"), med("cold start")
    lines = []
    for peer, target in (("supervisord", 1 / 4), ("circus cd=1", 1 / 3), ("circus cd=5", None)):
        other = med(peer)
        if tron and other:
            goal = f" (target <= {target:.2f}: {'met' if tron / other <= target else 'NOT met'})" if target else ""
            line = f"- Tron / {peer}, kill->healthy medians: {tron / other:.2f}{goal}"
            if med("Tron", "new_process") and med(peer, "new_process"):
                line += f"; kill->new process medians: {med('Tron', 'new_process') / med(peer, 'new_process'):.3f}"
            lines.append(line)
    if tron and cold:
        verdict = "met" if tron - cold <= 0.050 else "NOT met"
        lines.append(f"- Tron - cold start, kill->healthy medians: {(tron - cold) * 1000:+.0f} ms "
                     f"(target <= +50 ms: {verdict})")
    spawn = [f"{label} {fmt_s(entry['spawn_to_healthy']['median'])}"
             for label, entry in summary.items() if "spawn_to_healthy" in entry]
    if spawn and cold:
        lines.append(f"- new process -> healthy under each supervisor, median per kill (compare the cold start "
                     f"{fmt_s(cold)}): {', '.join(spawn)}")
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


def report(facts: dict, args, summary: dict) -> str:
    head = (f"python {facts['python']}, supervisor {facts['supervisor']}, circus {facts['circus']} "
            f"(pyzmq {facts['pyzmq']}, tornado {facts['tornado']}), aiohttp {facts['aiohttp']}, "
            f"nproc {facts['nproc']}, kernel {facts['kernel']}, load {facts['loadavg_start'][0]:.2f} -> "
            f"{facts['loadavg_end'][0]:.2f}; {args.kills} SIGKILLs per supervisor, seed {args.seed}, "
            f"{facts['seconds']:.0f} s")
    return "\n".join([head, "", table(summary), "", *ratios(summary)])


# -- main -----------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs per supervisor (and cold starts)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random phases and order")
    ap.add_argument("--json", type=Path, help="write every sample and the summary here")
    args = ap.parse_args()

    started = time.monotonic()
    facts = machine_facts()
    rng = random.Random(args.seed)
    tag = f"peersbench-{secrets.token_hex(4)}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    peers: list[Peer] = [TronPeer(workdir, tag), SupervisordPeer(workdir, tag),
                         CircusPeer(workdir, tag, None), CircusPeer(workdir, tag, 1)]
    leftovers: list[str] = []
    try:
        for peer in peers:
            peer.start()
        for peer in peers:
            peer.wait_ready()
        samples = run_rounds(peers, args.kills, rng, tag)
        print("SIGSTOP under every supervisor at once, watching for 20 s ...", file=sys.stderr, flush=True)
        hangs = run_hangs(peers)
    finally:
        for peer in peers:
            leftovers += peer.stop()
        leftovers += [describe(p) for p in tagged_processes(tag) if _kill_if_alive(p)]
        shutil.rmtree(workdir, ignore_errors=True)

    facts["loadavg_end"] = os.getloadavg()
    facts["seconds"] = time.monotonic() - started
    summary = summarise(samples, hangs, [p.label for p in peers])
    print(report(facts, args, summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"facts": facts, "args": {"kills": args.kills, "seed": args.seed},
                                         "summary": summary, "kills": samples, "hangs": hangs}, indent=2))
    if leftovers:
        print(f"LEFT BEHIND (killed): {leftovers}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
