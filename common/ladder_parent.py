"""A parent's side of the ladder: what an agent with children does when TRON alerts it
about one of them, or a child escalates a failure it gave up on.

Only a parent gets one (``AgentRuntime`` composes it in when the service has children): it
serves ``POST /handle_child_timeout`` and ``POST /handle_grandchild_failure``, reads the
registry's view of the failure, decides with ``tron.common.ladder.decide`` (LLM advice may only
make the decision stricter) and has the daemon carry it out through ``MeshActions``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from aiohttp import web
from pydantic import BaseModel

from tron.common import logs
from tron.common.carry import carry_out, loop_alert_id, restart_request
from tron.common.config import DAEMON
from tron.common.http import MeshHTTPError, error, parse, require_token
from tron.common.ladder import (ChildFailed, Escalate, Escalated, Fail, LadderView, Park, Restart, SwitchProvider, decide,
                                fold_advice, parse_advice)
from tron.common.models import (Alert, DecidedBy, Escalation, EscalationRecord, ParkRequest, PermanentFailure,
                                SwitchRequest)

if TYPE_CHECKING:
    from tron.common.agent_runtime import AgentRuntime
    from tron.common.providers import ProviderSettings

log = logging.getLogger("tron.agent")


class ParentRole:
    """The ladder's parent side of one agent: it decides about its descendants' failures."""

    def __init__(self, runtime: AgentRuntime) -> None:
        self.runtime = runtime
        self.ctx = runtime.ctx
        self.config = runtime.config
        self.actions = MeshActions(runtime)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/handle_child_timeout", self._h_child_timeout)
        app.router.add_post("/handle_grandchild_failure", self._h_grandchild_failure)

    @property
    def name(self) -> str:
        return self.runtime.name

    @property
    def daemon(self) -> str:
        return self.runtime.daemon

    @property
    def provider(self) -> str:
        return self.runtime.provider

    def sdks_ready(self) -> asyncio.Future[None]:
        return self.runtime.sdks_ready()

    def provider_settings(self, *, timeout: float | None = None, max_tokens: int | None = None) -> ProviderSettings:
        return self.runtime.provider_settings(timeout=timeout, max_tokens=max_tokens)

    def _descendant(self, service: str) -> bool:
        entry = self.config.standing_for(service)  # a replica scaled up since our file was read too
        return entry is not None and self.name in self.config.ancestors(entry)

    async def view(self, service: str, *, alert_id: str | None, task_id: str | None) -> LadderView:
        """What the registry knows, at the daemon's clock reading: we decide on that."""
        q = {"service": service, "decider": self.name}
        q.update({k: v for k, v in (("alert_id", alert_id), ("task_id", task_id)) if v})
        body = await self.ctx.client.get(f"{self.daemon}/ladder/view?{urlencode(q)}")
        return LadderView.model_validate(body)

    async def decide_and_act(self, event: ChildFailed | Escalated, *, view: dict[str, Any] | None = None,
                             carry: bool = False) -> dict[str, object]:
        """Decide on ``view`` when the daemon sent it with the alert, else on one read now.
        ``carry``: the daemon carries a plain restart it is answered with (the request is
        the answer, not a POST /control/restart of its own)."""
        seen = LadderView.model_validate(view) if view is not None else \
            await self.view(event.service, alert_id=event.alert_id, task_id=event.task_id)
        decision = decide(event, seen, seen.now, seen.policy)
        decided_by: DecidedBy = "policy"
        detail: dict[str, object] = {}
        if seen.policy.llm_advice and isinstance(decision, Restart) and decision.with_task \
                and isinstance(event, ChildFailed):  # a restart is only ever of a child that failed
            advice, note = await self.advise(event, seen)
            decision = fold_advice(decision, advice)
            decided_by = "llm" if advice is not None else "policy"
            detail = {"advice": advice or note, "rationale": note if advice else ""}
        log.info("decision", extra={"offender": event.service, "alert": event.alert_id, "case": decision.case,
                                    "decision": type(decision).__name__, "decided_by": decided_by})
        if carry and type(decision) is Restart and not decision.new_episode and isinstance(event, ChildFailed):
            # Nothing follows a plain restart (a new crash-loop episode's escalation waits for
            # its answer): the daemon that asked carries it, checked as /control/restart would.
            req = restart_request(event, decision, requested_by=self.name, decided_by=decided_by, detail=detail)
            return {"action": "restart", "case": decision.case, "carry": req.model_dump(mode="json")}
        return await carry_out(decision, event, self.actions, decided_by=decided_by, detail=detail)

    @require_token
    async def _h_child_timeout(self, request: web.Request) -> web.Response:
        alert = await parse(request, Alert)
        if not self._descendant(alert.service):
            return error(422, f"{alert.service!r} is not a descendant of {self.name}")
        logs.comms("alert_received", src=DAEMON, dst=self.name, alert=alert.alert_id, agent=alert.service,
                   task=alert.task_id, run=alert.run_id)
        if alert.handled is not None:  # the daemon carried the table's one answer already: we are told
            log.info("child failed, decided already", extra={"offender": alert.service, "alert": alert.alert_id,
                                                            "reason": str(alert.reason), "handled": alert.handled})
            return web.json_response({"action": "told", "handled": alert.handled})
        event = ChildFailed(alert.alert_id, alert.service, alert.incarnation,
                            alert.detail.get("error_reason") or str(alert.reason), alert.retryable, alert.task_id)
        return web.json_response(await self.decide_and_act(event, view=alert.view, carry=alert.carry))

    @require_token
    async def _h_grandchild_failure(self, request: web.Request) -> web.Response:
        esc = await parse(request, Escalation)
        if not self._descendant(esc.service):
            return error(422, f"{esc.service!r} is not a descendant of {self.name}")
        caller = self.ctx.peer_caller(request)
        entry = self.config.standing_for(esc.service) or esc.service  # _descendant: it is somebody here
        if caller in self.config.services and caller != esc.service and caller not in self.config.ancestors(entry):
            return error(403, f"{caller} escalates only for itself and its own descendants, not {esc.service}")
        logs.comms("escalation_received", src=esc.path[-1] if esc.path else esc.service, dst=self.name,
                   alert=esc.alert_id, agent=esc.service, task=esc.task_id, run=esc.run_id, reason=esc.reason)
        event = Escalated(esc.alert_id, esc.service, esc.reason, esc.kind, esc.task_id)
        return web.json_response(await self.decide_and_act(event))

    async def advise(self, event: ChildFailed, view: LadderView) -> tuple[str | None, str]:
        """Ask the LLM whether to restart or escalate, within ``advice_timeout``: (advice,
        rationale or why there is none). No answer, an unusable one, or a failure means
        no advice: the policy stands."""
        from tron.common.prompts import system_prompt

        policy = view.policy
        question = (f"Child {event.service} failed: {event.reason}. Task {event.task_id} has had "
                    f"{view.task.restarts if view.task else 0} of {policy.max_restarts} restarts.")
        try:
            async with asyncio.timeout(policy.advice_timeout):
                await self.sdks_ready()
                from tron.common.providers import provider_for

                provider = provider_for(self.provider)
                reply = await provider.complete(system=system_prompt("advisor"), prompt=question,
                                                settings=self.provider_settings(timeout=policy.advice_timeout,
                                                                                max_tokens=64))
            advice, rationale = parse_advice(reply.text)
            note = "unusable answer" if advice is None else rationale
        except TimeoutError:
            advice, note = None, f"timeout after {policy.advice_timeout}s"
        except Exception as err:  # the advisor is optional: any failure means "no advice"
            advice, note = None, f"failed: {type(err).__name__}: {str(err)[:100]}"
        log.info("advice for %s: %s (%s)", event.service, advice, note, extra={"alert": event.alert_id})
        return advice, note

