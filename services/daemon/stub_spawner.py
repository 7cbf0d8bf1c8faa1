"""``StubSpawner``: the spawner's stub backend. No process is made: a child is a record
the test ends when it likes (``crash``), and stopping or killing one ends it at once.
tests/unit/test_spawner_contract.py holds it to the same contract as ``LocalSpawner``."""

from __future__ import annotations

import asyncio
import itertools
import signal
from pathlib import Path

from tron.services.daemon.listeners import ListenerError
from tron.services.daemon.spawner import Child, ExitCallback, SpawnError, SpawnSpec


class StubListener:
    """What the stub hands the daemon for a held socket: a record, no port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.closed = False

    def fileno(self) -> int:
        return -1 if self.closed else 1_000 + self.port

    def close(self) -> None:
        self.closed = True


def _unreported(child: Child) -> None:
    pass  # not started yet: nobody to tell


class StubSpawner:
    def __init__(self) -> None:
        self.on_exit: ExitCallback = _unreported  # start() names who hears of exits
        self.children: dict[int, Child] = {}
        self.spawned: list[SpawnSpec] = []
        self.failures: dict[str, str] = {}  # service name -> the SpawnError its next spawns raise
        self._pids = itertools.count(1_000_000)
        self.listeners: list[StubListener] = []  # every socket the daemon asked to hold
        self.busy_ports: set[int] = set()  # ports whose listen() fails, as if taken

    async def start(self, on_exit: ExitCallback) -> None:
        self.on_exit = on_exit

    async def close(self) -> None:
        pass

    async def wait_ready(self, timeout: float) -> bool:
        return True  # no fast path to wait for

    def bring_up_done(self) -> None:
        pass  # nothing waits for it

    def status(self) -> dict | None:
        return None

    # No processes, no sockets, no helpers, no log pump: the honest answers.

    def ghosts(self, home_root: str, owners: set[int]) -> dict[int, str]:
        return {}

    def resident(self, child: Child) -> int:
        return 0

    def is_listening(self, port: int) -> bool:
        return True  # a stub child "serves" at once: the health check decides

    def port_holder(self, port: int) -> dict | None:
        return None

    def listener_is_ours(self, child: Child, port: int) -> bool:
        return True

    def helper_pids(self) -> set[int]:
        return set()

    async def sync_log(self, path: Path) -> None:
        return None

    def log_stats(self) -> dict | None:
        return None

    def log_pump_pid(self) -> int | None:
        return None

    def log_pump_health(self) -> dict | None:
        return None

    def ownership(self) -> dict | None:
        return None

    async def spawn(self, spec: SpawnSpec) -> Child:
        if spec.name in self.failures:
            raise SpawnError(self.failures[spec.name])
        self.spawned.append(spec)
        child = Child(spec.name, spec.incarnation, next(self._pids), 1.0, mode="stub")
        self.children[child.pid] = child
        return child

    def reserve(self, name: str) -> str | None:
        return None  # nothing is prepared ahead: every start gets a new id

    def release(self, name: str) -> None:
        pass  # nothing waits for a next start

    def adopt(self, name: str, incarnation: str, pid: int, create_time: float) -> Child | None:
        child = self.children.get(pid)
        if child is None or not child.alive or child.create_time != create_time:
            return None
        child.name, child.incarnation, child.mode = name, incarnation, "adopted"
        return child

    def listen(self, port: int, backlog: int) -> "StubListener":
        if port in self.busy_ports:
            raise ListenerError(f"port {port} is already in use")
        listener = StubListener(port)
        self.listeners.append(listener)
        return listener

    def recover_listener(self, pid: int, port: int) -> "StubListener | None":
        child = self.children.get(pid)
        return StubListener(port) if child is not None and child.alive else None

    def crash(self, child: Child, *, code: int | None = None, sig: int | None = signal.SIGKILL) -> None:
        """The process dies by itself (the test's stand-in for kill -9 or an exit)."""
        self._end(child, code=code, sig=None if code is not None else sig)

    def _end(self, child: Child, *, code: int | None, sig: int | None) -> None:
        if not child.alive:
            return
        child.exit_code, child.exit_signal = code, sig
        child.exited.set()
        asyncio.get_running_loop().call_soon(self.on_exit, child)  # as a pidfd callback would

    async def stop(self, child: Child, grace: float, sig: int = signal.SIGTERM) -> None:
        child.expected_exit = True
        self._end(child, code=None, sig=sig)
        await asyncio.sleep(0)

    async def kill(self, child: Child) -> None:
        child.expected_exit = True
        self._end(child, code=None, sig=signal.SIGKILL)
        await asyncio.sleep(0)

    def leftovers(self, child: Child) -> list[int]:
        return []

    def alive(self) -> list[Child]:
        return [c for c in self.children.values() if c.alive]
