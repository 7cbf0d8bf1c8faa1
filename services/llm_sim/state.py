"""The simulator's mutable state: per-provider faults and counters, the model catalog,
and which Ollama models count as loaded (for /api/ps). One SimState per app, so two apps
in one process never share faults."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tron.common.providers.base import SIM_SURFACES
from tron.services.llm_sim.catalog import Catalog

PROVIDERS = SIM_SURFACES  # the APIs it speaks; each registered provider kind names the one that serves it

# A provider's bad days, in three groups by where the fault acts:
#   refused   the request gets the API's error answer instead of a reply
#   held      the reply is late, slow, or never comes (the connection stays open)
#   shaped    the reply is a well-formed 200 that a client must still cope with
REFUSING_KINDS = ("overloaded", "rate-limit", "usage-limit", "error", "auth")
HOLDING_KINDS = ("latency", "hang", "stall", "trickle")
BROKEN_STREAM_KINDS = ("midstream", "cut")  # the reply starts, then fails part-way
SHAPING_KINDS = ("empty", "max-tokens", "refusal", "bad-tool-args")
FAULT_KINDS = REFUSING_KINDS + HOLDING_KINDS + BROKEN_STREAM_KINDS + SHAPING_KINDS
FaultKind = Literal[
    "overloaded", "rate-limit", "usage-limit", "error", "auth",
    "latency", "hang", "stall", "trickle",
    "midstream", "cut",
    "empty", "max-tokens", "refusal", "bad-tool-args",
]
RATE_LIMIT_KINDS = ("rate-limit", "usage-limit")  # answered 429; counted in `rate_limited`
DEFAULT_RETRY_AFTER_MS = {"rate-limit": 1000, "usage-limit": 3_600_000}
DEFAULT_TRICKLE_MS = 200  # one streamed delta per this many ms when latency_ms is 0


class FaultSpec(BaseModel):
    """Body of PUT /sim/faults/{provider}.

    kind: what goes wrong (FAULT_KINDS; app.py's docstring says what each does).
    latency_ms: a delay before the fault takes effect; for `stall` how long the stream
      stops after its first event (0: until the client gives up), for `trickle` the gap
      between streamed deltas (0: DEFAULT_TRICKLE_MS).
    times: the fault clears itself after this many requests (None: no limit).
    after: this many requests are let through untouched first, then the fault takes effect
      (a test can hold the second call of a run and not the first); they use none of `times`.
    duration_ms: the fault clears itself this long after it was set (None: no limit).
    retry_after_ms: what a 429 tells clients to wait (retry-after, retry-after-ms and the
      rate-limit reset headers); defaults to 1 s for rate-limit, 1 h for usage-limit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    latency_ms: int = Field(0, ge=0, le=3_600_000)
    times: int | None = Field(None, ge=1)
    after: int = Field(0, ge=0, le=1_000_000)
    duration_ms: int | None = Field(None, ge=1, le=86_400_000)
    retry_after_ms: int = Field(1000, ge=0, le=86_400_000)  # the default depends on kind: see below

    @model_validator(mode="before")
    @classmethod
    def _default_retry_after(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("retry_after_ms") is None:
            return data | {"retry_after_ms": DEFAULT_RETRY_AFTER_MS.get(data.get("kind"), 1000)}
        return data

    def trickle_s(self) -> float:
        return (self.latency_ms or DEFAULT_TRICKLE_MS) / 1000


@dataclass
class Counters:
    """What one provider was sent and what it did; exact, so tests can assert on them.

    requests: fault-eligible requests received (generation and embeddings), refused or not.
    served: requests answered with a complete 200 (a shaped fault's answer included).
    faults_injected: requests a fault was applied to.
    rate_limited: requests answered 429 by a rate-limit or usage-limit fault.
    by_kind: faults_injected per fault kind.
    tokens: per model, the calls answered whole and the input/output tokens their usage said.
    """

    requests: int = 0
    served: int = 0
    faults_injected: int = 0
    rate_limited: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    # What the whole answers reported as usage, per model: {"calls", "input_tokens", "output_tokens"}.
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)

    def bill(self, model: str, input_tokens: int, output_tokens: int) -> None:
        t = self.tokens.setdefault(model, {"calls": 0, "input_tokens": 0, "output_tokens": 0})
        t["calls"] += 1
        t["input_tokens"] += input_tokens
        t["output_tokens"] += output_tokens

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "served": self.served, "faults_injected": self.faults_injected,
                "rate_limited": self.rate_limited, "by_kind": dict(self.by_kind),
                "tokens": {m: dict(t) for m, t in self.tokens.items()}}


