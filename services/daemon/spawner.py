"""Spawners: how an incarnation becomes a process, and how its whole tree ends.

``Spawner`` is the interface the daemon sees. ``LocalSpawner`` makes real processes on
this machine; ``tron.services.daemon.stub_spawner.StubSpawner`` makes pretend ones for unit
tests; the same contract suite (tests/unit/test_spawner_contract.py) runs on both.

Local facts stay here: pids, process groups, the fork server, the subreaper.

- Each child runs in its own session (its own process group), with stdout and stderr
  the write end of a pipe held by the log pump (logpump.py: its own process, which
  outlives a killed daemon, writes and rotates the log); appended to its log file
  directly when there is no pump.
- Exits are noticed through a pidfd registered with the event loop, for our own children
  and for processes adopted from an earlier daemon alike: no thread, no polling.
- A service owns its process **tree**: its process group, every descendant, and every
  process that carries its incarnation in its environment (the daemon is a child
  subreaper, so orphans of the tree come to it rather than to init). Stopping is
  SIGTERM + SIGCONT to the group, SIGKILL to the whole tree after the grace period; a
  kill is SIGKILL to the whole tree at once. Either returns only when every process of
  the tree is gone, so the next incarnation never meets a leftover on its port.
- With cgroups, a plain program's next incarnation is prepared ahead (``Gate``): its cgroup
  made and a gate process (gate.py) moved in, so a restart does not wait for the kernel's
  move; the supervisor takes its id with ``reserve`` and ``spawn`` opens the gate.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import psutil

from tron.common.paths import Home, mesh_marks
from tron.services.daemon.forkserver import CANNOT_RUN, SOCKET_PATH_MAX, server_sdks
from tron.services.daemon import gate as gate_program
from tron.services.daemon import unixline
from tron.services.daemon.cgroups import Cgroup, CgroupTree, Limits
from tron.services.daemon.cgroups import detect as detect_cgroups
from tron.services.daemon.cgroups import join as join_cgroup
from tron.services.daemon.cgroups import wait_empty
from tron.services.daemon.listeners import open_listener, recover_listener
from tron.services.daemon.logpump import LogPumpClient
from tron.services.daemon.sockdiag import listening_inodes

if TYPE_CHECKING:
    from tron.common.config import MeshConfig

log = logging.getLogger("tron.spawner")


class SpawnError(Exception):
    """The process could not be started. ``cause`` says why, for the ladder and for people:
    missing_binary, permission_denied, port_in_use (``holder``: the pid and name of the
    program listening there, when psutil can see it) or cannot_start (anything else)."""

    def __init__(self, message: str, *, cause: str = "cannot_start", holder: dict | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.holder = holder


def port_holder(port: int) -> dict | None:
    """{"pid", "name"} of the process listening on ``port`` (TCP), or None when nobody
    listens or the listener's owner cannot be seen; {"pid": None, ...} when only the
    socket can be seen (another user's process, without the right to look)."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
            if c.pid is None:
                return {"pid": None, "name": None}
            try:
                return {"pid": c.pid, "name": psutil.Process(c.pid).name()}
            except psutil.Error:  # gone meanwhile, or not ours to look at
                return {"pid": c.pid, "name": None}
    return None


def describe_holder(holder: dict | None) -> str:
    """' by pid N (name)', as much of it as is known."""
    if not holder or holder.get("pid") is None:
        return ""
    return f" by pid {holder['pid']}" + (f" ({holder['name']})" if holder.get("name") else "")


@dataclass(frozen=True)
class SpawnSpec:
    name: str
    incarnation: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    module: str | None = None  # an agent module the fork server can run instead of argv
    user: str | None = None  # drop privileges to this user before exec
    listen_fd: int | None = None  # the held listening socket, handed over as fd 3 (systemd's convention)
    port: int | None = None  # the port it will listen on itself (none when the daemon holds it: listen_fd)
    log_limits: dict | None = None  # max_bytes, backups, rate_limit: the log pump writes its log
    limits: Limits | None = None  # memory_max, cpu_max, pids_max: written in its cgroup
    open_files: int | None = None  # RLIMIT_NOFILE
    daemonize: bool = False  # it forks into the background: the main process is found after
    pidfile: Path | None = None  # ... in this file, else in its cgroup
    start_timeout: float = 30.0  # how long a daemonizing launcher may take to leave
    standby: bool | None = None  # its next incarnation forked ahead: None follows the spawner's (the mesh's)


@dataclass
class Child:
    name: str
    incarnation: str
    pid: int
    create_time: float
    mode: str = "plain"  # plain | fork | adopted
    popen: subprocess.Popen | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    expected_exit: bool = False  # set before we stop or kill it ourselves
    node: str | None = None  # the Ray node it runs on (ray_spawner.py); None: this machine
    lost: bool = False  # it ended with its node (the node agent died), not by itself
    cgroup: Cgroup | None = None  # its incarnation's cgroup (cgroups.py); None: owned by marks
    port: int | None = None  # its port: in the marks fallback, a stray listening there is its
    oom_killed: bool = False  # the kernel's OOM count of its cgroup rose (read when it exited)
    # Its beat channel (beat_channel.py): a standby's kept connection, or our end of the socket
    # pair a spawn sent; whoever starts the child reads it, then closes it.
    channel: socket.socket | None = None
    channel_head: bytes = b""  # what it sent there already, read with the hand-over's answer
    _pidfd: int | None = None

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def exit_detail(self) -> dict:
        return {"exit_code": self.exit_code, "signal": self.exit_signal}

    def pids(self) -> list[int]:
        """Every process it owns now: its cgroup's, else its tree by group and mark."""
        if self.cgroup is not None:
            return self.cgroup.pids()
        return [p.pid for p in tree_of(self.pid, self.incarnation)]


ExitCallback = Callable[[Child], None]


class _StandbyRefused(Exception):
    """A standby did not take its spawn (gone, or its code is stale): the start forks instead."""


@dataclass
class Gate:
    """A process in the cgroup of a service's next incarnation, made and joined ahead of
    time: a restart opens it instead of paying the kernel's grace period for a move into a
    new cgroup (cgroups.join). For a program, gate.py, which execs it; for an agent the fork
    server serves, a standby forked from the server (forkserver.py), which becomes the agent:
    the restart then skips the fork server's two forks as well."""

    name: str
    incarnation: str
    group: Cgroup
    limits: Limits
    popen: subprocess.Popen | None  # gate.py's; None for a standby, which is not our child until its fork's parent exits
    conn: socket.socket  # the daemon's end: one line opens the gate; closing it ends the gate
    pid: int = 0
    pidfd: int | None = None  # a standby's: readable once it has exited
    config: str = ""  # a standby's: the mesh file it reads ahead
    cold: bool = False  # a standby forked before the fork server had the LLM SDKs
    # The write end of a log pump pipe attached ahead for the next incarnation's log, the log
    # and limits it was attached for, and to which pump (its pid): the start then skips the
    # round trip to the pump (a crash wave's starts queued in it).
    log_pipe: int | None = None
    logfile: tuple[Path, dict] | None = None
    log_pump: int | None = None

    def __post_init__(self) -> None:
        if self.popen is not None:
            self.pid = self.popen.pid

    @property
    def standby(self) -> bool:
        return self.popen is None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return self.pidfd is not None and not readable(self.pidfd)

    def usable(self, spec: SpawnSpec) -> bool:
        return spec.incarnation == self.incarnation and (spec.limits or Limits()) == self.limits and self.alive()


GATE_AFTER = 0.5  # s after a start before its successor's gate is made: the new program starts first


class Spawner(Protocol):
    """Everything the daemon asks of the machinery that makes its processes. Whatever a
    backend cannot do has an honest answer here (no helpers, no log pump, cannot tell), so
    the daemon never probes for a capability."""

    async def start(self, on_exit: ExitCallback) -> None: ...  # exits are reported to ``on_exit``, on the loop

    async def close(self) -> None: ...

    async def wait_ready(self, timeout: float) -> bool: ...  # its fast path (the fork server) is up

    def bring_up_done(self) -> None: ...  # the mesh is up: what waited for that (the SDK warm-up) may begin

    async def spawn(self, spec: SpawnSpec) -> Child: ...

    def adopt(self, name: str, incarnation: str, pid: int, create_time: float) -> Child | None: ...

    def reserve(self, name: str) -> str | None: ...  # the incarnation id of a start prepared ahead

    def release(self, name: str) -> None: ...  # no next start is coming (stopped, removed): end what waits for it

    async def stop(self, child: Child, grace: float, sig: int = signal.SIGTERM) -> None: ...

    async def kill(self, child: Child) -> None: ...

    def leftovers(self, child: Child) -> list[int]: ...

    def ghosts(self, home_root: str, owners: set[int]) -> dict[int, str]: ...  # pid -> what it runs

    def resident(self, child: Child) -> int: ...  # resident bytes of its processes together

    def listen(self, port: int, backlog: int) -> socket.socket: ...  # raises ListenerError

    def recover_listener(self, pid: int, port: int) -> socket.socket | None: ...

    def is_listening(self, port: int) -> bool: ...  # somebody listens there (True: cannot tell from here)

    def port_holder(self, port: int) -> dict | None: ...  # who listens there, when it can be seen

    def listener_is_ours(self, child: Child, port: int) -> bool: ...  # the listener is in its tree

    def helper_pids(self) -> set[int]: ...  # its own processes (fork server, log pump, gates)

    async def sync_log(self, path: Path) -> None: ...  # what was written to ``path`` is in the file

    def log_stats(self) -> dict | None: ...  # the log pump's counters; None: no pump

    def log_pump_pid(self) -> int | None: ...

    def log_pump_health(self) -> dict | None: ...  # its state, deaths and restarts (no I/O); None: no pump

    def ownership(self) -> dict | None: ...  # {"mode": "cgroup", ...} or {"mode": "marks", "why"}

    def status(self) -> dict | None: ...


class ClusterControl(Protocol):
    """What a cluster engine adds (services/daemon/ray_spawner.py): the daemon is given one
    only on a cluster; its nodes, and a drill's loss of one."""

    def status(self) -> dict: ...

    def find_node(self, key: str) -> Any | None: ...  # one node by 4+ characters of its id, or its address

    async def lose(self, node: Any) -> dict: ...

    async def restore(self, node: Any) -> None: ...

    def node_placed(self, name: str) -> str | None: ...  # the node a service runs on, or ran on last

    async def read_log(self, node_id: str, daemon_path: str, cursor: dict) -> dict: ...  # a chunk, on its node

    async def signal_child(self, child: Child, sig: int) -> dict: ...  # through its node's agent

    async def processes(self, node_id: str, pid: int, incarnation: str) -> list[str]: ...  # a tree, on its node


# Process identity, trees and the census live in common/processes.py (the CLI uses them too).
from tron.common.processes import (MARK, create_time_of, describe, holds_socket, home_processes,  # noqa: E402,F401
                                   kill_tree, readable, resident_bytes, same_process, signal_group, status_of,
                                   tree_of)


# -- the local spawner -------------------------------------------------------------------------


def _before_exec(listen_fd: int | None, procs_files: list[str], open_files: int | None, identity: dict) -> None:
    """In the child, before exec: join its cgroup (as root, before dropping to ``user``),
    its open-files limit, the held socket as fd 3 (inheritable), then the user's identity."""
    if procs_files:
        join_cgroup(procs_files)
    if open_files:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    if listen_fd is not None:
        os.dup2(listen_fd, 3)
    if identity:
        os.setgroups(identity["extra_groups"])
        os.setgid(identity["group"])
        os.setuid(identity["user"])


CGROUP_JOIN_FAILED = 125  # sh's exit when it could not join the cgroup (its log says which file)


def _join_then_exec(procs_files: list[str]) -> str:
    """A sh script: write its own pid into each cgroup.procs, then exec "$0" "$@"."""
    import shlex

    joins = " && ".join(f"echo $$ > {shlex.quote(f)}" for f in procs_files)
    return (f'{{ {joins}; }} || {{ echo "tron: cannot join the cgroup ({" ".join(procs_files)})" >&2; '
            f'exit {CGROUP_JOIN_FAILED}; }}; exec "$0" "$@"')


def _identity(user: str | None) -> dict:
    """Popen's user, group and supplementary groups for ``user``: all three of theirs
    (``user=`` alone would keep the daemon's gid 0 and root's groups)."""
    if not user:
        return {}
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise SpawnError(f"no such user: {user}") from None
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(user, pw.pw_gid)}


