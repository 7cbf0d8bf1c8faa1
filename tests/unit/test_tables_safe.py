"""`tron task show`, `history` and `report` show what a service wrote as it is: its rich markup
is not read (a progress of ``[/]`` raised MarkupError) and its control characters reach the
terminal only as escapes (an ESC could clear the screen or forge a line)."""

from __future__ import annotations

from tron.scripts.tables import print_history, print_task, safe

HOSTILE = "[/][bold red]fake[/bold red] \x1b[2J\x1b[31mRED\x07\rline two"


def test_safe_escapes_markup_and_control_characters():
    out = safe(HOSTILE)
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\\x1b[2J" in out and "\\x07" in out and "\\r" in out
    assert safe("plain 1.5 s") == "plain 1.5 s"


def test_task_show_and_history_print_a_hostile_value_as_text(capsys):
    task = {"task_id": "r-1.0", "run_id": "r-1", "agent": "programmer-1", "status": "failed", "attempt": 2,
            "provider": "anthropic", "kind": "code", "parent_task_id": None, "parent_agent": "director-code",
            "progress": HOSTILE, "created_at": "2026-12-07T12:00:00.000", "updated_at": "2026-12-07T12:00:01.000",
            "failure": {"reason": HOSTILE, "signals": None}}
    retry = {"timestamp": "2026-12-07T12:00:01.000", "retry_type": "child_restart", "case_id": "idle_failure",
             "reason": HOSTILE, "from_provider": "anthropic", "to_provider": None, "hop": "", "requested_by": "root",
             "decided_by": "policy", "agent_id": "programmer-1", "task_id": "r-1.0", "retry_count": 1}
    checkpoint = {"step": 1, "step_id": HOSTILE, "hash": "sha256:" + "0" * 64, "bytes": 10, "incarnation": "i-1",
                  "created_at": "2026-12-07T12:00:00.500"}
    event = {"ts": "2026-12-07T12:00:00.600", "kind": "progress", "incarnation": "i-1", "payload": {"p": HOSTILE}}
    print_task(task, [retry], [checkpoint], [event])  # raised MarkupError on "[/]"
    metric = {"scope": "agent", "key": "programmer-1", "failures": 1, "restarts": 1, "escalations": 0,
              "provider_switches": 0, "permanent_failures": 0, "last_reason": HOSTILE}
    print_history([retry], [metric])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "[bold red]fake" in out  # the markup shown as the characters it is