@dataclass
class ProviderState:
    """The current fault of one provider and its request counters.

    Methods that depend on time take `now` (monotonic seconds), so `duration_ms` is
    decided without reading a clock here.
    """

    fault: FaultSpec | None = None
    remaining: int | None = None  # requests left before the fault clears itself
    passing: int = 0  # requests still let through untouched before the fault takes effect (FaultSpec.after)
    expires_at: float | None = None  # monotonic time at which the fault clears itself
    counters: Counters = field(default_factory=Counters)
    # The current minute's use, for the rate-limit headers of a success (wire.limit_headers).
    minute: int = -1
    minute_requests: int = 0
    minute_tokens: int = 0
    hanging: int = 0  # requests held right now by a `hang` or an endless `stall` (a gauge, never reset)

    def set_fault(self, fault: FaultSpec, now: float) -> None:
        self.fault = fault
        self.remaining = fault.times
        self.passing = fault.after
        self.expires_at = None if fault.duration_ms is None else now + fault.duration_ms / 1000

    def clear_fault(self) -> bool:
        had = self.fault is not None
        self.fault, self.remaining, self.expires_at, self.passing = None, None, None, 0
        return had

    def current(self, now: float) -> FaultSpec | None:
        """The fault in force at `now`; one whose duration has run out is cleared."""
        if self.expires_at is not None and now >= self.expires_at:
            self.clear_fault()
        return self.fault

    def take_fault(self, now: float) -> FaultSpec | None:
        """The fault for the request being handled, consuming exactly one of its `times`;
        None for a request that `after` still lets through."""
        fault = self.current(now)
        if fault is None:
            return None
        if self.passing > 0:
            self.passing -= 1
            return None
        self.counters.faults_injected += 1
        self.counters.by_kind[fault.kind] = self.counters.by_kind.get(fault.kind, 0) + 1
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:
                self.clear_fault()
        return fault

    def reset_counters(self) -> None:
        self.counters = Counters()

    def snapshot(self, now: float) -> dict[str, Any]:
        fault = self.current(now)
        left_ms = None if self.expires_at is None else max(0, round((self.expires_at - now) * 1000))
        return {
            "fault": None if fault is None else fault.model_dump(),
            "remaining": self.remaining,
            "passing": self.passing,
            "expires_in_ms": left_ms,
            "counters": self.counters.as_dict() | {"hanging": self.hanging},
        }


@dataclass
class LoadedModels:
    """Ollama models that answered recently and are still "in memory" (keep_alive).

    Deadlines are monotonic; `wall` keeps the matching wall-clock time that /api/ps
    reports as expires_at.
    """

    deadlines: dict[str, tuple[float, float]] = field(default_factory=dict)

    def touch(self, name: str, keep_alive_s: float | None) -> None:
        """Mark `name` used now; keep_alive_s 0 unloads it, None keeps it forever."""
        if keep_alive_s == 0:
            self.deadlines.pop(name, None)
            return
        span = 100 * 365 * 86400.0 if keep_alive_s is None else keep_alive_s
        self.deadlines[name] = (time.monotonic() + span, time.time() + span)

    def current(self) -> list[tuple[str, float]]:
        """(name, wall-clock expiry) of the models still loaded, longest-lived first."""
        now = time.monotonic()
        for name in [n for n, (mono, _) in self.deadlines.items() if mono <= now]:
            del self.deadlines[name]
        return sorted(((n, wall) for n, (_, wall) in self.deadlines.items()), key=lambda p: -p[1])


@dataclass
class HeldThreads:
    """Conversations the server holds under a response id: the Messages API's beta
    `thread` parameter, with which clients (the SDK's tool runner among them) send only
    each turn's new messages. The oldest are dropped beyond `limit`."""

    limit: int = 1000
    held: OrderedDict[str, tuple[Any, ...]] = field(default_factory=OrderedDict)

    def hold(self, msg_id: str, messages: list[Any]) -> None:
        self.held[msg_id] = tuple(messages)
        while len(self.held) > self.limit:
            self.held.popitem(last=False)

    def get(self, msg_id: str) -> tuple[Any, ...] | None:
        return self.held.get(msg_id)


@dataclass
class SimState:
    token: str | None
    catalog: Catalog
    providers: dict[str, ProviderState] = field(
        default_factory=lambda: {p: ProviderState() for p in PROVIDERS}
    )
    loaded: LoadedModels = field(default_factory=LoadedModels)
    threads: HeldThreads = field(default_factory=HeldThreads)
    batches: dict[str, Any] = field(default_factory=dict)  # Message Batches by id (anthropic_batches.MessageBatch)
    closing: bool = False  # set on shutdown so held requests let go
    clock: Callable[[], float] = time.monotonic  # for fault durations; tests may hand in their own


SIM_STATE = web.AppKey("llm_sim_state", SimState)
