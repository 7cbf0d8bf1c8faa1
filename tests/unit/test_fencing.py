"""Issue 27, item 2: the node agent's fence (services/daemon/fencing.py) with a clock the test
moves by hand, and the partition drill's refusal to cut a link this machine lives on
(scripts/partition.py)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from tron.scripts.client import wait_for
from tron.scripts.partition import PartitionError, link_to
from tron.services.daemon.fencing import NodeFence


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_lapsed_lease_ends_the_children_once_and_refuses_spawns_until_renewed():
    clock, ended = FakeClock(), []

    async def enforce() -> int:
        ended.append(clock.now)
        return 2

    fence = NodeFence(1.75, enforce, clock)
    fence.start()  # held from set-up
    try:
        assert fence.refusal() is None and fence.status()["held"]
        clock.now += 1.0
        fence.renewed(clock.now - 0.1)  # a batch sent 0.1 s ago was taken: runs from its sending
        clock.now += 1.6
        assert fence.refusal() is None
        clock.now += 0.1  # 1.75 s after the last batch was sent: lapsed
        assert "lease from the daemon lapsed" in fence.refusal()
        await asyncio.to_thread(wait_for, lambda: ended, 10, "the watchdog to end the children")
        assert fence.status() | {"remaining": 0.0} == {"duration": 1.75, "held": False, "remaining": 0.0,
                                                        "lapses": 1, "ended": 2}
        clock.now += 5.0
        await asyncio.sleep(0.2)  # several watchdog rounds: still one enforcement for the one lapse
        assert len(ended) == 1
        fence.renewed(clock.now)  # the partition healed
        assert fence.refusal() is None
    finally:
        await fence.close()


async def test_an_enforcement_that_fails_keeps_the_watchdog_running():
    clock = FakeClock()
    calls = []

    async def enforce() -> int:
        calls.append(clock.now)
        raise OSError("kill failed")

    fence = NodeFence(1.0, enforce, clock)
    fence.start()
    try:
        clock.now += 2.0
        await asyncio.to_thread(wait_for, lambda: calls, 10, "the first enforcement")
        fence.renewed(clock.now)
        clock.now += 2.0
        await asyncio.to_thread(wait_for, lambda: len(calls) == 2, 10, "the next lapse enforced too")
    finally:
        await fence.close()


async def test_a_refused_connection_holds_the_lease_on_but_never_revives_a_lapsed_one():
    """Connection refused: the daemon's machine answers and no daemon listens (it is being
    restarted, and will adopt): no partition, so the children go on. After a lapse, only a
    batch taken brings the lease back."""
    clock = FakeClock()

    async def enforce() -> int:
        return 0

    fence = NodeFence(1.0, enforce, clock)
    fence.start()
    try:
        for _ in range(5):  # 5 s of a daemon down, refusing
            clock.now += 0.9
            fence.daemon_down(clock.now)
            assert fence.refusal() is None
        clock.now += 1.5  # then silence (a partition): lapsed
        assert fence.refusal() is not None
        fence.daemon_down(clock.now)
        assert fence.refusal() is not None
        fence.renewed(clock.now)
        assert fence.refusal() is None
    finally:
        await fence.close()


@pytest.mark.skipif(shutil.which("ip") is None, reason="no iproute2: `ip route get` cannot be asked")
def test_the_partition_drill_refuses_to_cut_loopback():
    with pytest.raises(PartitionError, match="loopback"):
        link_to("127.0.0.1")
    with pytest.raises(PartitionError, match="no route|not a valid|invalid|Error"):
        link_to("not-an-address")
