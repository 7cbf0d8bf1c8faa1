"""The agent SDK: what a user's agent (and every built-in role) subclasses. Public as
``tron.sdk``; this module is its home inside the tree.

A user's agent subclasses ``Agent`` and writes ``work``; mesh.toml names it
(``agent = "package.module:Class"``) and the daemon runs it like a built-in role::

    from tron.sdk import Agent, Task

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
``call_llm`` for any SDK call on the ready-made anthropic / ollama / openai client of that
provider (SDK retries off, explicit timeout); ``delegate`` for sub-tasks to its children;
``TaskFailed(reason)`` to fail a task with a reason of its own; ``set_progress`` for a
marker between steps. Everything is in the registry before it is acknowledged.

``Agent`` is only the public surface. The machinery (HTTP endpoints, task intake, beats,
the ladder's parent side) lives in a runtime object (common/agent_runtime.py) held in the
one private attribute ``_tron``, so a subclass's own names (``view``, ``take``, ``client``,
``actions`` ...) never reach it.

Agents return results; parents drive the lifecycle. A parent hands a task to a child
with ``delegate``: the assignment is recorded by the daemon first (so that a restarted
child gets it back, and a restarted parent finds a finished result instead of redoing
the work), then posted to the child, which answers 202 and works in the background,
beating with the task id and a progress marker. The result comes back to the parent's
``POST /task_result``.
"""

from __future__ import annotations

import contextvars
import importlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, overload

from aiohttp import web

from tron.common.models import TaskAssign
from tron.common.providers import SDKS
from tron.common.service import ServiceContext

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from tron.common.agent_runtime import AgentRuntime
    from tron.common.providers import RepeatGuard

PROVIDER_POLL = 25.0  # the daemon answers an acquire or a park within 20 s (a long poll)
# Reasons a run fails fast with, passed up unchanged from the task that met them.
REFUSALS = ("lane_paused", "service_paused")


class TaskFailed(Exception):
    """Raised by ``work`` (or a ``delegate`` whose child failed): the task ends failed with
    ``reason`` (a short word of yours) and ``detail``; the parent hears of it, no restart."""

    def __init__(self, reason: str, detail: dict[str, Any] | None = None) -> None:
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
    _steps: dict[int, dict[str, Any]] | None = field(default=None, repr=False)
    _repeats: RepeatGuard | None = field(default=None, repr=False)  # the RepeatGuard of its answers
    span: "Span | None" = field(default=None, repr=False)  # this attempt's trace span (common/telemetry.py)

    @property
    def id(self) -> str:
        return self.assign.task_id

    @property
    def resume_from(self) -> str | None:
        """The progress marker a previous incarnation reached, if any."""
        return self.assign.progress

    @property
    def completed(self) -> dict[str, Any] | None:
        """The last step an earlier incarnation completed: {step, step_id, hash, output}."""
        return self.assign.checkpoint

    @property
    def replay(self) -> list[dict[str, Any]]:
        """After an operator's hard reset: every recorded step, verified, in order (an agent
        rebuilds its state from them before it reruns the failing step)."""
        return self.assign.replay or []

    @property
    def steps(self) -> dict[int, dict[str, Any]]:
        """Completed steps known here, by number: the hand-over's, then this incarnation's."""
        if self._steps is None:
            self._steps = {m["step"]: m for m in self.replay}
            if self.completed:
                self._steps.setdefault(self.completed["step"], self.completed)
        return self._steps


def carried_task(tasks: Iterable[Task], current: str | None) -> Task | None:
    """The task the heartbeat carries: its progress and waiting flag are what TRON judges
    (no_progress, task_timeout), and a change of carried task starts those clocks again.
    The one carried so far is kept while it works, or while every task waits (its deadlines
    run on); else the oldest task that is not waiting; else the oldest. So a task stuck in a
    loop is never hidden behind an older one that waits on its children: the older one
    waiting hands the beat over, and getting back to work does not take it back."""
    tasks = list(tasks)
    if not tasks:
        return None
    working = [t for t in tasks if t.waiting <= 0]
    kept = next((t for t in tasks if t.id == current), None)
    if kept is not None and (kept.waiting <= 0 or not working):
        return kept
    return min(working or tasks, key=lambda t: t.started)


def load_sdks(sdks: Iterable[str] = SDKS) -> None:
    """Import the LLM SDKs this mesh uses (about 2 s here each for anthropic and openai), and
    what they import on a first request. Run in a thread: an import on the event loop would
    stop the heartbeats, and TRON would rightly call the agent hung. Under the fork server
    all of it is there already (it preloads the same set: a forked agent imports nothing
    here; one that imported an SDK its mesh does not use would compete with every other
    agent's start for the CPU)."""
    from tron.common.providers import preload_modules, warm_up

    sdks = set(sdks)
    for name in preload_modules(sdks):  # each SDK, then what its first request would import (openai: 0.6 s)
        importlib.import_module(name)

    warm_up(sdks)


T = TypeVar("T")


