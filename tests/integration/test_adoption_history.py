"""A daemon started again after `kill -9` adopts its services with their history: the
restarts they had, their uptime from their own start (min_uptime's stability rule reads it),
and a crash-looping service's backoff, which goes on instead of ending at the adoption."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.integration


def kill_daemon(mesh) -> None:
    pid = json.loads((mesh.home / "run" / "daemon.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", 10, "the daemon to die")


def test_an_adopted_service_keeps_its_restarts_and_its_uptime(mesh_factory):
    services = {"sleeper": {"command": ["sleep", "600"], "port": 6155}}
    m = mesh_factory(services=services)
    m.up()
    for _ in range(2):
        old = m.kill("sleeper")
        m.wait_replaced("sleeper", old, listens=False)
    wait_for(lambda: m.service("sleeper")["restarts"] == 2, 10, "two restarts")
    started = time.monotonic()
    # uptime counted from the adoption would fall short of the check below by this wait and the
    # daemon's kill and start again: 1.5 s of it is well past its 0.1 s
    wait_for(lambda: (m.service("sleeper")["uptime"] or 0) >= 1.5, 20, "a second and a half of uptime")
    before = m.service("sleeper")
    kill_daemon(m)
    m.up()
    after = m.wait_state("sleeper", "running")
    assert after["pid"] == before["pid"], "not adopted"
    assert after["restarts"] == 2, after
    assert after["uptime"] >= time.monotonic() - started - 0.1, f"uptime counted from the adoption: {after}"


def test_a_crash_looping_service_keeps_waiting_out_its_backoff_after_adoption(mesh_factory):
    services = {"crasher": {"command": ["sh", "-c", "exit 3"], "port": 6156}}
    policy = {"backoff_initial": 6.0, "backoff_max": 6.0, "backoff_jitter": 0.0, "max_restarts": 2}
    m = mesh_factory(services=services, policy=policy)
    m.tron("up", "--detach")
    # The first restart is immediate, the next waits out the backoff (6 s).
    waiting = wait_for(lambda: (s := m.service("crasher"))["state"] == "backoff" and s["restarts"] >= 1 and s,
                       30, "the crasher to wait out its backoff")
    began = time.monotonic()
    kill_daemon(m)  # at once: its backoff must not be over before the daemon is gone
    sessions = len(m.rows("SELECT incarnation FROM sessions WHERE agent = 'crasher'"))  # no daemon: nothing pending
    assert time.monotonic() - began < 4.0, "too slow to test the backoff's end"
    m.tron("up", "--detach")
    # Not started at the adoption: the next session comes once the 6 s from the failure are over,
    # started by the restart that waited, which counts on from the restarts it had.
    wait_for(lambda: len(m.rows("SELECT incarnation FROM sessions WHERE agent = 'crasher'")) > sessions, 30,
             "the restart after the backoff")
    assert time.monotonic() - began >= 6.0 - 1.5, "restarted before its backoff was over"
    second = max(r["id"] for r in m.rows("SELECT id FROM events WHERE kind = 'daemon_started'"))
    spawns = m.rows("SELECT payload FROM events WHERE kind = 'spawned' AND agent = 'crasher' AND id > ?", (second,))
    assert [json.loads(r["payload"])["reason"] for r in spawns][:1] == ["backoff_resumed"], spawns
    after = m.service("crasher")
    assert after["restarts"] == waiting["restarts"] + 1 and after["crash_looping"], (waiting, after)
