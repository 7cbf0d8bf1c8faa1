"""The registry events the web UI shows, followed as the daemon writes them.

The store reads events forwards from an id (``events(since, limit, kind)``), so the feed
keeps one cursor per kind it follows and, on each poll, reads only what is new. What it
keeps is bounded: the events of the last ``window`` seconds (the charts, a service's
recent alerts and operator actions), at most ``MAX_RECENT`` of them, and the ids of the
latest ``RUNS_KEPT`` runs with their tasks (the runs page: the store has no "latest runs"
query). The first poll reads the backlog at most ``PAGES_PER_POLL`` pages per kind at a
time, so a large registry is caught up over a few polls rather than in one long read.

The window is wall-clock time on purpose: it is "the last hour" a person reads on a chart,
and the events of an earlier daemon carry comparable wall times but not clock readings.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime

WINDOW = 3600.0
PAGE = 500
PAGES_PER_POLL = 20
MAX_RECENT = 20_000
RUNS_KEPT = 100
# What the charts, the alert bar and the service pages are made of.
WINDOWED = ("alert_raised", "child_restart", "operator_restart", "escalation", "llm_change", "permanent_failure",
            "recovered", "audit", "crash_loop_started", "crash_loop_ended")
RUN_KINDS = ("run_created", "task_assigned")


def epoch(ts: str) -> float:
    """An event's ISO 8601 UTC time as seconds since the epoch."""
    return datetime.fromisoformat(ts).timestamp()


class EventFeed:
    def __init__(self, events: Callable[[int, int, str], Awaitable[list[dict]]], *,
                 wall: Callable[[], float] = time.time, window: float = WINDOW) -> None:
        self.events = events  # the store's events(since, limit, kind)
        self.wall = wall
        self.window = window
        self._cursor = dict.fromkeys(WINDOWED + RUN_KINDS, 0)
        self._recent: list[dict] = []
        self._runs: OrderedDict[str, list[str]] = OrderedDict()  # run id -> its task ids, oldest run first
        self._lock = asyncio.Lock()

    async def poll(self) -> list[dict]:
        """Read what is new; returns the new windowed events, oldest first."""
        async with self._lock:
            fresh: list[dict] = []
            behind: set[str] = set()
            for kind in self._cursor:
                if kind == "task_assigned" and "run_created" in behind:
                    continue  # a task is kept only with its run: read runs up to date first
                for _ in range(PAGES_PER_POLL):
                    rows = await self.events(self._cursor[kind], PAGE, kind)
                    if rows:
                        self._cursor[kind] = rows[-1]["id"]
                    for row in rows:
                        self._take(row, fresh)
                    if len(rows) < PAGE:
                        break
                else:
                    behind.add(kind)
            cutoff = self.wall() - self.window
            fresh = [e for e in fresh if e["at"] >= cutoff]
            if fresh:
                self._recent = sorted(self._recent + fresh, key=lambda e: e["id"])
            self._recent = [e for e in self._recent if e["at"] >= cutoff][-MAX_RECENT:]
            return sorted(fresh, key=lambda e: e["id"])

    def _take(self, row: dict, fresh: list[dict]) -> None:
        kind = row["kind"]
        if kind == "run_created":
            self._runs[row["run_id"]] = []
            while len(self._runs) > RUNS_KEPT:
                self._runs.popitem(last=False)
        elif kind == "task_assigned":
            tasks = self._runs.get(row["run_id"])
            if tasks is not None:
                tasks.append(row["task_id"])
        else:
            fresh.append({**row, "at": epoch(row["ts"])})

    def recent(self, *kinds: str, agent: str | None = None) -> list[dict]:
        """Kept events of these kinds (all kinds when none are named), newest first."""
        return [e for e in reversed(self._recent)
                if (not kinds or e["kind"] in kinds) and (agent is None or e["agent"] == agent)]

    def runs(self) -> list[str]:
        """The latest runs' ids, newest first."""
        return list(reversed(self._runs))

    def tasks_of(self, run_id: str) -> list[str] | None:
        """A kept run's task ids in the order they were assigned; None for a run not kept."""
        tasks = self._runs.get(run_id)
        return list(tasks) if tasks is not None else None
