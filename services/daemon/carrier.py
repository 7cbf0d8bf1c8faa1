"""Carrying out the ladder's decisions, for every decider.

Parents and the root decide with ``tron.common.ladder.decide`` on a ``LadderView`` read here
(sent with the alert), then ask for the steps over HTTP; the daemon decides the same way
for its own children (and in the stead of any ancestor that cannot), then takes the steps
directly. Either way every step lands in one method below, which checks only that it
still stands (``still_stands`` on a ``Standing``: the alert still open, the incarnation
still the one that failed; one authority, idempotent by alert id) without rebuilding the
view, writes its ``retry_history`` row with the decision's case id, and then acts.
Nothing here decides what to do.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Callable

from tron.common import telemetry
from tron.common.carry import carry_out, loop_alert_id, restart_request
from tron.common.clock import Clock
from tron.common.config import DAEMON, MeshConfig, Policy
from tron.common.ladder import (ChildFailed, Escalate, Escalated, Fail, Ignore, LadderView, Park, ProviderRules,
                                ProviderStatus, Restart, RestartAsked, ServiceView, Standing, SwitchProvider, TaskView,
                                decide, failure_record, still_stands)
from tron.common.lanes import Fingerprint
from tron.common.models import (DecidedBy, EscalationRecord, ParkRequest, PermanentFailure, Reason, RestartRequest,
                                SwitchRequest)
from tron.common.states import FINAL_TASK_STATES, AlertState, RetryType, TaskState
from tron.registry.protocol import Store
from tron.services.daemon.metrics import DaemonMetrics
from tron.services.daemon.supervisor import Supervisor, top_of

log = logging.getLogger("tron.daemon")



def _spawn_cause(alert: dict | None) -> str | None:
    """Why the incarnation the alert names could not start (None for any other failure)."""
    if alert is None or alert["reason"] != Reason.SPAWN_FAILED:
        return None
    return (alert["detail"] or {}).get("cause")


def _detail_of(alert: dict | None) -> dict:
    """What TRON saw (exit signal, silence, stuck marker), carried onto the ladder's rows."""
    if alert is None:
        return {}
    return {**(alert["detail"] or {}), "detected_by": alert["reason"]}


