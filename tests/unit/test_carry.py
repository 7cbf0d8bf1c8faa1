"""carry_out: the order of the steps of a ladder decision, the same for every decider."""

from __future__ import annotations

import pytest

from tron.common.carry import CRASH_LOOP, carry_out
from tron.common.ladder import ChildFailed, Escalate, Escalated, Fail, Ignore, Park, Restart, SwitchProvider

FAILED = ChildFailed(alert_id="a-1", service="programmer-1", incarnation="i-1", reason="process_exit", task_id="t-1")
ESCALATED = Escalated(alert_id="a-1", service="programmer-1", reason="max_restarts_exceeded", task_id="t-1")


class Steps:
    """Actions that answer ``restart_status`` to a restart and note every step taken."""

    def __init__(self, restart_status: str = "accepted") -> None:
        self.restart_status = restart_status
        self.taken: list[tuple[str, str, dict[str, object]]] = []

    async def restart(self, event: ChildFailed, decision: Restart, *, decided_by: str,
                      detail: dict[str, object]) -> dict[str, object]:
        self.taken.append(("restart", decision.case, detail))
        return {"status": self.restart_status}

    async def escalate(self, event: ChildFailed | Escalated, decision: Escalate, *, decided_by: str,
                       detail: dict[str, object]) -> dict[str, object]:
        self.taken.append(("escalate", decision.case, detail))
        return {"status": "escalated"}

    async def switch(self, event: ChildFailed | Escalated, decision: SwitchProvider, *, decided_by: str,
                     detail: dict[str, object]) -> dict[str, object]:
        self.taken.append(("switch", decision.case, detail))
        return {"status": "switched"}

    async def fail(self, event: ChildFailed | Escalated, decision: Fail, *, decided_by: str,
                   detail: dict[str, object]) -> dict[str, object]:
        self.taken.append(("fail", decision.case, detail))
        return {"status": "failed"}

    async def park(self, event: ChildFailed | Escalated, decision: Park, *, decided_by: str,
                   detail: dict[str, object]) -> dict[str, object]:
        self.taken.append(("park", decision.case, detail))
        return {"status": "parked"}


async def test_an_ignored_event_takes_no_step():
    steps = Steps()
    out = await carry_out(Ignore("stale_incarnation", "i-0 is gone"), FAILED, steps)
    assert out == {"action": "ignore", "case": "stale_incarnation", "why": "i-0 is gone"} and steps.taken == []


async def test_the_service_comes_back_before_the_task_climbs_with_the_deciders_detail():
    steps = Steps()
    decision = Escalate("task_restarts_exhausted", "max_restarts_exceeded", restart=Restart("restart_without_task"))
    out = await carry_out(decision, FAILED, steps, detail={"advice": "escalate"})
    assert [(step, case) for step, case, _ in steps.taken] == [("restart", "restart_without_task"),
                                                               ("escalate", "task_restarts_exhausted")]
    assert all(detail == {"advice": "escalate"} for _, _, detail in steps.taken)
    assert out["restart"] == {"status": "accepted"} and out["escalate"] == {"status": "escalated"}


@pytest.mark.parametrize("status,announced", [("accepted", True), ("duplicate", False)])
async def test_a_crash_loop_episode_is_announced_once_its_restart_is_accepted(status, announced):
    steps = Steps(restart_status=status)
    out = await carry_out(Restart("idle_failure", crash_looping=True, new_episode=True), FAILED, steps)
    assert (("escalate", CRASH_LOOP.case, {}) in steps.taken) is announced and ("crash_loop" in out) is announced


@pytest.mark.parametrize("decision,step", [
    (SwitchProvider("switch_provider", to_provider="ollama", attempt=1), "switch"),
    (Fail("switches_exhausted", "max_provider_switches_exceeded"), "fail"),
    (Park("ask_operator", "max_provider_switches_exceeded", kind="awaiting_operator"), "park"),
])
async def test_a_top_decision_on_an_escalation_is_one_step(decision, step):
    steps = Steps()
    await carry_out(decision, ESCALATED, steps)
    assert [s for s, _, _ in steps.taken] == [step]


async def test_a_restart_for_an_escalation_is_refused_loudly_before_any_step():
    """An Escalated names no incarnation to replace; the ladder never pairs it with a restart."""
    steps = Steps()
    with pytest.raises(TypeError, match="incarnation"):
        await carry_out(Fail("switches_exhausted", "x", restart=Restart("restart_without_task")), ESCALATED, steps)
    assert steps.taken == []
