"""Issue 22: a cgroup per incarnation. A program that daemonizes (redis-server
--daemonize yes, which also rewrites its environment) stays its service's: with
``daemonize = true`` its main process is read from its pidfile and supervised like any
other; without it, it is at least owned and stopped. The fallback (no cgroups, forced by
``[mesh] ownership = "marks"``) is tested on the same program. A service past its
``memory_max`` is killed by the kernel and recorded ``oom_killed``, the others untouched."""

from __future__ import annotations

import os
import shutil
import signal
import socket

import psutil
import pytest

from tron.services.daemon.sockdiag import listening_inodes
from tests.harness import wait_for

pytestmark = pytest.mark.integration

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="LOUD SKIP: redis-server not installed (apt-get install -y redis-server)")


def redis(daemonize: bool) -> dict:
    spec = {"command": ["redis-server", "--port", "{port}", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                        "--dir", "{state}", "--daemonize", "yes", "--pidfile", "{state}/redis.pid"],
            "port": 6150, "liveness": {"tcp": {"send": "PING\r\n", "expect": "+PONG"}, "interval": 0.5,
                                       "timeout": 0.5, "failure_threshold": 2}}
    if daemonize:
        spec.update(daemonize=True, pidfile="{state}/redis.pid")
    return spec


def pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_on(port: int) -> set[int]:
    """This mesh's redis servers (a daemonized redis calls itself "redis-server 127.0.0.1:PORT";
    other engineers' meshes run redis too)."""
    found = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "redis-server" and any(f":{port}" in part or part == str(port)
                                                    for part in p.info["cmdline"] or []):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.add(p.pid)
            except psutil.Error:
                pass
    return found


def mesh_of(mesh_factory, services: dict, *, ownership: str = "auto", **kw):
    mesh = mesh_factory(services=services, **kw)
    if ownership != "auto":
        text = mesh.config.read_text().replace("[mesh]\n", f'[mesh]\nownership = "{ownership}"\n', 1)
        mesh.config.write_text(text)
    return mesh


def down_leaves_nothing(mesh, port: int) -> None:
    proc = mesh.down()
    assert proc.returncode == 0 and "Nothing left running" in proc.stdout, proc.stdout + proc.stderr
    assert not listening_inodes(port)
    assert not redis_on(port), "a redis of this mesh survived tron down"
    assert mesh.processes() == []


@needs_redis
@pytest.mark.parametrize("ownership", ["auto", "marks"])
def test_a_daemonizing_redis_with_daemonize_true_is_supervised(mesh_factory, ownership):
    mesh = mesh_of(mesh_factory, {"redis": redis(True)}, ownership=ownership)
    mesh.up()
    status = mesh.status()
    assert status["ownership"]["mode"] == ("cgroup" if ownership == "auto" else "marks"), status["ownership"]
    expected = "ownership: cgroup" if ownership == "auto" else "ownership: marks"
    assert expected in mesh.tron("status").stdout
    port = mesh.port("redis")
    first = mesh.service("redis")
    pidfile = mesh.home / "services" / "redis" / "redis.pid"
    assert first["state"] == "running" and first["pid"] == int(pidfile.read_text())  # the daemon, not its launcher
    assert pong(port)
    os.kill(first["pid"], signal.SIGKILL)
    back = wait_for(lambda: (s := mesh.service("redis"))["state"] == "running" and s["pid"] not in (None, first["pid"])
                    and s, 30, "redis back")
    assert wait_for(lambda: pong(port), 10, "redis serving again")
    assert back["pid"] == int(pidfile.read_text())
    [row] = mesh.history("redis")
    assert row["reason"] == "process_exit"
    assert redis_on(port) == {back["pid"]}  # one redis: the old one is gone
    down_leaves_nothing(mesh, port)


@needs_redis
@pytest.mark.parametrize("ownership", ["auto", "marks"])
def test_a_daemonizing_redis_without_daemonize_is_still_owned_and_stopped(mesh_factory, ownership):
    mesh = mesh_of(mesh_factory, {"redis": redis(False)}, ownership=ownership, policy={"start_timeout": 3.0})
    mesh.tron("up", "--detach")  # its launcher exits 0 at once: it is restarted, over and over
    rows = wait_for(lambda: (h := mesh.history("redis")) and len(h) >= 3 and h, 60, "three restarts")
    assert {r["reason"] for r in rows} <= {"process_exit", "spawn_failed", "start_timeout", "crash_looping"}
    # Each restart ended the daemonized redis of the incarnation before: never two of ours at once.
    assert len(redis_on(mesh.port("redis"))) <= 1
    down_leaves_nothing(mesh, mesh.port("redis"))


ALLOCATOR = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
time.sleep(float(sys.argv[2]))
hog = []
while True:
    hog.append(bytearray(8 << 20))  # touched: bytearray zero-fills
    time.sleep(0.01)
"""

CALM = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True:
    time.sleep(1)
"""


def test_a_service_past_memory_max_is_oom_killed_and_restarted_alone(mesh_factory, tmp_path):
    (tmp_path / "hog.py").write_text(ALLOCATOR)
    (tmp_path / "calm.py").write_text(CALM)
    probe = {"tcp": {}, "interval": 0.5, "timeout": 0.5}
    services = {"hog": {"command": ["{python}", str(tmp_path / "hog.py"), "{port}", "1.5"], "port": 6150,
                        "memory_max": "96MB", "liveness": probe},
                "calm": {"command": ["{python}", str(tmp_path / "calm.py"), "{port}"], "port": 6151,
                         "memory_max": "96MB", "pids_max": 64, "cpu_max": 0.5, "open_files": 256, "liveness": probe}}
    mesh = mesh_factory(services=services)
    mesh.up()
    if mesh.status()["ownership"]["mode"] != "cgroup":
        pytest.skip("LOUD SKIP: no cgroups on this machine: memory_max cannot be enforced")
    calm = mesh.service("calm")
    first = mesh.service("hog")
    rows = wait_for(lambda: (h := mesh.history("hog")) and h, 60, "the OOM kill recorded")
    assert rows[0]["reason"] == "oom_killed", rows[0]
    alert = mesh.rows("SELECT reason, detail FROM alerts WHERE incarnation = ?", (first["incarnation"],))[0]
    assert alert["reason"] == "oom_killed" and '"signal": 9' in alert["detail"], alert
    wait_for(lambda: (s := mesh.service("hog"))["incarnation"] != first["incarnation"] and s["pid"], 30, "hog restarted")
    after = mesh.service("calm")
    assert (after["pid"], after["incarnation"], after["restarts"]) == (calm["pid"], calm["incarnation"], 0)
    proc = psutil.Process(calm["pid"])
    assert proc.rlimit(psutil.RLIMIT_NOFILE) == (256, 256)
    metrics = mesh.http("GET", mesh.url("daemon") + "/metrics", token=False)[1]
    assert 'reason="oom_killed"' in str(metrics)
