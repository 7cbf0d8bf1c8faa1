"""Issue 14: the daemon holds a service's listening socket across restarts, so callers
wait in the kernel's backlog instead of being refused. Measured beside supervisord, in one run.

One program everywhere: uvicorn serving tests/integration/apps/hello_asgi.py (it answers
every request with its pid), a single process. Four rows, all up at once, each on its own
loopback port:

  Tron, held socket   a ``command`` service with ``socket = "inherit"``: the daemon binds the
                      port once and hands it to every incarnation as fd 3 (``uvicorn --fd 3``)
  Tron, own socket    the same service with ``socket = "none"``: uvicorn binds ``--port``
  supervisord         ``autorestart = true``, ``startsecs = 0`` (benchmarks/peers.py's config),
                      uvicorn binds ``--port``
  plain loop          benchmarks/respawn_loop.py: wait() and start again at once (the floor)
  Tron agent          one of Tron's own agents (the llm-sim role: beats, fork server, socket
                      held by default); the loop asks its ``/health``

Both Tron rows are services of one daemon under the SHIPPED DEFAULT policy (mesh.toml's,
nothing overridden) with an HTTP readiness probe on ``/``.

Method. For each row, scripts/loadloop.py's RequestLoop (``--workers`` threads, a new
connection per request, ``GET /``) runs in a tight loop, first ``--baseline`` seconds with
no kill (the row's undisturbed baseline), then while the service's main process is
SIGKILLed: the pid Tron's /status names (checked against the pid that answers) or, for the
others, the pid that answers (checked to be in the supervisor's process tree). Each kill
comes 1.5-2 s after the previous one and never before the replacement has answered for
min_uptime (1 s) + 0.2-0.4 s (so Tron never counts a kill as a crash of an unstable
incarnation and never backs off). After each kill the service is polled every 5 ms until a
new pid answers (kill -> back). The rows take turns in blocks of ``BLOCK`` kills, the order
shuffled per block, and each block starts with its share of the baseline, so the machine's
noise lands on every row and only one request loop runs at any time.

Every request ends answered (an HTTP response, with its latency), refused (ECONNREFUSED:
nothing listened) or failed (connected, then cut off or timed out: it was inside the killed
process). Added latency = the row's p50/p99 under kills minus its own baseline's.

Then the backlog-full case: a Tron service with ``backlog = 8`` (held socket, no probe) is
SIGSTOPped (not killed) while 32 clients connect at once; after ``pause`` seconds it is
SIGCONTed. Linux queues backlog + 1 connections; for the rest it drops the SYN and the
client retransmits it after 1 s (then 1 s apart on Linux 6.x): a delay, not a refusal. uvicorn calls listen()
again on the socket it is given, with its own ``--backlog`` (2048 by default), which
replaces the daemon's: so once with uvicorn's default (service ``bl8``) and twice with
``--backlog 8`` as well (``bl8u``; pauses 0.5 s and 1.5 s: Tron's check for a stopped
process needs ~2-3 s, so it does not restart it). ``ss`` reads the accept queue and the
backlog in force at the end of the pause.

A parent delegating tasks to a child killed under it is benchmarks/delegation.py.

    .venv/bin/python -m benchmarks.socket_handover [--kills 20] [--seed 1] [--json benchmarks/results/socket_handover.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import psutil

from benchmarks import finish, take_turns
from benchmarks.peers import (
    LOOP,
    PlainLoopPeer,
    SupervisordPeer,
    child_argv,
    end_leftovers,
    machine_facts,
    tagged_processes,
)
from tron.common.config import Policy
from tron.scripts.loadloop import Counts, RequestLoop
from tron.scripts.stats import percentile
from tests.harness import REPO, cleanup, make_mesh

APPS = REPO / "tests" / "integration" / "apps"

BLOCK = 5                    # kills of one row before the next row's turn
SPACING = (1.5, 2.0)         # seconds from one kill to the next
STABLE_MARGIN = (0.2, 0.4)   # a kill comes at least min_uptime + this after the replacement answered
POLL = 0.005                 # poll of a service being recovered
BACK_TIMEOUT = 30.0          # a kill not recovered by then ends the row
BACKLOG = 8
BACKLOG_CLIENTS = 32

PORTS = {"held": 6165, "own": 6166, "bl8": 6167, "bl8u": 6168, "agent": 6169}  # + the mesh's offset
# (service, pause): bl8 has backlog = 8 in Tron only; uvicorn calls listen() again on fd 3
# with its own --backlog (2048), which replaces it. bl8u also passes uvicorn --backlog 8.
BACKLOG_RUNS = (("bl8", 0.5), ("bl8u", 0.5), ("bl8u", 1.5))


def app_argv(tag: str, port: int | str | None, *extra: str) -> list[str]:
    """uvicorn running hello_asgi; on fd 3 when ``port`` is None. ``--header`` carries the
    run's tag on the command line (so every process this run started can be found)."""
    where = ["--fd", "3"] if port is None else ["--host", "127.0.0.1", "--port", str(port)]
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(APPS), "--no-access-log", "--log-level", "warning",
            "--header", f"x-bench:{tag}", *where, *extra, "hello_asgi:app"]


