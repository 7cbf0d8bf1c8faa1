"""Issue 22: what owning by cgroup and writing logs through the log pump cost.

Two measurements, each on a real mesh in a temporary home (tests/harness.py), with the
fast test policy:

- ``restart``: kill -> healthy of a small foreign TCP server (a Python program, a tcp
  liveness probe at 0.2 s), ``--kills`` times each, the cgroup mesh and the marks mesh
  (``[mesh] ownership = "marks"``) killed alternately so load drifts hit both alike.
  Kill -> healthy is SIGKILL -> the daemon shows a new incarnation running (polled every
  5 ms) and its port accepts.
- ``spawn``: the restart path of the spawner alone (services/daemon/spawner.py, no daemon,
  no probes), where a few milliseconds are not lost in the noise of a whole mesh: kill of
  the old incarnation (already dead) + spawn -> the program runs (its /proc exe is the
  program's: what the cgroup can add, without the program's own start-up) and -> it
  listens, for a small TCP server (perl, else python -S), ``--reps`` times, interleaved:
  ``gate`` (cgroup, the start
  prepared ahead: the next incarnation's gate), ``join`` (cgroup, the program joins its
  new cgroup itself through sh: what every start did before the gate), ``marks`` (no
  cgroups). Each repetition waits 0.7 s, so the gate is ready and the kernel is idle.
- ``flood``: a program writing ``--rate`` MB/s of numbered 100-byte lines to stdout for
  ``--seconds`` s with ``log_max_bytes = "10MB"``, ``log_backups = 3``, no rate limit;
  meanwhile ``/status`` is asked every 50 ms and ``tron logs -n 5`` once a second. Then:
  the logs' total size, lines lost (a gap in the counters of what is kept, which must be
  the newest lines, contiguous), the pump's CPU seconds, the /status and `tron logs`
  latencies.

    .venv/bin/python -m benchmarks.resources --kills 15 --seconds 60 --json benchmarks/results/resources.json
    .venv/bin/python -m benchmarks.resources --only spawn --reps 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from tron.scripts.stats import summary
from tests.harness import cleanup, make_mesh, wait_for

SERVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True:
    time.sleep(1)
"""

# 100-byte numbered lines at a paced rate (MB/s), in 64 KiB writes, for a number of seconds.
FLOOD = """
import os, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
rate, seconds = float(sys.argv[2]) * 1e6, float(sys.argv[3])
time.sleep(1.0)
pad = b"x" * 80
n, sent, start = 0, 0, time.monotonic()
while time.monotonic() - start < seconds:
    chunk = b"".join(b"%012d %s\\n" % (i, pad[:86 - 12]) for i in range(n, n + 650))
    n += 650
    os.write(1, chunk)
    sent += len(chunk)
    ahead = sent / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
os.write(1, b"flood done %d lines %d bytes %.3f s\\n" % (n, sent, time.monotonic() - start))
while True:
    time.sleep(1)
"""


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def with_ownership(mesh, ownership: str):
    if ownership != "auto":
        mesh.config.write_text(mesh.config.read_text().replace("[mesh]\n", f'[mesh]\nownership = "{ownership}"\n', 1))
    return mesh


