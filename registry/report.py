"""The health report: invariants of the registry, each one SQL query and a verdict.

Every check returns a ``Check`` (name, healthy, figure, offenders). Liveness of pids is
the one fact SQL cannot see; the caller passes ``pid_alive`` (psutil in the CLI) so the
report stays a pure function of the database and that predicate.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Callable

from tron.common.states import AlertState, LaneState, RunState as R, ServiceState as S, SessionState as SS, TaskState as T
from tron.registry.read import Reader
from tron.registry.rows import Args, Row


@dataclass
class Check:
    name: str
    healthy: bool
    figure: str
    offenders: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _rows(conn: Reader, sql: str, args: Args = ()) -> list[Row]:
    """sqlite3's connection or tron.registry.pg.PgReader: both answer execute() with rows."""
    if isinstance(conn, sqlite3.Connection):
        conn.row_factory = sqlite3.Row
    return [dict(r) for r in conn.execute(sql, args)]


def orphan_sessions(conn: Reader, pid_alive: Callable[[int | None, float | None], bool]) -> Check:
    open_ = _rows(conn, "SELECT incarnation, agent, pid, pid_create_time, mode FROM sessions "
                         f"WHERE status != '{SS.ENDED}'")
    # A session on another Ray node ("fork@<node>") has its pid there: its node agent
    # answers for it (services/daemon/ray_spawner.py); only this machine's are read here.
    dead = [f"{s['agent']}:{s['incarnation']} (pid {s['pid']})" for s in open_
            if "@" not in (s["mode"] or "") and not pid_alive(s["pid"], s["pid_create_time"])]
    return Check("sessions running without their process", not dead, f"{len(dead)} of {len(open_)} open", dead)


def duplicate_sessions(conn: Reader) -> Check:
    rows = _rows(conn, f"SELECT agent, COUNT(*) AS n FROM sessions WHERE status != '{SS.ENDED}' GROUP BY agent "
                       "HAVING COUNT(*) > 1")
    return Check("services with more than one open session", not rows, f"{len(rows)} services",
                 [f"{r['agent']} x{r['n']}" for r in rows])


def ownerless_tasks(conn: Reader) -> Check:
    rows = _rows(conn, f"""
        SELECT t.task_id, t.agent, t.status, r.status AS run_status FROM tasks t JOIN runs r USING (run_id)
        WHERE t.status IN ('{T.ASSIGNED}', '{T.RUNNING}') AND (
              r.status != '{R.RUNNING}'
           OR NOT EXISTS (SELECT 1 FROM sessions s WHERE s.agent = t.agent AND s.status != '{SS.ENDED}')
              AND NOT EXISTS (SELECT 1 FROM agents a WHERE a.name = t.agent
                              AND a.state IN ('{S.BACKOFF}', '{S.STARTING}')))
    """)
    return Check("open tasks without an owner", not rows, f"{len(rows)} tasks",
                 [f"{r['task_id']} on {r['agent']} (run {r['run_status']})" for r in rows])


def retries_over_ceiling(conn: Reader, max_restarts: int, max_switches: int) -> Check:
    """The ladder's bound per task; an operator's retries (audited) come on top of it."""
    ceiling = 1 + max_restarts + max_switches
    rows = _rows(conn, """
        SELECT t.task_id, t.attempt,
               (SELECT COUNT(*) FROM retry_history h WHERE h.task_id = t.task_id
                AND h.retry_type IN ('child_restart', 'provider_retry')) AS restarts,
               (SELECT COUNT(*) FROM retry_history h WHERE h.task_id = t.task_id
                AND h.retry_type = 'llm_change') AS switches,
               (SELECT COUNT(*) FROM retry_history h WHERE h.task_id = t.task_id AND h.decided_by = 'operator')
             + (SELECT COUNT(*) FROM events e WHERE e.task_id = t.task_id AND e.kind = 'task_requeued'
                AND e.payload LIKE '%reopened_by%') AS manual
        FROM tasks t
    """)
    over = [r for r in rows if r["attempt"] > ceiling + r["manual"] or r["restarts"] > max_restarts
            or r["switches"] > max_switches]
    worst = max((r["attempt"] for r in rows), default=0)
    return Check("tasks over their attempt bound", not over,
                 f"max attempt {worst} of {ceiling} allowed; {len(over)} over",
                 [f"{r['task_id']}: attempt {r['attempt']}, {r['restarts']} restarts, {r['switches']} switches"
                  for r in over])


def unexplained_failures(conn: Reader) -> Check:
    total = _rows(conn, "SELECT COUNT(*) AS n FROM retry_history")[0]["n"]
    bad = _rows(conn, "SELECT id, agent_id, reason FROM retry_history WHERE reason IS NULL OR TRIM(reason) = '' "
                      "OR LOWER(reason) LIKE '%unknown%'")
    share = (len(bad) / total * 100) if total else 0.0
    return Check("failures recorded without a real reason", not bad, f"{share:.1f}% of {total}",
                 [f"#{r['id']} {r['agent_id']}: {r['reason']!r}" for r in bad])


def assignments_per_task(conn: Reader) -> Check:
    rows = _rows(conn, "SELECT task_id, COUNT(*) AS n FROM events WHERE kind = 'task_assigned' GROUP BY task_id")
    many = [r for r in rows if r["n"] > 1]
    avg = sum(r["n"] for r in rows) / len(rows) if rows else 0.0
    return Check("assignments per task", not many, f"avg {avg:.2f}, max {max((r['n'] for r in rows), default=0)}",
                 [f"{r['task_id']} x{r['n']}" for r in many])


