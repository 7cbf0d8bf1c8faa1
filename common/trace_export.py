"""Spans exported from a process of their own, so that encoding and HTTP never take the
GIL of the process that made them (issue 25's cost target: under 2 % of a simulated call).

Vocabulary:

    exporter process   forked from the traced process with its first hand-over (the SDK is
                       already imported: the fork costs milliseconds and shares its pages);
                       it runs the SDK's BatchSpanProcessor and OTLPSpanExporter
                       (``telemetry.batch_processor``) and nothing of its parent's
    hand-over          a ``SpanProcessor`` in the traced process: a span that ends is queued as
                       a tuple of plain values (``record``: what the exporter needs); a thread
                       of ours sends what is queued every ``schedule_delay`` (0.5 s), marshalled,
                       one datagram a batch, on a private socket pair, non-blocking; a full
                       socket or a gone exporter process is a dropped span, counted, never a wait
    shared counters    an anonymous shared page: the spans the exporter process delivered,
                       dropped and flushed, read by the parent without a system call

Lifecycle: the exporter process reads until the socket reaches end of file (its parent
closed it at shutdown, or exited, or was killed), exports what it holds, bounded by
``export_timeout``, and exits. It ignores SIGTERM and SIGINT: a stop signals the whole
process group, and the exporter process ends when its parent does, after it. A parent's
``close`` waits for it at most ``timeout``, then kills it; what it still held is counted
dropped. A kill -9 of the parent loses the spans that ended in the last ``schedule_delay`` (not handed over)
and those that had not ended (the daemon writes the killed attempt's span itself); the
spans already handed over are exported, unless the daemon's kill of the whole tree (at
once, as for any service) comes first, which it mostly does.
"""

from __future__ import annotations

import collections
import itertools
import logging
import marshal
import mmap
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.attributes import BoundedAttributes  # imported only when tracing is on (telemetry._On)

SEND_BUFFER = 4 << 20  # bytes of spans in flight to the exporter process (the kernel caps it at wmem_max)
RECORD_MAX = 64 << 10  # bytes a datagram at most (a batch larger is sent in halves; below any wmem_max)
RECEIVE_MAX = 4 << 20  # the exporter process's receive buffer: larger than any datagram the socket takes
_COUNTERS = struct.Struct("<QQQ")  # delivered, dropped, flushed (the last flush request served)
Record = tuple[Any, ...]  # an ended span as plain values (``record``)

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, Span
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from tron.common.telemetry import TelemetrySection, _Batch


def record(span: ReadableSpan) -> Record:
    """What the exporter process needs of an ended SDK span: ints, strings, tuples and dicts
    only, marshalled a batch at a time (cheap to write, and only our own process reads it).

    The one place that reads the SDK's private fields (``ReadableSpan._attributes`` and the
    like, ``BoundedAttributes._dict``): its public properties copy through Python-level
    mapping proxies, four times the cost, and this runs on the traced process's GIL for
    every span. tests/unit/test_trace_export.py sends every kind of field through it."""
    ctx, parent, status = span._context, span._parent, span._status
    if ctx is None:  # the SDK makes none of these; a span without ids could not be exported anyway
        raise ValueError(f"span {span._name!r} has no context")
    return (
        span._name, ctx.trace_id, ctx.span_id, int(ctx.trace_flags),
        parent.span_id if parent is not None else 0, parent is not None and parent.is_remote,
        span._kind.value, span._start_time, span._end_time, _plain(span._attributes),
        tuple((e.name, e.timestamp, _plain(e._attributes)) for e in span._events),
        tuple((link.context.trace_id, link.context.span_id, int(link.context.trace_flags), _plain(link.attributes))
              for link in span._links),
        status.status_code.value, status.description,
    )


