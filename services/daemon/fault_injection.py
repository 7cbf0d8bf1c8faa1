"""Faults the integration tests inject into a real daemon, kept out of the production path.

``TRON_TEST_DIE_AFTER_FORK=NAME``: the daemon exits (``os._exit(9)``, no cleanup) right after
the spawner has started NAME's process and before the daemon has recorded it as started:
the window tests/integration/test_faults.py proves a new daemon recovers from. The factory
(services/daemon/build.py) wraps the spawner in ``DieAfterFork`` only when the variable is
set; no production code path knows of it.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from tron.services.daemon.spawner import Child, ExitCallback, SpawnSpec, Spawner

DIE_AFTER_FORK = "TRON_TEST_DIE_AFTER_FORK"


def wrap(spawner: Spawner) -> Spawner:
    """``spawner`` as the environment asks: wrapped for a fault, or untouched."""
    victim = os.environ.get(DIE_AFTER_FORK)
    return DieAfterFork(spawner, victim) if victim else spawner


class DieAfterFork:
    """A spawner that is ``inner`` in every way but one: once ``victim``'s process is
    started, the whole daemon exits at once."""

    def __init__(self, inner: Spawner, victim: str) -> None:
        self.inner = inner
        self.victim = victim

    async def spawn(self, spec: SpawnSpec) -> Child:
        child = await self.inner.spawn(spec)
        if spec.name == self.victim:
            os._exit(9)
        return child

    # -- the rest is the inner spawner's -----------------------------------------------------

    async def start(self, on_exit: ExitCallback) -> None:
        await self.inner.start(on_exit)

    async def close(self) -> None:
        await self.inner.close()

    async def wait_ready(self, timeout: float) -> bool:
        return await self.inner.wait_ready(timeout)

    def bring_up_done(self) -> None:
        self.inner.bring_up_done()

    def adopt(self, name: str, incarnation: str, pid: int, create_time: float) -> Child | None:
        return self.inner.adopt(name, incarnation, pid, create_time)

    def reserve(self, name: str) -> str | None:
        return self.inner.reserve(name)

    def release(self, name: str) -> None:
        self.inner.release(name)

    async def stop(self, child: Child, grace: float, sig: int = signal.SIGTERM) -> None:
        await self.inner.stop(child, grace, sig)

    async def kill(self, child: Child) -> None:
        await self.inner.kill(child)

    def leftovers(self, child: Child) -> list[int]:
        return self.inner.leftovers(child)

    def ghosts(self, home_root: str, owners: set[int]) -> dict[int, str]:
        return self.inner.ghosts(home_root, owners)

    def resident(self, child: Child) -> int:
        return self.inner.resident(child)

    def listen(self, port: int, backlog: int) -> socket.socket:
        return self.inner.listen(port, backlog)

    def recover_listener(self, pid: int, port: int) -> socket.socket | None:
        return self.inner.recover_listener(pid, port)

    def is_listening(self, port: int) -> bool:
        return self.inner.is_listening(port)

    def port_holder(self, port: int) -> dict | None:
        return self.inner.port_holder(port)

    def listener_is_ours(self, child: Child, port: int) -> bool:
        return self.inner.listener_is_ours(child, port)

    def helper_pids(self) -> set[int]:
        return self.inner.helper_pids()

    async def sync_log(self, path: Path) -> None:
        await self.inner.sync_log(path)

    def log_stats(self) -> dict | None:
        return self.inner.log_stats()

    def log_pump_pid(self) -> int | None:
        return self.inner.log_pump_pid()

    def log_pump_health(self) -> dict | None:
        return self.inner.log_pump_health()

    def ownership(self) -> dict | None:
        return self.inner.ownership()

    def status(self) -> dict | None:
        return self.inner.status()
