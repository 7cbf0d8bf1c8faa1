"""Operator recovery actions on a task, each audited (audit.py), each checked against
the task's state machine, each a clear 4xx when it does not apply:

    retry ID                a new attempt now, same provider. A live task: its agent is
                            restarted with it. A failed or cancelled one: its run is reopened
                            (every failed task of it assigned again; done work is kept).
    hard-reset ID           rebuild the task's state by replaying its recorded steps in
                            order, each hash verified (refused, naming the step, when one
                            does not match), then rerun the failing step.
    resume ID --from-step N keep the steps before N (verified), set the rest aside, and go
                            on from step N.
    cancel ID               the task (and its live sub-tasks) end as cancelled; the parent
                            hears of it; a run's root task cancels the run.
    approve ID [--provider P] [--from-step N]
                            a task parked awaiting an operator (the human rung) goes on, on
                            P, from its checkpoint (or from step N: the later steps set aside
                            and its agent restarted with it).
    fail ID                 a task parked awaiting an operator (or at its budget) fails for
                            good now, as the ladder would have failed it.
"""

from __future__ import annotations

import logging

from tron.common.config import DAEMON
from tron.common.states import FINAL_TASK_STATES, LIVE_TASK_STATES, RetryType, RunState, ServiceState, TaskState
from tron.registry.store import content_hash
from tron.registry.protocol import Store
from tron.services.daemon.audit import Audit, Refused
from tron.services.daemon.operators import admit_restart
from tron.services.daemon.ledger import Ledger, subtree
from tron.services.daemon.supervisor import Supervisor, new_id

log = logging.getLogger("tron.daemon")
TASK_VERBS = ("retry", "hard_reset", "resume", "cancel", "approve", "fail")


