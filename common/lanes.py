"""Lanes: a breaker that stops the next tasks from burning the same ladder again.

A *fingerprint* names a way of failing: (role, provider, failure class, normalised
reason), the reason with ids, numbers, timestamps and secrets taken out, so "timeout
after 30.2s on task run-7f3.0.1" and "timeout after 29.8s on task run-01c.0.0" are one.
It is taken when a task's ladder *ends* in permanent failure, never on single attempts:
a provider outage still gets its provider switch.

A *lane* is a role (every service of the role, e.g. "programmer"). A role, not a service:
the fingerprint names the role and provider, and a failure that repeats across a role's
services (a prompt the model cannot answer, a provider down for that kind of work) is
exactly what one service's restart cannot fix; a single broken service is the crash-loop
detector's business. When one fingerprint reaches ``lane_trip_count`` within
``lane_window``, its lane is paused: new tasks for the role are refused with a structured
``lane_paused`` reason, so the run fails fast instead of climbing the ladder again, until
an operator resumes it. Trips older than the window no longer count.

Pure functions of (trips, now, policy): every rule is a line of a unit-test table.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tron.common.redaction import redact
from tron.common.states import LaneState

_NORMALISE = (
    (re.compile(r"\b\d{4}-\d\d-\d\dT[\d:.]+Z?\b"), "<time>"),  # ISO timestamps
    (re.compile(r"\b(?:run|i|a|op|t|task)-[0-9a-f]{6,}(?:\.[0-9]+)*\b"), "<id>"),  # our ids
    (re.compile(r"\b[0-9a-f]{8,}\b"), "<hex>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
    (re.compile(r"\s+"), " "),
)


def normalise(reason: str) -> str:
    """A reason with what varies from one occurrence to the next taken out."""
    text = redact(reason or "").replace("[REDACTED]", "<secret>")
    for pattern, replacement in _NORMALISE:
        text = pattern.sub(replacement, text)
    return text.strip().lower()[:200]


@dataclass(frozen=True)
class Fingerprint:
    role: str
    provider: str
    failure_class: str
    reason: str

    @classmethod
    def of(cls, role: str, provider: str | None, failure_class: str, reason: str) -> "Fingerprint":
        return cls(role, provider or "-", failure_class or "-", normalise(reason))

    @property
    def key(self) -> str:
        """Short and stable: what the registry and the operators quote."""
        text = "|".join((self.role, self.provider, self.failure_class, self.reason))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def lane(self) -> str:
        return self.role

    def describe(self) -> str:
        return f"{self.role} on {self.provider}: {self.failure_class}: {self.reason}"


def recent(trip_times: list[float], now: float, window: float) -> list[float]:
    """The trips that still count: within ``(now - window, now]``."""
    return [t for t in trip_times if now - window < t <= now]


def trips_now(trip_times: list[float], now: float, window: float, trip_count: int) -> bool:
    """Does this fingerprint pause its lane now?"""
    return len(recent(trip_times, now, window)) >= trip_count


def every_lane(known: Iterable[Mapping[str, object]], roles: Iterable[str]) -> list[Mapping[str, object]]:
    """Every lane of the mesh (a lane is a role), as GET /lanes shows it: its registry row,
    or open when it never had one."""
    rows = {row["lane"]: row for row in known}
    return [rows.get(role) or {"lane": role, "state": str(LaneState.OPEN), "fingerprint": None, "reason": None,
                               "changed_by": None, "changed_at": None} for role in sorted(set(roles))]
