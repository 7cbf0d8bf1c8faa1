"""Issue 22: an agent is recycled between tasks, never in the middle of one: after
``max_tasks`` tasks, or once it has grown past ``restart_above_memory`` (PM2's
max_memory_restart). Recorded as an event with the reason and what was measured."""

from __future__ import annotations

import json
import tomllib

import pytest

from tests.harness import REPO, wait_for

pytestmark = pytest.mark.integration


def test_agents_are_recycled_between_tasks(mesh_factory):
    services = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
    services["programmer-1"]["max_tasks"] = 1
    services["programmer-2"]["restart_above_memory"] = "2MB"  # any Python process is larger
    mesh = mesh_factory(services=services)
    mesh.up()
    before = {n: mesh.service(n)["incarnation"] for n in ("programmer-1", "programmer-2")}
    code, body = mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": "build it"})
    assert code == 202, body
    run = wait_for(lambda: (r := mesh.http("GET", mesh.url("gateway") + f"/runs/{body['run_id']}")[1])
                   and r["status"] != "running" and r, 120, "the run to finish")
    assert run["status"] == "done", run  # no task was cut short by a recycle
    def recycles() -> list[dict] | None:
        rows = mesh.rows("SELECT agent, incarnation, payload FROM events WHERE kind = 'recycled' ORDER BY id")
        return rows if {r["agent"] for r in rows} >= {"programmer-1", "programmer-2"} else None

    rows = wait_for(recycles, 30, "a recycle of each programmer")
    first = {r["agent"]: (r["incarnation"], json.loads(r["payload"])) for r in reversed(rows)}
    assert first["programmer-1"][0] == before["programmer-1"]
    assert first["programmer-1"][1]["reason"] == "max_tasks" and first["programmer-1"][1]["tasks"] >= 1
    assert first["programmer-2"][1]["reason"] == "memory_recycle"
    assert first["programmer-2"][1]["rss"] > 2_000_000
    for name in ("programmer-1", "programmer-2"):
        wait_for(lambda n=name: (s := mesh.service(n))["state"] == "running" and s["incarnation"] != before[n], 30,
                 f"{name} back")
