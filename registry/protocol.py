"""The ``Store`` protocol: everything the daemon asks of its registry, split by aggregate.

``Store`` is the union of small protocols, one per aggregate of the registry (``Events``,
``Agents``, ``Sessions``, ``Runs``, ``Tasks``, ``Parking``, ``Checkpoints``, ``Spending``,
``Lanes``, ``Alerts``, ``Ladder``) and two about the store itself (``Lifecycle``,
``Upkeep``); each method is declared on exactly one of them. ``Replayable`` and
``WorkingCopy`` are what the journal asks of the stores behind it, outside ``Store``.

Implementations: ``tron.registry.store.SqlStore`` (SQLite, and PostgreSQL through
registry/pg.py), ``tron.registry.memory.MemoryStore`` (the stub unit tests run on, and the
journal's memory), ``tron.registry.journal.JournaledStore`` (decides on memory, records behind);
``tron.registry.backends.open_store(url)`` opens one by the URL's scheme.
tests/unit/test_store_contract.py runs one behavioural suite on every one of them and checks
that each speaks this protocol, method by method and parameter by parameter.

Every method carries exactly one mark saying how the journaled store answers it (a
``Route``); the journal routes by these marks alone and refuses to import while a method
has none, and tests/unit/test_store_routing.py checks that every public method of every
implementation is declared on exactly one protocol here and marked. A new method needs one:

    @write          a change: applied to the working copy at once, journaled, replayed on the
                    durable store in order. Every write must be marked so, or it is never saved.
    @memory_read    what decisions read (open sessions, live tasks, lanes): the working copy.
    @fallback_read  one row by its id: the working copy, else the durable store (an older run,
                    task or alert the working copy has let go of).
    @owned_read(a)  rows about one task or run: the working copy if ``a`` (the read "task" or
                    "run") finds it there, even when the answer is empty, since the durable
                    store may not have the change yet; the durable store otherwise.
    @durable_read   history (events, retry history, metrics, spend): the durable store, once
                    this daemon's own writes have reached it.
    @own            each implementation's own (open, close, health, ...): the journal defines
                    it itself, never forwards it.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar, runtime_checkable

from tron.common.states import AlertState, LaneState, RetryType, RunState, TaskState
from tron.registry.rows import Row, Spend, TaskCounts

if TYPE_CHECKING:
    from tron.registry.store import SqlStore


class Route(StrEnum):
    WRITE = "write"
    MEMORY_READ = "memory_read"
    FALLBACK_READ = "fallback_read"
    OWNED_READ = "owned_read"
    DURABLE_READ = "durable_read"
    OWN = "own"


@dataclass(frozen=True)
class Mark:
    route: Route
    # OWNED_READ (required) and FALLBACK_READ (optional): the protocol read that says whether
    # memory knows the key, and so whether its answer is the whole answer, empty included
    about: str | None = None


MARK_ATTR = "store_route"
F = TypeVar("F", bound=Callable[..., Any])


def _marking(route: Route, about: str | None = None) -> Callable[[F], F]:
    def mark(method: F) -> F:
        if hasattr(method, MARK_ATTR):
            raise TypeError(f"Store.{method.__name__} is marked twice: {getattr(method, MARK_ATTR).route} and {route}")
        setattr(method, MARK_ATTR, Mark(route, about))
        return method
    return mark


write = _marking(Route.WRITE)
memory_read = _marking(Route.MEMORY_READ)
fallback_read = _marking(Route.FALLBACK_READ)
durable_read = _marking(Route.DURABLE_READ)
own = _marking(Route.OWN)


def fallback_read_about(about: str) -> Callable[[F], F]:
    """A fallback read that memory answers alone, empty included, when it knows the key
    (``about``: "alert"): what it keeps of a key it knows is complete."""
    return _marking(Route.FALLBACK_READ, about)


def owned_read(about: str) -> Callable[[F], F]:
    """A read about one ``about`` ("task" or "run"), its key the first argument."""
    return _marking(Route.OWNED_READ, about)


@runtime_checkable
class Lifecycle(Protocol):
    """Open and close: each implementation's own."""
    drill: str | None  # the drill label stamped on every row written while it is set

    @own
    async def open(self) -> "Store":
        ...

    @own
    async def close(self, *, grace: float = 5.0) -> None:
        """``grace``: how long writes still pending may take to be recorded (the journal's)."""
        ...


@runtime_checkable
class Upkeep(Protocol):
    """What the daemon asks of the store itself: is it healthy, forget what no decision reads
    again, bring an old run back, wait for the writes to be durable. A store with nothing
    to do answers at once (``{"state": "ok"}``, True)."""

    @own
    def health(self) -> dict[str, object]:
        ...

    @own
    def trim(self) -> None:
        ...

    @own
    async def warm(self, run_id: str) -> None:
        ...

    @own
    async def flushed(self, timeout: float) -> bool:
        ...

    @own
    def recorded(self) -> "Store":
        """The store that records (a journal's durable store; else itself): what a person
        or a disk could have changed is read there."""
        ...


