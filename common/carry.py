"""Carrying out a ladder decision: the same steps for every decider.

``decide`` (common/ladder.py) says what to do; ``carry_out`` does it through an
``Actions`` object: parents and the root hold one that talks to the daemon over HTTP
(common/agent.py), the daemon holds one that acts directly (services/daemon/carrier.py).
No rule lives here, only the order of the steps: a service is brought back before its
task's failure climbs, and a crash-loop episode is announced once, after its restart.
"""

from __future__ import annotations

from typing import Protocol

from common.ladder import ChildFailed, Decision, Escalate, Escalated, Fail, Ignore, Park, Restart, SwitchProvider

CRASH_LOOP = Escalate(case="crash_loop_started", reason="crash_looping", kind="crash_loop")


class Actions(Protocol):
    """Each step takes the decision and ``detail``: what the decider adds to the row
    (an advisor's answer and rationale, say)."""

    async def restart(self, event: ChildFailed, decision: Restart, *, decided_by: str, detail: dict) -> dict: ...

    async def escalate(self, event: ChildFailed | Escalated, decision: Escalate, *, decided_by: str,
                       detail: dict) -> dict: ...

    async def switch(self, event: ChildFailed | Escalated, decision: SwitchProvider, *, decided_by: str,
                     detail: dict) -> dict: ...

    async def fail(self, event: ChildFailed | Escalated, decision: Fail, *, decided_by: str, detail: dict) -> dict: ...

    async def park(self, event: ChildFailed | Escalated, decision: Park, *, decided_by: str, detail: dict) -> dict: ...


def loop_alert_id(alert_id: str) -> str:
    """A crash-loop escalation's own id: its hop rows never collide with the task's."""
    return alert_id if alert_id.endswith(":loop") else f"{alert_id}:loop"


async def carry_out(decision: Decision, event: ChildFailed | Escalated, actions: Actions, *,
                    decided_by: str = "policy", detail: dict | None = None) -> dict:
    """Do what ``decision`` says; return what each step answered."""
    out: dict = {"action": type(decision).__name__.lower(), "case": decision.case}
    if isinstance(decision, Ignore):
        return {**out, "why": decision.why}
    kw = {"decided_by": decided_by, "detail": detail or {}}
    restart = decision if isinstance(decision, Restart) else getattr(decision, "restart", None)
    if restart is not None:
        out["restart"] = await actions.restart(event, restart, **kw)
        if restart.new_episode and out["restart"].get("status") == "accepted":
            out["crash_loop"] = await actions.escalate(event, CRASH_LOOP, decided_by="policy", detail={})
    if isinstance(decision, Escalate):
        out["escalate"] = await actions.escalate(event, decision, **kw)
    elif isinstance(decision, SwitchProvider):
        out["switch"] = await actions.switch(event, decision, **kw)
    elif isinstance(decision, Fail):
        out["fail"] = await actions.fail(event, decision, **kw)
    elif isinstance(decision, Park):
        out["park"] = await actions.park(event, decision, **kw)
    return out