class Carrier:
    def __init__(self, config: MeshConfig, sup: Supervisor, store: Store, ledger, *, clock: Clock,
                 metrics: DaemonMetrics, policy: Callable[[], Policy], background, spend=None) -> None:
        self.spend = spend  # services/daemon/spend.py: a parked task's cost so far
        # The provider desk's board and rules (services/daemon/providers.py), plugged in by the
        # daemon: every ladder view carries them, so no decision switches into a known outage.
        self.provider_states: Callable[[], tuple[dict[str, ProviderStatus], ProviderRules]] | None = None
        self.config = config
        self.sup = sup
        self.store = store
        self.ledger = ledger
        self.clock = clock
        self.metrics = metrics
        self.policy = policy
        self.background = background
        self.breaker = None  # the lane breaker (breaker.py), plugged in by the daemon
        self.actions = DaemonActions(self)
        # The replacement each restart carried here started (service name -> its task, while it runs):
        # what is told of a restart after it happened waits for it (alerts.py).
        self.replacing: dict[str, asyncio.Task] = {}

    # -- what a decider sees ------------------------------------------------------------------

    async def view(self, service: str, *, decider: str, alert_id: str | None = None,
                   task_id: str | None = None, provider: str | None = None) -> LadderView:
        """The registry's record of one service (and task, and alert) at the daemon's
        clock reading: everything ``decide`` needs, and nothing it has to look up.
        ``provider``: the one the failure happened on, where that is not the service's now
        (a held task that has moved, or whose service a decision before switched already)."""
        svc = self.sup[service]
        policy = self.policy()
        now = self.clock.now()
        rows = await self.store.failures(service)
        record = failure_record([(r["alert_id"], r["mono"], bool(r["stable"])) for r in rows], alert_id, now, policy)
        alert = await self.store.alert(alert_id) if alert_id else None
        recorded = []
        for r in await self.store.retry_rows(alert_id) if alert_id else []:
            recorded.append(f"{r['retry_type']}:{r['hop']}" if r["hop"] else r["retry_type"])
        task = None
        if task_id:
            row = await self.store.task(task_id)
            if row is not None:
                counts = await self.store.task_counts(task_id)
                task = TaskView(task_id=task_id, status=row["status"], restarts=counts["restarts"],
                                switches=counts["switches"])
        providers, rules = self.provider_states() if self.provider_states is not None else ({}, ProviderRules())
        return LadderView(
            now=now, policy=policy, decider=decider, top=top_of(self.config, decider),
            service=ServiceView(
                name=service, incarnation=svc.incarnation, state=svc.state, stopped=svc.stopped,
                replacing=svc.replacing is not None and svc.replacing == svc.incarnation,
                provider=provider or svc.provider,
                failures=record.failures, previous_failure=record.previous_failure,
                unstable_streak=record.unstable_streak, crash_looping=svc.crash_looping, failure_cause=_spawn_cause(alert)),
            task=task, alert_status=alert["status"] if alert else None, recorded=recorded,
            chain=list(self.config.providers.chain), subtree=self.config.subtree(service),
            providers=providers, rules=rules)

    async def decide_here(self, event: ChildFailed | Escalated, *, provider: str | None = None) -> dict:
        """The daemon decides (its own children, the top, or an ancestor's stead); ``provider``:
        the one the failure happened on (``view``)."""
        if event.service not in self.sup.services:  # removed while the decision waited (a reload)
            log.info("no decision for %s: it is no longer in the mesh", event.service,
                     extra={"offender": event.service, "alert": event.alert_id})
            return {"status": "ignored", "why": f"{event.service} is no longer in the mesh"}
        view = await self.view(event.service, decider=DAEMON, alert_id=event.alert_id, task_id=event.task_id,
                               provider=provider)
        decision = decide(event, view, view.now, view.policy)
        log.info("decision", extra={"offender": event.service, "alert": event.alert_id, "decider": DAEMON,
                                    "case": decision.case, "decision": type(decision).__name__})
        return await carry_out(decision, event, self.actions)

    async def standing(self, service: str, alert_id: str) -> tuple[Standing, dict | None]:
        """What the guard before a step reads (still_stands): the alert's status (one read;
        its rows too only when there is no such alert) and the service's live state. Returns
        the alert row as well, for the step's own record."""
        svc = self.sup[service]
        alert = await self.store.alert(alert_id)
        recorded = []
        if alert is None:  # a request naming no alert the daemon raised (an operator's): its rows say
            recorded = [f"{r['retry_type']}:{r['hop']}" if r["hop"] else r["retry_type"]
                        for r in await self.store.retry_rows(alert_id)]
        return Standing(alert_status=alert["status"] if alert else None, recorded=recorded,
                        incarnation=svc.incarnation, state=svc.state, stopped=svc.stopped,
                        replacing=svc.replacing is not None and svc.replacing == svc.incarnation), alert

    # -- the steps -----------------------------------------------------------------------------

    async def restart(self, req: RestartRequest) -> dict:
        """Replace one incarnation, if the request still stands: one row, one restart."""
        svc = self.sup[req.service]
        async with svc.lock:
            # Decided already (by the requester): only whether it still stands is checked here.
            standing, alert = await self.standing(req.service, req.alert_id)
            verdict = still_stands(RestartAsked(req.alert_id, req.service, req.replaces), standing)
            if isinstance(verdict, Ignore):
                status = "duplicate" if verdict.case == "duplicate_request" else "stale"
                return {"status": status, "case": verdict.case, "why": verdict.why, "current": svc.incarnation,
                        "state": str(svc.state)}
            task = await self.store.task(req.task_id) if req.task_id else None
            live = task is not None and task["status"] in (TaskState.ASSIGNED, TaskState.RUNNING)
            row = await self.store.record_retry(
                alert_id=req.alert_id, agent_id=svc.name, retry_type=RetryType.CHILD_RESTART, reason=req.reason,
                detail={**_detail_of(alert), **req.detail, "delay": round(req.delay, 4),
                        "with_task": req.with_task, "crash_looping": req.crash_looping},
                case=req.case, task_id=task["task_id"] if live and req.with_task else None,
                run_id=task["run_id"] if task else None, from_provider=svc.provider, decided_by=req.decided_by,
                requested_by=req.requested_by)
            if row is None:
                return {"status": "duplicate", "alert_id": req.alert_id}
            svc.replacing = req.replaces
            await self.store.mark_alert(req.alert_id, AlertState.HANDLED, decision=f"restart:{req.case}")
            if live and not req.with_task:
                await self.store.hold_task(task["task_id"], req.reason)
            await self._crash_loop(svc, req)
            self.metrics.restarts.labels(kind=RetryType.CHILD_RESTART).inc()
            svc.failed_at = svc.failed_at or self.clock.now()
            # The old attempt and the next one (the new incarnation takes the task one attempt on).
            telemetry.ladder("restart", case=req.case, alert_id=req.alert_id, service=svc.name,
                             task=task if live else None, reason=req.reason, decided_by=req.decided_by,
                             requested_by=req.requested_by, with_task=req.with_task, replaces=req.replaces,
                             links_attempts=(task["attempt"], task["attempt"] + 1) if live and req.with_task else ())
        task = self.background(self.sup.replace(svc, req.replaces, delay=req.delay, reason=f"{req.case}:{req.reason}"),
                               f"restart {svc.name}")
        self.replacing[svc.name] = task
        task.add_done_callback(functools.partial(self._replaced, svc.name))
        return {"status": "accepted", "retry_count": row["retry_count"], "delay": req.delay,
                "replaces": req.replaces, "case": req.case}

    def _replaced(self, name: str, task: asyncio.Task) -> None:
        if self.replacing.get(name) is task:
            del self.replacing[name]

    async def _alert_detail(self, alert_id: str) -> dict:
        return _detail_of(await self.store.alert(alert_id))

    async def _crash_loop(self, svc, req: RestartRequest) -> None:
        if req.crash_looping and not svc.crash_looping:
            svc.crash_looping = True
            await self.store.set_agent(svc.name, crash_looping=True)
        if req.new_episode:
            self.metrics.crash_loops.inc()
            await self.store.event("crash_loop_started", {"reason": req.reason, "window": self.policy().restart_window,
                                                          "max_restarts": self.policy().max_restarts},
                                   agent=svc.name, alert_id=req.alert_id)
            log.error("crash-looping", extra={"offender": svc.name, "alert": req.alert_id})

    async def escalation(self, rec: EscalationRecord) -> dict:
        """Record one hop of an escalation; a task's failure holds the task until the top
        decides (no incarnation gets it meanwhile)."""
        svc = self.sup[rec.service]
        row = await self.store.record_retry(
            alert_id=rec.alert_id, agent_id=rec.service, retry_type=RetryType.ESCALATION, reason=rec.reason,
            detail={**await self._alert_detail(rec.alert_id.removesuffix(":loop")), **rec.detail, "kind": rec.kind,
                    "from": rec.from_service, "to": rec.to_service}, case=rec.case,
            task_id=rec.task_id, run_id=rec.run_id, from_provider=svc.provider, decided_by=rec.decided_by,
            requested_by=rec.from_service, hop=f"{rec.from_service}->{rec.to_service}")
        if row is None:
            return {"status": "duplicate", "action": "escalate"}
        self.metrics.escalations.inc()
        telemetry.ladder("escalation", case=rec.case, alert_id=rec.alert_id, service=rec.service,
                         task=await self.store.task(rec.task_id) if rec.task_id and telemetry.enabled() else None,
                         reason=rec.reason, kind=rec.kind, hop=f"{rec.from_service}->{rec.to_service}",
                         decided_by=rec.decided_by)
        if rec.kind == "task" and rec.task_id:
            await self.store.hold_task(rec.task_id, rec.reason)
            await self.store.mark_alert(rec.alert_id, AlertState.HANDLED, decision=f"escalate:{rec.case}")
        log.error("escalation", extra={"offender": rec.service, "reason": rec.reason, "from": rec.from_service,
                                       "to": rec.to_service, "alert": rec.alert_id, "task": rec.task_id,
                                       "kind": rec.kind, "case": rec.case})
        return {"status": "recorded", "action": "escalate", "retry_count": row["retry_count"]}

    async def switch(self, req: SwitchRequest) -> dict:
        """Move the failing subtree to ``to_provider``: the held task goes with the failing
        service; every descendant still on another provider is restarted on it too."""
        svc = self.sup[req.service]
        task = await self.store.task(req.task_id)
        if task is None:
            return {"status": "refused", "why": f"no task {req.task_id!r}"}
        # Whether the failure happened in this service: not so for a held task handed to it by
        # a replica scaled away, which it runs beside its own (reload.py, _hand_on); the task
        # then moves from the provider it failed on, not from this service's.
        failed = await self.store.alert(req.alert_id)
        failed_here = failed is None or failed["agent"] == svc.name
        from_provider = svc.provider if failed_here else await self.failed_on(req.alert_id) or svc.provider
        row = await self.store.record_retry(
            alert_id=req.alert_id, agent_id=svc.name, retry_type=RetryType.LLM_CHANGE, reason=req.reason,
            detail={**req.detail, "services": req.services}, case=req.case, task_id=req.task_id,
            run_id=task["run_id"], from_provider=from_provider, to_provider=req.to_provider, decided_by=req.decided_by,
            requested_by=req.requested_by)
        if row is None:
            return {"status": "duplicate", "action": "switch"}
        self.metrics.provider_switches.inc()
        self.metrics.restarts.labels(kind=RetryType.LLM_CHANGE).inc()
        telemetry.ladder("switch", case=req.case, alert_id=req.alert_id, service=svc.name, task=task,
                         reason=req.reason, from_provider=from_provider, to_provider=req.to_provider,
                         decided_by=req.decided_by, links_attempts=(task["attempt"], task["attempt"] + 1))
        log.warning("provider switch", extra={"offender": svc.name, "from": from_provider, "to": req.to_provider,
                                              "task": req.task_id, "reason": req.reason})
        await self.store.mark_alert(req.alert_id, AlertState.HANDLED, decision=f"switch:{req.case}")
        # The move comes first: from here on the incarnation still on the old provider is
        # `switched_away` and gets no task, so the freed task waits for its replacement.
        for name in req.services or [svc.name]:
            other = self.sup[name]
            if name == svc.name and not failed_here and other.provider == req.to_provider:
                continue  # its incarnation did not fail and runs on it: no restart is owed
            if name != svc.name:
                if other.provider == req.to_provider or not other.spec.is_agent:
                    continue
                open_tasks = await self.store.open_tasks(name)
                await self.store.record_retry(
                    alert_id=f"{req.alert_id}:{name}", agent_id=name, retry_type=RetryType.LLM_CHANGE,
                    reason=f"subtree_switch:{svc.name}", detail={"subtree_of": svc.name}, case="subtree_switch",
                    task_id=open_tasks[0]["task_id"] if open_tasks else None, run_id=task["run_id"],
                    from_provider=other.provider, to_provider=req.to_provider, decided_by=req.decided_by,
                    requested_by=req.requested_by)
            await self._move(other, req.to_provider, req.delay if name == svc.name else 0.0,
                             f"{req.case}:{req.reason}")
        await self.store.release_task(req.task_id, req.to_provider)  # held by an escalation: free it
        await self._to_holder(req, svc, failed_here)
        return {"status": "accepted", "action": "switch", "to": req.to_provider, "retry_count": row["retry_count"]}

    async def failed_on(self, alert_id: str) -> str | None:
        """The provider a task's failure happened on: its escalation's (the service's when it
        escalated), whatever provider that service, or the one holding the task now, is on."""
        rows = [r for r in await self.store.retry_rows(alert_id) if r["retry_type"] == RetryType.ESCALATION]
        return rows[-1]["from_provider"] if rows else None

    async def _to_holder(self, req: SwitchRequest, svc, failed_here: bool) -> None:
        """The released task, to whoever holds it now. The failing service's replacement, on
        the new provider, takes it as it starts; but one the switch was decided for without
        failing, or a sibling it moved to while the switch waited (its replica scaled away),
        has no replacement coming unless its provider changes: it is moved to the provider, or
        given the task now."""
        task = await self.store.task(req.task_id)
        holder = self.sup.services.get(task["agent"]) if task is not None else None
        if task is None or holder is None or task["status"] != TaskState.ASSIGNED or (holder is svc and failed_here):
            return
        if holder.provider != req.to_provider:
            await self._move(holder, req.to_provider, 0.0, f"{req.case}:{req.reason}")
        else:  # one switched away already (its replacement under way) defers it to that replacement
            await self.ledger.dispatch(holder, task, resumed=True)

    async def _move(self, svc, provider: str, delay: float, reason: str) -> None:
        """Restart a service on ``provider`` (a failed one too: the switch is its restart).
        The provider is set at once, under the lock the spawn reads it under: one whose
        replacement is already under way just starts on it."""
        async with svc.lock:
            if svc.provider != provider:
                svc.provider = provider
                await self.store.set_agent(svc.name, provider=provider)
            if svc.replacing is not None or svc.incarnation is None or svc.state in ("stopping", "stopped"):
                return
            incarnation = svc.incarnation
        self.background(self.sup.replace(svc, incarnation, delay=delay, reason=reason, provider=provider),
                        f"switch {svc.name}")

    async def fail(self, rec: PermanentFailure) -> dict:
        """Level 3: the task and its run fail with a structured reason; the waiting
        parent and the gateway are told (by the ledger, which retries until they are)."""
        svc = self.sup[rec.service]
        task = await self.store.task(rec.task_id)
        if task is None:
            return {"status": "refused", "why": f"no task {rec.task_id!r}"}
        if task["status"] in FINAL_TASK_STATES:  # another path ended it first: one end, one row
            return {"status": "duplicate", "why": f"task {rec.task_id} is {task['status']} already"}
        history = await self.store.task_history(rec.task_id)
        signals = sorted({(r["detail"] or {}).get("detected_by") or r["reason"] for r in history
                          if r["retry_type"] in (RetryType.CHILD_RESTART, RetryType.ESCALATION)})
        providers = [p for p in dict.fromkeys([r["from_provider"] for r in history] + [r["to_provider"] for r in history]
                                              + [task.get("provider"), svc.provider]) if p]
        failure = {**rec.detail, "agent": rec.service, "reason": rec.reason, "signals": signals,
                   "providers_tried": providers,
                   "restarts": sum(r["retry_type"] == RetryType.CHILD_RESTART for r in history),
                   "provider_retries": sum(r["retry_type"] == RetryType.PROVIDER_RETRY for r in history),
                   "provider_switches": sum(r["retry_type"] == RetryType.LLM_CHANGE for r in history),
                   "task_id": rec.task_id, "run_id": task["run_id"], "case": rec.case}
        row = await self.store.record_retry(
            alert_id=rec.alert_id, agent_id=rec.service, retry_type=RetryType.PERMANENT_FAILURE, reason=rec.reason,
            detail=failure, case=rec.case, task_id=rec.task_id, run_id=task["run_id"], from_provider=svc.provider,
            decided_by=rec.decided_by, requested_by=rec.requested_by)
        if row is None:
            return {"status": "duplicate"}
        self.metrics.permanent_failures.inc()
        telemetry.ladder("permanent_failure", case=rec.case, alert_id=rec.alert_id, service=rec.service, task=task,
                         reason=rec.reason, decided_by=rec.decided_by)
        log.error("permanent failure", extra={"offender": rec.service, "task": rec.task_id, "run": task["run_id"],
                                              "reason": rec.reason, "failure": failure})
        await self.ledger.fail_permanently(task, failure, decided_by=rec.requested_by)
        lane = None
        # An operator's decision, or a wait for people that nobody answered, is no way of
        # failing that the next task would repeat: it trips no lane.
        if self.breaker is not None and rec.decided_by != "operator" and rec.case != "operator_timeout":
            last = next((r for r in reversed(history) if r["retry_type"] != RetryType.LLM_CHANGE), None)
            failure_class = rec.detail.get("failure_class") or \
                ((last or {}).get("detail") or {}).get("detected_by") or rec.reason
            # A task that went through the whole chain failed on the chain, not on whichever
            # provider it happened to end on: identical outages share one fingerprint.
            chain = list(self.config.providers.chain)
            tried = {r["from_provider"] for r in history} | {r["to_provider"] for r in history} | {svc.provider}
            exhausted = rec.detail.get("chain_exhausted") or set(chain) <= tried
            lane = await self.breaker.task_failed(rec.service, "+".join(chain) if exhausted else svc.provider,
                                                  failure_class, rec.detail.get("last_reason") or rec.reason,
                                                  task_id=rec.task_id, run_id=task["run_id"])
        return {"status": "recorded", "failure": failure, "lane": lane}


    async def park(self, req: ParkRequest) -> dict:
        """The human rung on a held task: instead of failing for good it waits, parked as
        awaiting_operator with its checkpoint, fingerprint, providers tried and cost so far,
        for `tron task approve` or `tron task fail` (or operator_timeout)."""
        task = await self.store.task(req.task_id)
        if task is None:
            return {"status": "refused", "why": f"no task {req.task_id!r}"}
        if not await self.store.park_task(req.task_id, req.reason, req.kind):
            return {"status": "duplicate", "action": "park", "task_status": task["status"]}
        await self.store.mark_alert(req.alert_id, AlertState.HANDLED, decision=f"park:{req.case}")
        telemetry.ladder("park", case=req.case, alert_id=req.alert_id, service=req.service, task=task,
                         reason=req.reason, kind=req.kind, decided_by=req.decided_by)
        await self.awaiting_operator(task, req.service, req.reason, case=req.case, requested_by=req.requested_by)
        return {"status": "parked", "action": "park", "kind": req.kind}

    async def awaiting_operator(self, task: dict, service: str, reason: str, *, case: str, requested_by: str,
                                error: str | None = None) -> None:
        """What an operator needs to decide, in one event (the notifications send it): the
        ladder's reason (max_provider_switches_exceeded, say) and the failure under it
        (``error``: the call that failed just now; else the last step's own reason), so that
        "authentication_error" is seen, not only that the switches ran out."""
        history = await self.store.task_history(task["task_id"])
        marks = await self.store.checkpoints(task["task_id"])
        providers = [p for p in dict.fromkeys([r["from_provider"] for r in history] + [r["to_provider"] for r in history]
                                              + [task.get("provider")]) if p]
        last = next((r for r in reversed(history) if r["retry_type"] != RetryType.LLM_CHANGE), None)
        error = error or next((r["reason"] for r in reversed(history) if r["reason"] != reason), None)
        failure_class = ((last or {}).get("detail") or {}).get("detected_by") or error or reason
        fp = Fingerprint.of(self.sup[service].spec.role, "+".join(providers), failure_class, reason)
        cost = await self.spend.store.spend(task_id=task["task_id"]) if self.spend else None
        payload = {"reason": reason, "error": error, "case": case,
                   "checkpoint": (marks[-1]["step"] if marks else None),
                   "progress": task.get("progress"), "fingerprint": fp.key, "fingerprint_text": fp.describe(),
                   "providers_tried": providers, "cost": cost, "requested_by": requested_by,
                   "timeout_s": self.policy().operator_timeout,
                   "approve": f"tron task approve {task['task_id']} [--provider P] [--from-step N]",
                   "fail": f"tron task fail {task['task_id']}"}
        await self.store.event("awaiting_operator", payload, agent=service, task_id=task["task_id"],
                               run_id=task["run_id"])
        log.error("task awaiting an operator", extra={"task": task["task_id"], "offender": service, "reason": reason,
                                                      "error": error, "case": case})
        self.background(self.ledger.notify_parked(task["run_id"], task["task_id"], "awaiting_operator", reason),
                        "notify gateway (parked)")


