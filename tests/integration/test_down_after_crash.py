"""`tron down` after the daemon was killed (kill -9) stops the services it left running as
the daemon would have: each with its own stop_signal and stop_grace, all before the log pump,
which goes last and keeps what they wrote while they stopped. With a mesh file that does not
parse it still stops everything, with the policy's defaults, and says so."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.integration

# Says which signal it got (in its log and in a file of its own), cleans up for CLEANUP
# seconds, says so, and exits.
CLEANUP = 3.0
PROGRAM = (
    "import signal, sys, time\n"
    "def stop(sig, frame):\n"
    "    name = signal.Signals(sig).name\n"
    "    open('signal.txt', 'w').write(name)\n"
    "    print('shutting down on', name, flush=True)\n"
    f"    time.sleep({CLEANUP})\n"
    "    print('shutdown complete', flush=True)\n"
    "    sys.exit(0)\n"
    "for s in (signal.SIGTERM, signal.SIGINT):\n"
    "    signal.signal(s, stop)\n"
    "print('serving', flush=True)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)


def kill_daemon(mesh) -> None:
    pid = json.loads((mesh.home / "run" / "daemon.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", 10, "the daemon to die")


def services(**stop) -> dict:
    return {"cleaner": {"command": ["{python}", "-c", PROGRAM], "port": 6154, "cwd": "{state}", **stop}}


def test_down_after_a_killed_daemon_uses_each_service_s_stop_signal_and_grace(mesh_factory):
    # The policy's grace (1 s) is shorter than the clean-up: only the service's own 12 s lets it finish.
    m = mesh_factory(services=services(stop_signal="SIGINT", stop_grace=12.0), policy={"stop_grace": 1.0})
    m.up()
    log = m.home / "logs" / "cleaner.log"
    wait_for(lambda: log.exists() and "serving" in log.read_text(), 20, "the program to serve")
    kill_daemon(m)
    began = time.monotonic()
    proc = m.down()
    took = time.monotonic() - began
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (m.home / "services" / "cleaner" / "signal.txt").read_text() == "SIGINT"
    text = log.read_text()
    # Its shutdown lines reached its log: the pump outlived it and wrote them.
    assert "shutting down on SIGINT" in text and "shutdown complete" in text, text
    assert took >= CLEANUP - 0.5, f"down returned after {took:.1f}s, before the program could clean up"
    assert m.processes() == []


def test_down_after_a_killed_daemon_with_a_broken_mesh_file_falls_back_to_the_defaults(mesh_factory):
    m = mesh_factory(services=services(stop_signal="SIGINT", stop_grace=12.0), policy={"stop_grace": 1.0})
    m.up()
    log = m.home / "logs" / "cleaner.log"
    wait_for(lambda: log.exists() and "serving" in log.read_text(), 20, "the program to serve")
    kill_daemon(m)
    m.config.write_text(m.config.read_text() + "\n[policy\n")  # no longer parses
    proc = m.down()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "policy's defaults" in proc.stderr, proc.stderr
    assert (m.home / "services" / "cleaner" / "signal.txt").read_text() == "SIGTERM"
    assert m.processes() == []
