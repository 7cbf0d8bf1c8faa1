"""The registry writer (``Store``). Only the daemon holds one; agents talk to the daemon.

Every method is one transaction. Idempotency lives in the schema (unique indexes on
alerts and retry_history): a duplicate request finds its twin instead of writing a second
row. Every state change of a session, task, run or alert goes through one function per
machine (``_task_to``, ...), which checks the edge against ``tron.common.states``, writes it
with a guard on the old state, and records it as an event.

The SQL is portable (``?`` placeholders, ``ON CONFLICT``, ``RETURNING``); ``tron.registry.db``
runs it on an engine. ``tron.registry.memory.MemoryStore`` is the stub with the same contract.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, overload

from tron.common.clock import Clock, MonotonicClock, utc_iso
from tron.common.redaction import redact, redact_json
from tron.common.states import (ALERT, LANE, PEOPLE_PARKS, RUN, SESSION, TASK, AlertState, LaneState, LIVE_TASK_STATES,
                                OPEN_TASK_STATES, RetryType, RunState, SessionState, TaskState, sql_in)
from tron.registry.db import Db, Tx
from tron.registry.rows import Row, Spend, TaskCounts

log = logging.getLogger("tron.registry")

# Which failure_metrics counter each kind of ladder row moves (operator restarts are not failures).
# An open task an incarnation works on (or is handed): not one parked for people (states.PEOPLE_PARKS).
_PEOPLE_PARK = f"(status = '{TaskState.PARKED}' AND COALESCE(parked_reason, '') IN {sql_in(PEOPLE_PARKS)})"
_NOT_PEOPLE_PARK = f"NOT {_PEOPLE_PARK}"
_WAITS_FOR_A_DECISION = f"({_PEOPLE_PARK} OR status = '{TaskState.ESCALATED}')"  # states.waits_for_a_decision
METRIC = {RetryType.CHILD_RESTART: "restarts", RetryType.ESCALATION: "escalations",
          RetryType.LLM_CHANGE: "provider_switches", RetryType.PERMANENT_FAILURE: "permanent_failures",
          RetryType.PROVIDER_RETRY: "provider_retries"}
CHECKPOINT_MAX = 64 * 1024  # bytes of a step's output kept in the registry
AGENT_FIELDS = frozenset({"state", "current_incarnation", "provider", "crash_looping", "stopped", "paused"})


def content_hash(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@overload
def _decode(row: Row, *columns: str) -> Row: ...


@overload
def _decode(row: None, *columns: str) -> None: ...


@overload
def _decode(row: Row | None, *columns: str) -> Row | None: ...


def _decode(row: Row | None, *columns: str) -> Row | None:
    """``row`` with its JSON ``columns`` decoded (in place); None stays None."""
    if row is not None:
        for c in columns:
            if row.get(c):
                row[c] = json.loads(row[c])
    return row


def _present(row: Row | None, what: str) -> Row:
    """A row the statement before it in the same transaction wrote or counted: always
    there. If the engine ever answers nothing, say so rather than hand out None."""
    if row is None:
        raise RuntimeError(f"registry: {what} returned no row inside its own transaction")
    return row


class Stamps:
    """When a row is written: the clock's reading and the wall time, unless pinned. A
    journal replaying a write later pins the times the write really happened at."""

    def __init__(self, clock: Clock | None) -> None:
        self.clock = clock or MonotonicClock()
        self._pinned: tuple[float, str] | None = None
        # The name of the drill in progress: every event, alert and retry row written
        # meanwhile carries it, and failure_metrics (production figures) skip it.
        self.drill: str | None = None

    def _mono(self) -> float:
        return self._pinned[0] if self._pinned else self.clock.now()

    def _wall(self) -> str:
        return self._pinned[1] if self._pinned else utc_iso()

    @contextlib.contextmanager
    def pinned(self, mono: float, wall: str, drill: str | None) -> Iterator[None]:
        saved = self._pinned, self.drill
        self._pinned, self.drill = (mono, wall), drill
        try:
            yield
        finally:
            self._pinned, self.drill = saved


class SqlStore(Stamps):
    def __init__(self, db: Db, *, clock: Clock | None = None) -> None:
        super().__init__(clock)
        self.db = db

    async def open(self) -> "SqlStore":
        await self.db.open()
        return self

    async def close(self, *, grace: float = 5.0) -> None:
        await self.db.close()  # every write is recorded as it is made: nothing to wait for

    # -- upkeep: every write is durable when it returns; nothing is kept to forget ----------

    def health(self) -> dict[str, object]:
        return {"state": "ok", "pending": 0}

    def trim(self) -> None:
        pass  # nothing is kept in memory

    async def flushed(self, timeout: float) -> bool:
        return True

    async def warm(self, run_id: str) -> None:
        pass

    def recorded(self) -> "SqlStore":
        return self

    def unavailable(self, err: BaseException) -> bool:
        return self.db.unavailable(err)

    def batch(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.db.batch()

    # -- events ---------------------------------------------------------------------------

    async def _event(self, tx: Tx, kind: str, payload: dict[str, Any], **ids: str | None) -> int:
        row = _present(await tx.one(
            "INSERT INTO events (ts, mono, kind, agent, incarnation, run_id, task_id, alert_id, payload, drill) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (self._wall(), self._mono(), kind, ids.get("agent"), ids.get("incarnation"), ids.get("run_id"),
             ids.get("task_id"), ids.get("alert_id"), redact_json(payload), self.drill)), "INSERT INTO events")
        return int(row["id"])

    async def event(self, kind: str, payload: dict[str, Any], *, agent: str | None = None,
                    incarnation: str | None = None, run_id: str | None = None, task_id: str | None = None,
                    alert_id: str | None = None) -> int:
        async with self.db.transaction() as tx:
            return await self._event(tx, kind, payload, agent=agent, incarnation=incarnation, run_id=run_id,
                                     task_id=task_id, alert_id=alert_id)

    async def events(self, since: int = 0, limit: int = 200, kind: str | None = None,
                     agent: str | None = None) -> list[Row]:
        sql = "SELECT * FROM events WHERE id > ?"
        args: list[object] = [since]
        if kind:
            sql, args = sql + " AND kind = ?", args + [kind]
        if agent:
            sql, args = sql + " AND agent = ?", args + [agent]
        rows = await self.db.all(sql + " ORDER BY id LIMIT ?", (*args, limit))
        return [_decode(r, "payload") for r in rows]

    async def latest_events(self, kinds: list[str], limit: int = 100) -> list[Row]:
        if not kinds:
            return []
        marks = ", ".join("?" for _ in kinds)
        rows = await self.db.all(f"SELECT * FROM events WHERE kind IN ({marks}) ORDER BY id DESC LIMIT ?",
                                 (*kinds, limit))
        return [_decode(r, "payload") for r in rows]

    # -- agents -----------------------------------------------------------------------------

    async def upsert_agent(self, name: str, role: str, parent: str, port: int, provider: str | None) -> Row:
        """Declare a service from the mesh file; its provider, stop mark and crash-loop
        state outlive a daemon restart."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO agents (name, role, parent, port, provider, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET role=excluded.role, parent=excluded.parent, port=excluded.port, "
                "provider=COALESCE(agents.provider, excluded.provider), updated_at=excluded.updated_at",
                (name, role, parent, port, provider, self._wall()))
            return _present(await tx.one("SELECT * FROM agents WHERE name = ?", (name,)), "upsert_agent")

    async def set_agent(self, name: str, **fields: Any) -> None:
        bad = set(fields) - AGENT_FIELDS
        if bad:
            raise ValueError(f"set_agent: unknown fields {sorted(bad)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        values = tuple(int(v) if isinstance(v, bool) else (str(v) if hasattr(v, "value") else v)
                       for v in fields.values())
        async with self.db.transaction() as tx:
            await tx.execute(f"UPDATE agents SET {cols}, updated_at = ? WHERE name = ?", (*values, self._wall(), name))

    async def agent(self, name: str) -> Row | None:
        return await self.db.one("SELECT * FROM agents WHERE name = ?", (name,))

    async def agents(self) -> list[Row]:
        return await self.db.all("SELECT * FROM agents ORDER BY name")

    # -- sessions: one per incarnation ---------------------------------------------------------

    async def open_session(self, incarnation: str, agent: str, port: int, provider: str | None, *,
                           mode: str = "plain") -> None:
        """The intent, written before the process exists: a daemon killed between fork
        and record leaves a row that names what it may have started."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO sessions (incarnation, agent, port, provider, status, started_at, started_mono, mode) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (incarnation, agent, port, provider, SessionState.INTENT, self._wall(), self._mono(), mode))
            await tx.execute("UPDATE agents SET current_incarnation = ?, updated_at = ? WHERE name = ?",
                             (incarnation, self._wall(), agent))

    async def _session_to(self, tx: Tx, incarnation: str, new: SessionState, sets: dict[str, Any]) -> bool:
        row = await tx.one("SELECT status FROM sessions WHERE incarnation = ?", (incarnation,))
        if row is None or not SESSION.allowed(SessionState(row["status"]), new):
            return False
        cols = "".join(f", {k} = ?" for k in sets)
        n = await tx.execute(f"UPDATE sessions SET status = ?{cols} WHERE incarnation = ? AND status = ?",
                             (new, *sets.values(), incarnation, row["status"]))
        return n == 1

    async def session_started(self, incarnation: str, pid: int, create_time: float, *, mode: str) -> None:
        async with self.db.transaction() as tx:
            await self._session_to(tx, incarnation, SessionState.STARTING,
                                   {"pid": pid, "pid_create_time": create_time, "mode": mode})

    async def session_running(self, incarnation: str) -> None:
        async with self.db.transaction() as tx:
            await self._session_to(tx, incarnation, SessionState.RUNNING, {"healthy_mono": self._mono()})

    async def close_session(self, incarnation: str, *, reason: str, exit_code: int | None = None,
                            exit_signal: int | None = None) -> bool:
        """End a session once (and record it); False if it had already ended."""
        reason = redact(reason)  # an agent's own words may carry a key (a report of a failed call)
        async with self.db.transaction() as tx:
            row = await tx.one("SELECT agent, pid FROM sessions WHERE incarnation = ?", (incarnation,))
            ended = await self._session_to(tx, incarnation, SessionState.ENDED, {
                "ended_at": self._wall(), "end_reason": reason, "exit_code": exit_code, "exit_signal": exit_signal})
            if ended and row is not None:  # it ended, so it was there
                await self._event(tx, "session_ended", {"reason": reason, "exit_code": exit_code,
                                                        "signal": exit_signal, "pid": row["pid"]},
                                  agent=row["agent"], incarnation=incarnation)
            return ended

    async def open_sessions(self) -> list[Row]:
        return await self.db.all("SELECT * FROM sessions WHERE status != ? ORDER BY started_at",
                                 (SessionState.ENDED,))

    async def session(self, incarnation: str) -> Row | None:
        return await self.db.one("SELECT * FROM sessions WHERE incarnation = ?", (incarnation,))

    async def sessions_of(self, agent: str, *, limit: int = 200) -> list[Row]:
        return await self.db.all("SELECT * FROM sessions WHERE agent = ? ORDER BY started_mono DESC, started_at DESC, "
                                 "incarnation DESC LIMIT ?", (agent, limit))

    # -- runs ------------------------------------------------------------------------------------

    async def create_run(self, run_id: str, prompt: str, drill: bool) -> None:
        async with self.db.transaction() as tx:
            await tx.execute("INSERT INTO runs (run_id, prompt, status, drill, created_at) VALUES (?, ?, ?, ?, ?)",
                             (run_id, redact(prompt), RunState.RUNNING, int(drill), self._wall()))
            await self._event(tx, "run_created", {"prompt_chars": len(prompt), "drill": drill}, run_id=run_id)

    async def finish_run(self, run_id: str, status: RunState, result: str | None,
                         failure: dict[str, Any] | None) -> bool:
        """End a run once; the first outcome recorded is the one that stands."""
        async with self.db.transaction() as tx:
            row = await tx.one("SELECT status FROM runs WHERE run_id = ?", (run_id,))
            if row is None or row["status"] != RunState.RUNNING or not RUN.allowed(RunState.RUNNING, status):
                return False
            await tx.execute("UPDATE runs SET status = ?, result = ?, failure = ?, finished_at = ? "
                             "WHERE run_id = ? AND status = ?",
                             (status, redact(result) if result else result,
                              redact_json(failure) if failure else None, self._wall(), run_id, RunState.RUNNING))
            await self._event(tx, f"run_{status}", {"reason": (failure or {}).get("reason"), "failure": failure},
                              run_id=run_id)
            return True

    async def reopen_run(self, run_id: str) -> bool:
        async with self.db.transaction() as tx:
            row = await tx.one("SELECT status FROM runs WHERE run_id = ?", (run_id,))
            if row is None or not RUN.allowed(RunState(row["status"]), RunState.RUNNING):
                return False
            await tx.execute("UPDATE runs SET status = ?, finished_at = NULL WHERE run_id = ?",
                             (RunState.RUNNING, run_id))
            return True

    async def run(self, run_id: str) -> Row | None:
        return _decode(await self.db.one("SELECT * FROM runs WHERE run_id = ?", (run_id,)), "failure")

    async def runs(self, limit: int = 100) -> list[Row]:
        """The latest runs, newest first."""
        return [_decode(r, "failure") for r in
                await self.db.all("SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", (limit,))]

    # -- tasks -------------------------------------------------------------------------------------

    async def upsert_task(self, rec: Row) -> tuple[Row, bool]:
        """Record an assignment. Returns (row, created). An existing task keeps its row:
        a parent that re-dispatches after its own restart finds the result."""
        async with self.db.transaction() as tx:
            n = await tx.execute(
                "INSERT INTO tasks (task_id, run_id, parent_task_id, agent, parent_agent, kind, prompt, status, "
                "attempt, provider, created_at, updated_at, traceparent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?) "
                "ON CONFLICT(task_id) DO NOTHING",
                (rec["task_id"], rec["run_id"], rec.get("parent_task_id"), rec["agent"], rec["parent_agent"],
                 rec["kind"], redact(rec["prompt"]), TaskState.ASSIGNED, rec.get("provider"), self._wall(), self._wall(),
                 rec.get("traceparent")))
            if n == 1:
                await self._event(tx, "task_assigned", {"agent": rec["agent"], "parent": rec["parent_agent"],
                                                        "kind": rec["kind"]},
                                  agent=rec["agent"], run_id=rec["run_id"], task_id=rec["task_id"])
            row = _present(await tx.one("SELECT * FROM tasks WHERE task_id = ?", (rec["task_id"],)), "upsert_task")
        return _decode(row, "failure"), n == 1

    async def task(self, task_id: str) -> Row | None:
        return _decode(await self.db.one("SELECT * FROM tasks WHERE task_id = ?", (task_id,)), "failure")

    async def _task_to(self, tx: Tx, task_id: str, new: TaskState, sets: dict[str, Any], *,
                       event: dict[str, Any] | None = None, attempt: int = 0) -> Row | None:
        """The task machine's one transition: checked, guarded on the old state, recorded.
        Returns the row as it was before, or None when the edge is not legal now."""
        row = await tx.one("SELECT * FROM tasks WHERE task_id = ?", (task_id,))
        if row is None or not TASK.allowed(TaskState(row["status"]), new):
            return None
        cols = "".join(f", {k} = ?" for k in sets)
        n = await tx.execute(f"UPDATE tasks SET status = ?, attempt = attempt + ?, updated_at = ?{cols} "
                             f"WHERE task_id = ? AND status = ?",
                             (new, attempt, self._wall(), *sets.values(), task_id, row["status"]))
        if n != 1:
            return None
        # "task_assigned" is the creation event (the report counts them: one per task).
        kind = "task_requeued" if new == TaskState.ASSIGNED else f"task_{new}"
        await self._event(tx, kind, {"from": row["status"], **(event or {})}, agent=row["agent"],
                          task_id=task_id, run_id=row["run_id"])
        log.info("task %s: %s -> %s", task_id, row["status"], new,
                 extra={"task": task_id, "from": row["status"], "to": str(new)})
        return row

    async def task_progress(self, task_id: str, incarnation: str, progress: str | None) -> None:
        """From a beat: the task runs on this incarnation, at this marker."""
        sets: dict[str, Any] = {"lease_incarnation": incarnation}
        if progress is not None:
            sets["progress"] = progress
        async with self.db.transaction() as tx:
            row = await tx.one("SELECT status FROM tasks WHERE task_id = ?", (task_id,))
            if row and row["status"] == TaskState.ASSIGNED:
                await self._task_to(tx, task_id, TaskState.RUNNING, sets)
            elif row and row["status"] == TaskState.RUNNING:  # a marker moved: not a transition
                cols = ", ".join(f"{k} = ?" for k in sets)
                await tx.execute(f"UPDATE tasks SET {cols}, updated_at = ? WHERE task_id = ? AND status = ?",
                                 (*sets.values(), self._wall(), task_id, TaskState.RUNNING))

    async def finish_task(self, task_id: str, status: TaskState, result: str | None, failure: dict[str, Any] | None,
                          *, reason: str | None = None) -> bool:
        async with self.db.transaction() as tx:
            before = await self._task_to(tx, task_id, status, {
                "result": redact(result) if result else result,
                "failure": redact_json(failure) if failure else None, "lease_incarnation": None, "held_since": None},
                event={"reason": reason})
            return before is not None and before["status"] in LIVE_TASK_STATES

    async def open_tasks(self, agent: str) -> list[Row]:
        return await self.db.all(f"SELECT * FROM tasks WHERE agent = ? AND status IN {sql_in(OPEN_TASK_STATES)} "
                                 f"AND {_NOT_PEOPLE_PARK} ORDER BY created_at", (agent,))

    async def live_tasks(self, agent: str) -> list[Row]:
        return await self.db.all(f"SELECT * FROM tasks WHERE agent = ? AND status IN {sql_in(LIVE_TASK_STATES)} "
                                 "ORDER BY created_at", (agent,))

    async def requeue_tasks(self, agent: str, *, provider: str | None = None, to_agent: str | None = None) -> list[Row]:
        """A new incarnation takes over: each open task is one attempt further on (``to_agent``:
        on a sibling replica, this one being removed; its tasks waiting for a decision go
        there too, as they are: parked for the same person, who the sibling takes them up
        for when they are approved or their budget raised, or held for the top's decision,
        which is then made for the sibling)."""
        async with self.db.transaction() as tx:
            if to_agent:
                for row in await tx.all(f"SELECT task_id, run_id, status, parked_reason FROM tasks WHERE agent = ? AND "
                                        f"{_WAITS_FOR_A_DECISION}", (agent,)):
                    await tx.execute("UPDATE tasks SET agent = ?, lease_incarnation = NULL, updated_at = ? "
                                     "WHERE task_id = ?", (to_agent, self._wall(), row["task_id"]))
                    await self._event(tx, "task_moved", {"from_agent": agent, "status": row["status"],
                                                         "parked_reason": row["parked_reason"]},
                                      agent=to_agent, task_id=row["task_id"], run_id=row["run_id"])
            for row in await tx.all(f"SELECT task_id FROM tasks WHERE agent = ? AND status IN "
                                    f"{sql_in(OPEN_TASK_STATES)} AND {_NOT_PEOPLE_PARK}", (agent,)):
                sets: dict[str, Any] = {"lease_incarnation": None}
                if provider:
                    sets["provider"] = provider
                if to_agent:
                    sets["agent"] = to_agent
                await self._task_to(tx, row["task_id"], TaskState.ASSIGNED, sets, attempt=1,
                                    event={"provider": provider, **({"from_agent": agent} if to_agent else {})})
        return await self.open_tasks(to_agent or agent)

    async def hold_task(self, task_id: str, reason: str) -> bool:
        """The task's failure climbs the tree: no incarnation gets it until the top decides."""
        async with self.db.transaction() as tx:
            return await self._task_to(tx, task_id, TaskState.ESCALATED,
                                       {"lease_incarnation": None, "held_since": self._mono()},
                                       event={"reason": reason}) is not None

    async def release_task(self, task_id: str, provider: str | None) -> bool:
        """The top switched provider: the held task is assigned again (the restart that
        carries it to the next incarnation counts the attempt)."""
        async with self.db.transaction() as tx:
            sets: dict[str, Any] = {"held_since": None}
            if provider:
                sets["provider"] = provider
            return await self._task_to(tx, task_id, TaskState.ASSIGNED, sets,
                                       event={"provider": provider}) is not None

    async def park_task(self, task_id: str, reason: str, kind: str = "providers",
                        lease: str | None = None) -> bool:
        """The task waits (every provider down, its budget spent, or for an operator), at its
        checkpoint: no attempt is spent meanwhile. ``kind`` says what it waits for; ``lease``,
        the incarnation that waits with it (None: held by the top, nobody waits with it)."""
        async with self.db.transaction() as tx:
            return await self._task_to(tx, task_id, TaskState.PARKED,
                                       {"held_since": self._mono(), "parked_reason": kind, "lease_incarnation": lease},
                                       event={"reason": reason, "kind": kind}) is not None

    async def unpark_task(self, task_id: str, provider: str | None = None) -> bool:
        """A parked task goes on where it was, on ``provider`` when one is named."""
        async with self.db.transaction() as tx:
            sets: dict[str, Any] = {"held_since": None, "parked_reason": None}
            if provider:
                sets["provider"] = provider
            return await self._task_to(tx, task_id, TaskState.RUNNING, sets,
                                       event={"provider": provider}) is not None

    async def set_task_provider(self, task_id: str, provider: str) -> None:
        """The provider the task now runs on (a switch made in its incarnation)."""
        async with self.db.transaction() as tx:
            await tx.execute("UPDATE tasks SET provider = ?, updated_at = ? WHERE task_id = ?",
                             (provider, self._wall(), task_id))

    async def set_run_budget(self, run_id: str, usd: float | None, tokens: int | None) -> bool:
        """A run's own budget (`tron run --budget-usd`, or an operator raising it)."""
        async with self.db.transaction() as tx:
            n = await tx.execute("UPDATE runs SET budget_usd = ?, budget_tokens = ? WHERE run_id = ?",
                                 (usd, tokens, run_id))
            if n:
                await self._event(tx, "run_budget", {"usd": usd, "tokens": tokens}, run_id=run_id)
            return bool(n)

    async def record_usage(self, row: Row) -> Row:
        """One LLM call's tokens and cost."""
        cols = ["ts", "mono", "drill", *row]
        async with self.db.transaction() as tx:
            return _present(await tx.one(f"INSERT INTO llm_usage ({', '.join(cols)}) VALUES "
                                         f"({', '.join('?' * len(cols))}) RETURNING *",
                                         (self._wall(), self._mono(), self.drill, *row.values())), "record_usage")

    async def usage(self, *, run_id: str | None = None, task_id: str | None = None, agent: str | None = None,
                    since_mono: float | None = None, limit: int = 1000) -> list[Row]:
        """The LLM calls that match, newest first (at most ``limit``)."""
        where, args = self._usage_where(run_id, task_id, agent, since_mono)
        return await self.db.all(f"SELECT * FROM llm_usage{where} ORDER BY id DESC LIMIT ?", (*args, limit))

    @staticmethod
    def _usage_where(run_id: str | None, task_id: str | None, agent: str | None,
                     since_mono: float | None) -> tuple[str, list[object]]:
        where: list[str] = []
        args: list[object] = []
        for column, value, op in (("run_id", run_id, "="), ("task_id", task_id, "="), ("agent", agent, "="),
                                  ("mono", since_mono, ">")):
            if value is not None:
                where.append(f"{column} {op} ?")
                args.append(value)
        return (" WHERE " + " AND ".join(where)) if where else "", args

    async def spend(self, *, run_id: str | None = None, task_id: str | None = None, agent: str | None = None,
                    since_mono: float | None = None) -> Spend:
        """What has been spent (USD, tokens, calls) by a run, a task, or a service since a time."""
        where, args = self._usage_where(run_id, task_id, agent, since_mono)
        row = _present(await self.db.one(
            "SELECT COALESCE(SUM(cost_usd), 0) AS usd, COUNT(*) AS calls, COALESCE(SUM(input_tokens + output_tokens "
            f"+ cache_read_tokens + cache_write_tokens), 0) AS tokens FROM llm_usage{where}", tuple(args)), "spend")
        return {"usd": round(float(row["usd"]), 10), "calls": int(row["calls"]), "tokens": int(row["tokens"])}

    async def reopen_task(self, task_id: str, *, by: str) -> bool:
        """An operator retries a failed or cancelled task: assigned again, one attempt further on."""
        async with self.db.transaction() as tx:
            return await self._task_to(tx, task_id, TaskState.ASSIGNED, {
                "result": None, "failure": None, "delivered": 0, "lease_incarnation": None},
                attempt=1, event={"reopened_by": by}) is not None

    async def tasks_of_run(self, run_id: str) -> list[Row]:
        return [_decode(r, "failure") for r in
                await self.db.all("SELECT * FROM tasks WHERE run_id = ? ORDER BY created_at", (run_id,))]

    async def parked_tasks(self) -> list[Row]:
        """Tasks waiting for a provider, their budget or an operator, oldest first."""
        return await self.db.all("SELECT * FROM tasks WHERE status = ? ORDER BY held_since", (TaskState.PARKED,))

    async def held_tasks(self) -> list[Row]:
        return await self.db.all("SELECT * FROM tasks WHERE status = ? ORDER BY held_since", (TaskState.ESCALATED,))

    async def mark_delivered(self, task_id: str) -> None:
        async with self.db.transaction() as tx:
            await tx.execute("UPDATE tasks SET delivered = 1 WHERE task_id = ?", (task_id,))

    async def undelivered_results(self) -> list[Row]:
        """Finished tasks whose parent is still waiting (its own task is live)."""
        rows = await self.db.all(
            f"SELECT t.* FROM tasks t WHERE t.status IN ('done','failed') AND t.delivered = 0 AND ("
            f"t.parent_task_id IS NULL OR EXISTS (SELECT 1 FROM tasks p WHERE p.task_id = t.parent_task_id "
            f"AND p.status IN {sql_in(LIVE_TASK_STATES)}))")
        return [_decode(r, "failure") for r in rows]

    # -- checkpoints --------------------------------------------------------------------------------

    async def add_checkpoint(self, task_id: str, step: int, step_id: str, output: str,
                             incarnation: str | None) -> tuple[Row, bool]:
        """One row per completed step, its output redacted and hashed as stored (so a
        replay can verify exactly what it reads); the same step recorded twice keeps the
        first."""
        output = redact(output)
        if len(output.encode()) > CHECKPOINT_MAX:
            raise ValueError(f"checkpoint output is {len(output.encode())} bytes; the limit is {CHECKPOINT_MAX}")
        async with self.db.transaction() as tx:
            n = await tx.execute(
                "INSERT INTO checkpoints (task_id, step, step_id, hash, output, incarnation, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(task_id, step) DO NOTHING",
                (task_id, step, step_id, content_hash(output), output, incarnation, self._wall()))
            if n == 1:
                await self._event(tx, "checkpoint", {"step": step, "step_id": step_id, "hash": content_hash(output)},
                                  task_id=task_id, incarnation=incarnation)
            row = _present(await tx.one("SELECT * FROM checkpoints WHERE task_id = ? AND step = ?", (task_id, step)),
                           "add_checkpoint")
        return row, n == 1

    async def checkpoints(self, task_id: str) -> list[Row]:
        return await self.db.all("SELECT * FROM checkpoints WHERE task_id = ? ORDER BY step", (task_id,))

    async def drop_checkpoints(self, task_id: str, from_step: int, *, by: str) -> list[Row]:
        """Set aside the steps from ``from_step`` on (an operator resumes before them): the
        rows go, their record stays in an event."""
        async with self.db.transaction() as tx:
            rows = await tx.all("SELECT step, step_id, hash FROM checkpoints WHERE task_id = ? AND step >= ? "
                                "ORDER BY step", (task_id, from_step))
            if rows:
                await tx.execute("DELETE FROM checkpoints WHERE task_id = ? AND step >= ?", (task_id, from_step))
                await self._event(tx, "checkpoints_set_aside", {"from_step": from_step, "steps": rows, "by": by},
                                  task_id=task_id)
            return rows

    # -- lanes --------------------------------------------------------------------------------------

    async def record_trip(self, fingerprint: str, lane: str, description: str, *, task_id: str | None,
                          run_id: str | None) -> list[float]:
        """One more task whose ladder ended this way; the times of every trip of it."""
        async with self.db.transaction() as tx:
            await tx.execute("INSERT INTO lane_trips (fingerprint, lane, description, task_id, run_id, mono, "
                             "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (fingerprint, lane, description, task_id, run_id, self._mono(), self._wall()))
            await self._event(tx, "lane_trip", {"fingerprint": fingerprint, "lane": lane,
                                                "description": description}, task_id=task_id, run_id=run_id)
            rows = await tx.all("SELECT mono FROM lane_trips WHERE fingerprint = ? ORDER BY mono", (fingerprint,))
        return [r["mono"] for r in rows]

    async def lane(self, lane: str) -> Row | None:
        return await self.db.one("SELECT * FROM lanes WHERE lane = ?", (lane,))

    async def lanes(self) -> list[Row]:
        return await self.db.all("SELECT * FROM lanes ORDER BY lane")

    async def set_lane(self, lane: str, state: LaneState, *, fingerprint: str | None, reason: str,
                       by: str) -> bool:
        """The lane machine's one transition (a lane never seen is open)."""
        reason = redact(reason)
        async with self.db.transaction() as tx:
            row = await tx.one("SELECT state FROM lanes WHERE lane = ?", (lane,))
            old = LaneState(row["state"]) if row else LaneState.OPEN
            if not LANE.allowed(old, state):
                return False
            await tx.execute(
                "INSERT INTO lanes (lane, state, fingerprint, reason, changed_by, changed_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(lane) DO UPDATE SET state = excluded.state, fingerprint = excluded.fingerprint, "
                "reason = excluded.reason, changed_by = excluded.changed_by, changed_at = excluded.changed_at",
                (lane, state, fingerprint, reason, by, self._wall()))
            await self._event(tx, f"lane_{state}", {"lane": lane, "from": old, "fingerprint": fingerprint,
                                                    "reason": reason, "by": by}, agent=None)
            return True

    # -- alerts -------------------------------------------------------------------------------------

    async def insert_alert(self, alert: Row, *, stable: bool) -> tuple[Row, bool]:
        """Persist an alert before it is delivered. One alert per incarnation: a second one
        for the same incarnation returns the first."""
        async with self.db.transaction() as tx:
            n = await tx.execute(
                "INSERT INTO alerts (alert_id, agent, incarnation, reason, detail, task_id, run_id, status, "
                "created_at, drill, mono, stable) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (alert["alert_id"], alert["service"], alert["incarnation"], alert["reason"],
                 redact_json(alert.get("detail", {})), alert.get("task_id"), alert.get("run_id"), AlertState.PENDING,
                 self._wall(), self.drill, self._mono(), int(stable)))
            if n == 1:
                await self._event(tx, "alert_raised", {"reason": alert["reason"], "detail": alert.get("detail", {}),
                                                       "stable": stable},
                                  agent=alert["service"], incarnation=alert["incarnation"],
                                  task_id=alert.get("task_id"), run_id=alert.get("run_id"),
                                  alert_id=alert["alert_id"])
            row = _present(await tx.one("SELECT * FROM alerts WHERE agent = ? AND incarnation = ?",
                                        (alert["service"], alert["incarnation"])), "insert_alert")
        return _decode(row, "detail"), n == 1

    async def alert_for(self, agent: str, incarnation: str) -> Row | None:
        """The one alert an incarnation can have (unique index), if it has raised it."""
        return _decode(await self.db.one("SELECT * FROM alerts WHERE agent = ? AND incarnation = ?",
                                         (agent, incarnation)), "detail")

    async def alert(self, alert_id: str) -> Row | None:
        return _decode(await self.db.one("SELECT * FROM alerts WHERE alert_id = ?", (alert_id,)), "detail")

    async def mark_alert(self, alert_id: str, status: AlertState, *, decision: str | None = None) -> bool:
        """The alert machine's one transition; False when the edge is not legal now."""
        async with self.db.transaction() as tx:
            row = await tx.one("SELECT status FROM alerts WHERE alert_id = ?", (alert_id,))
            if row is None or not ALERT.allowed(AlertState(row["status"]), status):
                return False
            await tx.execute(
                "UPDATE alerts SET status = ?, decision = COALESCE(?, decision), "
                "handled_at = CASE WHEN ? IN ('handled','undeliverable') THEN ? ELSE handled_at END "
                "WHERE alert_id = ? AND status = ?",
                (status, decision, status, self._wall(), alert_id, row["status"]))
            if status == AlertState.UNDELIVERABLE:
                await self._event(tx, "alert_undeliverable", {"decision": decision}, alert_id=alert_id)
            return True

    async def alert_delivered(self, alert_id: str, to: str) -> None:
        """An ancestor took the alert (and acted: it may be handled already)."""
        async with self.db.transaction() as tx:
            await tx.execute("UPDATE alerts SET delivered_to = ?, deliveries = deliveries + 1, "
                             "status = CASE WHEN status = 'pending' THEN 'delivered' ELSE status END "
                             "WHERE alert_id = ?", (to, alert_id))

    async def open_alerts(self) -> list[Row]:
        return [_decode(r, "detail") for r in
                await self.db.all("SELECT * FROM alerts WHERE status != ? ORDER BY mono", (AlertState.HANDLED,))]

    async def failures(self, agent: str, *, limit: int = 200) -> list[Row]:
        """The service's latest failures, newest first: when (alert time) and whether that
        incarnation had been stable. ``limit`` bounds the read; the ladder never needs more
        (its window count stops mattering at max_restarts, its backoff at the cap)."""
        return await self.db.all("SELECT alert_id, mono, stable FROM alerts WHERE agent = ? "
                                 "ORDER BY mono DESC, alert_id DESC LIMIT ?", (agent, limit))

    # -- the ladder's record ------------------------------------------------------------------------

    async def record_retry(self, *, alert_id: str, agent_id: str, retry_type: RetryType, reason: str,
                           detail: dict[str, Any],
                           case: str, task_id: str | None = None, run_id: str | None = None,
                           from_provider: str | None = None, to_provider: str | None = None,
                           decided_by: str = "policy", requested_by: str | None = None,
                           hop: str = "") -> Row | None:
        """One row per (alert, retry_type, agent, hop). Returns the new row, or None when
        the same step was already recorded (the caller must then do nothing)."""
        if not reason or reason == "Unknown error":
            raise ValueError("a retry needs a real reason")
        reason = redact(reason)  # free text an agent sent (its failure report): no key is stored, here or in the metrics
        async with self.db.transaction() as tx:
            count = _present(await tx.one("SELECT COUNT(*) AS n FROM retry_history WHERE agent_id = ? "
                                          "AND retry_type = ?", (agent_id, retry_type)), "record_retry's count")
            row = await tx.one(
                "INSERT INTO retry_history (alert_id, agent_id, task_id, run_id, retry_type, retry_count, reason, "
                "detail, from_provider, to_provider, decided_by, requested_by, hop, timestamp, mono, drill, case_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING *",
                (alert_id, agent_id, task_id, run_id, retry_type, count["n"] + 1, reason, redact_json(detail),
                 from_provider, to_provider, decided_by, requested_by, hop, self._wall(), self._mono(), self.drill,
                 case))
            if row is None:
                return None
            row = _decode(row, "detail")
            metric = METRIC.get(RetryType(retry_type))
            if metric and not self.drill:
                for scope, key in (("agent", agent_id), ("provider", from_provider), ("task", task_id),
                                   ("run", run_id)):
                    if key:
                        await self._bump(tx, scope, key, metric, reason,
                                         count_failure=retry_type != RetryType.ESCALATION)
            await self._event(tx, str(retry_type), {
                "reason": reason, "case": case, "detail": detail, "from_provider": from_provider,
                "to_provider": to_provider, "decided_by": decided_by, "requested_by": requested_by, "hop": hop},
                agent=agent_id, task_id=task_id, run_id=run_id, alert_id=alert_id)
            return row

    async def _bump(self, tx: Tx, scope: str, key: str, metric: str, reason: str, *, count_failure: bool) -> None:
        await tx.execute(
            f"INSERT INTO failure_metrics (scope, key, failures, {metric}, last_reason, updated_at) "
            f"VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT(scope, key) DO UPDATE SET "
            f"failures = failure_metrics.failures + excluded.failures, {metric} = failure_metrics.{metric} + 1, "
            f"last_reason = excluded.last_reason, updated_at = excluded.updated_at",
            (scope, key, int(count_failure), reason, self._wall()))

    async def retry_rows(self, alert_id: str) -> list[Row]:
        """Every ladder row written for one alert (what has already been decided on it)."""
        return [_decode(r, "detail") for r in
                await self.db.all("SELECT * FROM retry_history WHERE alert_id = ? ORDER BY id", (alert_id,))]

    async def task_counts(self, task_id: str) -> TaskCounts:
        """How far up the ladder a task has gone: its restarts and provider switches."""
        rows = await self.db.all("SELECT retry_type, COUNT(*) AS n FROM retry_history WHERE task_id = ? "
                                 "GROUP BY retry_type", (task_id,))
        counts = {r["retry_type"]: r["n"] for r in rows}
        return {"restarts": counts.get(RetryType.CHILD_RESTART, 0) + counts.get(RetryType.PROVIDER_RETRY, 0),
                "switches": counts.get(RetryType.LLM_CHANGE, 0),
                "escalations": counts.get(RetryType.ESCALATION, 0),
                "failed": counts.get(RetryType.PERMANENT_FAILURE, 0) > 0}

    async def task_history(self, task_id: str) -> list[Row]:
        """Every ladder row of one task, oldest first."""
        return [_decode(r, "detail") for r in
                await self.db.all("SELECT * FROM retry_history WHERE task_id = ? ORDER BY id", (task_id,))]

    async def history(self, limit: int = 200, agent: str | None = None) -> list[Row]:
        if agent:
            rows = await self.db.all("SELECT * FROM retry_history WHERE agent_id = ? ORDER BY id DESC LIMIT ?",
                                     (agent, limit))
        else:
            rows = await self.db.all("SELECT * FROM retry_history ORDER BY id DESC LIMIT ?", (limit,))
        return [_decode(r, "detail") for r in rows]


    async def failure_metrics(self) -> list[Row]:
        return await self.db.all("SELECT * FROM failure_metrics ORDER BY scope, key")

def open_pg_store(url: str, *, clock: Clock | None = None) -> SqlStore:
    """The registry on a PostgreSQL server (several machines): migrated and checked (fail
    closed) before the first write; the daemon's advisory lock is taken at ``open``."""
    from tron.registry.pg import PgDb
    from tron.registry.schema import open_and_prepare_pg

    open_and_prepare_pg(url)
    return SqlStore(PgDb(url), clock=clock)


def open_sqlite_store(path: Path, *, clock: Clock | None = None) -> SqlStore:
    """The embedded default: the SQLite file, checked (fail closed) before the first write."""
    from tron.registry.db import SqliteDb
    from tron.registry.schema import open_and_prepare

    open_and_prepare(path)
    return SqlStore(SqliteDb(path), clock=clock)
