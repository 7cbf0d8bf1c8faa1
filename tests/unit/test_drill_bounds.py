"""How long a single-fault drill waits for the service to come back (scripts/drills.py):
the recovery bound, plus how long the fault takes to be noticed at the earliest. The
runaway drill on the shipped policy (progress_timeout 60 s, recovery bound 53 s) gave up
before TRON could catch the runaway, said FAIL, and left it running."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tron.common.config import Policy
from tron.scripts.drills import Runner
from tests.unit.test_daemon import mesh


class Waited(Exception):
    """Raised by the stub of Runner.back: the drill got as far as waiting."""


def runner() -> tuple[Runner, list[float]]:
    config = mesh()
    r = Runner.__new__(Runner)  # no mesh: only what the drill waits for is looked at
    r.config, r.policy, r._reached = config, Policy(), {}

    def try_call(method, url, body=None, **kw):  # the daemon's and the agent's answers to the fault
        return (200, {"pid": 4242, "node": None, "sent_mono": 0}) if url.endswith("/signal") else \
            (202, {"task_id": "drill-runaway-1"})

    r.mesh = SimpleNamespace(try_call=try_call, daemon_url="http://127.0.0.1:1", url=lambda name: f"http://127.0.0.1/{name}")
    r.service = lambda name: {"state": "running", "pid": 4242, "incarnation": "i-1", "name": name}
    r.label = lambda value: None
    waits: list[float] = []

    def back(name, old_incarnation, timeout):
        waits.append(timeout)
        raise Waited()

    r.back = back
    return r, waits


@pytest.mark.parametrize("drill, noticed_after", [
    ("runaway", lambda p: p.progress_timeout),  # only caught once its progress has stood still that long
    ("kill", lambda p: 0.0),  # seen at once (its pidfd); the bound covers the rest
])
def test_a_drill_waits_for_its_fault_to_be_noticed_then_the_recovery_bound(drill, noticed_after):
    r, waits = runner()
    with pytest.raises(Waited):
        getattr(r, drill)("worker")
    assert waits == [noticed_after(r.policy) + r.recovery_bound()]
    assert waits[0] > noticed_after(r.policy) + r.policy.beat_timeout  # the shipped policy: 60 + 53 s for a runaway


def test_a_drill_on_a_replicated_service_names_the_replicas_to_drill():
    from tron.common.config import parse_mesh
    from tron.scripts.drills import DrillError

    r = Runner.__new__(Runner)
    r.config = parse_mesh({"services": {"web": {"command": ["srv"], "port": 7401, "socket": "inherit",
                                                "replicas": 3}}})
    with pytest.raises(DrillError, match=r"web has replicas: drill one of them \(web.1, web.2, web.3\)"):
        r.service("web")
    with pytest.raises(DrillError, match="no service named 'nope'"):
        r.service("nope")