@runtime_checkable
class Events(Protocol):
    """The event log: every state change, audit entry and operator action, in order."""

    @write
    async def event(self, kind: str, payload: dict[str, Any], *, agent: str | None = None,
                    incarnation: str | None = None, run_id: str | None = None, task_id: str | None = None,
                    alert_id: str | None = None) -> int:
        ...

    @durable_read
    async def events(self, since: int = 0, limit: int = 200, kind: str | None = None,
                     agent: str | None = None) -> list[Row]:
        ...

    @durable_read
    async def latest_events(self, kinds: list[str], limit: int = 100) -> list[Row]:
        """The newest events of these kinds, newest first (what a new daemon takes back: the
        providers' last transitions)."""
        ...


@runtime_checkable
class Agents(Protocol):
    """The declared services and their marks (stopped, paused, provider, crash loop)."""

    @write
    async def upsert_agent(self, name: str, role: str, parent: str, port: int, provider: str | None) -> Row:
        ...

    @write
    async def set_agent(self, name: str, **fields: Any) -> None:
        ...

    @memory_read
    async def agent(self, name: str) -> Row | None:
        ...

    @memory_read
    async def agents(self) -> list[Row]:
        ...


@runtime_checkable
class Sessions(Protocol):
    """One incarnation of an agent: intent, starting, running, ended."""

    @write
    async def open_session(self, incarnation: str, agent: str, port: int, provider: str | None, *,
                           mode: str = "plain") -> None:
        ...

    @write
    async def session_started(self, incarnation: str, pid: int, create_time: float, *, mode: str) -> None:
        ...

    @write
    async def session_running(self, incarnation: str) -> None:
        ...

    @write
    async def close_session(self, incarnation: str, *, reason: str, exit_code: int | None = None,
                            exit_signal: int | None = None) -> bool:
        ...

    @memory_read
    async def open_sessions(self) -> list[Row]:
        ...

    @fallback_read
    async def session(self, incarnation: str) -> Row | None:
        ...

    @durable_read
    async def sessions_of(self, agent: str, *, limit: int = 200) -> list[Row]:
        """The agent's sessions, newest first (by ``started_mono``), at most ``limit``: what a
        daemon that adopts its incarnation reads back of its history (its restarts)."""
        ...


@runtime_checkable
class Runs(Protocol):
    """A prompt that entered at the gateway, and how it ended."""

    @write
    async def create_run(self, run_id: str, prompt: str, drill: bool) -> None:
        ...

    @write
    async def finish_run(self, run_id: str, status: RunState, result: str | None,
                         failure: dict[str, Any] | None) -> bool:
        ...

    @write
    async def reopen_run(self, run_id: str) -> bool:
        ...

    @fallback_read
    async def run(self, run_id: str) -> Row | None:
        ...

    @durable_read
    async def runs(self, limit: int = 100) -> list[Row]:
        ...


@runtime_checkable
class Tasks(Protocol):
    """The work of a run, one row per task: its state machine, its provider, its delivery."""

    @write
    async def upsert_task(self, rec: Row) -> tuple[Row, bool]:
        ...

    @fallback_read
    async def task(self, task_id: str) -> Row | None:
        ...

    @write
    async def task_progress(self, task_id: str, incarnation: str, progress: str | None) -> None:
        ...

    @write
    async def finish_task(self, task_id: str, status: TaskState, result: str | None, failure: dict[str, Any] | None,
                          *, reason: str | None = None) -> bool:
        ...

    @write
    async def reopen_task(self, task_id: str, *, by: str) -> bool:
        ...

    @write
    async def set_task_provider(self, task_id: str, provider: str) -> None:
        ...

    @owned_read("run")
    async def tasks_of_run(self, run_id: str) -> list[Row]:
        ...

    @memory_read
    async def open_tasks(self, agent: str) -> list[Row]:
        ...

    @memory_read
    async def live_tasks(self, agent: str) -> list[Row]:
        ...

    @write
    async def requeue_tasks(self, agent: str, *, provider: str | None = None, to_agent: str | None = None) -> list[Row]:
        ...

    @write
    async def mark_delivered(self, task_id: str) -> None:
        ...

    @memory_read
    async def undelivered_results(self) -> list[Row]:
        ...


