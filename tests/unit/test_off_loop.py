"""``off_loop``: work off the event loop (an SDK import), awaited like ``asyncio.to_thread``,
but never waited for when the process stops: a plain-spawned agent SIGTERMed while its SDK
import ran stayed up until the import ended (``asyncio.run`` joins its executor's threads)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tron.common.providers.client import off_loop


async def test_its_result_and_its_exception_reach_whoever_awaits():
    assert await off_loop(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await off_loop(divmod, 1, 0)


STOPS_WHILE_IT_RUNS = """
import asyncio, time
from tron.common.providers.client import off_loop

async def main():
    off_loop(time.sleep, 120)  # an import that has a long way to go
    await asyncio.sleep(0.05)

asyncio.run(main())
print("stopped")
"""


def test_a_process_stops_without_waiting_for_it():
    # With asyncio.to_thread the interpreter would wait the 120 s out: the bound is the test.
    proc = subprocess.run([sys.executable, "-c", STOPS_WHILE_IT_RUNS], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == "stopped\n", proc.stderr
