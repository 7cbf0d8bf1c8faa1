"""README promises about agents, held against llm-sim's own counters, the registry and /proc:

- `[checks.ROLE]`: a role whose check is off takes the broken answer as its output; a role
  with the check on (the default) retries it in place, as a provider failure;
- `call_llm`'s client has the SDK's retries off (llm-sim receives one request per try the
  ladder records) and an explicit timeout (a call the simulator never answers ends, as a
  `timeout`, and the next try completes the task);
- a Python class of the user's runs forked from the fork server;
- the live tree drawn from a real /status fits 80 columns, a line per service."""

from __future__ import annotations

import psutil
import pytest

from tests.harness import wait_for
from tests.integration.test_forkserver import made_by
from tests.integration.test_own_agents import ended, run_task
from tests.unit.test_live import WIDTH, drawn

pytestmark = pytest.mark.integration

CALLER_AGENT = '''
from tron.sdk import Agent, Task


class Caller(Agent):
    """One direct SDK call through call_llm; the answer's text is the task's result."""

    uses_llm = True

    async def work(self, task: Task) -> str:
        reply = await self.call_llm(task, lambda c: c.messages.create(
            model=self.model, max_tokens=64, messages=[{"role": "user", "content": task.assign.prompt}]))
        return "".join(b.text for b in reply.content if b.type == "text")
'''
REFUSAL = "I can't help with that."  # llm-sim's refusal (services/llm_sim/answers.py)


@pytest.fixture
def agents_mesh(mesh_factory, tmp_path):
    """llm-sim, a built-in programmer whose role turns the refusal check off, and a class
    of the user's (role ``agent``: the default checks); the SDKs' timeout is 2 s."""
    pkg = tmp_path / "mine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "caller.py").write_text(CALLER_AGENT)
    services = {"llm-sim": {"role": "llm_sim", "port": 6190},
                "programmer-1": {"role": "programmer", "port": 6130},
                "caller": {"agent": "mine.caller:Caller", "port": 6162, "agent_path": [str(tmp_path)]}}
    # A busy machine must not add failures of its own to those counted here: 10 s without a
    # beat before a restart (the fast policy's 2 s is a detection test's), and room on the
    # ladder for a try that a starved llm-sim answers after the timeout.
    mesh = mesh_factory(services=services, providers={"timeout": 2.0, "chain": ["anthropic"]},
                        policy={"miss_threshold": 40, "max_restarts": 8})
    with mesh.config.open("a") as f:
        f.write("[checks.programmer]\nrefusal = false\n")
    mesh.up()
    return mesh


def fault(mesh, kind: str, **kw) -> None:
    code, body = mesh.http("PUT", mesh.url("llm-sim") + "/sim/faults/anthropic", {"kind": kind, **kw})
    assert code == 200, body


def sim_counters(mesh) -> dict:
    code, body = mesh.http("GET", mesh.url("llm-sim") + "/sim/faults")
    assert code == 200, body
    return body["providers"]["anthropic"]["counters"]


def tries(mesh, task_id: str) -> list[dict]:
    return mesh.rows("SELECT retry_type, reason, agent_id FROM retry_history WHERE task_id = ? ORDER BY id", (task_id,))


def test_checks_per_role_decide_whether_a_broken_answer_is_a_provider_failure(agents_mesh):
    mesh = agents_mesh
    pids = {n: mesh.service(n)["pid"] for n in ("programmer-1", "caller")}

    # [checks.programmer] refusal = false: the refusal is the draft step's output
    fault(mesh, "refusal", times=1)
    run_id, task_id = run_task(mesh, "programmer-1", "a refusal taken as it is")
    assert ended(mesh, run_id)["status"] == "done"
    [draft] = mesh.rows("SELECT output FROM checkpoints WHERE task_id = ? AND step = 1", (task_id,))
    assert REFUSAL in draft["output"], draft
    assert [t for t in tries(mesh, task_id) if t["reason"] == "refusal"] == []
    assert sim_counters(mesh)["by_kind"] == {"refusal": 1}

    # the caller's role has no [checks] table: [checks.default], refusal on, retried in place
    fault(mesh, "refusal", times=1)
    run_id, task_id = run_task(mesh, "caller", "a refusal refused")
    run = ended(mesh, run_id)
    assert run["status"] == "done" and REFUSAL not in run["result"], run
    got = [(t["retry_type"], t["reason"]) for t in tries(mesh, task_id)]
    assert got[0] == ("provider_retry", "refusal") and {t for t, _ in got} == {"provider_retry"}, got
    assert sim_counters(mesh)["by_kind"] == {"refusal": 2}
    assert {n: mesh.service(n)["pid"] for n in pids} == pids  # a provider failure kills no process


def test_call_llm_has_the_sdks_retries_off_an_explicit_timeout_and_runs_forked(agents_mesh):
    mesh = agents_mesh
    # forked: the daemon says so, and /proc agrees (the fork server's environment block)
    caller = mesh.service("caller")
    [session] = mesh.rows("SELECT mode FROM sessions WHERE incarnation = ?", (caller["incarnation"],))
    server = mesh.status()["fork_server"]
    assert session["mode"] == "fork" and made_by(caller["pid"]) == "fork"
    assert psutil.Process(caller["pid"]).environ() == psutil.Process(server["pid"]).environ()

    # `tron up`'s live tree of this very status: within 80 columns, each service with its pid
    status = mesh.status()
    lines = drawn(status)
    assert all(len(line) <= WIDTH for line in lines), lines
    for s in status["services"]:
        assert any(line.lstrip().startswith(s["name"] + " ") and f" {s['pid']} " in line for line in lines), lines

    # a 500 once: with the SDK's retries on, the SDK would send it again itself and the
    # ladder would see no failure; here the 500 is the ladder's first try on record
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/counters")
    fault(mesh, "error", times=1)
    run_id, task_id = run_task(mesh, "caller", "one error")
    assert ended(mesh, run_id)["status"] == "done"
    retries = tries(mesh, task_id)
    assert retries and retries[0]["reason"] == "api_error", retries  # the 500, seen by the ladder
    assert {t["retry_type"] for t in retries} == {"provider_retry"}, retries
    # no request the ladder did not send: the one that succeeded, and one per try on record
    assert sim_counters(mesh)["requests"] <= 1 + len(retries), (retries, sim_counters(mesh))

    # a request the simulator never answers: the SDK's own timeout (2 s) ends it, and the
    # simulator sees the client leave; the try after it completes the task
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/counters")
    fault(mesh, "hang", times=1)
    run_id, task_id = run_task(mesh, "caller", "one hang")
    assert ended(mesh, run_id, timeout=60)["status"] == "done"
    retries = tries(mesh, task_id)
    assert [(t["retry_type"], t["reason"]) for t in retries][:1] == [("provider_retry", "timeout")], retries
    counters = wait_for(lambda: (c := sim_counters(mesh))["hanging"] == 0 and c, 10, "the hung request to be let go")
    assert counters["requests"] <= 1 + len(retries) and counters["by_kind"] == {"hang": 1}, counters
    assert mesh.service("caller")["pid"] == caller["pid"]
