"""The notifier: registry events that people must hear of, POSTed to the mesh file's
``[[notify]]`` receivers, signed (common/notify.py has the rules: who wants what, the
body, the signature, the retry decision).

It is a follower of the registry, never a step of the ladder: one task reads the store's
events after a cursor every POLL seconds (as the web UI's feed does) and puts each wanted
one on the queue of every entry that wants it; one task per entry delivers its queue in
order. The ladder never waits for it, and one receiver that hangs or fails holds up only
its own queue. A queue is bounded: when it is full the oldest message is dropped and a
``notify_dropped`` event says so.

Durable record: every attempt is a ``notify_delivery`` event (entry, event id, kind,
attempt, status, outcome, elapsed); where each entry is in the event stream is kept as
``notify_cursor`` events, so a new daemon resumes where the last one stopped (events it
had not delivered are delivered, at least once). With no cursor kept, it starts at the
newest event: history is not re-sent.

The registry's own trouble cannot wait for the registry: while it refuses writes, its
events are read back only after it recovers, so when the store's health turns degraded the
notifier sends ``registry_degraded`` at once, from memory; its delivery rows are written
when the store takes writes again (the journal keeps them), and the stored
``registry_degraded`` event is then not sent a second time.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from tron.common import notify
from tron.common.clock import Clock, utc_iso
from tron.common.notify import NotifyEntry, Outcome
from tron.registry.protocol import Store
from tron.services.daemon.metrics import DaemonMetrics

log = logging.getLogger("tron.daemon")

POLL = 0.2  # seconds between reads of the registry's new events
PAGE = 500
QUEUE_SIZE = 256  # messages waiting per entry; beyond it, the oldest is dropped
CURSOR_EVERY = 1.0  # the cursor is kept at most this often (and at stop)
READ_BODY = 2048  # of a receiver's answer, kept with a failed attempt
TEST_EVENT = "notify_test"  # written by POST /notify/test; sent as kind "test"


@dataclass
class Outlet:
    """One entry's state: its queue, the message on the wire, and how far it is."""

    index: int
    entry: NotifyEntry
    key: str  # the entry's identity across daemons: a hash of its url
    skip_to: int = 0  # events up to this id were handled by an earlier daemon
    queue: collections.deque = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sending: dict | None = None
    task: asyncio.Task | None = None

    def position(self, read_to: int) -> int:
        """Every event up to this id is handled for this entry (delivered, given up,
        dropped or not wanted)."""
        ids = [m["id"] for m in ([self.sending] if self.sending else []) + list(self.queue) if m["id"] is not None]
        return max(self.skip_to, min(ids) - 1 if ids else read_to)


def entry_key(entry: NotifyEntry) -> str:
    return hashlib.sha256(entry.url.encode()).hexdigest()[:12]


async def last_event(store: Store, kind: str | None = None) -> dict | None:
    """The newest event (of ``kind``), found with O(log n) reads of ``events(since,
    limit=1)``: the store reads forwards only, and a registry can hold millions."""
    async def after(since: int) -> bool:
        return bool(await store.events(since=since, limit=1, kind=kind))

    if not await after(0):
        return None
    high = 1
    while await after(high):
        high *= 2
    low = high // 2  # after(low) or low == 0; not after(high)
    while high - low > 1:
        mid = (low + high) // 2
        if await after(mid):
            low = mid
        else:
            high = mid
    rows = await store.events(since=low, limit=1, kind=kind)
    return rows[0] if rows else None


