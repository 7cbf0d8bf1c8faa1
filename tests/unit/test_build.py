"""``build_daemon``: the one factory that chooses a daemon's parts. The parts it makes
from the mesh file (nothing is started: no process, only the home's lock and registry
file), the fault wrapper only when its variable is set, and a second daemon refused
before it touches the registry."""

from __future__ import annotations

import asyncio

import pytest

from tron.common.config import parse_mesh
from tron.common.paths import Home
from tron.registry.journal import JournaledStore
from tron.registry.memory import MemoryStore
from tron.services.daemon.build import build_daemon
from tron.services.daemon.fault_injection import DIE_AFTER_FORK, DieAfterFork
from tron.services.daemon.lock import HomeLock, StartError
from tron.services.daemon.spawner import LocalSpawner, SpawnSpec
from tron.services.daemon.stub_spawner import StubSpawner


def mesh(**extra):
    return parse_mesh({"mesh": {"daemon_port": 7000}, "services": {"web": {"command": ["web-server"], "port": 7001}},
                       **extra})


@pytest.fixture
def home(tmp_path):
    return Home(tmp_path / "home")


def test_a_local_mesh_gets_the_local_spawner_and_the_journaled_registry(home, monkeypatch):
    monkeypatch.delenv(DIE_AFTER_FORK, raising=False)
    d = build_daemon(mesh(), home)
    try:
        assert isinstance(d.spawner, LocalSpawner) and d.cluster is None
        assert isinstance(d.store, JournaledStore)
        assert d.lock.held and home.registry_db.exists()
    finally:
        d.lock.release()


def test_the_fault_wrapper_is_installed_only_when_its_variable_is_set(home, monkeypatch):
    monkeypatch.setenv(DIE_AFTER_FORK, "web")
    d = build_daemon(mesh(), home)
    try:
        assert isinstance(d.spawner, DieAfterFork) and isinstance(d.spawner.inner, LocalSpawner)
        assert d.spawner.victim == "web"
    finally:
        d.lock.release()


def test_a_ray_mesh_gets_one_object_as_spawner_and_cluster_control(home, monkeypatch):
    from tron.services.daemon.ray_spawner import RaySpawner

    monkeypatch.delenv(DIE_AFTER_FORK, raising=False)
    d = build_daemon(mesh(cluster={"engine": "ray"}), home)
    try:
        assert isinstance(d.spawner, RaySpawner) and d.cluster is d.spawner
        assert d.spawner.relays is d.access  # the node agents' relay credentials are the daemon's
    finally:
        d.lock.release()


def test_a_second_daemon_is_refused_before_it_touches_the_registry(home):
    held = HomeLock(home)
    held.acquire()
    try:
        with pytest.raises(StartError, match="another tron daemon"):
            build_daemon(mesh(), home)
        assert not home.registry_db.exists()
    finally:
        held.release()


def test_a_tests_own_parts_are_used_as_given(home):
    store, spawner = MemoryStore(), StubSpawner()
    d = build_daemon(mesh(), home, store=store, spawner=spawner, monitor_thread=False)
    assert d.store is store and d.spawner is spawner and d.cluster is None
    assert not d.lock.held and not home.registry_db.exists()  # the lock is taken at start()


async def test_the_fault_wrapper_passes_every_other_spawn_through(tmp_path):
    inner = StubSpawner()
    wrapped = DieAfterFork(inner, "victim")
    exits = []
    await wrapped.start(exits.append)
    child = await wrapped.spawn(SpawnSpec(name="web", incarnation="i-1", argv=["x"], env={}, cwd=tmp_path,
                                          log=tmp_path / "web.log"))
    assert inner.spawned[-1].name == "web" and child.alive
    inner.crash(child, code=1)
    await wrapped.stop(child, grace=0.1)
    for _ in range(10):
        if exits:
            break
        await asyncio.sleep(0)
    assert exits == [child]
