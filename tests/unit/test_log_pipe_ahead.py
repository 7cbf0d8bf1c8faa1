"""A gate or standby attaches its next incarnation's log pump pipe when it is made, off the
restart's path (spawner.py ``LocalSpawner._keep``, ``_log_pipe_ahead``): the start uses it
only if it is for that incarnation, that log, those limits and the pump that runs now; any
other pipe is closed and the start asks the pump as before. An ended gate closes its pipe."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from tron.services.daemon.spawner import Gate, LocalSpawner, SpawnSpec

LOG = Path("/tmp/x/programmer-1.log")
LIMITS = {"max_bytes": 1000, "backups": 2, "rate_limit": None}


class Pump:
    def __init__(self) -> None:
        self.pid = 4242
        self.asked: list[tuple[str, dict]] = []

    async def pipe_for(self, path: Path, **limits) -> int:
        self.asked.append((str(path), limits))
        r, w = os.pipe()
        os.close(r)
        return w


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def spec(incarnation: str = "i-1", limits: dict | None = None) -> SpawnSpec:
    return SpawnSpec("programmer-1", incarnation, [], {}, Path("/"), LOG, log_limits=limits or LIMITS)


@pytest.fixture
def kept():
    pump = Pump()
    sp = LocalSpawner(logs=pump)  # type: ignore[arg-type]
    a, _ = socket.socketpair()
    g = Gate("programmer-1", "i-1", SimpleNamespace(kill=lambda: None, remove=lambda: True), None,  # type: ignore[arg-type]
             None, a, pid=1)
    return sp, pump, g


async def test_a_kept_gate_holds_a_pipe_attached_for_its_log(kept):
    sp, pump, g = kept
    await sp._keep(g, (LOG, LIMITS))
    assert pump.asked == [(str(LOG), LIMITS)] and g.log_pipe is not None and is_open(g.log_pipe)
    assert sp._gates["programmer-1"] is g


@pytest.mark.parametrize("case, start, pump_pid, used", [
    ("the start it was made for", spec(), 4242, True),
    ("the pump was started again since", spec(), 5151, False),
    ("the log's limits changed (a reload)", spec(limits={**LIMITS, "backups": 9}), 4242, False),
    ("another incarnation's start", spec("i-2"), 4242, False),
])
async def test_a_start_uses_the_pipe_only_when_it_is_still_right(kept, case, start, pump_pid, used):
    sp, pump, g = kept
    await sp._keep(g, (LOG, LIMITS))
    fd = g.log_pipe
    sp._claimed["programmer-1"] = sp._gates.pop("programmer-1")
    pump.pid = pump_pid
    got = sp._log_pipe_ahead(start)
    if used:
        assert got == fd and is_open(fd), case
    else:
        assert got is None, case
        assert start.incarnation != g.incarnation or not is_open(fd), f"{case}: a wrong pipe is closed"
    if got is not None:
        os.close(got)


async def test_an_ended_gate_closes_its_pipe(kept, monkeypatch):
    sp, pump, g = kept
    await sp._keep(g, (LOG, LIMITS))
    fd = g.log_pipe
    monkeypatch.setattr("tron.services.daemon.spawner.wait_empty", lambda group, timeout: True)
    g.pidfd = None
    await sp._end_gate(g)
    assert g.log_pipe is None and not is_open(fd)
