"""``MemoryStore``: the registry's stub backend, in plain dictionaries.

Same methods, same rows, same idempotency and the same state machines as ``SqlStore``
(tests/unit/test_store_contract.py runs one suite on both), so the daemon's parts can be
unit-tested with no file and no thread. Rows are copies: a caller that mutates one
changes nothing here, as with a database.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from typing import Any, Collection, NoReturn, TypeVar, cast, overload

from tron.common.clock import Clock
from tron.common.redaction import redact, redact_json
from tron.common.states import (ALERT, LANE, LIVE_TASK_STATES, OPEN_TASK_STATES, RUN, SESSION, TASK,
                                AlertState, LaneState, RetryType, RunState, SessionState, TaskState,
                                waits_for_a_decision, waits_for_people)
from tron.registry.rows import Row, Spend, TaskCounts
from tron.registry.store import AGENT_FIELDS, CHECKPOINT_MAX, METRIC, SqlStore, Stamps, content_hash


def _redact_value(value: Any) -> Any:
    """What a JSON round trip through ``redact_json`` leaves of a value (as the database keeps it)."""
    return json.loads(redact_json(value))


@overload
def _out(row: Row) -> Row: ...


@overload
def _out(row: Row | None) -> Row | None: ...


def _out(row: Row | None) -> Row | None:
    """A copy the caller may change (None stays None)."""
    return None if row is None else _copied(row)


_SCALARS = frozenset((str, int, float, bool, type(None)))


T = TypeVar("T")


def _copied(value: T) -> T:
    """A deep copy of a row's value, which is JSON's kind (dicts and lists of scalars): what
    copy.deepcopy gives, at a third to a ninth of its cost (no memo of shared parts: rows
    share none). Every read of the working copy hands one out, several on each restart's path."""
    return cast(T, _walk(value))


def _walk(value: Any) -> Any:
    t = type(value)
    if t is dict:
        return {k: v if type(v) in _SCALARS else _walk(v) for k, v in value.items()}
    if t is list:
        return [v if type(v) in _SCALARS else _walk(v) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_walk(v) for v in value)
    return value  # a scalar (a str enum too): nothing to copy


