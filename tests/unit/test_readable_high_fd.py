"""A pidfd numbered past select()'s limit (1024): a daemon holding many connections hands
such numbers out, and a standby's liveness check with select() raised ValueError, so the
restart that asked it failed and its service stayed failed (found under a connection flood)."""

from __future__ import annotations

import fcntl
import os
import resource
import select
import subprocess

import pytest

from tron.common.processes import readable

HIGH = 1500


@pytest.fixture
def high_pidfd():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= HIGH:
        pytest.skip(f"descriptors limited to {hard} here")
    if soft != resource.RLIM_INFINITY and soft <= HIGH:
        resource.setrlimit(resource.RLIMIT_NOFILE, (HIGH + 64, hard))
    child = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(child.pid)
    high = fcntl.fcntl(pidfd, fcntl.F_DUPFD_CLOEXEC, HIGH)
    os.close(pidfd)
    try:
        yield child, high
    finally:
        os.close(high)
        child.kill()
        child.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_pidfd_past_1024_says_when_its_process_ends(high_pidfd):
    child, fd = high_pidfd
    assert fd >= 1024
    with pytest.raises(ValueError):  # what the daemon used: it cannot even ask
        select.select([fd], [], [], 0)
    assert readable(fd) is False  # alive
    child.kill()
    assert readable(fd, timeout=10) is True  # exited


def test_a_standby_whose_pidfd_is_past_1024_is_alive_until_it_exits(high_pidfd):
    import socket

    from tron.services.daemon.cgroups import Limits
    from tron.services.daemon.spawner import Gate

    child, fd = high_pidfd
    a, b = socket.socketpair()
    try:
        gate = Gate("programmer-1", "i-1", None, Limits(), None, a, pid=child.pid, pidfd=fd)  # type: ignore[arg-type]
        assert gate.standby and gate.alive()  # raised ValueError before: the restart asking it failed
        child.kill()
        child.wait()
        assert not gate.alive()
    finally:
        a.close()
        b.close()


def test_a_closed_descriptor_is_an_error_not_an_answer():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        readable(r)
