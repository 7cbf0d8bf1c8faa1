"""The runtime every agent role shares: tasks in, results out, and the parent's side of
the ladder.

Agents return results; parents drive the lifecycle. A parent hands a task to a child
with ``delegate``: the assignment is recorded by the daemon first (so that a restarted
child gets it back, and a restarted parent finds a finished result instead of redoing
the work), then posted to the child, which answers 202 and works in the background,
beating with the task id and a progress marker. The result comes back to the parent's
``POST /task_result``.

Endpoints (all but /health need the mesh token):
    POST /tasks                      take a task (idempotent by task id)
    POST /task_result                a child's result, or a failure decided by the ladder
    POST /handle_child_timeout       TRON's alert about one of our children
    POST /handle_grandchild_failure  a child of ours gave up on its own child
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from common import logs
from common.config import DAEMON
from common.http import MeshHTTPError, error, parse, require_token
from common.ladder import apply_advice, parse_advice, plan_child_failure
from common.models import Alert, Escalation, EscalationRecord, RestartRequest, TaskAssign, TaskRecord, TaskResult
from common.service import ServiceContext

log = logging.getLogger("tron.agent")


class TaskFailed(Exception):
    def __init__(self, reason: str, detail: dict | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or {}


class Abandon(Exception):
    """Stop working on the task without reporting a result: the ladder owns it now
    (we reported a failure and will be restarted or replaced)."""


@dataclass
class Task:
    assign: TaskAssign
    started: float = field(default_factory=time.monotonic)
    progress: str | None = None
    waiting: int = 0  # sub-tasks this task is waiting on

    @property
    def id(self) -> str:
        return self.assign.task_id

    @property
    def resume_from(self) -> str | None:
        """The progress marker a previous incarnation reached, if any."""
        return self.assign.progress


def load_sdks() -> None:
    """Import the LLM SDKs (about 2 s here). Run in a thread: an import on the event
    loop would stop the heartbeats, and TRON would rightly call the agent hung."""
    import anthropic  # noqa: F401
    import ollama  # noqa: F401


class Agent:
    role = "agent"
    uses_llm = False  # roles that call the LLM load the SDKs in the background at start

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.policy = ctx.config.policy
        self.active: dict[str, Task] = {}
        self.waiting: dict[str, asyncio.Future] = {}
        self.early: dict[str, TaskResult] = {}
        self._bg: set[asyncio.Task] = set()
        self._sdks: asyncio.Future | None = None

    # -- the app ------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=512 * 1024)
        app.router.add_post("/tasks", self._h_task)
        app.router.add_post("/task_result", self._h_result)
        app.router.add_post("/handle_child_timeout", self._h_child_timeout)
        app.router.add_post("/handle_grandchild_failure", self._h_grandchild_failure)
        app.router.add_post("/drill/runaway", self._h_drill_runaway)
        self.add_routes(app)
        if self.uses_llm or self.policy.llm_advice:
            app.on_startup.append(self._preload)
        return app

    async def _preload(self, app: web.Application) -> None:
        self.sdks_ready()

    def sdks_ready(self) -> asyncio.Future:
        """The SDK import, started once, awaited by whoever needs it."""
        if self._sdks is None:
            self._sdks = asyncio.ensure_future(asyncio.to_thread(load_sdks))
        return self._sdks

    def add_routes(self, app: web.Application) -> None:
        """Roles add their own endpoints here."""

    @property
    def name(self) -> str:
        return self.ctx.name

    @property
    def daemon(self) -> str:
        return self.ctx.env.daemon_url

    def children(self) -> list[str]:
        return self.config.children(self.name)

    # -- tasks in -------------------------------------------------------------------------

    @require_token
    async def _h_task(self, request: web.Request) -> web.Response:
        assign = await parse(request, TaskAssign)
        if assign.task_id in self.active:
            return web.json_response({"status": "already_running", "task_id": assign.task_id})
        if assign.provider:
            self.ctx.provider = assign.provider
        task = Task(assign, progress=assign.progress)
        self.active[assign.task_id] = task
        self._refresh_beat_fields()
        logs.comms("task_received", src=assign.reply_to, dst=self.name, task=assign.task_id, run=assign.run_id,
                   incarnation=self.ctx.env.incarnation, attempt=assign.attempt, progress=assign.progress)
        self._bg_task(self._run(task))
        return web.json_response({"status": "accepted", "task_id": assign.task_id}, status=202)

    def set_progress(self, task: Task, marker: str) -> None:
        """Record how far the task has got; carried by the next beat, and handed to
        the next incarnation if this one dies."""
        task.progress = marker
        self._refresh_beat_fields()

    def _refresh_beat_fields(self) -> None:
        # The heartbeat carries one task: the oldest one still running here.
        if self.active:
            oldest = min(self.active.values(), key=lambda t: t.started)
            self.ctx.task_id, self.ctx.progress = oldest.id, oldest.progress
            self.ctx.waiting = oldest.waiting > 0
        else:
            self.ctx.task_id = self.ctx.progress = None
            self.ctx.waiting = False

    async def _run(self, task: Task) -> None:
        a = task.assign
        status, result, reason, detail = "done", None, None, {}
        try:
            result = await self.work(task)
        except Abandon:
            self.active.pop(a.task_id, None)
            self._refresh_beat_fields()
            return
        except TaskFailed as err:
            status, reason, detail = "failed", err.reason, err.detail
        except Exception as err:  # a bug in a role must still end the task with a reason
            log.exception("task %s crashed", a.task_id)
            status, reason, detail = "failed", f"internal_error:{type(err).__name__}", {"error": str(err)[:500]}
        finally:
            self.active.pop(a.task_id, None)
            self._refresh_beat_fields()
        outcome = TaskResult(task_id=a.task_id, run_id=a.run_id, status=status, result=result, reason=reason,
                             detail=detail, service=self.name, incarnation=self.ctx.env.incarnation)
        await self._finish(outcome, a.reply_to)

    async def _finish(self, outcome: TaskResult, reply_to: str) -> None:
        """Hand the result to the daemon, which records it and delivers it to the parent:
        if we die the moment after, nothing is lost."""
        finish = {"status": outcome.status, "result": outcome.result, "reason": outcome.reason,
                  "detail": outcome.detail, "incarnation": outcome.incarnation}
        logs.comms("task_finished", src=self.name, dst="daemon", task=outcome.task_id, run=outcome.run_id,
                   status=outcome.status, reason=outcome.reason, incarnation=self.ctx.env.incarnation, to=reply_to)
        await self._retrying(lambda: self.ctx.client.post(f"{self.daemon}/tasks/{outcome.task_id}/finish", finish),
                             what=f"record {outcome.task_id}", attempts=60)

    async def _retrying(self, call, *, what: str, attempts: int = 20) -> bool:
        """Bounded retries with capped backoff for hand-offs between live services."""
        delay = 0.05
        for _ in range(attempts):
            try:
                await call()
                return True
            except MeshHTTPError as err:
                if 400 <= err.status < 500:
                    log.error("%s refused: %s", what, err)
                    return False
                log.warning("%s failed: %s", what, err)
            except (OSError, asyncio.TimeoutError) as err:
                log.info("%s not delivered yet: %s", what, err)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        log.error("%s: giving up after %d attempts (the registry has the result)", what, attempts)
        return False

    async def work(self, task: Task) -> str:
        raise NotImplementedError

    @require_token
    async def _h_drill_runaway(self, request: web.Request) -> web.Response:
        """`tron drill runaway`: hold a task whose progress marker never moves, while
        the loop (and so the heartbeat) carries on: what a stuck LLM loop looks like."""
        task_id = f"drill-runaway-{uuid.uuid4().hex[:8]}"
        assign = TaskAssign(task_id=task_id, run_id="drill", kind="drill", prompt="runaway drill",
                            reply_to=self.name)
        self.active[task_id] = Task(assign, progress="runaway:stuck")
        self._refresh_beat_fields()
        log.warning("drill: holding a runaway task", extra={"task": task_id})
        return web.json_response({"task_id": task_id}, status=202)

    # -- tasks out ----------------------------------------------------------------------------

    async def delegate(self, parent: Task, child: str, index: int, kind: str, prompt: str) -> str:
        """Give a sub-task to a child and wait for its result. Raises TaskFailed."""
        task_id = f"{parent.id}.{index}"
        rec = TaskRecord(task_id=task_id, run_id=parent.assign.run_id, agent=child, parent_agent=self.name,
                         kind=kind, prompt=prompt, parent_task_id=parent.id, provider=self.ctx.provider)
        future = asyncio.get_running_loop().create_future()
        self.waiting[task_id] = future
        try:
            answer = await self.ctx.client.post(f"{self.daemon}/tasks", rec)
            row = answer["task"]
            if row["status"] == "done":
                return row["result"]  # finished before our restart: do not redo it
            if row["status"] == "failed":
                raise TaskFailed("child_task_failed", {"child": child, "task": task_id, "failure": row["failure"]})
            if task_id in self.early:
                self._resolve(self.early.pop(task_id))
            else:
                assign = TaskAssign(task_id=task_id, run_id=parent.assign.run_id, kind=kind, prompt=prompt,
                                    reply_to=self.name, parent_task_id=parent.id, attempt=row["attempt"],
                                    progress=row["progress"])
                logs.comms("task_dispatch", src=self.name, dst=child, task=task_id, run=parent.assign.run_id)
                try:
                    await self.ctx.client.post(self.config.url(child) + "/tasks", assign)
                except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
                    # The child is down: the daemon hands it the task when it is back.
                    log.warning("dispatch of %s to %s failed (%s); waiting for the ladder", task_id, child, err)
            bound = self.policy.task_timeout * (1 + self.policy.max_restarts + self.policy.max_provider_switches)
            parent.waiting += 1
            self._refresh_beat_fields()
            try:
                outcome: TaskResult = await asyncio.wait_for(asyncio.shield(future), bound)
            except asyncio.TimeoutError:
                raise TaskFailed("child_task_unanswered", {"child": child, "task": task_id, "waited": bound}) from None
            finally:
                parent.waiting -= 1
                self._refresh_beat_fields()
            if outcome.status == "failed":
                raise TaskFailed("child_task_failed", {"child": child, "task": task_id, "reason": outcome.reason,
                                                       "detail": outcome.detail})
            return outcome.result or ""
        finally:
            self.waiting.pop(task_id, None)

    @require_token
    async def _h_result(self, request: web.Request) -> web.Response:
        outcome = await parse(request, TaskResult)
        if not self._resolve(outcome):
            # Arrived before we (re)started waiting for it; bounded, oldest dropped
            # (the registry still has every result).
            self.early[outcome.task_id] = outcome
            while len(self.early) > 1000:
                self.early.pop(next(iter(self.early)))
        return web.json_response({"ok": True})

    def _resolve(self, outcome: TaskResult) -> bool:
        fut = self.waiting.get(outcome.task_id)
        if fut is None or fut.done():
            return False
        fut.set_result(outcome)
        return True

    # -- the ladder, parent side -----------------------------------------------------------------

    @require_token
    async def _h_child_timeout(self, request: web.Request) -> web.Response:
        alert = await parse(request, Alert)
        if alert.service not in self.config.services or self.name not in self.config.ancestors(alert.service):
            return error(422, f"{alert.service!r} is not a descendant of {self.name}")
        logs.comms("alert_received", src=DAEMON, dst=self.name, alert=alert.alert_id, agent=alert.service,
                   task=alert.task_id, run=alert.run_id)
        ladder = await self.ctx.client.get(f"{self.daemon}/agents/{alert.service}/ladder"
                                           + (f"?task_id={alert.task_id}" if alert.task_id else ""))
        plan = plan_child_failure(alert, ladder, self.policy, self.name)
        if self.policy.llm_advice and isinstance(plan, RestartRequest):
            plan = await self.advise(alert, ladder, plan)
        if isinstance(plan, Escalation) and plan.run_id is None:
            plan = plan.model_copy(update={"run_id": alert.run_id, "provider": alert.provider})
        if isinstance(plan, RestartRequest):
            try:
                answer = await self.ctx.client.post(f"{self.daemon}/control/restart", plan)
            except MeshHTTPError as err:
                answer = err.json()
            log.info("restart %s: %s", alert.service, answer.get("status"),
                     extra={"offender": alert.service, "reason": str(alert.reason), "alert": alert.alert_id})
            return web.json_response({"action": "restart", **answer})
        answer = await self.escalate(plan)
        return web.json_response({"action": "escalate", **answer})

    async def advise(self, alert: Alert, ladder: dict, plan: RestartRequest) -> RestartRequest | Escalation:
        """Ask the LLM whether to restart or escalate, within ``advice_timeout``. No
        answer, an unusable one, or a failure leaves the policy's decision as it was."""
        from common.prompts import system_prompt

        question = (f"Child {alert.service} failed: {alert.reason} {alert.detail}. Restarts in the window: "
                    f"{len(ladder.get('restart_times', []))} of {self.policy.max_restarts}. Task: {alert.task_id}.")
        try:
            async with asyncio.timeout(self.policy.advice_timeout):
                await self.sdks_ready()
                from common.providers import ProviderSettings, complete

                p = self.config.providers
                settings = ProviderSettings(sim_url=self.config.sim_url, anthropic_model=p.anthropic_model,
                                            ollama_model=p.ollama_model, timeout_s=self.policy.advice_timeout,
                                            max_tokens=64)
                reply = await complete(self.ctx.provider or p.default, system=system_prompt("advisor"),
                                       prompt=question, settings=settings)
            advice, rationale = parse_advice(reply.text)
            note = "unusable answer" if advice is None else "ok"
        except TimeoutError:
            advice, rationale, note = None, "", f"timeout after {self.policy.advice_timeout}s"
        except Exception as err:  # the advisor is optional: any failure means "no advice"
            advice, rationale, note = None, "", f"failed: {type(err).__name__}: {str(err)[:100]}"
        log.info("advice for %s: %s (%s)", alert.service, advice, note, extra={"alert": alert.alert_id})
        return apply_advice(plan, advice, rationale, note)

    async def escalate(self, esc: Escalation) -> dict:
        """Record this hop with the daemon, then hand the failure to our parent."""
        parent = self.config.spec(self.name).parent
        rec = EscalationRecord(alert_id=esc.alert_id, service=esc.service, task_id=esc.task_id, run_id=esc.run_id,
                               reason=esc.reason, detail={**esc.detail, "incarnation": esc.incarnation},
                               from_service=self.name, to_service=parent, restarts=esc.restarts,
                               decided_by=esc.decided_by)
        answer = await self.ctx.client.post(f"{self.daemon}/control/escalation", rec)
        if parent == DAEMON or answer.get("status") == "duplicate":
            return answer
        esc = esc.model_copy(update={"path": [*esc.path, parent]})
        logs.comms("escalation", src=self.name, dst=parent, alert=esc.alert_id, agent=esc.service, task=esc.task_id,
                   run=esc.run_id, reason=esc.reason)
        try:
            await self.ctx.client.post(self.config.url(parent) + "/handle_grandchild_failure", esc,
                                       timeout=self.policy.alert_delivery_timeout * 5)
        except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
            log.error("escalation to %s not delivered: %s", parent, err, extra={"alert": esc.alert_id})
            return {**answer, "forwarded": False}
        return {**answer, "forwarded": True}

    @require_token
    async def _h_grandchild_failure(self, request: web.Request) -> web.Response:
        esc = await parse(request, Escalation)
        if esc.service not in self.config.services or self.name not in self.config.ancestors(esc.service):
            return error(422, f"{esc.service!r} is not a descendant of {self.name}")
        return web.json_response(await self.on_grandchild_failure(esc))

    async def on_grandchild_failure(self, esc: Escalation) -> dict:
        """Not the root: pass it up, one ancestor at a time, each hop on record."""
        return await self.escalate(esc)

    # -- the LLM ------------------------------------------------------------------------------

    async def llm(self, task: Task, prompt: str, *, stream: bool = False) -> str:
        """Ask this agent's current provider. A provider failure is reported to the
        daemon as an alert (with its classified reason and retryable flag) and the task
        is abandoned here: the ladder decides what happens next."""
        from common.providers import ProviderFailure, ProviderSettings, complete  # SDKs load lazily
        from common.prompts import system_prompt

        p = self.config.providers
        settings = ProviderSettings(sim_url=self.config.sim_url, anthropic_model=p.anthropic_model,
                                    ollama_model=p.ollama_model, timeout_s=p.timeout, max_tokens=p.max_tokens)
        provider = self.ctx.provider or p.default
        await self.sdks_ready()
        try:
            reply = await complete(provider, system=system_prompt(self.role), prompt=prompt, settings=settings,
                                   stream=stream)
        except ProviderFailure as failure:
            await self.report_failure(task, failure)
            raise Abandon() from failure
        return reply.text

    async def report_failure(self, task: Task, failure) -> None:
        body = {"service": self.name, "incarnation": self.ctx.env.incarnation, "task_id": task.id,
                "reason": failure.reason, "retryable": failure.retryable, "detail": failure.to_dict()}
        log.warning("provider failure: %s", failure.reason,
                    extra={"task": task.id, "provider": failure.provider, "reason": failure.reason})
        await self._retrying(lambda: self.ctx.client.post(f"{self.daemon}/control/report_failure", body),
                             what=f"report failure of {task.id}", attempts=10)

    # -- helpers ------------------------------------------------------------------------------

    def _bg_task(self, coro) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        return t
