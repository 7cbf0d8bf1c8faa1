"""When the LLM SDKs are imported (issue 24: the SDK warm-up off the path to ready): the fork
server warms up when told the mesh is up, or after a while without a request; an agent it
forked before that imports its SDK at its first call, in a thread, once however many calls
ask at the same time, while its event loop runs on."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tests.unit.test_provider_registry import Echo
from tron.common.providers import client, sdk_ready
from tron.common.providers.base import registered
from tron.services.daemon.forkserver import WARM_UNASKED, _warm_up_in


@pytest.mark.parametrize("now, last_asked, told, waived, due", [
    (100.0, 100.0, False, False, WARM_UNASKED),  # just ready, nothing asked: wait
    (100.0 + WARM_UNASKED, 100.0, False, False, 0.0),  # a while without a request: now
    (103.0, 101.0, False, False, WARM_UNASKED - 2.0),  # a spawn 2 s ago: the wait starts from it
    (100.0, 100.0, True, False, 0.0),  # the daemon said its mesh is up: at once
    (100.0, 99.9, True, False, 0.0),  # ... even right after a spawn
    (100.0 + WARM_UNASKED, 100.0, False, True, None),  # an heir warms up instead: never, however long
    (100.0, 100.0, True, True, 0.0),  # ... unless told after all (the heir could not take over)
])
def test_when_the_fork_server_warms_up(now, last_asked, told, waived, due):
    got = _warm_up_in(now, last_asked, told, waived)
    assert got is None if due is None else got == pytest.approx(due)


class Slow(Echo):
    """A kind whose SDK's warm-up blocks until the test lets it go, and says in which thread
    it ran."""

    name = "slowsdk"
    sdk = "sched"  # an SDK no other test warms up: the warm set is the process's

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.threads: list[int] = []

    def warm_up_call(self, url):
        self.threads.append(threading.get_ident())
        self.gate.wait(30)  # on the event loop, this would stop it: the gate below is never set
        return self._fail()


async def test_a_cold_sdk_is_warmed_up_once_in_a_thread_while_the_loop_runs():
    gate = threading.Event()
    kind = Slow(gate)
    try:
        with registered(kind):
            firsts = [asyncio.ensure_future(sdk_ready("slowsdk")) for _ in range(3)]  # three first calls at once
            for _ in range(20):  # the loop turns while the SDK warms up
                await asyncio.sleep(0)
            assert not any(f.done() for f in firsts)  # each waits for the SDK
            gate.set()
            await asyncio.wait_for(asyncio.gather(*firsts), 30)
            assert kind.threads and threading.get_ident() not in kind.threads
            assert len(kind.threads) == 1  # one import, not one per call: the others waited for it
            assert "sched" in client._warm
            await sdk_ready("slowsdk")  # warm: a set lookup, no thread
            assert len(kind.threads) == 1
    finally:
        client._warm.discard("sched")


async def test_a_warm_sdk_costs_its_first_call_no_thread(monkeypatch):
    def no_thread(*args, **kw):
        raise AssertionError("a thread for an SDK that is warm")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    monkeypatch.setattr(client, "_warm", {"json"})  # Echo's "SDK", as a process forked after the warm-up has it
    with registered(Echo()):
        await sdk_ready("echo")
