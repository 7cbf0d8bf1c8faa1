"""The local spawner: real processes on this machine.

Each child runs in its own session (so its own process group), with stdout and stderr
appended to ``<home>/logs/<name>.log`` (files, never pipes: a child must outlive a
killed daemon without blocking on a full pipe). Exits are noticed through a pidfd
registered with the event loop, which works the same for our own children and for
processes adopted from an earlier daemon, with no thread and no polling.

Stopping is SIGTERM to the group (with SIGCONT, so a stopped process can act on it),
then SIGKILL to the group and to any descendant that left it, after a grace period.
Local-only facts (pids, process groups) stay in this module.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

log = logging.getLogger("tron.spawner")


@dataclass
class Child:
    name: str
    incarnation: str
    pid: int
    create_time: float
    adopted: bool = False
    forked: bool = False  # from the fork server, reparented to us: ours to reap
    popen: subprocess.Popen | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    expected_exit: bool = False  # set before we kill it ourselves
    _pidfd: int | None = None

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()


ExitCallback = Callable[[Child], None]


class LocalSpawner:
    def __init__(self, logs_dir: Path, on_exit: ExitCallback) -> None:
        self.logs_dir = logs_dir
        self.on_exit = on_exit

    def spawn(self, name: str, incarnation: str, argv: list[str], env: dict[str, str], cwd: Path) -> Child:
        """Start a process in its own session. Raises OSError if it cannot start."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.logs_dir / f"{name}.log", "ab", buffering=0) as out:
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        try:
            create_time = psutil.Process(popen.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = 0.0
        child = Child(name, incarnation, popen.pid, create_time, popen=popen)
        self._watch(child)
        return child

    def track_forked(self, name: str, incarnation: str, pid: int) -> Child:
        """A process the fork server made for us (already reparented to this daemon)."""
        try:
            create_time = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            create_time = 0.0
        child = Child(name, incarnation, pid, create_time, forked=True)
        self._watch(child)
        return child

    def adopt(self, name: str, incarnation: str, pid: int, create_time: float) -> Child | None:
        """Take over a live process from an earlier daemon, if it is the same process
        (same pid *and* start time: a recycled pid is someone else)."""
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - create_time) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        child = Child(name, incarnation, pid, create_time, adopted=True)
        try:
            self._watch(child)
        except ProcessLookupError:
            return None
        return child

    def _watch(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        fd = os.pidfd_open(child.pid)
        child._pidfd = fd
        loop.add_reader(fd, self._reap, child)

    def _reap(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        if child._pidfd is not None:
            loop.remove_reader(child._pidfd)
            os.close(child._pidfd)
            child._pidfd = None
        if child.popen is not None or child.forked:
            try:
                _, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                status = None
            if status is not None:
                if os.WIFSIGNALED(status):
                    child.exit_signal = os.WTERMSIG(status)
                else:
                    child.exit_code = os.waitstatus_to_exitcode(status)
                if child.popen is not None:
                    child.popen.returncode = -child.exit_signal if child.exit_signal else child.exit_code
        child.exited.set()
        self.on_exit(child)

    # -- stopping -------------------------------------------------------------------------

    @staticmethod
    def _descendants(pid: int) -> list[psutil.Process]:
        try:
            return psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return []

    @staticmethod
    def _signal_group(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)  # the child leads its own session, so pgid == pid
        except (ProcessLookupError, PermissionError):
            pass

    async def stop(self, child: Child, grace: float) -> None:
        """SIGTERM, wait up to ``grace``, then SIGKILL; the whole tree either way."""
        if not child.alive:
            self._kill_strays(child)
            return
        child.expected_exit = True
        strays = self._descendants(child.pid)
        self._signal_group(child.pid, signal.SIGTERM)
        self._signal_group(child.pid, signal.SIGCONT)  # a stopped process cannot act on TERM
        try:
            await asyncio.wait_for(child.exited.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("stop: %s pid %s ignored SIGTERM for %.1fs, killing", child.name, child.pid, grace)
            self._signal_group(child.pid, signal.SIGKILL)
            await self._wait_exited(child)
        self._kill_strays(child, strays)

    async def kill(self, child: Child) -> None:
        """SIGKILL the whole tree at once: the process has already failed (hung or
        misbehaving), so there is nothing to wait for."""
        child.expected_exit = True
        strays = self._descendants(child.pid)
        self._signal_group(child.pid, signal.SIGKILL)
        await self._wait_exited(child)
        self._kill_strays(child, strays)

    async def _wait_exited(self, child: Child) -> None:
        try:
            await asyncio.wait_for(child.exited.wait(), 10)
        except asyncio.TimeoutError:
            log.error("kill: %s pid %s still present 10s after SIGKILL", child.name, child.pid)

    def _kill_strays(self, child: Child, strays: list[psutil.Process] | None = None) -> None:
        """Descendants that moved to their own group would survive a group kill."""
        self._signal_group(child.pid, signal.SIGKILL)
        for proc in strays or []:
            try:
                proc.kill()
            except psutil.Error:
                pass


# -- process-tree plumbing ------------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphaned descendants (the fork server's children) are reparented to us, not to
    init, so we can reap them and read their exit status."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_strays(tracked: set[int]) -> list[int]:
    """Reap zombie children we do not track (a subreaper inherits every orphan below it)."""
    reaped = []
    for proc in psutil.Process().children():
        if proc.pid in tracked:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(proc.pid, os.WNOHANG)
                reaped.append(proc.pid)
        except (psutil.Error, ChildProcessError):
            pass
    return reaped


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
        self.ready = False
        self.stopping = False
        self.generation = 0
        self.spawned = 0
        self._fd: int | None = None
        self._restart_task: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self, timeout: float = 20.0) -> bool:
        self.ready = False
        with open(self.log_path, "ab", buffering=0) as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.daemon.forkserver", self.sock_path, str(os.getpid())],
                cwd=self.cwd, env={**self.env, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )
        self.generation += 1
        loop = asyncio.get_running_loop()
        self._fd = os.pidfd_open(self.proc.pid)
        loop.add_reader(self._fd, self._on_exit, self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            reply = await self._request({"op": "ping"}, timeout=1.0)
            if reply and reply.get("ok") and reply.get("pid") == self.proc.pid:
                self.ready = True
                log.info("fork server ready", extra={"pid": self.proc.pid, "modules": reply.get("modules"),
                                                     "generation": self.generation})
                return True
            await asyncio.sleep(0.05)
        log.warning("fork server did not become ready; agents spawn plainly")
        return False

    def _on_exit(self, proc: subprocess.Popen) -> None:
        loop = asyncio.get_running_loop()
        if self._fd is not None:
            loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        proc.wait()
        self.ready = False
        if self.stopping:
            return
        log.warning("fork server exited (%s); starting a new one", proc.returncode)
        self._restart_task = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        await asyncio.sleep(0.2)
        if not self.stopping:
            await self.start()

    async def _request(self, req: dict, *, timeout: float) -> dict | None:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(self.sock_path)
                try:
                    writer.write(json.dumps(req).encode() + b"\n")
                    await writer.drain()
                    line = await reader.readline()
                finally:
                    writer.close()
            return json.loads(line) if line else None
        except (OSError, TimeoutError, json.JSONDecodeError):
            return None

    async def spawn(self, module: str, env: dict[str, str], cwd, log_file) -> int | None:
        if not self.ready:
            return None
        reply = await self._request({"op": "spawn", "module": module, "env": env, "cwd": str(cwd),
                                     "log": str(log_file)}, timeout=2.0)
        if reply and reply.get("ok"):
            self.spawned += 1
            return int(reply["pid"])
        reason = (reply or {}).get("error", "no answer")
        if reply and reply.get("stale"):
            self.ready = False  # it exits by itself; _on_exit starts a fresh one
        log.warning("fork server could not spawn %s: %s; spawning plainly", module, reason)
        return None

    async def stop(self) -> None:
        self.stopping = True
        self.ready = False
        if self._restart_task:
            self._restart_task.cancel()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            for _ in range(100):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