class MemoryStore(Stamps):
    def __init__(self, *, clock: Clock | None = None, events_kept: int | None = None) -> None:
        super().__init__(clock)
        # As the daemon's working copy (registry/journal.py) it keeps recent events only:
        # the durable store has them all.
        self.events_kept = events_kept
        self.retry_counts: dict[tuple[str, str], int] = {}  # (agent, retry type) -> rows ever, seeded on load
        self.agents_: dict[str, Row] = {}
        self.sessions_: dict[str, Row] = {}
        self.runs_: dict[str, Row] = {}
        self.usage_: list[Row] = []
        self._usage_ids = itertools.count(1)
        self.tasks_: dict[str, Row] = {}
        self.checkpoints_: dict[tuple[str, int], Row] = {}
        self.alerts_: dict[str, Row] = {}
        self.retries_: list[Row] = []
        self.events_: list[Row] = []
        self.metrics_: dict[tuple[str, str], Row] = {}
        self.lanes_: dict[str, Row] = {}
        self.trips_: list[Row] = []
        self._ids = itertools.count(1)
        self._retry_ids = itertools.count(1)

    async def open(self) -> "MemoryStore":
        return self

    async def close(self, *, grace: float = 5.0) -> None:
        pass

    def unavailable(self, err: BaseException) -> bool:
        return False  # memory is never unavailable: whatever it raises is a bug

    def batch(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()  # each write is whole the moment it returns

    # -- upkeep (trim is below, with the working copy) -------------------------------------------

    def health(self) -> dict[str, object]:
        return {"state": "ok"}

    async def warm(self, run_id: str) -> None:
        pass  # alone, it holds every run it ever had; as the journal's memory, the journal warms it

    async def flushed(self, timeout: float) -> bool:
        return True  # nothing is held back

    def recorded(self) -> "MemoryStore":
        return self

    # -- events -------------------------------------------------------------------------------

    def _event(self, kind: str, payload: dict[str, Any], **ids: str | None) -> int:
        eid = next(self._ids)
        if self.events_kept is not None and len(self.events_) >= self.events_kept:
            del self.events_[: max(1, self.events_kept // 10)]
        self.events_.append({"id": eid, "ts": self._wall(), "mono": self._mono(), "kind": kind,
                             "agent": ids.get("agent"), "incarnation": ids.get("incarnation"),
                             "run_id": ids.get("run_id"), "task_id": ids.get("task_id"),
                             "alert_id": ids.get("alert_id"), "payload": _redact_value(payload), "drill": self.drill})
        return eid

    async def event(self, kind: str, payload: dict[str, Any], *, agent: str | None = None,
                    incarnation: str | None = None, run_id: str | None = None, task_id: str | None = None,
                    alert_id: str | None = None) -> int:
        return self._event(kind, payload, agent=agent, incarnation=incarnation, run_id=run_id, task_id=task_id,
                           alert_id=alert_id)

    async def events(self, since: int = 0, limit: int = 200, kind: str | None = None,
                     agent: str | None = None) -> list[Row]:
        rows = [e for e in self.events_ if e["id"] > since and (kind is None or e["kind"] == kind)
                and (agent is None or e["agent"] == agent)]
        return _copied(rows[:limit])

    async def latest_events(self, kinds: list[str], limit: int = 100) -> list[Row]:
        return _copied([e for e in reversed(self.events_) if e["kind"] in kinds][:limit])

    # -- agents ------------------------------------------------------------------------------------

    async def upsert_agent(self, name: str, role: str, parent: str, port: int, provider: str | None) -> Row:
        row = self.agents_.get(name)
        if row is None:
            row = self.agents_[name] = {"name": name, "provider": provider, "state": "declared",
                                        "current_incarnation": None, "crash_looping": 0, "stopped": 0, "paused": 0}
        row.update(role=role, parent=parent, port=port, updated_at=self._wall())
        row["provider"] = row["provider"] or provider
        return _out(row)

    async def set_agent(self, name: str, **fields: Any) -> None:
        bad = set(fields) - AGENT_FIELDS
        if bad:
            raise ValueError(f"set_agent: unknown fields {sorted(bad)}")
        if name in self.agents_:
            self.agents_[name].update({k: int(v) if isinstance(v, bool) else (str(v) if hasattr(v, "value") else v)
                                       for k, v in fields.items()}, updated_at=self._wall())

    async def agent(self, name: str) -> Row | None:
        return _out(self.agents_.get(name))

    async def agents(self) -> list[Row]:
        return [_out(self.agents_[n]) for n in sorted(self.agents_)]

    # -- sessions ----------------------------------------------------------------------------------

    async def open_session(self, incarnation: str, agent: str, port: int, provider: str | None, *,
                           mode: str = "plain") -> None:
        if incarnation in self.sessions_:
            raise ValueError(f"session {incarnation} exists")  # as the primary key would
        self.sessions_[incarnation] = {
            "incarnation": incarnation, "agent": agent, "pid": None, "pid_create_time": None, "port": port,
            "provider": provider, "status": str(SessionState.INTENT), "started_at": self._wall(), "ended_at": None,
            "exit_code": None, "exit_signal": None, "end_reason": None, "started_mono": self._mono(),
            "healthy_mono": None, "mode": mode}
        if agent in self.agents_:
            self.agents_[agent]["current_incarnation"] = incarnation

    def _session_to(self, incarnation: str, new: SessionState, sets: dict[str, Any]) -> bool:
        row = self.sessions_.get(incarnation)
        if row is None or not SESSION.allowed(SessionState(row["status"]), new):
            return False
        row.update(sets, status=str(new))
        return True

    async def session_started(self, incarnation: str, pid: int, create_time: float, *, mode: str) -> None:
        self._session_to(incarnation, SessionState.STARTING, {"pid": pid, "pid_create_time": create_time,
                                                              "mode": mode})

    async def session_running(self, incarnation: str) -> None:
        self._session_to(incarnation, SessionState.RUNNING, {"healthy_mono": self._mono()})

    async def close_session(self, incarnation: str, *, reason: str, exit_code: int | None = None,
                            exit_signal: int | None = None) -> bool:
        reason = redact(reason)
        row = self.sessions_.get(incarnation)
        ended = self._session_to(incarnation, SessionState.ENDED, {
            "ended_at": self._wall(), "end_reason": reason, "exit_code": exit_code, "exit_signal": exit_signal})
        if ended and row is not None:  # it ended, so it was there
            self._event("session_ended", {"reason": reason, "exit_code": exit_code, "signal": exit_signal,
                                          "pid": row["pid"]}, agent=row["agent"], incarnation=incarnation)
        return ended

    async def open_sessions(self) -> list[Row]:
        rows = [r for r in self.sessions_.values() if r["status"] != SessionState.ENDED]
        return _copied(sorted(rows, key=lambda r: r["started_at"]))

    async def session(self, incarnation: str) -> Row | None:
        return _out(self.sessions_.get(incarnation))

    async def sessions_of(self, agent: str, *, limit: int = 200) -> list[Row]:
        mine = [r for r in self.sessions_.values() if r["agent"] == agent]  # insertion order breaks ties
        rows = [r for _, r in sorted(enumerate(mine), key=lambda ir: (-(ir[1]["started_mono"] or 0.0), -ir[0]))]
        return _copied(rows[:limit])

    # -- runs --------------------------------------------------------------------------------------

    async def create_run(self, run_id: str, prompt: str, drill: bool) -> None:
        if run_id in self.runs_:
            raise ValueError(f"run {run_id} exists")
        self.runs_[run_id] = {"run_id": run_id, "prompt": redact(prompt), "status": str(RunState.RUNNING),
                              "result": None, "failure": None, "drill": int(drill), "created_at": self._wall(),
                              "finished_at": None, "budget_usd": None, "budget_tokens": None}
        self._event("run_created", {"prompt_chars": len(prompt), "drill": drill}, run_id=run_id)

    async def finish_run(self, run_id: str, status: RunState, result: str | None,
                         failure: dict[str, Any] | None) -> bool:
        row = self.runs_.get(run_id)
        if row is None or row["status"] != RunState.RUNNING or not RUN.allowed(RunState.RUNNING, status):
            return False
        row.update(status=str(status), result=redact(result) if result else result,
                   failure=_redact_value(failure) if failure else None, finished_at=self._wall())
        self._event(f"run_{status}", {"reason": (failure or {}).get("reason"), "failure": failure}, run_id=run_id)
        return True

    async def reopen_run(self, run_id: str) -> bool:
        row = self.runs_.get(run_id)
        if row is None or not RUN.allowed(RunState(row["status"]), RunState.RUNNING):
            return False
        row.update(status=str(RunState.RUNNING), finished_at=None)
        return True

    async def run(self, run_id: str) -> Row | None:
        return _out(self.runs_.get(run_id))

    async def runs(self, limit: int = 100) -> list[Row]:
        return _copied(sorted(self.runs_.values(), key=lambda r: r["created_at"], reverse=True)[:limit])

    # -- tasks -------------------------------------------------------------------------------------

    async def upsert_task(self, rec: Row) -> tuple[Row, bool]:
        if rec["task_id"] in self.tasks_:
            return _out(self.tasks_[rec["task_id"]]), False
        self.tasks_[rec["task_id"]] = {
            "task_id": rec["task_id"], "run_id": rec["run_id"], "parent_task_id": rec.get("parent_task_id"),
            "agent": rec["agent"], "parent_agent": rec["parent_agent"], "kind": rec["kind"],
            "prompt": redact(rec["prompt"]), "status": str(TaskState.ASSIGNED), "attempt": 1,
            "provider": rec.get("provider"), "progress": None, "lease_incarnation": None, "result": None,
            "failure": None, "created_at": self._wall(), "updated_at": self._wall(), "delivered": 0, "held_since": None,
            "traceparent": rec.get("traceparent")}
        self._event("task_assigned", {"agent": rec["agent"], "parent": rec["parent_agent"], "kind": rec["kind"]},
                    agent=rec["agent"], run_id=rec["run_id"], task_id=rec["task_id"])
        return _out(self.tasks_[rec["task_id"]]), True

    async def task(self, task_id: str) -> Row | None:
        return _out(self.tasks_.get(task_id))

    def _task_to(self, task_id: str, new: TaskState, sets: dict[str, Any], *, event: dict[str, Any] | None = None,
                 attempt: int = 0) -> Row | None:
        row = self.tasks_.get(task_id)
        if row is None or not TASK.allowed(TaskState(row["status"]), new):
            return None
        before = _copied(row)
        row.update(sets, status=str(new), attempt=row["attempt"] + attempt, updated_at=self._wall())
        kind = "task_requeued" if new == TaskState.ASSIGNED else f"task_{new}"
        self._event(kind, {"from": before["status"], **(event or {})}, agent=row["agent"], task_id=task_id,
                    run_id=row["run_id"])
        return before

    async def task_progress(self, task_id: str, incarnation: str, progress: str | None) -> None:
        sets: dict[str, Any] = {"lease_incarnation": incarnation}
        if progress is not None:
            sets["progress"] = progress
        row = self.tasks_.get(task_id)
        if row and row["status"] == TaskState.ASSIGNED:
            self._task_to(task_id, TaskState.RUNNING, sets)
        elif row and row["status"] == TaskState.RUNNING:
            row.update(sets, updated_at=self._wall())

    async def finish_task(self, task_id: str, status: TaskState, result: str | None, failure: dict[str, Any] | None,
                          *, reason: str | None = None) -> bool:
        before = self._task_to(task_id, status, {
            "result": redact(result) if result else result, "failure": _redact_value(failure) if failure else None,
            "lease_incarnation": None, "held_since": None}, event={"reason": reason})
        return before is not None and before["status"] in LIVE_TASK_STATES

    def _tasks_of(self, agent: str, states: Collection[str], *, people_parks: bool = True) -> list[Row]:
        rows = [t for t in self.tasks_.values() if t["agent"] == agent and t["status"] in states
                and (people_parks or not waits_for_people(t))]
        return _copied(sorted(rows, key=lambda t: t["created_at"]))

    async def open_tasks(self, agent: str) -> list[Row]:
        return self._tasks_of(agent, OPEN_TASK_STATES, people_parks=False)

    async def live_tasks(self, agent: str) -> list[Row]:
        return self._tasks_of(agent, LIVE_TASK_STATES)

    async def requeue_tasks(self, agent: str, *, provider: str | None = None, to_agent: str | None = None) -> list[Row]:
        if to_agent:  # its tasks waiting for a decision go with the others, as they are (SqlStore.requeue_tasks)
            for t in self._tasks_of(agent, {TaskState.PARKED, TaskState.ESCALATED}):
                if waits_for_a_decision(t):
                    self.tasks_[t["task_id"]].update(agent=to_agent, lease_incarnation=None, updated_at=self._wall())
                    self._event("task_moved", {"from_agent": agent, "status": str(t["status"]),
                                               "parked_reason": t.get("parked_reason")},
                                agent=to_agent, task_id=t["task_id"], run_id=t["run_id"])
        for t in self._tasks_of(agent, OPEN_TASK_STATES, people_parks=False):
            sets: dict[str, Any] = {"lease_incarnation": None}
            if provider:
                sets["provider"] = provider
            if to_agent:
                sets["agent"] = to_agent
            self._task_to(t["task_id"], TaskState.ASSIGNED, sets, attempt=1,
                          event={"provider": provider, **({"from_agent": agent} if to_agent else {})})
        return await self.open_tasks(to_agent or agent)

    async def hold_task(self, task_id: str, reason: str) -> bool:
        return self._task_to(task_id, TaskState.ESCALATED, {"lease_incarnation": None,
                                                            "held_since": self._mono()},
                             event={"reason": reason}) is not None

    async def release_task(self, task_id: str, provider: str | None) -> bool:
        sets: dict[str, Any] = {"held_since": None}
        if provider:
            sets["provider"] = provider
        return self._task_to(task_id, TaskState.ASSIGNED, sets, event={"provider": provider}) is not None

    async def park_task(self, task_id: str, reason: str, kind: str = "providers",
                        lease: str | None = None) -> bool:
        return self._task_to(task_id, TaskState.PARKED, {"held_since": self._mono(), "parked_reason": kind,
                                                        "lease_incarnation": lease},
                             event={"reason": reason, "kind": kind}) is not None

    async def unpark_task(self, task_id: str, provider: str | None = None) -> bool:
        sets: dict[str, Any] = {"held_since": None, "parked_reason": None}
        if provider:
            sets["provider"] = provider
        return self._task_to(task_id, TaskState.RUNNING, sets, event={"provider": provider}) is not None

    async def set_task_provider(self, task_id: str, provider: str) -> None:
        row = self.tasks_.get(task_id)
        if row is not None:
            row.update(provider=provider, updated_at=self._wall())

    async def set_run_budget(self, run_id: str, usd: float | None, tokens: int | None) -> bool:
        row = self.runs_.get(run_id)
        if row is None:
            return False
        row.update(budget_usd=usd, budget_tokens=tokens)
        self._event("run_budget", {"usd": usd, "tokens": tokens}, run_id=run_id)
        return True

    async def record_usage(self, row: Row) -> Row:
        rec = {"id": next(self._usage_ids), "ts": self._wall(), "mono": self._mono(), "drill": self.drill, **row}
        self.usage_.append(rec)
        return dict(rec)  # flat: scalars only

    def _usage(self, run_id: str | None, task_id: str | None, agent: str | None,
               since_mono: float | None) -> list[Row]:
        return [u for u in self.usage_ if (run_id is None or u["run_id"] == run_id)
                and (task_id is None or u["task_id"] == task_id) and (agent is None or u["agent"] == agent)
                and (since_mono is None or u["mono"] > since_mono)]

    async def usage(self, *, run_id: str | None = None, task_id: str | None = None, agent: str | None = None,
                    since_mono: float | None = None, limit: int = 1000) -> list[Row]:
        return _copied(list(reversed(self._usage(run_id, task_id, agent, since_mono)))[:limit])

    async def spend(self, *, run_id: str | None = None, task_id: str | None = None, agent: str | None = None,
                    since_mono: float | None = None) -> Spend:
        rows = self._usage(run_id, task_id, agent, since_mono)
        # a float even for no calls, as SqlStore answers (a sum of nothing is the int 0)
        return {"usd": round(sum((u["cost_usd"] for u in rows), 0.0), 10), "calls": len(rows),
                "tokens": sum(u["input_tokens"] + u["output_tokens"] + u["cache_read_tokens"]
                              + u["cache_write_tokens"] for u in rows)}

    async def reopen_task(self, task_id: str, *, by: str) -> bool:
        return self._task_to(task_id, TaskState.ASSIGNED, {"result": None, "failure": None, "delivered": 0,
                                                           "lease_incarnation": None},
                             attempt=1, event={"reopened_by": by}) is not None

    async def tasks_of_run(self, run_id: str) -> list[Row]:
        rows = [t for t in self.tasks_.values() if t["run_id"] == run_id]
        return _copied(sorted(rows, key=lambda t: t["created_at"]))

    async def parked_tasks(self) -> list[Row]:
        rows = [t for t in self.tasks_.values() if t["status"] == TaskState.PARKED]
        return _copied(sorted(rows, key=lambda t: t["held_since"] or 0.0))

    async def held_tasks(self) -> list[Row]:
        rows = [t for t in self.tasks_.values() if t["status"] == TaskState.ESCALATED]
        return _copied(sorted(rows, key=lambda t: t["held_since"]))

    async def mark_delivered(self, task_id: str) -> None:
        if task_id in self.tasks_:
            self.tasks_[task_id]["delivered"] = 1

    async def undelivered_results(self) -> list[Row]:
        def waiting(t: Row) -> bool:
            parent = self.tasks_.get(t["parent_task_id"]) if t["parent_task_id"] else None
            return t["parent_task_id"] is None or (parent is not None and parent["status"] in LIVE_TASK_STATES)
        return _copied([t for t in self.tasks_.values()
                              if t["status"] in ("done", "failed") and not t["delivered"] and waiting(t)])

    # -- checkpoints -------------------------------------------------------------------------------

    async def add_checkpoint(self, task_id: str, step: int, step_id: str, output: str,
                             incarnation: str | None) -> tuple[Row, bool]:
        output = redact(output)
        if len(output.encode()) > CHECKPOINT_MAX:
            raise ValueError(f"checkpoint output is {len(output.encode())} bytes; the limit is {CHECKPOINT_MAX}")
        key = (task_id, step)
        created = key not in self.checkpoints_
        if created:
            self.checkpoints_[key] = {"task_id": task_id, "step": step, "step_id": step_id,
                                      "hash": content_hash(output), "output": output, "incarnation": incarnation,
                                      "created_at": self._wall()}
            self._event("checkpoint", {"step": step, "step_id": step_id, "hash": content_hash(output)},
                        task_id=task_id, incarnation=incarnation)
        return _out(self.checkpoints_[key]), created

    async def checkpoints(self, task_id: str) -> list[Row]:
        return _copied([c for (t, _), c in sorted(self.checkpoints_.items()) if t == task_id])

    async def drop_checkpoints(self, task_id: str, from_step: int, *, by: str) -> list[Row]:
        keys = sorted(k for k in self.checkpoints_ if k[0] == task_id and k[1] >= from_step)
        rows = [{k: self.checkpoints_[key][k] for k in ("step", "step_id", "hash")} for key in keys]
        for key in keys:
            del self.checkpoints_[key]
        if rows:
            self._event("checkpoints_set_aside", {"from_step": from_step, "steps": rows, "by": by}, task_id=task_id)
        return rows

    # -- lanes -------------------------------------------------------------------------------------

    async def record_trip(self, fingerprint: str, lane: str, description: str, *, task_id: str | None,
                          run_id: str | None) -> list[float]:
        self.trips_.append({"fingerprint": fingerprint, "lane": lane, "description": description,
                            "task_id": task_id, "run_id": run_id, "mono": self._mono(), "created_at": self._wall()})
        self._event("lane_trip", {"fingerprint": fingerprint, "lane": lane, "description": description},
                    task_id=task_id, run_id=run_id)
        return sorted(t["mono"] for t in self.trips_ if t["fingerprint"] == fingerprint)

    async def lane(self, lane: str) -> Row | None:
        return _out(self.lanes_.get(lane))

    async def lanes(self) -> list[Row]:
        return [_out(self.lanes_[k]) for k in sorted(self.lanes_)]

    async def set_lane(self, lane: str, state: LaneState, *, fingerprint: str | None, reason: str,
                       by: str) -> bool:
        old = LaneState(self.lanes_[lane]["state"]) if lane in self.lanes_ else LaneState.OPEN
        if not LANE.allowed(old, state):
            return False
        reason = redact(reason)
        self.lanes_[lane] = {"lane": lane, "state": str(state), "fingerprint": fingerprint, "reason": reason,
                             "changed_by": by, "changed_at": self._wall()}
        self._event(f"lane_{state}", {"lane": lane, "from": old, "fingerprint": fingerprint, "reason": reason,
                                       "by": by})
        return True

    # -- alerts ------------------------------------------------------------------------------------

    async def insert_alert(self, alert: Row, *, stable: bool) -> tuple[Row, bool]:
        existing = next((a for a in self.alerts_.values() if a["agent"] == alert["service"]
                         and a["incarnation"] == alert["incarnation"]), None)
        if existing is not None or alert["alert_id"] in self.alerts_:
            return _out(existing or self.alerts_[alert["alert_id"]]), False
        self.alerts_[alert["alert_id"]] = {
            "alert_id": alert["alert_id"], "agent": alert["service"], "incarnation": alert["incarnation"],
            "reason": alert["reason"], "detail": _redact_value(alert.get("detail", {})),
            "task_id": alert.get("task_id"), "run_id": alert.get("run_id"), "status": str(AlertState.PENDING),
            "delivered_to": None, "deliveries": 0, "decision": None, "created_at": self._wall(), "handled_at": None,
            "drill": self.drill, "mono": self._mono(), "stable": int(stable)}
        self._event("alert_raised", {"reason": alert["reason"], "detail": alert.get("detail", {}), "stable": stable},
                    agent=alert["service"], incarnation=alert["incarnation"], task_id=alert.get("task_id"),
                    run_id=alert.get("run_id"), alert_id=alert["alert_id"])
        return _out(self.alerts_[alert["alert_id"]]), True

    async def alert_for(self, agent: str, incarnation: str) -> Row | None:
        return _out(next((a for a in self.alerts_.values() if a["agent"] == agent
                          and a["incarnation"] == incarnation), None))

    async def alert(self, alert_id: str) -> Row | None:
        return _out(self.alerts_.get(alert_id))

    async def mark_alert(self, alert_id: str, status: AlertState, *, decision: str | None = None) -> bool:
        row = self.alerts_.get(alert_id)
        if row is None or not ALERT.allowed(AlertState(row["status"]), status):
            return False
        row.update(status=str(status), decision=decision or row["decision"])
        if status in (AlertState.HANDLED, AlertState.UNDELIVERABLE):
            row["handled_at"] = self._wall()
        if status == AlertState.UNDELIVERABLE:
            self._event("alert_undeliverable", {"decision": decision}, alert_id=alert_id)
        return True

    async def alert_delivered(self, alert_id: str, to: str) -> None:
        row = self.alerts_.get(alert_id)
        if row is not None:
            row.update(delivered_to=to, deliveries=row["deliveries"] + 1)
            if row["status"] == AlertState.PENDING:
                row["status"] = str(AlertState.DELIVERED)

    async def open_alerts(self) -> list[Row]:
        rows = [a for a in self.alerts_.values() if a["status"] != AlertState.HANDLED]
        return _copied(sorted(rows, key=lambda a: a["mono"]))

    async def failures(self, agent: str, *, limit: int = 200) -> list[Row]:
        mine = [a for a in self.alerts_.values() if a["agent"] == agent]  # insertion order breaks ties
        rows = [a for _, a in sorted(enumerate(mine), key=lambda ia: (-ia[1]["mono"], -ia[0]))]
        return [{"alert_id": a["alert_id"], "mono": a["mono"], "stable": a["stable"]} for a in rows[:limit]]

    # -- the ladder's record -------------------------------------------------------------------------

    async def record_retry(self, *, alert_id: str, agent_id: str, retry_type: RetryType, reason: str,
                           detail: dict[str, Any],
                           case: str, task_id: str | None = None, run_id: str | None = None,
                           from_provider: str | None = None, to_provider: str | None = None,
                           decided_by: str = "policy", requested_by: str | None = None,
                           hop: str = "") -> Row | None:
        if not reason or reason == "Unknown error":
            raise ValueError("a retry needs a real reason")
        reason = redact(reason)
        if any((r["alert_id"], r["retry_type"], r["agent_id"], r["hop"]) == (alert_id, retry_type, agent_id, hop)
               for r in self.retries_):
            return None
        count = self.retry_counts.get((agent_id, str(retry_type)), 0)
        self.retry_counts[(agent_id, str(retry_type))] = count + 1
        row: Row = {"id": next(self._retry_ids), "alert_id": alert_id, "agent_id": agent_id, "task_id": task_id,
                    "run_id": run_id, "retry_type": str(retry_type), "retry_count": count + 1, "reason": reason,
                    "detail": _redact_value(detail), "from_provider": from_provider, "to_provider": to_provider,
                    "decided_by": decided_by, "requested_by": requested_by, "hop": hop, "timestamp": self._wall(),
                    "mono": self._mono(), "drill": self.drill, "case_id": case}
        self.retries_.append(row)
        metric = METRIC.get(RetryType(retry_type))
        if metric and not self.drill:
            for scope, key in (("agent", agent_id), ("provider", from_provider), ("task", task_id), ("run", run_id)):
                if key:
                    m = self.metrics_.setdefault((scope, key), {
                        "scope": scope, "key": key, "failures": 0, "restarts": 0, "escalations": 0,
                        "provider_switches": 0, "permanent_failures": 0, "provider_retries": 0,
                        "last_reason": None})
                    m["failures"] += int(retry_type != RetryType.ESCALATION)
                    m[metric] += 1
                    m.update(last_reason=reason, updated_at=self._wall())
        self._event(str(retry_type), {"reason": reason, "case": case, "detail": detail,
                                      "from_provider": from_provider, "to_provider": to_provider,
                                      "decided_by": decided_by, "requested_by": requested_by, "hop": hop},
                    agent=agent_id, task_id=task_id, run_id=run_id, alert_id=alert_id)
        return _out(row)

    async def retry_rows(self, alert_id: str) -> list[Row]:
        return _copied([r for r in self.retries_ if r["alert_id"] == alert_id])

    async def task_counts(self, task_id: str) -> TaskCounts:
        kinds = [r["retry_type"] for r in self.retries_ if r["task_id"] == task_id]
        return {"restarts": kinds.count(RetryType.CHILD_RESTART) + kinds.count(RetryType.PROVIDER_RETRY),
                "switches": kinds.count(RetryType.LLM_CHANGE),
                "escalations": kinds.count(RetryType.ESCALATION), "failed": RetryType.PERMANENT_FAILURE in kinds}

    async def task_history(self, task_id: str) -> list[Row]:
        return _copied([r for r in self.retries_ if r["task_id"] == task_id])

    async def history(self, limit: int = 200, agent: str | None = None) -> list[Row]:
        rows = [r for r in self.retries_ if agent is None or r["agent_id"] == agent]
        return _copied(list(reversed(rows))[:limit])

    async def failure_metrics(self) -> list[Row]:
        return _copied([self.metrics_[k] for k in sorted(self.metrics_)])

    # -- the working copy of a durable store ---------------------------------------------------

    async def load_from(self, durable: SqlStore) -> None:
        """What the daemon decides on, read back from the durable store at start-up: every
        agent, open session, live run and task (with its checkpoints and ladder rows), the
        latest alerts of each agent, and the per-agent row counts."""
        q = durable.db.all
        self.agents_ = {r["name"]: r for r in await q("SELECT * FROM agents")}
        self.sessions_ = {r["incarnation"]: r for r in await q("SELECT * FROM sessions WHERE status != 'ended'")}
        tasks = await q("SELECT * FROM tasks WHERE status IN ('assigned','running','parked','escalated') "
                        "OR run_id IN (SELECT run_id FROM runs WHERE status = 'running') "
                        "OR (delivered = 0 AND parent_task_id IS NULL)")
        self.tasks_ = {r["task_id"]: _json(r, "failure") for r in tasks}
        run_ids = {t["run_id"] for t in tasks}
        self.runs_ = {r["run_id"]: _json(r, "failure") for r in await q("SELECT * FROM runs WHERE status = 'running'")}
        for run_id in run_ids - set(self.runs_):
            for r in await q("SELECT * FROM runs WHERE run_id = ?", (run_id,)):
                self.runs_[run_id] = _json(r, "failure")
        for task_id in self.tasks_:
            for c in await q("SELECT * FROM checkpoints WHERE task_id = ? ORDER BY step", (task_id,)):
                self.checkpoints_[(task_id, c["step"])] = c
        alerts = await q("SELECT * FROM (SELECT a.*, ROW_NUMBER() OVER (PARTITION BY agent ORDER BY mono DESC) AS n "
                         "FROM alerts a) AS recent WHERE n <= 200 OR status != 'handled' ORDER BY mono, alert_id")
        self.alerts_ = {a["alert_id"]: _json({k: v for k, v in a.items() if k != "n"}, "detail") for a in alerts}
        keep = set(self.alerts_)
        rows = await q("SELECT * FROM retry_history ORDER BY id")
        self.retries_ = [_json(r, "detail") for r in rows
                         if r["task_id"] in self.tasks_ or r["alert_id"].split(":")[0] in keep]
        self.retry_counts = {(r["agent_id"], r["retry_type"]): r["n"] for r in await q(
            "SELECT agent_id, retry_type, COUNT(*) AS n FROM retry_history GROUP BY agent_id, retry_type")}
        self.lanes_ = {r["lane"]: r for r in await q("SELECT * FROM lanes")}
        self.trips_ = await q("SELECT fingerprint, lane, description, task_id, run_id, mono, created_at "
                              "FROM lane_trips ORDER BY mono DESC LIMIT 5000")

    async def warm_from(self, durable: SqlStore, run_id: str) -> None:
        """Bring one run back into the working copy (an operator acts on an old one)."""
        q = durable.db.all
        for r in await q("SELECT * FROM runs WHERE run_id = ?", (run_id,)):
            self.runs_.setdefault(run_id, _json(r, "failure"))
        for t in await q("SELECT * FROM tasks WHERE run_id = ?", (run_id,)):
            if t["task_id"] in self.tasks_:
                continue
            self.tasks_[t["task_id"]] = _json(t, "failure")
            for c in await q("SELECT * FROM checkpoints WHERE task_id = ?", (t["task_id"],)):
                self.checkpoints_.setdefault((t["task_id"], c["step"]), c)
            known = {r["id"] for r in self.retries_}
            for r in await q("SELECT * FROM retry_history WHERE task_id = ? ORDER BY id", (t["task_id"],)):
                if r["id"] not in known:
                    self.retries_.append(_json(r, "detail"))

    def trim(self, *, keep_alerts: int = 200, keep_runs: set[str] | frozenset[str] = frozenset(),
             keep_sessions: set[str] | frozenset[str] = frozenset()) -> None:
        """Forget what no decision will read again (the durable store keeps it): ended
        sessions, finished runs and their delivered tasks, old handled alerts. ``keep_runs``
        and ``keep_sessions``: what the durable store does not have yet (the journal's)."""
        for inc in [i for i, r in self.sessions_.items() if r["status"] == SessionState.ENDED
                    and i not in keep_sessions]:
            del self.sessions_[inc]
        live_runs = {t["run_id"] for t in self.tasks_.values()
                     if t["status"] in LIVE_TASK_STATES or not t["delivered"]} | set(keep_runs)
        for run_id in [r for r, row in self.runs_.items() if row["status"] != RunState.RUNNING and r not in live_runs]:
            del self.runs_[run_id]
        for task_id in [t for t, row in self.tasks_.items() if row["run_id"] not in self.runs_]:
            del self.tasks_[task_id]
        self.checkpoints_ = {k: v for k, v in self.checkpoints_.items() if k[0] in self.tasks_}
        by_agent: dict[str, list[Row]] = {}
        for a in self.alerts_.values():
            by_agent.setdefault(a["agent"], []).append(a)
        keep: set[str] = set()
        for rows in by_agent.values():
            rows.sort(key=lambda a: a["mono"], reverse=True)
            keep |= {a["alert_id"] for i, a in enumerate(rows) if i < keep_alerts or a["status"] != AlertState.HANDLED}
        self.alerts_ = {k: v for k, v in self.alerts_.items() if k in keep}
        self.retries_ = [r for r in self.retries_ if r["task_id"] in self.tasks_ or r["alert_id"].split(":")[0] in keep]
        self.usage_ = [u for u in self.usage_ if u["run_id"] in self.runs_]  # spend is read from the durable store


def _json(row: Row, *columns: str) -> Row:
    for c in columns:
        if isinstance(row.get(c), str):
            row[c] = json.loads(row[c])
    return row


def open_reader(url: str) -> NoReturn:
    raise FileNotFoundError(f"a {url} registry lives in its daemon's memory: nothing outside the daemon can read it")


def open_url(url: str, *, clock: Clock | None = None) -> MemoryStore:
    """registry/backends.py's entry for ``memory://``: a registry that keeps nothing past its process."""
    return MemoryStore(clock=clock)