class MeshActions:
    """An agent's hands for ``carry_out``: every step is a request to the daemon, which
    records it and acts; an escalation is then forwarded to our own parent."""

    def __init__(self, agent: AgentRuntime) -> None:
        self.agent = agent

    @property
    def _daemon(self) -> str:
        return self.agent.daemon

    async def _post(self, path: str, body: BaseModel) -> dict[str, object]:
        try:
            answer: dict[str, object] = await self.agent.ctx.client.post(f"{self._daemon}{path}", body)
            return answer
        except MeshHTTPError as err:
            return {"status": "refused", "http": err.status, **err.json()}

    async def restart(self, event: ChildFailed, d: Restart, *, decided_by: DecidedBy,
                     detail: dict[str, object]) -> dict[str, object]:
        return await self._post("/control/restart", restart_request(event, d, requested_by=self.agent.name,
                                                                     decided_by=decided_by, detail=detail))

    async def escalate(self, event: ChildFailed | Escalated, d: Escalate, *, decided_by: DecidedBy,
                     detail: dict[str, object]) -> dict[str, object]:
        me = self.agent.name
        parent = self.agent.config.spec(me).parent
        loop = d.kind == "crash_loop"
        alert_id = loop_alert_id(event.alert_id) if loop else event.alert_id
        task_id = None if loop else event.task_id  # a crash loop is the service's, not a task's
        answer = await self._post("/control/escalation", EscalationRecord(
            alert_id=alert_id, service=event.service, kind=d.kind, task_id=task_id, reason=d.reason,
            case=d.case, from_service=me, to_service=parent, decided_by=decided_by, detail=detail))
        if answer.get("status") != "recorded":
            return answer
        esc = Escalation(alert_id=alert_id, service=event.service, reason=d.reason, kind=d.kind,
                         task_id=task_id, path=[me], decided_by=decided_by,
                         incarnation=getattr(event, "incarnation", None))
        logs.comms("escalation", src=me, dst=parent, alert=alert_id, agent=event.service, task=event.task_id,
                   reason=d.reason, kind=d.kind)
        url = (self._daemon if parent == DAEMON else self.agent.config.url(parent)) + "/handle_grandchild_failure"
        try:
            forwarded = await self.agent.ctx.client.post(url, esc, timeout=self.agent.policy.alert_delivery_timeout * 5)
        except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
            # The task is held and the hop recorded: the daemon's watchdog decides if nobody does.
            log.error("escalation to %s not delivered: %s", parent, err, extra={"alert": alert_id})
            return {**answer, "forwarded": False}
        return {**answer, "forwarded": True, "above": forwarded}

    async def switch(self, event: ChildFailed | Escalated, d: SwitchProvider, *, decided_by: DecidedBy,
                     detail: dict[str, object]) -> dict[str, object]:
        return await self._post("/control/switch", SwitchRequest.model_validate(dict(  # to_provider: checked here
            service=event.service, alert_id=event.alert_id, task_id=event.task_id, to_provider=d.to_provider,
            reason=event.reason, case=d.case, services=list(d.services), delay=d.delay, decided_by=decided_by,
            requested_by=self.agent.name, detail=detail)))

    async def fail(self, event: ChildFailed | Escalated, d: Fail, *, decided_by: DecidedBy,
                     detail: dict[str, object]) -> dict[str, object]:
        return await self._post("/control/permanent_failure", PermanentFailure(
            alert_id=event.alert_id, service=event.service, task_id=_task_of(event), reason=d.reason, case=d.case,
            detail={"last_reason": event.reason, **detail}, decided_by=decided_by, requested_by=self.agent.name))

    async def park(self, event: ChildFailed | Escalated, d: Park, *, decided_by: DecidedBy,
                     detail: dict[str, object]) -> dict[str, object]:
        return await self._post("/control/park", ParkRequest(
            alert_id=event.alert_id, service=event.service, task_id=_task_of(event), reason=d.reason, case=d.case,
            decided_by=decided_by, requested_by=self.agent.name))


def _task_of(event: ChildFailed | Escalated) -> str:
    """The task a permanent failure or a parked task is about: the ladder decides either only
    for a failure that has one."""
    if event.task_id is None:
        raise ValueError(f"a decision about a task, for {event.service}'s alert {event.alert_id} that names none")
    return event.task_id
