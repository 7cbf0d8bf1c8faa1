"""The probe kinds' registry (services/daemon/probe_kinds): every kind registered and in the
config's Probe model, an unknown kind refused at load naming it, exactly one kind per probe,
and the moved checks keeping their behaviour (messages, no token, the exec tree ended)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import psutil
import pytest
from aiohttp import web

from tron.common.config import ConfigError, Probe, parse_mesh
from tron.common.http import MeshClient
from tron.common import probe_kinds
from tron.common.probe_kinds import KindConfig, ProbeKind, ProbeResult
from tron.services.daemon.probes import ProbeChecks
from tron.services.daemon.supervisor import Service
from tests.harness import REPO, wait_for

EXAMPLE_PROBES = {
    "http": {"http": {"path": "/healthz", "status": [200, 204]}},
    "tcp": {"tcp": {"send": "PING\r\n", "expect": "+PONG"}},
    "exec": {"exec": {"command": ["pg_isready", "-p", "{port}"]}},
    "grpc": {"grpc": {"service": "tron.Echo"}},
}


def service(probe: dict, port: int = 7005) -> Service:
    cfg = parse_mesh({"services": {"s": {"command": ["x"], "port": port, "liveness": probe}}})
    return Service(spec=cfg.services["s"], provider=None)


def load_error(probe: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_mesh({"services": {"s": {"command": ["x"], "port": 7005, "liveness": probe}}}, source="mesh.toml")
    return str(err.value)


# -- the registry ---------------------------------------------------------------------------

def test_every_built_in_kind_is_registered_and_is_a_field_of_probe():
    assert probe_kinds.names() == ("http", "tcp", "exec", "grpc")
    assert set(EXAMPLE_PROBES) == set(probe_kinds.names())  # a new kind gets an example here
    for kind in probe_kinds.kinds():
        assert probe_kinds.get(kind.name) is kind
        assert issubclass(kind.config, KindConfig)
        assert kind.config.model_config["extra"] == "forbid" and kind.config.model_config["frozen"]
        assert Probe.model_fields[kind.name].annotation == kind.config | None


@pytest.mark.parametrize("name", list(EXAMPLE_PROBES))
def test_a_probe_of_each_kind_loads_in_the_files_shape(name):
    probe = service(EXAMPLE_PROBES[name]).spec.liveness
    assert probe.kind == name
    assert probe.check is getattr(probe, name) and isinstance(probe.check, probe_kinds.get(name).config)
    with pytest.raises(Exception):  # frozen, as the rest of the config
        probe.check.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("probe,message", [
    ({"grpcx": {}}, "services.s.liveness.grpcx: unknown key"),
    ({"grpc": {"servce": "x"}}, "services.s.liveness.grpc.servce: unknown key"),
    ({"grpc": {"port": 70000}}, "services.s.liveness.grpc.port: Input should be less than or equal to 65535"),
    ({"interval": 1.0}, "a probe has exactly one of http, tcp, exec, grpc (this one has none)"),
    ({"grpc": {}, "tcp": {}}, "exactly one of http, tcp, exec, grpc (this one has ['tcp', 'grpc'])"),
    ({"url": "http://x/", "grpc": {}}, "(this one has ['http', 'grpc'])"),
    ({"url": "http://x/", "http": {}}, "give url or http, not both"),
    ({"exec": {"command": ["check", "{prot}"]}}, "liveness.exec.command[1]: unknown placeholder {prot}"),
    ({"http": {"url": "http://127.0.0.1:{prot}/"}}, "liveness.http.url: unknown placeholder {prot}"),
])
def test_bad_probes_are_refused_at_load_naming_the_key(probe, message):
    got = load_error(probe)
    assert message in got and got.startswith("mesh.toml: services.s"), got


def test_the_url_shorthand_is_still_an_http_probe():
    probe = service({"url": "http://127.0.0.1:{port}/"}).spec.liveness
    assert probe.kind == "http" and probe.http.url == "http://127.0.0.1:{port}/" and probe.url is None


class Echo(ProbeKind):
    name = "echo"
    config = KindConfig

    async def check(self, spec, svc, ctx):
        return ProbeResult(True, "echo")


def test_registering_a_kind_twice_or_a_malformed_one_is_refused():
    with pytest.raises(ValueError, match="probe kind 'grpc' is registered twice"):
        probe_kinds.register(probe_kinds.get("grpc"))
    with pytest.raises(ValueError, match="unknown probe kind 'echo'; expected one of http, tcp, exec, grpc"):
        probe_kinds.get("echo")
    with probe_kinds.registered(Echo()) as echo:
        assert probe_kinds.get("echo") is echo and probe_kinds.names()[-1] == "echo"
    assert "echo" not in probe_kinds.names()

    class NoConfig(Echo):
        config = dict

    class BadName(Echo):
        name = "not a key"

    for bad in (NoConfig(), BadName()):
        with pytest.raises(TypeError):
            probe_kinds.register(bad)


async def test_probe_checks_dispatches_through_the_registry():
    svc = service({"grpc": {}})
    client = MeshClient(None)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(probe_kinds.get("grpc"), "check", lambda spec, s, ctx: Echo().check(spec, s, ctx))
            assert await ProbeChecks(client, lambda s: {}).check(svc, svc.spec.liveness) == (True, "echo")
    finally:
        await client.close()


@pytest.mark.parametrize("probe,port", [
    ({"http": {}}, 7005),
    ({"http": {"port": 7100}}, 7100),
    ({"http": {"url": "http://localhost:{port}/x"}}, 7005),
    ({"http": {"url": "http://example.com:7005/"}}, None),  # another host: no listener here to own
    ({"tcp": {"port": 7101}}, 7101),
    ({"exec": {"command": ["true"]}}, None),
    ({"grpc": {}}, 7005),
    ({"grpc": {"port": 7102}}, 7102),
])
def test_the_port_each_kind_asks(probe, port):
    svc = service(probe)
    checks = ProbeChecks(MeshClient(None), lambda s: {"port": str(s.spec.port)})
    assert checks.probe_port(svc, svc.spec.liveness) == port


def test_loading_the_config_and_the_probes_does_not_import_grpc():
    code = "import sys, tron.common.config, tron.services.daemon.probes; print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


# -- the moved checks keep their behaviour ----------------------------------------------------

async def test_exec_passes_on_exit_0_and_says_the_exit_and_output_otherwise():
    checks = ProbeChecks(MeshClient(None), lambda s: {"port": str(s.spec.port)})
    ok = service({"exec": {"command": ["sh", "-c", "test {port} = 7005"]}})
    assert await checks.check(ok, ok.spec.liveness) == (True, "exit 0")
    bad = service({"exec": {"command": ["sh", "-c", "echo down; exit 3"]}})
    assert await checks.check(bad, bad.spec.liveness) == (False, "exit 3: down")


async def test_an_exec_probe_past_its_timeout_is_ended_tree_and_all(tmp_path):
    pids = tmp_path / "pids"
    svc = service({"exec": {"command": ["sh", "-c", f"sleep 30 & echo $! > {pids}; sleep 30"]}, "timeout": 0.3})
    ok, what = await ProbeChecks(MeshClient(None), lambda s: {}).check(svc, svc.spec.liveness)
    assert (ok, what) == (False, "no answer within 0.3s")
    child = int(pids.read_text())
    wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE, 5,
             "the probe's background sleep to be killed")


async def test_tcp_sends_and_expects():
    async def redis_like(reader, writer):
        if await reader.readline() == b"PING\r\n":
            writer.write(b"+PONG\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(redis_like, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    checks = ProbeChecks(MeshClient(None), lambda s: {})
    try:
        svc = service({"tcp": {"send": "PING\r\n", "expect": "+PONG"}}, port)
        assert await checks.check(svc, svc.spec.liveness) == (True, "got '+PONG'")
        svc = service({"tcp": {"send": "QUIT\r\n", "expect": "+PONG"}}, port)
        assert await checks.check(svc, svc.spec.liveness) == (False, "closed before '+PONG' (got b'')")
    finally:
        server.close()
        await server.wait_closed()


async def test_http_answers_by_status_and_never_carries_the_mesh_token():
    seen = []

    async def handler(request):
        seen.append(dict(request.headers))
        return web.Response(status=int(request.query.get("status", "200")))

    app = web.Application()
    app.router.add_get("/healthz", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    client = MeshClient("the-mesh-token")
    checks = ProbeChecks(client, lambda s: {"port": str(s.spec.port)})
    try:
        svc = service({"http": {"path": "/healthz"}}, port)
        assert await checks.check(svc, svc.spec.liveness) == (True, "HTTP 200")
        svc = service({"http": {"url": "http://127.0.0.1:{port}/healthz?status=503"}}, port)
        assert await checks.check(svc, svc.spec.liveness) == (False, "HTTP 503")
    finally:
        await client.close()
        await runner.cleanup()
    assert len(seen) == 2 and not any("the-mesh-token" in str(h) for h in seen)
