"""common/service.py: an agent's SIGTERM and SIGINT set its stop event, on its loop, and a
signal that comes after the loop closed (a second SIGTERM while it exits) raises nothing."""

import asyncio
import os
import signal

import pytest

from tron.common.service import _stop_on_signals


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_signal_sets_stop_on_the_loop_and_a_late_one_raises_nothing(restore_handlers, sig):
    loop = asyncio.new_event_loop()
    try:
        stop = asyncio.Event()

        async def wait_for_stop() -> bool:
            _stop_on_signals(asyncio.get_running_loop(), stop)
            os.kill(os.getpid(), sig)
            await asyncio.wait_for(stop.wait(), 5)
            return stop.is_set()

        assert loop.run_until_complete(wait_for_stop())
    finally:
        loop.close()
    os.kill(os.getpid(), sig)  # the loop is closed: the handler must not raise into this frame
    signal.getsignal(sig)  # (the handler ran at the last bytecode boundary, here)
