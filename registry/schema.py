"""Registry schema: versioned, idempotent migrations and the checks run at start-up.

Fail closed: a malformed database, a WAL without its base file, or a schema that does
not match what this code expects stops the start with a message that says what to do.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping, TypeAlias

from tron.common.states import AlertState, LaneState, RetryType, RunState, ServiceState, SessionState, TaskState, sql_in

if TYPE_CHECKING:  # psycopg is imported when a PostgreSQL registry is opened, not before
    import psycopg
    from psycopg.rows import TupleRow

    PgConnection: TypeAlias = psycopg.Connection[TupleRow]

MIGRATIONS: list[tuple[int, str, "str | Callable[[sqlite3.Connection], None]"]] = [
    (
        1,
        "initial schema",
        """
        CREATE TABLE IF NOT EXISTS agents (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            parent TEXT NOT NULL,
            port INTEGER NOT NULL,
            provider TEXT,
            state TEXT NOT NULL DEFAULT 'declared',
            current_incarnation TEXT,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS sessions (
            incarnation TEXT PRIMARY KEY,
            agent TEXT NOT NULL REFERENCES agents(name),
            pid INTEGER,
            pid_create_time REAL,
            port INTEGER NOT NULL,
            provider TEXT,
            status TEXT NOT NULL CHECK (status IN ('starting','running','ended')),
            started_at TEXT NOT NULL,
            ended_at TEXT,
            exit_code INTEGER,
            exit_signal INTEGER,
            end_reason TEXT
        );
        CREATE INDEX IF NOT EXISTS sessions_agent ON sessions(agent, started_at);
        CREATE INDEX IF NOT EXISTS sessions_open ON sessions(status) WHERE status != 'ended';
        CREATE TABLE IF NOT EXISTS runs (
            run_id TEXT PRIMARY KEY,
            prompt TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running','done','failed')),
            result TEXT,
            failure TEXT,
            drill INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            finished_at TEXT
        );
        CREATE TABLE IF NOT EXISTS tasks (
            task_id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            parent_task_id TEXT,
            agent TEXT NOT NULL,
            parent_agent TEXT NOT NULL,
            kind TEXT NOT NULL,
            prompt TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('assigned','running','done','failed')),
            attempt INTEGER NOT NULL DEFAULT 1,
            provider TEXT,
            progress TEXT,
            lease_incarnation TEXT,
            result TEXT,
            failure TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS tasks_agent_open ON tasks(agent) WHERE status IN ('assigned','running');
        CREATE INDEX IF NOT EXISTS tasks_run ON tasks(run_id);
        CREATE TABLE IF NOT EXISTS alerts (
            alert_id TEXT PRIMARY KEY,
            agent TEXT NOT NULL,
            incarnation TEXT NOT NULL,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL,
            task_id TEXT,
            run_id TEXT,
            status TEXT NOT NULL CHECK (status IN ('pending','delivered','handled','undeliverable')),
            delivered_to TEXT,
            deliveries INTEGER NOT NULL DEFAULT 0,
            decision TEXT,
            created_at TEXT NOT NULL,
            handled_at TEXT
        );
        CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_per_incarnation ON alerts(agent, incarnation);
        CREATE TABLE IF NOT EXISTS events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts TEXT NOT NULL,
            mono REAL NOT NULL,
            kind TEXT NOT NULL,
            agent TEXT,
            incarnation TEXT,
            run_id TEXT,
            task_id TEXT,
            alert_id TEXT,
            payload TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS events_kind ON events(kind, id);
        CREATE INDEX IF NOT EXISTS events_agent ON events(agent, id);
        CREATE TABLE IF NOT EXISTS retry_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            alert_id TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            task_id TEXT,
            run_id TEXT,
            retry_type TEXT NOT NULL CHECK (retry_type IN ('child_restart','escalation','llm_change','permanent_failure')),
            retry_count INTEGER NOT NULL,
            reason TEXT NOT NULL CHECK (reason != '' AND reason != 'Unknown error'),
            detail TEXT NOT NULL,
            from_provider TEXT,
            to_provider TEXT,
            decided_by TEXT NOT NULL DEFAULT 'policy',
            requested_by TEXT,
            hop TEXT NOT NULL DEFAULT '',
            timestamp TEXT NOT NULL,
            mono REAL NOT NULL
        );
        CREATE UNIQUE INDEX IF NOT EXISTS retry_once_per_alert
            ON retry_history(alert_id, retry_type, agent_id, hop);
        CREATE INDEX IF NOT EXISTS retry_agent ON retry_history(agent_id, mono);
        CREATE INDEX IF NOT EXISTS retry_task ON retry_history(task_id);
        CREATE TABLE IF NOT EXISTS failure_metrics (
            scope TEXT NOT NULL CHECK (scope IN ('agent','provider','task','run')),
            key TEXT NOT NULL,
            failures INTEGER NOT NULL DEFAULT 0,
            restarts INTEGER NOT NULL DEFAULT 0,
            escalations INTEGER NOT NULL DEFAULT 0,
            provider_switches INTEGER NOT NULL DEFAULT 0,
            permanent_failures INTEGER NOT NULL DEFAULT 0,
            last_reason TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (scope, key)
        );
        """,
    ),
]

MIGRATIONS.append((
    2,
    "label drill traffic",
    """
    ALTER TABLE events ADD COLUMN drill TEXT;
    ALTER TABLE alerts ADD COLUMN drill TEXT;
    ALTER TABLE retry_history ADD COLUMN drill TEXT;
    """,
))

MIGRATIONS.append((
    3,
    "remember which finished tasks reached their parent",
    """
    ALTER TABLE tasks ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0;
    """,
))

# -- version 4: the two lifecycles ----------------------------------------------------------
# The state columns take their CHECKs from tron.common.states, so SQL never retypes a state.
# SQLite cannot change a CHECK in place: each table is rebuilt (new table, copy, swap).

_SERVICE_STATES = sql_in(list(ServiceState) + ["declared"])
V4_TABLES: dict[str, str] = {
    "agents": f"""
        CREATE TABLE agents (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            parent TEXT NOT NULL,
            port INTEGER NOT NULL,
            provider TEXT,
            state TEXT NOT NULL DEFAULT 'declared' CHECK (state IN {_SERVICE_STATES}),
            current_incarnation TEXT,
            crash_looping INTEGER NOT NULL DEFAULT 0,
            stopped INTEGER NOT NULL DEFAULT 0,
            paused INTEGER NOT NULL DEFAULT 0,
            updated_at TEXT NOT NULL
        )""",
    "sessions": f"""
        CREATE TABLE sessions (
            incarnation TEXT PRIMARY KEY,
            agent TEXT NOT NULL REFERENCES agents(name),
            pid INTEGER,
            pid_create_time REAL,
            port INTEGER NOT NULL,
            provider TEXT,
            status TEXT NOT NULL CHECK (status IN {sql_in(SessionState)}),
            started_at TEXT NOT NULL,
            ended_at TEXT,
            exit_code INTEGER,
            exit_signal INTEGER,
            end_reason TEXT,
            started_mono REAL,
            healthy_mono REAL,
            mode TEXT
        )""",
    "runs": f"""
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            prompt TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN {sql_in(RunState)}),
            result TEXT,
            failure TEXT,
            drill INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            finished_at TEXT
        )""",
    "tasks": f"""
        CREATE TABLE tasks (
            task_id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            parent_task_id TEXT,
            agent TEXT NOT NULL,
            parent_agent TEXT NOT NULL,
            kind TEXT NOT NULL,
            prompt TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN {sql_in(TaskState)}),
            attempt INTEGER NOT NULL DEFAULT 1,
            provider TEXT,
            progress TEXT,
            lease_incarnation TEXT,
            result TEXT,
            failure TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            delivered INTEGER NOT NULL DEFAULT 0,
            held_since REAL
        )""",
    "alerts": f"""
        CREATE TABLE alerts (
            alert_id TEXT PRIMARY KEY,
            agent TEXT NOT NULL,
            incarnation TEXT NOT NULL,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL,
            task_id TEXT,
            run_id TEXT,
            status TEXT NOT NULL CHECK (status IN {sql_in(AlertState)}),
            delivered_to TEXT,
            deliveries INTEGER NOT NULL DEFAULT 0,
            decision TEXT,
            created_at TEXT NOT NULL,
            handled_at TEXT,
            drill TEXT,
            mono REAL NOT NULL DEFAULT 0,
            stable INTEGER NOT NULL DEFAULT 0
        )""",
    "retry_history": f"""
        CREATE TABLE retry_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            alert_id TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            task_id TEXT,
            run_id TEXT,
            retry_type TEXT NOT NULL CHECK (retry_type IN {sql_in(RetryType)}),
            retry_count INTEGER NOT NULL,
            reason TEXT NOT NULL CHECK (reason != '' AND reason != 'Unknown error'),
            detail TEXT NOT NULL,
            from_provider TEXT,
            to_provider TEXT,
            decided_by TEXT NOT NULL DEFAULT 'policy' CHECK (decided_by IN ('policy','llm','operator')),
            requested_by TEXT,
            hop TEXT NOT NULL DEFAULT '',
            timestamp TEXT NOT NULL,
            mono REAL NOT NULL,
            drill TEXT,
            case_id TEXT NOT NULL DEFAULT ''
        )""",
}
V4_INDEXES = [
    "CREATE INDEX sessions_agent ON sessions(agent, started_at)",
    "CREATE INDEX sessions_open ON sessions(status) WHERE status != 'ended'",
    "CREATE INDEX tasks_agent_open ON tasks(agent) WHERE status IN ('assigned','running','escalated')",
    "CREATE INDEX tasks_run ON tasks(run_id)",
    "CREATE UNIQUE INDEX alerts_one_per_incarnation ON alerts(agent, incarnation)",
    "CREATE INDEX alerts_agent_mono ON alerts(agent, mono)",
    "CREATE UNIQUE INDEX retry_once_per_alert ON retry_history(alert_id, retry_type, agent_id, hop)",
    "CREATE INDEX retry_agent ON retry_history(agent_id, mono)",
    "CREATE INDEX retry_task ON retry_history(task_id)",
    """CREATE TABLE checkpoints (
        task_id TEXT NOT NULL,
        step INTEGER NOT NULL CHECK (step >= 1),
        step_id TEXT NOT NULL,
        hash TEXT NOT NULL,
        output TEXT NOT NULL,
        incarnation TEXT,
        created_at TEXT NOT NULL,
        PRIMARY KEY (task_id, step)
    )""",
]
# Old values that v4 no longer has, mapped on the way in.
_V4_COPY_FIX = {"agents": {"state": "CASE state WHEN 'given_up' THEN 'failed' ELSE state END"}}


def _rebuild_v4(conn: sqlite3.Connection) -> None:
    for table, ddl in V4_TABLES.items():
        old_cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        conn.execute(ddl.replace(f"CREATE TABLE {table} (", f"CREATE TABLE {table}_v4 (", 1))
        new_cols = {r[1] for r in conn.execute(f"PRAGMA table_info({table}_v4)")}
        cols = [c for c in old_cols if c in new_cols]
        fixes = _V4_COPY_FIX.get(table, {})
        select = ", ".join(fixes.get(c, c) for c in cols)
        conn.execute(f"INSERT INTO {table}_v4 ({', '.join(cols)}) SELECT {select} FROM {table}")
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"ALTER TABLE {table}_v4 RENAME TO {table}")
    for sql in V4_INDEXES:
        conn.execute(sql)


MIGRATIONS.append((4, "two lifecycles: crash loops, operator stops, held tasks, checkpoints, case ids", _rebuild_v4))

MIGRATIONS.append((
    5,
    "lanes: a breaker for failures that repeat",
    f"""
    CREATE TABLE lanes (
        lane TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN {sql_in(LaneState)}),
        fingerprint TEXT,
        reason TEXT,
        changed_by TEXT,
        changed_at TEXT NOT NULL
    );
    CREATE TABLE lane_trips (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        fingerprint TEXT NOT NULL,
        lane TEXT NOT NULL,
        description TEXT NOT NULL,
        task_id TEXT,
        run_id TEXT,
        mono REAL NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX lane_trips_fingerprint ON lane_trips(fingerprint, mono);
    """,
))

# -- version 6: providers are supervised ------------------------------------------------------
# A task can be parked (every provider down) and a provider failure has its own level-1 row
# (provider_retry): two CHECKs widen, so SQLite rebuilds the two tables from the DDL above,
# which takes its CHECKs from tron.common.states.
V6_TABLES = ("tasks", "retry_history")
V6_METRICS_COLUMN = "ALTER TABLE failure_metrics ADD COLUMN provider_retries INTEGER NOT NULL DEFAULT 0"
V6_INDEXES = [
    "DROP INDEX IF EXISTS tasks_agent_open",
    "CREATE INDEX tasks_agent_open ON tasks(agent) WHERE status IN ('assigned','running','parked','escalated')",
    "CREATE INDEX IF NOT EXISTS tasks_run ON tasks(run_id)",
    "CREATE UNIQUE INDEX IF NOT EXISTS retry_once_per_alert ON retry_history(alert_id, retry_type, agent_id, hop)",
    "CREATE INDEX IF NOT EXISTS retry_agent ON retry_history(agent_id, mono)",
    "CREATE INDEX IF NOT EXISTS retry_task ON retry_history(task_id)",
]


def _rebuild_v6(conn: sqlite3.Connection) -> None:
    for table in V6_TABLES:
        ddl = V4_TABLES[table]
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        conn.execute(ddl.replace(f"CREATE TABLE {table} (", f"CREATE TABLE {table}_v6 (", 1))
        conn.execute(f"INSERT INTO {table}_v6 ({', '.join(cols)}) SELECT {', '.join(cols)} FROM {table}")
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"ALTER TABLE {table}_v6 RENAME TO {table}")
    for sql in V6_INDEXES:
        conn.execute(sql)
    conn.execute(V6_METRICS_COLUMN)


def _widen_v6_pg(conn: PgConnection) -> None:
    conn.execute("ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_status_check")
    conn.execute(f"ALTER TABLE tasks ADD CONSTRAINT tasks_status_check CHECK (status IN {sql_in(TaskState)})")
    conn.execute("ALTER TABLE retry_history DROP CONSTRAINT IF EXISTS retry_history_retry_type_check")
    conn.execute("ALTER TABLE retry_history ADD CONSTRAINT retry_history_retry_type_check "
                 f"CHECK (retry_type IN {sql_in(RetryType)})")
    for sql in V6_INDEXES:
        conn.execute(sql)
    conn.execute(V6_METRICS_COLUMN)


MIGRATIONS.append((6, "providers: parked tasks and provider_retry rows", _rebuild_v6))

# -- version 7: spend ------------------------------------------------------------------------------
# One row per LLM call (its tokens and, from the price table, its cost), budgets on runs,
# and why a parked task waits (a provider, its budget, an operator).
MIGRATIONS.append((
    7,
    "spend: llm_usage rows, run budgets, why a task is parked",
    """
    CREATE TABLE llm_usage (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts TEXT NOT NULL,
        mono REAL NOT NULL,
        run_id TEXT,
        task_id TEXT,
        agent TEXT NOT NULL,
        incarnation TEXT,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        step TEXT,
        ok INTEGER NOT NULL DEFAULT 1,
        input_tokens INTEGER NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
        output_tokens INTEGER NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
        cache_read_tokens INTEGER NOT NULL DEFAULT 0 CHECK (cache_read_tokens >= 0),
        cache_write_tokens INTEGER NOT NULL DEFAULT 0 CHECK (cache_write_tokens >= 0),
        duration_ms REAL,
        cost_usd REAL NOT NULL DEFAULT 0,
        priced INTEGER NOT NULL DEFAULT 1,
        source TEXT NOT NULL DEFAULT 'sdk',
        drill TEXT
    );
    CREATE INDEX llm_usage_run ON llm_usage(run_id);
    CREATE INDEX llm_usage_task ON llm_usage(task_id);
    CREATE INDEX llm_usage_agent_mono ON llm_usage(agent, mono);
    ALTER TABLE runs ADD COLUMN budget_usd REAL;
    ALTER TABLE runs ADD COLUMN budget_tokens BIGINT;
    ALTER TABLE tasks ADD COLUMN parked_reason TEXT;
    """,
))

# -- version 8: traces --------------------------------------------------------------------------------
# The W3C trace context a task travels with (common/telemetry.py): its attempts are spans of the
# run's trace, whichever process or incarnation runs them.
MIGRATIONS.append((
    8,
    "traces: the traceparent of each task",
    """
    ALTER TABLE tasks ADD COLUMN traceparent TEXT;
    """,
))

SCHEMA_VERSION = MIGRATIONS[-1][0]

EXPECTED_COLUMNS: dict[str, set[str]] = {
    "agents": {"name", "role", "parent", "port", "provider", "state", "current_incarnation", "crash_looping",
               "stopped", "paused"},
    "sessions": {"incarnation", "agent", "pid", "pid_create_time", "status", "exit_code", "exit_signal", "end_reason",
                 "started_mono", "healthy_mono"},
    "runs": {"run_id", "prompt", "status", "result", "failure", "drill", "budget_usd", "budget_tokens"},
    "tasks": {"task_id", "run_id", "agent", "parent_agent", "status", "attempt", "provider", "progress",
              "lease_incarnation", "delivered", "held_since", "parked_reason", "traceparent"},
    "alerts": {"alert_id", "agent", "incarnation", "reason", "status", "deliveries", "drill", "mono", "stable"},
    "events": {"id", "ts", "kind", "agent", "incarnation", "run_id", "task_id", "alert_id", "payload", "drill"},
    "retry_history": {"agent_id", "task_id", "retry_type", "retry_count", "reason", "from_provider", "to_provider",
                      "timestamp", "drill", "case_id", "decided_by"},
    "failure_metrics": {"scope", "key", "failures", "restarts", "escalations", "provider_switches", "permanent_failures",
                        "provider_retries"},
    "checkpoints": {"task_id", "step", "step_id", "hash", "output"},
    "lanes": {"lane", "state", "fingerprint", "reason", "changed_by", "changed_at"},
    "lane_trips": {"fingerprint", "lane", "description", "task_id", "mono"},
    "llm_usage": {"run_id", "task_id", "agent", "provider", "model", "input_tokens", "output_tokens",
                  "cache_read_tokens", "cache_write_tokens", "cost_usd", "priced", "mono"},
}


class RegistryError(Exception):
    """The registry cannot be used; the message says why and what to do."""


class RegistryUnwritable(RegistryError):
    """A sound registry that cannot be written now (locked, a full disk): no backup helps."""


def preflight(path: Path) -> None:
    """Checks that need no connection: a WAL or SHM file without its database means
    the base file was lost, and opening it would silently start from nothing."""
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists() and not path.exists():
            raise RegistryError(
                f"{side} exists but {path} does not: the database file was lost. "
                "Restore it, or move the WAL aside to start a new registry."
            )


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations not yet applied; return the schema version."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
        "description TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    applied = {row[0] for row in conn.execute("SELECT version FROM schema_version")}
    newer = [v for v in applied if v > SCHEMA_VERSION]
    if newer:
        raise RegistryError(
            f"registry schema version {max(newer)} is newer than this code ({SCHEMA_VERSION}): upgrade tron"
        )
    for version, description, step in MIGRATIONS:
        if version in applied:
            continue
        if callable(step):
            # One transaction: a migration interrupted half-way leaves the old schema.
            isolation = conn.isolation_level
            conn.isolation_level = None
            conn.execute("BEGIN")
            try:
                step(conn)
                conn.execute("INSERT INTO schema_version VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ','now'))",
                             (version, description))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            finally:
                conn.isolation_level = isolation  # the caller's, as it was (autocommit stays autocommit)
            continue
        conn.executescript("BEGIN;" + step + ";")
        conn.execute(
            "INSERT INTO schema_version VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ','now'))",
            (version, description),
        )
        conn.commit()
    return SCHEMA_VERSION


def quick_check(conn: sqlite3.Connection, where: str = "registry") -> None:
    """SQLite's own integrity check, its findings on one line (the CLI shows one line)."""
    try:
        result = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as err:
        raise RegistryError(f"{where} is not a usable SQLite database: {err}") from None
    if result != [("ok",)]:
        problems = "; ".join(" ".join(str(r[0]).split()) for r in result[:3])
        raise RegistryError(f"{where} is malformed (PRAGMA quick_check: {problems})")


def verify(conn: sqlite3.Connection) -> None:
    """Integrity and shape: quick_check, then every expected table and column."""
    quick_check(conn)
    check_columns(lambda table: {row[1] for row in conn.execute(f"PRAGMA table_info({table})")})


def check_columns(columns_of: Callable[[str], set[str]]) -> None:
    """Every expected table and column, whichever engine answers ``columns_of(table)``."""
    for table, columns in EXPECTED_COLUMNS.items():
        have = columns_of(table)
        if not have:
            raise RegistryError(f"registry schema: table {table} is missing")
        missing = columns - have
        if missing:
            raise RegistryError(f"registry schema: table {table} lacks columns {sorted(missing)}")


# -- the exact schema: what a file must be before it becomes the registry ----------------------------
# `verify` asks for the columns tron reads; a restored file must also hold nothing else. A
# trigger or a view in a backup would run inside tron's own writes (an AFTER INSERT trigger
# that deletes every alert passes every column check), so the whole of sqlite_master is
# compared with what the migrations create on a fresh database.

# The same DDL as `migrate` writes; test_backup checks a registry made by `migrate` matches.
_SCHEMA_VERSION_DDL = ("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                       "description TEXT NOT NULL, applied_at TEXT NOT NULL)")
# A quoted literal or name is kept as written; outside them, whitespace runs are one space and
# none is kept around ( ) , -- so a schema reformatted in source still matches, and a CHECK
# whose literal changed does not.
_SQL_TOKENS = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\])|\s*([(),])\s*|\s+""")
# Objects are reported worst first: a trigger or view acts, a table or index only holds.
_KIND_ORDER = {"trigger": 0, "view": 1, "table": 2, "index": 3}


def normal_sql(sql: str | None) -> str | None:
    """A CREATE statement with its layout normalised (see _SQL_TOKENS); None stays None
    (SQLite's automatic indexes have no SQL)."""
    if sql is None:
        return None
    return _SQL_TOKENS.sub(lambda m: m.group(1) or m.group(2) or " ", sql.strip())


# One object of a schema as ``describe`` sees it: its table, its normalised SQL, and the
# pragma rows SQLite parsed it into (compared for equality only).
SchemaObject = tuple[str, str | None, tuple[object, ...]]


def describe(conn: sqlite3.Connection) -> dict[tuple[str, str], SchemaObject]:
    """Every object in ``sqlite_master``, keyed by (type, name): its table, its normalised
    SQL, and as SQLite parsed it -- a table's columns and indexes, an index's columns. Names
    go to the pragmas as parameters: they come from the file being checked."""
    shape: dict[tuple[str, str], SchemaObject] = {}
    for kind, name, table, sql in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"):
        parsed: tuple[object, ...] = ()
        if kind == "table":
            parsed = (tuple(conn.execute("SELECT cid, name, type, \"notnull\", dflt_value, pk "
                                         "FROM pragma_table_info(?)", (name,))),
                      tuple(sorted(conn.execute("SELECT name, \"unique\", origin, partial "
                                                "FROM pragma_index_list(?)", (name,)))))
        elif kind == "index":
            parsed = tuple(conn.execute("SELECT seqno, cid, name, \"desc\", coll, key "
                                        "FROM pragma_index_xinfo(?)", (name,)))
        shape[(kind, name)] = (table, normal_sql(sql), parsed)
    return shape


@functools.lru_cache(maxsize=None)
def expected_schema(version: int = SCHEMA_VERSION) -> Mapping[tuple[str, str], SchemaObject]:
    """``describe`` of a fresh in-memory database taken through MIGRATIONS up to ``version``:
    the schema a registry at that version has, and nothing else."""
    if not 1 <= version <= SCHEMA_VERSION:
        raise ValueError(f"no schema version {version} (this tron knows 1..{SCHEMA_VERSION})")
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        conn.execute(_SCHEMA_VERSION_DDL)
        for number, description, step in MIGRATIONS:
            if number > version:
                break
            if callable(step):
                step(conn)
            else:
                conn.executescript(step)
            conn.execute("INSERT INTO schema_version VALUES (?, ?, '')", (number, description))
        return MappingProxyType(describe(conn))  # cached: shared, so read-only
    finally:
        conn.close()


def recorded_version(conn: sqlite3.Connection) -> int:
    """The schema version a registry file records. Its ``schema_version`` rows must be the
    integers 1..N with N at most SCHEMA_VERSION; anything else is a RegistryError saying which."""
    try:
        rows = conn.execute("SELECT version, typeof(version) FROM schema_version").fetchall()
    except sqlite3.OperationalError as err:
        raise RegistryError(f"registry schema: no schema_version table ({err})") from None
    for value, kind in rows:
        if kind != "integer":
            raise RegistryError(f"registry schema: schema_version holds {value!r}, not a version number")
    versions: list[int] = sorted(value for value, _ in rows)
    if not versions:
        raise RegistryError("registry schema: schema_version is empty")
    if versions[-1] > SCHEMA_VERSION:
        raise RegistryError(f"registry schema version {versions[-1]} is newer than this code ({SCHEMA_VERSION}): "
                            "upgrade tron")
    if versions != list(range(1, versions[-1] + 1)):
        raise RegistryError(f"registry schema: schema_version holds {versions}, not the versions 1..{versions[-1]}")
    return versions[-1]


def check_exact(conn: sqlite3.Connection, version: int) -> None:
    """The file's schema is exactly what the migrations up to ``version`` create: no object
    missing, none changed, none more. Raises RegistryError naming the first difference."""
    have, want = describe(conn), expected_schema(version)
    extra = sorted(have.keys() - want.keys(), key=lambda k: (_KIND_ORDER.get(k[0], -1), k[1]))
    if extra:
        kind, name = extra[0]
        raise RegistryError(f"registry schema: {kind} {name} is not part of tron's schema (version {version}); "
                            "a registry holds only what the migrations create")
    missing = sorted(want.keys() - have.keys(), key=lambda k: (_KIND_ORDER[k[0]], k[1]))
    if missing:
        kind, name = missing[0]
        raise RegistryError(f"registry schema: {kind} {name} is missing (version {version})")
    for key in sorted(want, key=lambda k: (_KIND_ORDER[k[0]], k[1])):
        if have[key] != want[key]:
            kind, name = key
            sql = have[key][1] or ""
            raise RegistryError(f"registry schema: {kind} {name} differs from what the migrations create "
                                f"(version {version}): {sql[:240]}")


def open_and_prepare(path: Path) -> None:
    """Run at daemon start, before anything is written: preflight, WAL, migrate, verify."""
    preflight(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            quick_check(conn, f"registry {path}")  # before any migration writes to it
            migrate(conn)
            verify(conn)
        finally:
            conn.close()
    except (sqlite3.DatabaseError, UnicodeDecodeError) as err:
        raise RegistryError(f"registry {path} is malformed ({err}); refusing to start") from None


# -- PostgreSQL: the same migrations, the dialect differences written out -------------------------
# The DDL above is SQLite's; on PostgreSQL an AUTOINCREMENT key is an identity column and
# REAL (4 bytes there) is DOUBLE PRECISION, so clock readings keep their precision.
# Version 4 rebuilt tables because SQLite cannot change a CHECK in place; PostgreSQL
# support began at version 5, so no PostgreSQL registry ever held rows at version 3, and
# there version 4 recreates the six tables (refusing if one holds a row).


def pg_sql(sql: str) -> str:
    sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)


def _recreate_v4_pg(conn: PgConnection) -> None:
    for table in V4_TABLES:
        if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
            raise RegistryError(f"registry: table {table} holds rows at schema version 3 on PostgreSQL; "
                                "nothing in tron ever wrote those: refusing to migrate it")
    conn.execute("DROP TABLE IF EXISTS " + ", ".join(V4_TABLES) + " CASCADE")
    for ddl in V4_TABLES.values():
        conn.execute(pg_sql(ddl))
    for ddl in V4_INDEXES:
        conn.execute(pg_sql(ddl))


PG_STEPS: dict[int, Callable[[PgConnection], None]] = {4: _recreate_v4_pg, 6: _widen_v6_pg}


def migrate_pg(conn: PgConnection) -> int:
    """``migrate`` for a psycopg connection: each version in one transaction, under an
    advisory lock so two daemons starting at once do not both migrate."""
    from tron.common.clock import utc_iso

    conn.execute("SELECT pg_advisory_lock(7432)")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                     "description TEXT NOT NULL, applied_at TEXT NOT NULL)")
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_version").fetchall()}
        newer = [v for v in applied if v > SCHEMA_VERSION]
        if newer:
            raise RegistryError(
                f"registry schema version {max(newer)} is newer than this code ({SCHEMA_VERSION}): upgrade tron")
        for version, description, step in MIGRATIONS:
            if version in applied:
                continue
            with conn.transaction():
                if callable(step):
                    PG_STEPS[version](conn)
                else:
                    conn.execute(pg_sql(step))
                conn.execute("INSERT INTO schema_version VALUES (%s, %s, %s)", (version, description, utc_iso()))
    finally:
        conn.execute("SELECT pg_advisory_unlock(7432)")
    return SCHEMA_VERSION


def verify_pg(conn: PgConnection) -> None:
    check_columns(lambda table: {row[0] for row in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = %s", (table,)).fetchall()})


def open_and_prepare_pg(url: str) -> None:
    """At daemon start, before anything is written: connect (fail closed, one line),
    migrate, verify."""
    import psycopg

    from tron.registry.pg import safe_url

    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            migrate_pg(conn)
            verify_pg(conn)
    except psycopg.Error as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RegistryError(f"registry at {safe_url(url)} is not usable: {safe_url(first)}") from None
