"""The ladder's decisions as pure functions of (history, now, policy).

Escalation is a return value, not an exception path (as in OTP's supervisor): a parent
asks ``decide_restart`` and gets ``Restart(delay)`` or ``Escalate(reason)``; the root asks
``decide_switch`` and gets ``SwitchProvider(to)`` or ``Fail(reason)``. Nothing here
sleeps, reads a clock or does I/O, so every rule is a table of cases in the unit tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable

from common.config import Policy


@dataclass(frozen=True)
class Restart:
    delay: float
    attempt: int  # 1 for the first restart in the window


@dataclass(frozen=True)
class Escalate:
    reason: str
    restarts: int


@dataclass(frozen=True)
class SwitchProvider:
    to_provider: str
    attempt: int  # 1 for the first switch of this task


@dataclass(frozen=True)
class Fail:
    reason: str


RestartDecision = Restart | Escalate
RootDecision = SwitchProvider | Fail


def restarts_in_window(times: Iterable[float], now: float, window: float) -> int:
    """How many restarts at monotonic ``times`` fall in ``(now - window, now]``."""
    return sum(1 for t in times if now - window < t <= now)


def compute_backoff(
    prior: int,
    *,
    initial: float,
    factor: float,
    max_backoff: float,
    jitter: float,
    rng: random.Random | None = None,
) -> float:
    """Delay before a restart, given the restarts already made in the window.

    Parameters: ``prior`` restarts already made; ``jitter`` is the fraction of the delay
    that is randomised (0.2 means +-20 %).
    Returns: 0 for the first restart (a crash is restarted at once: backoff exists for
    repeated failures), then ``initial * factor**(prior-1)`` capped at ``max_backoff``
    with jitter applied after the cap, never below zero.
    """
    if prior <= 0:
        return 0.0
    delay = min(initial * factor ** (prior - 1), max_backoff)
    if jitter and delay:
        r = (rng or random).uniform(-jitter, jitter)
        delay = max(0.0, delay * (1 + r))
    return delay


def decide_restart(
    restart_times: Iterable[float],
    now: float,
    policy: Policy,
    *,
    retryable: bool = True,
    already_escalated: bool = False,
    task_restarts: int = 0,
    reason: str = "",
    rng: random.Random | None = None,
) -> RestartDecision:
    """Level 1: restart the child again, or hand the failure to our own parent.

    - a failure that retrying cannot fix (authentication, invalid request) goes up at once;
    - a task already handed to the root (it has been switched to another provider)
      goes back to the root rather than through another round of restarts;
    - otherwise restart while fewer than ``max_restarts`` fall in the window, and the
      task itself has had fewer than ``max_restarts`` (a slow runaway must not slip
      under the window and restart forever).
    """
    recent = restarts_in_window(restart_times, now, policy.restart_window)
    if not retryable:
        return Escalate(reason=f"non_retryable:{reason}" if reason else "non_retryable", restarts=recent)
    if already_escalated:
        return Escalate(reason="task_already_escalated", restarts=recent)
    if recent >= policy.max_restarts or task_restarts >= policy.max_restarts:
        return Escalate(reason="max_restarts_exceeded", restarts=max(recent, task_restarts))
    delay = compute_backoff(
        recent,
        initial=policy.backoff_initial,
        factor=policy.backoff_factor,
        max_backoff=policy.backoff_max,
        jitter=policy.backoff_jitter,
        rng=rng,
    )
    return Restart(delay=delay, attempt=recent + 1)


def other_provider(provider: str) -> str:
    return "ollama" if provider == "anthropic" else "anthropic"


def decide_switch(switches_so_far: int, current_provider: str, policy: Policy) -> RootDecision:
    """Level 2/3 at the root: try the other provider, or declare the task failed."""
    if switches_so_far >= policy.max_provider_switches:
        return Fail(reason="max_provider_switches_exceeded")
    return SwitchProvider(to_provider=other_provider(current_provider), attempt=switches_so_far + 1)


def worst_case_attempts(policy: Policy) -> int:
    """Upper bound on attempts per task: the first, every restart, every switch."""
    return 1 + policy.max_restarts + policy.max_provider_switches
