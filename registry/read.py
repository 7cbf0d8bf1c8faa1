"""Read-only queries for the CLI and the drills (no event loop; opened read-only, so a
reader can never write and never creates a registry that is not there). The same SQL
runs on the SQLite file (sqlite3) and on PostgreSQL (tron.registry.pg.PgReader). Every query
the tools run is here, named for what it answers."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol, TypedDict

from tron.common.states import SessionState
from tron.registry.rows import Args, Row

if TYPE_CHECKING:
    from tron.registry.pg import PgReader


class Reader(Protocol):
    """What the queries here (and registry/report.py) use of a connection: sqlite3's, or
    tron.registry.pg.PgReader, which answers in the same shape."""

    def execute(self, sql: str, parameters: Args = ..., /) -> Iterable[Any]: ...


def connect(where: Path | str) -> sqlite3.Connection | PgReader:
    """A read-only connection to the registry at ``where``: the SQLite file at a path, the
    PostgreSQL server at a postgresql:// URL; the backend of its scheme (registry/backends.py)."""
    from tron.registry.backends import open_reader

    return open_reader(where)


def _rows(conn: Reader, sql: str, args: Args = ()) -> list[Row]:
    return [dict(r) for r in conn.execute(sql, args)]


def _json(rows: list[Row], *columns: str) -> list[Row]:
    for r in rows:
        for c in columns:
            if isinstance(r.get(c), str):
                r[c] = json.loads(r[c])
    return rows


def history(conn: Reader, limit: int = 100) -> list[Row]:
    rows = _rows(conn, "SELECT id, alert_id, agent_id, task_id, run_id, retry_type, retry_count, reason, detail, "
                       "from_provider, to_provider, decided_by, requested_by, hop, case_id, timestamp "
                       "FROM retry_history ORDER BY id DESC LIMIT ?", (limit,))
    return list(reversed(_json(rows, "detail")))


def failure_metrics(conn: Reader) -> list[Row]:
    return _rows(conn, "SELECT * FROM failure_metrics ORDER BY scope, key")


def open_sessions(conn: Reader) -> list[Row]:
    return _rows(conn, "SELECT * FROM sessions WHERE status != ?", (SessionState.ENDED,))


def session(conn: Reader, incarnation: str) -> Row | None:
    rows = _rows(conn, "SELECT * FROM sessions WHERE incarnation = ?", (incarnation,))
    return rows[0] if rows else None


def events_since(conn: Reader, mono: float, agent: str | None = None) -> list[Row]:
    if agent:
        rows = _rows(conn, "SELECT * FROM events WHERE mono >= ? AND agent = ? ORDER BY id", (mono, agent))
    else:
        rows = _rows(conn, "SELECT * FROM events WHERE mono >= ? ORDER BY id", (mono,))
    return _json(rows, "payload")


def alerts_of(conn: Reader, agent: str, incarnation: str) -> list[Row]:
    return _rows(conn, "SELECT * FROM alerts WHERE agent = ? AND incarnation = ?", (agent, incarnation))


def retries_since(conn: Reader, agent: str, mono: float) -> list[Row]:
    return _json(_rows(conn, "SELECT * FROM retry_history WHERE agent_id = ? AND mono >= ? ORDER BY id",
                       (agent, mono)), "detail")


def retries_of_run(conn: Reader, run_id: str) -> list[Row]:
    return _json(_rows(conn, "SELECT * FROM retry_history WHERE run_id = ? ORDER BY id", (run_id,)), "detail")


def run(conn: Reader, run_id: str) -> Row | None:
    rows = _json(_rows(conn, "SELECT * FROM runs WHERE run_id = ?", (run_id,)), "failure")
    return rows[0] if rows else None


def alerts_of_drill(conn: Reader, label: str) -> list[Row]:
    return _rows(conn, "SELECT * FROM alerts WHERE drill = ?", (label,))


def retries_of_drill(conn: Reader, label: str) -> list[Row]:
    return _json(_rows(conn, "SELECT * FROM retry_history WHERE drill = ? ORDER BY id", (label,)), "detail")


def events_of_drill(conn: Reader, label: str, kind: str) -> list[Row]:
    return _json(_rows(conn, "SELECT * FROM events WHERE drill = ? AND kind = ? ORDER BY id", (label, kind)),
                 "payload")