def _plain(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(attributes, BoundedAttributes):
        return attributes._dict.copy()
    return dict(attributes or {})


def readable(data: Record, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """A ``record`` back as the SDK's ReadableSpan, for its exporter."""
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

    (name, trace_id, span_id, flags, parent_id, parent_remote, kind, start, end, attributes, events, links,
     code, description) = data
    return ReadableSpan(
        name, SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(flags)),
        parent=SpanContext(trace_id, parent_id, is_remote=parent_remote) if parent_id else None,
        resource=resource, attributes=attributes,
        events=[Event(n, a, timestamp=t) for n, t, a in events],
        links=[Link(SpanContext(t, s, is_remote=True, trace_flags=TraceFlags(f)), a) for t, s, f, a in links],
        kind=SpanKind(kind), status=Status(StatusCode(code), description), start_time=start, end_time=end,
        instrumentation_scope=scope)


class ProcessExport:
    """The SDK ``SpanProcessor`` of the traced process: hands ended spans to the exporter
    process. ``on_end`` queues the span's record (made at once, while the span is in the
    cache: a third of the CPU of making it later); a thread of ours, woken by the first
    record pending, sends what is pending ``schedule_delay`` later (sooner when a batch is
    full), one datagram a batch. Each hand-over costs a wake-up, a system call and a cold
    cache whatever its size, so it is as rare as the SDK's own batches were: what a kill -9
    can lose is the same ``schedule_delay`` of ended spans; an idle process is never woken.
    ``counted(n, why)`` is told of every span that could not be handed over."""

    def __init__(self, url: str, section: TelemetrySection, resource: Resource, scope: InstrumentationScope,
                 counted: Callable[[int, str], None]) -> None:
        self.counted = counted
        self.batch = section.max_export_batch_size
        self.delay = section.schedule_delay  # seconds a span waits to be handed over at most
        self.capacity = section.max_queue_size  # spans waiting for our thread; past it they are dropped
        self.shared = mmap.mmap(-1, _COUNTERS.size)  # MAP_SHARED: the exporter process writes, we read
        self.sent = 0  # spans handed over (our thread's count)
        self.cpu_s = 0.0  # our thread's CPU, building and sending records (benchmarks/telemetry.py)
        self.flushes = itertools.count(1)
        self.pending: collections.deque[Record] = collections.deque()  # append and popleft are atomic
        self.lock = threading.Lock()  # one sender at a time: our thread, or a flush, or close
        self.wake = threading.Event()  # a span is pending (our thread sleeps while none is: an idle
        self.full = threading.Event()  # process is never woken); a batch is full: send it now
        self.args = (url, section, resource, scope)
        self.sock: socket.socket | None = None
        self.pid: int | None = None  # forked with the first hand-over, not at set-up (below)
        self.fallback: _Batch | None = None  # no process could be forked: the SDK's batch processor, in this process
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="tron-trace-handover", daemon=True)
        self.thread.start()

    # -- SpanProcessor --

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def _on_ending(self, span: Span) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if not self.closed:  # closed: ended at shutdown (a task cut short): the daemon writes its attempt
            self.hand(record(span))  # here, while the span is in the cache: a third of the CPU of later

    def hand(self, rec: Record) -> None:
        """Queue one span's record (``record``'s shape) for the exporter process."""
        if self.closed:
            return
        pending = self.pending
        if len(pending) >= self.capacity:
            self.counted(1, "the span hand-over is behind (its thread is starved)")
            return
        pending.append(rec)
        if not self.wake.is_set():
            self.wake.set()
        if len(pending) >= self.batch and not self.full.is_set():
            self.full.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Hand over what is pending and have the exporter process export what it holds;
        True once it has (tests, benchmarks)."""
        n = next(self.flushes)
        deadline = time.monotonic() + timeout_millis / 1000
        with self.lock:
            self._send_pending()
            if not self._fork():
                return self.fallback is not None and self.fallback.force_flush(timeout_millis)
            while True:
                try:
                    self._sock().send(marshal.dumps(n))
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.001)
                except OSError:
                    return False
        while self.counters()[2] < n:
            if time.monotonic() > deadline or not self._alive():
                return False
            time.sleep(0.001)
        return True

    def shutdown(self) -> None:
        self.close(1.0)

    # -- ours --

    def _fork(self) -> bool:
        """Under ``lock``: the exporter process, forked with the first hand-over rather than at
        set-up: a fork while a new incarnation starts makes every page it then writes a copy
        (kill -> healthy was 70-100 ms slower); by its first span it serves. False if none
        can be forked (pids_max, EAGAIN): then the SDK's batch processor exports from a
        thread of this process, as ``export = "thread"``."""
        if self.pid is not None or self.fallback is not None:
            return self.fallback is None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        try:
            pid = os.fork()
        except OSError as err:
            ours.close()
            theirs.close()
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            from tron.common import telemetry

            url, section, _, _ = self.args
            logging.getLogger("tron.telemetry").warning(
                "no exporter process (%s): spans are exported from a thread of this process", err)
            self.fallback = telemetry.batch_processor(OTLPSpanExporter(endpoint=url, timeout=section.export_timeout),
                                                      section, url)
            return False
        if pid == 0:  # the exporter process: never returns
            ours.close()
            _exporter_main(theirs, *self.args, self.shared)
        theirs.close()
        ours.setblocking(False)
        self.sock, self.pid = ours, pid
        return True

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()  # a span that ends from now on sets it again: it goes in this round or the next
            self.full.wait(self.delay)
            self.full.clear()
            with self.lock:
                if self.closed:
                    return
                self._send_pending()

    def _send_pending(self) -> None:
        """Under ``lock``: the pending spans to the exporter process, batch by batch."""
        if not self.pending:
            return
        t0 = time.thread_time()
        pending = self.pending
        spans = [pending.popleft() for _ in range(len(pending))]
        if not self._fork():
            _, _, resource, scope = self.args
            for each in spans:
                if self.fallback is not None:
                    self.fallback.on_end(readable(each, resource, scope))
            return
        for i in range(0, len(spans), self.batch):
            part = spans[i:i + self.batch]
            try:
                self._send(part)
            except BlockingIOError:
                self.counted(len(part), "the exporter process is behind (the collector is slow or down)")
            except OSError as err:  # EPIPE / ECONNRESET: it is gone
                self.counted(len(part), f"the spans could not be handed to the exporter process: {err}")
            else:
                self.sent += len(part)
        self.cpu_s += time.thread_time() - t0

    def _sock(self) -> socket.socket:
        if self.sock is None:  # not forked, or closed: as a socket that is gone
            raise BrokenPipeError("no exporter process")
        return self.sock

    def _send(self, records: list[Record]) -> None:
        data = marshal.dumps(records)
        if len(data) > RECORD_MAX and len(records) > 1:  # large captured content: in halves
            half = len(records) // 2
            self._send(records[:half])
            self._send(records[half:])
            return
        self._sock().send(data)

    def counters(self) -> tuple[int, int, int]:
        """(delivered, dropped, flushed) as the exporter process last wrote them."""
        return _COUNTERS.unpack_from(self.shared)

    def _alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    def close(self, timeout: float) -> bool:
        """Hand over what is pending, then end of file to the exporter process; wait at most
        ``timeout`` for it to export what it holds and exit, then kill it. What it had not
        settled is counted dropped. True if it finished in time."""
        with self.lock:
            if self.closed:
                return True
            self._send_pending()
            self.closed = True
            if self.sock is not None:
                self.sock.close()
        self.wake.set()
        self.full.set()
        deadline = time.monotonic() + timeout
        finished = True
        while self._alive():
            if time.monotonic() > deadline and self.pid is not None:
                finished = False
                try:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                break
            time.sleep(0.002)
        if self.fallback is not None:
            self.fallback.force_flush(int(timeout * 1000))
            self.fallback.closed = True
        delivered, dropped, _ = self.counters()
        if self.sent > delivered + dropped:
            self.counted(self.sent - delivered - dropped, "the exporter process ended before it could send them")
        return finished


def _exporter_main(sock: socket.socket, url: str, section: TelemetrySection, resource: Resource,
                   scope: InstrumentationScope, shared: mmap.mmap) -> None:
    """The exporter process: only this socket, the SDK and the collector. Never returns."""
    code = 0
    try:
        _detach(sock.fileno())
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        from tron.common import telemetry

        telemetry._on = None  # the parent's tracer came with the fork: nothing is traced here, and dropped()
        base = telemetry.dropped()  # is this process's own count (the parent's at the fork included)
        processor = telemetry.batch_processor(OTLPSpanExporter(endpoint=url, timeout=section.export_timeout),
                                              section, url)
        flushed = 0

        def publish() -> None:
            _COUNTERS.pack_into(shared, 0, processor.counting.delivered, telemetry.dropped() - base, flushed)

        buf = bytearray(RECEIVE_MAX)
        sock.settimeout(0.25)  # publish the counts while nothing comes
        while True:
            try:
                n = sock.recv_into(buf)
            except TimeoutError:
                publish()
                continue
            if n == 0:
                break  # the parent closed its end, exited, or was killed
            data = marshal.loads(memoryview(buf)[:n])
            if isinstance(data, int):  # a flush request
                processor.force_flush(int(section.export_timeout * 1000) + 1000)
                flushed = data
            else:
                for each in data:
                    processor.on_end(readable(each, resource, scope))
            publish()
        # What is queued goes now; a hung collector is bounded by the exporter's timeout.
        processor.force_flush(int(section.export_timeout * 1000) + 500)
        processor.closed = True
        publish()
    except BaseException:  # nobody to tell (stderr is /dev/null): the parent counts what was not settled
        code = 1
    os._exit(code)


def _detach(keep: int) -> None:
    """Nothing of the parent's but the socket: its listening and client sockets and its log
    pipes must close when the parent does; no signal handler of its event loop runs here."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a stop signals the group: we end at end of file, after the parent
    signal.set_wakeup_fd(-1)  # the event loop's: its socket is closed below
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 65536)
    import logging

    logging.disable(logging.CRITICAL)
