"""Carrying out a ladder decision: the same steps for every decider.

``decide`` (common/ladder.py) says what to do; ``carry_out`` does it through an
``Actions`` object: parents and the root hold one that talks to the daemon over HTTP
(common/agent.py), the daemon holds one that acts directly (services/daemon/carrier.py).
No rule lives here, only the order of the steps: a service is brought back before its
task's failure climbs, and a crash-loop episode is announced once, after its restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from tron.common.models import DecidedBy, RestartRequest
from tron.common.ladder import ChildFailed, Decision, Escalate, Escalated, Fail, Ignore, Park, Restart, SwitchProvider

CRASH_LOOP = Escalate(case="crash_loop_started", reason="crash_looping", kind="crash_loop")


# What a step is told (``detail``: what the decider adds to the row) and what it answers: JSON objects.
Detail = dict[str, object]
Answer = dict[str, object]


def restart_request(event: ChildFailed, d: Restart, *, requested_by: str, decided_by: DecidedBy,
                    detail: Detail) -> RestartRequest:
    """What POST /control/restart takes to carry ``d`` out, whoever asks: a parent posts it
    (or answers its alert with it), the daemon carries it itself."""
    return RestartRequest(
        service=event.service, replaces=event.incarnation, alert_id=event.alert_id, reason=event.reason,
        case=d.case, delay=d.delay, with_task=d.with_task, crash_looping=d.crash_looping,
        new_episode=d.new_episode, task_id=event.task_id, requested_by=requested_by, decided_by=decided_by,
        detail=detail)


class Actions(Protocol):
    """Each step takes the decision and ``detail``: what the decider adds to the row
    (an advisor's answer and rationale, say)."""

    async def restart(self, event: ChildFailed, decision: Restart, *, decided_by: DecidedBy, detail: Detail) -> Answer: ...

    async def escalate(self, event: ChildFailed | Escalated, decision: Escalate, *, decided_by: DecidedBy,
                       detail: Detail) -> Answer: ...

    async def switch(self, event: ChildFailed | Escalated, decision: SwitchProvider, *, decided_by: DecidedBy,
                     detail: Detail) -> Answer: ...

    async def fail(self, event: ChildFailed | Escalated, decision: Fail, *, decided_by: DecidedBy,
                   detail: Detail) -> Answer: ...

    async def park(self, event: ChildFailed | Escalated, decision: Park, *, decided_by: DecidedBy,
                   detail: Detail) -> Answer: ...


def loop_alert_id(alert_id: str) -> str:
    """A crash-loop escalation's own id: its hop rows never collide with the task's."""
    return alert_id if alert_id.endswith(":loop") else f"{alert_id}:loop"


def _restart_of(decision: Decision) -> Restart | None:
    """The restart a decision brings: itself, or the one an escalation, a failure or a park carries."""
    if isinstance(decision, Restart):
        return decision
    if isinstance(decision, (Escalate, Fail, Park)):
        return decision.restart
    return None


async def carry_out(decision: Decision, event: ChildFailed | Escalated, actions: Actions, *,
                    decided_by: DecidedBy = "policy", detail: Mapping[str, object] | None = None) -> Answer:
    """Do what ``decision`` says; return what each step answered."""
    out: Answer = {"action": type(decision).__name__.lower(), "case": decision.case}
    if isinstance(decision, Ignore):
        return {**out, "why": decision.why}
    told: Detail = dict(detail or {})
    restart = _restart_of(decision)
    if restart is not None:
        if not isinstance(event, ChildFailed):  # the ladder gives no Escalated a restart: it names no incarnation
            raise TypeError(f"{decision.case}: a restart needs the incarnation a ChildFailed names, not {event!r}")
        answer = await actions.restart(event, restart, decided_by=decided_by, detail=told)
        out["restart"] = answer
        if restart.new_episode and answer.get("status") == "accepted":
            out["crash_loop"] = await actions.escalate(event, CRASH_LOOP, decided_by="policy", detail={})
    if isinstance(decision, Escalate):
        out["escalate"] = await actions.escalate(event, decision, decided_by=decided_by, detail=told)
    elif isinstance(decision, SwitchProvider):
        out["switch"] = await actions.switch(event, decision, decided_by=decided_by, detail=told)
    elif isinstance(decision, Fail):
        out["fail"] = await actions.fail(event, decision, decided_by=decided_by, detail=told)
    elif isinstance(decision, Park):
        out["park"] = await actions.park(event, decision, decided_by=decided_by, detail=told)
    return out