def events_without_payload(conn: Reader) -> Check:
    total = _rows(conn, "SELECT COUNT(*) AS n FROM events")[0]["n"]
    bad = _rows(conn, "SELECT id, kind FROM events WHERE payload IS NULL OR payload IN ('', '{}', 'null')")
    return Check("events without a payload", not bad, f"{len(bad)} of {total}",
                 [f"#{r['id']} {r['kind']}" for r in bad[:20]])


def alerts_delivered_twice(conn: Reader) -> Check:
    rows = _rows(conn, "SELECT alert_id, agent, deliveries FROM alerts WHERE deliveries > 1")
    total = _rows(conn, "SELECT COUNT(*) AS n FROM alerts")[0]["n"]
    return Check("alerts delivered more than once", not rows, f"{len(rows)} of {total}",
                 [f"{r['alert_id']} ({r['agent']}) x{r['deliveries']}" for r in rows])


def unhandled_alerts(conn: Reader) -> Check:
    rows = _rows(conn, f"SELECT alert_id, agent, status FROM alerts WHERE status = '{AlertState.UNDELIVERABLE}'")
    return Check("alerts nobody handled", not rows, f"{len(rows)}", [f"{r['alert_id']} ({r['agent']})" for r in rows])


def crash_looping(conn: Reader) -> Check:
    """Services crash-looping now: in a crash-loop episode and not running (failed, waiting
    out a backoff, starting again), unless an operator stopped them. The mesh is not healthy
    while one restarts over and over, whatever the other invariants say; one that is back
    up while its episode runs out (a quiet restart_window ends it) is not flagged."""
    rows = _rows(conn, "SELECT name, state FROM agents WHERE crash_looping = 1 AND stopped = 0 "
                       f"AND state != '{S.RUNNING}' ORDER BY name")
    total = _rows(conn, "SELECT COUNT(*) AS n FROM agents")[0]["n"]
    return Check("services crash-looping", not rows, f"{len(rows)} of {total}",
                 [f"{r['name']} ({r['state']})" for r in rows])


NEVER_UP_AFTER = 3  # incarnations in a row that never passed a health check


def never_coming_up(conn: Reader) -> Check:
    """Services started again and again that never come up: not running, not stopped by an
    operator, and none of their last NEVER_UP_AFTER incarnations passed its health check.
    The crash-loop check misses them when each attempt takes longer than the restart window
    to fail (a start_timeout of 30 s against a 60 s window: never 3 failures in one)."""
    offenders = []
    for a in _rows(conn, f"SELECT name, state FROM agents WHERE stopped = 0 AND state != '{S.RUNNING}' ORDER BY name"):
        last = _rows(conn, "SELECT healthy_mono FROM sessions WHERE agent = ? ORDER BY started_at DESC LIMIT ?",
                     (a["name"], NEVER_UP_AFTER))
        if len(last) == NEVER_UP_AFTER and all(r["healthy_mono"] is None for r in last):
            offenders.append(f"{a['name']} ({a['state']}; its last {NEVER_UP_AFTER} starts never became healthy)")
    total = _rows(conn, "SELECT COUNT(*) AS n FROM agents")[0]["n"]
    return Check("services that never come up", not offenders, f"{len(offenders)} of {total}", offenders)


def run_report(conn: Reader, *, max_restarts: int, max_switches: int,
               pid_alive: Callable[[int | None, float | None], bool], now: bool = True) -> list[Check]:
    """Every invariant; ``now``: with the checks of the mesh's present state (crash loops,
    services that never come up),
    which a drill that causes them on purpose leaves out and judges itself."""
    return [
        *([crash_looping(conn), never_coming_up(conn)] if now else []),
        orphan_sessions(conn, pid_alive),
        duplicate_sessions(conn),
        ownerless_tasks(conn),
        retries_over_ceiling(conn, max_restarts, max_switches),
        unexplained_failures(conn),
        assignments_per_task(conn),
        events_without_payload(conn),
        alerts_delivered_twice(conn),
        unhandled_alerts(conn),
        unaudited_changes(conn),
    ]


def unaudited_changes(conn: Reader) -> Check:
    """Every state change an operator made has its audit row: operator restarts and task
    retries (by their reference), services stopped or paused, lanes paused by hand."""
    audits = [json.loads(r["payload"]) for r in _rows(conn, "SELECT payload FROM events WHERE kind = 'audit'")]
    refs = {a.get("ref") for a in audits if a.get("ref")}
    done = {(a.get("what"), a.get("target")) for a in audits if not str(a.get("outcome", "")).startswith("refused")}
    missing = [f"retry #{r['id']} {r['agent_id']} ({r['case_id']})" for r in
               _rows(conn, "SELECT id, agent_id, alert_id, case_id FROM retry_history WHERE decided_by = 'operator'")
               if r["alert_id"] not in refs]
    for r in _rows(conn, "SELECT name, stopped, paused FROM agents WHERE stopped = 1 OR paused = 1"):
        if r["stopped"] and ("stop", r["name"]) not in done:
            missing.append(f"{r['name']} stopped")
        if r["paused"] and ("pause", r["name"]) not in done:
            missing.append(f"{r['name']} paused")
    for r in _rows(conn, f"SELECT lane FROM lanes WHERE state = '{LaneState.PAUSED}' AND changed_by != 'breaker'"):
        if ("lane_pause", r["lane"]) not in done:
            missing.append(f"lane {r['lane']} paused")
    return Check("manual state changes without an audit row", not missing,
                 f"{len(missing)} without one ({len(audits)} audit rows)", missing)
