"""A node agent's beat relay sends each interval's batch on its own (beat_relay.py
``MAX_IN_FLIGHT``): one stuck in TCP's retransmissions on a lossy link must not hold back the
next, which renews the node's lease; a late batch's verdicts do not undo a later one's; and
no more than MAX_IN_FLIGHT batches are on their way at once."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from tron.services.daemon.beat_relay import MAX_IN_FLIGHT, BeatRelay


async def fake_daemon(hold: asyncio.Event, holding: int):
    """A daemon whose first ``holding`` POST /beats wait until ``hold`` is set."""
    seen = {"n": 0}

    async def beats(request: web.Request) -> web.Response:
        seen["n"] += 1
        n = seen["n"]
        await request.read()
        if n <= holding:
            await hold.wait()
        return web.json_response({"verdicts": [], "refused": [], "interval": 0.05, "n": n})

    app = web.Application()
    app.router.add_post("/beats", beats)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", seen


async def wait_until(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_stuck_batch_does_not_hold_back_the_next_lease_renewal():
    hold = asyncio.Event()
    runner, url, seen = await fake_daemon(hold, holding=1)
    relay = BeatRelay(url, "relay-token", 0.05)
    taken: list[float] = []
    relay.on_taken = taken.append  # the fence: a batch with no beat in it still renews
    await relay.start()
    try:
        await wait_until(lambda: len(taken) >= 3)  # renewed while the first batch is still stuck
        assert seen["n"] >= 4 and not hold.is_set()
        assert len(relay._flushing) >= 1  # the stuck one, on its own connection
    finally:
        hold.set()
        await relay.close()
        await runner.cleanup()
    assert not relay._flushing


async def test_no_more_than_max_in_flight_batches_are_on_their_way():
    hold = asyncio.Event()
    runner, url, seen = await fake_daemon(hold, holding=10 ** 6)  # the daemon takes nothing
    relay = BeatRelay(url, "relay-token", 0.02)
    relay.on_taken = lambda _: None
    await relay.start()
    try:
        await wait_until(lambda: seen["n"] >= MAX_IN_FLIGHT)
        await asyncio.sleep(0.2)  # ten more intervals
        assert seen["n"] == MAX_IN_FLIGHT and len(relay._flushing) == MAX_IN_FLIGHT
    finally:
        hold.set()
        await relay.close()
        await runner.cleanup()


def test_a_late_batch_does_not_undo_a_later_ones_verdicts():
    from tron.common.models import Beat

    relay = BeatRelay("http://127.0.0.1:9", "t", 1.0)
    b = Beat(service="w", incarnation="i-1", pid=1, seq=1)
    refused = {"refused": [{"index": 0, "status": 409, "error": "stale", "verdict": "stale_incarnation"}]}
    relay._record([b], {"interval": 1.0}, 2)  # the later batch: accepted
    relay._record([b], refused, 1)  # the earlier one, answered after it
    assert ("w", "i-1") not in relay._verdicts
    relay._record([b], refused, 3)
    assert relay._verdicts[("w", "i-1")][0] == 409
