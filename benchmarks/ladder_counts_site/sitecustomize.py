"""Counting instrumentation for benchmarks/ladder_counts.py, never imported by Tron itself:
that benchmark puts this folder first on PYTHONPATH, so Python's ``site`` loads it in every
process of the mesh it starts (daemon, fork server, agents, CLI). With
TRON_LADDER_COUNTS naming a file, each process appends one line per ``decide()`` call
(``tron.common.ladder.decide``, wrapped before any module imports it by name) and, in the
daemon, one per store read made with a step of the ladder on the call stack (a periodic
read, such as the watchdog's, is not a failure's)."""

from __future__ import annotations

import os
import sys
from typing import Any

_PATH = os.environ.get("TRON_LADDER_COUNTS")
# The daemon's functions on a failure's path: a store read under one of them is the ladder's.
_LADDER = {"on_signal", "deliver", "view", "standing", "restart", "escalation", "decide_here", "ladder_view",
           "_alert_detail", "_crash_loop", "switch", "fail", "park"}


def _log(kind: str, name: str, ctx: str = "") -> None:
    with open(_PATH or os.devnull, "a") as f:
        f.write(f"{os.getpid()} {kind} {name} {ctx}\n")


def _ladder_path() -> str:
    frame = sys._getframe(2)
    names = []
    while frame is not None:
        if frame.f_code.co_name in _LADDER:
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    return ">".join(reversed(names))


def _install() -> None:
    import tron.common.ladder as ladder
    import tron.registry.journal as journal
    from tron.registry.protocol import Route

    decide = ladder.decide

    def counted_decide(event: Any, *args: Any, **kwargs: Any) -> Any:
        decision = decide(event, *args, **kwargs)
        _log("decide", type(event).__name__, decision.case)
        return decision

    ladder.decide = counted_decide  # type: ignore[assignment]
    reads = {name for name, mark in journal.ROUTES.items()
             if mark.route in (Route.MEMORY_READ, Route.FALLBACK_READ, Route.OWNED_READ, Route.DURABLE_READ)}
    getattr_ = journal.JournaledStore.__getattr__

    def counted_getattr(self: Any, name: str) -> Any:
        value = getattr_(self, name)
        if name not in reads:
            return value

        async def read(*args: Any, **kwargs: Any) -> Any:
            path = _ladder_path()
            if path:
                _log("read", name, path)
            return await value(*args, **kwargs)
        return read

    journal.JournaledStore.__getattr__ = counted_getattr  # type: ignore[method-assign]


if _PATH:
    _install()
