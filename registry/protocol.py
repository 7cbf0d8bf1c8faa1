"""The ``Store`` protocol: everything the daemon asks of its registry, in one place.

Implementations: ``registry.store.SqlStore`` (SQLite, and PostgreSQL through
registry/pg.py), ``registry.memory.MemoryStore`` (the stub unit tests run on, and the
journal's memory), ``registry.journal.JournaledStore`` (decides on memory, records behind).
tests/unit/test_store_contract.py runs one behavioural suite on every one of them and checks
that each speaks this protocol, method by method and parameter by parameter.

Every method carries exactly one mark saying how the journaled store answers it (a
``Route``); the journal routes by these marks alone and refuses to import while a method
has none, and tests/unit/test_store_routing.py checks each mark and that both backends
implement every method. A new method needs one:

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
    @lifecycle      open and close: each implementation's own, never forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Callable, Protocol, TypeVar, runtime_checkable

from common.states import AlertState, LaneState, RetryType, RunState, TaskState
from registry.rows import Row, Spend, TaskCounts


class Route(StrEnum):
    WRITE = "write"
    MEMORY_READ = "memory_read"
    FALLBACK_READ = "fallback_read"
    OWNED_READ = "owned_read"
    DURABLE_READ = "durable_read"
    LIFECYCLE = "lifecycle"


@dataclass(frozen=True)
class Mark:
    route: Route
    about: str | None = None  # OWNED_READ only: the protocol read that says whether memory knows the key


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
lifecycle = _marking(Route.LIFECYCLE)


def owned_read(about: str) -> Callable[[F], F]:
    """A read about one ``about`` ("task" or "run"), its key the first argument."""
    return _marking(Route.OWNED_READ, about)


@runtime_checkable
class Store(Protocol):
    drill: str | None  # the drill label stamped on every row written while it is set

    @lifecycle
    async def open(self) -> "Store":
        ...

    @lifecycle
    async def close(self, *, grace: float = 5.0) -> None:
        """``grace``: how long writes still pending may take to be recorded (the journal's)."""
        ...

    # The daemon's housekeeping: each implementation's own; where nothing is held back in
    # memory, the honest answers are nothing to trim, always flushed, nothing to warm, itself.

    @lifecycle
    def health(self) -> dict[str, object]:
        """{"state": "ok" | "degraded" | ..., "pending": writes not recorded yet, ...}."""
        ...

    @lifecycle
    def trim(self) -> None:
        """Forget what no decision reads again and the durable store keeps."""
        ...

    @lifecycle
    async def flushed(self, timeout: float) -> bool:
        """Until every write so far is recorded (True), or ``timeout`` seconds pass (False)."""
        ...

    @lifecycle
    async def warm(self, run_id: str) -> None:
        """Bring an old run back where decisions read (the journal's working copy)."""
        ...

    @lifecycle
    def recorded(self) -> "Store":
        """The store that records (a journal's durable store; else itself): what a person
        or a disk could have changed is read there."""
        ...

    @write
    async def event(self, kind: str, payload: dict[str, Any], *, agent: str | None = None,
                    incarnation: str | None = None, run_id: str | None = None, task_id: str | None = None,
                    alert_id: str | None = None) -> int:
        ...

    @durable_read
    async def events(self, since: int = 0, limit: int = 200, kind: str | None = None,
                     agent: str | None = None) -> list[Row]:
        ...

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

    @memory_read
    async def open_tasks(self, agent: str) -> list[Row]:
        ...

    @memory_read
    async def live_tasks(self, agent: str) -> list[Row]:
        ...

    @write
    async def requeue_tasks(self, agent: str, *, provider: str | None = None) -> list[Row]:
        ...

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

    @write
    async def unpark_task(self, task_id: str, provider: str | None = None) -> bool:
        ...

    @write
    async def set_task_provider(self, task_id: str, provider: str) -> None:
        ...

    @write
    async def reopen_task(self, task_id: str, *, by: str) -> bool:
        ...

    @owned_read("run")
    async def tasks_of_run(self, run_id: str) -> list[Row]:
        ...

    @memory_read
    async def held_tasks(self) -> list[Row]:
        ...

    @memory_read
    async def parked_tasks(self) -> list[Row]:
        ...

    @write
    async def mark_delivered(self, task_id: str) -> None:
        ...

    @memory_read
    async def undelivered_results(self) -> list[Row]:
        ...

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

    @write
    async def record_retry(self, *, alert_id: str, agent_id: str, retry_type: RetryType, reason: str,
                           detail: dict[str, Any], case: str, task_id: str | None = None, run_id: str | None = None,
                           from_provider: str | None = None, to_provider: str | None = None,
                           decided_by: str = "policy", requested_by: str | None = None,
                           hop: str = "") -> Row | None:
        ...

    @fallback_read
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


def routes_of(protocol: type) -> dict[str, Mark]:
    """Each method of ``protocol`` -> its mark. Raises ``TypeError`` naming the method when one
    has no mark, a mark that is not a ``Mark`` of a known ``Route``, or an owned read whose
    ``about`` is not a read of the protocol: a method the journal would route wrongly."""
    found: dict[str, Mark] = {}
    for name, method in vars(protocol).items():
        if name.startswith("_") or not callable(method):
            continue
        mark = getattr(method, MARK_ATTR, None)
        if mark is None:
            raise TypeError(f"{protocol.__name__}.{name} has no routing mark (@write, @memory_read, ...: "
                            f"see registry/protocol.py)")
        if not isinstance(mark, Mark) or not isinstance(mark.route, Route):
            raise TypeError(f"{protocol.__name__}.{name} has an unknown routing mark {mark!r}")
        found[name] = mark
    for name, mark in found.items():
        if (mark.route is Route.OWNED_READ) != (mark.about is not None):
            raise TypeError(f"{protocol.__name__}.{name}: only an owned read names what it is about ({mark})")
        if mark.about is not None and mark.about not in found:
            raise TypeError(f"{protocol.__name__}.{name} is about {mark.about!r}, not a method of the protocol")
    return found

