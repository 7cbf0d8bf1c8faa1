"""The grpc probe kind against a real gRPC health server (grpc.health.v1.Health/Check):
SERVING passes, NOT_SERVING fails, SERVING passes again; a service name the server does
not know and a server that is gone fail. First through ProbeChecks in this process, then a
whole mesh whose program is ready only while its health service says SERVING."""

from __future__ import annotations

import os
import signal
import socket
import textwrap

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tron.common.config import parse_mesh
from tron.common.http import MeshClient
from tron.services.daemon.probes import ProbeChecks
from tron.services.daemon.supervisor import Service
from tests.harness import wait_for

pytestmark = pytest.mark.integration
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def health_server():
    """A grpc.aio server with the standard health service on a free loopback port."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")  # the kernel picks; we read back which
    await server.start()
    yield server, servicer, port
    await server.stop(grace=None)


def service_on(port: int, probe: dict) -> Service:
    cfg = parse_mesh({"services": {"g": {"command": ["x"], "port": port, "readiness": probe}}})
    return Service(spec=cfg.services["g"], provider=None)


async def test_grpc_probe_follows_the_health_service(health_server):
    server, servicer, port = health_server
    svc = service_on(port, {"grpc": {}, "timeout": 2.0})
    client = MeshClient("the-mesh-token")
    checks = ProbeChecks(client, lambda s: {"port": str(s.spec.port)})
    try:
        assert checks.probe_port(svc, svc.spec.readiness) == port  # the start waits for its listener
        assert await checks.check(svc, svc.spec.readiness) == (True, "SERVING")
        await servicer.set("", NOT_SERVING)
        assert await checks.check(svc, svc.spec.readiness) == (False, "NOT_SERVING")
        await servicer.set("", SERVING)
        assert await checks.check(svc, svc.spec.readiness) == (True, "SERVING")

        named = service_on(port, {"grpc": {"service": "tron.Echo"}, "timeout": 2.0})
        ok, what = await checks.check(named, named.spec.readiness)
        assert not ok and what.startswith("NOT_FOUND"), what  # a name the server does not know
        await servicer.set("tron.Echo", SERVING)
        assert await checks.check(named, named.spec.readiness) == (True, "SERVING")
        await servicer.set("tron.Echo", NOT_SERVING)  # one service down, the server as a whole up
        assert await checks.check(named, named.spec.readiness) == (False, "NOT_SERVING")
        assert await checks.check(svc, svc.spec.readiness) == (True, "SERVING")

        await server.stop(grace=None)
        ok, what = await checks.check(svc, svc.spec.readiness)
        assert not ok and what.startswith("UNAVAILABLE"), what  # nothing listens
    finally:
        await client.close()


async def test_grpc_probe_that_gets_no_answer_fails_at_its_timeout():
    with socket.socket() as quiet:  # accepts connections (the kernel's backlog) but never speaks HTTP/2
        quiet.bind(("127.0.0.1", 0))
        quiet.listen()
        svc = service_on(quiet.getsockname()[1], {"grpc": {}, "timeout": 0.3})
        client = MeshClient(None)
        try:
            ok, what = await ProbeChecks(client, lambda s: {}).check(svc, svc.spec.readiness)
        finally:
            await client.close()
    assert not ok and ("0.3s" in what or "DEADLINE_EXCEEDED" in what), what


SERVER = textwrap.dedent("""
    # A gRPC server whose health service says NOT_SERVING after SIGUSR1, SERVING after SIGUSR2.
    import asyncio, signal, sys

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    async def main(port):
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        loop = asyncio.get_running_loop()
        for sig, status in ((signal.SIGUSR1, health_pb2.HealthCheckResponse.NOT_SERVING),
                            (signal.SIGUSR2, health_pb2.HealthCheckResponse.SERVING)):
            loop.add_signal_handler(sig, lambda s=status: loop.create_task(servicer.set("", s)))
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(grace=None)

    asyncio.run(main(int(sys.argv[1])))
""")


def test_a_program_is_ready_while_its_grpc_health_says_serving(mesh_factory):
    services = {"grpcd": {"command": ["{python}", "grpcd.py", "{port}"], "port": 6151,
                          "readiness": {"grpc": {}, "interval": 0.2, "timeout": 1.0,
                                        "failure_threshold": 1, "success_threshold": 1}}}
    mesh = mesh_factory(services=services)
    (mesh.config.parent / "grpcd.py").write_text(SERVER)
    mesh.up()
    first = wait_for(lambda: (s := mesh.service("grpcd"))["state"] == "running" and s["ready"] and s, 30,
                     "grpcd running and ready")
    os.kill(first["pid"], signal.SIGUSR1)
    wait_for(lambda: not mesh.service("grpcd")["ready"], 10, "grpcd not ready after NOT_SERVING")
    os.kill(first["pid"], signal.SIGUSR2)
    again = wait_for(lambda: (s := mesh.service("grpcd"))["ready"] and s, 10, "grpcd ready after SERVING")
    assert again["pid"] == first["pid"] and again["state"] == "running"  # readiness never restarts it
