"""The registry events the web UI shows, followed as the daemon writes them.

The store reads events forwards from an id (``events(since, limit, kind)``), so the feed
keeps one cursor per kind it follows and, on each poll, reads only what is new. What it
keeps is bounded: the events of the last ``window`` seconds (the charts, a service's
recent alerts and operator actions), at most ``MAX_RECENT`` of them. The first poll reads
the backlog at most ``PAGES_PER_POLL`` pages per kind at a time, so a large registry is
caught up over a few polls rather than in one long read. (Runs and their tasks are not
followed here: the pages ask the store, ``runs(limit)`` and ``tasks_of_run(run_id)``.)

The window is wall-clock time on purpose: it is "the last hour" a person reads on a chart,
and the events of an earlier daemon carry comparable wall times but not clock readings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

WINDOW = 3600.0
PAGE = 500
PAGES_PER_POLL = 20
MAX_RECENT = 20_000
# What the charts, the alert bar and the service pages are made of.
WINDOWED = ("alert_raised", "child_restart", "operator_restart", "escalation", "llm_change", "permanent_failure",
            "recovered", "audit", "crash_loop_started", "crash_loop_ended")


def epoch(ts: str) -> float:
    """An event's ISO 8601 UTC time as seconds since the epoch."""
    return datetime.fromisoformat(ts).timestamp()


class EventFeed:
    def __init__(self, events: Callable[[int, int, str], Awaitable[list[dict]]], *,
                 wall: Callable[[], float] = time.time, window: float = WINDOW) -> None:
        self.events = events  # the store's events(since, limit, kind)
        self.wall = wall
        self.window = window
        self._cursor = dict.fromkeys(WINDOWED, 0)
        self._recent: list[dict] = []
        self._lock = asyncio.Lock()

    async def poll(self) -> list[dict]:
        """Read what is new; returns the new windowed events, oldest first."""
        async with self._lock:
            fresh: list[dict] = []
            for kind in self._cursor:
                for _ in range(PAGES_PER_POLL):
                    rows = await self.events(self._cursor[kind], PAGE, kind)
                    if rows:
                        self._cursor[kind] = rows[-1]["id"]
                    fresh += ({**row, "at": epoch(row["ts"])} for row in rows)
                    if len(rows) < PAGE:
                        break
            cutoff = self.wall() - self.window
            fresh = [e for e in fresh if e["at"] >= cutoff]
            if fresh:
                self._recent = sorted(self._recent + fresh, key=lambda e: e["id"])
            self._recent = [e for e in self._recent if e["at"] >= cutoff][-MAX_RECENT:]
            return sorted(fresh, key=lambda e: e["id"])

    def recent(self, *kinds: str, agent: str | None = None) -> list[dict]:
        """Kept events of these kinds (all kinds when none are named), newest first."""
        return [e for e in reversed(self._recent)
                if (not kinds or e["kind"] in kinds) and (agent is None or e["agent"] == agent)]
