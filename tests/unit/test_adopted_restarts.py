"""How many restarts an adopted service had, read back from its sessions (newest first)."""

from __future__ import annotations

import pytest

from tron.services.daemon.supervisor import restarts_in


def ended(reason: str) -> dict:
    return {"status": "ended", "end_reason": reason}


OPEN = {"status": "running", "end_reason": None}


@pytest.mark.parametrize("sessions, restarts", [
    ([OPEN], 0),  # started once
    ([OPEN, ended("process_exit"), ended("replaced:idle_failure:process_exit")], 2),
    ([OPEN, ended("spawn_failed: no such file"), ended("oom_killed")], 2),
    ([OPEN, ended("process_exit"), ended("tron_down"), ended("process_exit")], 1),  # a new run began after tron down
    ([OPEN, ended("operator_stop:maintenance"), ended("process_exit")], 0),  # tron stop, tron start
    ([OPEN, ended("reload:changed")], 0),
    ([OPEN, ended("lost_while_daemon_down"), ended("process_exit")], 2),  # died with no daemon: brought back
    ([], 0),
])
def test_restarts_count_the_sessions_since_the_last_deliberate_start(sessions, restarts):
    assert restarts_in(sessions) == restarts