class _Shadowable(Generic[T]):
    """A computed attribute of ``Agent`` that a subclass or an instance may replace with its
    own (a property would refuse ``self.name = ...``): only ``__get__``, so the instance's
    own value wins. Tron's runtime never reads these back from the agent."""

    def __init__(self, fget: Callable[[Agent], T]) -> None:
        self.fget = fget
        self.__doc__ = fget.__doc__

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Shadowable[T]: ...

    @overload
    def __get__(self, obj: Agent, owner: type | None = None) -> T: ...

    def __get__(self, obj: Agent | None, owner: type | None = None) -> T | _Shadowable[T]:
        return self if obj is None else self.fget(obj)


class Agent:
    """Subclass it and write ``work``. The class attributes and methods below are the
    stable surface (semantic versioning: they change only with a major version); every
    other name is yours."""

    role: str = "agent"  # the role's prompt file, prompts/<role>.md, is llm()'s default system prompt
    uses_llm: bool = False  # roles that call the LLM load the SDKs in the background at start
    system: str | None = None  # the system prompt of llm(); default: prompts/<role>.md if there is one
    _tron_runtime: ClassVar[type[AgentRuntime] | None] = None  # a built-in role's own runtime class

    def __init__(self, ctx: ServiceContext) -> None:
        from tron.common.agent_runtime import AgentRuntime

        self._tron: AgentRuntime = (self._tron_runtime or AgentRuntime)(self, ctx)

    async def work(self, task: Task) -> str:
        """The task's work: return its result, or raise ``TaskFailed``."""
        raise NotImplementedError

    def add_routes(self, app: web.Application) -> None:
        """Your own HTTP endpoints, added to the agent's application (peer-token checks are yours)."""

    # -- who and where -----------------------------------------------------------------

    @_Shadowable
    def name(self) -> str:
        """This service's name in mesh.toml (``NAME.i`` for a replica)."""
        return self._tron.name

    @_Shadowable
    def incarnation(self) -> str:
        """This process's incarnation id (a restart is a new one; every registry row names it)."""
        return self._tron.ctx.env.incarnation

    def children(self) -> list[str]:
        """The services whose parent this one is, in mesh.toml's order: ``delegate``'s targets."""
        return self._tron.children()

    @_Shadowable
    def provider(self) -> str:
        """The provider of the task being worked on here (the ladder may have moved it), else
        this incarnation's."""
        return self._tron.provider

    @_Shadowable
    def model(self) -> str:
        """The configured model of ``provider``."""
        return self._tron.model

    def client(self, provider: str | None = None) -> Any:
        """The SDK client of a provider (this task's by default), ready to use: pointed at the
        real service or llm-sim, an explicit timeout, the SDK's own retries off (the ladder is
        the one retry authority). Prefer ``call_llm``, which runs the call under the ladder."""
        return self._tron.client(provider)

    # -- the work ------------------------------------------------------------------------

    async def step(self, task: Task, number: int, step_id: str, produce: Callable[[str], Awaitable[str]], *,
                   total: int | None = None) -> str:
        """Run one step of a task, resumably: a step an earlier incarnation completed is not
        run again (its recorded output is returned); otherwise the progress marker moves,
        ``produce(previous_output)`` runs, and its output is checkpointed before it is
        returned. ``previous_output`` is the last completed step's output ("" for the first)."""
        return await self._tron.step(task, number, step_id, produce, total=total)

    def set_progress(self, task: Task, marker: str) -> None:
        """Record how far the task has got; carried by the next beat, and handed to
        the next incarnation if this one dies."""
        self._tron.set_progress(task, marker)

    async def llm(self, task: Task, prompt: str, *, system: str | None = None, stream: bool = False,
                  complete: bool = False) -> str:
        """Ask the task's provider, under the ladder: a provider failure is retried, switched
        or parked in place, and only a task the ladder ended leaves here. ``complete``: the
        step needs a whole answer, so one cut at max_tokens is a failure too."""
        return await self._tron.llm(task, prompt, system=system, stream=stream, complete=complete)

    async def call_llm(self, task: Task, request: Callable[[Any], Awaitable[Any]], *, tools: list[Any] | None = None,
                       complete: bool = False) -> Any:
        """A direct SDK call under the ladder, for what ``llm`` does not do (tools,
        structured output, embeddings): ``await request(client)`` with the task's ready
        client, through the mesh's governor; a failure is classified and the ladder answers
        it in place (wait and retry, switch provider, park, or fail the task). With ``tools``
        (as given to the SDK), tool calls whose arguments break their schema count as failures::

            reply = await self.call_llm(task, lambda c: c.messages.create(model=self.model, ...))
        """
        return await self._tron.call_llm(task, request, tools=tools, complete=complete)

    async def delegate(self, parent: Task, child: str, index: int, kind: str, prompt: str) -> str:
        """Give a sub-task (``<parent id>.<index>``) to a child and wait for its result.
        Raises ``TaskFailed`` when the child's task failed for good."""
        return await self._tron.delegate(parent, child, index, kind, prompt)
