"""The lane breaker in the daemon: counts the ways tasks fail for good, pauses a role's
lane when one repeats (common/lanes.py has the rule), and refuses new tasks for a paused
lane or a paused service with a structured reason."""

from __future__ import annotations

import logging
from typing import Callable

from tron.common.clock import Clock
from tron.common.config import Policy
from tron.common.lanes import Fingerprint, recent, trips_now
from tron.common.states import LaneState
from tron.registry.protocol import Store
from tron.services.daemon.metrics import DaemonMetrics
from tron.services.daemon.supervisor import Supervisor, new_id

log = logging.getLogger("tron.daemon")


def lane_agent(lane: str) -> str:
    """The ``agent`` of a paused lane's alert row."""
    return f"lane:{lane}"


class Breaker:
    def __init__(self, sup: Supervisor, store: Store, *, clock: Clock, policy: Callable[[], Policy],
                 metrics: DaemonMetrics) -> None:
        self.sup = sup
        self.store = store
        self.clock = clock
        self.policy = policy
        self.metrics = metrics

    async def task_failed(self, service: str, provider: str | None, failure_class: str, reason: str, *,
                          task_id: str, run_id: str | None) -> dict:
        """A task's ladder ended in permanent failure: one trip of its fingerprint. The
        lane pauses when the fingerprint has tripped lane_trip_count times in the window."""
        fp = Fingerprint.of(self.sup[service].spec.role, provider, failure_class, reason)
        times = await self.store.record_trip(fp.key, fp.lane, fp.describe(), task_id=task_id, run_id=run_id)
        p = self.policy()
        counted = len(recent(times, self.clock.now(), p.lane_window))
        if not trips_now(times, self.clock.now(), p.lane_window, p.lane_trip_count):
            return {"fingerprint": fp.key, "trips": counted, "paused": False}
        reason_text = f"{counted} tasks failed for good the same way within {p.lane_window:.0f}s: {fp.describe()}"
        paused = await self.store.set_lane(fp.lane, LaneState.PAUSED, fingerprint=fp.key, reason=reason_text,
                                           by="breaker")
        if paused:
            self.metrics.lanes_paused.inc()
            log.error("lane paused", extra={"lane": fp.lane, "fingerprint": fp.key, "reason": reason_text})
            await self._alert(fp, reason_text, service, task_id=task_id, run_id=run_id)
        return {"fingerprint": fp.key, "trips": counted, "paused": True, "lane": fp.lane}

    async def _alert(self, fp: Fingerprint, reason_text: str, service: str, *, task_id: str,
                     run_id: str | None) -> None:
        """A paused lane is an open alert for the operator (the orange bar, the report):
        its agent is ``lane:<role>``, not a service, so no restart or backoff counts it;
        it is handled when the lane is resumed (operators.py)."""
        alert_id = new_id("a-")
        await self.store.insert_alert({"alert_id": alert_id, "service": lane_agent(fp.lane), "incarnation": alert_id,
                                       "reason": "lane_paused", "task_id": task_id, "run_id": run_id,
                                       "detail": {"lane": fp.lane, "fingerprint": fp.key, "reason": reason_text,
                                                  "service": service}}, stable=True)
        await self.store.alert_delivered(alert_id, "operator")
        self.metrics.alerts.labels(reason="lane_paused").inc()

    async def refusal(self, agent: str, *, given_to: str | None = None) -> dict | None:
        """Why a new task for ``agent`` must be refused now, if it must. ``given_to``: the
        replicated service the task was given to (``agent`` is the replica picked for it,
        picked among those that take tasks when any does): the refusal is in its name."""
        svc, named = self.sup[agent], given_to or agent
        if svc.stopped:  # nothing would run it until `tron start`: refused now, not held forever
            return {"reason": "service_stopped", "service": named,
                    "message": f"{named} is stopped by an operator: no new tasks (`tron start {named}`)"}
        if svc.paused:
            return {"reason": "service_paused", "service": named,
                    "message": f"{named} is paused by an operator: no new tasks (`tron resume {named}`)"}
        lane = await self.store.lane(svc.spec.role)
        if lane and lane["state"] == LaneState.PAUSED:
            return {"reason": "lane_paused", "lane": lane["lane"], "fingerprint": lane["fingerprint"],
                    "message": f"lane {lane['lane']} is paused: {lane['reason']} "
                               f"(`tron lane resume {lane['lane']}`)"}
        return None
