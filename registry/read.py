"""Read-only queries for the CLI (plain sqlite3, no event loop, opened read-only so the
CLI can never write and never creates a database that is not there)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path


def connect(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise FileNotFoundError(f"no registry at {path}: has `tron up` ever run with this home?")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    return conn


def _rows(conn: sqlite3.Connection, sql: str, args: tuple = ()) -> list[dict]:
    return [dict(r) for r in conn.execute(sql, args)]


def history(conn: sqlite3.Connection, limit: int = 100) -> list[dict]:
    rows = _rows(conn, "SELECT id, alert_id, agent_id, task_id, run_id, retry_type, retry_count, reason, detail, "
                       "from_provider, to_provider, decided_by, requested_by, hop, timestamp "
                       "FROM retry_history ORDER BY id DESC LIMIT ?", (limit,))
    for r in rows:
        r["detail"] = json.loads(r["detail"])
    return list(reversed(rows))


def failure_metrics(conn: sqlite3.Connection) -> list[dict]:
    return _rows(conn, "SELECT * FROM failure_metrics ORDER BY scope, key")


def open_sessions(conn: sqlite3.Connection) -> list[dict]:
    return _rows(conn, "SELECT * FROM sessions WHERE status != 'ended'")

