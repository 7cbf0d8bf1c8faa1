import random

import pytest

from common.config import Policy
from common.policy import (Escalate, Fail, Restart, SwitchProvider, compute_backoff, decide_restart, decide_switch,
                           restarts_in_window, worst_case_attempts)

P = Policy(max_restarts=3, restart_window=60, backoff_initial=0.5, backoff_factor=2, backoff_max=4,
           backoff_jitter=0, max_provider_switches=3)


@pytest.mark.parametrize("times,now,window,expected", [
    ([], 100, 60, 0),
    ([50, 90, 100], 100, 60, 3),
    ([40, 41, 99], 100, 60, 2),        # 40 is exactly window old: outside
    ([101], 100, 60, 0),                # from the future (clock skew): not counted
])
def test_restarts_in_window(times, now, window, expected):
    assert restarts_in_window(times, now, window) == expected


@pytest.mark.parametrize("prior,expected", [(0, 0.0), (1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)])
def test_backoff_first_restart_is_immediate_then_doubles_to_cap(prior, expected):
    assert compute_backoff(prior, initial=0.5, factor=2, max_backoff=4, jitter=0) == expected


def test_backoff_jitter_stays_within_band_and_varies():
    rng = random.Random(7)
    values = [compute_backoff(2, initial=0.5, factor=2, max_backoff=4, jitter=0.2, rng=rng) for _ in range(200)]
    assert all(0.8 <= v <= 1.2 for v in values)
    assert len(set(values)) > 100


@pytest.mark.parametrize("history,kwargs,expected", [
    ([], {}, Restart(delay=0.0, attempt=1)),
    ([95], {}, Restart(delay=0.5, attempt=2)),
    ([90, 95], {}, Restart(delay=1.0, attempt=3)),
    ([80, 90, 95], {}, Escalate(reason="max_restarts_exceeded", restarts=3)),
    ([10, 20, 30], {}, Restart(delay=0.0, attempt=1)),                       # old restarts left the window
    ([], {"retryable": False, "reason": "authentication_error"},
     Escalate(reason="non_retryable:authentication_error", restarts=0)),
    ([], {"already_escalated": True}, Escalate(reason="task_already_escalated", restarts=0)),
    ([10, 20], {"task_restarts": 3}, Escalate(reason="max_restarts_exceeded", restarts=3)),  # slow runaway
])
def test_decide_restart(history, kwargs, expected):
    assert decide_restart(history, 100.0, P, **kwargs) == expected


@pytest.mark.parametrize("switches,provider,expected", [
    (0, "anthropic", SwitchProvider("ollama", 1)),
    (1, "ollama", SwitchProvider("anthropic", 2)),
    (2, "anthropic", SwitchProvider("ollama", 3)),
    (3, "ollama", Fail("max_provider_switches_exceeded")),
])
def test_decide_switch(switches, provider, expected):
    assert decide_switch(switches, provider, P) == expected


def test_worst_case_attempts():
    assert worst_case_attempts(P) == 7