def task(conn: Reader, task_id: str) -> Row | None:
    rows = _json(_rows(conn, "SELECT * FROM tasks WHERE task_id = ?", (task_id,)), "failure")
    return rows[0] if rows else None


def task_retries(conn: Reader, task_id: str) -> list[Row]:
    return _json(_rows(conn, "SELECT * FROM retry_history WHERE task_id = ? ORDER BY id", (task_id,)), "detail")


def task_checkpoints(conn: Reader, task_id: str) -> list[Row]:
    return _rows(conn, "SELECT step, step_id, hash, LENGTH(output) AS bytes, incarnation, created_at "
                       "FROM checkpoints WHERE task_id = ? ORDER BY step", (task_id,))


def task_events(conn: Reader, task_id: str) -> list[Row]:
    return _json(_rows(conn, "SELECT * FROM events WHERE task_id = ? ORDER BY id", (task_id,)), "payload")


def audit(conn: Reader, limit: int = 100) -> list[Row]:
    rows = _json(_rows(conn, "SELECT id, ts, agent, payload FROM events WHERE kind = 'audit' ORDER BY id DESC "
                             "LIMIT ?", (limit,)), "payload")
    return list(reversed(rows))


def lanes(conn: Reader) -> list[Row]:
    return _rows(conn, "SELECT * FROM lanes ORDER BY lane")


def open_tasks_of(conn: Reader, agent: str) -> list[Row]:
    return _rows(conn, "SELECT * FROM tasks WHERE agent = ? AND status IN ('assigned', 'running') ORDER BY created_at",
                 (agent,))


def tasks_of(conn: Reader, run_id: str, agent: str) -> list[Row]:
    return _rows(conn, "SELECT * FROM tasks WHERE run_id = ? AND agent = ? ORDER BY created_at", (run_id, agent))


_SPEND = ("COUNT(*) AS calls, COALESCE(SUM(input_tokens), 0) AS input_tokens, COALESCE(SUM(output_tokens), 0) "
          "AS output_tokens, COALESCE(SUM(cache_read_tokens), 0) AS cache_read_tokens, "
          "COALESCE(SUM(cache_write_tokens), 0) AS cache_write_tokens, COALESCE(SUM(cost_usd), 0) AS cost_usd, "
          "COALESCE(SUM(CASE WHEN priced = 0 THEN 1 ELSE 0 END), 0) AS unpriced_calls")
COST_GROUPS = {"provider_model": "provider, model", "service": "agent", "run": "run_id", "task": "task_id",
               "hour": "substr(ts, 1, 13)"}


class Cost(TypedDict):
    """``cost``'s answer: the spend in all, then grouped as COST_GROUPS says (in its order)."""

    total: Row
    provider_model: list[Row]
    service: list[Row]
    run: list[Row]
    task: list[Row]
    hour: list[Row]


def cost(conn: Reader, *, run_id: str | None = None, task_id: str | None = None, agent: str | None = None,
         since: str | None = None) -> Cost:
    """Tokens and cost of the LLM calls that match, in all and grouped by provider and
    model, service, run, task and hour (``since``: an ISO 8601 UTC time)."""
    where, args = [], []
    for clause, value in (("run_id = ?", run_id), ("task_id = ?", task_id), ("agent = ?", agent),
                          ("ts >= ?", since)):
        if value is not None:
            where.append(clause)
            args.append(value)
    cond = (" WHERE " + " AND ".join(where)) if where else ""

    def grouped(name: str) -> list[Row]:
        columns = COST_GROUPS[name]
        key = columns if name != "hour" else f"{columns} AS hour"
        order = "hour" if name == "hour" else "cost_usd DESC, calls DESC"
        return _rows(conn, f"SELECT {key}, {_SPEND} FROM llm_usage{cond} GROUP BY {columns} ORDER BY {order} "
                           "LIMIT 200", tuple(args))

    return Cost(total=_rows(conn, f"SELECT {_SPEND} FROM llm_usage{cond}", tuple(args))[0],
                provider_model=grouped("provider_model"), service=grouped("service"), run=grouped("run"),
                task=grouped("task"), hour=grouped("hour"))
