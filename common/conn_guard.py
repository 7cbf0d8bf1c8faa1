"""A bound on a server's HTTP connections (the daemon's, each agent's), so a local user
holding connections open cannot make it unreachable.

The daemon's port takes connections from anyone on the machine (``/health``, ``/status`` and
``/metrics`` are public on loopback), and so does an agent's; aiohttp keeps a connection that never sends a
request, or sends only part of its headers, for its keep-alive timeout (an hour by default).
21,000 such connections, no token needed, took every descriptor the daemon had: it answered
nothing, and its housekeeping failed opening /proc. Here:

- a connection idle between requests (or before its first) is closed after
  ``IDLE_TIMEOUT`` s (longer than aiohttp's client keeps its pooled connections, 15 s, so
  an agent's kept connection is never cut just as it is used);
- past ``cap`` open connections, each new one closes the oldest idle one (a request in
  progress, a live event stream among them, is never cut). A flood then churns its own
  connections, and a real client, whose request comes within a millisecond of its connect,
  is served. How many were closed is counted (``tron_http_connections_evicted``), said in
  the log at most once per ``SAY_EVERY`` s, and shown by /status (``http``).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("tron.http")

IDLE_TIMEOUT = 30.0  # s an idle connection is kept (aiohttp's client keeps its pooled ones 15 s)
CAP_MAX = 4096  # open connections at most (a quarter of the descriptor limit, if that is lower)
CAP_MIN = 64
AGAIN_AFTER = 0.01  # s before connections accepted in one turn of the loop are looked at again
SAY_EVERY = 10.0  # s between two log lines about connections closed for room


def default_cap() -> int:
    """A quarter of the descriptors this process may open, within [CAP_MIN, CAP_MAX]: the
    rest are its own (the daemon's: its services' pidfds, pipes, held sockets and beat
    channels, and the registry's; an agent's: its LLM clients' and peers' connections)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return CAP_MAX
    return max(CAP_MIN, min(CAP_MAX, soft // 4))


def _idle(handler: Any) -> bool:
    """Connected, waiting for a request (or for the rest of its headers), none received and
    none being handled: what aiohttp's own keep-alive timeout closes (its ``_waiter`` pending)."""
    waiter = getattr(handler, "_waiter", None)
    return (waiter is not None and not waiter.done() and not getattr(handler, "_messages", True)
            and not getattr(handler, "_request_in_progress", True))


def _closing(handler: Any) -> bool:
    """Closed already (its transport let go), not yet forgotten by the server."""
    return getattr(handler, "transport", None) is None


class ConnectionGuard:
    """Installed on a runner's ``web.Server`` after ``runner.setup()``."""

    def __init__(self, server: web.Server, cap: int | None = None, *,
                 on_evict: Callable[[int], object] | None = None) -> None:
        self.server = server
        self.cap = cap if cap is not None else default_cap()
        self.evicted = 0
        self.peak = 0
        self.on_evict = on_evict  # called with how many were closed (a metric)
        self._unsaid = 0
        self._said_at = float("-inf")
        self._again: asyncio.TimerHandle | None = None
        made = server.connection_made

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._trim(spare_newest=True)

        server.connection_made = connection_made  # type: ignore[method-assign]

    def _connections(self) -> dict[RequestHandler, Any] | list[RequestHandler]:
        """The server's connections, oldest first (its own dict: its length costs nothing)."""
        held = getattr(self.server, "_connections", None)
        return held if isinstance(held, dict) else self.server.connections

    @property
    def open(self) -> int:
        return len(self._connections())

    def _trim(self, *, spare_newest: bool = False) -> None:
        """Close the oldest idle connections until at most ``cap`` are open. One accepted in the
        same turn of the loop has not started waiting for its request yet (so it is not idle):
        if such a one held the count over the cap, this runs again a moment later."""
        self._again = None
        connections = self._connections()
        count = len(connections)
        self.peak = max(self.peak, count)
        over = count - self.cap
        if over <= 0:
            return
        closed = 0
        starting = False
        newest = (next(reversed(connections)) if isinstance(connections, dict) else connections[-1]) \
            if spare_newest else None
        for handler in connections:  # oldest first; nothing here changes the dict (closing is a later callback)
            if over <= 0 or handler is newest:
                break
            if _closing(handler):  # closed for room a moment ago: it is on its way out
                over -= 1
            elif _idle(handler):
                handler.force_close()
                over -= 1
                closed += 1
            elif getattr(handler, "_waiter", True) is None and not getattr(handler, "_request_in_progress", True):
                starting = True
        if over > 0 and starting and self._again is None:
            self._again = asyncio.get_running_loop().call_later(AGAIN_AFTER, self._trim)
        if closed:
            self.evicted += closed
            self._unsaid += closed
            if self.on_evict is not None:
                self.on_evict(closed)
            now = time.monotonic()
            if now - self._said_at >= SAY_EVERY:
                log.warning("more than %d HTTP connections are open: %d idle ones closed to make room (a client "
                            "holding connections open?)", self.cap, self._unsaid,
                            extra={"open": count, "evicted_total": self.evicted})
                self._said_at, self._unsaid = now, 0

    def summary(self) -> dict[str, float]:
        return {"open": self.open, "cap": self.cap, "peak": self.peak, "evicted": self.evicted,
                "idle_timeout": IDLE_TIMEOUT}
