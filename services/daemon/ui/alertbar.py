"""What the orange TRON bar shows: the alerts that are open now.

An alert is open while its registry row is not ``handled`` (``store.open_alerts()``), and,
once handled, until the service it is about is back: running again, or stopped by an
operator. A later failure of the service (its ``last_failure`` names another alert) is that
alert's incident: it does not reopen this one. The registry marks an alert handled when the
decision is taken (the restart is recorded), which is milliseconds after TRON raised it;
the failure is over for the operator only when the new incarnation answers. So the bar
follows the incident, not the row.

A failure that is detected, decided and recovered between two frames of the UI would
never be seen at all, so an incident stays on the bar ``hold`` seconds after it is over,
marked ``recovered``; then it is gone. Incidents come from three places, so none is
missed: the registry's open alerts, its ``alert_raised`` events, and the daemon's last
alert (read every frame, in memory).

Pure: ``update`` takes the clock reading and the current views, and returns what to show.
"""

from __future__ import annotations

from dataclasses import dataclass

HOLD = 5.0       # seconds an incident stays on the bar after it is over
FRESH = 30.0     # an alert raised longer ago than this and already over is history, not news
MAX_TRACKED = 50


@dataclass
class Incident:
    alert_id: str
    service: str
    reason: str
    since: str                       # ISO 8601 wall time it was raised
    over_at: float | None = None     # clock reading when it was first seen over

    @property
    def open(self) -> bool:
        return self.over_at is None


class AlertBar:
    def __init__(self, *, hold: float = HOLD, fresh: float = FRESH) -> None:
        self.hold = hold
        self.fresh = fresh
        self.incidents: dict[str, Incident] = {}

    def raised(self, alert_id: str, service: str, reason: str, since: str, *, age: float) -> None:
        """An alert seen raised ``age`` seconds ago (an event, or the daemon's last alert)."""
        if alert_id not in self.incidents and age <= self.fresh and len(self.incidents) < MAX_TRACKED:
            self.incidents[alert_id] = Incident(alert_id, service, reason, since)

    def update(self, now: float, open_alerts: list[dict], services: dict[str, dict]) -> list[Incident]:
        """The incidents to show: those still open first, then those recovered, the newest
        first in each (the bar shows three and counts the rest: in a crash wave of twenty, the
        three it shows are failures going on now, not the first ones, long recovered).
        ``open_alerts`` are the registry's alert rows not handled; ``services`` the daemon's
        service rows by name."""
        open_ids = set()
        for row in open_alerts:
            open_ids.add(row["alert_id"])
            if row["alert_id"] not in self.incidents:
                self.incidents[row["alert_id"]] = Incident(row["alert_id"], row["agent"], row["reason"],
                                                           row["created_at"])
        for alert_id, inc in list(self.incidents.items()):
            svc = services.get(inc.service)
            back = svc is None or svc["stopped"] or svc["state"] == "running"
            latest = (svc.get("last_failure") or {}).get("alert") if svc is not None else None
            ours = svc is not None and latest in (None, alert_id)
            if alert_id in open_ids or (not back and ours):
                inc.over_at = None
            elif not back and inc.over_at is None:
                # Its service failed again before it was ever back (a crash loop, a spawn that
                # keeps failing): nothing recovered. The newer incident is the failure now; until
                # the bar has it, this one stays open.
                if latest in self.incidents:
                    del self.incidents[alert_id]
            elif inc.over_at is None:
                inc.over_at = now
            elif now - inc.over_at > self.hold:
                del self.incidents[alert_id]
        newest = sorted(self.incidents.values(), key=lambda i: (i.since, i.alert_id), reverse=True)
        return sorted(newest, key=lambda i: not i.open)  # stable: newest first within each
