"""Runs and tasks: recorded before they are handed over, delivered until they arrive.

The ledger records a task's end and delivers it to the waiting parent (retrying until the
parent is back), ends a run when its root task ends, hands a new incarnation the tasks
its predecessor held (with their last checkpoint), and tells the gateway once when a run
fails for good. The daemon is the one process that does not die with a child, so nothing
a child finished is lost when it dies the moment after.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
import logging
from typing import Callable

from tron.common import logs
from tron.common.clock import Clock
from tron.common.config import DAEMON, MeshConfig, Policy
from tron.common.http import MeshClient, MeshHTTPError
from tron.common.ladder import compute_backoff
from tron.common.models import RunFailed, TaskAssign, TaskResult
from tron.common.states import LIVE_TASK_STATES, RunState, ServiceState, TaskState
from tron.registry.protocol import Store
from tron.services.daemon.supervisor import Service, Supervisor

log = logging.getLogger("tron.daemon")


def subtree(task: dict, tasks: list[dict]) -> list[dict]:
    """The task and every task below it among ``tasks``, deepest first (children end before
    their parents). Each once, whatever the rows say (a task named its own parent ends the walk)."""
    out, frontier, seen = [], [task], set()
    while frontier:
        node = frontier.pop()
        if node["task_id"] in seen:
            continue
        seen.add(node["task_id"])
        out.append(node)
        frontier += [t for t in tasks if t["parent_task_id"] == node["task_id"]]
    return list(reversed(out))


class Ledger:
    def __init__(self, config: MeshConfig, sup: Supervisor, store: Store, client: MeshClient, *, clock: Clock,
                 policy: Callable[[], Policy], background) -> None:
        self.config = config
        self.sup = sup
        self.store = store
        self.client = client
        self.clock = clock
        self.policy = policy
        self.background = background
        self.replay: dict[str, bool] = {}  # tasks whose next assignment replays every verified step
        self._finished: OrderedDict[str, None] = OrderedDict()  # the latest tasks that ended, oldest first

    def just_finished(self, task_id: str) -> bool:
        """Did this task end lately (a beat naming it is older than its end)? A retried
        task is live again: it leaves the list when it is reopened."""
        return task_id in self._finished

    def reopened(self, task_id: str) -> None:
        self._finished.pop(task_id, None)

    # -- results ---------------------------------------------------------------------------

    async def finish_task(self, task_id: str, status: TaskState, result: str | None, reason: str | None,
                          detail: dict, incarnation: str | None) -> bool:
        """Record a task's end, then deliver it to the waiting parent. A run's root task
        also ends the run here, so a run's outcome never depends on the gateway."""
        row = await self.store.task(task_id)
        failure = {"reason": reason, **detail} if status != TaskState.DONE else None
        if row is None or not await self.store.finish_task(task_id, status, result, failure, reason=reason):
            return False
        self._finished[task_id] = None
        while len(self._finished) > 1000:
            self._finished.popitem(last=False)
        svc = self.sup.services.get(row["agent"])
        if svc is not None and incarnation is not None and incarnation == svc.incarnation:
            svc.tasks_done += 1  # max_tasks and restart_above_memory count these (Supervisor.recycle_due)
        if svc is not None and svc.task_id == task_id:
            # Its last beat still named the task: a failure before the next beat is an idle one.
            svc.task_id = svc.progress = None
        self.sup.monitor.task_ended(row["agent"], task_id)
        if row["parent_task_id"] is None:
            ended = await self.store.finish_run(row["run_id"], RunState(str(status)), result, failure)
            if ended and status != TaskState.DONE:
                await self.end_leftovers(row["run_id"], str(status))
        # A parent hears done or failed; a cancelled child is a failure with that reason.
        outcome = TaskResult(task_id=task_id, run_id=row["run_id"], status="done" if status == TaskState.DONE
                             else "failed", result=result, reason=reason, detail=detail, service=row["agent"],
                             incarnation=incarnation)
        self.background(self.deliver(row["parent_agent"], outcome), f"deliver {task_id}")
        return True

    async def fail_permanently(self, task: dict, failure: dict, *, decided_by: str) -> None:
        """Level 3: the task fails, its waiting parent is told, its run fails, and the
        gateway hears of it once."""
        await self.finish_task(task["task_id"], TaskState.FAILED, None, "permanent_failure", failure, None)
        if await self.store.finish_run(task["run_id"], RunState.FAILED, None, failure):
            await self.end_leftovers(task["run_id"], "failed")
            self.background(self.notify_gateway(task["run_id"], task["task_id"], failure["reason"], failure,
                                                src=decided_by), "notify gateway")

    async def end_leftovers(self, run_id: str, how: str) -> list[str]:
        """A run that failed (or was cancelled) leaves no task working or waiting for it: each
        one still live (a sibling of the failed chain, one parked at a budget or for a person)
        is cancelled, its agent told to drop it. Before, such a task went on and, once its
        budget was raised, spent money for a run that had ended."""
        tasks = await self.store.tasks_of_run(run_id)
        ordered = [t for root in tasks if root["parent_task_id"] is None for t in subtree(root, tasks)]
        return await self.cancel(ordered, reason=f"run_{how}", detail={"run": run_id})

    async def cancel(self, tasks: list[dict], *, reason: str, detail: dict) -> list[str]:
        """Each task (in the order given: children before parents) ends cancelled, if it is
        still live, and its agent is told to drop the work (best effort: its result would be
        refused anyway). The ids of those cancelled."""
        cancelled = []
        for t in tasks:
            if t["status"] in LIVE_TASK_STATES and await self.finish_task(t["task_id"], TaskState.CANCELLED, None,
                                                                          "cancelled", {"why": reason, **detail}, None):
                cancelled.append(t["task_id"])
                self.background(self._tell_agent(t), f"cancel {t['task_id']}")
        return cancelled

    async def _tell_agent(self, task: dict) -> None:
        svc = self.sup.services.get(task["agent"])
        if svc is None or svc.state != ServiceState.RUNNING or not svc.spec.is_agent:
            return
        try:
            await self.client.post(self.config.url(svc.name) + f"/tasks/{task['task_id']}/cancel", {}, timeout=2)
        except Exception as err:  # the registry already says cancelled; the agent may be gone
            log.info("agent %s not told of cancelled %s: %s", svc.name, task["task_id"], err)

    async def deliver(self, target: str, outcome: TaskResult) -> None:
        if target not in self.sup.services:  # an operator's or a script's task: the registry is the answer
            await self.store.mark_delivered(outcome.task_id)
            return
        logs.comms("task_result", src=DAEMON, dst=target, task=outcome.task_id, run=outcome.run_id,
                   status=outcome.status, reason=outcome.reason, agent=outcome.service)
        tries = 0
        while not self.sup.stopping:
            svc = self.sup[target]
            if svc.state == ServiceState.RUNNING:
                try:
                    await self.client.post(self.config.url(target) + "/task_result", outcome, timeout=5)
                    await self.store.mark_delivered(outcome.task_id)
                    return
                except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
                    log.info("result of %s not delivered to %s yet: %s", outcome.task_id, target, err)
            elif svc.state == ServiceState.STOPPED:
                return  # a started parent finds the result in the registry when it re-delegates
            tries += 1
            await self.clock.sleep(compute_backoff(tries, initial=0.02, factor=2, max_backoff=1.0, jitter=0.1))

    async def redeliver_pending(self) -> None:
        """Results recorded while the previous daemon was down or dying reach their parents now."""
        for row in await self.store.undelivered_results():
            outcome = TaskResult(task_id=row["task_id"], run_id=row["run_id"], status=row["status"],
                                 result=row["result"], reason=(row["failure"] or {}).get("reason"),
                                 detail=row["failure"] or {}, service=row["agent"])
            self.background(self.deliver(row["parent_agent"], outcome), f"redeliver {row['task_id']}")

    async def notify_gateway(self, run_id: str, task_id: str | None, reason: str, failure: dict, *,
                             src: str = DAEMON) -> None:
        notice = RunFailed(run_id=run_id, task_id=task_id, reason=reason, detail=failure)
        told = await self._tell_gateway("notify_run_failed", notice, src=src, run_id=run_id, task_id=task_id,
                                        reason=reason, what="failed", attempts=20, initial=0.05)
        if told is False:
            log.error("gateway never told of failed run %s (the registry has it)", run_id)

    async def notify_parked(self, run_id: str, task_id: str, kind: str, reason: str) -> None:
        """The gateway hears that a run waits (a task parked for its budget or an operator);
        best effort: GET /runs/{id} shows the parked tasks anyway."""
        notice = {"run_id": run_id, "task_id": task_id, "kind": kind, "reason": reason[:500]}
        await self._tell_gateway("notify_run_parked", notice, src=DAEMON, run_id=run_id, task_id=task_id,
                                 reason=kind, what="parked", attempts=5, initial=0.1)

    async def _tell_gateway(self, path: str, notice, *, src: str, run_id: str, task_id: str | None, reason: str,
                            what: str, attempts: int, initial: float) -> bool | None:
        """POST ``notice`` to the gateway's ``/<path>``, retried with capped backoff: True when
        told, False when every attempt failed, None when the mesh has no gateway."""
        gateway = next((n for n, s in self.config.services.items() if s.role == "gateway"), None)
        if gateway is None:
            return None
        logs.comms(path, src=src, dst=gateway, run=run_id, task=task_id, reason=reason)
        for tries in range(1, attempts + 1):
            try:
                await self.client.post(self.config.url(gateway) + f"/{path}", notice, timeout=5)
                return True
            except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
                log.info("gateway not told of %s run %s yet: %s", what, run_id, err)
            await self.clock.sleep(compute_backoff(tries, initial=initial, factor=2, max_backoff=2.0, jitter=0.1))
        return False

    # -- hand-over to a new incarnation ---------------------------------------------------------

    async def assignment(self, task: dict, provider: str | None) -> TaskAssign:
        """What a new incarnation gets: the task, its last checkpoint, and after a hard
        reset every verified step to replay. The provider is the task's own when it has one
        (the ladder or an operator moved it there; a service gone home since, by failback,
        does not take its running tasks with it), else ``provider``, its service's."""
        marks = await self.store.checkpoints(task["task_id"])
        steps = [{k: m[k] for k in ("step", "step_id", "hash", "output")} for m in marks]
        replay = steps if self.replay.pop(task["task_id"], False) else None
        return TaskAssign(task_id=task["task_id"], run_id=task["run_id"], kind=task["kind"], prompt=task["prompt"],
                          reply_to=task["parent_agent"], parent_task_id=task["parent_task_id"],
                          progress=task["progress"], attempt=task["attempt"], provider=task.get("provider") or provider,
                          checkpoint=steps[-1] if steps else None, replay=replay, traceparent=task.get("traceparent"))

    async def redispatch(self, svc: Service) -> None:
        """Give a fresh incarnation the tasks its predecessor held, with the last
        checkpoint, so it resumes after the last completed step instead of starting over."""
        for task in await self.store.open_tasks(svc.name):
            await self.dispatch(svc, task, resumed=True)

    async def dispatch(self, svc: Service, task: dict, *, resumed: bool) -> bool:
        """Push a task to an agent that serves HTTP (an agent that claims its tasks gets
        them from /tasks/claim instead). A failure is logged, not raised: the daemon hands
        the task over again when the agent is next healthy."""
        if not self.config.services[svc.name].is_agent:
            return False
        if svc.switched_away:  # about to be replaced on the new provider: the replacement gets it
            log.info("dispatch of %s to %s deferred: its incarnation runs on %s, the service moves to %s",
                     task["task_id"], svc.name, svc.spawned_provider, svc.provider)
            return False
        assign = await self.assignment(task, svc.provider)
        logs.comms("task_redispatch" if resumed else "task_dispatch", src=DAEMON, dst=svc.name, task=task["task_id"],
                   run=task["run_id"], incarnation=svc.incarnation, progress=task["progress"], attempt=task["attempt"])
        try:
            await self.client.post(self.config.url(svc.name) + "/tasks", assign, timeout=5)
        except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
            log.warning("dispatch of %s to %s failed: %s", task["task_id"], svc.name, err)
            if assign.replay is not None:
                self.replay[task["task_id"]] = True  # the next hand-over replays instead
            return False
        if resumed:
            replayed = {"replayed": [m["step"] for m in assign.replay]} if assign.replay is not None else {}
            await self.store.event("task_resumed", {"progress": task["progress"], "attempt": task["attempt"],
                                                    "checkpoint": (assign.checkpoint or {}).get("step"), **replayed},
                                   agent=svc.name, incarnation=svc.incarnation, task_id=task["task_id"],
                                   run_id=task["run_id"])
        return True
