"""The ``Store`` protocol: everything the daemon asks of its registry, in one place.

Implementations: ``registry.store.SqlStore`` (SQLite, and PostgreSQL through
registry/pg.py), ``registry.memory.MemoryStore`` (the stub unit tests run on, and the
journal's memory), ``registry.journal.JournaledStore`` (decides on memory, records behind).
tests/unit/test_store_contract.py runs one behavioural suite on every one of them and checks
that each speaks this protocol, method by method and parameter by parameter.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from common.states import AlertState, LaneState, RetryType, RunState, TaskState


@runtime_checkable
class Store(Protocol):
    drill: str | None  # the drill label stamped on every row written while it is set

    async def open(self) -> "Store":
        ...

    async def close(self) -> None:
        ...

    async def event(self, kind: str, payload: dict[str, Any], *, agent: str | None = None,
                    incarnation: str | None = None, run_id: str | None = None, task_id: str | None = None,
                    alert_id: str | None = None) -> int:
        ...

    async def events(self, since: int = 0, limit: int = 200, kind: str | None = None,
                     agent: str | None = None) -> list[dict]:
        ...

    async def upsert_agent(self, name: str, role: str, parent: str, port: int, provider: str | None) -> dict:
        ...

    async def set_agent(self, name: str, **fields: Any) -> None:
        ...

    async def agent(self, name: str) -> dict | None:
        ...

    async def agents(self) -> list[dict]:
        ...

    async def open_session(self, incarnation: str, agent: str, port: int, provider: str | None, *,
                           mode: str = "plain") -> None:
        ...

    async def session_started(self, incarnation: str, pid: int, create_time: float, *, mode: str) -> None:
        ...

    async def session_running(self, incarnation: str) -> None:
        ...

    async def close_session(self, incarnation: str, *, reason: str, exit_code: int | None = None,
                            exit_signal: int | None = None) -> bool:
        ...

    async def open_sessions(self) -> list[dict]:
        ...

    async def session(self, incarnation: str) -> dict | None:
        ...

    async def create_run(self, run_id: str, prompt: str, drill: bool) -> None:
        ...

    async def finish_run(self, run_id: str, status: RunState, result: str | None, failure: dict | None) -> bool:
        ...

    async def reopen_run(self, run_id: str) -> bool:
        ...

    async def run(self, run_id: str) -> dict | None:
        ...

    async def runs(self, limit: int = 100) -> list[dict]:
        ...

    async def upsert_task(self, rec: dict) -> tuple[dict, bool]:
        ...

    async def task(self, task_id: str) -> dict | None:
        ...

    async def task_progress(self, task_id: str, incarnation: str, progress: str | None) -> None:
        ...

    async def finish_task(self, task_id: str, status: TaskState, result: str | None, failure: dict | None,
                          *, reason: str | None = None) -> bool:
        ...

    async def open_tasks(self, agent: str) -> list[dict]:
        ...

    async def live_tasks(self, agent: str) -> list[dict]:
        ...

    async def requeue_tasks(self, agent: str, *, provider: str | None = None) -> list[dict]:
        ...

    async def hold_task(self, task_id: str, reason: str) -> bool:
        ...

    async def release_task(self, task_id: str, provider: str | None) -> bool:
        ...

    async def park_task(self, task_id: str, reason: str, kind: str = "providers") -> bool:
        ...

    async def set_run_budget(self, run_id: str, usd: float | None, tokens: int | None) -> bool:
        ...

    async def record_usage(self, row: dict) -> dict:
        ...

    async def spend(self, *, run_id: str | None = None, task_id: str | None = None, agent: str | None = None,
                    since_mono: float | None = None) -> dict:
        ...

    async def usage(self, *, run_id: str | None = None, task_id: str | None = None, agent: str | None = None,
                    since_mono: float | None = None, limit: int = 1000) -> list[dict]:
        ...

    async def unpark_task(self, task_id: str, provider: str | None = None) -> bool:
        ...

    async def set_task_provider(self, task_id: str, provider: str) -> None:
        ...

    async def reopen_task(self, task_id: str, *, by: str) -> bool:
        ...

    async def tasks_of_run(self, run_id: str) -> list[dict]:
        ...

    async def held_tasks(self) -> list[dict]:
        ...

    async def parked_tasks(self) -> list[dict]:
        ...

    async def mark_delivered(self, task_id: str) -> None:
        ...

    async def undelivered_results(self) -> list[dict]:
        ...

    async def add_checkpoint(self, task_id: str, step: int, step_id: str, output: str,
                             incarnation: str | None) -> tuple[dict, bool]:
        ...

    async def checkpoints(self, task_id: str) -> list[dict]:
        ...

    async def drop_checkpoints(self, task_id: str, from_step: int, *, by: str) -> list[dict]:
        ...

    async def record_trip(self, fingerprint: str, lane: str, description: str, *, task_id: str | None,
                          run_id: str | None) -> list[float]:
        ...

    async def lane(self, lane: str) -> dict | None:
        ...

    async def lanes(self) -> list[dict]:
        ...

    async def set_lane(self, lane: str, state: LaneState, *, fingerprint: str | None, reason: str,
                       by: str) -> bool:
        ...

    async def insert_alert(self, alert: dict, *, stable: bool) -> tuple[dict, bool]:
        ...

    async def alert_for(self, agent: str, incarnation: str) -> dict | None:
        ...

    async def alert(self, alert_id: str) -> dict | None:
        ...

    async def mark_alert(self, alert_id: str, status: AlertState, *, decision: str | None = None) -> bool:
        ...

    async def alert_delivered(self, alert_id: str, to: str) -> None:
        ...

    async def open_alerts(self) -> list[dict]:
        ...

    async def failures(self, agent: str, *, limit: int = 200) -> list[dict]:
        ...

    async def record_retry(self, *, alert_id: str, agent_id: str, retry_type: RetryType, reason: str, detail: dict,
                           case: str, task_id: str | None = None, run_id: str | None = None,
                           from_provider: str | None = None, to_provider: str | None = None,
                           decided_by: str = "policy", requested_by: str | None = None,
                           hop: str = "") -> dict | None:
        ...

    async def retry_rows(self, alert_id: str) -> list[dict]:
        ...

    async def task_counts(self, task_id: str) -> dict:
        ...

    async def task_history(self, task_id: str) -> list[dict]:
        ...

    async def history(self, limit: int = 200, agent: str | None = None) -> list[dict]:
        ...

    async def failure_metrics(self) -> list[dict]:
        ...
