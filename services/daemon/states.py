"""Service lifecycle states as the daemon sees them, and the only legal edges.

    STOPPED  -> STARTING                      (tron up, a respawn after giving up)
    STARTING -> RUNNING                       (answers /health)
    STARTING -> FAILED                        (exited or went silent while starting)
    RUNNING  -> FAILED                        (TRON alert: exit, silence, no progress)
    RUNNING  -> BACKOFF | STARTING            (a restart asked for by a parent)
    FAILED   -> BACKOFF | STARTING            (the parent decided to restart)
    FAILED   -> GIVEN_UP                      (restarts ran out; escalated)
    BACKOFF  -> STARTING                      (the delay is over)
    GIVEN_UP -> STARTING                      (the root respawns it, maybe on another provider)
    any      -> STOPPING -> STOPPED           (tron down)
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    BACKOFF = "backoff"
    GIVEN_UP = "given_up"
    STOPPING = "stopping"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.STOPPED: frozenset({S.STARTING, S.STOPPING}),
    S.STARTING: frozenset({S.RUNNING, S.FAILED, S.STOPPING, S.BACKOFF, S.STARTING}),
    S.RUNNING: frozenset({S.FAILED, S.BACKOFF, S.STARTING, S.STOPPING}),
    S.FAILED: frozenset({S.BACKOFF, S.STARTING, S.GIVEN_UP, S.STOPPING}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPING, S.GIVEN_UP}),
    S.GIVEN_UP: frozenset({S.STARTING, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
}
UP_STATES = frozenset({S.RUNNING})
DOWN_STATES = frozenset({S.STOPPED, S.FAILED, S.GIVEN_UP, S.BACKOFF})


class IllegalTransition(Exception):
    pass


def check(old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{old} -> {new} is not a legal transition")
