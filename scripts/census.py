"""Ending every process of a home's mesh from the CLI (`tron down`), found by their
environment (tron.common.processes.home_processes), not by what the registry says."""

from __future__ import annotations

import os
import signal
import time

import psutil

from tron.common.processes import kill_tree, signal_group


def end_all(procs: list[psutil.Process], grace: float) -> list[psutil.Process]:
    """SIGTERM (and SIGCONT) each process's group, SIGKILL what is left after ``grace``;
    return what survived even that."""
    for p in procs:
        try:
            group = os.getpgid(p.pid)
        except OSError:
            continue
        for sig in (signal.SIGTERM, signal.SIGCONT):
            signal_group(group, sig)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    kill_tree(alive)
    _, alive = psutil.wait_procs(alive, timeout=5)
    return alive


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            return True
        time.sleep(0.05)
    return False
