"""Standbys forked before the fork server had its SDKs (cold) are made again once it has them;
one forked cold as the server turned warm is forked again at once, and kept only if its
service was not stopped meanwhile (spawner.py ``LocalSpawner._refresh_standbys``,
``_prepare_standby``)."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest

from tron.services.daemon.spawner import Gate, LocalSpawner, ForkServerClient


def gate(name: str, *, cold: bool, standby: bool = True) -> Gate:
    a, _ = socket.socketpair()
    popen = None if standby else SimpleNamespace(pid=2)  # a program's gate.py
    return Gate(name, "i-1", None, None, popen, a, pid=1, config=f"{name}.toml", cold=cold)  # type: ignore[arg-type]


@pytest.fixture
def spawner(monkeypatch):
    fs = ForkServerClient("/nonexistent/forkserver.sock", "/dev/null", "/", {})
    sp = LocalSpawner(forkserver=fs)
    ended, prepared = [], []
    monkeypatch.setattr(sp, "_background_end", lambda g: ended.append(g.name))
    monkeypatch.setattr(sp, "_prepare_soon",
                        lambda name, limits, standby=None, logfile=None: prepared.append((name, standby)))
    sp.ended, sp.prepared = ended, prepared  # type: ignore[attr-defined]
    return sp


def test_the_warm_server_makes_every_cold_standby_again_and_nothing_else(spawner):
    spawner._gates = {"p1": gate("p1", cold=True), "p2": gate("p2", cold=False), "web": gate("web", cold=False,
                                                                                              standby=False)}
    spawner.forkserver.on_warm()  # the fork server says it has its SDKs
    assert spawner.ended == ["p1"] and spawner.prepared == [("p1", "p1.toml")]
    assert set(spawner._gates) == {"p2", "web"}


@pytest.mark.parametrize("released, kept", [(False, True), (True, False)])
async def test_a_standby_forked_cold_as_the_server_turns_warm_is_forked_again_unless_its_service_stopped(
        monkeypatch, released, kept):
    fs = ForkServerClient("/nonexistent/forkserver.sock", "/dev/null", "/", {})
    fs.ready = True
    sp = LocalSpawner(forkserver=fs)
    forked_warm, ended = [], []

    async def next_group(name, limits):
        return f"i-{len(forked_warm)}", SimpleNamespace(remove=lambda: None, procs_files=lambda: [])

    async def standby(files, config, service=""):
        forked_warm.append(fs.warm)
        fs.warm = True  # the heir takes over while the first one is forked
        return os.getpid(), socket.socketpair()[0]

    async def end_gate(g):
        ended.append(g.cold)

    monkeypatch.setattr(sp, "_next_group", next_group)
    monkeypatch.setattr(fs, "standby", standby)
    monkeypatch.setattr(sp, "_end_gate", end_gate)
    if released:
        sp._released.add("p1")
    await sp._prepare_standby("p1", None, "p1.toml")
    assert forked_warm == [False, True]  # forked again, from the warm server
    if kept:
        assert ended == [True] and sp._gates["p1"].cold is False
    else:  # stopped meanwhile: the warm one is ended too
        assert ended == [True, False] and "p1" not in sp._gates
