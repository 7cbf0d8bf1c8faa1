"""Connections held open by a local user with no token: is the daemon still there?

The default mesh (shipped defaults). ``--holders`` processes each open up to ``--each``
connections to the daemon's port as fast as they can and hold them; a third of them send
half a request line and never end it; one the daemon closed is opened again (the flood
goes on). Meanwhile, this script asks the daemon's public ``/health`` every 0.5 s
(answered within 5 s, or not), and once the flood has run ``--settle`` s (and counted the
daemon's descriptors): ``tron status``,
then SIGKILL of programmer-1 and the time until its new incarnation is running (the
daemon's own account: ``/status``). The same without a flood first, as the baseline.

    .venv/bin/python -m benchmarks.conn_flood [--holders 3] [--each 7000] [--settle 20]

Against an older checkout: ``cd OLD && PYTHONPATH=$PWD /path/to/.venv/bin/python -m benchmarks.conn_flood``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import finish
from tron.scripts.stats import percentile
from tests.harness import cleanup, make_mesh

HOLDER = r"""
import resource, socket, sys, time
port, each, until = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, each + 64), hard))
held, made, refused = [], 0, 0
while time.time() < until:
    held = [s for s in held if s.fileno() != -1]
    if len(held) < each:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.setblocking(False)
            if made % 3 == 0:
                s.send(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(s)
            made += 1
        except OSError:
            refused += 1
            time.sleep(0.01)
        continue
    for s in held:  # one the daemon closed is opened again
        try:
            if s.recv(1) == b"":
                s.close()
        except BlockingIOError:
            pass
        except OSError:
            s.close()
    time.sleep(0.005)
print(made, refused, flush=True)
"""


def health(port: int) -> float | None:
    """ms for GET /health to answer 200, or None if not within 5 s."""
    began = time.monotonic()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
    except OSError:
        return None
    return (time.monotonic() - began) * 1000 if ok else None


def probe(mesh, seconds: float) -> list[float | None]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(health(mesh.port("daemon")))
        time.sleep(0.5)
    return out


def kill_and_back(mesh) -> float | None:
    """ms from SIGKILL of programmer-1 to its new incarnation running, as /status says."""
    errors: list[str] = []
    try:
        old = mesh.service("programmer-1")
        began = time.monotonic()
        os.kill(old["pid"], signal.SIGKILL)
        deadline = began + 30
        while time.monotonic() < deadline:
            try:
                now = mesh.service("programmer-1")
                if now["state"] == "running" and now["pid"] not in (None, old["pid"]):
                    return (time.monotonic() - began) * 1000
            except Exception as err:  # the daemon did not answer this time: asked again
                errors.append(f"{type(err).__name__}: {err}")
            time.sleep(0.02)
    except Exception as err:
        errors.append(f"{type(err).__name__}: {err}")
    finally:
        if errors:
            print(f"    /status failed {len(errors)} times while waiting; the last: {errors[-1]}", file=sys.stderr)
    return None


def descriptors(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def measure(mesh, label: str, settle: float, daemon_pid: int) -> dict:
    answers = probe(mesh, settle)
    fds = descriptors(daemon_pid)
    began = time.monotonic()
    status = mesh.tron("status", timeout=60)
    status_s = time.monotonic() - began
    back = kill_and_back(mesh)
    answered = [a for a in answers if a is not None]
    row = {"label": label, "health_answered": f"{len(answered)}/{len(answers)}",
           "health_median_ms": percentile(answered, 0.5) if answered else None,
           "status_exit": status.returncode, "status_s": round(status_s, 2),
           "kill_to_running_ms": back, "daemon_descriptors": fds}
    print(f"  {label}: the daemon holds {fds} descriptors; /health answered {row['health_answered']} (median "
          f"{row['health_median_ms'] or float('nan'):.1f} ms); tron status exit {status.returncode} in "
          f"{status_s:.2f} s; kill -> running {back if back is None else round(back)} ms", file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.conn_flood")
    ap.add_argument("--holders", type=int, default=3)
    ap.add_argument("--each", type=int, default=7000)
    ap.add_argument("--settle", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tron-flood-") as tmp:
        mesh = make_mesh(Path(tmp), fast=False)
        holders: list[subprocess.Popen] = []
        try:
            mesh.tron("up", "--detach", timeout=120, check=True)
            daemon_pid = mesh.status()["daemon"]["pid"]
            rows.append(measure(mesh, "no flood", 3, daemon_pid))
            until = time.time() + args.settle + 60
            holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(mesh.port("daemon")), str(args.each),
                                         str(until)], stdout=subprocess.PIPE, text=True)
                       for _ in range(args.holders)]
            rows.append(measure(mesh, f"{args.holders} x {args.each} connections held", args.settle, daemon_pid))
            st = mesh.http("GET", mesh.url("daemon") + "/status")[1] if rows[-1]["status_exit"] == 0 else {}
            if isinstance(st, dict) and st.get("http"):
                rows[-1]["http"] = st["http"]
                print(f"  the daemon's count: {st['http']}", file=sys.stderr)
        finally:
            for h in holders:
                h.send_signal(signal.SIGKILL)
                h.wait()
            leftovers = cleanup(mesh)
    for r in rows:
        print(r)
    return finish(args.json, {"rows": rows}, leftovers)


if __name__ == "__main__":
    sys.exit(main())
