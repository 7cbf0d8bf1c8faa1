"""common/conn_guard.py on a real aiohttp server on loopback: connections held open by a
client that never sends a request cannot keep a real client out, and a request in progress
(a live event stream) is never what is closed to make room."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import ClientSession, web

from tests.harness import closed_by_peer
from tron.common import conn_guard


async def _serve(cap: int, *, keepalive_timeout: float = 3630):
    release = asyncio.Event()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first\n")
        await release.wait()
        await resp.write(b"last\n")
        return resp

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    evicted: list[int] = []
    guard = conn_guard.ConnectionGuard(runner.server, cap, on_evict=evicted.append)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, guard, port, release, evicted


def _connect(port: int, n: int) -> list[socket.socket]:
    out = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:
            s.sendall(b"GET / HT")
        out.append(s)
    return out


async def _held(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that never send a byte (half of them send half a request line),
    made in a thread: the server accepts on this loop meanwhile."""
    return await asyncio.to_thread(_connect, port, n)


async def _wait(pred, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_flood_of_idle_connections_keeps_no_real_client_out_and_cuts_no_stream():
    async def scenario():
        runner, guard, port, release, evicted = await _serve(cap=16)
        held: list[socket.socket] = []
        try:
            async with ClientSession() as http:
                streaming = await http.get(f"http://127.0.0.1:{port}/stream")
                assert await streaming.content.readline() == b"first\n"
                held = await _held(port, 200)
                await _wait(lambda: guard.evicted >= 200 - 16)
                await _wait(lambda: guard.open <= 16 + 2)  # a closed one is forgotten once its handler ended
                assert guard.peak > 16
                async with http.get(f"http://127.0.0.1:{port}/") as resp:  # a real client is served
                    assert resp.status == 200 and await resp.text() == "ok"
                release.set()  # the stream opened first was never taken for room
                assert await streaming.content.readline() == b"last\n"
                streaming.release()
            assert sum(evicted) == guard.evicted and guard.summary()["evicted"] == guard.evicted
            assert closed_by_peer(held[:100], 5) == 100  # the closed ones see the end of their connection
        finally:
            release.set()
            for s in held:
                s.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_under_the_cap_nothing_is_closed_and_an_idle_connection_ends_at_the_idle_timeout():
    async def scenario():
        runner, guard, port, _, _ = await _serve(cap=64, keepalive_timeout=0.3)
        held: list[socket.socket] = []
        try:
            held = await _held(port, 10)
            await _wait(lambda: guard.open == 10)
            assert guard.evicted == 0
            await _wait(lambda: guard.open == 0, timeout=10)  # aiohttp's keep-alive timeout, set by the runner
        finally:
            for s in held:
                s.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_the_cap_follows_the_descriptor_limit(monkeypatch):
    monkeypatch.setattr(conn_guard.resource, "getrlimit", lambda _: (20000, 20000))
    assert conn_guard.default_cap() == conn_guard.CAP_MAX
    monkeypatch.setattr(conn_guard.resource, "getrlimit", lambda _: (1024, 4096))
    assert conn_guard.default_cap() == 256
    monkeypatch.setattr(conn_guard.resource, "getrlimit", lambda _: (100, 100))
    assert conn_guard.default_cap() == conn_guard.CAP_MIN
