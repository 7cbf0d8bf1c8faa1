"""From a TRON signal to a decision: persist the alert, then deliver it up the chain.

An alert is written before anyone hears of it, then handed to the failing service's
parent (``POST /handle_child_timeout``; a plain restart it answers with is carried here, as
its ``POST /control/restart`` would be); if the parent is down, does not answer, or
answers without anything happening (``AlertAnswered``), the next ancestor gets it; when
every agent ancestor failed it is marked ``undeliverable`` and the daemon, the last
ancestor, decides itself. Never dropped, never handled twice.

The watchdog is the daemon's second look, once a second: a service left FAILED longer
than its ancestors could take, or a task held for a decision that never came, is decided
by the daemon; a crash-loop episode ends when a whole window passes with no failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from pydantic import ValidationError

from tron.common import logs, telemetry
from tron.common.clock import Clock, utc_iso
from tron.common.config import DAEMON, MeshConfig, Policy
from tron.common.http import MeshClient, MeshHTTPError
from tron.common.carry import restart_request
from tron.common.ladder import (AlertAnswered, ChildFailed, Escalated, Ignore, LadderView, Restart, crash_loop_ends, decide,
                               still_stands)
from tron.common.models import Alert, Reason, RestartRequest
from tron.common.monitor import Signal
from tron.common.states import AlertState, ServiceState, TaskState
from tron.registry.protocol import Store
from tron.services.daemon.carrier import Carrier
from tron.services.daemon.metrics import DaemonMetrics
from tron.services.daemon.supervisor import Supervisor, new_id

log = logging.getLogger("tron.daemon")
TELL_WITHIN = 1.0  # s: a parent is told of a restart carried for it once the child is back, or after this


class AlertRouter:
    def __init__(self, config: MeshConfig, sup: Supervisor, store: Store, carrier: Carrier, client: MeshClient, *,
                 clock: Clock, metrics: DaemonMetrics, policy: Callable[[], Policy], background) -> None:
        self.config = config
        self.sup = sup
        self.store = store
        self.carrier = carrier
        self.client = client
        self.clock = clock
        self.metrics = metrics
        self.policy = policy
        self.background = background
        self.last_alert: dict | None = None
        self._held_tried: dict[str, float] = {}  # task id -> when the watchdog last decided it

    async def on_signal(self, signal: Signal, *, retryable: bool = True) -> None:
        """A TRON signal becomes a persisted alert, then is delivered up the chain."""
        svc = self.sup.services.get(signal.service)
        if svc is None or svc.incarnation != signal.incarnation or self.sup.stopping:
            return
        now = self.clock.now()
        task_id = signal.task_id
        if task_id is None:  # died before a beat named its task: the registry knows it
            open_tasks = await self.store.open_tasks(svc.name)
            task_id = open_tasks[0]["task_id"] if open_tasks else None
        task = await self.store.task(task_id) if task_id else None
        stable = svc.stable(now, self.policy())
        alert = Alert(
            alert_id=new_id("a-"), service=svc.name, incarnation=signal.incarnation, reason=signal.reason,
            detail={**signal.detail, "detected_after": round(signal.fired_at - signal.deadline, 4),
                    "uptime": round(now - svc.started_at, 3) if svc.started_at else None},
            task_id=task_id, run_id=task["run_id"] if task else None, progress=signal.progress,
            provider=svc.provider, retryable=retryable)
        row, created = await self.store.insert_alert(alert.model_dump(mode="json"), stable=stable)
        if not created:
            return  # this incarnation already has its alert: never handled twice
        self.metrics.alerts.labels(reason=str(signal.reason)).inc()
        self.metrics.detection_latency.labels(reason=str(signal.reason)).observe(
            max(0.0, signal.fired_at - signal.deadline))
        svc.failed_at = svc.failed_at or signal.deadline
        svc.last_failure = {"reason": str(signal.reason), "at": utc_iso(), "alert": alert.alert_id,
                            "detail": {k: v for k, v in signal.detail.items() if k != "detected_after"}}
        if svc.state in (ServiceState.RUNNING, ServiceState.STARTING):
            await self.sup.transition(svc, ServiceState.FAILED, str(signal.reason))
        self.last_alert = {"service": svc.name, "reason": str(signal.reason), "at": time.time(),
                           "alert_id": alert.alert_id}
        log.warning("alert", extra={"offender": svc.name, "reason": str(signal.reason), "alert": alert.alert_id,
                                    "incarnation": alert.incarnation, "task": alert.task_id, "detail": alert.detail,
                                    "stable": stable})
        live = task if task is not None and task["status"] in (TaskState.ASSIGNED, TaskState.RUNNING) else None
        if live is not None and signal.reason != Reason.PROVIDER_FAILURE:
            # The attempt's process died or is about to be killed: its own span never leaves it.
            telemetry.attempt_ended(svc.name, live, reason=str(signal.reason), case=None, alert_id=alert.alert_id)
        telemetry.ladder("alert", case=None, alert_id=alert.alert_id, service=svc.name, task=live,
                         reason=str(signal.reason), incarnation=signal.incarnation)
        await self.deliver(alert)

    async def deliver(self, alert: Alert) -> None:
        agents = [a for a in self.config.ancestors(alert.service) if a != DAEMON]
        for target in agents:
            alert.hops.append(target)
            if self.sup[target].state != ServiceState.RUNNING:
                log.info("alert: skipping %s (%s)", target, self.sup[target].state, extra={"alert": alert.alert_id})
                continue
            logs.comms("alert", src=DAEMON, dst=target, alert=alert.alert_id, agent=alert.service,
                       task=alert.task_id, run=alert.run_id, incarnation=alert.incarnation)
            body = alert
            if alert.handled is None:
                # The parent's view goes with the alert: it decides on it at once (one HTTP round
                # trip fewer on every restart); the restart it asks for is checked again here.
                view = await self.carrier.view(alert.service, decider=target, alert_id=alert.alert_id,
                                               task_id=alert.task_id)
                alert.handled = await self._restart_at_once(alert, target, view)
                if alert.handled is None:
                    body = alert.model_copy(update={"view": view.model_dump(mode="json"), "carry": True})
                else:
                    await self._restarted(alert.service)
            try:
                answer = await self.client.post(self.config.url(target) + "/handle_child_timeout", body,
                                                timeout=self.policy().delivery_timeout)
            except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
                log.warning("alert delivery to %s failed: %s", target, err, extra={"alert": alert.alert_id})
                continue
            if alert.handled is not None:  # told: nothing was asked of it
                await self.store.alert_delivered(alert.alert_id, target)
                return
            await self._carry(alert, target, answer)
            # Did anything happen? The alert's status and the service's state say; nothing is decided again.
            standing, _ = await self.carrier.standing(alert.service, alert.alert_id)
            verdict = still_stands(AlertAnswered(alert.alert_id, alert.service, alert.incarnation, target), standing)
            if isinstance(verdict, Ignore):
                await self.store.alert_delivered(alert.alert_id, target)
                return
            log.warning("alert %s: %s", alert.alert_id, verdict.reason,
                        extra={"alert": alert.alert_id, "offender": alert.service, "case": verdict.case})
        if alert.handled is not None:  # carried; nobody above it answers to be told (the alert stays handled)
            log.warning("alert %s: %s, and no ancestor of %s could be told", alert.alert_id, alert.handled,
                        alert.service, extra={"alert": alert.alert_id, "offender": alert.service})
            return
        if agents:
            await self.store.mark_alert(alert.alert_id, AlertState.UNDELIVERABLE,
                                        decision=f"no ancestor of {alert.service} took it")
        logs.comms("alert", src=DAEMON, dst=DAEMON, alert=alert.alert_id, agent=alert.service,
                   task=alert.task_id, run=alert.run_id, incarnation=alert.incarnation)
        await self.carrier.decide_here(self.event_of(alert))

    async def _restarted(self, name: str) -> None:
        """Until the restart carried for ``name`` has brought a new incarnation up (or it
        failed), at most TELL_WITHIN on the daemon's clock: the parent hears of it after the
        restart, which in a crash wave then does not queue behind twenty parents' alerts on
        this loop."""
        svc = self.sup.services.get(name)
        replacing = self.carrier.replacing.get(name)

        async def back() -> None:
            if replacing is not None:
                await asyncio.wait({replacing})  # not cancelled with this wait
            if svc is not None:
                await svc.settled.wait()

        waiter, timer = asyncio.ensure_future(back()), asyncio.ensure_future(self.clock.sleep(TELL_WITHIN))
        try:
            await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            timer.cancel()

    async def _restart_at_once(self, alert: Alert, target: str, view: LadderView) -> str | None:
        """An idle failure (no task in flight) has one answer in the ladder's table, whoever
        reads it: the service comes back, under its backoff (case ``idle_failure``). The
        daemon reads it on ``target``'s view (what that parent would decide on) and carries it
        now, so a restart never waits on the parent's round trip; the parent is then told
        (the alert's ``handled``). A new crash-loop episode is not taken here: its escalation
        climbs from the parent, as any other decision does. What was carried, or None."""
        event = self.event_of(alert)
        decision = decide(event, view, view.now, view.policy)
        if type(decision) is not Restart or decision.case != "idle_failure" or decision.new_episode:
            return None
        req = restart_request(event, decision, requested_by=DAEMON, decided_by="policy",
                              detail={"decided_for": target})
        done = await self.carrier.restart(req)
        if done["status"] != "accepted":
            return None  # stale or decided already: the parent is asked as ever, and its view says so
        self.metrics.restarts_at_once.inc()
        log.info("decision", extra={"offender": alert.service, "alert": alert.alert_id, "decider": DAEMON,
                                    "case": decision.case, "decision": "Restart", "decided_for": target})
        return f"restart:{decision.case}"

    async def _carry(self, alert: Alert, target: str, answer: object) -> None:
        """The restart ``target`` answered the alert with, carried as its POST /control/restart
        would be (Carrier.restart: only whether it still stands is checked): one HTTP exchange
        less on every restart. It must be this alert's, of this incarnation, asked by
        ``target``; anything else is not carried (the check after it then finds nothing done,
        and the next ancestor gets the alert)."""
        carried = answer.get("carry") if isinstance(answer, dict) else None
        if carried is None:
            return  # the parent acted itself (or did nothing): the standing check says which
        try:
            req = RestartRequest.model_validate(carried)
        except ValidationError as err:
            log.warning("alert %s: %s answered with a restart that is not one: %s", alert.alert_id, target,
                        str(err).splitlines()[0], extra={"alert": alert.alert_id, "offender": alert.service})
            return
        if (req.service, req.alert_id, req.replaces, req.requested_by) != \
                (alert.service, alert.alert_id, alert.incarnation, target):
            log.warning("alert %s: %s answered with a restart of %s (alert %s, incarnation %s, asked by %s): "
                        "not this alert's, not carried", alert.alert_id, target, req.service, req.alert_id,
                        req.replaces, req.requested_by, extra={"alert": alert.alert_id, "offender": alert.service})
            return
        try:
            done = await self.carrier.restart(req)
        except Exception:  # as a failed POST /control/restart would: the check after it sends the alert on
            log.exception("alert %s: the restart %s answered with could not be carried", alert.alert_id, target,
                          extra={"alert": alert.alert_id, "offender": alert.service})
            return
        if done["status"] == "accepted":
            self.metrics.restarts_answered.inc()

    @staticmethod
    def event_of(alert: Alert) -> ChildFailed:
        return ChildFailed(alert.alert_id, alert.service, alert.incarnation,
                           alert.detail.get("error_reason") or str(alert.reason), alert.retryable, alert.task_id)

    def alert_from_row(self, row: dict) -> Alert:
        detail = row["detail"] or {}
        return Alert(alert_id=row["alert_id"], service=row["agent"], incarnation=row["incarnation"],
                     reason=row["reason"], detail=detail, task_id=row["task_id"], run_id=row["run_id"],
                     provider=self.sup[row["agent"]].provider, retryable=detail.get("retryable", True))

    async def redeliver_pending(self) -> None:
        """Alerts an earlier daemon persisted but never saw decided."""
        for row in await self.store.open_alerts():
            if row["reason"] == "lane_paused":
                continue  # an operator's to handle (tron lane resume), not a delivery
            svc = self.sup.services.get(row["agent"])
            if svc is not None and svc.incarnation == row["incarnation"]:
                self.background(self.deliver(self.alert_from_row(row)), f"redeliver {row['alert_id']}")
            else:
                await self.store.mark_alert(row["alert_id"], AlertState.HANDLED,
                                            decision="superseded_by_daemon_restart")

    # -- the watchdog ------------------------------------------------------------------------

    def decision_deadline(self, name: str) -> float:
        """How long an alert may take to become a decision: every ancestor may time out."""
        return len(self.config.ancestors(name)) * self.policy().delivery_timeout + 5.0

    async def watchdog_tick(self) -> None:
        now = self.clock.now()
        for svc in self.sup.services.values():
            if svc.state == ServiceState.FAILED and svc.failed_since is not None and \
                    now - svc.failed_since > self.decision_deadline(svc.name) and svc.replacing is None:
                row = await self.store.alert_for(svc.name, svc.incarnation)
                if row is None or row["status"] == AlertState.HANDLED:
                    continue
                log.error("watchdog: %s has been failed for %.1fs with no decision; the daemon decides",
                          svc.name, now - svc.failed_since, extra={"offender": svc.name, "alert": row["alert_id"]})
                await self.store.event("watchdog_decides", {"failed_for": round(now - svc.failed_since, 3)},
                                       agent=svc.name, incarnation=svc.incarnation, alert_id=row["alert_id"])
                svc.failed_since = now  # one attempt per deadline, not one per tick
                self.background(self.carrier.decide_here(self.event_of(self.alert_from_row(row))),
                                f"watchdog {svc.name}")
            if svc.crash_looping:
                await self._maybe_end_crash_loop(svc, now)
        held = await self.store.held_tasks()
        for task in held:
            deadline = self.decision_deadline(task["agent"])
            tried = self._held_tried.get(task["task_id"], task["held_since"] or now)
            if now - (task["held_since"] or now) > deadline and now - tried >= deadline:
                self._held_tried[task["task_id"]] = now
                log.error("watchdog: task %s held for %.1fs with no decision; the daemon decides", task["task_id"],
                          now - task["held_since"], extra={"task": task["task_id"], "offender": task["agent"]})
                event = await self.held_event(task, "watchdog_decides", {"held_for": round(now - task["held_since"], 3)})
                self.background(self.decide_held(event), f"watchdog {task['task_id']}")
        for task_id in set(self._held_tried) - {t["task_id"] for t in held}:
            del self._held_tried[task_id]

    async def _maybe_end_crash_loop(self, svc, now: float) -> None:
        latest = await self.store.failures(svc.name, limit=1)
        if not crash_loop_ends(svc.crash_looping, latest[0]["mono"] if latest else None, now, self.policy()):
            return
        svc.crash_looping = False
        await self.store.set_agent(svc.name, crash_looping=False)
        await self.store.event("crash_loop_ended", {"quiet_for": self.policy().restart_window}, agent=svc.name)
        log.info("crash loop over", extra={"offender": svc.name})

    async def held_event(self, task: dict, why: str, detail: dict) -> Escalated:
        """A task held for the top's decision, as the event the daemon, the top of last resort,
        decides (``carrier.decide_here``): the decision never came (``watchdog_decides``: the
        root was down, say), or can no longer come (``held_task_moved``: the replica it was
        asked for is gone, and the task waits on a sibling). An event of that kind says why;
        the ladder's table then decides for the task's agent now."""
        rows = await self.store.task_history(task["task_id"])
        last = next((r for r in reversed(rows) if r["retry_type"] == "escalation"), None)
        alert_id = last["alert_id"] if last else f"held-{task['task_id']}"
        reason = last["reason"] if last else "held_without_escalation"
        await self.store.event(why, detail, agent=task["agent"], task_id=task["task_id"], alert_id=alert_id)
        return Escalated(alert_id, task["agent"], reason, "task", task["task_id"])

    async def decide_held(self, event: Escalated) -> dict:
        """The daemon's decision on a held task (``held_event``), counted from the provider the
        task failed on: the service holding it may be on another by now (a sibling it moved
        to; a decision before this one that switched the service already)."""
        return await self.carrier.decide_here(event, provider=await self.carrier.failed_on(event.alert_id))
