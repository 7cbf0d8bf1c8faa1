"""Server-sent events for the web UI: one bounded queue per connection, one publisher.

The daemon must never wait on a browser. ``Hub.publish`` only puts into queues
(``put_nowait``), so a publisher is never blocked; a client whose queue is full is too slow
to follow and is dropped: its queue is emptied and given the end marker, its handler
returns and the connection closes. The browser's EventSource reconnects and is sent the
current state again, which is all a dashboard needs. A client that went away is noticed
within ``CHECK_EVERY`` seconds, even when nothing is being published.

    hub = Hub(max_clients=200, queue_size=64)
    stream(request, hub, topics, on_open)   # the aiohttp handler body of GET /ui/events
    hub.publish("mesh", "mesh", html)        # to every client subscribed to topic "mesh"

A stream lives no longer than what let it open: ``alive`` (the page's session, still
logged in, not revoked, not expired) is asked before each message and at each check, and
the stream ends when it says no.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger("tron.daemon.ui")

CHECK_EVERY = 1.0     # seconds between checks that the peer is still there
KEEPALIVE_EVERY = 15  # checks between comment lines that keep proxies and browsers from timing out
RETRY_MS = 2000       # what the browser waits before reconnecting after the stream ends
# Streams one credential's sessions may hold at once (a browser holds at most 6 to one host):
# a viewer's token opening streams in a loop must not take every slot from the operator's page.
MAX_STREAMS_PER_CREDENTIAL = 32


def message(event: str, data: str) -> bytes:
    """One SSE message. Every line of ``data`` gets its own ``data:`` field (the browser
    joins them with newlines); a carriage return would end a line early, so none pass."""
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return (f"event: {event}\n" + "".join(f"data: {line}\n" for line in lines) + "\n").encode()


@dataclass(eq=False)
class Client:
    topics: frozenset[str]
    queue: asyncio.Queue = field(repr=False)
    owner: str = ""  # the credential whose session opened it ("": none named, no per-credential limit)
    dropped: bool = False
    # Cuts the connection: a handler stuck writing to a peer that stopped reading never
    # gets back to its queue to see the end marker.
    abort: Callable[[], None] | None = field(default=None, repr=False)


class HubFull(Exception):
    """Too many open streams; the new one is refused (503) rather than slowing the rest."""


class Hub:
    def __init__(self, *, max_clients: int = 200, queue_size: int = 64) -> None:
        self.max_clients = max_clients
        self.queue_size = queue_size
        self.clients: set[Client] = set()
        self._topics: Counter[str] = Counter()
        self.closed = False
        self.dropped = 0  # clients dropped for being too slow, since start

    def __len__(self) -> int:
        return len(self.clients)

    def topics(self) -> set[str]:
        """Topics with at least one subscriber: only those are worth computing."""
        return {t for t, n in self._topics.items() if n > 0}

    def open(self, topics: Iterable[str], owner: str = "") -> Client:
        if self.closed:
            raise HubFull("the daemon is shutting down")
        if len(self.clients) >= self.max_clients:
            raise HubFull(f"{len(self.clients)} event streams are open already (the limit is {self.max_clients})")
        if owner and sum(c.owner == owner for c in self.clients) >= MAX_STREAMS_PER_CREDENTIAL:
            raise HubFull(f"{owner}'s sessions hold {MAX_STREAMS_PER_CREDENTIAL} event streams already (the limit "
                          "for one credential)")
        client = Client(frozenset(topics), asyncio.Queue(self.queue_size), owner=owner)
        self.clients.add(client)
        self._topics.update(client.topics)
        return client

    def close(self, client: Client) -> None:
        """Forget a client; idempotent (the handler's ``finally`` and a drop may both call it)."""
        if client in self.clients:
            self.clients.discard(client)
            self._topics.subtract(client.topics)

    def send(self, client: Client, event: str, data: str) -> bool:
        """Queue one message for one client; drop the client if its queue is full."""
        if client.dropped:
            return False
        try:
            client.queue.put_nowait(message(event, data))
            return True
        except asyncio.QueueFull:
            self._drop(client)
            return False

    def publish(self, topic: str, event: str, data: str) -> int:
        """Queue a message for every subscriber of ``topic``; returns how many got it."""
        return sum(self.send(c, event, data) for c in list(self.clients) if topic in c.topics)

    def _drop(self, client: Client) -> None:
        client.dropped = True
        self.dropped += 1
        log.warning("ui: an event stream fell %d messages behind and was dropped", self.queue_size)
        self._end(client)
        self.close(client)

    @staticmethod
    def _end(client: Client) -> None:
        while not client.queue.empty():
            client.queue.get_nowait()
        client.queue.put_nowait(None)  # the handler returns at this marker
        if client.abort is not None:
            client.abort()

    def close_all(self) -> None:
        """At shutdown: end every stream now, so the server need not wait for them."""
        self.closed = True
        for client in list(self.clients):
            self._end(client)
            self.close(client)


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def stream(request: web.Request, hub: Hub, topics: Iterable[str],
                 on_open: Callable[[Client], None],
                 alive: Callable[[], bool] = lambda: True, owner: str = "") -> web.StreamResponse:
    """Serve one event stream until the peer leaves, is dropped, the daemon stops, or
    ``alive()`` says the credential that opened it is gone (a logout, a revoked token, an
    expired session). ``on_open`` queues what a new client must see first (the current state)."""
    try:
        client = hub.open(topics, owner)
    except HubFull as err:
        return web.json_response({"error": str(err)}, status=503)
    client.abort = functools.partial(_abort, request)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no"})
    try:
        await resp.prepare(request)
        await resp.write(f"retry: {RETRY_MS}\n\n".encode())
        on_open(client)
        idle = 0
        while True:
            try:
                msg = await asyncio.wait_for(client.queue.get(), CHECK_EVERY)
                idle = 0
            except TimeoutError:
                if _gone(request) or not alive():
                    break
                idle += 1
                if idle < KEEPALIVE_EVERY:
                    continue
                msg, idle = b": keepalive\n\n", 0
            if msg is None or not alive():
                break
            await resp.write(msg)
    except ConnectionError:  # the browser closed the tab or navigated away: the normal end
        pass
    finally:
        hub.close(client)
    return resp
