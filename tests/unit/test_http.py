"""The mesh client on a real loopback server: every way a connection can fail is an
OSError to its callers, so a peer killed mid-request is handled like one that refused (a
run once failed with internal_error:ServerDisconnectedError when its child was killed
while the parent pushed it a task)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from tron.common.http import MeshClient, MeshConnectionError, MeshHTTPError


@pytest.fixture
async def server():
    async def hang_up(request: web.Request) -> web.Response:
        request.transport.close()  # the process died with the request in hand
        await asyncio.sleep(1)
        return web.Response()

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "no"}, status=409)

    app = web.Application()
    app.router.add_post("/hang-up", hang_up)
    app.router.add_post("/refuse", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_a_peer_that_hangs_up_mid_request_is_an_oserror(server):
    client = MeshClient("t")
    try:
        with pytest.raises(OSError) as err:
            await client.post(server + "/hang-up", {})
        assert isinstance(err.value, MeshConnectionError) and "ServerDisconnectedError" in str(err.value)
        with pytest.raises(MeshHTTPError) as answer:  # an answer stays an answer
            await client.post(server + "/refuse", {})
        assert answer.value.status == 409
    finally:
        await client.close()


async def test_nothing_listening_is_an_oserror():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        client = MeshClient("t")
        try:
            with pytest.raises(OSError):
                await client.post(f"http://127.0.0.1:{port}/x", {})
        finally:
            await client.close()


@pytest.mark.parametrize(("body", "expected"), [
    ('{"error": "no", "verdict": "stale"}', {"error": "no", "verdict": "stale"}),
    ("not json", {"error": "not json"}),
    ('["a", "list"]', {"error": '["a", "list"]'}),  # once returned as is: err.json().get(...) raised AttributeError
    ("3", {"error": "3"}),
])
def test_an_error_body_is_always_an_object_to_read_from(body, expected):
    assert MeshHTTPError(409, "http://x", body).json() == expected


async def test_a_control_endpoint_lets_in_its_token_only_for_plain_handlers_and_methods():
    from aiohttp.test_utils import make_mocked_request

    from tron.common.http import TOKEN_KEY, require_token

    @require_token
    async def plain(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    class Role:
        @require_token
        async def method(self, request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

    app = web.Application()
    app[TOKEN_KEY] = "secret"
    for handler in (plain, Role().method):
        assert handler.__name__ in ("plain", "method")
        let_in = await handler(make_mocked_request("POST", "/x", headers={"X-Tron-Token": "secret"}, app=app))
        refused = await handler(make_mocked_request("POST", "/x", headers={"X-Tron-Token": "wrong"}, app=app))
        assert (let_in.status, refused.status) == (200, 401)
