"""What it costs to judge one replica of a shared port on its own answers.

N small HTTP servers (asyncio, each answering its pid) accept from one listening socket this
script holds, as a replicated program's replicas take the daemon's. The daemon's own probe
code (``ProbeChecks.check``, an ``http`` probe of the port) is timed against replica 1, in
turns:

- ``attributed``: as the daemon probes a replica now: a connection a sibling accepted is made
  again, until replica 1's own processes accepted one (services/daemon/acceptor.py), at most
  3 a replica, 8 to 32 (then the probe is inconclusive: neither a pass nor a failure);
- ``any replica``: the same probe without that check (what it was before): whichever replica
  the kernel gave the connection answers for replica 1;
- ``alone``: one server on a port of its own, the plain probe (the floor).

For each: the probe's time (median, p90), the CPU it cost this process (the daemon's, in the
daemon), how many connections it made, how often the answer came from replica 1 itself, and
how many probes were inconclusive.

    .venv/bin/python -m benchmarks.shared_probe [--replicas 3] [--probes 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import aiohttp

from benchmarks import finish
from tron.common.config import Probe
from tron.scripts.stats import percentile
from tron.services.daemon import acceptor
from tron.services.daemon.probes import Inconclusive, ProbeChecks

SERVER = """
import asyncio, os, socket, sys
async def answer(reader, writer):
    while await reader.readline() not in (b"\\r\\n", b""):
        pass
    body = str(os.getpid()).encode()
    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s" % (len(body), body))
    await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(answer, sock=socket.socket(fileno=int(sys.argv[1])))
    print("serving", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    return s


def servers(sock: socket.socket, n: int) -> list[subprocess.Popen]:
    procs = []
    for _ in range(n):
        p = subprocess.Popen([sys.executable, "-c", SERVER, str(sock.fileno())], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, pass_fds=[sock.fileno()], text=True)
        procs.append(p)
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "serving"
    return procs


@dataclass
class Row:
    name: str
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this process's CPU (the daemon's, in the daemon)
    connections: list[int] = field(default_factory=list)
    own: int = 0
    inconclusive: int = 0  # every connection of the probe was accepted by a sibling


def replica(port: int, pid: int, shared: bool, n: int) -> SimpleNamespace:
    spec = SimpleNamespace(port=port, replica_of="web" if shared else None, is_agent=False, socket="inherit",
                           replicas=n if shared else 1)
    # Its processes as Child.pids lists them (the daemon reads its cgroup.procs): here the one server.
    return SimpleNamespace(name="web.1", spec=spec, child=SimpleNamespace(pid=pid, node=None, pids=lambda: [pid]))


async def run(n: int, probes: int) -> list[Row]:
    shared, alone = listener(), listener()
    procs = servers(shared, n)
    single = servers(alone, 1)
    try:
        async with aiohttp.ClientSession() as session:
            checks = ProbeChecks(SimpleNamespace(plain=session), lambda svc: {"port": str(svc.spec.port)})
            probe = Probe.model_validate({"http": {"path": "/"}, "timeout": 2.0})
            rows = {"attributed": (Row("attributed"), replica(shared.getsockname()[1], procs[0].pid, True, n)),
                    "any replica": (Row("any replica"), replica(shared.getsockname()[1], procs[0].pid, False, n)),
                    "alone": (Row("alone"), replica(alone.getsockname()[1], single[0].pid, False, 1))}
            made = [0]
            real = acceptor.accepted_by

            async def counted(*args, **kw):
                made[0] += 1
                return await real(*args, **kw)

            acceptor.accepted_by = counted  # type: ignore[assignment]
            for i in range(probes):
                for key in (list(rows) if i % 2 == 0 else list(reversed(rows))):
                    row, svc = rows[key]
                    made[0] = 0
                    began, cpu = time.perf_counter(), time.process_time()
                    result = await checks.check(svc, probe)
                    row.times.append((time.perf_counter() - began) * 1000)
                    row.cpu.append((time.process_time() - cpu) * 1000)
                    row.inconclusive += isinstance(result, Inconclusive)
                    assert result.passed or isinstance(result, Inconclusive), result
                    row.connections.append(max(1, made[0]))
            # Whose answer the unattributed probe counted: it does not say, so as many plain
            # GETs of the port (what it sends) count how often replica 1 is the one answering.
            for _ in range(probes):
                async with session.get(f"http://127.0.0.1:{shared.getsockname()[1]}/") as resp:
                    rows["any replica"][0].own += int(await resp.text()) == procs[0].pid
            rows["attributed"][0].own = probes
            rows["alone"][0].own = probes
            return [r for r, _ in rows.values()]
    finally:
        for p in procs + single:
            p.kill()
            p.wait()
        shared.close()
        alone.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.shared_probe")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = asyncio.run(run(args.replicas, args.probes))
    print(f"an http probe of replica 1 of {args.replicas} sharing one socket, {args.probes} probes each, in turns:")
    print(f"{'probe':<13} {'median':>8} {'p90':>8} {'CPU median':>11} {'connections/probe':>18} "
          f"{'answered by replica 1':>22} {'inconclusive':>13}")
    for r in rows:
        print(f"{r.name:<13} {percentile(r.times, 0.5):>6.2f}ms {percentile(r.times, 0.9):>6.2f}ms "
              f"{percentile(r.cpu, 0.5):>9.2f}ms {sum(r.connections) / len(r.connections):>18.2f} "
              f"{100 * r.own / args.probes:>21.0f}% {r.inconclusive:>13}")
    return finish(args.json, {r.name: {"ms": r.times, "cpu_ms": r.cpu, "connections": r.connections, "own": r.own,
                                           "inconclusive": r.inconclusive}
                                 for r in rows}, [])


if __name__ == "__main__":
    sys.exit(main())