def get_pid(port: int, timeout: float = 0.5, path: str = "/") -> int | None:
    """The pid the service answers ``GET path`` with (hello_asgi's body; an agent's
    /health JSON), or None."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return None
        return int(body) if path == "/" else int(json.loads(body)["pid"])
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return None
    finally:
        conn.close()


# -- the rows ---------------------------------------------------------------------------------------

class ProcessRow:
    """A peer from benchmarks/peers.py running uvicorn instead of child_service.py."""

    path = "/"

    def owner_pid(self, answered: int) -> int | None:
        """The main pid to kill, if ``answered`` is the supervisor's child."""
        try:
            kids = {p.pid for p in psutil.Process(self.pid).children(recursive=True)}
        except psutil.Error:
            return None
        return answered if answered in kids else None


class SupervisordRow(ProcessRow, SupervisordPeer):
    def argv(self) -> list[str]:
        argv = super().argv()  # writes peers.py's supervisord.conf; swap the program in it
        conf = self.workdir / "supervisord.conf"
        conf.write_text(conf.read_text().replace(" ".join(child_argv(self.port, self.tag)),
                                                 " ".join(app_argv(self.tag, self.port))))
        return argv


class PlainLoopRow(ProcessRow, PlainLoopPeer):
    def argv(self) -> list[str]:
        return [sys.executable, str(LOOP), "--", *app_argv(self.tag, self.port)]


class TronRow:
    def __init__(self, mesh, name: str, label: str, path: str = "/") -> None:
        self.mesh, self.name, self.label, self.path = mesh, name, label, path
        self.port = mesh.port(name)

    def owner_pid(self, answered: int) -> int | None:
        svc = self.mesh.service(self.name)
        return svc["pid"] if svc["state"] == "running" and svc["pid"] == answered else None


def tron_mesh(workdir: Path, tag: str):
    readiness = {"url": "http://127.0.0.1:{port}/"}
    services = {
        "held": {"command": app_argv(tag, None), "port": PORTS["held"], "socket": "inherit", "readiness": readiness},
        "own": {"command": app_argv(tag, "{port}"), "port": PORTS["own"], "socket": "none", "readiness": readiness},
        # no readiness probe: nothing of Tron's may take a place in the small backlog
        "bl8": {"command": app_argv(tag, None), "port": PORTS["bl8"], "socket": "inherit", "backlog": BACKLOG},
        "bl8u": {"command": app_argv(tag, None, "--backlog", str(BACKLOG)), "port": PORTS["bl8u"],
                 "socket": "inherit", "backlog": BACKLOG},
        # one of Tron's own agents (beats, the fork server; the socket is held by default)
        "agent": {"role": "llm_sim", "port": PORTS["agent"]},
    }
    return make_mesh(workdir / "tron", fast=False, services=services)


