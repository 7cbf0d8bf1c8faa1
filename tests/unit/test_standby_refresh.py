"""Standbys forked before the fork server had its SDKs (cold) are made again once it has them;
one whose preparation ends after its service was stopped is not (spawner.py
``LocalSpawner._refresh_standbys``, ``_prepared``)."""

from __future__ import annotations

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
    monkeypatch.setattr(sp, "_prepare_soon", lambda name, limits, standby=None: prepared.append((name, standby)))
    sp.ended, sp.prepared = ended, prepared  # type: ignore[attr-defined]
    return sp


def test_the_warm_server_makes_every_cold_standby_again_and_nothing_else(spawner):
    spawner._gates = {"p1": gate("p1", cold=True), "p2": gate("p2", cold=False), "web": gate("web", cold=False,
                                                                                              standby=False)}
    spawner.forkserver.on_warm()  # the fork server says it has its SDKs
    assert spawner.ended == ["p1"] and spawner.prepared == [("p1", "p1.toml")]
    assert set(spawner._gates) == {"p2", "web"}


@pytest.mark.parametrize("released, again", [(False, True), (True, False)])
def test_a_standby_that_came_out_cold_is_made_again_unless_its_service_was_stopped(spawner, released, again):
    spawner._refresh_after.add("p1")
    if released:
        spawner._released.add("p1")
    spawner._prepared("p1", None, "p1.toml")
    assert spawner.prepared == ([("p1", "p1.toml")] if again else [])
    assert "p1" not in spawner._refresh_after
