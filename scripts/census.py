"""Which processes belong to a home's mesh: found by their environment, not by what the
registry says (a registry that could not be written, or a daemon killed between fork and
record, must not hide a process).

The daemon runs with ``TRON_MESH=<home>`` in its environment and every process it starts
inherits it (the fork server too, and so every agent it forks). The operator's own shell,
`make` and `tron` commands may carry ``TRON_HOME`` but never ``TRON_MESH``: they are not
part of the mesh and are never counted, or ended.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

from services.daemon.spawner import kill_tree, signal_group


def _ourselves() -> set[int]:
    me = psutil.Process()
    return {me.pid} | {p.pid for p in me.parents()}


MARK = "TRON_MESH"


def home_processes(home: str) -> list[psutil.Process]:
    """Every live process of ``home``'s mesh (its daemon and everything it started)."""
    skip = _ourselves()
    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid in skip:
            continue
        try:
            if p.environ().get(MARK) == home and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid}:{' '.join(' '.join(p.cmdline()).split())[:80]}")
        except psutil.Error:
            out.append(f"{p.pid}:?")
    return out


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