class DaemonActions:
    """The daemon's own hands for ``carry_out``."""

    def __init__(self, carrier: Carrier) -> None:
        self.c = carrier

    async def restart(self, event: ChildFailed, d: Restart, *, decided_by: DecidedBy, detail: dict) -> dict:
        return await self.c.restart(restart_request(event, d, requested_by=DAEMON, decided_by=decided_by,
                                                    detail=detail))

    async def escalate(self, event, d: Escalate, *, decided_by: str, detail: dict) -> dict:
        """The daemon has nobody above it: the hop is recorded and ends here."""
        loop = d.kind == "crash_loop"
        return await self.c.escalation(EscalationRecord(
            alert_id=loop_alert_id(event.alert_id) if loop else event.alert_id, service=event.service, kind=d.kind,
            task_id=None if loop else event.task_id, reason=d.reason, case=d.case, from_service=DAEMON,
            to_service=DAEMON, decided_by=decided_by, detail=detail))

    async def switch(self, event, d: SwitchProvider, *, decided_by: str, detail: dict) -> dict:
        return await self.c.switch(SwitchRequest(
            service=event.service, alert_id=event.alert_id, task_id=event.task_id, to_provider=d.to_provider,
            reason=event.reason, case=d.case, services=list(d.services), delay=d.delay, decided_by=decided_by,
            requested_by=DAEMON, detail=detail))

    async def fail(self, event, d: Fail, *, decided_by: str, detail: dict) -> dict:
        return await self.c.fail(PermanentFailure(
            alert_id=event.alert_id, service=event.service, task_id=event.task_id, reason=d.reason, case=d.case,
            detail={"last_reason": event.reason, **detail}, decided_by=decided_by, requested_by=DAEMON))

    async def park(self, event, d: Park, *, decided_by: str, detail: dict) -> dict:
        return await self.c.park(ParkRequest(alert_id=event.alert_id, service=event.service, task_id=event.task_id,
                                             reason=d.reason, case=d.case, decided_by=decided_by, requested_by=DAEMON))
