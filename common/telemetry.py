"""OpenTelemetry traces: one trace per run, a span per task attempt, step and LLM call.

Vocabulary (the names a trace viewer shows):

    run                      the gateway's span for ``POST /runs``: the root of the run's trace
    invoke_agent AGENT       one attempt of one task (``tron.task.attempt``), a child of the span
                             that delegated it, in another process: the W3C ``traceparent``
                             travels with the task (registry row, hand-over, claim)
    step N STEP_ID           one checkpointed step of a task
    chat MODEL               one LLM call, with the GenAI semantic conventions
                             (``gen_ai.operation.name``, ``gen_ai.provider.name``,
                             ``gen_ai.request.model``, ``gen_ai.usage.*_tokens``, finish reasons)
    ladder KIND              a decision the daemon carried out (restart, escalation, switch,
                             park, permanent_failure) or an alert TRON raised: a span event
                             ``tron.ladder.KIND`` with its case id, under the attempt it ends;
                             a restart links the old attempt and the new one

An attempt's span id is derived from (trace, task, attempt) (``attempt_span_id``), so the
daemon can name an attempt it never saw start: the one a kill -9 ended, whose process never
exported its own span, is written by the daemon in its stead (``attempt_ended``), and the
next attempt links to it.

Off costs nothing: with no endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``[telemetry] otlp_endpoint``) the SDK is never
imported and every hook returns at once. On, spans are handed to an exporter process of
their own (common/trace_export.py: the SDK's ``BatchSpanProcessor`` and OTLP exporter run
there, so encoding and HTTP never take this process's GIL; ``export = "thread"``: in a thread
of this process), a bounded queue with a short timeout: a collector that is down or hangs
delays no beat, restart or task; what it cannot take is counted (``dropped()``, exported as
``tron_otel_spans_dropped_total``).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import hashlib
import logging
import os
import random
import threading
import time
from datetime import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Iterator, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from tron.common.redaction import redact

if TYPE_CHECKING:  # types only: the SDK is imported when tracing is turned on, never before
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.trace import Span, SpanContext, Status, Tracer
    from opentelemetry.util.types import AttributeValue

    from tron.common.models import TaskAssign
    from tron.common.trace_export import ProcessExport

log = logging.getLogger("tron.telemetry")

TRACER = "tron"
CONTENT_LIMIT = 8192  # characters of a prompt or completion kept on a span (capture_content)


class TelemetrySection(BaseModel):
    """``[telemetry]`` in mesh.toml. The standard OTEL_* environment variables win over it
    (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_SERVICE_NAME``,
    ``OTEL_SDK_DISABLED``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    otlp_endpoint: str | None = Field(None, pattern=r"^https?://\S+$")  # base URL: /v1/traces is appended
    capture_content: bool = False  # prompts and completions on LLM spans, redacted as the registry is
    # The UI's link to a trace: "http://127.0.0.1:16686/trace/{trace_id}" (Jaeger), Phoenix's, Tempo's...
    trace_url: str | None = Field(None, max_length=1024, pattern=r"^https?://\S*\{trace_id\}\S*$")
    max_queue_size: int = Field(2048, ge=16, le=1_000_000)  # spans held while the collector is slow; then dropped
    export_timeout: float = Field(2.0, gt=0, le=60)  # seconds per export request, off the event loop
    schedule_delay: float = Field(0.5, gt=0, le=60)  # seconds between batches
    max_export_batch_size: int = Field(512, ge=1, le=100_000)  # spans a request at most
    # "process": encoded and sent by a process of its own, forked with the first span (common/trace_export.py),
    # so neither takes this process's GIL; "thread": by the SDK's thread in this process (one
    # process fewer per service, and restart_above_memory does not see the exporter's pages twice).
    export: Literal["process", "thread"] = "process"


# -- the state of this process ------------------------------------------------------------------


class _Counted(Protocol):
    """What is read of batch_processor's exporter (here and in common/trace_export.py)."""

    delivered: int
    failing: bool
    busy: bool


class _Batch(Protocol):
    """What is used of batch_processor's span processor (here and in common/trace_export.py):
    a BatchSpanProcessor made inside it, where the SDK is imported."""

    closed: bool

    @property
    def counting(self) -> _Counted: ...

    def on_end(self, span: ReadableSpan) -> None: ...

    def force_flush(self, timeout_millis: int = 30000) -> bool: ...


class _On:
    """What a process holds while tracing is on."""

    def __init__(self, tracer: Tracer, provider: TracerProvider, processor: _Batch | ProcessExport,
                 section: TelemetrySection) -> None:
        self.tracer = tracer
        self.provider = provider
        self.processor = processor
        self.section = section
        from opentelemetry.trace import SpanKind

        from tron.common.trace_export import ProcessExport  # no SDK import: it is plain Python

        self.client_kind = SpanKind.CLIENT

        self.process = processor if isinstance(processor, ProcessExport) else None  # the exporter process's
        # An LLM call's span is handed over as a record made directly (no SDK span: its 300-odd
        # Python calls, run cold after each HTTP exchange, were most of what tracing added to a
        # call) when nothing but the default sampler could have a say: exported by our process,
        # sampled as the parent is (a root always).
        from opentelemetry.sdk.trace.sampling import DEFAULT_ON

        # The process's exporter, when the provider samples as it does with no OTEL_TRACES_SAMPLER.
        self.direct = self.process if provider.sampler is DEFAULT_ON else None
        self.batch = None if isinstance(processor, ProcessExport) else processor  # else the SDK's batch processor


_on: _On | None = None  # None: tracing is off, and nothing of the SDK is imported
_forced_span_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("tron_forced_span_id", default=None)
_dropped = 0
_dropped_lock = threading.Lock()
_theirs_seen = 0  # the exporter process's dropped count, as last logged


def endpoint(section: TelemetrySection | None, env: Mapping[str, str] | None = None) -> str | None:
    """Where traces go (the OTLP/HTTP traces URL), or None when tracing is off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or env.get("OTEL_TRACES_EXPORTER") == "none":
        return None
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or (section.otlp_endpoint if section else None)
    return base.rstrip("/") + "/v1/traces" if base else None


def child_env(section: TelemetrySection | None) -> dict[str, str]:
    """What a spawned program needs to send its own spans where ours go: the endpoint of
    mesh.toml, as the standard variable (one already in the environment is inherited)."""
    if section is None or not section.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return {}
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": section.otlp_endpoint}


def enabled() -> bool:
    return _on is not None


def capture_content() -> bool:
    return _on is not None and _on.section.capture_content


def dropped() -> int:
    """Spans this process could not deliver: the queue was full, or the collector refused,
    failed or did not answer in time (its exporter process's count included)."""
    on = _on
    if on is None or on.process is None:
        return _dropped
    global _theirs_seen
    theirs = on.process.counters()[1]
    if theirs != _theirs_seen:  # said here, rate-limited as ours: the exporter process has no log
        if _theirs_seen == 0 or _theirs_seen // 1000 != theirs // 1000:
            log.warning("trace spans dropped by the exporter process (%d so far): the collector is slow, down "
                        "or refusing", theirs)
        _theirs_seen = theirs
    return _dropped + theirs


def _count_dropped(n: int, why: str) -> None:
    global _dropped
    with _dropped_lock:
        before = _dropped
        _dropped += n
    if before == 0 or before // 1000 != _dropped // 1000:  # once, then every thousand: a dead collector is no flood
        log.warning("trace spans dropped (%d so far): %s", _dropped, why)


SDK_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.sdk.trace.export", "opentelemetry.sdk.resources",
               "opentelemetry.exporter.otlp.proto.http.trace_exporter")


def preload() -> None:
    """Import what ``setup`` needs (about 0.5 s): the fork server does it once for every
    agent it forks, so a new incarnation starts as fast with tracing on as off."""
    import importlib

    for name in SDK_MODULES:
        importlib.import_module(name)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Its transport imports `requests` when the first one is made (0.3 s more): made once here.
    OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces").shutdown()  # type: ignore[no-untyped-call]  # unannotated there


def batch_processor(inner: SpanExporter, section: TelemetrySection, url: str) -> _Batch:
    """The SDK's BatchSpanProcessor around ``inner`` (a SpanExporter), with every span it
    could not deliver counted: in this process's thread, or in the exporter process
    (common/trace_export.py)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Counting(SpanExporter):
        """The OTLP exporter, with every span it could not deliver counted."""

        def __init__(self, inner: SpanExporter) -> None:
            self.inner = inner
            self.taken = 0  # spans the processor handed over (queued - taken = still queued)
            self.delivered = 0  # spans the collector took
            self.failing = False  # the last export failed: the collector is down or refusing
            self.busy = False  # an export is under way (a hung collector holds it)

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            self.taken += len(spans)
            self.busy = True
            try:
                result = self.inner.export(spans)
            except Exception as err:  # the SDK logs and swallows it too: here it is counted
                _count_dropped(len(spans), f"export failed: {type(err).__name__}: {err}")
                result = SpanExportResult.FAILURE
            else:
                if result != SpanExportResult.SUCCESS:
                    _count_dropped(len(spans), f"the collector at {url} did not take them")
                else:
                    self.delivered += len(spans)
            finally:
                self.busy = False
            self.failing = result != SpanExportResult.SUCCESS
            return result

        def shutdown(self) -> None:
            self.inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return self.inner.force_flush(timeout_millis)

    class Bounded(BatchSpanProcessor):
        """The batch processor, with a span that pushes the oldest out of a full queue counted."""

        # kw: BatchSpanProcessor's own keyword arguments (ints and floats), passed on as they are
        def __init__(self, exporter: Counting, **kw: Any) -> None:
            super().__init__(exporter, **kw)
            self.counting = exporter
            self.queued = 0
            self.capacity = kw["max_queue_size"]
            self.closed = False

        def on_end(self, span: ReadableSpan) -> None:
            if self.closed:
                return  # ended at shutdown (a task cut short): the daemon writes its attempt
            if self.queued - self.counting.taken >= self.capacity:
                _count_dropped(1, "the span queue is full (the collector is slow or down)")
            self.queued += 1
            super().on_end(span)

    return Bounded(Counting(inner), max_queue_size=section.max_queue_size,
                   max_export_batch_size=min(section.max_export_batch_size, section.max_queue_size),
                   schedule_delay_millis=section.schedule_delay * 1000,
                   export_timeout_millis=section.export_timeout * 1000)


def setup(section: TelemetrySection | None, *, service: str, incarnation: str | None = None,
          env: Mapping[str, str] | None = None, exporter: SpanExporter | None = None) -> bool:
    """Turn tracing on for this process if an endpoint is configured; True if it is on.
    Idempotent. The SDK and the exporter are imported only here. ``exporter``: a SpanExporter
    to use instead of OTLP/HTTP to the endpoint (the SDK's in-memory one, say)."""
    global _on
    if _on is not None:
        return True
    env = os.environ if env is None else env
    url = endpoint(section, env)
    if url is None:
        return False
    section = section or TelemetrySection()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class Ids(RandomIdGenerator):
        """Random ids, except an attempt's span id, which is derived (see attempt_span_id)."""

        def generate_span_id(self) -> int:
            forced = _forced_span_id.get()
            return forced if forced is not None else super().generate_span_id()

    # The exporter's own warnings would fill the service log while a collector is down; the
    # count and our own rate-limited line say it once.
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    attrs = {"service.name": env.get("OTEL_SERVICE_NAME") or service, "service.namespace": "tron",
             "tron.service": service}
    if incarnation:
        attrs["service.instance.id"] = incarnation
    resource = Resource.create(attrs)
    if exporter is None and section.export == "process":
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from tron.common.trace_export import ProcessExport

        processor: _Batch | ProcessExport = ProcessExport(url, section, resource, InstrumentationScope(TRACER),
                                                          _count_dropped)
    else:
        processor = batch_processor(exporter or OTLPSpanExporter(endpoint=url, timeout=section.export_timeout),
                                    section, url)
    # shutdown_on_exit=False: the SDK's own atexit flush waits up to 30 s for a hung
    # collector; ``shutdown`` bounds it.
    provider = TracerProvider(resource=resource, id_generator=Ids(), shutdown_on_exit=False)
    # Both are span processors by their methods: ProcessExport imports no SDK to subclass one, and
    # batch_processor's is a BatchSpanProcessor that mypy sees as the _Batch it is read as.
    provider.add_span_processor(processor)  # type: ignore[arg-type]
    # Not made the global provider: the LLM SDKs' own instrumentation (anthropic's emits
    # GenAI spans, unredacted content included when its variable says so) stays a no-op, and
    # each call is the one span Tron writes, redacted as the registry is.
    _on = _On(provider.get_tracer(TRACER), provider, processor, section)
    atexit.unregister(shutdown)  # once, however often tracing is set up again (tests)
    atexit.register(shutdown)  # a process that exits without a stop still sends what it can, bounded
    log.info("tracing on", extra={"endpoint": url})
    return True


def shutdown(timeout: float = 1.0) -> None:
    """Send what is queued, waiting at most ``timeout`` seconds (a hung collector never holds
    a stop or a restart), then stop taking spans."""
    global _on, _dropped, _theirs_seen
    on, _on = _on, None
    if on is None:
        return
    if on.process is not None:
        if not on.process.close(timeout):
            log.warning("trace export did not finish within %.1fs at shutdown: the rest is dropped", timeout)
        with _dropped_lock:  # the exporter process's count becomes ours: it is gone
            _dropped += on.process.counters()[1]
            _theirs_seen = 0
        return
    batch = on.batch
    if batch is None:  # one or the other: _On says so
        return
    counting = batch.counting
    if counting.failing or counting.busy:
        timeout = min(timeout, 0.05)  # a collector that is down or slow gets no more of a stop's time
    done = threading.Event()

    def flush() -> None:
        batch.force_flush()
        done.set()

    threading.Thread(target=flush, name="tron-trace-flush", daemon=True).start()
    if not done.wait(timeout):
        log.warning("trace export did not finish within %.1fs at shutdown: the rest is dropped", timeout)
    batch.closed = True


# -- trace context ------------------------------------------------------------------------------


def _parse(traceparent: str | None) -> SpanContext | None:
    """A W3C traceparent as a remote SpanContext, or None (absent or malformed)."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    from opentelemetry.trace import SpanContext, TraceFlags

    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))


def format_traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex digits) a traceparent names."""
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def current_traceparent() -> str | None:
    """The traceparent of the span this code runs in (a sub-task becomes its child)."""
    if _on is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format_traceparent(ctx.trace_id, ctx.span_id, bool(ctx.trace_flags & 1)) if ctx.is_valid else None


def log_ids() -> dict[str, str]:
    """trace_id and span_id of the current span, for a log line (nothing outside a span)."""
    if _on is None:
        return {}
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"} if ctx.is_valid else {}


def attempt_span_id(trace_id: int, task_id: str, attempt: int) -> int:
    """The span id of one attempt of a task: derived, so that the daemon, the next attempt and
    the attempt itself all name the same span without telling each other."""
    digest = hashlib.blake2b(f"{trace_id:032x}/{task_id}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1


def attempt_span_hex(traceparent: str | None, task_id: str, attempt: int) -> str | None:
    """The span id (16 hex digits) an attempt's span has, for an agent that writes its own
    (contract v1: the claim hands it over as SPAN_ID)."""
    trace_id = trace_id_of(traceparent)
    return f"{attempt_span_id(int(trace_id, 16), task_id, attempt):016x}" if trace_id else None


def _attempt_context(traceparent: str | None, task_id: str, attempt: int) -> SpanContext | None:
    parent = _parse(traceparent)
    if parent is None:
        return None
    from opentelemetry.trace import SpanContext, TraceFlags

    return SpanContext(parent.trace_id, attempt_span_id(parent.trace_id, task_id, attempt), is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))


def _start(name: str, *, parent: SpanContext | None = None, span_id: int | None = None,
           links: Iterable[SpanContext | None] = (), attributes: Mapping[str, AttributeValue] | None = None,
           start_time: int | None = None, root: bool = False, client: bool = False) -> Span:
    """Start a span: under ``parent`` (a SpanContext), the current span, or as a trace's root."""
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, SpanKind

    if _on is None:
        raise RuntimeError("a span was started while tracing is off")  # every caller checks _on first
    context: Context | None
    if parent is not None:
        context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    else:
        context = Context() if root else None
    token = _forced_span_id.set(span_id)
    try:
        return _on.tracer.start_span(name, context=context, attributes=attributes,
                                     kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
                                     links=[Link(c) for c in links if c is not None], start_time=start_time)
    finally:
        _forced_span_id.reset(token)


@contextlib.contextmanager
def _active(span: Span, *, end: bool = True) -> Iterator[Span]:
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=end, record_exception=True, set_status_on_exception=True):
        yield span


def _clean(attributes: Mapping[str, AttributeValue | None]) -> dict[str, AttributeValue]:
    return {k: v for k, v in attributes.items() if v is not None}


# -- spans of the SDK (common/agent.py) ---------------------------------------------------------


@contextlib.contextmanager
def run_span(run_id: str, prompt: str) -> Iterator[Span | None]:
    """The gateway's span for a new run: the root of the run's trace."""
    if _on is None:
        yield None
        return
    attrs: dict[str, AttributeValue] = {"tron.run.id": run_id, "gen_ai.operation.name": "invoke_workflow"}
    if _on.section.capture_content:
        attrs["tron.run.prompt"] = redact(prompt)[:CONTENT_LIMIT]
    with _active(_start("run", attributes=attrs, root=True)) as span:
        yield span


@contextlib.contextmanager
def task_span(agent: str, assign: TaskAssign, provider: str | None) -> Iterator[Span | None]:
    """One attempt of a task in this agent: a child of the span that delegated it (the
    task's traceparent); it links to the attempt before it."""
    if _on is None:
        yield None
        return
    parent = _parse(getattr(assign, "traceparent", None))
    attrs = _clean({"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent,
                    "gen_ai.provider.name": provider, "tron.task.id": assign.task_id, "tron.run.id": assign.run_id,
                    "tron.task.kind": assign.kind, "tron.task.attempt": assign.attempt,
                    "tron.task.resumed_from": assign.progress})
    span_id = previous = None
    if parent is not None:
        span_id = attempt_span_id(parent.trace_id, assign.task_id, assign.attempt)
        if assign.attempt > 1:
            previous = _attempt_context(assign.traceparent, assign.task_id, assign.attempt - 1)
    span = _start(f"invoke_agent {agent}", parent=parent, span_id=span_id, links=[previous], attributes=attrs,
                  root=parent is None)
    with _active(span) as span:
        yield span


def task_result(span: Span | None, status: str, reason: str | None, provider: str | None) -> None:
    """How the attempt ended, on its span."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attributes(_clean({"tron.task.result": status, "tron.task.reason": reason,
                                "gen_ai.provider.name": provider}))
    if status == "failed":
        span.set_status(Status(StatusCode.ERROR, reason or "failed"))


@contextlib.contextmanager
def step_span(task_id: str, number: int, step_id: str) -> Iterator[Span | None]:
    if _on is None:
        yield None
        return
    with _active(_start(f"step {number} {step_id}", attributes={"tron.task.id": task_id, "tron.step": number,
                                                                 "tron.step.id": step_id})) as span:
        yield span


class _Call:
    """An LLM call's span while the call runs: what ``llm_result`` says is kept here, and the
    SDK span is made once the call is over, with its start time and every attribute at once
    (one attribute set, no context switch in and out: the call is a leaf). Log lines during
    the call carry the ids of the span around it (the step's or the task's)."""

    __slots__ = ("attributes", "status")

    def __init__(self, attributes: dict[str, AttributeValue]) -> None:
        self.attributes = attributes
        self.status: Status | None = None

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        self.attributes.update(attributes)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self.attributes[key] = value

    def set_status(self, status: Status) -> None:
        self.status = status


@contextlib.contextmanager
def llm_span(provider: str, model: str | None, *, prompt: str | None = None,
             system: str | None = None) -> Iterator[_Call | None]:
    """One LLM call (one try: a retried call is a span per try)."""
    on = _on
    if on is None:
        yield None
        return
    from opentelemetry import context as otel_context

    attrs: dict[str, AttributeValue] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider}
    if model is not None:
        attrs["gen_ai.request.model"] = model
    if on.section.capture_content and prompt is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        attrs["gen_ai.input.messages"] = redact(_json(messages))[:CONTENT_LIMIT]
    parent, start = otel_context.get_current(), time.time_ns()
    call = _Call(attrs)
    try:
        yield call
    except BaseException as err:
        call.attributes.setdefault("error.type", type(err).__name__)
        if call.status is None:
            from opentelemetry.trace import Status, StatusCode

            call.status = Status(StatusCode.ERROR, f"{type(err).__name__}: {err}"[:200])
        raise
    finally:
        if on.direct is not None:
            _hand_llm_record(on.direct, on, f"chat {model or provider}", parent, start, call)
        else:
            span = on.tracer.start_span(f"chat {model or provider}", context=parent, kind=on.client_kind,
                                        attributes=call.attributes, start_time=start)
            if call.status is not None:
                span.set_status(call.status)
            span.end()


def _hand_llm_record(process: ProcessExport, on: _On, name: str, parent: Context, start: int, call: _Call) -> None:
    """The LLM call's span as the exporter process's record (``trace_export.record``'s shape),
    made without an SDK span: ids as the SDK's RandomIdGenerator makes them, the parent's trace
    and sampling as ParentBased(ALWAYS_ON) decides, attribute values as the SDK keeps them
    (None dropped, lists as tuples). tests/unit/test_trace_export.py compares it with the SDK's."""
    from opentelemetry import trace

    ctx = trace.get_current_span(parent).get_span_context()
    if ctx.is_valid:
        if not ctx.trace_flags.sampled:
            return
        trace_id, parent_id, remote, flags = ctx.trace_id, ctx.span_id, ctx.is_remote, 1 | (ctx.trace_flags & 2)
    else:
        trace_id, parent_id, remote, flags = _random_id(128), 0, False, 3  # sampled, random trace id
    attributes = {k: tuple(v) if isinstance(v, list) else v for k, v in call.attributes.items() if v is not None}
    status = call.status
    code, description = (status.status_code.value, status.description) if status is not None else (0, None)
    process.hand((name, trace_id, _random_id(64), flags, parent_id, remote, on.client_kind.value, start,
                     time.time_ns(), attributes, (), (), code, description))


def _random_id(bits: int) -> int:
    while True:  # as the SDK's RandomIdGenerator: never the invalid id 0
        value = random.getrandbits(bits)
        if value:
            return value


def llm_result(span: Span | _Call | None, reply: object = None, failure: object = None) -> None:
    """What the call answered (usage, finish reason, model) or how it failed."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    if reply is not None:
        finish = getattr(reply, "stop_reason", None)
        span.set_attributes(_clean({
            "gen_ai.response.model": getattr(reply, "model", None),
            "gen_ai.usage.input_tokens": getattr(reply, "input_tokens", None),
            "gen_ai.usage.output_tokens": getattr(reply, "output_tokens", None),
            "gen_ai.usage.cache_read.input_tokens": getattr(reply, "cache_read_tokens", None) or None,
            "gen_ai.usage.cache_creation.input_tokens": getattr(reply, "cache_write_tokens", None) or None,
            "gen_ai.response.finish_reasons": [str(finish)] if finish else None,
        }))
        text = getattr(reply, "text", None)
        if _on is not None and _on.section.capture_content and text is not None:
            span.set_attribute("gen_ai.output.messages",
                               redact(_json([{"role": "assistant", "content": text}]))[:CONTENT_LIMIT])
    if failure is not None:
        span.set_attributes(_clean({"error.type": getattr(failure, "reason", None) or type(failure).__name__,
                                    "tron.failure.retryable": getattr(failure, "retryable", None)}))
        span.set_status(Status(StatusCode.ERROR, str(getattr(failure, "reason", failure))[:200]))


def event(span: Span | None, kind: str, /, **attributes: object) -> None:
    """A ladder decision carried out in this process (the provider desk's retry, switch,
    park), as an event on the attempt's span: ``tron.ladder.KIND`` with its case id."""
    if span is None:
        return
    span.add_event(f"tron.ladder.{kind}", _clean({f"tron.{k}": _attr(v)
                                                                       for k, v in attributes.items()}))


def _attr(value: object) -> str | bool | int | float:
    return value if isinstance(value, (str, bool, int, float)) else str(value)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=str)


# -- the daemon's ladder ---------------------------------------------------------------------------


def new_root(name: str, **attributes: AttributeValue | None) -> str | None:
    """A short span that starts a trace of its own (a task nobody traced, an incident outside
    tasks); its traceparent, or None when tracing is off."""
    if _on is None:
        return None
    span = _start(name, attributes=_clean(attributes), root=True)
    ctx = span.get_span_context()
    span.end()
    return format_traceparent(ctx.trace_id, ctx.span_id)


def ladder(kind: str, /, *, case: str | None, alert_id: str | None, service: str,
           task: dict[str, Any] | None = None, reason: str | None = None, links_attempts: tuple[int, ...] = (),
           **attributes: object) -> None:
    """A decision the daemon carried out, or an alert TRON raised: a short ``ladder KIND`` span
    with the event ``tron.ladder.KIND`` (its case id, alert id, reason), under the attempt of the
    task it concerns, or a trace of its own for a process incident outside tasks.
    ``links_attempts``: attempts of the task to link (a restart: the old one and the new one)."""
    if _on is None:
        return
    traceparent = (task or {}).get("traceparent")
    attempt_ctx = _attempt_context(traceparent, task["task_id"], task["attempt"]) if traceparent and task else None
    links = [_attempt_context(traceparent, task["task_id"], n) for n in links_attempts] if traceparent and task else []
    attrs = _clean({"tron.service": service, "tron.case": case, "tron.alert.id": alert_id, "tron.reason": reason,
                    "tron.task.id": (task or {}).get("task_id"), "tron.run.id": (task or {}).get("run_id"),
                    "tron.task.attempt": (task or {}).get("attempt"),
                    **{f"tron.{k}": _attr(v) for k, v in attributes.items()}})
    span = _start(f"ladder {kind}", parent=attempt_ctx, links=links, attributes=attrs, root=attempt_ctx is None)
    span.add_event(f"tron.ladder.{kind}", attrs)
    span.end()


def attempt_ended(agent: str, task: dict[str, Any], *, reason: str, case: str | None, alert_id: str | None) -> None:
    """The span of an attempt whose process was killed before it could export its own (kill -9,
    a hang, a runaway): written by the daemon with the attempt's derived span id, from the
    task's last change to now, so the attempt's steps and calls that did arrive hang under it."""
    if _on is None or not task.get("traceparent"):
        return
    parent = _parse(task["traceparent"])
    if parent is None:
        return
    from opentelemetry.trace import Status, StatusCode

    attempt = int(task["attempt"])
    previous = _attempt_context(task["traceparent"], task["task_id"], attempt - 1) if attempt > 1 else None
    attrs = _clean({"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent,
                    "gen_ai.provider.name": task.get("provider"), "tron.task.id": task["task_id"],
                    "tron.run.id": task["run_id"], "tron.task.kind": task.get("kind"), "tron.task.attempt": attempt,
                    "tron.task.result": "ended_by_ladder", "tron.task.reason": reason, "tron.case": case,
                    "tron.alert.id": alert_id, "tron.recorded_by": "daemon"})
    span = _start(f"invoke_agent {agent}", parent=parent, span_id=attempt_span_id(parent.trace_id, task["task_id"],
                                                                                 attempt),
                  links=[previous], attributes=attrs, start_time=_ns(task.get("updated_at")))
    span.set_status(Status(StatusCode.ERROR, reason))
    span.end()


def _ns(iso: str | None) -> int | None:
    """An ISO timestamp of the registry as OTel's nanoseconds since the epoch."""
    if not iso:
        return None
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e9)
    except ValueError:
        return None


def trace_link(template: str | None, traceparent: str | None) -> str | None:
    """The UI's link to a trace: ``[telemetry] trace_url`` with {trace_id} filled in."""
    trace_id = trace_id_of(traceparent)
    if not template or not trace_id:
        return None
    return template.replace("{trace_id}", trace_id)
