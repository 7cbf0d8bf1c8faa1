"""Level 1 of the ladder, shared by every parent (agents and the daemon alike).

``plan_child_failure`` turns an alert and the registry's record (fetched from the
daemon: restart times, what the task has been through) into the request to send: a
``RestartRequest`` for the daemon, or an ``Escalation`` for our own parent. It is pure;
the caller does the I/O.
"""

from __future__ import annotations

import time

from common.config import Policy
from common.models import Alert, Escalation, RestartRequest
from common.policy import Restart, decide_restart


def plan_child_failure(alert: Alert, ladder: dict, policy: Policy, me: str,
                       *, now: float | None = None) -> RestartRequest | Escalation:
    task = ladder.get("task") or {}
    # A provider failure is recorded under its classified reason (overloaded_error,
    # authentication_error, ...); TRON's own signals under theirs.
    reason = alert.detail.get("error_reason") or str(alert.reason)
    decision = decide_restart(
        ladder.get("restart_times", []),
        time.monotonic() if now is None else now,
        policy,
        retryable=alert.retryable,
        already_escalated=bool(task.get("switches")),
        task_restarts=task.get("restarts", 0),
        reason=reason,
    )
    if isinstance(decision, Restart):
        return RestartRequest(
            service=alert.service, replaces=alert.incarnation, alert_id=alert.alert_id, reason=reason,
            detail={**alert.detail, "detected_by": str(alert.reason), "attempt": decision.attempt}, delay=decision.delay, requested_by=me,
            task_id=alert.task_id,
        )
    return Escalation(
        alert_id=alert.alert_id, service=alert.service, incarnation=alert.incarnation, reason=decision.reason,
        detail={**alert.detail, "detected_by": str(alert.reason)}, task_id=alert.task_id, run_id=alert.run_id,
        provider=alert.provider, restarts=decision.restarts, retryable=alert.retryable, path=[me],
    )


def parse_advice(text: str) -> tuple[str | None, str]:
    """The advisor's answer: ('restart' | 'escalate' | None, rationale)."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    if not lines:
        return None, ""
    word = lines[0].split()[0].strip(".:!").upper() if lines[0].split() else ""
    choice = {"RESTART": "restart", "ESCALATE": "escalate"}.get(word)
    return choice, " ".join(lines[1:])[:300]


def apply_advice(plan: RestartRequest | Escalation, advice: str | None, rationale: str,
                 note: str) -> RestartRequest | Escalation:
    """Fold the advisor's answer into the policy's plan. The advisor may only make the
    ladder stricter (escalate early); it can never buy a restart the policy refused."""
    if isinstance(plan, Escalation) or advice is None:
        detail = {**plan.detail, "advice": note}
        return plan.model_copy(update={"detail": detail})
    detail = {**plan.detail, "advice": advice, "rationale": rationale}
    if advice == "restart":
        return plan.model_copy(update={"decided_by": "llm", "detail": detail})
    return Escalation(
        alert_id=plan.alert_id, service=plan.service, incarnation=plan.replaces, reason="llm_advised_escalation",
        detail=detail, task_id=plan.task_id, run_id=None, provider=None, restarts=plan.detail.get("attempt", 1) - 1,
        path=[plan.requested_by], decided_by="llm",
    )
