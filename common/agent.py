"""The agent SDK: the runtime every agent shares, the built-in roles and a user's own.

A user's agent subclasses ``Agent`` and writes ``work``; mesh.toml names it
(``agent = "package.module:Class"``) and the daemon runs it like a built-in role::

    class Summarise(Agent):
        uses_llm = True                       # load the LLM SDKs in the background at start
        system = "You summarise documents."   # llm()'s system prompt

        async def work(self, task: Task) -> str:
            notes = await self.step(task, 1, "read", lambda _: self.llm(task, task.assign.prompt))
            return await self.step(task, 2, "summary", lambda notes: self.llm(task, "Summarise: " + notes))

What it gets for nothing: heartbeats from its own event loop (a blocked loop is a hung
agent); ``step`` (a progress marker, then a checkpoint of the step's output, so a new
incarnation resumes after the last completed step with its output instead of redoing
it); ``llm`` on the provider the ladder assigned to this incarnation (a provider failure
is classified and reported, and the ladder decides: restart, switch provider, fail);
``client()`` for the ready-made anthropic / ollama / openai SDK client of that provider
(SDK retries off, explicit timeout); ``delegate`` for sub-tasks to its children;
``TaskFailed(reason)`` to fail a task with a reason of its own; ``set_progress`` for a
marker between steps. Everything is in the registry before it is acknowledged.

Agents return results; parents drive the lifecycle. A parent hands a task to a child
with ``delegate``: the assignment is recorded by the daemon first (so that a restarted
child gets it back, and a restarted parent finds a finished result instead of redoing
the work), then posted to the child, which answers 202 and works in the background,
beating with the task id and a progress marker. The result comes back to the parent's
``POST /task_result``.

Endpoints (all but /health need a peer token the daemon made for this service):
    POST /tasks                      take a task (idempotent by task id)
    POST /task_result                a child's result, or a failure decided by the ladder
    POST /tasks/{id}/cancel          an operator cancelled the task
    POST /handle_child_timeout       TRON's alert about one of our children
    POST /handle_grandchild_failure  a child of ours gave up on its own child
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlencode

from aiohttp import web

from common import logs, telemetry
from common.config import DAEMON
from common.carry import carry_out, loop_alert_id
from common.clock import Clock, MonotonicClock
from common.http import MeshHTTPError, error, parse, parse_empty, require_token
from common.ladder import (ChildFailed, Escalate, Escalated, Fail, LadderView, Park, Restart, SwitchProvider,
                           compute_backoff, decide, fold_advice, parse_advice, worst_case_attempts)
from common.models import (Alert, CheckpointRecord, Escalation, EscalationRecord, ParkRequest, PermanentFailure,
                           RestartRequest, SwitchRequest, TaskAssign, TaskRecord, TaskResult)
from common.providers import SDKS
from common.service import ServiceContext

log = logging.getLogger("tron.agent")


PROVIDER_POLL = 25.0  # the daemon answers an acquire or a park within 20 s (a long poll)
# Reasons a run fails fast with, passed up unchanged from the task that met them.
REFUSALS = ("lane_paused", "service_paused")


class TaskFailed(Exception):
    def __init__(self, reason: str, detail: dict | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or {}


class ProviderMoved(Exception):
    """The ladder moved the task to another provider while a provider-specific call
    (``call_llm``) was under way: the task's work runs again, in this incarnation, on the new
    provider, from its last completed step (the steps before it are not run again)."""

    def __init__(self, provider: str) -> None:
        super().__init__(provider)
        self.provider = provider


# The task whose work runs in this asyncio task: ``Agent.provider`` and ``Agent.model`` are
# that task's (two tasks of one agent may be on different providers at once).
_current: contextvars.ContextVar["Task | None"] = contextvars.ContextVar("tron_current_task", default=None)


class Abandon(Exception):
    """Stop working on the task without reporting a result: the ladder owns it now
    (we reported a failure and will be restarted or replaced)."""


@dataclass
class Task:
    assign: TaskAssign
    started: float = field(default_factory=time.monotonic)
    progress: str | None = None
    waiting: int = 0  # sub-tasks this task is waiting on
    fetched: bool = False  # earlier steps' outputs read from the registry
    provider: str | None = None  # where this task's LLM calls go (the ladder may switch it in place)
    _steps: dict[int, dict] | None = field(default=None, repr=False)
    _repeats: object | None = field(default=None, repr=False)  # the RepeatGuard of its answers
    span: object | None = field(default=None, repr=False)  # this attempt's trace span (common/telemetry.py)

    @property
    def id(self) -> str:
        return self.assign.task_id

    @property
    def resume_from(self) -> str | None:
        """The progress marker a previous incarnation reached, if any."""
        return self.assign.progress

    @property
    def completed(self) -> dict | None:
        """The last step an earlier incarnation completed: {step, step_id, hash, output}."""
        return self.assign.checkpoint

    @property
    def replay(self) -> list[dict]:
        """After an operator's hard reset: every recorded step, verified, in order (an agent
        rebuilds its state from them before it reruns the failing step)."""
        return self.assign.replay or []

    @property
    def steps(self) -> dict[int, dict]:
        """Completed steps known here, by number: the hand-over's, then this incarnation's."""
        if self._steps is None:
            self._steps = {m["step"]: m for m in self.replay}
            if self.completed:
                self._steps.setdefault(self.completed["step"], self.completed)
        return self._steps


def load_sdks(sdks: Iterable[str] = SDKS) -> None:
    """Import the LLM SDKs this mesh uses (about 2 s here each for anthropic and openai), and
    what they import on a first request. Run in a thread: an import on the event loop would
    stop the heartbeats, and TRON would rightly call the agent hung. Under the fork server
    all of it is there already (it preloads the same set: a forked agent imports nothing
    here; one that imported an SDK its mesh does not use would compete with every other
    agent's start for the CPU)."""
    sdks = set(sdks)
    for name in sorted(sdks):
        importlib.import_module(name)
    if "openai" in sdks:
        importlib.import_module("openai.resources")  # the client's first .chat would import these: 0.6 s

    from common.providers import warm_up

    warm_up(sdks)


class Agent:
    role = "agent"
    uses_llm = False  # roles that call the LLM load the SDKs in the background at start
    system: str | None = None  # the system prompt of llm(); default: prompts/<role>.md if there is one

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.policy = ctx.config.policy
        self.active: dict[str, Task] = {}
        ctx.tasks = []  # named in every beat: the daemon notices a leased task nobody works on
        self.waiting: dict[str, asyncio.Future] = {}
        self.early: dict[str, TaskResult] = {}
        self._bg: set[asyncio.Task] = set()
        self._sdks: asyncio.Future | None = None
        self.actions = MeshActions(self)
        self._runs: dict[str, asyncio.Task] = {}  # task id -> the coroutine working on it
        self.clock: Clock = MonotonicClock()  # backoffs between hand-off retries (a test hands in a fake)

    # -- the app ------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=512 * 1024)
        app.router.add_post("/tasks", self._h_task)
        app.router.add_post("/task_result", self._h_result)
        app.router.add_post("/handle_child_timeout", self._h_child_timeout)
        app.router.add_post("/handle_grandchild_failure", self._h_grandchild_failure)
        app.router.add_post("/drill/runaway", self._h_drill_runaway)
        app.router.add_post("/tasks/{task_id}/cancel", self._h_cancel)
        self.add_routes(app)
        if self.uses_llm or self.policy.llm_advice:
            app.on_startup.append(self._preload)
        return app

    async def _preload(self, app: web.Application) -> None:
        self.sdks_ready()

    def sdks_ready(self) -> asyncio.Future:
        """The SDK import, started once, awaited by whoever needs it."""
        if self._sdks is None:
            self._sdks = asyncio.ensure_future(asyncio.to_thread(load_sdks, self.ctx.config.sdks))
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
        answer = self.take(await parse(request, TaskAssign))
        return web.json_response(answer, status=202 if answer["status"] == "accepted" else 200)

    def take(self, assign: TaskAssign) -> dict:
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

    async def step(self, task: Task, number: int, step_id: str, produce, *, total: int | None = None) -> str:
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
            return done[number]["output"]
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
        spec = self.config.services.get(self.name)
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
        return getattr(self.config.providers, f"{self.provider}_model")

    def client(self, provider: str | None = None):
        """The SDK client of a provider (this incarnation's by default: the root may have
        switched it), ready to use: pointed at the real service or llm-sim, an explicit
        timeout, and the SDK's own retries off (the ladder is the one retry authority)."""
        from common.providers import client_for

        return client_for(provider or self.provider, self.provider_settings())

    async def call_llm(self, task: Task, request, *, tools: list | None = None, complete: bool = False):
        """A direct SDK call under the ladder, for what ``llm`` does not do (tools,
        structured output, embeddings): ``await request(client)`` with the task's ready
        client. Every call goes through the mesh's governor, a failure is classified
        (status, error type) and the ladder answers it in place: wait and retry, switch
        provider, park while every provider is down, or fail the task. With ``tools`` (as
        given to the SDK), tool calls whose arguments break their schema count as failures::

            reply = await self.call_llm(task, lambda c: c.messages.create(model=self.model, ...))
        """
        from common.providers import check_tool_calls, reply_of

        def inspect(provider: str, response):
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

    def _check_reply(self, task: Task, reply, *, complete: bool):
        """An answer that is 200 OK but broken (empty, cut at max_tokens where a whole one
        is needed, a refusal, the same answer again and again) is a provider failure."""
        from common.providers import RepeatGuard, check_reply

        checks = self.config.output_checks(self.name)
        failure = check_reply(reply, checks, complete=complete)
        if failure is None and checks.repeat_limit and reply.text:
            if task._repeats is None:
                task._repeats = RepeatGuard()
            failure = task._repeats.check(reply.text, checks.repeat_limit, provider=reply.provider)
        return failure

    async def under_ladder(self, task: Task, call, inspect=None, *, portable: bool = True,
                           content: tuple[str, str] | None = None):
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
        from common.providers import ProviderFailure, classify

        await self.sdks_ready()
        while True:
            provider = task.provider or self.provider
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
    def _usage(task: Task, provider: str, reply, started: float) -> dict | None:
        """What the call used, as the provider's answer says (a broken answer used tokens
        too), for the registry's llm_usage row and its cost."""
        if reply is None:
            return None
        return {"provider": provider, "model": (reply.model or "unknown")[:128], "input_tokens": reply.input_tokens,
                "output_tokens": reply.output_tokens, "cache_read_tokens": reply.cache_read_tokens,
                "cache_write_tokens": reply.cache_write_tokens,
                "duration_ms": round((time.monotonic() - started) * 1000, 3), "step": (task.progress or "")[:128] or None}

    async def _desk(self, verb: str, task: Task, provider: str, **outcome) -> dict | None:
        """One request to the daemon's provider desk; None when it cannot be reached."""
        body = {"service": self.name, "incarnation": self.ctx.env.incarnation, "task_id": task.id,
                "provider": provider}
        body.update(outcome)
        for tries in range(1, 6):
            try:
                return await self.ctx.client.post(f"{self.daemon}/providers/{verb}", body, timeout=PROVIDER_POLL)
            except MeshHTTPError as err:
                if err.status == 409:
                    raise Abandon() from err  # we are not the current incarnation any more
                log.warning("provider %s refused: %s", verb, err)
                return None
            except (OSError, asyncio.TimeoutError) as err:
                log.info("provider %s not delivered yet: %s", verb, err)
                await self.clock.sleep(compute_backoff(tries, initial=0.05, factor=2, max_backoff=1.0, jitter=0.1))
        return None

    async def _follow(self, task: Task, answer: dict, *, portable: bool = True) -> None:
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
            raise ProviderMoved(task.provider)

    @contextlib.contextmanager
    def _waiting(self, task: Task):
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
        # The heartbeat carries one task, the oldest one still running here, and every id.
        self.ctx.tasks = list(self.active)
        if self.active:
            oldest = min(self.active.values(), key=lambda t: t.started)
            self.ctx.task_id, self.ctx.progress = oldest.id, oldest.progress
            self.ctx.waiting = oldest.waiting > 0
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
        status, result, reason, detail = "done", None, None, {}
        _current.set(task)  # this asyncio task's own context: the provider is the task's
        try:
            while True:
                try:
                    result = await self.work(task)
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

    async def _retrying(self, call, *, what: str, attempts: int = 20) -> bool:
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

    async def work(self, task: Task) -> str:
        raise NotImplementedError

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
            if row["status"] == "done":
                return row["result"]  # finished before our restart: do not redo it
            if row["status"] == "failed":
                raise TaskFailed("child_task_failed", {"child": child, "task": task_id, "failure": row["failure"]})
            if task_id in self.early:
                self._resolve(self.early.pop(task_id))
            elif not self.config.services[child].is_agent:
                pass  # a command that speaks the contract claims its tasks from the daemon itself
            else:
                assign = TaskAssign(task_id=task_id, run_id=parent.assign.run_id, kind=kind, prompt=prompt,
                                    reply_to=self.name, parent_task_id=parent.id, attempt=row["attempt"],
                                    progress=row["progress"], traceparent=row.get("traceparent"))
                logs.comms("task_dispatch", src=self.name, dst=child, task=task_id, run=parent.assign.run_id)
                try:
                    await self.ctx.client.post(self.config.url(child) + "/tasks", assign)
                except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
                    # The child is down: the daemon hands it the task when it is back.
                    log.warning("dispatch of %s to %s failed (%s); waiting for the ladder", task_id, child, err)
            bound = self.policy.task_timeout * worst_case_attempts(self.policy)
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
                reason = outcome.reason if outcome.reason in REFUSALS else "child_task_failed"
                raise TaskFailed(reason, {"child": child, "task": task_id, "reason": outcome.reason,
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

    def _descendant(self, service: str) -> bool:
        return service in self.config.services and self.name in self.config.ancestors(service)

    async def view(self, service: str, *, alert_id: str | None, task_id: str | None) -> LadderView:
        """What the registry knows, at the daemon's clock reading: we decide on that."""
        q = {"service": service, "decider": self.name}
        q.update({k: v for k, v in (("alert_id", alert_id), ("task_id", task_id)) if v})
        body = await self.ctx.client.get(f"{self.daemon}/ladder/view?{urlencode(q)}")
        return LadderView.model_validate(body)

    async def decide_and_act(self, event: ChildFailed | Escalated, *, view: dict | None = None) -> dict:
        """Decide on ``view`` when the daemon sent it with the alert, else on one read now."""
        view = LadderView.model_validate(view) if view is not None else \
            await self.view(event.service, alert_id=event.alert_id, task_id=event.task_id)
        decision = decide(event, view, view.now, view.policy)
        decided_by, detail = "policy", {}
        if view.policy.llm_advice and isinstance(decision, Restart) and decision.with_task:
            advice, note = await self.advise(event, view)
            decision = fold_advice(decision, advice)
            decided_by = "llm" if advice is not None else "policy"
            detail = {"advice": advice or note, "rationale": note if advice else ""}
        log.info("decision", extra={"offender": event.service, "alert": event.alert_id, "case": decision.case,
                                    "decision": type(decision).__name__, "decided_by": decided_by})
        return await carry_out(decision, event, self.actions, decided_by=decided_by, detail=detail)

    @require_token
    async def _h_child_timeout(self, request: web.Request) -> web.Response:
        alert = await parse(request, Alert)
        if not self._descendant(alert.service):
            return error(422, f"{alert.service!r} is not a descendant of {self.name}")
        logs.comms("alert_received", src=DAEMON, dst=self.name, alert=alert.alert_id, agent=alert.service,
                   task=alert.task_id, run=alert.run_id)
        event = ChildFailed(alert.alert_id, alert.service, alert.incarnation,
                            alert.detail.get("error_reason") or str(alert.reason), alert.retryable, alert.task_id)
        return web.json_response(await self.decide_and_act(event, view=alert.view))

    @require_token
    async def _h_grandchild_failure(self, request: web.Request) -> web.Response:
        esc = await parse(request, Escalation)
        if not self._descendant(esc.service):
            return error(422, f"{esc.service!r} is not a descendant of {self.name}")
        caller = self.ctx.peer_caller(request)
        if caller in self.config.services and caller != esc.service and caller not in self.config.ancestors(esc.service):
            return error(403, f"{caller} escalates only for itself and its own descendants, not {esc.service}")
        logs.comms("escalation_received", src=esc.path[-1] if esc.path else esc.service, dst=self.name,
                   alert=esc.alert_id, agent=esc.service, task=esc.task_id, run=esc.run_id, reason=esc.reason)
        event = Escalated(esc.alert_id, esc.service, esc.reason, esc.kind, esc.task_id)
        return web.json_response(await self.decide_and_act(event))

    async def advise(self, event: ChildFailed, view: LadderView) -> tuple[str | None, str]:
        """Ask the LLM whether to restart or escalate, within ``advice_timeout``: (advice,
        rationale or why there is none). No answer, an unusable one, or a failure means
        no advice: the policy stands."""
        from common.prompts import system_prompt

        policy = view.policy
        question = (f"Child {event.service} failed: {event.reason}. Task {event.task_id} has had "
                    f"{view.task.restarts if view.task else 0} of {policy.max_restarts} restarts.")
        try:
            async with asyncio.timeout(policy.advice_timeout):
                await self.sdks_ready()
                from common.providers import provider_for

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

    def provider_settings(self, *, timeout: float | None = None, max_tokens: int | None = None):
        from common.providers import ProviderSettings

        p = self.config.providers
        return ProviderSettings(sim_url=self.config.sim_url, anthropic_model=p.anthropic_model,
                                ollama_model=p.ollama_model, openai_model=p.openai_model,
                                timeout_s=timeout or p.timeout, max_tokens=max_tokens or p.max_tokens)

    # -- the LLM ------------------------------------------------------------------------------

    async def llm(self, task: Task, prompt: str, *, system: str | None = None, stream: bool = False,
                  complete: bool = False) -> str:
        """Ask the task's provider, under the ladder (see ``under_ladder``): a provider
        failure is retried, switched or parked in place, and only a task the ladder ended
        leaves here (as ``Abandon``). ``complete``: the step needs a whole answer, so one
        cut at max_tokens is a failure too."""
        from common.prompts import system_prompt
        from common.providers import provider_for  # SDKs load lazily

        system = system or self.system or system_prompt(self.role)

        async def call(provider: str):
            return await provider_for(provider).complete(system=system, prompt=prompt,
                                                         settings=self.provider_settings(), stream=stream)

        def inspect(provider: str, reply):
            return self._check_reply(task, reply, complete=complete), reply

        reply = await self.under_ladder(task, call, inspect, content=(system, prompt))
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


class MeshActions:
    """An agent's hands for ``carry_out``: every step is a request to the daemon, which
    records it and acts; an escalation is then forwarded to our own parent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @property
    def _daemon(self) -> str:
        return self.agent.daemon

    async def _post(self, path: str, body) -> dict:
        try:
            return await self.agent.ctx.client.post(f"{self._daemon}{path}", body)
        except MeshHTTPError as err:
            return {"status": "refused", "http": err.status, **err.json()}

    async def restart(self, event: ChildFailed, d: Restart, *, decided_by: str, detail: dict) -> dict:
        return await self._post("/control/restart", RestartRequest(
            service=event.service, replaces=event.incarnation, alert_id=event.alert_id, reason=event.reason,
            case=d.case, delay=d.delay, with_task=d.with_task, crash_looping=d.crash_looping,
            new_episode=d.new_episode, task_id=event.task_id, requested_by=self.agent.name, decided_by=decided_by,
            detail=detail))

    async def escalate(self, event: ChildFailed | Escalated, d: Escalate, *, decided_by: str, detail: dict) -> dict:
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

    async def switch(self, event: ChildFailed | Escalated, d: SwitchProvider, *, decided_by: str,
                     detail: dict) -> dict:
        return await self._post("/control/switch", SwitchRequest(
            service=event.service, alert_id=event.alert_id, task_id=event.task_id, to_provider=d.to_provider,
            reason=event.reason, case=d.case, services=list(d.services), delay=d.delay, decided_by=decided_by,
            requested_by=self.agent.name, detail=detail))

    async def fail(self, event: ChildFailed | Escalated, d: Fail, *, decided_by: str, detail: dict) -> dict:
        return await self._post("/control/permanent_failure", PermanentFailure(
            alert_id=event.alert_id, service=event.service, task_id=event.task_id, reason=d.reason, case=d.case,
            detail={"last_reason": event.reason, **detail}, decided_by=decided_by, requested_by=self.agent.name))

    async def park(self, event: ChildFailed | Escalated, d: Park, *, decided_by: str, detail: dict) -> dict:
        return await self._post("/control/park", ParkRequest(
            alert_id=event.alert_id, service=event.service, task_id=event.task_id, reason=d.reason, case=d.case,
            decided_by=decided_by, requested_by=self.agent.name))
