"""reap_strays reaps the untracked zombies among the daemon's children, and only those;
own_children finds them without scanning every process on the machine."""

from __future__ import annotations

import subprocess
import time

import psutil

from tron.services.daemon.spawner import own_children, reap_strays


def _zombie(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)


def test_only_untracked_zombies_are_reaped_and_live_children_are_left():
    live = subprocess.Popen(["sleep", "30"])
    stray = subprocess.Popen(["true"])
    tracked = subprocess.Popen(["true"])
    try:
        assert {live.pid, stray.pid, tracked.pid} <= set(own_children())
        assert set(own_children()) == {p.pid for p in psutil.Process().children()}
        _zombie(stray)
        _zombie(tracked)
        reaped = reap_strays({tracked.pid})
        assert stray.pid in reaped and tracked.pid not in reaped and live.pid not in reaped
        assert stray.pid not in own_children()  # gone for good
        assert psutil.Process(tracked.pid).status() == psutil.STATUS_ZOMBIE  # its owner reaps it, with its status
        assert live.poll() is None
    finally:
        live.kill()
        for p in (live, tracked):
            p.wait()
        stray.returncode = 0  # reaped above: Popen must not wait for it again
