"""The shapes the registry hands out, for the type checker (`make typecheck`).

A row of a table is a ``Row``: column name -> value, as the engine returned it (SQLite and
PostgreSQL columns hold text, numbers or NULL; a JSON column is decoded where a method
says so), so its values are ``Any``. What a method computes rather than reads has a fixed
shape and a ``TypedDict`` of its own. No import here costs anything: the CLI reads this.
"""

from __future__ import annotations

from typing import Any, TypedDict

Row = dict[str, Any]
Args = tuple[object, ...]  # a statement's ``?`` parameters, in order


class TaskCounts(TypedDict):
    """How far up the ladder a task has gone (``Store.task_counts``)."""

    restarts: int
    switches: int
    escalations: int
    failed: bool


class Spend(TypedDict):
    """What a run, a task or a service has spent (``Store.spend``)."""

    usd: float
    calls: int
    tokens: int
