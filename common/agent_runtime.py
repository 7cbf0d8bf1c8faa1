"""The runtime under every agent: its HTTP endpoints, task intake, the fields its beats
carry, steps and checkpoints, LLM calls under the ladder, delegation, and the end of a
task (recorded by the daemon before the parent hears of it).

A user never sees it: ``Agent`` (common/agent.py, public as ``tron.sdk``) holds one in its
private ``_tron`` attribute and forwards its public methods here, and the runtime calls back
into the agent only for what the SDK documents (``work``, ``add_routes``, ``role``,
``uses_llm``, ``system``). So a subclass may name its own attributes ``take``, ``view``,
``client``, ``actions``, ``ctx`` ... without touching Tron's. A parent's side of the ladder is
composed in as a ``ParentRole`` (common/ladder_parent.py), only when the service has
children; the runaway drill's hook only when ``[drills] enabled``.

Endpoints (all but /health need a peer token the daemon made for this service):
    POST /tasks                      take a task (idempotent by task id)
    POST /task_result                a child's result, or a failure decided by the ladder
    POST /tasks/{id}/cancel          an operator cancelled the task
    POST /handle_child_timeout       TRON's alert about one of our children (parents only)
    POST /handle_grandchild_failure  a child of ours gave up on its own child (parents only)
    POST /drill/runaway              `tron drill runaway` (only with [drills] enabled)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Literal, cast

from aiohttp import web

from tron.common import logs, telemetry
from tron.common.agent import (PROVIDER_POLL, REFUSALS, Abandon, ProviderMoved, Task, TaskFailed, _current, carried_task,
                               load_sdks)
from tron.common.clock import Clock, MonotonicClock
from tron.common.providers.client import off_loop
from tron.common.http import MeshHTTPError, parse, parse_empty, require_token
from tron.common.ladder import compute_backoff, worst_case_attempts
from tron.common.models import CheckpointRecord, TaskAssign, TaskRecord, TaskResult
from tron.common.service import ServiceContext

if TYPE_CHECKING:
    from tron.common.agent import Agent
    from tron.common.ladder_parent import ParentRole
    from tron.common.providers import LLMReply, ProviderFailure, ProviderSettings

# What ``under_ladder``'s ``inspect`` makes of a call's result: (a failure or None, the answer as a reply or None).
Inspect = Callable[[str, Any], "tuple[ProviderFailure | None, LLMReply | None]"]

log = logging.getLogger("tron.agent")

# While a parent waits for a child's task, it looks at the registry's row this often: a result
# recorded there that never reached it (lost on its way, or by a bug here) ends the wait within
# this, not after task_timeout x every attempt (70 min with the shipped policy).
RESULT_RECHECK = 30.0


def agent_app(agent: Agent) -> web.Application:
    """The aiohttp application that serves ``agent`` (what services/*/app.py return)."""
    return agent._tron.make_app()


class AgentRuntime:
    """One agent's runtime: built by ``Agent.__init__``, it owns the service context."""

    def __init__(self, agent: Agent, ctx: ServiceContext) -> None:
        self.agent = agent
        self.ctx = ctx
        self.config = ctx.config
        self.policy = ctx.config.policy
        self.active: dict[str, Task] = {}
        ctx.tasks = []  # named in every beat: the daemon notices a leased task nobody works on
        self.waiting: dict[str, asyncio.Future[TaskResult]] = {}
        self.early: dict[str, TaskResult] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._sdks: asyncio.Future[None] | None = None
        self._runs: dict[str, asyncio.Task[Any]] = {}  # task id -> the coroutine working on it
        self.clock: Clock = MonotonicClock()  # backoffs between hand-off retries (a test hands in a fake)
        self.result_recheck = RESULT_RECHECK
        self.parent: ParentRole | None = None
        if self.config.children(self.name):  # only a parent decides about children
            from tron.common.ladder_parent import ParentRole

            self.parent = ParentRole(self)

    # -- the app ------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=512 * 1024)
        app.router.add_post("/tasks", self._h_task)
        app.router.add_post("/task_result", self._h_result)
        if self.parent is not None:
            self.parent.add_routes(app)
        if self.config.drills.enabled:
            app.router.add_post("/drill/runaway", self._h_drill_runaway)
        app.router.add_post("/tasks/{task_id}/cancel", self._h_cancel)
        self.agent.add_routes(app)
        if self.agent.uses_llm or self.policy.llm_advice:
            app.on_startup.append(self._preload)
        return app

    async def _preload(self, app: web.Application) -> None:
        from tron.common.providers import sdks_deferred

        # Forked from the fork server, the SDKs are there or come at the first call; but a
        # parent's advisor must answer within advice_timeout, which has no room for the import.
        if not sdks_deferred() or (self.parent is not None and self.policy.llm_advice):
            self.sdks_ready()

    def sdks_ready(self) -> asyncio.Future[None]:
        """The SDK import, started once, awaited by whoever needs it."""
        if self._sdks is None:
            self._sdks = off_loop(load_sdks, self.ctx.config.sdks)  # never waited for by a stop
        return self._sdks

    @property
    def name(self) -> str:
        return self.ctx.name

    @property
    def daemon(self) -> str:
        return self.ctx.env.daemon_url

    def children(self) -> list[str]:
        """Whom it delegates to: a replicated child by its own name (the daemon picks the replica)."""
        return self.config.child_services(self.name)

    # -- tasks in -------------------------------------------------------------------------

    @require_token
    async def _h_task(self, request: web.Request) -> web.Response:
        answer = self.take(await parse(request, TaskAssign))
        return web.json_response(answer, status=202 if answer["status"] == "accepted" else 200)

    def take(self, assign: TaskAssign) -> dict[str, str]:
        """Start working on a task, once: the same attempt again is already running; a
        later attempt (an operator retried it) stops the older one and takes its place."""
        current = self.active.get(assign.task_id)
        if current is not None:
            if assign.attempt <= current.assign.attempt:
                return {"status": "already_running", "task_id": assign.task_id}
            run = self._runs.get(assign.task_id)
            if run is not None:
                run.cancel()
        if assign.provider:
            self.ctx.provider = assign.provider
        # A new task starts on the service's own provider (the chain's first unless mesh.toml
        # names one); if that one is open, the desk moves it at its first call, sending nothing.
        task = Task(assign, progress=assign.progress, provider=assign.provider or self.preferred_provider)
        self.active[assign.task_id] = task
        self._refresh_beat_fields()
        logs.comms("task_received", src=assign.reply_to, dst=self.name, task=assign.task_id, run=assign.run_id,
                   incarnation=self.ctx.env.incarnation, attempt=assign.attempt, progress=assign.progress)
        self._runs[assign.task_id] = self._bg_task(self._run(task))
        return {"status": "accepted", "task_id": assign.task_id}

    def set_progress(self, task: Task, marker: str) -> None:
        """Record how far the task has got; carried by the next beat, and handed to
        the next incarnation if this one dies."""
        task.progress = marker
        self._refresh_beat_fields()

    async def step(self, task: Task, number: int, step_id: str, produce: Callable[[str], Awaitable[str]], *,
                   total: int | None = None) -> str:
        """Run one step of a task, resumably: a step an earlier incarnation completed is not
        run again (its recorded output is returned); otherwise the progress marker moves,
        ``produce(previous_output)`` runs, and its output is checkpointed before it is
        returned. ``previous_output`` is the last completed step's output ("" for the first)."""
        done = task.steps
        if number not in done and task.completed and number < task.completed["step"] and not task.fetched:
            # Resumed after a later step: the earlier outputs are in the registry, not in the hand-over.
            task.fetched = True
            try:
                marks = await self.ctx.client.get(f"{self.daemon}/tasks/{task.id}/checkpoints")
                done.update({m["step"]: m for m in marks if m["step"] <= task.completed["step"]})
            except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
                log.warning("earlier steps of %s unreadable (%s): they run again", task.id, err)
        if number in done:
            return cast(str, done[number]["output"])
        previous = max((s for s in done if s < number), default=None)
        self.set_progress(task, f"step:{number}" + (f"/{total}" if total else ""))
        with telemetry.step_span(task.id, number, step_id):
            output = await produce(done[previous]["output"] if previous is not None else "")
            await self.checkpoint(task, number, step_id, output)
        done[number] = {"step": number, "step_id": step_id, "output": output}
        return output

    @property
    def preferred_provider(self) -> str:
        """Where this service's new tasks start: its own `provider`, else the chain's default."""
        spec = self.config.services.get(self.config.standing_for(self.name) or self.name)
        return (spec.provider if spec is not None else None) or self.config.providers.default

    @property
    def provider(self) -> str:
        """The provider of the task being worked on here (the ladder may have moved it), else
        this incarnation's."""
        task = _current.get()
        return (task.provider if task is not None else None) or self.ctx.provider or self.config.providers.default

    @property
    def model(self) -> str:
        """The configured model of this incarnation's provider."""
        return cast(str, getattr(self.config.providers, f"{self.provider}_model"))

    def client(self, provider: str | None = None) -> Any:
        """The SDK client of a provider (this incarnation's by default: the root may have
        switched it), ready to use: pointed at the real service or llm-sim, an explicit
        timeout, and the SDK's own retries off (the ladder is the one retry authority)."""
        from tron.common.providers import client_for

        return client_for(provider or self.provider, self.provider_settings())

    async def call_llm(self, task: Task, request: Callable[[Any], Awaitable[Any]], *, tools: list[Any] | None = None,
                       complete: bool = False) -> Any:
        """A direct SDK call under the ladder, for what ``llm`` does not do (tools,
        structured output, embeddings): ``await request(client)`` with the task's ready
        client. Every call goes through the mesh's governor, a failure is classified
        (status, error type) and the ladder answers it in place: wait and retry, switch
        provider, park while every provider is down, or fail the task. With ``tools`` (as
        given to the SDK), tool calls whose arguments break their schema count as failures::

            reply = await self.call_llm(task, lambda c: c.messages.create(model=self.model, ...))
        """
        from tron.common.providers import check_tool_calls, reply_of

        def inspect(provider: str, response: Any) -> tuple[ProviderFailure | None, LLMReply | None]:
            # Only a generation's answer is checked (not an embedding, a stream object, a count).
            answer = any(hasattr(response, a) for a in ("content", "choices", "message", "output")) \
                or isinstance(getattr(response, "response", None), str)
            reply = reply_of(provider, response) if answer else None
            failure = self._check_reply(task, reply, complete=complete) if reply is not None else None
            if failure is None and tools:
                failure = check_tool_calls(provider, response, tools)
            return failure, reply

        return await self.under_ladder(task, lambda provider: request(self.client(provider)), inspect,
                                       portable=False)

    def _check_reply(self, task: Task, reply: LLMReply, *, complete: bool) -> ProviderFailure | None:
        """An answer that is 200 OK but broken (empty, cut at max_tokens where a whole one
        is needed, a refusal, the same answer again and again) is a provider failure."""
        from tron.common.providers import RepeatGuard, check_reply

        checks = self.config.output_checks(self.name)
        failure = check_reply(reply, checks, complete=complete)
        if failure is None and checks.repeat_limit and reply.text:
            if task._repeats is None:
                task._repeats = RepeatGuard()
            failure = task._repeats.check(reply.text, checks.repeat_limit, provider=reply.provider)
        return failure

    async def under_ladder(self, task: Task, call: Callable[[str], Awaitable[Any]], inspect: Inspect | None = None, *,
                           portable: bool = True, content: tuple[str, str] | None = None) -> Any:
        """Run ``call(provider)`` under the mesh's provider supervision until it succeeds;
        raise ``Abandon`` when the ladder ended the task (failed for good, cancelled).

        Before each try the daemon's governor admits it (or holds it through a rate limit
        every agent shares); after it, the outcome goes back, and a failure is answered
        with the ladder's decision, carried out here, in this incarnation: no process is
        killed for a provider's trouble. ``inspect(provider, result)`` returns
        ``(failure or None, LLMReply or None)`` for answers that came back broken.
        ``portable``: ``call`` works on any provider (``llm``); a provider-specific call
        (``call_llm``'s SDK request) that is moved raises ``ProviderMoved`` instead, and the
        task's work runs again on the new provider. ``content``: (system, prompt), for the
        call's trace span when ``[telemetry] capture_content`` is on."""
        from tron.common.providers import ProviderFailure, classify, sdk_ready, sdk_warm, sdks_deferred

        if not sdks_deferred():
            await self.sdks_ready()
        while True:
            provider = task.provider or self.provider
            if not sdk_warm(provider):  # forked before the fork server had it: this one SDK, off the loop, once
                with self._waiting(task):  # the beats say the task waits for it: no runaway (1-2 s, more under load)
                    await sdk_ready(provider)
            with self._waiting(task):  # a wait in the governor's queue (a rate limit, a probe out) is no runaway
                answer = await self._desk("acquire", task, provider)
            if answer is not None and answer.get("action") != "go":
                await self._follow(task, answer, portable=portable)
                continue
            governed = answer is not None
            started = time.monotonic()
            with telemetry.llm_span(provider, getattr(self.config.providers, f"{provider}_model", None),
                                    system=content[0] if content else None,
                                    prompt=content[1] if content else None) as span:
                try:
                    result = await call(provider)
                    failure, reply = inspect(provider, result) if inspect else (None, None)
                except asyncio.CancelledError:
                    if governed:
                        self._bg_task(self._desk("outcome", task, provider, ok=False, cancelled=True))
                    raise
                except ProviderFailure as err:
                    failure, reply = err, None
                except Exception as err:
                    failure, reply = classify(err, provider), None
                telemetry.llm_result(span, reply, failure)
            usage = self._usage(task, provider, reply, started)
            if failure is None:
                limits = getattr(reply, "limits", None) or {}
                if governed:
                    await self._desk("outcome", task, provider, ok=True, usage=usage, limits=limits)
                elif usage:  # not admitted (the daemon refused or was away): its usage still counts, if it can be told
                    self._bg_task(self._desk("outcome", task, provider, ok=True, usage=usage, admitted=False))
                return result
            log.warning("provider failure: %s", failure.reason,
                        extra={"task": task.id, "provider": failure.provider, "reason": failure.reason})
            decision = await self._desk("outcome", task, provider, ok=False, failure=failure.to_dict(),
                                        admitted=governed, usage=usage)
            if decision is None:  # the daemon cannot be reached: the old way, an alert when it is back
                await self.report_failure(task, failure)
                raise Abandon() from failure
            await self._follow(task, decision, portable=portable)

    @staticmethod
    def _usage(task: Task, provider: str, reply: LLMReply | None, started: float) -> dict[str, Any] | None:
        """What the call used, as the provider's answer says (a broken answer used tokens
        too), for the registry's llm_usage row and its cost."""
        if reply is None:
            return None
        return {"provider": provider, "model": (reply.model or "unknown")[:128], "input_tokens": reply.input_tokens,
                "output_tokens": reply.output_tokens, "cache_read_tokens": reply.cache_read_tokens,
                "cache_write_tokens": reply.cache_write_tokens,
                "duration_ms": round((time.monotonic() - started) * 1000, 3), "step": (task.progress or "")[:128] or None}

    async def _desk(self, verb: str, task: Task, provider: str, **outcome: Any) -> dict[str, Any] | None:
        """One request to the daemon's provider desk; None when it cannot be reached."""
        body = {"service": self.name, "incarnation": self.ctx.env.incarnation, "task_id": task.id,
                "provider": provider}
        body.update(outcome)
        for tries in range(1, 6):
            try:
                return cast(dict[str, Any], await self.ctx.client.post(f"{self.daemon}/providers/{verb}", body,
                                                                      timeout=PROVIDER_POLL))
            except MeshHTTPError as err:
                if err.status == 409:
                    raise Abandon() from err  # we are not the current incarnation any more
                log.warning("provider %s refused: %s", verb, err)
                return None
            except (OSError, asyncio.TimeoutError) as err:
                log.info("provider %s not delivered yet: %s", verb, err)
                await self.clock.sleep(compute_backoff(tries, initial=0.05, factor=2, max_backoff=1.0, jitter=0.1))
        return None

    async def _follow(self, task: Task, answer: dict[str, Any], *, portable: bool = True) -> None:
        """Carry out the ladder's answer to a provider failure, in this incarnation."""
        action = answer.get("action")
        was = task.provider
        telemetry.event(task.span, action or "abandon", case=answer.get("case"), provider=answer.get("provider"),
                        delay=answer.get("delay"), reason=answer.get("reason") or answer.get("why"), task=task.id)
        if action in ("wait", "retry"):
            await self._wait(task, float(answer.get("delay") or 0.0))
        elif action == "switch":
            task.provider = self.ctx.provider = answer["provider"]
            log.warning("provider switched in place to %s", answer["provider"], extra={"task": task.id})
            await self._wait(task, float(answer.get("delay") or 0.0))
        elif action == "park":
            log.error("task parked: %s", answer.get("reason"), extra={"task": task.id})
            await self._parked(task)
        elif action in ("fail", "abandon"):
            log.error("task ended by the ladder: %s", answer.get("reason") or answer.get("why"),
                      extra={"task": task.id, "case": answer.get("case")})
            raise Abandon()
        else:
            raise Abandon()
        if not portable and task.provider != was:
            raise ProviderMoved(task.provider or self.provider)

    @contextlib.contextmanager
    def _waiting(self, task: Task) -> Iterator[None]:
        """While the task waits on the ladder (a delay, the governor, a park), its beats say so:
        TRON does not count it as a runaway, nor its wall clock against task_timeout."""
        task.waiting += 1
        self._refresh_beat_fields()
        try:
            yield
        finally:
            task.waiting -= 1
            self._refresh_beat_fields()

    async def _wait(self, task: Task, seconds: float) -> None:
        """A wait the ladder asked for: beats say the task waits (not a runaway)."""
        if seconds <= 0:
            return
        with self._waiting(task):
            await self.clock.sleep(seconds)

    async def _parked(self, task: Task) -> None:
        with self._waiting(task):
            while True:
                answer = await self._desk("park", task, task.provider or self.provider)
                if answer is None:
                    await self.clock.sleep(1.0)
                    continue
                if answer.get("action") == "park":
                    continue
                if answer.get("action") == "resume":
                    task.provider = self.ctx.provider = answer.get("provider") or task.provider
                    log.warning("parked task resumes on %s", task.provider, extra={"task": task.id})
                    return
                raise Abandon()

    async def checkpoint(self, task: Task, step: int, step_id: str, output: str) -> None:
        """Record a completed step (its output kept, hashed, by the daemon): a restart
        resumes after it, handed this output, instead of redoing the step."""
        body = CheckpointRecord(step=step, step_id=step_id, output=output, incarnation=self.ctx.env.incarnation)
        await self._retrying(lambda: self.ctx.client.post(f"{self.daemon}/tasks/{task.id}/checkpoint", body),
                             what=f"checkpoint {task.id} step {step}", attempts=10)

    def _refresh_beat_fields(self) -> None:
        # The heartbeat carries one task (carried_task says which), and every id.
        self.ctx.tasks = list(self.active)
        carried = carried_task(self.active.values(), self.ctx.task_id)
        if carried is not None:
            self.ctx.task_id, self.ctx.progress = carried.id, carried.progress
            self.ctx.waiting = carried.waiting > 0
        else:
            self.ctx.task_id = self.ctx.progress = None
            self.ctx.waiting = False

    async def _run(self, task: Task) -> None:
        with telemetry.task_span(self.name, task.assign, task.provider) as task.span:
            log.info("task started", extra={"task": task.id, "run": task.assign.run_id, "attempt": task.assign.attempt,
                                            "progress": task.resume_from})
            await self._attempt(task)

    async def _attempt(self, task: Task) -> None:
        a = task.assign
        status: Literal["done", "failed"] = "done"
        result: str | None = None
        reason: str | None = None
        detail: dict[str, Any] = {}
        _current.set(task)  # this asyncio task's own context: the provider is the task's
        try:
            while True:
                try:
                    result = await self.agent.work(task)
                    break
                except ProviderMoved as moved:  # the switch is recorded: work again, on the new provider
                    log.warning("task %s moves to %s: its work runs again from its last step", a.task_id,
                                moved.provider, extra={"task": a.task_id})
        except Abandon:
            telemetry.task_result(task.span, "abandoned", "ended_by_ladder", task.provider)
            return
        except TaskFailed as err:
            status, reason, detail = "failed", err.reason, err.detail
        except Exception as err:  # a bug in a role must still end the task with a reason
            log.exception("task %s crashed", a.task_id)
            status, reason, detail = "failed", f"internal_error:{type(err).__name__}", {"error": str(err)[:500]}
        finally:
            if self.active.get(a.task_id) is task:  # not a newer attempt's, which may have taken the slot
                self.active.pop(a.task_id, None)
                self._runs.pop(a.task_id, None)
            self._refresh_beat_fields()
        telemetry.task_result(task.span, status, reason, task.provider)
        outcome = TaskResult(task_id=a.task_id, run_id=a.run_id, status=status, result=result, reason=reason,
                             detail=detail, service=self.name, incarnation=self.ctx.env.incarnation)
        await self._finish(outcome, a.reply_to, a.attempt)

    async def _finish(self, outcome: TaskResult, reply_to: str, attempt: int | None = None) -> None:
        """Hand the result to the daemon, which records it and delivers it to the parent:
        if we die the moment after, nothing is lost. The attempt is named, so a late end of
        an attempt an operator has since retried is refused, not taken for the new one's."""
        finish = {"status": outcome.status, "result": outcome.result, "reason": outcome.reason,
                  "detail": outcome.detail, "incarnation": outcome.incarnation, "attempt": attempt}
        log.info("task finished", extra={"task": outcome.task_id, "run": outcome.run_id, "status": outcome.status,
                                         "reason": outcome.reason, "attempt": attempt})
        logs.comms("task_finished", src=self.name, dst="daemon", task=outcome.task_id, run=outcome.run_id,
                   status=outcome.status, reason=outcome.reason, incarnation=self.ctx.env.incarnation, to=reply_to)
        await self._retrying(lambda: self.ctx.client.post(f"{self.daemon}/tasks/{outcome.task_id}/finish", finish),
                             what=f"record {outcome.task_id}", attempts=60)

    async def _retrying(self, call: Callable[[], Awaitable[Any]], *, what: str, attempts: int = 20) -> bool:
        """Bounded retries with capped backoff for hand-offs between live services."""
        for tries in range(1, attempts + 1):
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
            if tries < attempts:
                await self.clock.sleep(compute_backoff(tries, initial=0.05, factor=2, max_backoff=2.0, jitter=0.1))
        log.error("%s: giving up after %d attempts (the registry has the result)", what, attempts)
        return False

    @require_token
    async def _h_cancel(self, request: web.Request) -> web.Response:
        """An operator cancelled the task (the registry already says so): stop working on it."""
        await parse_empty(request)
        run = self._runs.get(request.match_info["task_id"])
        if run is None or run.done():
            return web.json_response({"status": "not_running"})
        run.cancel()
        return web.json_response({"status": "cancelled"})

    @require_token
    async def _h_drill_runaway(self, request: web.Request) -> web.Response:
        """`tron drill runaway`: hold a task whose progress marker never moves, while
        the loop (and so the heartbeat) carries on: what a stuck LLM loop looks like."""
        await parse_empty(request)
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
                         kind=kind, prompt=prompt, parent_task_id=parent.id, provider=self.ctx.provider,
                         traceparent=telemetry.current_traceparent())
        future = asyncio.get_running_loop().create_future()
        self.waiting[task_id] = future
        try:
            try:
                answer = await self.ctx.client.post(f"{self.daemon}/tasks", rec)
            except MeshHTTPError as err:
                refusal = err.json()
                if err.status == 409 and refusal.get("reason") in REFUSALS:
                    # A paused lane or service: the run fails fast with that reason instead
                    # of climbing the ladder again.
                    raise TaskFailed(refusal["reason"], {"child": child, "task": task_id, "refusal": refusal}) from None
                raise
            row = answer["task"]
            child = row["agent"]  # a replicated child (NAME): the daemon named the replica that takes it
            # Where it listens, as the daemon knows it now: a replica scaled up since our file was read too.
            child_url = answer.get("url") or self.config.url(child)
            child_spec = self.config.services[self.config.standing_for(child) or child]
            self.ctx.learn_peer(child, child_url)
            if row["status"] == "done":
                return cast(str, row["result"])  # finished before our restart: do not redo it
            if row["status"] == "failed":
                raise TaskFailed("child_task_failed", {"child": child, "task": task_id, "failure": row["failure"]})
            if task_id in self.early:
                self._resolve(self.early.pop(task_id))
            elif not child_spec.is_agent:
                pass  # a command that speaks the contract claims its tasks from the daemon itself
            elif answer.get("dispatch") is False:
                pass  # the child is down or coming up: the daemon hands it the task when it is healthy
            else:
                assign = TaskAssign(task_id=task_id, run_id=parent.assign.run_id, kind=kind, prompt=prompt,
                                    reply_to=self.name, parent_task_id=parent.id, attempt=row["attempt"],
                                    progress=row["progress"], traceparent=row.get("traceparent"))
                logs.comms("task_dispatch", src=self.name, dst=child, task=task_id, run=parent.assign.run_id)
                try:
                    await self.ctx.client.post(child_url + "/tasks", assign)
                except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
                    # The child is down: the daemon hands it the task when it is back.
                    log.warning("dispatch of %s to %s failed (%s); waiting for the ladder", task_id, child, err)
            bound = self.policy.task_timeout * worst_case_attempts(self.policy)
            parent.waiting += 1
            self._refresh_beat_fields()
            try:
                outcome = await self._child_outcome(future, task_id, bound)
            except asyncio.TimeoutError:
                raise TaskFailed("child_task_unanswered", {"child": child, "task": task_id, "waited": bound}) from None
            finally:
                parent.waiting -= 1
                self._refresh_beat_fields()
            if outcome.status == "failed":
                reason = outcome.reason if outcome.reason in REFUSALS else "child_task_failed"
                raise TaskFailed(reason, {"child": child, "task": task_id, "reason": outcome.reason,
                                          "detail": outcome.detail})
            return outcome.result or ""
        finally:
            # Only our own waiter: an older attempt of the parent, cancelled while it waited,
            # gets here after the newer one began to wait for the same child task.
            if self.waiting.get(task_id) is future:
                del self.waiting[task_id]

    async def _child_outcome(self, future: asyncio.Future[TaskResult], task_id: str, bound: float) -> TaskResult:
        """The child task's result as the daemon delivers it; failing that, as the registry
        has it, looked at every ``result_recheck`` s. asyncio.TimeoutError after ``bound``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError()
            try:
                return await asyncio.wait_for(asyncio.shield(future), min(left, self.result_recheck))
            except asyncio.TimeoutError:
                pass
            try:
                row = await self.ctx.client.get(f"{self.daemon}/tasks/{task_id}")
            except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
                log.info("could not look at %s in the registry: %s", task_id, err)
                continue
            if isinstance(row, dict) and row.get("status") in ("done", "failed") and not future.done():
                log.warning("the result of %s was recorded but never reached this agent: taken from the registry",
                            task_id, extra={"task": task_id})
                failure = dict(row.get("failure") or {})
                return TaskResult(task_id=task_id, run_id=row["run_id"], status=row["status"], result=row.get("result"),
                                  reason=failure.pop("reason", None), detail=failure, service=row["agent"])

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

    def provider_settings(self, *, timeout: float | None = None, max_tokens: int | None = None) -> ProviderSettings:
        return self.config.provider_settings(timeout=timeout, max_tokens=max_tokens)

    # -- the LLM ------------------------------------------------------------------------------

    async def llm(self, task: Task, prompt: str, *, system: str | None = None, stream: bool = False,
                  complete: bool = False) -> str:
        """Ask the task's provider, under the ladder (see ``under_ladder``): a provider
        failure is retried, switched or parked in place, and only a task the ladder ended
        leaves here (as ``Abandon``). ``complete``: the step needs a whole answer, so one
        cut at max_tokens is a failure too."""
        from tron.common.prompts import system_prompt
        from tron.common.providers import provider_for  # SDKs load lazily

        system = system or self.agent.system or system_prompt(self.agent.role)

        async def call(provider: str) -> LLMReply:
            return await provider_for(provider).complete(system=system, prompt=prompt,
                                                         settings=self.provider_settings(), stream=stream)

        def inspect(provider: str, reply: LLMReply) -> tuple[ProviderFailure | None, LLMReply]:
            return self._check_reply(task, reply, complete=complete), reply

        reply: LLMReply = await self.under_ladder(task, call, inspect, content=(system, prompt))
        return reply.text

    async def report_failure(self, task: Task, failure: ProviderFailure) -> None:
        body = {"service": self.name, "incarnation": self.ctx.env.incarnation, "task_id": task.id,
                "reason": failure.reason, "retryable": failure.retryable, "detail": failure.to_dict()}
        log.warning("provider failure: %s", failure.reason,
                    extra={"task": task.id, "provider": failure.provider, "reason": failure.reason})
        await self._retrying(lambda: self.ctx.client.post(f"{self.daemon}/control/report_failure", body),
                             what=f"report failure of {task.id}", attempts=10)

    # -- helpers ------------------------------------------------------------------------------

    def _bg_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        return t

