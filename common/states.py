"""Every state machine of Tron: its states, its legal edges, and the check every
transition goes through.

One module, stdlib only, so that the daemon, the registry (its CHECK constraints and the
report's queries), the live view and the drills all import the same names instead of
retyping strings (supervisord's ``states.py``). Each owner performs its transitions in
one function that calls ``Machine.check`` first, then records and logs the change:

    service  services/daemon/supervisor.py  Supervisor.transition
    session, task, run, alert, lane   registry/store.py  one ``set_*_state`` each

Service (a long-lived process; always brought back unless an operator stopped it):

    STOPPED  -> STARTING                (tron up, tron start NAME)
    STARTING -> RUNNING                 (the new incarnation is healthy)
    STARTING -> FAILED                  (exited, never healthy, or could not be spawned)
    STARTING -> STARTING                (an adopted process is re-checked)
    RUNNING  -> FAILED                  (a TRON alert: exit, silence, no progress, probe)
    RUNNING  -> STARTING                (a deliberate restart: operator, provider switch)
    FAILED   -> BACKOFF | STARTING      (the ladder restarts it, after a delay or at once)
    BACKOFF  -> STARTING                (the delay is over)
    any but STOPPED -> STOPPING -> STOPPED   (tron stop NAME, tron down)

Task (a unit of work; bounded attempts, it always ends):

    ASSIGNED  -> RUNNING -> DONE | FAILED | CANCELLED
    RUNNING | ASSIGNED -> ASSIGNED      (its agent was restarted: the next attempt)
    ASSIGNED | RUNNING -> ESCALATED     (held while the failure climbs the tree)
    ESCALATED -> ASSIGNED               (the root switched provider: the next attempt)
    ESCALATED -> FAILED | CANCELLED     (permanent failure; an operator)
    ASSIGNED | RUNNING -> PARKED        (every provider down, or its budget spent: it waits at its checkpoint)
    ESCALATED -> PARKED                 (the human rung: it waits for an operator before failing for good)
    PARKED -> RUNNING                   (a provider is usable again: it goes on where it was)
    PARKED -> ASSIGNED | FAILED | CANCELLED | DONE   (its agent restarted; park_max; an operator)
    PARKED -> ESCALATED                 (its agent died and the failure climbs)
    FAILED | CANCELLED -> ASSIGNED      (an operator retries it)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set as AbstractSet
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar


class IllegalTransition(Exception):
    """An edge the machine's table does not have; nothing was changed."""


class ServiceState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    BACKOFF = "backoff"
    STOPPING = "stopping"


class SessionState(StrEnum):
    """One row per incarnation. INTENT is written before the process exists, so a
    daemon killed between fork and record still knows what it may have started."""

    INTENT = "intent"
    STARTING = "starting"
    RUNNING = "running"
    ENDED = "ended"


class TaskState(StrEnum):
    ASSIGNED = "assigned"
    RUNNING = "running"
    ESCALATED = "escalated"
    PARKED = "parked"  # waiting, in its agent, for a provider (or a budget, or an operator)
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AlertState(StrEnum):
    PENDING = "pending"          # persisted, not yet taken by anyone
    DELIVERED = "delivered"      # an ancestor took it and acted
    HANDLED = "handled"          # a decision was carried out
    UNDELIVERABLE = "undeliverable"  # every ancestor failed to take it (the daemon then decides)


class ProviderState(StrEnum):
    """An LLM provider as the whole mesh sees it (a circuit breaker, as LiteLLM's cooldowns
    and Hystrix's are, shared by every agent through the daemon)."""

    CLOSED = "closed"        # requests go through
    OPEN = "open"            # down, rate-limited or drained: nobody sends to it until ``until``
    HALF_OPEN = "half_open"  # the cooldown is over: one request goes through as a probe


class LaneState(StrEnum):
    OPEN = "open"
    PAUSED = "paused"


class RetryType(StrEnum):
    """The kind of a ``retry_history`` row: one step of the ladder."""

    CHILD_RESTART = "child_restart"
    ESCALATION = "escalation"
    LLM_CHANGE = "llm_change"
    PERMANENT_FAILURE = "permanent_failure"
    OPERATOR_RESTART = "operator_restart"
    # Level 1 for a provider failure: the task is tried again on the same provider, in the
    # same incarnation (no kill), after max(retry-after, backoff).
    PROVIDER_RETRY = "provider_retry"


# A machine's states: one StrEnum, so a task's machine cannot be handed a service's state.
_State = TypeVar("_State", bound=StrEnum)


@dataclass(frozen=True)
class Machine(Generic[_State]):
    name: str
    edges: Mapping[_State, AbstractSet[_State]]

    def allowed(self, old: _State, new: _State) -> bool:
        return new in self.edges.get(old, ())

    def check(self, old: _State, new: _State) -> None:
        if not self.allowed(old, new):
            raise IllegalTransition(f"{self.name}: {old} -> {new} is not a legal transition")

    def sources(self, new: _State) -> list[str]:
        """The states from which ``new`` can be reached (for guarded SQL updates)."""
        return [str(old) for old, targets in self.edges.items() if new in targets]