class Notifier:
    def __init__(self, store: Store, entries: list[NotifyEntry], *, clock: Clock, background, metrics: DaemonMetrics,
                 mesh: str, health: Callable[[], dict] = lambda: {"state": "ok"},
                 rng: Callable[[], float] = random.random, wall: Callable[[], float] = time.time, poll: float = POLL,
                 queue_size: int = QUEUE_SIZE, start_at: int | None = None) -> None:
        """``start_at``: where an entry with no kept place begins (the last event id when a
        reload made this notifier: what came before was the old receivers'); else the daemon's
        start."""
        self.store = store
        self.start_at = start_at
        self.outlets = [Outlet(i, e, entry_key(e)) for i, e in enumerate(entries)]
        self.clock = clock
        self.background = background
        self.metrics = metrics
        self.mesh = mesh
        self.health = health  # the registry's: ok, or degraded (registry/journal.py)
        self.rng = rng
        self.wall = wall
        self.poll = poll
        self.queue_size = queue_size
        self.read_to = 0  # the last event id read and handed out
        self._kept: dict | None = None  # the cursor as last written
        self._kept_at = float("-inf")
        self._dirty = False  # a message finished since the cursor was last kept
        self._resumed = False  # no cursor is kept before the places are known
        self._stored = False  # a cursor row holds this notifier's places (else the first stop writes one)
        self._registry_state = "ok"
        self._sent_directly = 0  # registry_degraded sent from memory, its stored twin still to come
        self._read_failing = False
        self._session: aiohttp.ClientSession | None = None
        self._follower: asyncio.Task | None = None
        self.started = self.stopped = False

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Deliver in the background: find where to resume, then follow the registry.
        Idempotent; with no entry, nothing runs."""
        if self.started or not self.outlets:
            return
        self.started = True
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, limit_per_host=4))
        for o in self.outlets:
            o.task = self.background(self._deliver_loop(o), f"notify {o.index}")
        self._follower = self.background(self._run(), "notify follower")

    async def _run(self) -> None:
        while True:
            try:
                await self._resume()
                break
            except Exception as err:  # a registry that cannot be read yet: try again, nothing is lost
                log.error("notifier: cannot find where to resume (%s: %s); trying again", type(err).__name__, err)
                await self.clock.sleep(max(self.poll, 1.0))
        await self._follow()

    async def _resume(self) -> None:
        """Each entry's place: where the last daemon's cursor left it, or (a new entry, a
        first start) this daemon's start, so that history is not re-sent."""
        kept = await last_event(self.store, "notify_cursor")
        if self.start_at is not None:
            here = self.start_at
        else:
            start = await last_event(self.store, "daemon_started") or await last_event(self.store)
            here = start["id"] if start else 0
        entries = ((kept or {}).get("payload") or {}).get("entries") or {}
        for o in self.outlets:
            mine = entries.get(str(o.index)) or {}
            o.skip_to = mine["at"] if mine.get("key") == o.key and isinstance(mine.get("at"), int) else here
        self.read_to = min(o.skip_to for o in self.outlets)
        self._kept, self._resumed, self._stored = self._cursor(), True, kept is not None
        log.info("notifier: %d receivers, resuming after event %d", len(self.outlets), self.read_to,
                 extra={"cursor": self.read_to, "resumed": kept is not None})

    async def stop(self) -> None:
        """Stop at once (a message on the wire is abandoned, and sent again by the next
        daemon), keeping the cursor. Idempotent."""
        if not self.started or self.stopped:
            return
        self.stopped = True
        tasks = [t for t in [self._follower, *(o.task for o in self.outlets)] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._keep_cursor(force=True)
        except Exception as err:  # the registry may be why the daemon stops; the next one re-sends
            log.error("notifier: cursor not kept at stop: %s", err)
        if self._session is not None:
            await self._session.close()

    # -- following the registry ---------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            rows: list[dict] = []
            try:
                rows = await self.store.events(since=self.read_to, limit=PAGE)
                if self._read_failing:
                    self._read_failing = False
                    log.warning("notifier: the registry answers again", extra={"cursor": self.read_to})
            except Exception as err:  # a registry read that fails (I/O, lost server) is tried again
                if not self._read_failing:
                    self._read_failing = True
                    log.error("notifier: registry events unreadable, retrying: %s: %s", type(err).__name__, err)
            for row in rows:
                await self._hand_out(row)
                self.read_to = row["id"]
            await self._watch_registry()
            await self._keep_cursor()
            if len(rows) < PAGE:
                await self.clock.sleep(self.poll)

    async def _hand_out(self, row: dict) -> None:
        kind = row["kind"]
        if kind == TEST_EVENT:
            target = (row.get("payload") or {}).get("entry")
            for o in self.outlets:
                if row["id"] > o.skip_to and target in (None, o.index):
                    await self._enqueue(o, notify.message(row, mesh=self.mesh, kind=notify.TEST_KIND))
            return
        if kind == "registry_degraded" and self._sent_directly:
            self._sent_directly -= 1  # sent from memory when it happened (below)
            return
        for o in self.outlets:
            if row["id"] > o.skip_to and notify.wanted(o.entry, kind):
                await self._enqueue(o, notify.message(row, mesh=self.mesh))

    async def _watch_registry(self) -> None:
        """A registry turning degraded is sent now: its own event reaches the store only
        after it recovers."""
        state = self.health()
        was, self._registry_state = self._registry_state, state.get("state", "ok")
        if self._registry_state != "degraded" or was == "degraded":
            return
        outlets = [o for o in self.outlets if notify.wanted(o.entry, "registry_degraded")]
        if not outlets:
            return
        self._sent_directly += 1
        row = {"id": None, "kind": "registry_degraded", "ts": utc_iso(), "agent": None, "run_id": None,
               "task_id": None, "drill": None,
               "payload": {"reason": state.get("reason"), "since": state.get("since"),
                           "error": state.get("last_error"), "pending": state.get("pending")}}
        for o in outlets:
            await self._enqueue(o, notify.message(row, mesh=self.mesh))

    async def _enqueue(self, o: Outlet, msg: dict) -> None:
        if len(o.queue) >= self.queue_size:
            old = o.queue.popleft()
            self.metrics.notify_deliveries.labels(outcome="dropped").inc()
            log.error("notifier: queue of receiver %d full; oldest message dropped", o.index,
                      extra={"notify": o.index, "event_id": old["id"], "kind": old["kind"]})
            await self.store.event("notify_dropped", {"notify": o.index, "to": o.entry.where, "event_id": old["id"],
                                                      "kind": old["kind"], "queued": len(o.queue) + 1})
        o.queue.append(msg)
        o.wake.set()

    # -- the cursor ---------------------------------------------------------------------------

    def _cursor(self) -> dict:
        at = {str(o.index): {"at": o.position(self.read_to), "key": o.key} for o in self.outlets}
        return {"cursor": min(v["at"] for v in at.values()), "entries": at}

    async def _keep_cursor(self, *, force: bool = False) -> None:
        """Written when a receiver's place moved past an event it was sent (at most once a
        CURSOR_EVERY), and at stop: a cursor that moves only over unwanted events is not
        worth a row (and a row written for it would move it again)."""
        if not self._resumed:
            return
        cursor = self._cursor()
        kept = self._kept or {"entries": {}}
        moved = any(v["at"] != (kept["entries"].get(i) or {}).get("at") for i, v in cursor["entries"].items())
        # At a stop, places no row holds yet are written even if they never moved: the next
        # daemon would otherwise start at its own start, past what was still on its way here.
        unstored = force and not self._stored
        if not (moved or unstored) or (not force and (not self._dirty or self.clock.now() - self._kept_at < CURSOR_EVERY)):
            return
        await self.store.event("notify_cursor", cursor)
        self._kept, self._kept_at, self._dirty, self._stored = cursor, self.clock.now(), False, True

    # -- delivering -----------------------------------------------------------------------------

    async def _deliver_loop(self, o: Outlet) -> None:
        while True:
            if not o.queue:
                o.wake.clear()
                await o.wake.wait()
                continue
            o.sending = o.queue.popleft()
            try:
                await self._deliver(o, o.sending)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad message must not stop this receiver's queue
                log.exception("notifier: delivery to receiver %d failed unexpectedly", o.index)
            o.sending = None
            self._dirty = True

    async def _deliver(self, o: Outlet, msg: dict) -> None:
        """Every attempt of one message to one receiver, each recorded."""
        data = notify.body(msg, o.entry.format)
        delivery = f"{msg['id']}.{o.index}" if msg["id"] is not None else f"m{int(self.wall() * 1000)}.{o.index}"
        headers = {"Content-Type": "application/json", "User-Agent": "tron-notify/1",
                   notify.EVENT_HEADER: msg["kind"], notify.DELIVERY_HEADER: delivery,
                   notify.SIGNATURE_HEADER: notify.sign(data, o.entry.secret())}
        attempt = 0
        while True:
            attempt += 1
            started = self.clock.now()
            status, wait, answer = await self._post(o.entry, data, headers)
            step = notify.next_step(status, attempt, o.entry.max_attempts, retry_after_s=wait, rng=self.rng)
            elapsed_ms = round((self.clock.now() - started) * 1000, 1)
            self.metrics.notify_deliveries.labels(outcome=str(step.outcome)).inc()
            record = {"notify": o.index, "to": o.entry.where, "event_id": msg["id"], "kind": msg["kind"],
                      "attempt": attempt, "status": status, "outcome": str(step.outcome), "elapsed_ms": elapsed_ms,
                      "delivery": delivery}
            if step.outcome is not Outcome.DELIVERED and answer:
                record["answer"] = answer  # a receiver's refusal says why
            if step.outcome is Outcome.RETRYING:
                record["retry_in"] = round(step.delay, 3)
            await self.store.event("notify_delivery", record, agent=msg.get("agent"), run_id=msg.get("run_id"),
                                   task_id=msg.get("task_id"))
            level = logging.INFO if step.outcome is Outcome.DELIVERED else logging.WARNING
            log.log(level, "notification %s", step.outcome, extra=record)
            if step.outcome is not Outcome.RETRYING:
                return
            await self.clock.sleep(step.delay)

    async def _post(self, entry: NotifyEntry, data: bytes, headers: dict) -> tuple[int | str, float | None, str]:
        """One attempt: (HTTP status or the error, Retry-After seconds, the answer's start)."""
        try:
            async with self._session.post(entry.url, data=data, headers=headers, allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=entry.timeout)) as resp:
                answer = (await resp.content.read(READ_BODY)).decode("utf-8", "replace")
                wait = notify.retry_after(resp.headers.get("Retry-After"), wall=self.wall())
                return resp.status, wait, answer
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as err:
            return notify.describe_error(err), None, ""

    # -- operators ------------------------------------------------------------------------------

    def entry_indexes(self) -> list[int]:
        return [o.index for o in self.outlets]

    def status(self) -> list[dict]:
        """Each receiver now: where, what it wants, how much waits."""
        return [{"notify": o.index, "to": o.entry.where, "events": list(o.entry.events), "format": o.entry.format,
                 "queued": len(o.queue), "sending": o.sending["id"] if o.sending else None,
                 "position": o.position(self.read_to)} for o in self.outlets]
