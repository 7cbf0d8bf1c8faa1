"""What `tron status` tells a user when the mesh is up but something of it is not right:
the daemon stalled (SIGSTOP, a blocked loop), or the operator's token file gone while the
mesh runs. Each is one line on stderr and exit 2 that says what is wrong, never "the mesh
is not running" (`tron up` then says a daemon runs) and never a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import FakeDaemon

from tron.common.paths import Home

TRON = str(Path(sys.executable).parent / "tron")


def tron(home: Home, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRON, "--home", str(home.root), *argv], capture_output=True, text=True, timeout=60)


@pytest.fixture
def home(tmp_path) -> Home:
    home = Home.resolve(tmp_path / "home")
    home.ensure()
    return home


@pytest.fixture
def stalled_pid():
    """A live process of ours, stopped as a SIGSTOPped daemon is."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    os.kill(proc.pid, signal.SIGSTOP)
    yield proc.pid
    os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.wait(timeout=10)


def test_a_stalled_daemon_is_said_to_be_stalled_not_down(home, stalled_pid):
    with socket.socket() as listener:  # the port takes connections (the kernel's backlog), nothing answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        home.token_file.write_text("test-token\n")
        home.daemon_file.write_text(json.dumps({"pid": stalled_pid, "port": listener.getsockname()[1]}))
        run = tron(home, "status")
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [run.stderr.strip()]  # one line
    assert "not running" not in run.stderr and "start it with" not in run.stderr
    assert f"pid {stalled_pid}" in run.stderr and "does not answer" in run.stderr and "stopped" in run.stderr


# What the real daemon's /status shows without a credential: up, names, states.
PUBLIC = {"daemon": {"up": True, "uptime": 1.0}, "services": [{"name": "root", "state": "running"}]}


@pytest.mark.parametrize("argv", [["status"], ["status", "--json"]])
def test_status_without_the_token_file_says_so_in_one_line(home, argv):
    fake = FakeDaemon(home, PUBLIC, token=False)
    try:
        assert not home.token_file.exists()  # removed while the mesh runs
        run = tron(home, *argv)
    finally:
        fake.close()
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and run.stderr.splitlines() == [run.stderr.strip()]
    assert str(home.token_file) in run.stderr and "public" in run.stderr


def test_up_on_a_home_it_cannot_prepare_says_so_in_one_line(tmp_path):
    home = Home(tmp_path / "home")
    home.root.mkdir()
    (home.root / "registry").write_text("a file where the registry's folder goes")  # as a read-only mount fails
    proc = tron(home, "up", "--detach")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot prepare home {home.root}" in proc.stderr and "Traceback" not in proc.stderr
