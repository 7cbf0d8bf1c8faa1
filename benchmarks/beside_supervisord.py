"""redis-server under Tron and under supervisord, side by side, each with its own defaults: what
an operator waits for at the terminal and how soon the server serves again.

Tron: a mesh of redis alone, its entry from examples/servers/mesh.toml (a PING/+PONG probe),
the shipped policy. supervisord: the same command as a [program] with supervisord's defaults
(autorestart "unexpected", startsecs 1, stopsignal TERM), its own config, socket and logs in a
temporary directory. Each on a free port of its own; the rows take turns, repetition by
repetition, so the machine's noise lands on both. Measured, medians:

  status           `tron status` / `supervisorctl status`: launch -> exit
  stop             `tron stop redis` / `supervisorctl stop redis`: launch -> exit (then the
                   port must refuse: checked)
  start -> serving `tron start redis` / `supervisorctl start redis`: launch -> the first +PONG
                   (polled every 2 ms while the command runs); the command's own exit beside it
                   (supervisorctl waits for startsecs before it says RUNNING)
  kill -> serving  SIGKILL of redis -> the first +PONG from a new pid

Needs redis-server and supervisord (Debian: apt-get install redis-server supervisor); says so
and exits 2 otherwise.

    .venv/bin/python -m benchmarks.beside_supervisord [--reps 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from benchmarks import finish
from tron.scripts.stats import percentile
from tests.harness import REPO, TRON, cleanup, make_mesh, server_answers, wait_for


def pong(port: int) -> bool:
    return server_answers(port, "redis", timeout=0.2)  # PING -> +PONG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_pid(port: int) -> int:
    out = subprocess.run(["pgrep", "-f", f"redis-server 127.0.0.1:{port}"], capture_output=True, text=True).stdout
    return int(out.split()[0])


def timed(cmd: list[str], env: dict | None = None) -> float:
    began = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stdout}{done.stderr}")
    return time.perf_counter() - began


def until_serving(port: int, began: float, not_pid: int | None = None, timeout: float = 30) -> float:
    deadline = began + timeout
    while time.perf_counter() < deadline:
        if pong(port) and (not_pid is None or redis_pid(port) != not_pid):
            return time.perf_counter() - began
        time.sleep(0.002)
    raise RuntimeError(f"redis on {port} not serving within {timeout}s")


class Tron:
    name = "tron"

    def __init__(self, tmp: Path) -> None:
        spec = tomllib.loads((REPO / "examples" / "servers" / "mesh.toml").read_text())["services"]["redis"]
        self.mesh = make_mesh(tmp / "tron", services={"redis": spec}, fast=False)
        self.port = self.mesh.port("redis")

    def up(self) -> None:
        self.mesh.up()
        wait_for(lambda: pong(self.port), 30, "redis under Tron")

    def cli(self, *args: str) -> list[str]:
        return [*TRON, "--config", str(self.mesh.config), *args]

    def down(self) -> list:
        return cleanup(self.mesh)

    @property
    def env(self) -> dict:
        return self.mesh.env


class Supervisord:
    name = "supervisord"

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "supervisord"
        self.dir.mkdir()
        self.port = free_port()
        self.conf = self.dir / "supervisord.conf"
        sock = self.dir / "supervisor.sock"
        self.conf.write_text(f"""[unix_http_server]
file={sock}

[supervisord]
logfile={self.dir}/supervisord.log
pidfile={self.dir}/supervisord.pid
childlogdir={self.dir}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{sock}

[program:redis]
command=redis-server --port {self.port} --bind 127.0.0.1 --save "" --appendonly no --dir {self.dir}
""")
        self.env = dict(os.environ)

    def up(self) -> None:
        subprocess.run(["supervisord", "-c", str(self.conf)], check=True, timeout=30)
        wait_for(lambda: pong(self.port), 30, "redis under supervisord")

    def cli(self, *args: str) -> list[str]:
        return ["supervisorctl", "-c", str(self.conf), *args]

    def down(self) -> list:
        subprocess.run(self.cli("shutdown"), capture_output=True, timeout=60)
        pidfile = self.dir / "supervisord.pid"
        wait_for(lambda: not pidfile.exists(), 30, "supervisord to exit")
        left = subprocess.run(["pgrep", "-f", f"redis-server 127.0.0.1:{self.port}"], capture_output=True,
                              text=True).stdout.split()
        for pid in left:
            os.kill(int(pid), signal.SIGKILL)
        return [f"redis-server {p}" for p in left]


def one_round(sup, rows: dict[str, list[float]]) -> None:
    def add(row: str, value: float) -> None:
        rows.setdefault(f"{sup.name} {row}", []).append(value)

    add("status (s)", timed(sup.cli("status"), sup.env))
    add("stop (s)", timed(sup.cli("stop", "redis"), sup.env))
    if pong(sup.port):
        raise RuntimeError(f"{sup.name}: redis still serves after stop")
    began = time.perf_counter()
    start = subprocess.Popen(sup.cli("start", "redis"), env=sup.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    add("start -> serving (s)", until_serving(sup.port, began))
    if start.wait(60) != 0:
        raise RuntimeError(f"{sup.name}: start exited {start.returncode}")
    add("start: command exits (s)", time.perf_counter() - began)  # (a little late: after serving was seen)
    time.sleep(2.5)  # longer than either's notion of a start that "ran long enough" (startsecs 1, min_uptime)
    old = redis_pid(sup.port)
    began = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    add("kill -9 -> serving (s)", until_serving(sup.port, began, not_pid=old))
    time.sleep(2.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.beside_supervisord")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    missing = [t for t in ("redis-server", "supervisord", "supervisorctl") if shutil.which(t) is None]
    if missing:
        print(f"needs {', '.join(missing)} (Debian: apt-get install redis-server supervisor)", file=sys.stderr)
        return 2
    rows: dict[str, list[float]] = {}
    leftovers: list = []
    with tempfile.TemporaryDirectory(prefix="tron-beside-") as tmp:
        both = [Tron(Path(tmp)), Supervisord(Path(tmp))]
        try:
            for sup in both:
                sup.up()
            for rep in range(args.reps):
                for sup in (both if rep % 2 == 0 else both[::-1]):
                    one_round(sup, rows)
                print(f"  rep {rep + 1}/{args.reps} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr,
                      flush=True)
        finally:
            for sup in both:
                leftovers += sup.down()
    print(f"{'row':<40} {'median ms':>10} {'min':>7} {'max':>7}   (n={args.reps}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f})")
    for row in sorted(rows, key=lambda r: (r.split(" ", 1)[1], r)):
        xs = rows[row]
        print(f"{row:<40} {percentile(xs, 0.5) * 1000:>10.0f} {min(xs) * 1000:>7.0f} {max(xs) * 1000:>7.0f}")
    return finish(args.json, {"samples_s": rows}, leftovers)


if __name__ == "__main__":
    sys.exit(main())