Sv, Se, T, R, A, L, P = ServiceState, SessionState, TaskState, RunState, AlertState, LaneState, ProviderState

SERVICE = Machine("service", {
    Sv.STOPPED: {Sv.STARTING},
    Sv.STARTING: {Sv.RUNNING, Sv.FAILED, Sv.STARTING, Sv.STOPPING},
    Sv.RUNNING: {Sv.FAILED, Sv.STARTING, Sv.STOPPING},
    Sv.FAILED: {Sv.BACKOFF, Sv.STARTING, Sv.STOPPING},
    Sv.BACKOFF: {Sv.STARTING, Sv.STOPPING},
    Sv.STOPPING: {Sv.STOPPED},
})

SESSION = Machine("session", {
    Se.INTENT: {Se.STARTING, Se.ENDED},
    Se.STARTING: {Se.RUNNING, Se.ENDED},
    Se.RUNNING: {Se.ENDED},
})

TASK = Machine("task", {
    T.ASSIGNED: {T.ASSIGNED, T.RUNNING, T.ESCALATED, T.PARKED, T.DONE, T.FAILED, T.CANCELLED},
    T.RUNNING: {T.ASSIGNED, T.ESCALATED, T.PARKED, T.DONE, T.FAILED, T.CANCELLED},
    T.PARKED: {T.RUNNING, T.ASSIGNED, T.ESCALATED, T.DONE, T.FAILED, T.CANCELLED},
    T.ESCALATED: {T.ASSIGNED, T.PARKED, T.FAILED, T.CANCELLED},
    T.FAILED: {T.ASSIGNED},
    T.CANCELLED: {T.ASSIGNED},
})

RUN = Machine("run", {
    R.RUNNING: {R.DONE, R.FAILED, R.CANCELLED},
    R.FAILED: {R.RUNNING},       # an operator retries one of its tasks
    R.CANCELLED: {R.RUNNING},
})

ALERT = Machine("alert", {
    A.PENDING: {A.DELIVERED, A.HANDLED, A.UNDELIVERABLE},
    A.DELIVERED: {A.HANDLED, A.UNDELIVERABLE},
    A.UNDELIVERABLE: {A.HANDLED},
})

LANE = Machine("lane", {
    L.OPEN: {L.PAUSED},
    L.PAUSED: {L.OPEN},
})

# Provider (common/provider_health.py, Board._to):
#   CLOSED -> OPEN          (provider_fail_threshold failures in a row; a retry-after; drained)
#   OPEN -> HALF_OPEN       (the cooldown or the hold is over)
#   HALF_OPEN -> CLOSED     (the probe succeeded)
#   HALF_OPEN -> OPEN       (the probe failed: a longer cooldown)
#   OPEN | HALF_OPEN -> CLOSED   (an operator restored it)
PROVIDER = Machine("provider", {
    P.CLOSED: {P.OPEN},
    P.OPEN: {P.HALF_OPEN, P.CLOSED, P.OPEN},
    P.HALF_OPEN: {P.CLOSED, P.OPEN},
})

UP_SERVICE_STATES = frozenset({Sv.RUNNING})
OPEN_TASK_STATES = frozenset({T.ASSIGNED, T.RUNNING, T.PARKED})  # leased to (or waiting in) an incarnation
LIVE_TASK_STATES = frozenset({T.ASSIGNED, T.RUNNING, T.PARKED, T.ESCALATED})
FINAL_TASK_STATES = frozenset({T.DONE, T.FAILED, T.CANCELLED})
OPEN_SESSION_STATES = frozenset({Se.INTENT, Se.STARTING, Se.RUNNING})
OPEN_ALERT_STATES = frozenset({A.PENDING, A.DELIVERED, A.UNDELIVERABLE})


# A task parked for its budget or for an operator waits for people: an agent's restart does
# not hand it to the next incarnation (only `tron run budget` / `tron task approve` do).
PEOPLE_PARKS = ("budget_exceeded", "awaiting_operator")


def waits_for_people(task: Mapping[str, object]) -> bool:
    """A task row parked for its budget or for an operator (``PEOPLE_PARKS``)."""
    return task.get("status") == T.PARKED and task.get("parked_reason") in PEOPLE_PARKS


def waits_for_a_decision(task: Mapping[str, object]) -> bool:
    """A task row no incarnation may take until someone decides: parked for people, or held
    by the ladder for the top's decision (escalated). A replica scaled away hands these to a
    sibling as they are."""
    return waits_for_people(task) or task.get("status") == T.ESCALATED


def sql_in(states: Iterable[str]) -> str:
    """``('a','b')`` for a SQL ``IN`` clause or CHECK constraint, from enum members."""
    return "(" + ",".join(f"'{s}'" for s in sorted(str(x) for x in states)) + ")"