@runtime_checkable
class Parking(Protocol):
    """Tasks held by an operator or parked while a provider, a lane or the budget is out."""

    @write
    async def hold_task(self, task_id: str, reason: str) -> bool:
        ...

    @write
    async def release_task(self, task_id: str, provider: str | None) -> bool:
        ...

    @write
    async def park_task(self, task_id: str, reason: str, kind: str = "providers",
                        lease: str | None = None) -> bool:
        ...

    @write
    async def unpark_task(self, task_id: str, provider: str | None = None) -> bool:
        ...

    @memory_read
    async def held_tasks(self) -> list[Row]:
        ...

    @memory_read
    async def parked_tasks(self) -> list[Row]:
        ...


@runtime_checkable
class Checkpoints(Protocol):
    """The steps a task has finished, so a restarted agent resumes after them."""

    @write
    async def add_checkpoint(self, task_id: str, step: int, step_id: str, output: str,
                             incarnation: str | None) -> tuple[Row, bool]:
        ...

    @owned_read("task")
    async def checkpoints(self, task_id: str) -> list[Row]:
        ...

    @write
    async def drop_checkpoints(self, task_id: str, from_step: int, *, by: str) -> list[Row]:
        ...


@runtime_checkable
class Spending(Protocol):
    """LLM usage rows, their cost, and the budgets of runs."""

    @write
    async def set_run_budget(self, run_id: str, usd: float | None, tokens: int | None) -> bool:
        ...

    @write
    async def record_usage(self, row: Row) -> Row:
        ...

    @durable_read
    async def spend(self, *, run_id: str | None = None, task_id: str | None = None, agent: str | None = None,
                    since_mono: float | None = None) -> Spend:
        ...

    @durable_read
    async def usage(self, *, run_id: str | None = None, task_id: str | None = None, agent: str | None = None,
                    since_mono: float | None = None, limit: int = 1000) -> list[Row]:
        ...


@runtime_checkable
class Lanes(Protocol):
    """Circuit breakers: the trips of a lane and its state."""

    @write
    async def record_trip(self, fingerprint: str, lane: str, description: str, *, task_id: str | None,
                          run_id: str | None) -> list[float]:
        ...

    @memory_read
    async def lane(self, lane: str) -> Row | None:
        ...

    @memory_read
    async def lanes(self) -> list[Row]:
        ...

    @write
    async def set_lane(self, lane: str, state: LaneState, *, fingerprint: str | None, reason: str,
                       by: str) -> bool:
        ...


@runtime_checkable
class Alerts(Protocol):
    """What TRON noticed about an incarnation, and where it went."""

    @write
    async def insert_alert(self, alert: Row, *, stable: bool) -> tuple[Row, bool]:
        ...

    @memory_read
    async def alert_for(self, agent: str, incarnation: str) -> Row | None:
        ...

    @fallback_read
    async def alert(self, alert_id: str) -> Row | None:
        ...

    @write
    async def mark_alert(self, alert_id: str, status: AlertState, *, decision: str | None = None) -> bool:
        ...

    @write
    async def alert_delivered(self, alert_id: str, to: str) -> None:
        ...

    @memory_read
    async def open_alerts(self) -> list[Row]:
        ...

    @memory_read
    async def failures(self, agent: str, *, limit: int = 200) -> list[Row]:
        ...


@runtime_checkable
class Ladder(Protocol):
    """The ladder's rows (retry_history): restarts, escalations, provider switches, their counts."""

    @write
    async def record_retry(self, *, alert_id: str, agent_id: str, retry_type: RetryType, reason: str,
                           detail: dict[str, Any], case: str, task_id: str | None = None, run_id: str | None = None,
                           from_provider: str | None = None, to_provider: str | None = None,
                           decided_by: str = "policy", requested_by: str | None = None,
                           hop: str = "") -> Row | None:
        ...

    @fallback_read_about("alert")  # memory keeps every row of each alert it keeps (MemoryStore.trim, load_from)
    async def retry_rows(self, alert_id: str) -> list[Row]:
        ...

    @owned_read("task")
    async def task_counts(self, task_id: str) -> TaskCounts:
        ...

    @fallback_read
    async def task_history(self, task_id: str) -> list[Row]:
        ...

    @durable_read
    async def history(self, limit: int = 200, agent: str | None = None) -> list[Row]:
        ...

    @durable_read
    async def failure_metrics(self) -> list[Row]:
        ...


# The aggregates, each a small protocol; ``Store`` is their union, so a caller typed ``Store``
# sees every method. A method is declared on exactly one of them (routes_of checks it).
AGGREGATES: tuple[type, ...] = (Lifecycle, Upkeep, Events, Agents, Sessions, Runs, Tasks, Parking, Checkpoints,
                                Spending, Lanes, Alerts, Ladder)


