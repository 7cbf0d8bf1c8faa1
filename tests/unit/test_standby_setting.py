"""``standby`` per service: None follows ``[mesh] standbys``, true or false says so for that
agent alone; a command cannot have one (its next start is prepared by a gate)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from tron.common.config import ConfigError, parse_mesh
from tron.services.daemon.spawner import LocalSpawner, SpawnSpec


def service(text: str):
    return parse_mesh(tomllib.loads(f"[services.s]\nport = 7000\n{text}\n")).services["s"]


def test_the_setting_is_read_for_agents_and_refused_for_a_command():
    assert service('role = "programmer"').standby is None
    assert service('role = "programmer"\nstandby = false').standby is False
    assert service('agent = "pkg.mod:Mine"\nstandby = true').standby is True
    with pytest.raises(ConfigError, match="standby is for agents"):
        service('command = ["x"]\nstandby = true')


@pytest.mark.parametrize("mesh, service_says, wanted", [
    (True, None, True), (True, False, False), (True, True, True),
    (False, None, False), (False, True, True), (False, False, False),
])
def test_the_service_says_and_otherwise_the_mesh(mesh, service_says, wanted):
    spawner = SimpleNamespace(standbys=mesh, cgroups=object(), forkserver=object())
    spec = SpawnSpec(name="s", incarnation="i-1", argv=["x"], env={}, cwd=Path("/"), log=Path("/l"),
                     module="tron.services.programmer", standby=service_says)
    assert LocalSpawner._standby_for(spawner, spec) is wanted


def test_no_standby_without_what_it_needs_whatever_the_service_says():
    spec = SpawnSpec(name="s", incarnation="i-1", argv=["x"], env={}, cwd=Path("/"), log=Path("/l"),
                     module="tron.services.programmer", standby=True)
    for missing in ({"cgroups": None}, {"forkserver": None}):
        spawner = SimpleNamespace(**{"standbys": True, "cgroups": object(), "forkserver": object(), **missing})
        assert not LocalSpawner._standby_for(spawner, spec)
    plain = SpawnSpec(name="s", incarnation="i-1", argv=["x"], env={}, cwd=Path("/"), log=Path("/l"), standby=True)
    assert not LocalSpawner._standby_for(SimpleNamespace(standbys=True, cgroups=object(), forkserver=object()), plain)