def restart(kills: int, root: Path) -> dict:
    script = root / "server.py"
    script.write_text(SERVER)
    service = {"command": ["{python}", str(script), "{port}"], "port": 6150,
               "liveness": {"tcp": {}, "interval": 0.2, "timeout": 0.5}}
    meshes = {}
    for mode in ("auto", "marks"):
        meshes[mode] = with_ownership(make_mesh(root / mode, services={"srv": service}), mode)
        meshes[mode].up()
    samples: dict[str, list[float]] = {"cgroup": [], "marks": []}
    try:
        assert meshes["auto"].status()["ownership"]["mode"] == "cgroup", meshes["auto"].status()["ownership"]
        for i in range(kills):
            for mode in (("auto", "marks") if i % 2 == 0 else ("marks", "auto")):
                mesh = meshes[mode]
                before = wait_for(lambda m=mesh: (s := m.service("srv"))["state"] == "running" and s["pid"] and s,
                                  30, "running")
                time.sleep(1.2)  # past min_uptime: an immediate restart, no backoff
                t0 = time.monotonic()
                os.kill(before["pid"], signal.SIGKILL)
                wait_for(lambda m=mesh: (s := m.service("srv"))["state"] == "running"
                         and s["incarnation"] != before["incarnation"] and accepts(m.port("srv")), 30, "back",
                         interval=0.005)
                samples["cgroup" if mode == "auto" else "marks"].append(round((time.monotonic() - t0) * 1000, 2))
    finally:
        for mesh in meshes.values():
            cleanup(mesh)
    return {"kills": kills, "ms": samples, "summary": {k: summary(v) for k, v in samples.items()}}


PERL_SERVER = ['perl', '-MIO::Socket::INET', '-e', '$s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", '
               'LocalPort => $ARGV[0], Listen => 5, ReuseAddr => 1) or die; sleep 1000']


def spawn(reps: int, root: Path) -> dict:
    return asyncio.run(_spawn(reps, root))