@runtime_checkable
class Store(Lifecycle, Upkeep, Events, Agents, Sessions, Runs, Tasks, Parking, Checkpoints, Spending, Lanes, Alerts,
            Ladder, Protocol):
    """Everything the daemon asks of its registry."""


# What the journal asks of its two stores besides the Store (registry/journal.py), not part
# of it: no caller of a Store uses them.
@runtime_checkable
class Replayable(Protocol):
    """A store the journal replays on (the durable one) or applies to (the working copy)."""

    @own
    def pinned(self, mono: float, wall: str, drill: str | None) -> AbstractContextManager[None]:
        """Rows written meanwhile carry these times and drill label (when they really happened)."""
        ...

    @own
    def unavailable(self, err: BaseException) -> bool:
        """``err`` is the database being unavailable for a while (full disk, lock held, I/O
        error, lost connection): the write is retried. Any other error is a bug: it is not."""
        ...

    @own
    def batch(self) -> AbstractAsyncContextManager[None]:
        """The writes made inside it are one unit: all are recorded, or none (the journal's
        group commit)."""
        ...


@runtime_checkable
class WorkingCopy(Protocol):
    """The journal's memory: read back from the durable store at start, one run on demand."""

    @own
    async def load_from(self, durable: "SqlStore") -> None:
        ...

    @own
    async def warm_from(self, durable: "SqlStore", run_id: str) -> None:
        ...


PROTOCOLS: tuple[type, ...] = (*AGGREGATES, Replayable, WorkingCopy)


def parts_of(protocol: type) -> tuple[type, ...]:
    """The classes whose own methods make up ``protocol``: itself and its protocol bases."""
    return (protocol, *(c for c in protocol.__mro__[1:] if getattr(c, "_is_protocol", False) and c is not Protocol))


def methods_of(protocol: type) -> dict[str, object]:
    """The methods ``protocol`` itself declares (not its bases'): name -> function."""
    return {name: value for name, value in vars(protocol).items() if not name.startswith("_") and callable(value)}


def routes_of(protocol: type) -> dict[str, Mark]:
    """Each method of ``protocol`` (and of the protocols it unites) -> its mark. Raises
    ``TypeError`` naming the method when one is declared on two of them, has no mark, a mark
    that is not a ``Mark`` of a known ``Route``, or is an owned read whose ``about`` is not a
    read of the protocol: a method the journal would route wrongly."""
    found: dict[str, Mark] = {}
    where: dict[str, str] = {}
    for part in parts_of(protocol):
        for name, method in methods_of(part).items():
            if name in where:
                raise TypeError(f"{name} is declared on both {where[name]} and {part.__name__}: "
                                "one aggregate owns each method")
            where[name] = part.__name__
            mark = getattr(method, MARK_ATTR, None)
            if mark is None:
                raise TypeError(f"{part.__name__}.{name} has no routing mark (@write, @memory_read, ...: "
                                f"see registry/protocol.py)")
            if not isinstance(mark, Mark) or not isinstance(mark.route, Route):
                raise TypeError(f"{part.__name__}.{name} has an unknown routing mark {mark!r}")
            found[name] = mark
    for name, mark in found.items():
        if mark.route is Route.OWNED_READ and mark.about is None:
            raise TypeError(f"{where[name]}.{name}: an owned read names what it is about ({mark})")
        if mark.about is not None and mark.route not in (Route.OWNED_READ, Route.FALLBACK_READ):
            raise TypeError(f"{where[name]}.{name}: only an owned or a fallback read names what it is about ({mark})")
        if mark.about is not None and mark.about not in found:
            raise TypeError(f"{where[name]}.{name} is about {mark.about!r}, not a method of the protocol")
    return found


def unrouted(implementation: type, protocols: tuple[type, ...] = PROTOCOLS) -> list[str]:
    """What is wrong with ``implementation``'s public methods: each must be declared on
    exactly one of ``protocols`` and carry a mark there (a method added to a store without
    being declared and marked would be invisible to the journal). Empty when all is well."""
    declared: dict[str, list[str]] = {}
    for part in protocols:
        for name in methods_of(part):
            declared.setdefault(name, []).append(part.__name__)
    problems = []
    for name in sorted(dir(implementation)):
        if name.startswith("_") or not callable(getattr(implementation, name)):
            continue
        on = declared.get(name, [])
        if len(on) != 1:
            problems.append(f"{implementation.__name__}.{name} is declared on {len(on)} protocols "
                            f"({', '.join(on) or 'none'}): declare it, marked, on one (registry/protocol.py)")
            continue
        protocol = next(p for p in protocols if p.__name__ == on[0])
        if not isinstance(getattr(methods_of(protocol)[name], MARK_ATTR, None), Mark):
            problems.append(f"{on[0]}.{name} has no routing mark")
    return problems
