"""A node agent's fence: its lease (common/lease.py) enforced on its own node.

The node agent's beat relay renews the lease with every batch the daemon takes (the moment
the batch was sent counts). A watchdog on the node agent's loop checks it every
``WATCH`` seconds; when it lapses (the daemon unreachable: a partition, a dead daemon, a
revoked relay credential) the node agent ends every child it runs, at once and whole (their
agents stop claiming, checkpointing and finishing), releases the sockets it held for them,
and refuses spawns until a batch is taken again. The daemon, for its part, starts no
replacement of a lost node's service before that lease has run out (``fence_wait``).

A refused connection is no partition: the daemon's machine answers, and no daemon runs there
to re-place anything (it is being restarted, and the new one adopts what runs here). The lease
is held on then (``daemon_down``), as a killed daemon's children keep serving on one machine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from tron.common.lease import Lease

log = logging.getLogger("tron.fence")

WATCH = 0.05  # seconds between two checks of the lease: the lag of the enforcement


class NodeFence:
    def __init__(self, duration: float, enforce: Callable[[], Awaitable[int]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``enforce()`` ends the node's children and returns how many it ended."""
        self.lease = Lease(duration)
        self.enforce = enforce
        self.clock = clock
        self.lapses = 0  # how many times it was enforced
        self.ended = 0  # children ended by it, in all
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Held from now (the daemon just set the node agent up), watched from now on."""
        self.lease.renew(self.clock())
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def renewed(self, sent_at: float) -> None:
        if self.lease.lapsed_at is not None:
            log.warning("node lease held again after %.2fs without it: spawns are taken again",
                        self.clock() - self.lease.lapsed_at)
        self.lease.renew(sent_at)

    def daemon_down(self, sent_at: float) -> None:
        """The daemon's machine refused the connection (no daemon on its port): the network is
        whole and nobody can re-place this node's services; a daemon started again adopts them.
        The lease is held on, as the daemon's children on one machine outlive it."""
        if self.lease.held(sent_at):
            self.lease.renew(sent_at)

    def refusal(self) -> str | None:
        """Why a spawn is refused now (None: the lease is held)."""
        now = self.clock()
        if self.lease.held(now):
            return None
        return (f"this node's lease from the daemon lapsed {now - (self.lease.expires_at or now):.2f}s ago "
                "(no batch of beats taken: a partition?): no spawn here until it is renewed")

    def status(self) -> dict:
        now = self.clock()
        return {"duration": self.lease.duration, "held": self.lease.held(now),
                "remaining": round(self.lease.remaining(now), 3), "lapses": self.lapses, "ended": self.ended}

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH)
            if not self.lease.lapses(self.clock()):
                continue
            self.lapses += 1
            try:
                ended = await self.enforce()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - the watchdog must outlive one failed enforcement
                log.error("node lease lapsed; ending the children failed: %s", err)
                continue
            self.ended += ended
            log.error("node lease lapsed: %d children ended, their sockets released; spawns refused until the "
                      "daemon takes a batch again", ended)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
