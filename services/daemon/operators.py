"""What an operator can do to a service: restart, stop, start. Each is audited.

A deliberate stop is never undone by the ladder: a stopped service stays stopped across
failures and daemon restarts until an operator starts it. Every action, accepted or
refused, is an ``audit`` event: who, what, target, state before and after, outcome.
"""

from __future__ import annotations

import logging
from typing import Callable

from common.clock import Clock
from common.config import Policy
from common.states import RetryType, ServiceState, TaskState
from services.daemon.ledger import Ledger
from services.daemon.supervisor import Service, Supervisor, new_id

log = logging.getLogger("tron.daemon")
S = ServiceState


class Refused(Exception):
    """The action does not apply to the target's current state; nothing was changed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Operators:
    def __init__(self, sup: Supervisor, store, ledger: Ledger, *, clock: Clock, policy: Callable[[], Policy],
                 background) -> None:
        self.sup = sup
        self.store = store
        self.ledger = ledger
        self.clock = clock
        self.policy = policy
        self.background = background

    async def act(self, verb: str, name: str, *, actor: str, reason: str) -> dict:
        """Run one verb and audit it, whatever its outcome."""
        svc = self.sup[name]
        before = str(svc.state)
        try:
            outcome = await getattr(self, f"_{verb}")(svc, actor=actor, reason=reason)
        except Refused as err:
            await self.audit(actor, verb, name, before, str(svc.state), f"refused: {err}", reason)
            raise
        await self.audit(actor, verb, name, before, str(svc.state), outcome["status"], reason)
        return outcome

    async def audit(self, actor: str, what: str, target: str, before: str, after: str, outcome: str,
                    reason: str) -> None:
        await self.store.event("audit", {"who": actor, "what": what, "target": target, "before": before,
                                         "after": after, "outcome": outcome, "reason": reason}, agent=target)
        log.info("operator %s %s: %s", what, target, outcome,
                 extra={"offender": target, "actor": actor, "action": what, "outcome": outcome})

    async def _restart(self, svc: Service, *, actor: str, reason: str) -> dict:
        if svc.stopped or svc.state in (S.STOPPED, S.STOPPING):
            raise Refused(409, f"{svc.name} is stopped; `tron start {svc.name}` brings it back")
        if svc.replacing is not None:
            raise Refused(409, f"{svc.name} is already being restarted ({svc.state})")
        tasks = await self.store.open_tasks(svc.name)
        await self.store.record_retry(
            alert_id=new_id("op-"), agent_id=svc.name, retry_type=RetryType.OPERATOR_RESTART, reason=reason,
            detail={"actor": actor, "state": str(svc.state)}, case="operator_restart",
            task_id=tasks[0]["task_id"] if tasks else None, run_id=tasks[0]["run_id"] if tasks else None,
            from_provider=svc.provider, decided_by="operator", requested_by=actor)
        incarnation = svc.incarnation
        self.background(self.sup.replace(svc, incarnation, delay=0.0, reason=f"operator_restart:{reason}"),
                        f"operator restart {svc.name}")
        return {"status": "restarting", "replaces": incarnation}

    async def _stop(self, svc: Service, *, actor: str, reason: str) -> dict:
        if svc.stopped and svc.state == S.STOPPED:
            return {"status": "already_stopped"}
        svc.stopped = True
        await self.store.set_agent(svc.name, stopped=True)
        await self.sup.stop(svc, reason=f"operator_stop:{reason}")
        # No task waits forever on a service an operator stopped: its live tasks fail,
        # and their parents hear of it.
        for task in await self.store.live_tasks(svc.name):
            await self.ledger.finish_task(task["task_id"], TaskState.FAILED, None, "service_stopped",
                                          {"agent": svc.name, "by": actor}, None)
        return {"status": "stopped"}

    async def _start(self, svc: Service, *, actor: str, reason: str) -> dict:
        if not svc.stopped and svc.state != S.STOPPED:
            return {"status": "already_running", "state": str(svc.state)}
        svc.stopped = False
        await self.store.set_agent(svc.name, stopped=False)
        async with svc.lock:
            if svc.state == S.STOPPED:
                await self.sup.start(svc, reason=f"operator_start:{reason}")
        return {"status": "starting", "incarnation": svc.incarnation}
