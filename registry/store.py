"""The registry writer. Only the daemon holds one; agents talk to the daemon over HTTP.

Every method is one transaction. Idempotency lives in the schema (unique indexes on
alerts and retry_history), so a duplicate request finds its twin instead of writing a
second row.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiosqlite

from common.redaction import redact, redact_json
from registry.schema import open_and_prepare


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _row(row: aiosqlite.Row | None) -> dict | None:
    return None if row is None else dict(row)


class Registry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        # The name of the drill in progress: every event, alert and retry row written
        # meanwhile carries it, and failure_metrics (production figures) skip it.
        self.drill: str | None = None

    async def open(self) -> "Registry":
        open_and_prepare(self.path)  # fail closed before the first write
        self._db = await aiosqlite.connect(self.path)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.execute("PRAGMA busy_timeout=5000")
        return self

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("Registry.open() must be awaited before use")
        return self._db

    async def _one(self, sql: str, args: tuple = ()) -> dict | None:
        async with self.db.execute(sql, args) as cur:
            return _row(await cur.fetchone())

    async def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        async with self.db.execute(sql, args) as cur:
            return [dict(r) for r in await cur.fetchall()]

    # -- events -------------------------------------------------------------------------

    async def event(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        agent: str | None = None,
        incarnation: str | None = None,
        run_id: str | None = None,
        task_id: str | None = None,
        alert_id: str | None = None,
        commit: bool = True,
    ) -> int:
        cur = await self.db.execute(
            "INSERT INTO events (ts, mono, kind, agent, incarnation, run_id, task_id, alert_id, payload, drill) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (utcnow(), time.monotonic(), kind, agent, incarnation, run_id, task_id, alert_id, redact_json(payload),
             self.drill),
        )
        if commit:
            await self.db.commit()
        return cur.lastrowid

    async def events(self, since: int = 0, limit: int = 200, kind: str | None = None) -> list[dict]:
        sql = "SELECT * FROM events WHERE id > ?"
        args: list = [since]
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        rows = await self._all(sql, tuple(args))
        for r in rows:
            r["payload"] = json.loads(r["payload"])
        return rows

    # -- agents and sessions --------------------------------------------------------------

    async def upsert_agent(self, name: str, role: str, parent: str, port: int, provider: str | None) -> None:
        await self.db.execute(
            "INSERT INTO agents (name, role, parent, port, provider, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET role=excluded.role, parent=excluded.parent, port=excluded.port, "
            "provider=COALESCE(agents.provider, excluded.provider), updated_at=excluded.updated_at",
            (name, role, parent, port, provider, utcnow()),
        )
        await self.db.commit()

    async def set_agent(self, name: str, **fields: Any) -> None:
        allowed = {"state", "current_incarnation", "provider"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"set_agent: unknown fields {sorted(bad)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        await self.db.execute(
            f"UPDATE agents SET {cols}, updated_at = ? WHERE name = ?", (*fields.values(), utcnow(), name)
        )
        await self.db.commit()

    async def agent(self, name: str) -> dict | None:
        return await self._one("SELECT * FROM agents WHERE name = ?", (name,))

    async def open_session(
        self, incarnation: str, agent: str, pid: int, create_time: float, port: int, provider: str | None
    ) -> None:
        await self.db.execute(
            "INSERT INTO sessions (incarnation, agent, pid, pid_create_time, port, provider, status, started_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 'starting', ?)",
            (incarnation, agent, pid, create_time, port, provider, utcnow()),
        )
        await self.db.execute(
            "UPDATE agents SET current_incarnation = ?, state = 'starting', updated_at = ? WHERE name = ?",
            (incarnation, utcnow(), agent),
        )
        await self.db.commit()

    async def session_running(self, incarnation: str) -> None:
        await self.db.execute("UPDATE sessions SET status = 'running' WHERE incarnation = ? AND status = 'starting'",
                              (incarnation,))
        await self.db.commit()

    async def close_session(
        self, incarnation: str, *, reason: str, exit_code: int | None = None, exit_signal: int | None = None
    ) -> bool:
        """End a session once; returns False if it was already ended."""
        cur = await self.db.execute(
            "UPDATE sessions SET status = 'ended', ended_at = ?, end_reason = ?, exit_code = ?, exit_signal = ? "
            "WHERE incarnation = ? AND status != 'ended'",
            (utcnow(), reason, exit_code, exit_signal, incarnation),
        )
        await self.db.commit()
        return cur.rowcount == 1

    async def open_sessions(self) -> list[dict]:
        return await self._all("SELECT * FROM sessions WHERE status != 'ended' ORDER BY started_at")

    async def session(self, incarnation: str) -> dict | None:
        return await self._one("SELECT * FROM sessions WHERE incarnation = ?", (incarnation,))

    # -- runs and tasks --------------------------------------------------------------------

    async def create_run(self, run_id: str, prompt: str, drill: bool) -> None:
        await self.db.execute(
            "INSERT INTO runs (run_id, prompt, status, drill, created_at) VALUES (?, ?, 'running', ?, ?)",
            (run_id, redact(prompt), int(drill), utcnow()),
        )
        await self.event("run_created", {"prompt_chars": len(prompt), "drill": drill}, run_id=run_id, commit=False)
        await self.db.commit()

    async def finish_run(self, run_id: str, status: str, result: str | None, failure: dict | None) -> bool:
        cur = await self.db.execute(
            "UPDATE runs SET status = ?, result = ?, failure = ?, finished_at = ? WHERE run_id = ? AND status = 'running'",
            (status, result, redact_json(failure) if failure else None, utcnow(), run_id),
        )
        await self.db.commit()
        return cur.rowcount == 1

    async def run(self, run_id: str) -> dict | None:
        row = await self._one("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if row and row["failure"]:
            row["failure"] = json.loads(row["failure"])
        return row

    async def upsert_task(self, rec: dict) -> tuple[dict, bool]:
        """Record an assignment. Returns (row, created). An existing task keeps its
        row: a parent that re-dispatches after its own restart finds the result."""
        existing = await self.task(rec["task_id"])
        if existing:
            return existing, False
        now = utcnow()
        await self.db.execute(
            "INSERT INTO tasks (task_id, run_id, parent_task_id, agent, parent_agent, kind, prompt, status, "
            "attempt, provider, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'assigned', 1, ?, ?, ?)",
            (rec["task_id"], rec["run_id"], rec.get("parent_task_id"), rec["agent"], rec["parent_agent"],
             rec["kind"], redact(rec["prompt"]), rec.get("provider"), now, now),
        )
        await self.event("task_assigned", {"agent": rec["agent"], "parent": rec["parent_agent"], "kind": rec["kind"]},
                         agent=rec["agent"], run_id=rec["run_id"], task_id=rec["task_id"], commit=False)
        await self.db.commit()
        return await self.task(rec["task_id"]), True

    async def task(self, task_id: str) -> dict | None:
        row = await self._one("SELECT * FROM tasks WHERE task_id = ?", (task_id,))
        if row and row["failure"]:
            row["failure"] = json.loads(row["failure"])
        return row

    async def task_progress(self, task_id: str, incarnation: str, progress: str | None) -> None:
        """From a beat: the task is running on this incarnation, at this marker."""
        await self.db.execute(
            "UPDATE tasks SET status = 'running', progress = COALESCE(?, progress), lease_incarnation = ?, "
            "updated_at = ? WHERE task_id = ? AND status IN ('assigned','running')",
            (progress, incarnation, utcnow(), task_id),
        )
        await self.db.commit()

    async def finish_task(self, task_id: str, status: str, result: str | None, failure: dict | None) -> bool:
        cur = await self.db.execute(
            "UPDATE tasks SET status = ?, result = ?, failure = ?, lease_incarnation = NULL, updated_at = ? "
            "WHERE task_id = ? AND status IN ('assigned','running')",
            (status, result, redact_json(failure) if failure else None, utcnow(), task_id),
        )
        await self.db.commit()
        return cur.rowcount == 1

    async def mark_delivered(self, task_id: str) -> None:
        await self.db.execute("UPDATE tasks SET delivered = 1 WHERE task_id = ?", (task_id,))
        await self.db.commit()

    async def undelivered_results(self) -> list[dict]:
        """Finished tasks whose parent is still waiting (its own task is open)."""
        rows = await self._all(
            "SELECT t.* FROM tasks t WHERE t.status IN ('done','failed') AND t.delivered = 0 AND ("
            "t.parent_task_id IS NULL OR EXISTS (SELECT 1 FROM tasks p WHERE p.task_id = t.parent_task_id "
            "AND p.status IN ('assigned','running')))")
        for r in rows:
            if r["failure"]:
                r["failure"] = json.loads(r["failure"])
        return rows

    async def open_tasks(self, agent: str) -> list[dict]:
        return await self._all(
            "SELECT * FROM tasks WHERE agent = ? AND status IN ('assigned','running') ORDER BY created_at", (agent,)
        )

    async def requeue_tasks(self, agent: str, *, provider: str | None = None) -> list[dict]:
        """A new incarnation takes over: each open task is one attempt further on."""
        await self.db.execute(
            "UPDATE tasks SET attempt = attempt + 1, lease_incarnation = NULL, status = 'assigned', "
            "provider = COALESCE(?, provider), updated_at = ? WHERE agent = ? AND status IN ('assigned','running')",
            (provider, utcnow(), agent),
        )
        await self.db.commit()
        return await self.open_tasks(agent)

    # -- alerts ---------------------------------------------------------------------------

    async def insert_alert(self, alert: dict) -> tuple[dict, bool]:
        """Persist an alert before delivery. One alert per incarnation: a second one for
        the same incarnation returns the first."""
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO alerts (alert_id, agent, incarnation, reason, detail, task_id, run_id, status, "
            "created_at, drill) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            (alert["alert_id"], alert["service"], alert["incarnation"], alert["reason"],
             redact_json(alert.get("detail", {})), alert.get("task_id"), alert.get("run_id"), utcnow(), self.drill),
        )
        created = cur.rowcount == 1
        if created:
            await self.event("alert_raised", {"reason": alert["reason"], "detail": alert.get("detail", {})},
                             agent=alert["service"], incarnation=alert["incarnation"], task_id=alert.get("task_id"),
                             run_id=alert.get("run_id"), alert_id=alert["alert_id"], commit=False)
        await self.db.commit()
        return await self.alert_for(alert["service"], alert["incarnation"]), created

    async def alert_for(self, agent: str, incarnation: str) -> dict | None:
        """The one alert an incarnation can have (unique index), if it has raised it."""
        return await self._one("SELECT * FROM alerts WHERE agent = ? AND incarnation = ?", (agent, incarnation))

    async def mark_alert(self, alert_id: str, status: str, *, delivered_to: str | None = None,
                         decision: str | None = None) -> None:
        await self.db.execute(
            "UPDATE alerts SET status = ?, delivered_to = COALESCE(?, delivered_to), decision = COALESCE(?, decision), "
            "deliveries = deliveries + (CASE WHEN ? = 'delivered' THEN 1 ELSE 0 END), "
            "handled_at = CASE WHEN ? IN ('handled','undeliverable') THEN ? ELSE handled_at END WHERE alert_id = ?",
            (status, delivered_to, decision, status, status, utcnow(), alert_id),
        )
        await self.db.commit()

    async def alert(self, alert_id: str) -> dict | None:
        return await self._one("SELECT * FROM alerts WHERE alert_id = ?", (alert_id,))

    async def pending_alerts(self) -> list[dict]:
        return await self._all("SELECT * FROM alerts WHERE status IN ('pending','delivered') ORDER BY created_at")

    # -- the ladder's record --------------------------------------------------------------

    async def record_retry(
        self,
        *,
        alert_id: str,
        agent_id: str,
        retry_type: str,
        reason: str,
        detail: dict,
        task_id: str | None = None,
        run_id: str | None = None,
        from_provider: str | None = None,
        to_provider: str | None = None,
        decided_by: str = "policy",
        requested_by: str | None = None,
        hop: str = "",
    ) -> dict | None:
        """One row per (alert, retry_type, agent). Returns the new row, or None when the
        same alert was already recorded (the caller must then do nothing)."""
        if not reason or reason == "Unknown error":
            raise ValueError("a retry needs a real reason")
        mono = time.monotonic()
        count = await self._one(
            "SELECT COUNT(*) AS n FROM retry_history WHERE agent_id = ? AND retry_type = ?", (agent_id, retry_type)
        )
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO retry_history (alert_id, agent_id, task_id, run_id, retry_type, retry_count, "
            "reason, detail, from_provider, to_provider, decided_by, requested_by, hop, timestamp, mono, drill) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (alert_id, agent_id, task_id, run_id, retry_type, count["n"] + 1, reason, redact_json(detail),
             from_provider, to_provider, decided_by, requested_by, hop, utcnow(), mono, self.drill),
        )
        if cur.rowcount != 1:
            await self.db.commit()
            return None
        rowid = cur.lastrowid
        metric = {"child_restart": "restarts", "escalation": "escalations", "llm_change": "provider_switches",
                  "permanent_failure": "permanent_failures"}[retry_type]
        for scope, key in (("agent", agent_id), ("provider", from_provider), ("task", task_id), ("run", run_id)):
            if key and not self.drill:
                await self._bump(scope, key, metric, reason, count_failure=retry_type != "escalation")
        await self.event(retry_type, {"reason": reason, "detail": detail, "from_provider": from_provider,
                                      "to_provider": to_provider, "decided_by": decided_by,
                                      "requested_by": requested_by},
                         agent=agent_id, task_id=task_id, run_id=run_id, alert_id=alert_id, commit=False)
        await self.db.commit()
        return await self._one("SELECT * FROM retry_history WHERE id = ?", (rowid,))

    async def _bump(self, scope: str, key: str, metric: str, reason: str, *, count_failure: bool) -> None:
        await self.db.execute(
            f"INSERT INTO failure_metrics (scope, key, failures, {metric}, last_reason, updated_at) "
            f"VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT(scope, key) DO UPDATE SET "
            f"failures = failures + excluded.failures, {metric} = {metric} + 1, "
            f"last_reason = excluded.last_reason, updated_at = excluded.updated_at",
            (scope, key, int(count_failure), reason, utcnow()),
        )

    async def retry_recorded(self, alert_id: str, retry_type: str, agent: str) -> dict | None:
        return await self._one("SELECT * FROM retry_history WHERE alert_id = ? AND retry_type = ? AND agent_id = ?",
                               (alert_id, retry_type, agent))

    async def restart_times(self, agent: str) -> list[float]:
        """Monotonic times of this agent's restarts (the registry counts, not a process)."""
        rows = await self._all(
            "SELECT mono FROM retry_history WHERE agent_id = ? AND retry_type = 'child_restart' ORDER BY mono",
            (agent,),
        )
        return [r["mono"] for r in rows]

    async def task_ladder(self, task_id: str) -> dict:
        rows = await self._all(
            "SELECT retry_type, COUNT(*) AS n FROM retry_history WHERE task_id = ? GROUP BY retry_type", (task_id,)
        )
        counts = {r["retry_type"]: r["n"] for r in rows}
        return {
            "restarts": counts.get("child_restart", 0),
            "escalations": counts.get("escalation", 0),
            "switches": counts.get("llm_change", 0),
            "failed": counts.get("permanent_failure", 0) > 0,
        }

    async def task_history(self, task_id: str) -> list[dict]:
        """Every ladder row of one task, oldest first."""
        return await self._all("SELECT * FROM retry_history WHERE task_id = ? ORDER BY id", (task_id,))

    async def history(self, limit: int = 200) -> list[dict]:
        return await self._all("SELECT * FROM retry_history ORDER BY id DESC LIMIT ?", (limit,))
