"""TRON: the heartbeat monitor. Pure Python, no LLM, no I/O in the detection path.

One deadline queue serves every agent. A beat only writes a timestamp (O(1)); the queue
holds one live entry per (agent, kind) and an entry that comes due early, because beats
moved the real deadline on, is pushed back to that deadline (O(log n) once per timeout
period, not per beat). When a deadline moves earlier (the first beat after the start
grace) a new entry is pushed and the old one is ignored when it pops. The thread sleeps
until the earliest deadline.

Kinds of deadline for an agent incarnation:
- ``beat``: no beat for ``interval * miss_threshold`` -> ``heartbeat_timeout``
- ``progress``: a task whose progress marker has not changed for ``progress_timeout``
  -> ``no_progress``
- ``task``: a task running longer than ``task_timeout`` -> ``task_timeout``
While a beat says the task is waiting on sub-tasks, neither of the last two runs: the
sub-tasks have their own deadlines, and their ladders end the wait.
A process exit is reported by the spawner (``process_exited``) and alerts at once.

After an incarnation has raised an alert it is silent: the ladder owns it now, and the
next incarnation is watched afresh. ``tick(now)`` is the whole detection step, so tests
drive it with a fake clock and no thread.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Callable

from tron.common.clock import Clock, MonotonicClock
from tron.common.models import Reason


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    UNKNOWN = "unknown_service"
    STALE = "stale_incarnation"  # the sender was replaced: it must exit
    DUPLICATE = "seq_out_of_order"  # late, repeated or too far ahead: the sender carries on
    FOREIGN_TASK = "foreign_task"  # names a task leased to another incarnation: changes nothing


# How far ahead of the last accepted one a sequence number may jump (beats lost in between).
# A beat from far ahead would make every real beat after it look old (a spoof's trick).
SEQ_WINDOW = 1000


@dataclass(frozen=True)
class Signal:
    """Something TRON noticed. ``deadline`` is when it became true (for latency)."""

    service: str
    incarnation: str
    reason: Reason
    deadline: float
    fired_at: float
    task_id: str | None = None
    progress: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # JSON: it goes into the alert's row


Key = tuple[str, str, str]  # (service, incarnation, kind)
# A queue entry: [deadline, seq, key]. A list, not a tuple, so that it can be re-pushed as
# is (DeadlineQueue's docstring says why); its items differ in type, which a list's type
# cannot say, hence Any.
Entry = list[Any]


@dataclass
class Watched:
    service: str
    incarnation: str
    beat_timeout: float
    progress_timeout: float
    task_timeout: float
    last_beat: float
    seq: int = -1
    task_id: str | None = None
    task_since: float | None = None
    progress: str | None = None
    progress_since: float | None = None
    alerted: bool = False
    excused: int = 0  # stalls of the monitor that excused its silence since its last beat
    # kind -> deadline of the entry queued for it (at most one live entry per kind)
    armed: dict[str, float] = field(default_factory=dict)
    keys: dict[str, Key] = field(default_factory=dict)  # one key tuple per kind, made once

    def deadline(self, kind: str) -> float | None:
        if kind == "beat":
            return self.last_beat + self.beat_timeout
        if self.task_id is None:
            return None
        if kind == "progress":
            return None if self.progress_since is None else self.progress_since + self.progress_timeout
        return None if self.task_since is None else self.task_since + self.task_timeout


_REASON = {"beat": Reason.HEARTBEAT_TIMEOUT, "progress": Reason.NO_PROGRESS, "task": Reason.TASK_TIMEOUT}


class DeadlineQueue:
    """A min-heap of ``[deadline, seq, key]`` entries. Entries are never removed early:
    callers check, when one comes due, whether it still means anything.

    Entries are mutable lists so that an entry that came due early can be pushed back
    *as is* (``repush``): at 100k agents, allocating a fresh tuple per re-arm kept the
    young GC generation growing until a ~100 ms collection stalled the monitor thread.
    """

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._seq = itertools.count()

    def push(self, key: Key, deadline: float) -> None:
        heapq.heappush(self._heap, [deadline, next(self._seq), key])

    def repush(self, entry: Entry, deadline: float) -> None:
        entry[0] = deadline
        entry[1] = next(self._seq)
        heapq.heappush(self._heap, entry)

    def peek(self) -> float | None:
        if not self._heap:
            return None
        deadline: float = self._heap[0][0]
        return deadline

    def pop_due(self, now: float) -> list[Entry]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap))
        return due

    def __len__(self) -> int:
        return len(self._heap)


MAX_EXCUSES = 3  # stalls of the monitor in a row that may excuse one agent's silence


class Monitor:
    """The detection core. Thread-safe: beats arrive on the event loop, ``tick`` runs
    on the monitor thread; ``cond`` wakes the thread when the earliest deadline moves
    earlier."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._queue = DeadlineQueue()
        # Self-awareness (Lifeguard's idea): when the monitor itself stalls, or the event
        # loop that carries the beats does, silence is ours, not the agents'.
        self.loop_seen: float | None = None  # the loop's own tick, written from the loop
        self.stalls: list[tuple[float, float]] = []  # (when, how long) of the monitor's own stalls
        self._agents: dict[str, Watched] = {}
        self.beats_accepted = 0

    # -- called from the event loop -------------------------------------------------

    def watch(
        self,
        service: str,
        incarnation: str,
        now: float,
        *,
        beat_timeout: float,
        progress_timeout: float,
        task_timeout: float,
        task_id: str | None = None,
        progress: str | None = None,
    ) -> None:
        """Start watching a new incarnation (replacing any earlier one)."""
        with self.cond:
            w = Watched(service, incarnation, beat_timeout, progress_timeout, task_timeout, last_beat=now)
            self._agents[service] = w
            if task_id:
                self._start_task(w, task_id, progress, now)
            self._arm(w, "beat")

    def retime(self, service: str, *, beat_timeout: float | None, progress_timeout: float,
               task_timeout: float) -> None:
        """New policy numbers for a watched incarnation (settings changed at run time).
        A deadline that moved earlier is queued now; a later one is picked up when the
        queued entry comes due."""
        with self.cond:
            w = self._agents.get(service)
            if w is None:
                return
            if beat_timeout is not None:
                w.beat_timeout = beat_timeout
            w.progress_timeout, w.task_timeout = progress_timeout, task_timeout
            for kind in ("beat", "progress", "task"):
                self._arm(w, kind)

    def unwatch(self, service: str) -> None:
        with self.cond:
            self._agents.pop(service, None)

    def beat(
        self,
        service: str,
        incarnation: str,
        seq: int,
        now: float,
        *,
        task_id: str | None = None,
        progress: str | None = None,
        waiting: bool = False,
    ) -> Verdict:
        with self.cond:
            w = self._agents.get(service)
            if w is None:
                return Verdict.UNKNOWN
            if w.incarnation != incarnation or w.alerted:
                return Verdict.STALE
            if seq <= w.seq or (w.seq >= 0 and seq > w.seq + SEQ_WINDOW):
                return Verdict.DUPLICATE
            w.seq = seq
            w.last_beat = now
            w.excused = 0
            self._arm(w, "beat")  # O(1) unless the deadline moved earlier (the first beat after the start grace)
            if task_id != w.task_id:
                if task_id is None:
                    w.task_id = w.task_since = w.progress = w.progress_since = None
                else:
                    self._start_task(w, task_id, progress, now)
            elif task_id is not None and (progress != w.progress or waiting):
                w.progress = progress
                w.progress_since = now
                if waiting:
                    w.task_since = now
            self.beats_accepted += 1
            return Verdict.ACCEPTED

    def task_ended(self, service: str, task_id: str) -> None:
        """The registry recorded the task's end: the service is idle from now, before its
        next beat says so (a failure meanwhile is not the task's, and no task deadline runs)."""
        with self.cond:
            w = self._agents.get(service)
            if w is not None and w.task_id == task_id:
                w.task_id = w.task_since = w.progress = w.progress_since = None

    def process_exited(
        self, service: str, incarnation: str, now: float, *, exit_code: int | None, signal: int | None
    ) -> Signal | None:
        """The spawner saw the process end. Returns the alert, or None if this
        incarnation is not watched or has already alerted."""
        with self.cond:
            w = self._agents.get(service)
            if w is None or w.incarnation != incarnation or w.alerted:
                return None
            w.alerted = True
            detail = {"exit_code": exit_code, "signal": signal}
            return Signal(service, incarnation, Reason.PROCESS_EXIT, now, now, w.task_id, w.progress, detail)

    def raise_alert(self, service: str, incarnation: str, reason: Reason, now: float,
                    detail: dict[str, Any]) -> Signal | None:
        """An alert found outside the queue (a failed liveness probe, a provider
        failure reported by the agent). Same once-per-incarnation rule."""
        with self.cond:
            w = self._agents.get(service)
            if w is None or w.incarnation != incarnation or w.alerted:
                return None
            w.alerted = True
            return Signal(service, incarnation, reason, now, now, w.task_id, w.progress, dict(detail))

    def stalled(self, now: float, length: float) -> None:
        """The monitor (or the loop feeding it beats) was frozen for ``length`` seconds,
        up to ``now``: no agent is convicted for that silence. Beat deadlines start again
        from now (a full beat_timeout of grace), and task and progress clocks do not count
        the stall. A process exit is still a fact, and an agent still hung after the grace
        still misses its beats. An agent that stayed silent through ``MAX_EXCUSES`` stalls
        in a row is excused no more: a daemon starved again and again must not postpone a
        hung agent's detection for ever (its beats, had it any, are read between stalls)."""
        with self.cond:
            self.stalls.append((now, length))
            del self.stalls[:-100]
            for w in self._agents.values():
                if w.alerted or w.excused >= MAX_EXCUSES:
                    continue
                w.excused += 1
                w.last_beat = max(w.last_beat, now)
                if w.task_since is not None:
                    w.task_since += length
                if w.progress_since is not None:
                    w.progress_since += length

    def snapshot(self, service: str) -> Watched | None:
        with self.cond:
            w = self._agents.get(service)
            return None if w is None else Watched(**{k: getattr(w, k) for k in w.__dataclass_fields__})

    def __len__(self) -> int:
        return len(self._agents)

    # -- the detection step -----------------------------------------------------------

    def next_deadline(self) -> float | None:
        with self.cond:
            return self._queue.peek()

    def tick(self, now: float) -> list[Signal]:
        """Fire every deadline that has passed; re-queue those that beats moved on."""
        fired: list[Signal] = []
        with self.cond:
            for entry in self._queue.pop_due(now):
                queued, _, (service, incarnation, kind) = entry
                w = self._agents.get(service)
                if w is None or w.incarnation != incarnation:
                    continue  # an entry for an incarnation that is gone
                if w.armed.get(kind) != queued:
                    continue  # superseded by an earlier entry for the same kind
                del w.armed[kind]
                if w.alerted:
                    continue
                real = w.deadline(kind)
                if real is None:
                    continue  # the task ended; re-armed when the next one starts
                if real > now:
                    w.armed[kind] = real
                    self._queue.repush(entry, real)  # same entry, no allocation
                    continue
                w.alerted = True
                fired.append(Signal(service, incarnation, _REASON[kind], real, now, w.task_id, w.progress,
                                    self._detail(w, kind, now)))
        return fired

    # -- internals ----------------------------------------------------------------------

    def _start_task(self, w: Watched, task_id: str, progress: str | None, now: float) -> None:
        w.task_id, w.task_since, w.progress, w.progress_since = task_id, now, progress, now
        self._arm(w, "progress")
        self._arm(w, "task")

    def _arm(self, w: Watched, kind: str) -> None:
        """Make sure an entry fires no later than the real deadline of ``kind``. An
        entry already queued at or before it is enough: when it comes due early it is
        pushed on to the real deadline then."""
        deadline = w.deadline(kind)
        if deadline is None:
            return
        queued = w.armed.get(kind)
        if queued is not None and queued <= deadline:
            return
        head = self._queue.peek()
        w.armed[kind] = deadline
        key = w.keys.get(kind)
        if key is None:
            key = w.keys[kind] = (w.service, w.incarnation, kind)
        self._queue.push(key, deadline)
        if head is None or deadline < head:
            self.cond.notify()

    @staticmethod
    def _detail(w: Watched, kind: str, now: float) -> dict[str, Any]:
        if kind == "beat":
            return {"silent_for": round(now - w.last_beat, 3), "beat_timeout": w.beat_timeout, "last_seq": w.seq}
        # A task deadline fired, so its task's clocks are set (Watched.deadline gave one).
        if kind == "progress" and w.progress_since is not None:
            return {"stuck_for": round(now - w.progress_since, 3), "progress_timeout": w.progress_timeout}
        if kind == "task" and w.task_since is not None:
            return {"running_for": round(now - w.task_since, 3), "task_timeout": w.task_timeout}
        return {}


