"""Process identity, trees and the census of a home: the one implementation of each, for
the local spawner and the CLI alike (the CLI imports nothing from services/daemon/ for it).

A process is the one we knew when its pid *and* its start time match (a recycled pid is
somebody else). A service's tree is its descendants, its process group and whatever
carries its incarnation in its environment. A home's processes carry its ``TRON_MESH`` mark.
"""

from __future__ import annotations

import errno
import os
import pwd
import select
import signal
from pathlib import Path

import psutil


def readable(fd: int, timeout: float = 0.0) -> bool:
    """Whether ``fd`` is readable (a pidfd: its process has exited) within ``timeout`` s.
    poll(), not select(): select() refuses any descriptor numbered 1024 or more, which a
    daemon holding many connections hands out (a standby's pidfd then made its restart fail)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    events = poller.poll(max(0, round(timeout * 1000)))
    if events and events[0][1] & select.POLLNVAL:
        raise OSError(errno.EBADF, f"descriptor {fd} is not open")
    return bool(events)


# -- process identity and trees (the one implementation of each) -------------------------


def same_process(pid: int | None, create_time: float | None) -> bool:
    """True if ``pid`` is alive, not a zombie, and (when given) started at ``create_time``:
    a recycled pid is somebody else."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.01
    except psutil.Error:
        return False


def status_of(pid: int) -> str | None:
    """psutil's word for what ``pid`` is doing now (``psutil.STATUS_STOPPED`` for a SIGSTOP, ...);
    None when it is gone."""
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return None


def create_time_of(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _incarnation_of(pid: int) -> str | None:
    try:
        return psutil.Process(pid).environ().get("TRON_INCARNATION")
    except psutil.Error:
        return None


def tree_of(pid: int, incarnation: str | None = None, *, everywhere: bool = False) -> list[psutil.Process]:
    """Every live process of one incarnation's tree: its descendants, its process group
    (the leader may be gone already: nginx and postgres masters leave workers behind), and
    what left the group but carries the incarnation in its environment. Such orphans come
    to the daemon (a child subreaper): only its own children are read for it, unless
    ``everywhere`` (a CLI with no daemon, a ghost hunt) reads every process."""
    me = os.getpid()
    found: set[int] = set()
    try:
        found.add(pid)
        found |= {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        pass
    for other in _pids():
        if other != me and other not in found:
            try:
                if os.getpgid(other) == pid:
                    found.add(other)
            except OSError:
                continue
    if incarnation:
        try:
            candidates = _pids() if everywhere else [c.pid for c in psutil.Process(me).children()]
        except psutil.Error:
            candidates = []
        for other in candidates:
            if other not in found and other != me and _incarnation_of(other) == incarnation:
                found.add(other)
                try:
                    found |= {p.pid for p in psutil.Process(other).children(recursive=True)}
                except psutil.Error:
                    pass
    alive = []
    for other in found:
        try:
            proc = psutil.Process(other)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            pass
    return alive


def kill_tree(procs: list[psutil.Process], pgid: int | None = None) -> None:
    if pgid:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def resident_bytes(pids: list[int]) -> int:
    """Resident bytes of these processes together (the gone ones count nothing)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return total


def holds_socket(pids: set[int], inodes: set[str]) -> bool | None:
    """Does one of ``pids`` hold one of the socket ``inodes``? None when it cannot be read."""
    wanted = {f"socket:[{i}]" for i in inodes}
    unreadable = False
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except PermissionError:
            unreadable = True
            continue
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return True
            except OSError:
                continue
    return None if unreadable else False


# -- every process of a home (the census) ------------------------------------------------------

# The daemon runs with TRON_MESH=<home> and every process it starts inherits it (the fork
# server too, and so every agent forked from it). The operator's own shell, `make` and
# `tron` commands never carry it: they are not part of the mesh.
MARK = "TRON_MESH"


def _ourselves() -> set[int]:
    me = psutil.Process()
    return {me.pid} | {p.pid for p in me.parents()}


def _cgroup_pids(home: str) -> set[int]:
    """Every process in the home's cgroups (the daemon notes where they are in
    run/cgroup): found even when it rewrote its environment (redis-server --daemonize)."""
    try:
        root = Path(Path(home, "run", "cgroup").read_text().strip())
    except OSError:
        return set()
    found: set[int] = set()
    for procs in root.glob("*/cgroup.procs"):
        try:
            found |= {int(x) for x in procs.read_text().split()}
        except (OSError, ValueError):
            continue
    return found


def home_processes(home: str) -> list[psutil.Process]:
    """Every live process of ``home``'s mesh (its daemon and everything it started): by
    its mark, and by the home's cgroups."""
    skip = _ourselves()
    owned = _cgroup_pids(home)
    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid in skip:
            continue
        try:
            if (p.pid in owned or p.environ().get(MARK) == home) and p.status() != psutil.STATUS_ZOMBIE:
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


def user_name(uid: int) -> str | None:
    """The name the system gives ``uid`` (/etc/passwd, NSS); None when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def user_label(uid: int) -> str:
    """How the audit trail names a Unix user: ``name (uid N)``; ``? (uid N)`` for a uid with no name."""
    return f"{user_name(uid) or '?'} (uid {uid})"
