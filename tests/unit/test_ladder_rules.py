"""The service lifecycle's two counting rules, as pure functions of (history, now, policy):
the unstable streak and the previous failure (``failure_record``), and a crash-loop
episode's start and end (``crash_loop_starts``, ``crash_loop_ends``). One table row per
situation; ``now`` is the injected clock reading, nothing sleeps."""

from __future__ import annotations

import pytest

from tron.common.config import Policy
from tron.common.ladder import (ChildFailed, FailureRecord, LadderView, Restart, ServiceView, crash_loop_ends,
                                crash_loop_starts, decide, failure_record)
from tron.common.states import ServiceState

P = Policy(max_restarts=3, restart_window=60, backoff_initial=0.5, backoff_factor=2, backoff_max=10,
           backoff_jitter=0, max_provider_switches=2, min_uptime=1.0)
NOW = 1000.0


def rows(*failures: tuple[str, float, bool]) -> list[tuple[str, float, bool]]:
    """A service's alerts, newest first: (alert id, when, was that incarnation stable)."""
    return list(failures)


RECORDS = [
    ("no failure on record", rows(), "a-1", FailureRecord([], None, 0)),
    ("the first failure, of an unstable incarnation", rows(("a-1", NOW, False)), "a-1",
     FailureRecord([NOW], None, 1)),
    ("the first failure, of a stable incarnation", rows(("a-1", NOW, True)), "a-1", FailureRecord([NOW], None, 0)),
    ("three unstable in a row", rows(("a-3", NOW, False), ("a-2", NOW - 5, False), ("a-1", NOW - 10, False)), "a-3",
     FailureRecord([NOW, NOW - 5, NOW - 10], NOW - 5, 3)),
    ("a stable incarnation ends the streak", rows(("a-3", NOW, False), ("a-2", NOW - 5, True),
                                                  ("a-1", NOW - 10, False)), "a-3",
     FailureRecord([NOW, NOW - 5, NOW - 10], NOW - 5, 1)),
    ("a failure older than the window is out of the count, not out of the streak",
     rows(("a-2", NOW, False), ("a-1", NOW - 60, False)), "a-2", FailureRecord([NOW], NOW - 60, 2)),
    ("a later failure (a newer alert) is not this one's streak",
     rows(("a-3", NOW, False), ("a-2", NOW - 5, False), ("a-1", NOW - 10, True)), "a-2",
     FailureRecord([NOW, NOW - 5, NOW - 10], NOW - 10, 1)),
    ("no alert named: every failure is earlier", rows(("a-1", NOW - 5, False)), None,
     FailureRecord([NOW - 5], NOW - 5, 0)),
    ("an alert not on record: every failure is earlier", rows(("a-1", NOW - 5, False)), "a-9",
     FailureRecord([NOW - 5], NOW - 5, 0)),
    ("a failure after now (another clock's reading) is not in the window", rows(("a-1", NOW + 1, False)), "a-1",
     FailureRecord([], None, 1)),
]


@pytest.mark.parametrize("what,history,alert_id,expected", RECORDS, ids=[r[0] for r in RECORDS])
def test_failure_record(what, history, alert_id, expected):
    assert failure_record(history, alert_id, NOW, P) == expected


STARTS = [
    # (failures in the window, this one included; the previous failure; looping already) -> (looping, new episode)
    ("one failure", [NOW], None, False, (False, False)),
    ("max_restarts - 1 failures", [NOW, NOW - 1], NOW - 1, False, (False, False)),
    ("max_restarts failures start an episode", [NOW, NOW - 1, NOW - 2], NOW - 1, False, (True, True)),
    ("max_restarts failures, but one is outside the window", [NOW, NOW - 1, NOW - 60], NOW - 1, False,
     (False, False)),
    ("inside an episode: no new one", [NOW, NOW - 1, NOW - 2, NOW - 3], NOW - 1, True, (True, False)),
    ("looping flag left over, previous failure a whole window ago", [NOW, NOW - 0.5, NOW - 0.2], NOW - 60, True,
     (True, True)),
    ("looping flag left over, no previous failure on record", [NOW, NOW - 0.5, NOW - 0.2], None, True,
     (True, True)),
    ("looping and fewer failures than max_restarts now: not looping", [NOW], NOW - 61, True, (False, False)),
]


@pytest.mark.parametrize("what,failures,previous,looping,expected", STARTS, ids=[r[0] for r in STARTS])
def test_crash_loop_starts(what, failures, previous, looping, expected):
    assert crash_loop_starts(failures, previous, looping, NOW, P) == expected


ENDS = [
    ("not looping: nothing to end", False, NOW - 120, False),
    ("looping, latest failure just now", True, NOW, False),
    ("looping, latest failure within the window", True, NOW - 59.9, False),
    ("looping, a whole quiet window", True, NOW - 60, True),
    ("looping, longer than a window", True, NOW - 600, True),
    ("looping, no failure on record (a registry restored)", True, None, True),
]


@pytest.mark.parametrize("what,looping,latest,ends", ENDS, ids=[r[0] for r in ENDS])
def test_crash_loop_ends(what, looping, latest, ends):
    assert crash_loop_ends(looping, latest, NOW, P) is ends


def test_decide_restarts_with_the_rules_it_is_given():
    """decide() takes the record these functions build: the third unstable failure in the
    window starts an episode, with the backoff of the streak before it."""
    record = failure_record(rows(("a-3", NOW, False), ("a-2", NOW - 1, False), ("a-1", NOW - 2, False)), "a-3",
                            NOW, P)
    view = LadderView(now=NOW, policy=P, decider="director-code",
                      service=ServiceView(name="programmer-1", incarnation="i-3", state=ServiceState.FAILED,
                                          failures=record.failures, previous_failure=record.previous_failure,
                                          unstable_streak=record.unstable_streak))
    decision = decide(ChildFailed("a-3", "programmer-1", "i-3", "process_exit"), view, NOW, P)
    assert decision == Restart("idle_failure", delay=1.0, crash_looping=True, new_episode=True)