class TaskActions:
    def __init__(self, sup: Supervisor, store: Store, ledger: Ledger, audit: Audit, *, background, client, desk,
                 carrier) -> None:
        self.desk = desk  # services/daemon/providers.py: parked tasks
        self.carrier = carrier
        self.sup = sup
        self.store = store
        self.ledger = ledger
        self.audit = audit
        self.background = background
        self.client = client
        self._verbs = {"retry": self._retry, "hard_reset": self._hard_reset, "resume": self._resume,
                       "cancel": self._cancel, "fail": self._fail}  # TASK_VERBS but approve (act() says why)

    async def act(self, verb: str, task_id: str, *, actor: str, reason: str, request_id: str | None = None,
                  from_step: int | None = None, provider: str | None = None) -> dict:
        if verb not in TASK_VERBS:
            raise Refused(400, f"unknown verb {verb!r}: one of {', '.join(TASK_VERBS)}")
        task = await self._task(task_id)
        if verb == "approve":
            return await self.audit.run(lambda: self._approve(task, actor=actor, reason=reason, from_step=from_step,
                                                              provider=provider),
                                        actor=actor, what="task_approve", target=task_id, agent=task["agent"],
                                        reason=reason, request_id=request_id,
                                        state=lambda: self._status(task_id))

        async def state() -> str:
            row = await self.store.task(task_id)
            return row["status"] if row else "unknown"

        handler = self._verbs[verb]
        return await self.audit.run(lambda: handler(task, actor=actor, reason=reason, from_step=from_step),
                                    actor=actor, what=f"task_{verb}", target=task_id, agent=task["agent"],
                                    reason=reason, request_id=request_id, state=state)

    async def _status(self, task_id: str) -> str:
        row = await self.store.task(task_id)
        return row["status"] if row else "unknown"

    async def _task(self, task_id: str) -> dict:
        task = await self.store.task(task_id)
        if task is None:
            raise Refused(404, f"no task {task_id!r}")
        await self.store.warm(task["run_id"])  # an old run comes back into the working copy
        return await self.store.task(task_id)

    # -- the verbs --------------------------------------------------------------------------------

    def _retryable(self, task: dict):
        """The agent a retry goes to, once everything a retry needs is checked: verbs that
        change something first (resume sets steps aside, hard reset arms a replay) call
        this before they do, so a refusal changes nothing."""
        status = TaskState(task["status"])
        if status == TaskState.DONE:
            raise Refused(409, f"task {task['task_id']} is done: nothing to retry")
        svc = self.sup.services.get(task["agent"])
        if svc is None or svc.stopped:
            raise Refused(409, f"task {task['task_id']} belongs to {task['agent']}, which is stopped")
        if status in LIVE_TASK_STATES:
            if self.sup.spawning_paused:
                raise Refused(409, "spawning is paused (`tron spawning resume`)")
            if svc.replacing is not None or svc.state not in (ServiceState.RUNNING, ServiceState.STARTING,
                                                              ServiceState.FAILED):
                raise Refused(409, f"{svc.name} is {svc.state}: its next incarnation takes the task anyway")
        return svc

    async def _retry(self, task: dict, *, actor: str, reason: str, from_step: int | None = None) -> dict:
        svc = self._retryable(task)
        if TaskState(task["status"]) in LIVE_TASK_STATES:
            return await self._restart_with(task, svc, actor=actor, reason=reason)
        return await self._reopen_run(task, actor=actor)

    async def _restart_with(self, task: dict, svc, *, actor: str, reason: str) -> dict:
        """A live task, a new attempt now: its agent replaced, the task going with it."""
        ref = admit_restart(svc)  # one retry per incarnation, however many requests race
        if task["status"] == TaskState.ESCALATED:
            await self.store.release_task(task["task_id"], svc.provider)
        await self.store.record_retry(
            alert_id=ref, agent_id=svc.name, retry_type=RetryType.OPERATOR_RESTART, reason=reason or "task_retry",
            detail={"actor": actor, "task": task["task_id"]}, case="operator_retry", task_id=task["task_id"],
            run_id=task["run_id"], from_provider=svc.provider, decided_by="operator", requested_by=actor)
        self.background(self.sup.replace(svc, svc.incarnation, delay=0.0, reason=f"task_retry:{task['task_id']}"),
                        f"retry {task['task_id']}")
        return {"status": "retrying", "task_id": task["task_id"], "agent": svc.name, "ref": ref}

    async def _reopen_run(self, task: dict, *, actor: str) -> dict:
        """A failed or cancelled task is retried within its run: the run and each of its
        failed tasks open again, done ones keep their results (their parents find them)."""
        reopened = []
        for t in await self.store.tasks_of_run(task["run_id"]):
            if t["status"] in (TaskState.FAILED, TaskState.CANCELLED):
                if await self.store.reopen_task(t["task_id"], by=actor):
                    self.ledger.reopened(t["task_id"])
                    reopened.append(t["task_id"])
        await self.store.reopen_run(task["run_id"])
        root = next(t for t in await self.store.tasks_of_run(task["run_id"]) if t["parent_task_id"] is None)
        agent = self.sup.services.get(root["agent"])
        if agent is not None and agent.state == ServiceState.RUNNING:
            self.background(self.ledger.redispatch(agent), f"redispatch {root['task_id']}")
        return {"status": "reopened", "run_id": task["run_id"], "tasks": reopened}

    async def _hard_reset(self, task: dict, *, actor: str, reason: str, from_step: int | None = None) -> dict:
        steps = await self._verified(task, upto=None)
        self._retryable(task)
        self.ledger.replay[task["task_id"]] = True
        outcome = await self._retry(task, actor=actor, reason=reason)
        return {**outcome, "replayed": [s["step"] for s in steps]}

    async def _resume(self, task: dict, *, actor: str, reason: str, from_step: int | None = None) -> dict:
        marks = await self.store.checkpoints(task["task_id"])
        last = marks[-1]["step"] if marks else 0
        if from_step is None or not 1 <= from_step <= last + 1:
            raise Refused(422, f"from_step must be between 1 and {last + 1} for task {task['task_id']} "
                               f"({last} steps recorded)")
        kept = await self._verified(task, upto=from_step)
        self._retryable(task)
        set_aside = await self.store.drop_checkpoints(task["task_id"], from_step, by=actor)
        outcome = await self._retry(task, actor=actor, reason=reason)
        return {**outcome, "kept": [s["step"] for s in kept], "set_aside": [s["step"] for s in set_aside]}

    async def _verified(self, task: dict, *, upto: int | None) -> list[dict]:
        """The recorded steps (before ``upto``), in order, each output matching its hash:
        a replay must be checked, not assumed. Read from the durable store (what a person
        or a disk could have changed), not from the daemon's working copy."""
        await self.store.flushed(5.0)
        marks = [m for m in await self.store.recorded().checkpoints(task["task_id"]) if upto is None or m["step"] < upto]
        for expected, mark in enumerate(marks, start=1):
            if mark["step"] != expected:
                raise Refused(409, f"task {task['task_id']}: step {expected} is missing from its checkpoints "
                                   f"(found step {mark['step']}); refusing to replay")
            actual = content_hash(mark["output"])
            if actual != mark["hash"]:
                raise Refused(409, f"task {task['task_id']}: checkpoint {mark['step']} ({mark['step_id']}) does not "
                                   f"match its hash (recorded {mark['hash'][:19]}..., content {actual[:19]}...); "
                                   "refusing to replay it")
        return marks

    async def _cancel(self, task: dict, *, actor: str, reason: str, from_step: int | None = None) -> dict:
        if task["status"] in FINAL_TASK_STATES:
            if task["status"] == TaskState.CANCELLED:
                return {"status": "already_cancelled", "task_id": task["task_id"]}
            raise Refused(409, f"task {task['task_id']} is {task['status']}: only a live task can be cancelled")
        cancelled = await self.ledger.cancel(subtree(task, await self.store.tasks_of_run(task["run_id"])),
                                             reason=reason, detail={"by": actor, "reason": reason})
        if task["parent_task_id"] is None:
            await self.store.finish_run(task["run_id"], RunState.CANCELLED, None, {"reason": "cancelled", "by": actor})
        return {"status": "cancelled", "task_id": task["task_id"], "tasks": cancelled}

    def _awaiting(self, task: dict, *kinds: str) -> None:
        if task["status"] != TaskState.PARKED or task.get("parked_reason") not in kinds:
            waits = f" ({task['parked_reason']})" if task["status"] == TaskState.PARKED else ""
            raise Refused(409, f"task {task['task_id']} is {task['status']}{waits}: only a task parked "
                               f"{' or '.join(kinds)} can be {'approved' if 'budget_exceeded' not in kinds else 'failed'}")

    async def _approve(self, task: dict, *, actor: str, reason: str, from_step: int | None = None,
                       provider: str | None = None) -> dict:
        from tron.common.ladder import Approval

        self._awaiting(task, "awaiting_operator")
        if provider is not None and provider not in self.desk.board.providers:
            raise Refused(422, f"provider: {provider!r} is not a provider of this mesh "
                               f"({', '.join(self.desk.board.providers)})")
        svc = self.sup.services.get(task["agent"])
        if svc is None or svc.stopped:
            raise Refused(409, f"task {task['task_id']} belongs to {task['agent']}, which is stopped")
        if provider is not None and self.desk.board[provider].state != "closed":
            # The operator vouches for it: put it back now, or the task would only meet it open again.
            await self.desk.restore(provider, actor=actor, reason=f"approved task {task['task_id']} on it")
        if from_step is not None:
            # Going back to a step cannot happen inside the waiting agent: the later steps are
            # set aside and the agent restarted with the task, as `tron task resume` does.
            marks = await self.store.checkpoints(task["task_id"])
            last = marks[-1]["step"] if marks else 0
            if not 1 <= from_step <= last + 1:
                raise Refused(422, f"from_step must be between 1 and {last + 1} for task {task['task_id']} "
                                   f"({last} steps recorded)")
            kept = await self._verified(task, upto=from_step)
            set_aside = await self.store.drop_checkpoints(task["task_id"], from_step, by=actor)
            if provider:
                await self.store.set_task_provider(task["task_id"], provider)
                svc.provider = provider
                await self.store.set_agent(svc.name, provider=provider)
            outcome = await self._restart_with(task, svc, actor=actor, reason=reason)
            await self.store.event("task_approved", {"by": actor, "provider": provider, "from_step": from_step},
                                   agent=svc.name, task_id=task["task_id"], run_id=task["run_id"])
            return {**outcome, "status": "approved", "kept": [m["step"] for m in kept],
                    "set_aside": [m["step"] for m in set_aside]}
        await self.desk.approve(task, Approval(by=actor, provider=provider))
        await self.store.event("task_approved", {"by": actor, "provider": provider, "from_step": None},
                               agent=svc.name, task_id=task["task_id"], run_id=task["run_id"])
        return {"status": "approved", "task_id": task["task_id"], "provider": provider or task.get("provider")}

    async def _fail(self, task: dict, *, actor: str, reason: str, from_step: int | None = None) -> dict:
        from tron.common.models import PermanentFailure

        self._awaiting(task, "awaiting_operator", "budget_exceeded")
        answer = await self.carrier.fail(PermanentFailure(
            alert_id=new_id("op-"), service=task["agent"], task_id=task["task_id"],
            reason=f"failed_by_operator: {task['parked_reason']}", case="operator_failed",
            detail={"by": actor, "why": reason, "last_reason": task["parked_reason"]}, decided_by="operator",
            requested_by=DAEMON))
        self.desk.parked.pop(task["task_id"], None)
        return {"status": "failed", "task_id": task["task_id"], "recorded": answer.get("status")}
