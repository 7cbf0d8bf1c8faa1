"""Which task an agent's heartbeat carries (common/agent.py ``carried_task``): TRON judges
that task's progress and wall clock, so a task stuck in a loop must never hide behind an
older one that waits on its children (the chaos drill's runaway on a director, once)."""

from __future__ import annotations

import pytest

from tron.common.agent import Task, carried_task
from tron.common.models import Reason, TaskAssign
from tron.common.monitor import Monitor


def task(task_id: str, started: float, *, waiting: int = 0, progress: str | None = None) -> Task:
    assign = TaskAssign(task_id=task_id, run_id="r", kind="k", prompt="p", reply_to="parent")
    return Task(assign, started=started, progress=progress, waiting=waiting)


A, B, C = "a", "b", "c"  # started in that order


@pytest.mark.parametrize("tasks, current, carried", [
    ({}, None, None),
    ({A: 0}, None, A),
    ({A: 1}, None, A),  # it waits, and nothing else runs: it is carried, saying it waits
    ({A: 0, B: 0}, None, A),  # the oldest
    ({A: 0, B: 0}, B, B),  # kept while it works, though an older one runs too
    ({A: 1, B: 0}, A, B),  # the older one waits on its children: the beat goes to the one working
    ({A: 0, B: 0}, B, B),  # ... and stays there when the older one works again
    ({A: 0, C: 0}, B, A),  # the one carried ended: the oldest that works
    ({A: 1, B: 0, C: 0}, A, B),  # the oldest of those that work
    ({A: 1, B: 1}, B, B),  # every one waits: the one carried is kept
    ({A: 1, B: 1}, C, A),  # every one waits, the one carried ended: the oldest
])
def test_the_beat_carries_the_task_kept_while_it_works_else_the_oldest_working(tasks, current, carried):
    started = {A: 1.0, B: 2.0, C: 3.0}
    got = carried_task([task(t, started[t], waiting=w) for t, w in tasks.items()], current)
    assert (got.id if got else None) == carried


def test_a_runaway_beside_an_older_task_that_keeps_delegating_is_caught_as_no_progress():
    """A director's older task waits on a child, works a moment, waits again, for ever; a
    newer task is stuck (its progress never moves). Beat by beat, through the real monitor:
    the stuck task's no_progress fires within progress_timeout of the older task's first
    wait, and names the stuck task. (With the oldest task always carried, it never did:
    the older task's waits and steps kept moving the clocks TRON judged.)"""
    m = Monitor()
    progress_timeout = 10.0
    m.watch("director", "i-1", 0.0, beat_timeout=3.0, progress_timeout=progress_timeout, task_timeout=600.0)
    older = task("run.1", 1.0, progress="step 1")
    stuck = task("runaway", 2.0, progress="runaway:stuck")
    carried: str | None = None
    fired = []
    for second in range(1, 61):
        now = float(second)
        older.waiting = second % 3 != 0  # waits two beats of three on its child, then takes a step
        if not older.waiting:
            older.progress = f"step {second}"
        chosen = carried_task([older, stuck], carried)
        assert chosen is not None
        carried = chosen.id
        m.beat("director", "i-1", second, now, task_id=chosen.id, progress=chosen.progress,
               waiting=chosen.waiting > 0)
        fired += m.tick(now)
        if fired:
            break
    [signal] = fired
    assert (signal.reason, signal.task_id) == (Reason.NO_PROGRESS, "runaway")
    assert signal.fired_at <= 1.0 + progress_timeout + 1.0  # the older task first waited at 1 s
