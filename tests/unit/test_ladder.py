"""Level-1 planning and the optional advisor: pure functions, table-driven."""

import pytest

from common.config import Policy
from common.ladder import apply_advice, parse_advice, plan_child_failure
from common.models import Alert, Escalation, RestartRequest

P = Policy(max_restarts=3, restart_window=60, backoff_jitter=0)


def alert(**kw):
    base = dict(alert_id="a-1", service="programmer-1", incarnation="i-1", reason="process_exit",
                detail={"exit_code": None, "signal": 9}, task_id="t-1", run_id="r-1", provider="anthropic")
    return Alert(**{**base, **kw})


@pytest.mark.parametrize("ladder,kw,kind,reason", [
    ({"restart_times": []}, {}, RestartRequest, "process_exit"),
    ({"restart_times": [95, 96, 97]}, {}, Escalation, "max_restarts_exceeded"),
    ({"restart_times": [], "task": {"switches": 1, "restarts": 3}}, {}, Escalation, "task_already_escalated"),
    ({"restart_times": []}, {"reason": "provider_failure", "retryable": False,
                             "detail": {"error_reason": "authentication_error"}},
     Escalation, "non_retryable:authentication_error"),
    ({"restart_times": []}, {"reason": "provider_failure", "detail": {"error_reason": "overloaded_error"}},
     RestartRequest, "overloaded_error"),
])
def test_plan_child_failure(ladder, kw, kind, reason):
    plan = plan_child_failure(alert(**kw), ladder, P, "director-code", now=100.0)
    assert isinstance(plan, kind)
    assert plan.reason == reason
    if isinstance(plan, RestartRequest):
        assert plan.replaces == "i-1" and plan.requested_by == "director-code" and plan.task_id == "t-1"
    else:
        assert plan.path == ["director-code"] and plan.detail["detected_by"] == alert(**kw).reason


@pytest.mark.parametrize("text,expected", [
    ("RESTART\nit crashed once", ("restart", "it crashed once")),
    ("escalate.\nprovider is down\nfor good", ("escalate", "provider is down for good")),
    ("maybe?", (None, "")),
    ("", (None, "")),
])
def test_parse_advice(text, expected):
    assert parse_advice(text) == expected


def test_advice_can_escalate_early_but_never_buy_a_restart():
    restart = plan_child_failure(alert(), {"restart_times": []}, P, "director-code", now=100.0)
    kept = apply_advice(restart, "restart", "transient", "ok")
    assert isinstance(kept, RestartRequest) and kept.decided_by == "llm" and kept.detail["rationale"] == "transient"
    early = apply_advice(restart, "escalate", "provider is down", "ok")
    assert isinstance(early, Escalation) and early.decided_by == "llm" and early.reason == "llm_advised_escalation"
    refused = plan_child_failure(alert(), {"restart_times": [95, 96, 97]}, P, "director-code", now=100.0)
    still = apply_advice(refused, "restart", "try again", "ok")
    assert isinstance(still, Escalation) and still.decided_by == "policy"
    silent = apply_advice(restart, None, "", "timeout after 2.0s")
    assert isinstance(silent, RestartRequest) and silent.decided_by == "policy"
    assert silent.detail["advice"] == "timeout after 2.0s"
