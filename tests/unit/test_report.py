"""`tron report` over a real SQLite registry: a clean one passes, a broken one is flagged."""

import sqlite3

import pytest

from tron.registry.report import run_report
from tron.registry.schema import open_and_prepare

NOW = "2026-11-21T00:00:00Z"


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "registry.db"
    open_and_prepare(path)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO agents (name, role, parent, port, state, updated_at) VALUES "
                 "('programmer-1', 'programmer', 'director-code', 6130, 'running', ?)", (NOW,))
    conn.execute("INSERT INTO sessions (incarnation, agent, pid, pid_create_time, port, status, started_at) VALUES "
                 "('i-live', 'programmer-1', 4242, 1.0, 6130, 'running', ?)", (NOW,))
    conn.execute("INSERT INTO runs (run_id, prompt, status, created_at) VALUES ('r-1', 'p', 'running', ?)", (NOW,))
    conn.execute("INSERT INTO tasks (task_id, run_id, agent, parent_agent, kind, prompt, status, attempt, created_at, "
                 "updated_at) VALUES ('t-1', 'r-1', 'programmer-1', 'director-code', 'step', 'p', 'running', 2, ?, ?)",
                 (NOW, NOW))
    conn.execute("INSERT INTO retry_history (alert_id, agent_id, task_id, retry_type, retry_count, reason, detail, "
                 "timestamp, mono) VALUES ('a-1', 'programmer-1', 't-1', 'child_restart', 1, 'process_exit', '{}', ?, 1)",
                 (NOW,))
    conn.execute("INSERT INTO events (ts, mono, kind, task_id, payload) VALUES (?, 1, 'task_assigned', 't-1', "
                 "'{\"agent\": \"programmer-1\"}')", (NOW,))
    conn.commit()
    yield conn
    conn.close()


def report(conn, alive=lambda pid, ct: pid == 4242):
    return {c.name: c for c in run_report(conn, max_restarts=3, max_switches=3, pid_alive=alive)}


def test_a_clean_registry_is_healthy(db):
    checks = report(db)
    assert all(c.healthy for c in checks.values()), {n: c.offenders for n, c in checks.items() if not c.healthy}


@pytest.mark.parametrize("breakage,flagged", [
    ("INSERT INTO sessions (incarnation, agent, pid, pid_create_time, port, status, started_at) VALUES "
     "('i-dead', 'programmer-1', 999999, 1.0, 6130, 'running', '" + NOW + "')",
     {"sessions running without their process", "services with more than one open session"}),
    ("UPDATE tasks SET attempt = 9", {"tasks over their attempt bound"}),
    ("INSERT INTO retry_history (alert_id, agent_id, task_id, retry_type, retry_count, reason, detail, timestamp, mono) "
     "VALUES ('a-2', 'programmer-1', 't-1', 'llm_change', 1, 'x', '{}', '" + NOW + "', 2), "
     "('a-3', 'programmer-1', 't-1', 'llm_change', 2, 'x', '{}', '" + NOW + "', 3), "
     "('a-4', 'programmer-1', 't-1', 'llm_change', 3, 'x', '{}', '" + NOW + "', 4), "
     "('a-5', 'programmer-1', 't-1', 'llm_change', 4, 'x', '{}', '" + NOW + "', 5)",
     {"tasks over their attempt bound"}),
    ("UPDATE runs SET status = 'done'", {"open tasks without an owner"}),
    ("UPDATE sessions SET status = 'ended'", {"open tasks without an owner"}),
    ("INSERT INTO events (ts, mono, kind, task_id, payload) VALUES ('" + NOW + "', 2, 'task_assigned', 't-1', '{}')",
     {"assignments per task", "events without a payload"}),
    ("INSERT INTO events (ts, mono, kind, payload) VALUES ('" + NOW + "', 2, 'spawned', '{}')",
     {"events without a payload"}),
    ("INSERT INTO alerts (alert_id, agent, incarnation, reason, detail, status, deliveries, created_at) VALUES "
     "('a-9', 'programmer-1', 'i-x', 'process_exit', '{}', 'handled', 2, '" + NOW + "')",
     {"alerts delivered more than once"}),
    ("INSERT INTO retry_history (alert_id, agent_id, retry_type, retry_count, reason, detail, timestamp, mono) "
     "VALUES ('a-7', 'programmer-1', 'child_restart', 2, 'unknown failure', '{}', '" + NOW + "', 6)",
     {"failures recorded without a real reason"}),
    ("INSERT INTO alerts (alert_id, agent, incarnation, reason, detail, status, deliveries, created_at) VALUES "
     "('a-8', 'programmer-1', 'i-y', 'heartbeat_timeout', '{}', 'undeliverable', 0, '" + NOW + "')",
     {"alerts nobody handled"}),
])
def test_each_breakage_is_flagged_by_exactly_its_lines(db, breakage, flagged):
    db.execute(breakage)
    db.commit()
    checks = report(db)
    assert {n for n, c in checks.items() if not c.healthy} == flagged
    assert all(checks[n].offenders for n in flagged)


def test_the_schema_refuses_unknown_error_outright(db):
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO retry_history (alert_id, agent_id, retry_type, retry_count, reason, detail, timestamp, "
                   "mono) VALUES ('a-8', 'p', 'child_restart', 1, 'Unknown error', '{}', '" + NOW + "', 1)")


def test_the_audit_check_says_how_many_changes_lack_a_row_not_how_many_were_audited(db):
    """It said "0 of 17 audited" of a registry whose every change was audited."""
    db.execute("UPDATE agents SET stopped = 1")
    db.execute("INSERT INTO events (ts, mono, kind, payload) VALUES (?, 3, 'audit', ?)",
               (NOW, '{"what": "restart", "target": "programmer-1", "outcome": "accepted"}'))
    db.commit()
    check = report(db)["manual state changes without an audit row"]
    assert not check.healthy and check.figure == "1 without one (1 audit rows)"
    assert check.offenders == ["programmer-1 stopped"]
    db.execute("INSERT INTO events (ts, mono, kind, payload) VALUES (?, 4, 'audit', ?)",
               (NOW, '{"what": "stop", "target": "programmer-1", "outcome": "accepted"}'))
    db.commit()
    check = report(db)["manual state changes without an audit row"]
    assert check.healthy and check.figure == "0 without one (2 audit rows)"
