"""Root: takes a run from the gateway, hands it to the architect, and owns the top of
the ladder.

When a failure climbs to the root (a parent ran out of restarts, or the failure cannot
be fixed by restarting), the root decides with ``decide_switch``:

- ``SwitchProvider``: restart the failing service on the other provider (Anthropic <->
  Ollama) and let the daemon hand it its task again, up to ``max_provider_switches``
  times for that task;
- ``Fail``: the daemon records the permanent failure (task, run, failure_metrics), tells
  the waiting parent, and leaves the agent idle and healthy; the root tells the gateway.
"""

from __future__ import annotations

import logging

from aiohttp import web

from common import logs
from common.agent import Agent, Task, TaskFailed
from common.http import MeshHTTPError
from common.models import Escalation, EscalationRecord, RestartRequest, RunFailed
from common.policy import SwitchProvider, decide_switch
from common.service import ServiceContext

log = logging.getLogger("tron.root")


class Root(Agent):
    role = "root"

    async def work(self, task: Task) -> str:
        planners = self.children()
        if not planners:
            raise TaskFailed("no_children", {"root": self.name})
        self.set_progress(task, "delegated")
        return await self.delegate(task, planners[0], 0, "plan", task.assign.prompt)

    async def escalate(self, esc: Escalation) -> dict:
        """Nobody above the root decides for it: its own give-ups come straight here."""
        rec = EscalationRecord(alert_id=esc.alert_id, service=esc.service, task_id=esc.task_id, run_id=esc.run_id,
                               reason=esc.reason, detail={**esc.detail, "incarnation": esc.incarnation},
                               from_service=self.name, to_service=self.name, restarts=esc.restarts)
        answer = await self.ctx.client.post(f"{self.daemon}/control/escalation", rec)
        if answer.get("status") == "duplicate":
            return answer
        return {**answer, **await self.on_grandchild_failure(esc)}

    async def on_grandchild_failure(self, esc: Escalation) -> dict:
        logs.comms("escalation_at_root", src=esc.path[-2] if len(esc.path) > 1 else esc.service, dst=self.name,
                   alert=esc.alert_id, agent=esc.service, task=esc.task_id, run=esc.run_id, reason=esc.reason)
        if not esc.task_id:
            # Failing while idle: no work to move to another provider. Like an OTP
            # supervisor past its intensity, stop here; the service stays given up.
            return await self.fail_permanently(esc, "restarts_exhausted_while_idle")
        status = await self.ctx.client.get(f"{self.daemon}/status")
        current = next(s for s in status["services"] if s["name"] == esc.service)
        provider = current["provider"] or self.config.providers.default
        task = await self.ctx.client.get(f"{self.daemon}/tasks/{esc.task_id}")
        if task["status"] in ("done", "failed"):
            return {"action": "none", "why": f"task {esc.task_id} is already {task['status']}"}
        decision = decide_switch(task["ladder"]["switches"], provider, self.policy)
        if isinstance(decision, SwitchProvider):
            req = RestartRequest(service=esc.service, replaces=current["incarnation"] or esc.incarnation,
                                 alert_id=esc.alert_id, reason=esc.reason,
                                 detail={**esc.detail, "switch": decision.attempt, "path": esc.path},
                                 provider=decision.to_provider, retry_type="llm_change", requested_by=self.name,
                                 task_id=esc.task_id)
            try:
                answer = await self.ctx.client.post(f"{self.daemon}/control/restart", req)
            except MeshHTTPError as err:
                answer = err.json()
            log.warning("provider switch", extra={"offender": esc.service, "from": provider,
                                                  "to": decision.to_provider, "task": esc.task_id,
                                                  "reason": esc.reason, "result": answer.get("status")})
            if answer.get("status") == "accepted":
                await self._switch_descendants(esc, decision.to_provider, status)
            return {"action": "switch_provider", "to": decision.to_provider, **answer}
        return await self.fail_permanently(esc, decision.reason)

    async def _switch_descendants(self, esc: Escalation, to_provider: str, status: dict) -> None:
        """The whole failing subtree moves: descendants still on the failed provider are
        restarted on the new one (their in-flight tasks resume there, from their markers)."""
        current = {s["name"]: s for s in status["services"]}
        for name in self.config.subtree(esc.service)[1:]:
            s = current.get(name)
            if not s or not s["incarnation"] or s["provider"] == to_provider:
                continue
            req = RestartRequest(service=name, replaces=s["incarnation"], alert_id=f"{esc.alert_id}:{name}",
                                 reason=f"subtree_switch:{esc.service}",
                                 detail={"subtree_of": esc.service, "alert": esc.alert_id},
                                 provider=to_provider, retry_type="llm_change", requested_by=self.name,
                                 task_id=s["task"])
            try:
                await self.ctx.client.post(f"{self.daemon}/control/restart", req)
            except (MeshHTTPError, OSError) as err:
                log.error("could not move %s to %s: %s", name, to_provider, err)

    async def fail_permanently(self, esc: Escalation, why: str) -> dict:
        body = {"alert_id": esc.alert_id, "service": esc.service, "task_id": esc.task_id, "run_id": esc.run_id,
                "reason": why, "detail": {"last_reason": esc.reason, "path": esc.path, **esc.detail}}
        answer = await self.ctx.client.post(f"{self.daemon}/control/permanent_failure", body)
        if answer.get("status") == "recorded" and answer.get("run_failed_now"):  # one notice per run
            gateway = next((n for n, s in self.config.services.items() if s.role == "gateway"), None)
            notice = RunFailed(run_id=esc.run_id, task_id=esc.task_id, reason=why, detail=answer.get("failure", {}))
            if gateway:
                logs.comms("notify_run_failed", src=self.name, dst=gateway, run=esc.run_id, task=esc.task_id,
                           reason=why)
                ok = await self._retrying(
                    lambda: self.ctx.client.post(self.config.url(gateway) + "/notify_run_failed", notice),
                    what=f"notify gateway of {esc.run_id}")
                answer["gateway_notified"] = ok
        log.error("permanent failure", extra={"offender": esc.service, "task": esc.task_id, "run": esc.run_id,
                                              "reason": why})
        return {"action": "fail", **answer}


def make_app(ctx: ServiceContext) -> web.Application:
    return Root(ctx).make_app()