def _check_runnable(command: str, env: dict[str, str], cwd) -> None:
    """What Popen would raise for a program it cannot run, said before a shell runs it."""
    path = command if os.sep in command else shutil.which(command, path=env.get("PATH", os.defpath))
    if path is None or not os.path.exists(os.path.join(str(cwd), path)):
        raise SpawnError(f"command not found: {command}", cause="missing_binary")
    if not os.access(os.path.join(str(cwd), path), os.X_OK):
        raise SpawnError(f"permission denied: {command}", cause="permission_denied")


def _check_port_free(port: int | None) -> None:
    """A port another program listens on would make the new incarnation die at its bind,
    again at every restart: said before spawning, naming the holder. The old incarnation's
    tree is gone by now (kill and stop return only then), so the holder is not ours."""
    if port is None or not listening_inodes(port):
        return
    holder = port_holder(port)
    raise SpawnError(f"port {port} is already in use{describe_holder(holder)}", cause="port_in_use", holder=holder)


def _unreported(child: Child) -> None:
    log.warning("%s pid %s exited before its spawner was started: nobody is told", child.name, child.pid)


class LocalSpawner:
    def __init__(self, *, forkserver: "ForkServerClient | None" = None, logs: "LogPumpClient | None" = None,
                 cgroup_home: Path | None = None, standbys: bool = True, beat_channels: bool = False) -> None:
        """``cgroup_home``: own each incarnation by a cgroup named after this home where the
        machine allows (None: by marks, the fallback). ``standbys``: an agent's next
        incarnation is forked ahead and waits (``[mesh] standbys``). ``beat_channels``: a
        agent gets a beat channel (Child.channel): only where
        the caller reads it (the daemon, not a node agent, whose agents beat to its relay)."""
        self.standbys = standbys
        self.beat_channels = beat_channels
        # Told of each next incarnation prepared ahead (its id and name), and of one that will
        # not start after all: its credential is written ahead, off the restart's path.
        self.on_next: Callable[[str, str], Awaitable[None]] | None = None
        self.on_unused: Callable[[str, str], None] | None = None
        self.on_exit: ExitCallback = _unreported  # start() names who hears of exits
        self.forkserver = forkserver
        if forkserver is not None:
            forkserver.on_warm = self._refresh_standbys
            forkserver.on_serving = self._remake_missing
        self.logs = logs
        self.subreaper = False
        self.cgroup_home = cgroup_home
        self.cgroups: CgroupTree | None = None
        self.ownership_note = "marks forced by [mesh] ownership" if cgroup_home is None else ""
        self._limits_warned: set[str] = set()
        self._gates: dict[str, Gate] = {}  # service -> its next incarnation's gate, ready
        self._claimed: dict[str, Gate] = {}  # service -> the gate whose id reserve() handed out
        self._preparing: dict[str, asyncio.Task] = {}
        self._live_gates: dict[int, Gate] = {}  # pid -> every gate process not yet reaped (for the census)
        self._released: set[str] = set()  # stopped or removed services: no gate is kept for them
        # Agents whose standby could not be forked (the fork server down, stalled, not ready):
        # made when a server serves again or turns warm (``_remake_missing``), not at their
        # next start only.
        self._missing: dict[str, tuple[Limits, str, tuple[Path, dict] | None]] = {}
        self._closing = asyncio.Event()

    def ownership(self) -> dict:
        """How its processes are owned: {"mode": "cgroup", "layout", "path", "limits"} or
        {"mode": "marks", "why"}."""
        if self.cgroups is not None:
            return {"mode": "cgroup", **self.cgroups.describe(), "gates": sorted(self._live_gates)}
        return {"mode": "marks", "why": self.ownership_note}

    async def start(self, on_exit: ExitCallback) -> None:
        self.on_exit = on_exit
        self.subreaper = become_subreaper()
        if self.cgroup_home is not None:
            self.cgroups, why = detect_cgroups(self.cgroup_home)
            if self.cgroups is None:
                self.ownership_note = why
                log.warning("ownership: marks (process group + environment mark + subreaper), not cgroups: %s; "
                            "memory_max, cpu_max and pids_max cannot be enforced", why)
            else:
                log.info("ownership: a cgroup per incarnation", extra=self.cgroups.describe())
        if self.logs is not None:
            await self.logs.start()
        if self.forkserver is not None:
            if not self.subreaper:
                log.warning("not a child subreaper: forked agents cannot be reaped here; the fork server is off")
                await self.forkserver.stop()  # launched early, beside the daemon's imports
                self.forkserver = None
            else:
                await self.forkserver.start()

    async def close(self) -> None:
        if self._closing.is_set():
            return  # closed already
        self._closing.set()
        await asyncio.gather(*self._preparing.values(), return_exceptions=True)
        gates = [*self._gates.values(), *self._claimed.values()]
        self._gates.clear()
        self._claimed.clear()
        await asyncio.gather(*(self._end_gate(g) for g in gates))
        if self.forkserver is not None:
            await self.forkserver.stop()
        if self.logs is not None:
            await self.logs.stop()
        if self.cgroups is not None:
            self.cgroups.remove()  # what is empty; a live incarnation's cgroup stays

    async def wait_ready(self, timeout: float) -> bool:
        return await self.forkserver.wait_ready(timeout=timeout) if self.forkserver is not None else True

    def bring_up_done(self) -> None:
        if self.forkserver is not None:
            self.forkserver.warm_up()

    def status(self) -> dict | None:
        fs = self.forkserver
        if fs is None:
            return None
        stalled = round(time.monotonic() - fs.stalled_since, 1) if fs.stalled_since is not None else None
        return {"pid": fs.pid, "ready": fs.ready, "stopped": fs.stopped(), "stalled_s": stalled, "warm": fs.warm,
                "generation": fs.generation, "spawned": fs.spawned,
                "heir": fs.heir.pid if fs.heir is not None else None, "socket": fs.sock_path,
                "huge_pages": fs.huge_pages}

    def helper_pids(self) -> set[int]:
        fs = self.forkserver
        helpers = {fs.pid} if fs is not None and fs.pid else set()
        helpers |= {fs.heir.pid} if fs is not None and fs.heir is not None else set()
        helpers |= set(self._live_gates)
        return helpers | (self.logs.pids() if self.logs is not None else set())

    async def sync_log(self, path: Path) -> None:
        """What was written to ``path`` so far is in the file (the pump writes it behind)."""
        if self.logs is not None:
            await asyncio.to_thread(self.logs.sync, path)

    def log_stats(self) -> dict | None:
        """The log pump's counters (bytes, rotations, dropped lines per log; disk_full)."""
        return self.logs.stats() if self.logs is not None else None

    def log_pump_pid(self) -> int | None:
        return self.logs.pid if self.logs is not None else None

    def log_pump_health(self) -> dict | None:
        return self.logs.health() if self.logs is not None else None

    # -- what only this machine can tell: its processes and its sockets ------------------------

    def ghosts(self, home_root: str, owners: set[int]) -> dict[int, str]:
        """Processes of this home (by mark and cgroup: common/processes.py) that neither
        ``owners`` (incarnations' main processes), their groups and descendants, nor this
        spawner's helpers and the daemon account for: pid -> what it runs."""
        ours = {os.getpid(), *self.helper_pids()}
        found = []
        for proc in home_processes(home_root):
            try:
                group = os.getpgid(proc.pid)
                if proc.pid in ours or proc.pid in owners or group in owners \
                        or any(p.pid in owners | ours for p in proc.parents()):
                    continue
            except (OSError, psutil.Error):  # gone meanwhile
                continue
            found.append(proc)
        return dict(zip((p.pid for p in found), describe(found)))

    def resident(self, child: Child) -> int:
        return resident_bytes(child.pids())

    def is_listening(self, port: int) -> bool:
        return bool(listening_inodes(port))  # sock_diag: a fifth of a refused HTTP try

    def port_holder(self, port: int) -> dict | None:
        return port_holder(port) if listening_inodes(port) else None

    def listener_is_ours(self, child: Child, port: int) -> bool:
        """The listener on ``port`` belongs to ``child``'s tree: an answer from a leftover of
        an old tree does not make the new incarnation healthy. Unreadable (another user's
        process): True, the probe's answer stands."""
        inodes = listening_inodes(port)
        if not inodes:
            return False
        tree = {p.pid for p in tree_of(child.pid, child.incarnation)} | {child.pid}
        held = holds_socket(tree, inodes)
        return True if held is None else held

    async def spawn(self, spec: SpawnSpec) -> Child:
        """Start one incarnation: forked from the fork server when it can serve an agent
        module, else a plain spawn. Raises SpawnError when it cannot start at all."""
        if spec.listen_fd is None:
            _check_port_free(spec.port)
        log_fd = None
        if self.logs is not None and spec.log_limits is not None:
            log_fd = self._log_pipe_ahead(spec)
            if log_fd is None:
                log_fd = await self.logs.pipe_for(spec.log, **spec.log_limits)
        try:
            child = await self._spawn(spec, log_fd)
        finally:
            if log_fd is not None:
                os.close(log_fd)  # the child has its copy: the pump sees EOF when the last writer is gone
        if self._gated(spec):
            self._prepare_soon(spec.name, spec.limits or Limits(), logfile=self._log_target(spec))
        elif self._standby_for(spec):
            self._prepare_soon(spec.name, spec.limits or Limits(), standby=spec.env.get("TRON_CONFIG", ""),
                               logfile=self._log_target(spec))
        return child

    def _log_target(self, spec: SpawnSpec) -> tuple[Path, dict] | None:
        return (spec.log, spec.log_limits) if self.logs is not None and spec.log_limits is not None else None

    def _log_pipe_ahead(self, spec: SpawnSpec) -> int | None:
        """The pipe attached with the claimed gate for this start, if it is for this log, with
        these limits, to the pump that runs now (a pump started again since holds none)."""
        gate = self._claimed.get(spec.name)
        if gate is None or gate.log_pipe is None or gate.incarnation != spec.incarnation:
            return None
        fd, gate.log_pipe = gate.log_pipe, None
        if gate.logfile == self._log_target(spec) and self.logs is not None and gate.log_pump == self.logs.pid:
            return fd
        os.close(fd)
        return None

    def _cgroup(self, spec: SpawnSpec) -> Cgroup | None:
        """The incarnation's new cgroup, its limits written; None when owned by marks."""
        limits = spec.limits or Limits()
        if self.cgroups is None:
            if limits and spec.name not in self._limits_warned:
                self._limits_warned.add(spec.name)
                log.warning("%s: memory_max/cpu_max/pids_max are not enforced: no cgroups here (%s)", spec.name,
                            self.ownership_note, extra={"offender": spec.name})
            return None
        try:
            return self.cgroups.make(spec.name, spec.incarnation, limits)
        except OSError as err:
            raise SpawnError(f"cannot make the cgroup of {spec.name} or set its limits: {err}") from None

    # -- gates: the next incarnation's cgroup made and joined ahead of time ----------------

    def _gated(self, spec: SpawnSpec) -> bool:
        """Whether its starts go through a gate: a plain spawn whose only step before exec
        is joining the cgroup (a held socket, open_files or a user need a preexec_fn)."""
        return (self.cgroups is not None and spec.listen_fd is None and not spec.open_files and not spec.user
                and not (spec.module and self.forkserver is not None))

    def _standby_for(self, spec: SpawnSpec) -> bool:
        """Whether its starts go through a standby: an agent the fork server serves (the
        standby takes the held socket and the limits when it is opened)."""
        wanted = self.standbys if spec.standby is None else spec.standby
        return (wanted and self.cgroups is not None and bool(spec.module) and self.forkserver is not None
                and not spec.user)

    def reserve(self, name: str) -> str | None:
        """The incarnation id of the gate ready for ``name``'s next start, or None (then
        the start joins its new cgroup itself). Handed out once: spawn() with that id
        opens the gate."""
        stale = self._claimed.pop(name, None)
        if stale is not None:  # handed out for a start that never came to spawn
            self._background_end(stale)
        gate = self._gates.pop(name, None)
        if gate is None:
            return None
        if not gate.alive():
            self._background_end(gate)
            return None
        self._claimed[name] = gate
        return gate.incarnation

    def release(self, name: str) -> None:
        """``name`` was stopped or removed: its gate or standby is ended (with its cgroup)
        rather than left waiting for a start that may never come."""
        self._released.add(name)  # one being prepared now is ended when it is ready
        self._missing.pop(name, None)
        for gate in (self._gates.pop(name, None), self._claimed.pop(name, None)):
            if gate is not None:
                self._background_end(gate)

    def _prepare_soon(self, name: str, limits: Limits, *, standby: str | None = None,
                      logfile: tuple[Path, dict] | None = None) -> None:
        """``standby``: a standby, not a gate (its mesh file, which it reads ahead). ``logfile``:
        the next incarnation's log and its limits, whose pump pipe is attached ahead too."""
        self._released.discard(name)  # it started again
        if name in self._gates or name in self._preparing or self._closing.is_set():
            return
        task = asyncio.ensure_future(self._prepare(name, limits, logfile) if standby is None
                                     else self._prepare_standby(name, limits, standby, logfile))
        self._preparing[name] = task
        task.add_done_callback(lambda _: self._preparing.pop(name, None))

    async def _prepare(self, name: str, limits: Limits, logfile: tuple[Path, dict] | None = None) -> None:
        """The gate of ``name``'s next incarnation: its cgroup made, limits written, a gate
        process started and moved in (the move's grace period is waited here, off the
        restart path, in a thread: not on the loop)."""
        made = await self._next_group(name, limits)
        if made is None:
            return
        incarnation, group = made
        ours, theirs = socket.socketpair()
        try:
            popen = subprocess.Popen([sys.executable, "-I", "-S", gate_program.__file__], stdin=theirs.fileno(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", env={},
                                     start_new_session=True, close_fds=True)
        except OSError as err:
            ours.close()
            group.remove()
            log.warning("no gate for %s: %s", name, err)
            return
        finally:
            theirs.close()
        gate = Gate(name, incarnation, group, limits, popen, ours)
        self._live_gates[popen.pid] = gate
        try:
            await asyncio.to_thread(join_cgroup, group.procs_files(), popen.pid)
        except OSError as err:
            log.warning("no gate for %s: cannot move it into %s: %s", name, group.owner, err)
            await self._end_gate(gate)
            return
        await self._keep(gate, logfile)

    async def _next_group(self, name: str, limits: Limits) -> tuple[str, Cgroup] | None:
        """After GATE_AFTER (the new program starts first): an incarnation id for ``name``'s
        next start and its cgroup, limits written; None when closing or it cannot be made."""
        try:
            await asyncio.wait_for(self._closing.wait(), GATE_AFTER)
            return None  # closing
        except asyncio.TimeoutError:
            pass
        incarnation = "i-" + uuid.uuid4().hex[:12]  # the supervisor's format (supervisor.new_id)
        try:
            group = self.cgroups.make(name, incarnation, limits)
        except OSError as err:
            log.debug("nothing prepared for %s's next start: %s", name, err)
            return None
        if self.on_next is not None:
            await self.on_next(name, incarnation)
        return incarnation, group

    async def _keep(self, gate: Gate, logfile: tuple[Path, dict] | None = None) -> None:
        """A gate or standby made ready: kept for its service's next start, unless that
        is not coming (closing, stopped or removed) or another is kept already. With its
        ``logfile``'s pump pipe attached now, off the restart's path."""
        if logfile is not None and self.logs is not None and gate.log_pipe is None:
            gate.log_pipe = await self.logs.pipe_for(logfile[0], **logfile[1])
            gate.logfile, gate.log_pump = logfile, self.logs.pid
        if self._closing.is_set() or gate.name in self._gates or gate.name in self._released:
            await self._end_gate(gate)
            return
        self._gates[gate.name] = gate

    async def _prepare_standby(self, name: str, limits: Limits, config: str,
                               logfile: tuple[Path, dict] | None = None) -> None:
        """The standby of ``name``'s next incarnation: its cgroup made, limits written, and a
        process forked by the fork server that joins it and waits (the move's grace period
        is paid by the standby, off the restart path). Made at once, from the server that
        serves: one forked before the server had its SDKs (``cold``) is made again when it
        has them (``_refresh_standbys``; here, when it turned warm during this fork), since
        its agent would import them at its first call."""
        while (gate := await self._fork_standby(name, limits, config)) is not None:
            if not (gate.cold and self.forkserver is not None and self.forkserver.warm):
                self._missing.pop(name, None)
                await self._keep(gate, logfile)
                return
            await self._end_gate(gate)
        if not self._closing.is_set() and name not in self._released:
            self._missing[name] = (limits, config, logfile)

    async def _fork_standby(self, name: str, limits: Limits, config: str) -> Gate | None:
        """A standby forked into the next incarnation's cgroup; None when none could be."""
        made = await self._next_group(name, limits)
        if made is None:
            return None
        incarnation, group = made
        if self.forkserver is None or not self.forkserver.ready:
            group.remove()
            return None  # the next start forks; its own start prepares the next standby
        cold = not self.forkserver.warm
        forked = await self.forkserver.standby(group.procs_files(), config, name)
        if forked is None:
            group.remove()
            return None
        pid, conn = forked
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone already
            conn.close()
            await asyncio.to_thread(wait_empty, group, 5.0)
            group.remove()
            return None
        gate = Gate(name, incarnation, group, limits, None, conn, pid=pid, pidfd=pidfd, config=config, cold=cold)
        self._live_gates[pid] = gate
        return gate

    def _refresh_standbys(self) -> None:
        """The fork server has its SDKs now: each standby forked before is ended and made
        again, from the warm server (one at a time: ``ForkServerClient.standby``'s own slot);
        and each agent left without one while no server could fork (``_missing``) gets one."""
        for name, gate in list(self._gates.items()):
            if gate.standby and gate.cold:
                del self._gates[name]
                self._background_end(gate)
                self._prepare_soon(name, gate.limits, standby=gate.config, logfile=gate.logfile)
        self._remake_missing()

    def _remake_missing(self) -> None:
        """A server serves (again): each agent left without a standby while none could fork
        gets one (from this server; one forked cold is made again when it is warm)."""
        for name, (limits, config, logfile) in list(self._missing.items()):
            if name not in self._released:
                self._prepare_soon(name, limits, standby=config, logfile=logfile)

    async def _open_standby(self, gate: Gate, spec: SpawnSpec, log_fd: int | None) -> Child:
        """The agent, become by the standby in place: its pid is the standby's."""
        fs = self.forkserver
        head = bytearray()
        why = "the fork server is off" if fs is None else \
            await fs.hand_over(gate.conn, spec.module or "", spec.env, spec.cwd, spec.log, spec.listen_fd, log_fd,
                               open_files=spec.open_files, channel=self.beat_channels, rest=head)
        if why is not None:
            raise _StandbyRefused(why)
        self._live_gates.pop(gate.pid, None)  # the agent now: the incarnation's main process
        if gate.pidfd is not None:
            os.close(gate.pidfd)
            gate.pidfd = None
        channel = gate.conn if self.beat_channels else None
        if channel is None:
            gate.conn.close()
        return Child(spec.name, spec.incarnation, gate.pid, create_time_of(gate.pid), mode="fork", channel=channel,
                     channel_head=bytes(head))

    def _open_gate(self, gate: Gate, spec: SpawnSpec, log_fd: int | None) -> Child:
        """The program, exec'd by the gate in place: its pid is the gate's, its first
        instruction already runs in the cgroup."""
        _check_runnable(spec.argv[0], spec.env, spec.cwd)  # the gate would only say so in the log
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        out = log_fd if log_fd is not None else os.open(spec.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        line = json.dumps({"argv": spec.argv, "env": spec.env, "cwd": str(spec.cwd)}).encode() + b"\n"
        try:
            sent = socket.send_fds(gate.conn, [line], [out])
            if sent < len(line):
                gate.conn.sendall(line[sent:])
        except OSError as err:
            raise SpawnError(f"cannot start {spec.argv[0]}: its gate is gone ({err})") from None
        finally:
            if out != log_fd:
                os.close(out)
        gate.conn.close()
        assert gate.popen is not None
        self._live_gates.pop(gate.pid, None)  # the program now: the incarnation's main process
        return Child(spec.name, spec.incarnation, gate.pid, create_time_of(gate.pid), popen=gate.popen)

    async def _end_gate(self, gate: Gate) -> None:
        """A gate that will not be opened: ended, reaped, its cgroup removed."""
        if self.on_unused is not None:
            self.on_unused(gate.name, gate.incarnation)
        gate.conn.close()  # an unjoined gate reads EOF and exits; the cgroup's kill ends a joined one
        if gate.log_pipe is not None:
            os.close(gate.log_pipe)  # the pump sees EOF on it and forgets it
            gate.log_pipe = None
        gate.group.kill()
        if gate.popen is not None:
            if gate.popen.poll() is None:
                gate.popen.kill()
            await asyncio.to_thread(gate.popen.wait)
        elif gate.pidfd is not None:
            try:
                signal.pidfd_send_signal(gate.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await asyncio.to_thread(readable, gate.pidfd, 5.0)
            os.close(gate.pidfd)
            gate.pidfd = None
            try:
                os.waitpid(gate.pid, os.WNOHANG)  # ours once its fork's parent is gone; else reap_strays
            except ChildProcessError:
                pass
        self._live_gates.pop(gate.pid, None)
        await asyncio.to_thread(wait_empty, gate.group, 5.0)
        gate.group.remove()

    def _background_end(self, gate: Gate) -> None:
        task = asyncio.ensure_future(self._end_gate(gate))
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                               or log.error("ending the gate of %s failed", gate.name, exc_info=t.exception()))

    async def _spawn(self, spec: SpawnSpec, log_fd: int | None) -> Child:
        gate = self._claimed.pop(spec.name, None)
        if gate is not None and not (gate.usable(spec) and (self._standby_for(spec) if gate.standby
                                                            else self._gated(spec))):
            await self._end_gate(gate)  # gone before its cgroup (the incarnation's name) is made afresh
            gate = None
        if gate is not None and gate.standby:
            try:
                child = await self._open_standby(gate, spec, log_fd)
            except _StandbyRefused as err:
                log.warning("the standby of %s could not start it (%s): forking it", spec.name, err,
                            extra={"offender": spec.name})
                await self._end_gate(gate)
                gate = None
            else:
                child.cgroup, child.port = gate.group, spec.port
                return self._track(child)
        group = gate.group if gate is not None else self._cgroup(spec)
        try:
            if gate is not None:
                child = self._open_gate(gate, spec, log_fd)
            else:
                child = await self._start_process(spec, log_fd, group)
        except BaseException:
            if gate is not None:
                await self._end_gate(gate)
            elif group is not None:
                group.kill()
                group.remove()
            raise
        child.cgroup, child.port = group, spec.port
        if spec.daemonize:
            return await self._daemonized(spec, child)
        return self._track(child)

    async def _start_process(self, spec: SpawnSpec, log_fd: int | None, group: Cgroup | None) -> Child:
        joins = group.procs_files() if group is not None else []
        if spec.module and self.forkserver is not None and not spec.user:
            ours, theirs = socket.socketpair() if self.beat_channels else (None, None)
            try:
                pid = await self.forkserver.spawn(spec.module, spec.env, spec.cwd, spec.log, spec.listen_fd, log_fd,
                                                  cgroup=joins, open_files=spec.open_files, channel=theirs)
            except BaseException:
                if ours is not None:
                    ours.close()
                raise
            finally:
                if theirs is not None:
                    theirs.close()  # the service has its copy
            if pid is not None:
                return Child(spec.name, spec.incarnation, pid, create_time_of(pid), mode="fork", channel=ours)
            if ours is not None:
                ours.close()
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        argv, extra = spec.argv, {"close_fds": True}
        identity = _identity(spec.user)
        if spec.listen_fd is not None:
            _check_runnable(spec.argv[0], spec.env, spec.cwd)  # sh would only say so in the log
            # fd 3 is made in the child before exec; every other descriptor of the daemon is
            # close-on-exec (PEP 446). LISTEN_PID is the program's own pid: sh's, kept by exec.
            argv = ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"', *spec.argv]
            extra = {"close_fds": False}
        if joins and spec.listen_fd is None and not spec.open_files and not identity:
            # Only the cgroup to join: sh joins it and execs the program. A preexec_fn would
            # make Popen fork the whole daemon instead of vfork+exec (~20 ms a spawn here);
            # sh is in the cgroup before the program runs a single instruction.
            _check_runnable(spec.argv[0], spec.env, spec.cwd)
            argv = ["/bin/sh", "-c", _join_then_exec(joins), *spec.argv]
            joins = []
        if spec.listen_fd is not None or joins or spec.open_files:
            # The cgroup is joined before exec, so not one instruction of the program runs
            # outside it; as root, before the identity is dropped (so that comes last).
            extra["preexec_fn"] = functools.partial(_before_exec, spec.listen_fd, joins, spec.open_files,
                                                    identity if joins else {})
            if joins:
                identity = {}
        try:
            with (os.fdopen(os.dup(log_fd), "wb", buffering=0) if log_fd is not None
                  else open(spec.log, "ab", buffering=0)) as out:
                popen = subprocess.Popen(
                    argv, cwd=spec.cwd, env=spec.env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True, **identity, **extra)
        except FileNotFoundError:
            raise SpawnError(f"command not found: {spec.argv[0]}", cause="missing_binary") from None
        except PermissionError as err:
            raise SpawnError(f"permission denied: {spec.argv[0]} ({err.strerror})",
                             cause="permission_denied") from None
        except (OSError, ValueError, subprocess.SubprocessError) as err:
            raise SpawnError(f"cannot start {spec.argv[0]}: {err}") from None
        return Child(spec.name, spec.incarnation, popen.pid, create_time_of(popen.pid), popen=popen)

    async def _daemonized(self, spec: SpawnSpec, launcher: Child) -> Child:
        """A program that forks into the background: its launcher must exit 0 within the
        start timeout, and the main process is then the one its pidfile names (or the one
        left in its cgroup). It was orphaned below us (the subreaper), so we still reap it
        and read its real exit status."""
        deadline = time.monotonic() + spec.start_timeout
        while launcher.popen is not None and launcher.popen.poll() is None:
            if time.monotonic() > deadline:
                await self._end(launcher)
                raise SpawnError(f"daemonize = true, but {spec.argv[0]} did not go into the background within "
                                 f"{spec.start_timeout:.0f}s")
            await asyncio.sleep(0.005)
        code = launcher.popen.returncode if launcher.popen is not None else None
        if code != 0:
            await self._end(launcher)
            raise SpawnError(f"{spec.argv[0]} exited with {code} before it went into the background (see its log)")
        main = None
        while main is None and time.monotonic() < deadline:
            main = self._main_pid(spec, launcher)
            if main is None:
                await asyncio.sleep(0.01)
        if main is None:
            await self._end(launcher)
            where = f"in {spec.pidfile}" if spec.pidfile else "left in its cgroup" if launcher.cgroup else "found"
            raise SpawnError(f"{spec.argv[0]} went into the background, but no live main process was {where} "
                             f"within {spec.start_timeout:.0f}s")
        child = Child(spec.name, spec.incarnation, main, create_time_of(main), mode="daemonized",
                      cgroup=launcher.cgroup, port=spec.port)
        log.info("daemonized", extra={"offender": spec.name, "launcher": launcher.pid, "pid": main,
                                      "incarnation": spec.incarnation})
        return self._track(child)

    def _main_pid(self, spec: SpawnSpec, launcher: Child) -> int | None:
        if spec.pidfile is not None:
            try:
                pid = int(spec.pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return None
            if not same_process(pid, None):
                return None
            if launcher.cgroup is not None:
                return pid if pid in launcher.cgroup.pids() else None
            try:  # marks: a stale pidfile may name a recycled pid; the daemonized one is orphaned to us
                return pid if psutil.Process(pid).ppid() == os.getpid() else None
            except psutil.Error:
                return None
        if launcher.cgroup is not None:
            alive = [p for p in launcher.cgroup.pids() if same_process(p, None)]
            return min(alive) if alive else None
        return None

    async def _end(self, child: Child) -> None:
        """A start that failed half-way: nothing of it may stay."""
        child.expected_exit = True
        child.exited.set()  # not tracked: nobody waits for its pidfd
        await self.kill(child)

    def adopt(self, name: str, incarnation: str, pid: int, create_time: float) -> Child | None:
        """Take over a live process from an earlier daemon, if it is the same process
        (same pid *and* start time)."""
        if not same_process(pid, create_time):
            return None
        group = self.cgroups.find(name, incarnation) if self.cgroups is not None else None
        try:
            return self._track(Child(name, incarnation, pid, create_time, mode="adopted", cgroup=group))
        except ProcessLookupError:
            return None

    def listen(self, port: int, backlog: int) -> socket.socket:
        """A listening socket the daemon holds for a service across its restarts."""
        return open_listener(port, backlog)

    def recover_listener(self, pid: int, port: int) -> socket.socket | None:
        return recover_listener(pid, port)

    def _track(self, child: Child) -> Child:
        loop = asyncio.get_running_loop()
        child._pidfd = os.pidfd_open(child.pid)
        loop.add_reader(child._pidfd, self._reap, child)
        return child

    def _reap(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        if child._pidfd is not None:
            loop.remove_reader(child._pidfd)
            os.close(child._pidfd)
            child._pidfd = None
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = 0, 0  # adopted from an earlier daemon: not ours to reap, no status
        if pid:
            if os.WIFSIGNALED(status):
                child.exit_signal = os.WTERMSIG(status)
            else:
                child.exit_code = os.waitstatus_to_exitcode(status)
        if child.cgroup is not None and child.cgroup.oom_kills() > 0:
            child.oom_killed = True  # the kernel's own count, not a guess from the SIGKILL
        if child.popen is not None:
            child.popen.returncode = -child.exit_signal if child.exit_signal else child.exit_code
        child.exited.set()
        self.on_exit(child)

    # -- ending a tree -------------------------------------------------------------------------

    def leftovers(self, child: Child) -> list[int]:
        group = self._group_of(child)
        if group is not None:
            return group.pids()
        return [p.pid for p in tree_of(child.pid, child.incarnation)]

    def _group_of(self, child: Child) -> Cgroup | None:
        if child.cgroup is None and self.cgroups is not None and child.incarnation:
            child.cgroup = self.cgroups.find(child.name, child.incarnation)  # a lost session's
        return child.cgroup

    async def stop(self, child: Child, grace: float, sig: int = signal.SIGTERM) -> None:
        """``sig`` (with SIGCONT, so a stopped process can act on it), then SIGKILL to the
        whole tree after ``grace``; returns when every process of the tree is gone."""
        child.expected_exit = True
        if child.alive:
            signal_group(child.pid, sig)
            signal_group(child.pid, signal.SIGCONT)
            if _group_leader(child.pid) is False:  # a daemonized main process may lead no group
                for each in (sig, signal.SIGCONT):
                    try:
                        os.kill(child.pid, each)
                    except ProcessLookupError:
                        pass
            try:
                await asyncio.wait_for(asyncio.shield(child.exited.wait()), grace)
            except asyncio.TimeoutError:
                log.warning("stop: %s pid %s ignored signal %s for %.1fs, killing", child.name, child.pid, sig, grace)
        await self.kill(child)

    async def kill(self, child: Child) -> None:
        """SIGKILL the whole tree at once: the process has already failed (hung, gone, or
        past its grace), so there is nothing to wait for but the kernel."""
        child.expected_exit = True
        group = self._group_of(child)
        if group is not None:
            await self._kill_cgroup(child, group)
            return
        procs = tree_of(child.pid, child.incarnation) + self._strays_on_port(child)
        deadline = time.monotonic() + 10
        while True:
            kill_tree(procs, child.pid)
            # The child itself is reaped by its pidfd callback, which reads its exit status.
            procs = [p for p in procs if not _gone(p, reap=p.pid != child.pid)]
            if not procs and not child.alive:
                return
            if time.monotonic() > deadline:
                log.error("kill: %s tree %s still present 10s after SIGKILL", child.name, [p.pid for p in procs])
                return
            if child.alive:
                try:
                    await asyncio.wait_for(asyncio.shield(child.exited.wait()), 0.02)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(0.005)

    async def _kill_cgroup(self, child: Child, group: Cgroup) -> None:
        """cgroup.kill (or freeze + kill): every process of the incarnation, wherever it
        went; returns when the cgroup is empty and the main process reaped, then removes it."""
        deadline = time.monotonic() + 10
        while True:
            group.kill()
            if not group.pids() and not child.alive:
                break
            if time.monotonic() > deadline:
                log.error("kill: %s cgroup %s still holds %s 10s after SIGKILL", child.name, group.owner,
                          group.pids())
                return
            if child.alive:
                try:
                    await asyncio.wait_for(asyncio.shield(child.exited.wait()), 0.005)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(0.002)
        group.remove()

    def _strays_on_port(self, child: Child) -> list[psutil.Process]:
        """The marks fallback: a child of ours (the subreaper) that no incarnation accounts
        for and that listens on this service's port is this service's (a program that
        daemonized and rewrote its environment), with its own tree."""
        if child.port is None or not self.subreaper or not listening_inodes(child.port):
            return []  # nobody listens (the usual case after a kill): no scan of every process's sockets
        holder = port_holder(child.port)
        if not holder or holder.get("pid") in (None, child.pid):
            return []
        try:
            proc = psutil.Process(holder["pid"])
            if proc.ppid() != os.getpid() or proc.pid in self.helper_pids():
                return []
            return [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return []


def _group_leader(pid: int) -> bool | None:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return None


def _gone(proc: psutil.Process, *, reap: bool = True) -> bool:
    """Dead, or a zombie (reaped here when it is ours: orphans come to the subreaper)."""
    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return True
    if reap:
        try:
            os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return True


# -- process-tree plumbing ------------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphaned descendants (the fork server's children, workers whose master died) are
    reparented to us, not to init, so we can reap them and end them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_strays(tracked: set[int]) -> list[int]:
    """Reap zombie children we do not track (a subreaper inherits every orphan below it)."""
    reaped = []
    for pid in own_children():
        if pid in tracked:
            continue
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                os.waitpid(pid, os.WNOHANG)
                reaped.append(pid)
        except (psutil.Error, ChildProcessError):
            pass
    return reaped


def own_children() -> list[int]:
    """This process's children, from /proc/self/task/*/children: each thread's list,
    without the scan of every process on the machine that psutil's children() makes (it
    ran on the daemon's loop every 2 s; a machine with hundreds of agents has thousands
    of processes). That scan is the fallback where the kernel has no such file."""
    try:
        pids: set[int] = set()
        for task in os.scandir("/proc/self/task"):
            with open(f"{task.path}/children") as f:
                pids.update(int(p) for p in f.read().split())
        return sorted(pids)
    except OSError:
        return [p.pid for p in psutil.Process().children()]


def fork_server_env(config: MeshConfig, home: Home) -> dict[str, str]:
    """What a fork server (here or on a Ray node) gets from the mesh: the home's mark
    (scripts/census.py), the SDKs its providers use (the preload), and whether it imports
    them before it is ready: only where parents ask the LLM for advice, whose timeout has
    no room for an agent's own import (elsewhere the agents forked before the warm-up import
    their SDK at their first call, and `tron up` does not wait for the SDKs)."""
    from tron.common import telemetry

    return {**mesh_marks(home), "TRON_SDKS": ",".join(sorted(config.sdks)),
            "TRON_TRACES": "1" if telemetry.endpoint(config.telemetry) else "0",
            "TRON_WARM_BEFORE_READY": "1" if config.policy.llm_advice else "0"}


def local_fork_server(config: MeshConfig, home: Home) -> ForkServerClient:
    # The mark of this home's processes (scripts/census.py), forked ones included: a forked
    # process's /proc environ is the server's.
    return ForkServerClient(home.run / "forkserver.sock", home.log_file("forkserver"), home.root,
                            {**os.environ, **fork_server_env(config, home)})


def _spawn_line(module: str, env: dict[str, str], cwd, log_file, log_fd: int | None,
                open_files: int | None, channel: bool = False) -> dict:
    """What a fork server's child needs to become a service (forkserver._run_service);
    ``channel``: the service gets a beat channel (a standby's connection, or a descriptor sent last)."""
    return {"module": module, "env": env, "cwd": str(cwd), "log": str(log_file), "log_pipe": log_fd is not None,
            "open_files": open_files, "channel": channel}


SPAWN_WAIT = 5.0  # how long the daemon waits for the fork server's answer before it spawns plainly
# A server that let a spawn go unanswered for SPAWN_WAIT is asked nothing more, and pinged each
# STALL_PING s: an answer serves it again; none for STALL_GRACE s (an in-place SDK import gets
# HEIR_WAIT) ends it, and a fresh one starts. Without this, every spawn waited SPAWN_WAIT first.
STALL_PING = 1.0
STALL_GRACE = 20.0
STALL_GRACE_KNOB = "TRON_TEST_STALL_GRACE"  # a test knob: a shorter grace (the daemon's environment)
IN_FLIGHT = 6  # spawn requests sent to the fork server at once; the rest wait their turn here


class ForkServerClient:
    """Keeps a fork server running and asks it for new agent processes.

    ``spawn`` returns None whenever the server cannot serve (not started yet, dead,
    stale, slow): the caller then spawns plainly, so a broken fork server costs speed,
    never a restart.
    """

    def __init__(self, sock_path, log_path, cwd, env: dict[str, str]) -> None:
        self.sock_path = str(sock_path)
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._was_stopped = False  # said once when it is found stopped, once when it runs again
        self.ready = False
        self._warm = False  # the server has the LLM SDKs (it warms them up after it is ready): ``warm``
        self.warm_now = False  # the mesh is up: a server that is ready warms up ``WARM_AFTER_UP`` s later
        self.up_at = 0.0  # time.monotonic() of warm_up()
        self.warm_after_up = self.WARM_AFTER_UP  # warm_up() reads the test knob
        self.stopping = False
        self.generation = 0
        self.spawned = 0
        # What the serving server's heap has in huge pages (forkserver._settle_heap), as its last ping said.
        self.huge_pages: dict | None = None
        self._fds: dict[int, int] = {}  # pid -> its pidfd, watched (the server, and an heir warming up)
        self.heir: subprocess.Popen | None = None  # a server warming up to take over (``_hand_to_heir``)
        self.on_warm: Callable[[], None] = lambda: None  # called when the serving server has its SDKs
        self.on_serving: Callable[[], None] = lambda: None  # called when a server is ready, or answers again
        self._starting: asyncio.Task | None = None
        self._warming: asyncio.Task | None = None
        self._checking: asyncio.Future | None = None  # check_code sent after a stale standby
        self._slots = asyncio.Semaphore(IN_FLIGHT)
        self.stalled_since: float | None = None  # time.monotonic() of the spawn it left unanswered
        self.stall_grace = float(os.environ.get(STALL_GRACE_KNOB) or STALL_GRACE)
        self._judging: asyncio.Task | None = None
        self._warming_in_place = False  # told to import the SDKs itself: its silence may be that
        self._ended: subprocess.Popen | None = None  # the stalled server ended, until it is reaped
        # Standbys are asked for one at a time and never take a spawn's slot: after `tron up`
        # a hundred agents' standbys must not queue a restart behind them.
        self._standby_slot = asyncio.Semaphore(1)

    @property
    def warm(self) -> bool:
        """The serving server has the LLM SDKs. Turning so (warmed up, an heir taking over, a
        server started again warm) calls ``on_warm``: standbys forked cold are made again."""
        return self._warm

    @warm.setter
    def warm(self, value: bool) -> None:
        was, self._warm = self._warm, value
        if value and not was:
            self.on_warm()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stopped(self) -> bool:
        """The server runs but is stopped (SIGSTOP, a debugger): it would answer nothing, and a
        spawn would wait SPAWN_WAIT for it. One read of /proc (tens of microseconds)."""
        pid = self.pid
        if pid is None:
            return False
        stopped = status_of(pid) in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
        if stopped != self._was_stopped:
            self._was_stopped = stopped
            if stopped:
                log.error("the fork server (pid %s) is stopped: agents are spawned plainly (slower) until it runs", pid)
            else:
                log.warning("the fork server (pid %s) runs again", pid)
        return stopped

    def launch(self) -> bool:
        """Start the server process now, without waiting for it: the daemon does so before its
        own imports, which then overlap the server's. False when it cannot run here."""
        if len(os.fsencode(self.sock_path)) > SOCKET_PATH_MAX:
            log.error("fork server not started: its socket path %s is longer than %d bytes (a shorter home "
                      "helps); agents spawn plainly", self.sock_path, SOCKET_PATH_MAX)
            return False
        self.proc = self._popen(self.sock_path)
        self.generation += 1
        return True

    def _popen(self, sock_path: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.log_path, "ab", buffering=0) as out:
            return subprocess.Popen(
                [sys.executable, "-m", "tron.services.daemon.forkserver", sock_path, str(os.getpid())],
                cwd=self.cwd, env={**self.env, "PYTHONUNBUFFERED": "1", **(extra_env or {})},
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True)

    def _watch(self, proc: subprocess.Popen) -> None:
        """``_on_exit`` runs when ``proc`` ends (its pidfd becomes readable)."""
        fd = self._fds[proc.pid] = os.pidfd_open(proc.pid)
        asyncio.get_running_loop().add_reader(fd, self._on_exit, proc)

    async def start(self) -> None:
        """Launch in the background (unless launch() did already): agents spawn plainly until
        it is ready."""
        self._starting = asyncio.ensure_future(self._launch())

    async def wait_ready(self, timeout: float) -> bool:
        if self._starting is not None:
            await asyncio.wait([self._starting], timeout=timeout)
        return self.ready

    async def _launch(self, timeout: float = 20.0) -> bool:
        self.ready = False
        if (self.proc is None or self.proc.returncode is not None) and not self.launch():
            return False
        self._watch(self.proc)
        reply = await self._first_answer(self.proc, timeout)
        if reply is None:
            log.warning("fork server did not become ready; agents spawn plainly")
            return False
        self.ready, self.huge_pages = True, reply.get("huge_pages")
        log.info("fork server ready", extra={"pid": self.proc.pid, "modules": reply.get("modules"),
                                             "generation": self.generation, "huge_pages": self.huge_pages})
        self.warm = bool(reply.get("warm"))  # started again warm: standbys of the last cold one are made again
        self.on_serving()
        if not self.warm:
            self._warming = asyncio.ensure_future(self._until_warm(self.proc))
        return True

    async def _first_answer(self, proc: subprocess.Popen, timeout: float, path: str | None = None,
                            still: Callable[[], bool] = lambda: True) -> dict | None:
        """The first ping answer of ``proc`` (serving at ``path``, else the serving socket):
        asked every 50 ms; None once it exited, ``timeout`` passed or ``still()`` is false."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and still():
            reply = await self._request({"op": "ping"}, timeout=1.0, path=path)
            if reply and reply.get("ok") and reply.get("pid") == proc.pid:
                return reply
            await asyncio.sleep(0.05)
        return None

    # s after the mesh is up before the SDKs' import starts (in an heir). Right after `tron up`
    # the agents forked cold import their own SDK and the first task runs; an import of ~2 s of
    # CPU beside them on a small machine slows exactly that. A restart meanwhile forks from the
    # cold server (healthy as fast; the new agent imports its SDK itself). Counted from up
    # only: restarts (a crash loop) never put the warm-up off further.
    WARM_AFTER_UP = 10.0
    WARM_AFTER_UP_KNOB = "TRON_TEST_WARM_AFTER_UP"  # a test knob: a shorter wait (the daemon's environment)

    def warm_up(self) -> None:
        """The mesh is up (the daemon's bring-up is over): the server imports the LLM SDKs
        ``WARM_AFTER_UP`` s from now, rather than on its own after ``WARM_UNASKED`` s without a
        request; so does every later server (one started after the last died), as soon as it is
        ready once that time has passed."""
        self.warm_now = True
        self.up_at = time.monotonic()
        self.warm_after_up = float(os.environ.get(self.WARM_AFTER_UP_KNOB) or self.WARM_AFTER_UP)

    async def _until_warm(self, proc: subprocess.Popen, interval: float = 0.5) -> None:
        """Once the mesh is up (``warm_now``), a warm server takes over from this cold one
        (``_hand_to_heir``): no spawn ever waits for the SDKs' import. Where no heir can be
        started, the server is told to warm up itself (a request then waits in its backlog
        meanwhile). Either way, ask until it says it has the SDKs (``warm``, for status)."""
        told, heir_path = False, None
        while proc.poll() is None and not self.stopping:
            if self.warm_now and not told:
                # The server is told first that an heir will warm (it no longer warms up in
                # place untold), then the heir starts WARM_AFTER_UP s after the mesh is up.
                heir_path = heir_path or await self._waive(proc)
                if heir_path and (left := self.up_at + self.warm_after_up - time.monotonic()) > 0:
                    await asyncio.sleep(min(left, interval))
                    continue
                if heir_path and await self._hand_to_heir(proc, heir_path):
                    return
                told = self._warming_in_place = bool(await self._request({"op": "warm_up"}, timeout=5.0))
            reply = await self._request({"op": "ping"}, timeout=30.0)
            if reply and reply.get("pid") == proc.pid and reply.get("warm"):
                self.warm, self.huge_pages = True, reply.get("huge_pages")
                log.info("fork server warm", extra={"pid": proc.pid, "modules": reply.get("modules"),
                                                    "generation": self.generation, "huge_pages": self.huge_pages})
                return
            if reply and reply.get("warmth") == "failed":
                self.huge_pages = reply.get("huge_pages")
                log.warning("fork server could not import the LLM SDKs (see its log): each agent imports its own",
                            extra={"pid": proc.pid, "generation": self.generation})
                return
            await asyncio.sleep(interval)

    def _on_exit(self, proc: subprocess.Popen) -> None:
        if (fd := self._fds.pop(proc.pid, None)) is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        proc.wait()
        if proc is not self.proc:  # a server that retired, or an heir that did not take over
            if proc is self.heir:
                self.heir = None
            return
        self.ready = self.warm = self._warming_in_place = False
        self.huge_pages, self.stalled_since = None, None
        if self.stopping:
            return
        if proc.returncode == CANNOT_RUN:
            log.error("fork server cannot run here (exit 3, see its log): agents spawn plainly from now on")
            return
        log.warning("fork server exited (%s); starting a new one", proc.returncode)
        self._starting = asyncio.ensure_future(self._relaunch())

    async def _relaunch(self) -> None:
        await asyncio.sleep(0.2)
        if not self.stopping:
            await self._launch()

    async def _request(self, req: dict, *, timeout: float, fds: tuple[int, ...] = (),
                       path: str | None = None) -> dict | None:
        """One request line (with ``fds`` alongside, SCM_RIGHTS) and its answer; None when
        the server (at ``path``, else the serving one's) does not answer well within ``timeout``."""
        try:
            return await unixline.ask_async(path or self.sock_path, req, timeout=timeout, fds=fds)
        except (OSError, ValueError):
            return None

    HEIR_WAIT = 120.0  # s an heir may take to import its SDKs and be ready (a loaded machine's minutes are long)

    def _heir_path(self) -> str | None:
        """The socket an heir binds: the serving one's name with ``~`` added, or taken off."""
        path = self.sock_path[:-1] if self.sock_path.endswith("~") else self.sock_path + "~"
        return path if len(os.fsencode(path)) <= SOCKET_PATH_MAX else None

    async def _waive(self, proc: subprocess.Popen) -> str | None:
        """The socket path of the heir that will import the SDKs for ``proc``, which was told so
        (``heir_warms``) and no longer warms up by itself; None with nothing to import (a mesh
        of programs alone: its warm-up is instant, in place), without a path, or untold."""
        path = self._heir_path()
        if not server_sdks(self.env) or path is None:
            return None
        return path if (await self._request({"op": "heir_warms"}, timeout=5.0) or {}).get("ok") else None

    async def _hand_to_heir(self, proc: subprocess.Popen, path: str) -> bool:
        """The SDKs' import (1-2 s each) in a new server, warm before it is ready, while the cold
        one ``proc`` goes on serving; then the new one serves, and the old one, asked to retire,
        answers what it had queued first and exits. False when no heir could take over (the
        caller has ``proc`` warm up itself). ``path``: the heir's socket (``_waive``)."""
        Path(path).unlink(missing_ok=True)
        try:
            heir = self.heir = self._popen(path, {"TRON_WARM_BEFORE_READY": "1"})
        except OSError as err:
            log.warning("no heir for the fork server (%s): it warms up itself", err)
            return False
        self._watch(heir)
        # (until it answers, unless the daemon stops or the server was replaced meanwhile)
        reply = await self._first_answer(heir, self.HEIR_WAIT, path,
                                         lambda: not self.stopping and self.proc is proc)
        if reply is None or self.stopping or self.proc is not proc or proc.poll() is not None:
            self._end_heir(heir, path)
            return self.stopping or self.proc is not proc  # not ours to warm any more
        stalled = self.stalled_since is not None
        old_path, self.proc, self.sock_path, self.heir = self.sock_path, heir, path, None
        # The heir answered: it serves, whatever became of the old one (found stalled meanwhile).
        self.ready, self.stalled_since, self._warming_in_place = True, None, False
        self.warm, self.generation = bool(reply.get("warm")), self.generation + 1
        self.huge_pages = reply.get("huge_pages")
        log.info("fork server warm: its heir serves now, warm from the start", extra={
            "pid": heir.pid, "retired": proc.pid, "modules": reply.get("modules"), "generation": self.generation,
            "warmth": reply.get("warmth"), "huge_pages": self.huge_pages})
        if stalled and proc.poll() is None:  # it answers nothing: not asked to retire, ended (a frozen one too)
            proc.kill()
            return True
        # Whatever was sent to the old server before this line is answered first (its backlog
        # is served in order); it exits after answering this.
        if await self._request({"op": "retire"}, timeout=SPAWN_WAIT, path=old_path) is None and proc.poll() is None:
            proc.terminate()
        return True

    def _end_heir(self, heir: subprocess.Popen, path: str) -> None:
        if heir.poll() is None:
            heir.kill()  # _on_exit reaps it
        else:
            log.warning("the fork server's heir exited (%s) before it was ready: the server warms up itself",
                        heir.returncode)
        Path(path).unlink(missing_ok=True)

    async def spawn(self, module: str, env: dict[str, str], cwd, log_file, listen_fd: int | None = None,
                    log_fd: int | None = None, *, cgroup: list[str] | None = None,
                    open_files: int | None = None, channel: socket.socket | None = None) -> int | None:
        """``channel``: the service's end of its beat channel (sent last; beat_channel.py)."""
        if not self.ready or self.stopped():
            return None
        fds = tuple(fd for fd in (log_fd, listen_fd, channel.fileno() if channel else None) if fd is not None)
        # The server forks nothing after "deadline" (CLOCK_MONOTONIC, the same in every process
        # here): a request it takes after we stopped waiting (then spawning plainly) would
        # make a second incarnation nobody tracks. The margin is for its answer to arrive.
        # A few requests at a time: the server forks one after another anyway, and a wave's
        # last request must not spend its wait in the queue behind the others.
        async with self._slots:
            if not self.ready:  # found stalled (or gone) while this one waited its turn
                return None
            reply = await self._request({"op": "spawn", **_spawn_line(module, env, cwd, log_file, log_fd, open_files,
                                                                     channel is not None),
                                         "cgroup": cgroup or [], "deadline": time.monotonic() + SPAWN_WAIT - 1.0},
                                        timeout=SPAWN_WAIT, fds=fds)
        if reply and reply.get("ok"):
            self.spawned += 1
            return int(reply["pid"])
        reason = (reply or {}).get("error", "no answer")
        if reply and reply.get("stale"):
            self.ready = False  # it exits by itself; _on_exit starts a fresh one
        log.warning("fork server could not spawn %s: %s; spawning plainly", module, reason)
        if reply is None:
            self._stalled()
        return None

    def _stalled(self) -> None:
        """The serving server left a spawn unanswered for SPAWN_WAIT while it runs, not stopped
        by a signal: stalled (a blocked thread, a frozen cgroup) or far behind. Nothing more is
        asked of it, so no start waits on it again; ``_judge`` serves it again once it answers,
        or ends it (a fresh one starts) if it never does."""
        proc = self.proc
        if proc is None or proc is self._ended or proc.poll() is not None or self.stopping or self.stopped():
            return
        if self.stalled_since is None:
            self.stalled_since = time.monotonic()
        self.ready = False
        if self._judging is None or self._judging.done():
            grace = self.HEIR_WAIT if self._warming_in_place and not self.warm else self.stall_grace
            log.error("the fork server (pid %s) left a spawn unanswered for %.0fs: agents are spawned plainly "
                      "(slower) until it answers; it is ended if it answers nothing for %.0fs", proc.pid, SPAWN_WAIT,
                      grace)
            self._judging = asyncio.ensure_future(self._judge(proc, grace))

    async def _judge(self, proc: subprocess.Popen, grace: float) -> None:
        deadline = (self.stalled_since or time.monotonic()) + grace
        while proc is self.proc and proc.poll() is None and not self.stopping:
            reply = await self._request({"op": "ping"}, timeout=STALL_PING)
            if proc is not self.proc or proc.poll() is not None or self.stopping:
                return
            if reply and reply.get("ok") and reply.get("pid") == proc.pid:
                log.warning("the fork server (pid %s) answers again after %.1fs: agents are forked from it again",
                            proc.pid, time.monotonic() - (self.stalled_since or time.monotonic()))
                self.stalled_since, self.ready = None, True
                self.on_serving()
                return
            if time.monotonic() >= deadline:
                if self.stopped():  # stopped by a signal meanwhile: that is said (and waited out) on its own
                    await asyncio.sleep(STALL_PING)
                    continue
                log.error("the fork server (pid %s) answered nothing for %.0fs: ending it; a fresh one starts",
                          proc.pid, time.monotonic() - (self.stalled_since or deadline))
                self._ended = proc
                proc.kill()  # _on_exit reaps it and starts a fresh one
                return
            await asyncio.sleep(max(0.0, min(STALL_PING, deadline - time.monotonic())))

    async def standby(self, cgroup: list[str], config: str = "", service: str = "") -> tuple[int, socket.socket] | None:
        """A standby forked now (forkserver.py): it joins ``cgroup``, reads the mesh file
        ``config`` ahead and waits. Its pid and the connection it waits on (closing it ends
        the standby); None when the server cannot serve."""
        if not self.ready or self.stopped():
            return None
        async with self._standby_slot:
            try:
                reply, conn = await unixline.ask_keep_async(
                    self.sock_path, {"op": "standby", "cgroup": cgroup, "config": config, "service": service,
                                     "deadline": time.monotonic() + SPAWN_WAIT - 1.0},
                    timeout=SPAWN_WAIT)
            except OSError:  # unanswered (or refused) while it runs: a start would wait on it too
                self._stalled()
                return None
            except ValueError:
                return None
        if reply and reply.get("ok"):
            return int(reply["pid"]), conn
        conn.close()
        if reply and reply.get("stale"):
            self.ready = False  # it exits by itself; _on_exit starts a fresh one
        return None

    async def hand_over(self, conn: socket.socket, module: str, env: dict[str, str], cwd, log_file,
                        listen_fd: int | None = None, log_fd: int | None = None, *,
                        open_files: int | None = None, channel: bool = False,
                        rest: bytearray | None = None) -> str | None:
        """A standby's spawn: None once it took it (it is the service now), else why not.
        ``channel``: it keeps ``conn`` for its beats (the caller reads it; what came
        with the answer already is added to ``rest``)."""
        fds = tuple(fd for fd in (log_fd, listen_fd) if fd is not None)
        try:
            reply = await unixline.ask_on_async(conn, _spawn_line(module, env, cwd, log_file, log_fd, open_files,
                                                                  channel),
                                                timeout=SPAWN_WAIT, fds=fds, rest=rest)
        except (OSError, ValueError) as err:
            return f"no answer: {err}"
        if reply and reply.get("ok"):
            self.spawned += 1
            return None
        if reply and reply.get("stale"):
            self._stale_standby()
        return (reply or {}).get("error", "it closed without an answer")

    def _stale_standby(self) -> None:
        """A standby found the code changed since its server read it: so has the server, which
        no request may reach from now on. Told to check, it exits, and _on_exit starts a fresh
        one; not told, it would wait on, unasked, and every start after would spawn plainly."""
        self.ready = False
        if self._checking is None or self._checking.done():
            self._checking = asyncio.ensure_future(self._check_code(self.proc))

    async def _check_code(self, proc: subprocess.Popen | None) -> None:
        reply = await self._request({"op": "check_code"}, timeout=SPAWN_WAIT)
        if reply and reply.get("ok") and proc is self.proc and not self.stopping:
            self.ready = True  # it read the code after the standby's server did (an heir): it serves on
        elif reply is None and proc is self.proc and proc is not None and proc.poll() is None:
            log.warning("fork server did not answer whether its code is current; ending it")
            proc.kill()  # _on_exit starts a fresh one

    async def stop(self) -> None:
        self.stopping = True
        self.ready = False
        for task in (self._starting, self._warming, self._checking):
            if task:
                task.cancel()
        if self.heir is not None:
            if self.heir.poll() is None:
                self.heir.kill()
                self.heir.wait()
            if (path := self._heir_path()) is not None:
                Path(path).unlink(missing_ok=True)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            for _ in range(100):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
