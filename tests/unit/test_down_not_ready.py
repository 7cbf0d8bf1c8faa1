"""A service that has no process (in backoff after a crash, or stopped by an operator) is
neither ready nor started: `/status` says `ready: false`, and a service that
`depends_on` it ("ready" or "started") waits for its next healthy incarnation."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tests.unit.test_daemon import Rig, mesh
from tron.common.states import ServiceState


@pytest.fixture
async def deps(tmp_path):
    r = Rig(tmp_path, mesh(db={"command": ["db-server"], "port": 7001}))
    await r.start()
    yield r
    await r.stop()


def row(rig, name):
    return next(s for s in rig.daemon.sup.rows() if s["name"] == name)


async def _in_backoff(rig, name):
    await rig.crash(name)  # the first restart is at once
    await rig.crash(name)  # an unstable failure: restarted after backoff_initial (0.5 s)
    assert rig.svc(name).state == ServiceState.BACKOFF and row(rig, name)["pid"] is None


async def test_a_service_in_backoff_is_not_ready(deps):
    assert row(deps, "db")["ready"] is True
    await _in_backoff(deps, "db")
    assert row(deps, "db")["ready"] is False
    await deps.until_running("db")
    assert row(deps, "db")["ready"] is True


async def test_an_operator_stopped_service_is_not_ready(deps):
    await deps.daemon.operators.act("stop", "db", actor="ops", reason="maintenance")
    assert row(deps, "db")["state"] == "stopped" and row(deps, "db")["ready"] is False


@pytest.mark.parametrize("condition", ["ready", "started"])
async def test_a_dependant_waits_while_its_dependency_is_in_backoff(deps, condition):
    await _in_backoff(deps, "db")
    # a service added by a reload with depends_on = { db = CONDITION } (the bring-up waits the same way)
    dependant = SimpleNamespace(name="app", spec=SimpleNamespace(depends_on={"db": condition}))
    waiting = asyncio.ensure_future(deps.daemon._dependencies_met(dependant))
    await deps.settle()
    assert not waiting.done(), "the dependency has no process, yet it counted as met"
    await deps.until_running("db")
    await deps.advance(0.25)
    assert waiting.done() and waiting.exception() is None
    assert not await deps.store.events(kind="dependency_not_met")
