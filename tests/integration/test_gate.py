"""Issue 22: a restart does not wait for the kernel to move a process into a new cgroup.
After a start, the spawner makes the next incarnation's cgroup and moves a gate
(services/daemon/gate.py) into it ahead of time; the next start (its incarnation id
reserved) only tells the gate what to exec. Ownership is unchanged: the program's first
instruction runs inside its own incarnation's cgroup, and a gate never outlives its
spawner, never runs anything unasked, and leaves no cgroup behind."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tron.services.daemon import gate as gate_program
from tron.services.daemon.cgroups import Limits
from tron.services.daemon.spawner import LocalSpawner, SpawnSpec

pytestmark = pytest.mark.integration

# Says where it runs (its cgroups, its environment), then forks a child into a session of its own.
PROGRAM = [sys.executable, "-c", "import os, subprocess, sys, time\n"
           "print('cgroups:', open('/proc/self/cgroup').read().replace(chr(10), ' '), flush=True)\n"
           "print('mark:', os.environ.get('GATE_TEST'), 'cwd:', os.getcwd(), flush=True)\n"
           "subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
           "time.sleep(300)\n"]


async def until(what, timeout: float = 30.0):
    """What ``what()`` returns once it is truthy (polled against a deadline)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := what()):
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return value


@pytest.fixture
async def spawner(tmp_path):
    exits = []
    sp = LocalSpawner(cgroup_home=tmp_path / "home")
    await sp.start(exits.append)
    if sp.cgroups is None:
        await sp.close()
        pytest.skip(f"LOUD SKIP: no cgroups here: {sp.ownership_note}")
    yield sp
    await sp.close()


def spec(tmp_path: Path, incarnation: str, limits: Limits | None = None) -> SpawnSpec:
    return SpawnSpec(name="svc", incarnation=incarnation, argv=PROGRAM,
                     env={**os.environ, "GATE_TEST": incarnation}, cwd=tmp_path, log=tmp_path / "svc.log",
                     limits=limits)


def gates_of(parent: int) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(parent).children():
        try:
            if gate_program.__file__ in p.cmdline():
                found.append(p)
        except psutil.Error:
            pass
    return found


async def test_the_next_start_opens_a_gate_already_in_its_own_cgroup(spawner, tmp_path):
    first = await spawner.spawn(spec(tmp_path, "i-first"))
    reserved = await until(lambda: spawner.reserve("svc"))
    assert reserved != "i-first"
    gate_pid = await until(lambda: [p.pid for p in gates_of(os.getpid())])
    assert spawner.ownership()["gates"] == gate_pid  # what a census accounts for (tron drill)
    await spawner.kill(first)
    assert not first.cgroup.owner.exists()  # the old incarnation's cgroup is gone with it

    second = await spawner.spawn(spec(tmp_path, reserved))
    assert second.pid in gate_pid  # the gate exec'd the program in place
    assert second.pid not in spawner.ownership()["gates"]  # the incarnation's main process now
    assert second.cgroup.owner.name == f"svc.{reserved}"
    log = tmp_path / "svc.log"
    await until(lambda: f"mark: {reserved}" in log.read_text())
    text = log.read_text()
    assert f"/svc.{reserved} " in text and f"cwd: {tmp_path}" in text  # in its own cgroup, from its first line
    pids = await until(lambda: len(p := second.cgroup.pids()) >= 2 and p)  # its detached child is owned too
    assert second.pid in pids
    await spawner.kill(second)
    assert not second.cgroup.owner.exists()
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)


async def test_a_gate_that_does_not_fit_is_ended_and_the_start_goes_on(spawner, tmp_path):
    first = await spawner.spawn(spec(tmp_path, "i-first"))
    reserved = await until(lambda: spawner.reserve("svc"))
    gate = await until(lambda: gates_of(os.getpid()))
    await spawner.kill(first)
    # Its limits changed meanwhile (a reload): the gate's cgroup has the old ones.
    second = await spawner.spawn(spec(tmp_path, reserved, Limits(pids_max=64)))
    assert second.pid not in [g.pid for g in gate]
    assert not any(g.is_running() for g in gate)  # ended and reaped
    await until(lambda: second.pid in second.cgroup.pids())  # joined by sh, the way without a gate
    await spawner.kill(second)


async def test_an_unused_reservation_and_close_leave_no_gate_and_no_cgroup(spawner, tmp_path):
    first = await spawner.spawn(spec(tmp_path, "i-first"))
    reserved = await until(lambda: spawner.reserve("svc"))
    assert reserved
    # A start that never came to spawn: the next reservation ends its gate.
    assert spawner.reserve("svc") is None
    await until(lambda: not (spawner.cgroups.root / f"svc.{reserved}").exists())
    await spawner.kill(first)
    second = await spawner.spawn(spec(tmp_path, "i-second"))
    await until(lambda: gates_of(os.getpid()))  # the gate of the start after it
    await spawner.kill(second)
    root = spawner.cgroups.root
    await spawner.close()
    assert gates_of(os.getpid()) == []  # ended and reaped
    assert not root.exists() or not [d for d in root.iterdir() if d.is_dir()]


def test_a_gate_runs_nothing_when_its_daemon_goes_away(tmp_path):
    ours, theirs = socket.socketpair()
    gate = subprocess.Popen([sys.executable, "-I", "-S", gate_program.__file__], stdin=theirs.fileno(), env={})
    theirs.close()
    ours.close()  # as when the daemon is killed
    assert gate.wait(timeout=30) == 0  # and exec'd nothing: its exit is its own
