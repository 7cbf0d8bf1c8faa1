"""Ending every process of a home's mesh from the CLI (`tron down`), found by their
environment (tron.common.processes.home_processes), not by what the registry says.

The registry still says which of them is which service (its open sessions: pid, start time,
incarnation), so a mesh whose daemon was killed is stopped as the daemon stops it: each
service's tree with its own ``stop_signal`` and ``stop_grace``, all of them at once; then
Tron's own helpers (fork server, standbys, gates); the log pump last, once every writer is
gone, so what the services wrote while they stopped reaches their logs.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tron.common.processes import kill_tree, signal_group

LOG_PUMP = "tron.services.daemon.logpump"
PUMP_DRAIN = 5.0  # s the pump gets to write what is left in its pipes (the daemon gives it as much)


@dataclass(frozen=True)
class StopRule:
    """How one service is stopped: its ``stop_signal``, then SIGKILL after ``grace``."""

    signal: int
    grace: float


@dataclass
class _Tree:
    """The live processes of one service's incarnation, and its main process when known."""

    name: str
    main: int | None
    procs: list[psutil.Process] = field(default_factory=list)


def _cgroup_leaves(pid: int) -> set[str]:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return set()
    return {line.rsplit("/", 1)[-1] for line in lines}


def _is_pump(p: psutil.Process) -> bool:
    try:
        return LOG_PUMP in p.cmdline()
    except psutil.Error:
        return False


def sort_out(procs: list[psutil.Process], sessions: list[dict]) -> tuple[list[_Tree], list[psutil.Process],
                                                                          list[psutil.Process]]:
    """Each process to its service's tree (by the open sessions: the main pid and start time,
    its process group, the incarnation in its environment or its cgroup's name), else to
    Tron's helpers; the log pump apart. Returns (trees, helpers, pumps)."""
    by_incarnation: dict[str, _Tree] = {}
    by_group: dict[int, _Tree] = {}
    for row in sessions:
        pid, born = row.get("pid"), row.get("pid_create_time")
        tree = _Tree(row["agent"], None)
        if pid:
            try:
                if born is None or abs(psutil.Process(pid).create_time() - born) < 0.01:
                    tree.main = pid  # not a recycled pid
                    by_group[pid] = tree  # a service leads its own session and group
            except psutil.Error:
                pass
        by_incarnation[row["incarnation"]] = tree
    trees: dict[int, _Tree] = {}
    helpers, pumps = [], []
    for p in procs:
        if _is_pump(p):
            pumps.append(p)
            continue
        tree = by_group.get(p.pid)
        if tree is None:
            try:
                tree = by_group.get(os.getpgid(p.pid))
            except OSError:
                pass
        if tree is None:
            try:
                tree = by_incarnation.get(p.environ().get("TRON_INCARNATION") or "")
            except psutil.Error:
                pass
        if tree is None:  # one that rewrote its environment (redis --daemonize): its cgroup says
            tree = next((by_incarnation[leaf.split(".", 1)[1]] for leaf in _cgroup_leaves(p.pid)
                         if "." in leaf and leaf.split(".", 1)[1] in by_incarnation), None)
        if tree is None:
            helpers.append(p)
            continue
        tree.procs.append(p)
        trees[id(tree)] = tree
    return list(trees.values()), helpers, pumps


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Until each of ``procs`` is gone or a zombie (not ours to reap: a subreaper or init
    will), at most ``timeout``; returns those still running."""
    deadline = time.monotonic() + timeout
    while (procs := [p for p in procs if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return procs


def _send(tree: _Tree, sig: int) -> None:
    """``sig`` and SIGCONT as the daemon's stop sends them: to the main process's group, and
    to the main process itself when it leads none (daemonized); with the main process gone
    (an nginx master that died first), to each group of what is left of the tree."""
    if tree.main is not None and any(p.pid == tree.main for p in tree.procs):
        for each in (sig, signal.SIGCONT):
            signal_group(tree.main, each)
        try:
            if os.getpgid(tree.main) != tree.main:
                for each in (sig, signal.SIGCONT):
                    os.kill(tree.main, each)
        except OSError:
            pass
        return
    tree.main = None  # nothing to wait for but the whole tree
    groups = set()
    for p in tree.procs:
        try:
            groups.add(os.getpgid(p.pid))
        except OSError:
            continue
    for group in groups:
        for each in (sig, signal.SIGCONT):
            signal_group(group, each)


def stop_trees(trees: list[_Tree], rules: dict[str, StopRule], default: StopRule) -> list[psutil.Process]:
    """Every tree at once, each with its own rule: its signal now, SIGKILL to what is left of
    it once its main process has exited or at its own deadline, whichever comes first (as
    the daemon's stop). Returns what survived even that."""
    began = time.monotonic()
    deadlines = {}
    for tree in trees:
        rule = rules.get(tree.name, default)
        _send(tree, rule.signal)
        deadlines[id(tree)] = began + rule.grace
    waiting = list(trees)
    while waiting:
        now = time.monotonic()
        for tree in list(waiting):
            tree.procs = [p for p in tree.procs if _alive(p)]
            main_gone = tree.main is not None and all(p.pid != tree.main for p in tree.procs)
            if not tree.procs:
                waiting.remove(tree)
            elif main_gone or now >= deadlines[id(tree)]:
                kill_tree(tree.procs)  # what its main process left behind, or past its grace
                waiting.remove(tree)
        if waiting:
            time.sleep(0.05)
    return _wait_gone([p for tree in trees for p in tree.procs], 5)


def _end(procs: list[psutil.Process], grace: float) -> list[psutil.Process]:
    """SIGTERM (and SIGCONT) each process's group, SIGKILL what is left after ``grace``;
    return what survived even that."""
    for p in procs:
        try:
            group = os.getpgid(p.pid)
        except OSError:
            continue
        for sig in (signal.SIGTERM, signal.SIGCONT):
            signal_group(group, sig)
    alive = _wait_gone(procs, grace)
    kill_tree(alive)
    return _wait_gone(alive, 5)


def _end_pump(pumps: list[psutil.Process], sock: Path | None) -> list[psutil.Process]:
    """The log pump drains what its pipes still hold and exits (its "exit" request, as the
    daemon stops it); one that does not answer gets SIGTERM, then SIGKILL."""
    if not pumps:
        return []
    if sock is not None:
        from tron.services.daemon import unixline

        try:
            unixline.ask(str(sock), {"op": "exit"}, timeout=2.0)
        except (OSError, ValueError):
            pass
        pumps = _wait_gone(pumps, PUMP_DRAIN)
    return _end(pumps, PUMP_DRAIN) if pumps else []


def end_all(procs: list[psutil.Process], grace: float, *, sessions: list[dict] | None = None,
            rules: dict[str, StopRule] | None = None, pump_socket: Path | None = None) -> list[psutil.Process]:
    """Stop ``procs`` as the daemon stops a mesh: each service's processes (``sessions``: the
    registry's open sessions) with its own rule (``rules``; SIGTERM and ``grace`` for one not
    named), all at once; then the rest (SIGTERM, SIGKILL after ``grace``); then the log pump
    (asked on ``pump_socket`` to drain and exit). Returns what survived even SIGKILL."""
    trees, helpers, pumps = sort_out(procs, sessions or [])
    default = StopRule(signal.SIGTERM, grace)
    survivors = stop_trees(trees, rules or {}, default)
    survivors += _end(helpers, grace) if helpers else []
    survivors += _end_pump(pumps, pump_socket)
    return survivors


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