def wait_owned(row, old: int | None = None, timeout: float = 60.0) -> int:
    """Until a pid other than ``old`` answers and its supervisor names it as the service."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = get_pid(row.port, path=row.path)
        if pid and pid != old and row.owner_pid(pid) == pid:
            return pid
        time.sleep(0.02)
    raise RuntimeError(f"{row.label}: no main process answering on port {row.port}")


# -- the kills ----------------------------------------------------------------------------------------

def merge(into: Counts, c: Counts) -> None:
    into.answered += c.answered
    into.refused += c.refused
    into.failed += c.failed
    into.latencies += c.latencies
    for k, v in c.errors.items():
        into.errors[k] = into.errors.get(k, 0) + v


class Track:
    def __init__(self, row, kills: int) -> None:
        self.row, self.kills_left = row, kills
        self.baseline, self.under = Counts(), Counts()
        self.baseline_s = self.under_s = 0.0
        self.kills: list[dict] = []
        self.pid = 0
        self.failed_back = False


def block(t: Track, n: int, baseline: float, args, rng: random.Random, min_uptime: float) -> None:
    row = t.row
    t.pid = wait_owned(row)
    with RequestLoop(row.port, row.path, workers=args.workers, timeout=args.timeout) as loop:
        t0 = time.monotonic()
        time.sleep(baseline)
    t.baseline_s += time.monotonic() - t0
    merge(t.baseline, loop.counts)
    with RequestLoop(row.port, row.path, workers=args.workers, timeout=args.timeout) as loop:
        t0 = time.monotonic()
        next_kill = t0 + rng.uniform(0.3, 0.6)
        for _ in range(n):
            time.sleep(max(0.0, next_kill - time.monotonic()))
            owner = row.owner_pid(t.pid)  # for Tron: what /status names, which must be what answers
            if owner != t.pid:
                t.pid = wait_owned(row)
            t_kill = time.monotonic()
            os.kill(t.pid, signal.SIGKILL)
            t.kills_left -= 1
            new = None
            while time.monotonic() - t_kill < BACK_TIMEOUT:
                new = get_pid(row.port, 2.0, row.path)
                if new and new != t.pid:
                    break
                time.sleep(POLL)
            back = time.monotonic()
            t.kills.append({"kill": len(t.kills) + 1, "at": round(t_kill - t0, 4), "old_pid": t.pid,
                            "new_pid": new if new != t.pid else None, "back": round(back - t_kill, 4)})
            if not new or new == t.pid:
                t.failed_back, t.kills_left = True, 0
                break
            t.pid = new
            next_kill = max(t_kill + rng.uniform(*SPACING), back + min_uptime + rng.uniform(*STABLE_MARGIN))
        time.sleep(max(0.0, t_kill + rng.uniform(*SPACING) - time.monotonic()))  # the last kill's full window
    t.under_s += time.monotonic() - t0
    merge(t.under, loop.counts)


def run_rows(rows: list, args, rng: random.Random, min_uptime: float) -> list[Track]:
    tracks = [Track(r, args.kills) for r in rows]
    take_turns(tracks, args.kills, BLOCK, rng,
               lambda t, n, share: block(t, n, args.baseline * share, args, rng, min_uptime))
    return tracks


# -- backlog full ---------------------------------------------------------------------------------------

def listen_queue(port: int) -> tuple[int, int] | None:
    """(connections waiting to be accepted, the listen backlog in force) of the listener on
    127.0.0.1:port, as ``ss`` reads them (Recv-Q, Send-Q of a LISTEN socket)."""
    try:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=5,
                             check=False).stdout
        cols = out.split()
        return int(cols[1]), int(cols[2])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def tcp_ext(*names: str) -> dict[str, int]:
    with open("/proc/net/netstat") as f:
        lines = [ln.split() for ln in f if ln.startswith("TcpExt:")]
    table = dict(zip(lines[0][1:], map(int, lines[1][1:])))
    return {n: table.get(n, 0) for n in names}


def sysctl(key: str) -> str | None:
    """tcp_syn_linear_timeouts (Linux 6.5+): that many SYN retransmits 1 s apart, then doubling."""
    try:
        return Path("/proc/sys", key).read_text().strip()
    except OSError:
        return None


def backlog_full(mesh, name: str, pause: float) -> dict:
    port = mesh.port(name)
    row = TronRow(mesh, name, name)
    pid = wait_owned(row)
    res: list[dict] = [{} for _ in range(BACKLOG_CLIENTS)]
    gate = threading.Barrier(BACKLOG_CLIENTS + 1)

    def client(i: int) -> None:
        r = res[i]
        gate.wait()
        t0 = time.perf_counter()
        s = socket.socket()
        s.settimeout(15)
        try:
            s.connect(("127.0.0.1", port))
            r["connect"] = time.perf_counter() - t0
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            r["outcome"] = "answered" if data.startswith(b"HTTP/1.1 200") else "failed"
        except ConnectionRefusedError:
            r["outcome"] = "refused"
        except OSError as err:
            r["outcome"], r["error"] = "failed", type(err).__name__
        finally:
            s.close()
            r["total"] = time.perf_counter() - t0

    before = tcp_ext("ListenOverflows", "ListenDrops")
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(BACKLOG_CLIENTS)]
    for th in threads:
        th.start()
    os.kill(pid, signal.SIGSTOP)
    try:
        gate.wait()
        time.sleep(pause)
        queued = listen_queue(port)
        connected = sum("connect" in r for r in res)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # Tron replaced it as a stopped process meanwhile: reported below
            pass
    for th in threads:
        th.join(20)
    after = tcp_ext("ListenOverflows", "ListenDrops")
    waited = [r for r in res if r.get("connect", 1e9) > pause]
    return {"service": name, "pause": pause, "clients": BACKLOG_CLIENTS, "tron_backlog": BACKLOG,
            "uvicorn_backlog": BACKLOG if name == "bl8u" else "default", "pid": pid,
            "same_pid_after": get_pid(port, 2.0) == pid,
            "connected_while_stopped": connected, "accept_queue_at_end_of_pause": queued,
            "answered": sum(r.get("outcome") == "answered" for r in res),
            "refused": sum(r.get("outcome") == "refused" for r in res),
            "failed": sum(r.get("outcome") == "failed" for r in res),
            "waited_for_a_place": len(waited),
            "waited_connect_s": sorted(round(r["connect"], 4) for r in waited),
            "waited_total_s": sorted(round(r["total"], 4) for r in waited),
            "kernel_delta": {k: after[k] - before[k] for k in after}, "samples": res}


# -- the report -----------------------------------------------------------------------------------------

def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def row_summary(t: Track) -> dict:
    base, under = t.baseline.summary(), t.under.summary()
    backs = [k["back"] for k in t.kills if k["new_pid"]]
    added = {q: None if base[q] is None or under[q] is None else round(under[q] - base[q], 2)
             for q in ("p50_ms", "p99_ms")}
    return {"kills": len(t.kills), "came_back": len(backs), "baseline": base, "baseline_s": round(t.baseline_s, 2),
            "under_kills": under, "under_kills_s": round(t.under_s, 2),
            "requests_per_s": round((under["answered"] + under["refused"] + under["failed"]) / t.under_s, 1)
            if t.under_s else None,
            "added_p50_ms": added["p50_ms"], "added_p99_ms": added["p99_ms"],
            "back_ms": None if not backs else {"p50": round(percentile(backs, 0.5) * 1000, 1),
                                               "max": round(max(backs) * 1000, 1)}}


def table(summary: dict) -> str:
    lines = [("| | kills (back) | answered | refused | failed | p50 ms | p99 ms | max ms | added p50 ms "
              "| added p99 ms | baseline p50 / p99 ms | kill -> back ms p50 (max) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, s in summary.items():
        u, b = s["under_kills"], s["baseline"]
        back = "-" if not s["back_ms"] else f"{ms(s['back_ms']['p50'])} ({ms(s['back_ms']['max'])})"
        added = [("-" if v is None else f"{v:+.1f}") for v in (s["added_p50_ms"], s["added_p99_ms"])]
        lines.append(f"| {label} | {s['kills']} ({s['came_back']}) | {u['answered']} | {u['refused']} | {u['failed']} "
                     f"| {ms(u['p50_ms'])} | {ms(u['p99_ms'])} | {ms(u['max_ms'])} | {added[0]} | {added[1]} "
                     f"| {ms(b['p50_ms'])} / {ms(b['p99_ms'])} | {back} |")
    return "\n".join(lines)


def backlog_lines(runs: list[dict]) -> list[str]:
    out = []
    for r in runs:
        if "error" in r:
            out.append(f"- {r['service']}, SIGSTOP for {r['pause']:g} s: not measured ({r['error']})")
            continue
        q = r["accept_queue_at_end_of_pause"]
        wc, wt = r["waited_connect_s"], r["waited_total_s"]
        spread = "" if not wc else (f"; their connect() returned after {wc[0]:.2f}-{wc[-1]:.2f} s (median "
                                    f"{percentile(wc, 0.5):.2f}), answered after {percentile(wt, 0.5):.2f} s median, "
                                    f"max {wt[-1]:.2f}")
        who = "Tron backlog = 8, uvicorn's own default" if r["uvicorn_backlog"] == "default" \
            else "Tron backlog = 8 and uvicorn --backlog 8"
        out.append(f"- {who}: SIGSTOP for {r['pause']:g} s, {r['clients']} clients at once: "
                   f"{r['connected_while_stopped']} connected while stopped (accept queue "
                   f"{'?' if q is None else f'{q[0]} of backlog {q[1]}'}), "
                   f"{r['waited_for_a_place']} waited for a place{spread}; "
                   f"{r['answered']} answered, {r['refused']} refused, {r['failed']} failed; kernel "
                   f"ListenOverflows +{r['kernel_delta']['ListenOverflows']}; same pid after: {r['same_pid_after']}")
    return out


def tron_state(mesh) -> dict:
    out = {}
    for name in ("held", "own", "agent"):
        svc = mesh.service(name)
        out[name] = {"state": svc["state"], "restarts": svc.get("restarts"),
                     "crash_looping": svc.get("crash_looping"),
                     "unstable_failures": mesh.rows("SELECT COUNT(*) AS n FROM alerts WHERE agent = ? AND stable = 0",
                                                    (name,))[0]["n"]}
    return out


# -- main -----------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs per row")
    ap.add_argument("--baseline", type=float, default=4.0, help="seconds of undisturbed loop per row")
    ap.add_argument("--workers", type=int, default=2, help="request loop threads")
    ap.add_argument("--timeout", type=float, default=10.0, help="per request")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-floor", action="store_true", help="leave out the plain loop row")
    ap.add_argument("--json", type=Path, help="write every sample and the summary here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.monotonic()
    facts = machine_facts()
    facts["uvicorn"] = version("uvicorn")
    facts["sysctl"] = {k: sysctl(k) for k in ("net/ipv4/tcp_abort_on_overflow", "net/ipv4/tcp_syn_retries",
                                              "net/ipv4/tcp_syn_linear_timeouts", "net/core/somaxconn")}
    facts["uptime_start"] = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    rng = random.Random(args.seed)
    tag = f"handoverbench-{secrets.token_hex(4)}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    mesh, peers, leftovers = None, [], []
    tracks: list[Track] = []
    backlog: list[dict] = []
    state: dict = {}
    try:
        mesh = tron_mesh(workdir, tag)
        peers = [SupervisordRow(workdir, tag)] + ([] if args.no_floor else [PlainLoopRow(workdir, tag)])
        for p in peers:
            p.start()
        mesh.up()
        min_uptime = Policy(**mesh.policy).min_uptime
        rows = [TronRow(mesh, "held", "Tron, held socket"), TronRow(mesh, "own", "Tron, own socket"),
                TronRow(mesh, "agent", "Tron agent (llm-sim), held socket", path="/health"), *peers]
        for r in rows:
            wait_owned(r)
        print(f"{len(rows)} rows up after {time.monotonic() - started:.1f} s; {args.kills} kills each ...",
              file=sys.stderr, flush=True)
        tracks = run_rows(rows, args, rng, min_uptime)
        state = tron_state(mesh)
        print("backlog full ...", file=sys.stderr, flush=True)
        for name, pause in BACKLOG_RUNS:
            try:
                backlog.append(backlog_full(mesh, name, pause))
            except (OSError, RuntimeError) as err:  # one case lost is reported, not the whole run
                backlog.append({"service": name, "pause": pause, "error": f"{type(err).__name__}: {err}"})
    finally:
        for p in peers:
            leftovers += p.stop()
        if mesh is not None:
            leftovers += cleanup(mesh)
        leftovers += end_leftovers(tagged_processes(tag))
        shutil.rmtree(workdir, ignore_errors=True)

    facts["loadavg_end"] = os.getloadavg()
    facts["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    facts["seconds"] = round(time.monotonic() - started, 1)
    summary = {t.row.label: row_summary(t) for t in tracks}
    print(f"{args.kills} SIGKILLs per row, {args.workers} request loops, seed {args.seed}; uvicorn "
          f"{facts['uvicorn']}, supervisor {facts['supervisor']}, python {facts['python']}, nproc {facts['nproc']}; "
          f"load {facts['loadavg_start'][0]:.2f} -> {facts['loadavg_end'][0]:.2f}; {facts['seconds']:.0f} s\n")
    print(table(summary))
    print()
    print("\n".join(backlog_lines(backlog)))
    print(f"- kernel: {facts['sysctl']}")
    for name, st in state.items():
        print(f"- Tron '{name}' at the end of the kills: {st}")
    return finish(args.json, {
        "facts": facts, "args": {**vars(args), "json": str(args.json), "block": BLOCK, "spacing": SPACING,
                                 "stable_margin": STABLE_MARGIN},
        "summary": summary, "tron_state": state, "backlog_full": backlog,
        "rows": {t.row.label: {"kills": t.kills, "baseline_latencies_s": [round(x, 6) for x in t.baseline.latencies],
                               "under_kills_latencies_s": [round(x, 6) for x in t.under.latencies],
                               "errors": t.under.errors} for t in tracks}}, leftovers, indent=None)


if __name__ == "__main__":
    sys.exit(main())
