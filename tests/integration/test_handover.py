"""Issue 14: the daemon holds every agent's listening socket (and a program's, with
socket = "inherit") across restarts, so a caller waits in the backlog instead of being
refused. Each test runs `tron drill handover`: request loops on new connections while the
service is SIGKILLed again and again; nothing may be refused, and only requests that were
inside a killed process may fail."""

from __future__ import annotations

import json
import os
import signal
import sys

import psutil
import pytest

from tron.services.daemon.sockdiag import listening_inodes
from tests.harness import REPO, wait_for

pytestmark = pytest.mark.integration
APPS = REPO / "tests" / "integration" / "apps"


def handover(mesh, name: str, kills: int, path: str = "/health") -> tuple[int, dict]:
    proc = mesh.tron("drill", "handover", name, "--kills", str(kills), "--path", path, "--interval", "0.5",
                     "--json", timeout=180)
    return proc.returncode, json.loads(proc.stdout)


def test_an_agent_killed_under_load_refuses_nobody(mesh_factory):
    mesh = mesh_factory(services={"llm-sim": {"role": "llm_sim", "port": 6190}})
    mesh.up()
    code, drill = handover(mesh, "llm-sim", 5)
    s = drill["summary"]
    assert code == 0 and s["refused"] == 0 and s["failed"] <= 10 and s["answered"] > 100, drill
    restarts = mesh.rows("SELECT reason, drill FROM retry_history WHERE retry_type = 'child_restart'")
    assert [(r["reason"], r["drill"]) for r in restarts] == [("process_exit", "handover:llm-sim")] * 5


def test_without_the_held_socket_the_same_drill_sees_refusals(mesh_factory):
    mesh = mesh_factory(services={"llm-sim": {"role": "llm_sim", "port": 6190, "socket": "none"}})
    mesh.up()
    code, drill = handover(mesh, "llm-sim", 3)
    assert code == 1 and drill["summary"]["refused"] > 0, drill["summary"]
    assert not any(c["ok"] for c in drill["checks"] if c["check"].startswith("no request refused"))


PROGRAMS = {
    # gunicorn reads LISTEN_FDS/LISTEN_PID itself: no --bind.
    "gunicorn": [sys.executable, "-m", "gunicorn", "--workers", "2", "--chdir", str(APPS),
                 "--no-control-socket", "hello_wsgi:app"],
    # uvicorn is told where the socket is.
    "uvicorn": [sys.executable, "-m", "uvicorn", "--fd", "3", "--app-dir", str(APPS), "hello_asgi:app"],
}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_a_program_that_takes_the_socket_refuses_nobody_and_stop_closes_it(mesh_factory, program):
    services = {"app": {"command": PROGRAMS[program], "port": 6165, "socket": "inherit",
                        "readiness": {"url": "http://127.0.0.1:{port}/"}}}
    mesh = mesh_factory(services=services)
    mesh.up()
    port = mesh.port("app")
    code, drill = handover(mesh, "app", 3, path="/")
    assert code == 0 and drill["summary"]["refused"] == 0, drill
    assert mesh.tron("stop", "app").returncode == 0
    assert not listening_inodes(port)  # a stopped service's port is closed, not held
    assert mesh.tron("start", "app").returncode == 0
    mesh.wait_state("app", "running")
    mesh.down()
    assert not listening_inodes(port) and not listening_inodes(mesh.port("daemon"))


def test_a_new_daemon_takes_the_sockets_back_from_what_it_adopts(mesh_factory):
    mesh = mesh_factory(services={"llm-sim": {"role": "llm_sim", "port": 6190}})
    mesh.up()
    daemon_pid = json.loads((mesh.home / "run" / "daemon.json").read_text())["pid"]
    os.kill(daemon_pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(daemon_pid) or psutil.Process(daemon_pid).status() == "zombie", 10,
             "the daemon to die")
    mesh.up()
    [adopted] = wait_for(lambda: mesh.rows("SELECT payload FROM events WHERE kind = 'adopted'"), 30, "the adopted event")
    assert json.loads(adopted["payload"])["socket"] == "recovered"
    code, drill = handover(mesh, "llm-sim", 2)
    assert code == 0 and drill["summary"]["refused"] == 0, drill
