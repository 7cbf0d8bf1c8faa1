"""The log pump is supervised by its daemon (logpump.py ``LogPumpClient``): a pump that dies
is started again at once and handed the pipes the daemon holds, so a program writing to its
log never meets a pipe without a reader and what it wrote meanwhile reaches the file. And a
line without its newline ("Password: ") is written out once it has waited long enough."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tron.services.daemon.logpump import (PARTIAL_IDLE, PARTIAL_MAX_AGE, LogPumpClient, Pump, partial_due,
                                          restart_delay)


@pytest.mark.parametrize("deaths, now, delay", [
    ([100.0], 100.0, 0.0),  # the first death: at once
    ([98.0, 99.0, 100.0], 100.0, 0.0),  # three in the window: still at once
    ([97.0, 98.0, 99.0, 100.0], 100.0, 0.5),  # a fourth: slowed down
    ([96.0, 97.0, 98.0, 99.0, 100.0], 100.0, 1.0),
    ([float(t) for t in range(80, 101)], 100.0, 5.0),  # capped
    ([50.0, 60.0, 70.0, 80.0, 100.0], 100.0, 0.0),  # old deaths do not count
])
def test_restart_delay(deaths, now, delay):
    assert restart_delay(deaths, now) == delay


@pytest.mark.parametrize("first, last, now, due", [
    (10.0, 10.0, 10.0, False),
    (10.0, 10.0, 10.0 + PARTIAL_IDLE - 0.01, False),
    (10.0, 10.0, 10.0 + PARTIAL_IDLE, True),  # no byte for PARTIAL_IDLE
    (10.0, 10.9, 11.5, False),  # bytes still coming
    (10.0, 10.0 + PARTIAL_MAX_AGE - 0.1, 10.0 + PARTIAL_MAX_AGE, True),  # trickling for too long
])
def test_partial_due(first, last, now, due):
    assert partial_due(first, last, now) is due


def pumped(tmp_path: Path) -> tuple[Pump, int, Path]:
    pump = Pump(str(tmp_path / "sock"), tmp_path, min_free=0)
    r, w = os.pipe()
    log = tmp_path / "svc.log"
    pump.attach({"path": str(log), "max_bytes": 10**6, "backups": 1}, r)
    return pump, w, log


def text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def test_a_partial_line_is_written_once_nothing_more_came(tmp_path):
    pump, w, log = pumped(tmp_path)
    [pipe] = pump.pipes.values()
    os.write(w, b"Password: ")
    pump.read(pipe, 1000.0, 10.0)
    pump.flush_partials(1000.0, 10.5)
    assert text(log) == ""  # not yet: more may come
    pump.flush_partials(1000.0, 10.0 + PARTIAL_IDLE)
    assert text(log) == "Password: \n"
    os.close(w)


def test_a_line_arriving_in_pieces_is_not_cut(tmp_path):
    pump, w, log = pumped(tmp_path)
    [pipe] = pump.pipes.values()
    for i, (piece, at) in enumerate([(b"ab", 10.0), (b"c", 10.8), (b"d\nef", 11.6)]):
        os.write(w, piece)
        pump.read(pipe, 1000.0, at)
        pump.flush_partials(1000.0, at + 0.7)
    assert text(log) == "abcd\n"  # "ef" came at 11.6: held
    pump.flush_partials(1000.0, 11.6 + PARTIAL_IDLE)
    assert text(log) == "abcd\nef\n"
    os.close(w)


def test_a_trickling_line_is_written_once_it_is_too_old(tmp_path):
    pump, w, log = pumped(tmp_path)
    [pipe] = pump.pipes.values()
    at = 10.0
    while at < 10.0 + PARTIAL_MAX_AGE:
        os.write(w, b".")
        pump.read(pipe, 1000.0, at)
        pump.flush_partials(1000.0, at)
        at += 0.5
    pump.flush_partials(1000.0, 10.0 + PARTIAL_MAX_AGE)
    assert text(log) == "." * int(PARTIAL_MAX_AGE / 0.5) + "\n"
    os.close(w)


# -- a real pump, killed ----------------------------------------------------------------------


@pytest.fixture
def home():
    path = Path(tempfile.mkdtemp(prefix="lp-", dir="/tmp"))  # a unix socket path must be short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def client_for(home: Path) -> LogPumpClient:
    return LogPumpClient(home / "pump.sock", home / "pump.log", home / "logs", dict(os.environ), 0)


async def until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := predicate():
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_a_killed_pump_is_started_again_and_its_pipes_lose_nothing(home):
    client = client_for(home)
    await client.start()
    log = home / "logs" / "svc.log"
    w = await client.pipe_for(log, max_bytes=10**6, backups=1, rate_limit=None)
    try:
        assert w is not None and client.pid is not None
        os.write(w, b"before\n")
        await until(lambda: "before" in text(log), 5, "the first line")
        old = client.pid
        os.kill(old, signal.SIGKILL)
        await until(lambda: gone(old), 5, "the pump gone")
        os.write(w, b"meanwhile\n")  # no EPIPE: the daemon holds the read end
        new = await until(lambda: client.pid not in (None, old) and client.pid, 3, "a new pump")
        os.write(w, b"after\n")
        await until(lambda: text(log) == "before\nmeanwhile\nafter\n", 5, "every line, in order, once")
        assert client.health() | {"last_death": None} == {"state": "up", "pid": new, "died": 1, "restarts": 1,
                                                            "held_pipes": 1, "last_death": None}
        assert client.health()["last_death"]["pid"] == old
        assert client.health()["last_death"]["status"] == -signal.SIGKILL
    finally:
        if w is not None:
            os.close(w)
        await client.stop()
    assert client.proc is None and not psutil.pid_exists(new) or gone(new)


async def test_a_pump_found_by_a_new_daemon_hands_it_its_pipes(home):
    first = client_for(home)
    await first.start()
    log = home / "logs" / "svc.log"
    w = await first.pipe_for(log, max_bytes=10**6, backups=1, rate_limit=None)
    assert w is not None
    # The first daemon is killed: it watches nothing and holds nothing any more.
    first._unwatch()
    for held in first.held.values():
        os.close(held.fd)
    first.held.clear()
    pump = first.proc
    second = client_for(home)
    try:
        await second.start()
        assert second.pid == pump.pid and len(second.held) == 1
        pump.kill()
        pump.wait()  # (the first daemon's child: reaped here)
        os.write(w, b"meanwhile\n")
        await until(lambda: second.pid not in (None, pump.pid), 3, "a new pump")
        await until(lambda: text(log) == "meanwhile\n", 5, "the line written while no pump ran")
    finally:
        os.close(w)
        await second.stop()


def test_the_pump_state_takes_only_its_edges(home):
    from tron.services.daemon.logpump import PumpState

    client = client_for(home)
    with pytest.raises(RuntimeError, match="no edge down -> restarting"):
        client._become(PumpState.RESTARTING, None)
    client._become(PumpState.STOPPED, None)
    with pytest.raises(RuntimeError):
        client._become(PumpState.UP, 1)


async def test_a_pipe_whose_program_is_gone_is_let_go_at_the_next_look(home):
    """A stopped service's pipe has no writer left: the daemon's copy of its read end is
    closed at the housekeeping's next look (health()), not kept until some other spawn."""
    client = client_for(home)
    await client.start()
    try:
        w = await client.pipe_for(home / "logs" / "svc.log", max_bytes=10**6, backups=1, rate_limit=None)
        assert w is not None and client.health()["held_pipes"] == 1
        os.close(w)  # the program exited
        assert client.health()["held_pipes"] == 0
    finally:
        await client.stop()


async def test_the_read_ends_a_new_daemon_takes_from_a_pump_are_close_on_exec(home):
    first = client_for(home)
    await first.start()
    w = await first.pipe_for(home / "logs" / "svc.log", max_bytes=10**6, backups=1, rate_limit=None)
    first._unwatch()
    for held in first.held.values():
        os.close(held.fd)
    first.held.clear()
    second = client_for(home)
    try:
        await second.start()
        assert second.held and not any(os.get_inheritable(fd) for fd in second.held), second.held
    finally:
        os.close(w)
        # The pump is this process's child (the first client started it): reaped here as it exits,
        # as a dead daemon's pump is by its subreaper; a zombie held second.stop() for its whole 5 s.
        await asyncio.gather(second.stop(), asyncio.to_thread(first.proc.wait, 30))
