"""A flood of connections that takes every descriptor of a process: asyncio logs an error,
with its traceback, for each accept() that finds none left (thousands a second; 155 MB of
the daemon's log in 80 s, past its max_bytes, as its rotation needs a descriptor too).
The log says it once per window, with the count of those it did not."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

SERVES = """
import asyncio, resource, sys
from tron.common import logs
logs.setup("t")
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

async def main():
    held = []
    async def keep(reader, writer):
        held.append(writer)
        await asyncio.sleep(3600)
    server = await asyncio.start_server(keep, "127.0.0.1", 0)
    print("port", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(float(sys.argv[1]))

asyncio.run(main())
"""


def test_a_flood_past_the_descriptor_limit_is_logged_once_per_window_not_per_accept():
    proc = subprocess.Popen([sys.executable, "-c", SERVES, "3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    clients = []
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert first.startswith("port "), first
        port = int(first.split()[1])
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and len(clients) < 300:
            try:
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=0.2))
            except OSError:
                pass
        out, _ = proc.communicate(timeout=30)
    finally:
        for c in clients:
            c.close()
        proc.kill()
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    flood = [r for r in lines if "out of system resource" in r["msg"]]
    assert len(clients) > 48  # the flood did pass the limit
    assert 1 <= len(flood) <= 2, f"{len(flood)} lines, {len(out)} bytes"
    assert "exc" not in flood[0]