def woke_late(head: float | None, now: float, threshold: float) -> float:
    """How long past the deadline it slept for the thread woke, if more than ``threshold``
    (then the process was frozen: SIGSTOP, a VM pause, a swap storm), else 0."""
    if head is None or now - head <= threshold:
        return 0.0
    return now - head


class MonitorThread(threading.Thread):
    """Sleeps until the next deadline, runs ``tick`` and hands each signal to ``sink``
    (which must be thread-safe, e.g. ``loop.call_soon_threadsafe``).

    Before it ticks it asks whether the silence it is about to judge is its own: if it
    woke more than ``stall_after`` seconds past the deadline it slept for, or the event
    loop has not ticked for that long (beats wait unread in its socket), it grants every
    agent a fresh grace instead of convicting them all (``Monitor.stalled``)."""

    def __init__(self, monitor: Monitor, sink: Callable[[Signal], None], clock: Clock | None = None,
                 *, stall_after: float = 1.0, on_stall: Callable[[float], None] | None = None) -> None:
        super().__init__(name="tron-monitor", daemon=True)
        self.monitor = monitor
        self.sink = sink
        self.clock = clock or MonotonicClock()
        self.stall_after = stall_after
        self.on_stall = on_stall
        self._stopping = False
        self._loop_stalled_since: float | None = None

    def run(self) -> None:
        m = self.monitor
        while True:
            with m.cond:
                if self._stopping:
                    return
                head = m._queue.peek()
                timeout = None if head is None else max(0.0, head - self.clock.now())
                if timeout is None or timeout > 0:
                    m.cond.wait(timeout)
                if self._stopping:
                    return
            now = self.clock.now()
            late = woke_late(head, now, self.stall_after)
            if late:
                self._stall(now, late)
            if self._loop_stalled(now):
                with m.cond:
                    m.cond.wait(0.05)  # beats may be waiting unread: judge nobody until the loop is back
                continue
            for signal in m.tick(now):
                self.sink(signal)

    def _loop_stalled(self, now: float) -> bool:
        seen = self.monitor.loop_seen
        if seen is None:
            return False
        if now - seen > self.stall_after:
            self._loop_stalled_since = self._loop_stalled_since or seen
            return True
        if self._loop_stalled_since is not None:
            self._stall(now, now - self._loop_stalled_since)
            self._loop_stalled_since = None
        return False

    def _stall(self, now: float, length: float) -> None:
        self.monitor.stalled(now, length)
        if self.on_stall is not None:
            self.on_stall(length)

    def stop(self) -> None:
        with self.monitor.cond:
            self._stopping = True
            self.monitor.cond.notify_all()
        self.join(timeout=5)
