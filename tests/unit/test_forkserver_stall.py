"""A fork server that runs but leaves a spawn unanswered (spawner.py ``ForkServerClient._stalled``):
nothing more is asked of it, so no later start waits SPAWN_WAIT on it; it is pinged, served
again once it answers, and ended once it has answered nothing for the grace. Against a real
process (the server's stand-in) and a real unix socket that answers only when told to;
the waits are shortened here. tests/integration/test_forkserver.py freezes the real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from tron.services.daemon import spawner
from tron.services.daemon.spawner import ForkServerClient


class Server:
    """A unix socket that reads each request line and answers it only once ``answering`` is set."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.answering = asyncio.Event()
        self.asked: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        self.asked.append(json.loads(line)["op"])
        try:
            await self.answering.wait()
            writer.write(json.dumps({"ok": True, "pid": self.pid}).encode() + b"\n")
            await writer.drain()
        except (asyncio.CancelledError, ConnectionError):  # the client gave up, or the test is over
            pass
        finally:
            writer.close()


@pytest.fixture
async def stalled(tmp_path, monkeypatch):
    monkeypatch.setattr(spawner, "SPAWN_WAIT", 0.3)
    monkeypatch.setattr(spawner, "STALL_PING", 0.05)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    server = Server(proc.pid)
    path = tmp_path / "fs.sock"
    listener = await asyncio.start_unix_server(server.handle, path=str(path))
    client = ForkServerClient(path, tmp_path / "fs.log", tmp_path, {})
    client.proc, client.ready = proc, True
    yield client, server, proc
    server.answering.set()
    if client._judging is not None:
        client._judging.cancel()
    listener.close()
    proc.kill()
    proc.wait(10)


async def spawn(client: ForkServerClient, tmp_path) -> int | None:
    return await client.spawn("tron.services.programmer", {}, tmp_path, tmp_path / "p.log")


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_server_that_answers_again_is_asked_again_and_not_ended(stalled, tmp_path):
    client, server, proc = stalled
    serving: list[bool] = []
    client.on_serving = lambda: serving.append(True)  # the spawner makes the standbys it could not
    assert await spawn(client, tmp_path) is None  # unanswered for SPAWN_WAIT: spawned plainly
    assert not client.ready and client.stalled_since is not None
    asked = server.asked.count("spawn")
    assert await spawn(client, tmp_path) is None
    assert server.asked.count("spawn") == asked == 1  # the next start did not ask (nor wait)
    await until(lambda: "ping" in server.asked, 5, "a ping")
    server.answering.set()
    await until(lambda: client.ready, 5, "the server served again")
    assert client.stalled_since is None and proc.poll() is None  # answered in time: not ended
    assert serving == [True]


async def test_a_server_that_never_answers_is_ended_after_the_grace(stalled, tmp_path):
    client, server, proc = stalled
    client.stall_grace = 0.5
    assert await spawn(client, tmp_path) is None
    await until(lambda: proc.poll() is not None, 10, "the server ended")
    assert proc.returncode == -9  # SIGKILL; the daemon's _on_exit then starts a fresh one
    assert not client.ready


async def test_a_server_stopped_by_a_signal_is_not_judged_stalled(stalled, tmp_path, monkeypatch):
    client, server, proc = stalled
    monkeypatch.setattr(client, "stopped", lambda: True)  # SIGSTOP is said on its own, and waited out
    client._stalled()
    assert client.ready and client.stalled_since is None and client._judging is None
