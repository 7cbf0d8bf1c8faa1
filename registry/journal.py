"""The daemon's store: act first on memory, record durably behind, never forget.

``JournaledStore`` applies every write to an in-memory working copy (``MemoryStore``: the
state the daemon decides on, which cannot fail) and appends it to an ordered journal; one
writer task replays the journal onto the durable store (SQLite, or PostgreSQL), each write
pinned to the time and drill label it really happened with. A write the durable store
refuses for a reason that passes (disk full, database locked, I/O error) stays first in
the journal and is retried with capped backoff: detection, restarts and delivery go on
meanwhile, and once the store accepts writes again the journal is flushed in order, every
row exactly once. While rows wait, the registry is *degraded*, and says so: ``health()``
(shown by `tron status`, /status and the live view), a metric, and an event.

A journal still holding writes when the daemon stops is saved beside the database and
replayed first by the next daemon. Reads of the working state come from memory; history
(events, retry history, metrics) from the durable store. Which is which is the mark each
method carries in registry/protocol.py (``@write``, ``@memory_read``, ...), read once here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from tron.common.clock import Clock, MonotonicClock, utc_iso
from tron.common.ladder import compute_backoff
from tron.registry.memory import MemoryStore
from tron.registry.protocol import Mark, Route, Store, routes_of
from tron.registry.store import SqlStore

log = logging.getLogger("tron.registry")

# Protocol method -> how it is answered, from the marks on registry/protocol.py's aggregates
# (an unmarked method stops the import here, rather than a write staying in memory unsaved).
ROUTES: dict[str, Mark] = routes_of(Store)
MAX_PENDING = 200_000  # beyond this, plain events are dropped first (and counted); ladder rows never
# Up to this many journal entries are written as one transaction (group commit): in a crash
# wave each restart journals ~8 rows, and a transaction of its own for each cost the daemon's
# loop two more trips to the database thread (BEGIN, COMMIT) per row.
BATCH_MAX = 64
# A protocol method as the proxy hands it out: what it answers depends on which method it
# is (registry/protocol.py types each), so here it is Any.
Method = Callable[..., Awaitable[Any]]


@dataclass
class Op:
    method: str
    args: tuple[object, ...]  # the protocol method's own arguments, as the caller passed them
    kwargs: dict[str, object]
    mono: float
    wall: str
    drill: str | None
    seq: int = field(default=0, compare=False)  # its place in this daemon's journal (flushed() waits up to one)

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "args": self.args, "kwargs": self.kwargs, "mono": self.mono,
                           "wall": self.wall, "drill": self.drill}, default=str)

    @classmethod
    def from_json(cls, line: str) -> "Op":
        d = json.loads(line)
        return cls(d["method"], tuple(d["args"]), d["kwargs"], d["mono"], d["wall"], d["drill"])


@dataclass
class Health:
    state: str = "ok"  # ok | degraded
    since: str | None = None
    reason: str | None = None
    pending: int = 0
    dropped_events: int = 0
    failed_writes: int = 0
    last_error: str | None = None
    flushed: int = 0
    history: collections.deque[dict[str, object]] = field(default_factory=lambda: collections.deque(maxlen=20))

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "history"} | {"episodes": list(self.history)}


class JournaledStore:
    def __init__(self, durable: SqlStore, *, clock: Clock | None = None, spill: Path | None = None) -> None:
        self.clock = clock or MonotonicClock()
        self.durable = durable
        self.memory = MemoryStore(clock=self.clock, events_kept=2000)
        self.spill = spill  # where a journal that could not be flushed is saved at shutdown
        self.journal: collections.deque[Op] = collections.deque()
        self.health_ = Health()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._degraded_at: float | None = None
        self._in_flight = 0  # the journal's first entries being written now: never dropped
        self._one_by_one = 0  # entries to write alone: a batch of them was refused for good
        self._seq = 0  # the last entry journaled
        self._progress = asyncio.Event()  # set whenever entries leave the journal (flushed() waits on it)

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> "JournaledStore":
        await self.durable.open()
        await self._replay_spill()
        await self.memory.load_from(self.durable)
        self._writer = asyncio.ensure_future(self._write_loop())
        return self

    async def close(self, *, grace: float = 5.0) -> None:
        """Flush what can be flushed within ``grace``; save the rest for the next daemon."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), grace)
            except asyncio.TimeoutError:
                self._writer.cancel()
        if self.journal:
            self._save_spill()
        await self.durable.close()

    @property
    def drill(self) -> str | None:
        return self.memory.drill

    @drill.setter
    def drill(self, value: str | None) -> None:
        self.memory.drill = value

    def health(self) -> dict[str, object]:
        self.health_.pending = len(self.journal)
        return self.health_.as_dict()

    # -- the proxy ------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        mark = ROUTES.get(name)
        if mark is None:  # not the protocol's (pinned, load_from, ...): the working copy's own
            return getattr(self.memory, name)
        match mark.route:
            case Route.WRITE:
                return self._kept(name, self._writing(name))
            case Route.MEMORY_READ:
                return getattr(self.memory, name)
            case Route.FALLBACK_READ:
                return self._kept(name, self._falling_back(name, mark.about))
            case Route.OWNED_READ if mark.about is not None:  # routes_of checked every owned read names one
                return self._kept(name, self._owned(name, mark.about))
            case Route.DURABLE_READ:
                return self._kept(name, self._after_flush(name))
        # OWN: open, close, health, ... are defined here; forwarding one would skip the journal.
        # (An owned read that names nothing never gets here: routes_of refuses it at import.)
        raise AttributeError(f"JournaledStore must define {name} ({mark.route}) itself")

    def _kept(self, name: str, method: Method) -> Method:
        """``method`` made once: the next look-up finds it on the instance, not here (a restart
        made ~15 registry calls, each of which built its wrapper again)."""
        self.__dict__[name] = method
        return method

    def _after_flush(self, name: str) -> Method:
        """History reads see this daemon's own writes (unless the store is refusing them)."""
        @functools.wraps(getattr(self.durable, name))  # its signature is the protocol's
        async def read(*args: Any, **kwargs: Any) -> Any:
            if self.health_.state == "ok":
                await self.flushed(2.0)
            return await getattr(self.durable, name)(*args, **kwargs)
        return read

    def _falling_back(self, name: str, about: str | None) -> Method:
        """Memory's answer; when it has nothing, the durable store's, unless memory knows
        the key (``about``): then nothing is the answer."""
        @functools.wraps(getattr(self.memory, name))
        async def read(*args: Any, **kwargs: Any) -> Any:
            found = await getattr(self.memory, name)(*args, **kwargs)
            if found or (about is not None and await getattr(self.memory, about)(args[0]) is not None):
                return found
            return await getattr(self.durable, name)(*args, **kwargs)
        return read

    def _owned(self, name: str, about: str) -> Method:
        @functools.wraps(getattr(self.memory, name))
        async def read(key: str, *args: Any, **kwargs: Any) -> Any:
            known = await getattr(self.memory, about)(key) is not None
            return await getattr(self.memory if known else self.durable, name)(key, *args, **kwargs)
        return read

    def trim(self) -> None:
        """Forget what the durable store has; never what the journal has not written yet
        (a run that ended while the disk was full stays readable until it is written)."""
        runs, sessions = self._pending_ids()
        self.memory.trim(keep_runs=runs, keep_sessions=sessions)

    def _pending_ids(self) -> tuple[set[str], set[str]]:
        """The runs (directly, or through one of their tasks) and sessions that pending
        writes name: every string argument is looked up among the working copy's ids."""
        runs: set[str] = set()
        sessions: set[str] = set()
        tasks = self.memory.tasks_
        for op in self.journal:
            for value in (*op.args, *op.kwargs.values()):
                for v in (value.values() if isinstance(value, dict) else (value,)):
                    if not isinstance(v, str):
                        continue
                    if v in self.memory.runs_:
                        runs.add(v)
                    elif v in tasks:
                        runs.add(tasks[v]["run_id"])
                    elif v in self.memory.sessions_:
                        sessions.add(v)
        return runs, sessions

    async def warm(self, run_id: str) -> None:
        await self.flushed(2.0)
        await self.memory.warm_from(self.durable, run_id)

    def recorded(self) -> SqlStore:
        return self.durable

    def _writing(self, name: str) -> Method:
        @functools.wraps(getattr(self.memory, name))
        async def write(*args: Any, **kwargs: Any) -> Any:
            mono, wall = self.clock.now(), utc_iso()
            with self.memory.pinned(mono, wall, self.memory.drill):
                result = await getattr(self.memory, name)(*args, **kwargs)
            self._append(Op(name, args, kwargs, mono, wall, self.memory.drill))
            return result
        return write

    def _append(self, op: Op) -> None:
        if len(self.journal) >= MAX_PENDING:
            self._drop_an_event()
        self._seq += 1
        op.seq = self._seq
        self.journal.append(op)
        self._wake.set()

    def _drop_an_event(self) -> None:
        for i, op in enumerate(self.journal):
            if op.method == "event" and i >= max(1, self._in_flight):
                del self.journal[i]
                self.health_.dropped_events += 1
                return
        log.critical("registry journal full of ladder rows (%d): none is dropped; memory grows", len(self.journal))

    async def flushed(self, timeout: float) -> bool:
        """Until every entry journaled before this call is written (True), or ``timeout``
        seconds pass (False). Entries journaled meanwhile are not waited for: a busy mesh may
        never leave the journal empty, and each history read (the live view makes ten a
        second) would wait its whole timeout for that."""
        upto = self._seq
        deadline = time.monotonic() + timeout
        while self._waiting(upto):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._progress.clear()  # cleared before the wait: an entry written meanwhile sets it again
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)
        return True

    def _waiting(self, upto: int) -> bool:
        return bool(self.journal) and self.journal[0].seq <= upto  # oldest first: the first says it

    # -- the writer --------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        tries = 0
        while True:
            if not self.journal:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(itertools.islice(self.journal, 1 if self._one_by_one else BATCH_MAX))
            self._in_flight = len(batch)
            try:
                await self._write(batch)
            except Exception as err:
                # A refusal that passes (full disk, locked database, I/O error, lost connection)?
                # The engine knows its own errors (registry/db.py, registry/pg.py).
                if not self.durable.unavailable(err):
                    if len(batch) > 1:
                        # Nothing of the batch was written: each is written alone, to find the one refused.
                        self._one_by_one = len(batch)
                        continue
                    # A bug, not a passing fault: retrying cannot help. Said loudly, kept in the log.
                    op = batch[0]
                    self.health_.failed_writes += 1
                    log.error("registry refused %s for good (%s: %s); the write is lost: %s", op.method,
                              type(err).__name__, err, op.to_json()[:2000])
                    self._written(1)
                    continue
                tries += 1
                self._degrade(err)
                if self._closing and tries > 3:
                    return
                await asyncio.sleep(compute_backoff(tries, initial=0.05, factor=2, max_backoff=2.0, jitter=0.1))
                continue
            finally:
                self._in_flight = 0
            self._written(len(batch))
            self.health_.flushed += len(batch)
            if tries:
                tries = 0
            if self.health_.state == "degraded" and not self.journal:
                await self._recovered()

    async def _write(self, batch: list[Op]) -> None:
        """The entries in one transaction, each pinned to when it happened: all, or none
        (one alone is its own transaction)."""
        async with self.durable.batch() if len(batch) > 1 else contextlib.nullcontext():
            for op in batch:
                with self.durable.pinned(op.mono, op.wall, op.drill):
                    await getattr(self.durable, op.method)(*op.args, **op.kwargs)

    def _written(self, n: int) -> None:
        for _ in range(n):
            self.journal.popleft()
        self._one_by_one = max(0, self._one_by_one - n)
        self._progress.set()

    def _degrade(self, err: BaseException) -> None:
        reason = _reason(err)
        self.health_.last_error = f"{type(err).__name__}: {err}"[:300]
        if self.health_.state != "degraded":
            self.health_.state, self.health_.since, self.health_.reason = "degraded", utc_iso(), reason
            self._degraded_at = self.clock.now()
            log.critical("registry degraded: %s; every event is kept in memory and written when it recovers",
                         reason, extra={"reason": reason, "error": self.health_.last_error})
            # Recorded in order, once the store takes writes again.
            self._append(Op("event", ("registry_degraded", {"reason": reason, "error": self.health_.last_error}),
                            {}, self.clock.now(), utc_iso(), None))

    async def _recovered(self) -> None:
        took = round(self.clock.now() - (self._degraded_at or self.clock.now()), 3)
        episode: dict[str, object] = {"since": self.health_.since, "reason": self.health_.reason, "seconds": took,
                                      "dropped_events": self.health_.dropped_events}
        self.health_.history.append(episode)
        self.health_.state, self.health_.since, self.health_.reason = "ok", None, None
        log.warning("registry recovered after %.1fs; journal flushed", took, extra=episode)
        await self.event("registry_recovered", episode)

    # -- a journal that outlived its daemon ----------------------------------------------------

    def _save_spill(self) -> None:
        if self.spill is None:
            log.critical("registry: %d writes never reached the store and are lost", len(self.journal))
            return
        try:
            with open(self.spill, "a") as f:
                for op in self.journal:
                    f.write(op.to_json() + "\n")
            log.error("registry: %d unwritten rows saved to %s for the next daemon", len(self.journal), self.spill)
        except OSError as err:
            log.critical("registry: %d writes lost: neither the store nor %s could take them (%s)",
                         len(self.journal), self.spill, err)

    async def _replay_spill(self) -> None:
        if self.spill is None or not self.spill.exists():
            return
        ops, unreadable = [], 0
        for line in self.spill.read_text().splitlines():
            try:
                ops.append(Op.from_json(line))
            except (ValueError, TypeError, KeyError):  # a line torn by the full disk it was saved on
                unreadable += 1
        if unreadable:
            log.critical("registry: %d rows of %s could not be read (a save cut short, a full disk?) and are "
                         "lost; the %d others are replayed", unreadable, self.spill, len(ops))
        dropped = 0
        if ops:
            # One transaction: a replay cut short (the database locked, the disk full) writes
            # nothing and keeps the file, so the next daemon writes each row once, not twice.
            try:
                async with self.durable.batch():
                    for op in ops:
                        with self.durable.pinned(op.mono, op.wall, op.drill):
                            try:
                                await getattr(self.durable, op.method)(*op.args, **op.kwargs)
                            except (AttributeError, TypeError, KeyError) as err:  # a row no store takes
                                # (a method an upgrade renamed): dropped and said, as the live writer
                                # does, not a refusal of every start to come
                                dropped += 1
                                log.critical("registry: a row of %s cannot be written by this version and is "
                                             "dropped: %s: %s", self.spill, op.method, type(err).__name__)
            except Exception as err:  # the daemon cannot start on a record it knows to be incomplete
                from tron.registry.schema import RegistryUnwritable

                raise RegistryUnwritable(f"the {len(ops)} rows an earlier daemon could not write ({self.spill}) cannot "
                                         f"be written now ({_reason(err)}: {str(err)[:160]}); refusing to start on "
                                         "an incomplete record: clear the cause (end the lock, free space), then "
                                         "`tron up` again") from None
        self.spill.unlink()
        log.warning("registry: replayed %d rows an earlier daemon could not write", len(ops) - dropped)


def _reason(err: BaseException) -> str:
    text = str(err).lower()
    if "full" in text or getattr(err, "errno", None) == 28:
        return "disk full"
    if "locked" in text or "busy" in text:
        return "database locked"
    if "i/o" in text or isinstance(err, OSError):
        return "I/O error"
    return type(err).__name__
