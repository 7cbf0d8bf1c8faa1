"""Issue 22: an agent that grows past ``restart_above_memory`` in the middle of a long task
is recycled right after that task's next checkpoint, not only between tasks: the new
incarnation resumes the task from that checkpoint (not from the start), the task ends
done, and the recycle is recorded as ``memory_recycle``, not as a failure of the task or
of the service (no alert, no retry_history row)."""

from __future__ import annotations

import json

import pytest

from tests.harness import wait_for
from tests.integration.test_own_agents import ended, run_task

pytestmark = pytest.mark.integration

STEP_BYTES = 300_000_000
# A forked agent's own resident size is ~110 MB here (pages shared with the fork server count):
# with one step's memory it is under the limit (if under 250 MB), with two always over.
LIMIT = "550MB"

GROWING_AGENT = f'''
import asyncio

from tron.sdk import Agent, Task

HELD = []  # what this incarnation allocated: it only grows


class Growing(Agent):
    """Three steps; each one keeps {STEP_BYTES} more bytes resident, then takes a second.
    Each output names the incarnation that made it."""

    role = "growing"

    async def work(self, task: Task) -> str:
        out = ""
        for n in range(1, 4):
            async def produce(previous, n=n):
                HELD.append(b"m" * {STEP_BYTES})  # written, so resident, not lazily zero pages
                await asyncio.sleep(1.0)
                return (previous + " | " if previous else "") + f"step{{n}}@{{self.incarnation}}"
            out = await self.step(task, n, f"s{{n}}", produce, total=3)
        return out
'''


def test_an_agent_over_its_memory_mid_task_is_recycled_at_a_checkpoint_and_resumes_from_it(mesh_factory, tmp_path):
    pkg = tmp_path / "mine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "growing.py").write_text(GROWING_AGENT)
    services = {"worker": {"agent": "mine.growing:Growing", "port": 6163, "agent_path": [str(tmp_path)],
                           "restart_above_memory": LIMIT}}
    mesh = mesh_factory(services=services)
    mesh.up()
    first = mesh.service("worker")
    run_id, task_id = run_task(mesh, "worker", "grow")
    run = ended(mesh, run_id, timeout=120)
    assert run["status"] == "done", run  # the recycle cut no task short

    [recycled] = mesh.rows("SELECT incarnation, task_id, payload FROM events WHERE kind = 'recycled'")
    payload = json.loads(recycled["payload"])
    assert payload["reason"] == "memory_recycle" and payload["at"] == "checkpoint", payload
    assert recycled["incarnation"] == first["incarnation"] and recycled["task_id"] == task_id
    assert payload["rss"] > payload["restart_above_memory"] == 550_000_000
    at = payload["checkpoint"]
    assert at == 2  # in the middle of the task: the first checkpoint past the limit

    # Resumed from a checkpoint of the first incarnation, not from the start: the steps up to
    # it are the first incarnation's, the rest another's.
    resumed = mesh.rows("SELECT payload FROM events WHERE kind = 'task_resumed' AND task_id = ?", (task_id,))
    assert resumed, "the task was handed to the next incarnation"
    from_step = json.loads(resumed[-1]["payload"])["checkpoint"]
    assert from_step >= at
    parts = run["result"].split(" | ")
    assert [p.split("@")[0] for p in parts] == ["step1", "step2", "step3"]
    by = [p.split("@")[1] for p in parts]
    assert by[:from_step] == [first["incarnation"]] * from_step
    assert first["incarnation"] not in by[from_step:]

    # A recycle, not a failure: no alert, nothing in retry_history, the old session replaced.
    assert mesh.rows("SELECT reason FROM alerts WHERE agent = 'worker'") == []
    assert mesh.rows("SELECT retry_type FROM retry_history WHERE task_id = ?", (task_id,)) == []
    [old] = mesh.rows("SELECT end_reason FROM sessions WHERE incarnation = ?", (first["incarnation"],))
    assert old["end_reason"] == "replaced:memory_recycle", old
    wait_for(lambda: mesh.service("worker")["state"] == "running", 30, "the worker running again")