async def _spawn(reps: int, root: Path) -> dict:
    from tron.services.daemon.cgroups import Limits
    from tron.services.daemon.sockdiag import listening_inodes
    from tron.services.daemon.spawner import LocalSpawner, SpawnSpec

    (root / "server.py").write_text(SERVER)
    server = PERL_SERVER if shutil.which("perl") else [sys.executable, "-S", str(root / "server.py")]
    modes = ("gate", "join", "marks")
    spawners = {"gate": LocalSpawner(cgroup_home=root / "gate"),
                "join": LocalSpawner(cgroup_home=root / "join"),
                "marks": LocalSpawner(cgroup_home=None)}
    for sp in spawners.values():
        await sp.start(lambda c: None)
    assert spawners["gate"].cgroups is not None, spawners["gate"].ownership()
    ports = {}
    for m in modes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports[m] = s.getsockname()[1]
    samples: dict[str, list[float]] = {m: [] for m in modes}
    to_exec: dict[str, list[float]] = {m: [] for m in modes}
    binary = os.path.realpath(shutil.which(server[0]) or server[0])
    children: dict = {}
    try:
        for i in range(reps + 1):
            for m in modes[i % 3:] + modes[:i % 3]:
                sp, old = spawners[m], children.get(m)
                if old is not None:
                    os.kill(old.pid, signal.SIGKILL)
                    await old.exited.wait()
                t0 = time.perf_counter()
                if old is not None:
                    await sp.kill(old)
                reserved = sp.reserve("srv") if m == "gate" else None
                assert reserved or m != "gate" or i == 0, "no gate was ready"
                spec = SpawnSpec(name="srv", incarnation=reserved or f"i-{m}-{i}", argv=[*server, str(ports[m])],
                                 env=dict(os.environ), cwd=root, log=root / f"{m}.log", port=ports[m],
                                 limits=Limits())
                children[m] = child = await sp.spawn(spec)
                while _exe(child.pid) != binary:
                    await asyncio.sleep(0.0002)
                t1 = time.perf_counter()
                while not listening_inodes(ports[m]):
                    await asyncio.sleep(0.0002)
                if i > 0:  # the first start of each has no gate and an old one to kill
                    samples[m].append(round((time.perf_counter() - t0) * 1000, 2))
                    to_exec[m].append(round((t1 - t0) * 1000, 3))
                await asyncio.sleep(0.7)
    finally:
        for m, child in children.items():
            await spawners[m].kill(child)
        for sp in spawners.values():
            await sp.close()
    return {"reps": reps, "server": server[0], "ms": samples, "exec_ms": to_exec,
            "summary": {m: summary(v) for m, v in samples.items()},
            "summary_to_exec": {m: summary(v) for m, v in to_exec.items()}}


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def flood(rate: float, seconds: float, root: Path) -> dict:
    script = root / "flood.py"
    script.write_text(FLOOD)
    service = {"command": ["{python}", str(script), "{port}", str(rate), str(seconds)], "port": 6150,
               "liveness": {"tcp": {}, "interval": 1.0, "timeout": 1.0}, "log_max_bytes": "10MB", "log_backups": 3}
    mesh = make_mesh(root / "flood", services={"flood": service})
    mesh.up()
    logs = mesh.home / "logs"
    status_ms: list[float] = []
    tail_ms: list[float] = []
    stop = threading.Event()

    def ask_status():
        while not stop.is_set():
            t0 = time.monotonic()
            mesh.status()
            status_ms.append((time.monotonic() - t0) * 1000)
            time.sleep(0.05)

    asker = threading.Thread(target=ask_status, daemon=True)
    try:
        pump = psutil.Process(wait_for(lambda: (mesh.status().get("logs") or {}).get("pid"), 10, "the pump"))
        wait_for(lambda: (logs / "flood.log").exists(), 30, "the flood's first line")
        daemon = psutil.Process(mesh.status()["daemon"]["pid"])
        cpu0 = pump.cpu_times()
        dcpu0 = daemon.cpu_times()
        asker.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds + 1:
            s0 = time.monotonic()
            proc = subprocess.run([*mesh_tron(mesh), "logs", "-n", "5", "flood"], env=mesh.env, capture_output=True,
                                  text=True, timeout=30)
            tail_ms.append((time.monotonic() - s0) * 1000)
            assert proc.returncode == 0, proc.stderr
            time.sleep(max(0.0, 1.0 - (time.monotonic() - s0)))
        done = wait_for(lambda: b"flood done" in (logs / "flood.log").read_bytes(), 60, "the flood's end")
        stop.set()
        asker.join()
        cpu1, dcpu1 = pump.cpu_times(), daemon.cpu_times()
        files = sorted(logs.glob("flood.log*"))
        sizes = {p.name: p.stat().st_size for p in files}
        ordered = sorted((p for p in files if p.name != "flood.log"), key=lambda p: -int(p.suffix[1:])) \
            + [logs / "flood.log"]
        counters, summary_line = [], ""
        for p in ordered:
            for line in p.read_bytes().splitlines():
                if line.startswith(b"flood done"):
                    summary_line = line.decode()
                elif line[:12].isdigit():
                    counters.append(int(line[:12]))
        gaps = sum(1 for a, b in zip(counters, counters[1:]) if b != a + 1)
        total_lines = int(summary_line.split()[2])
        result = {
            "rate_mb_s": rate, "seconds": seconds, "done": bool(done), "writer": summary_line,
            "files": sizes, "total_bytes": sum(sizes.values()),
            "kept_lines": len(counters), "gaps_in_kept": gaps, "newest_kept": counters[-1] if counters else None,
            "last_written": total_lines - 1,
            "pump_cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2),
            "daemon_cpu_s": round((dcpu1.user + dcpu1.system) - (dcpu0.user + dcpu0.system), 2),
            "status_ms": summary(status_ms), "tron_logs_ms": summary(tail_ms),
            "pump_stats": mesh.status().get("logs"),
        }
    finally:
        stop.set()
        cleanup(mesh)
    return result


def mesh_tron(mesh) -> list[str]:
    from tests.harness import TRON

    return [*TRON, "--config", str(mesh.config)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=15)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--only", choices=("restart", "spawn", "flood"))
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tron-resources-"))
    out = {}
    if args.only in (None, "restart"):
        out["restart"] = restart(args.kills, root)
        print(json.dumps(out["restart"]["summary"], indent=2))
    if args.only in (None, "spawn"):
        out["spawn"] = spawn(args.reps, root)
        print(json.dumps({"to_exec": out["spawn"]["summary_to_exec"], "to_listen": out["spawn"]["summary"]},
                         indent=2))
    if args.only in (None, "flood"):
        out["flood"] = flood(args.rate, args.seconds, root)
        print(json.dumps(out["flood"], indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
