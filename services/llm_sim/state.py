"""The simulator's mutable state: per-provider faults and counters, the model catalog,
and which Ollama models count as loaded (for /api/ps). One SimState per app, so two apps
in one process never share faults."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from services.llm_sim.catalog import Catalog

PROVIDERS = ("anthropic", "ollama", "openai")
FaultKind = Literal["latency", "hang", "overloaded", "rate-limit", "error", "auth", "midstream"]


class FaultSpec(BaseModel):
    """Body of PUT /sim/faults/{provider}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    latency_ms: int = Field(0, ge=0, le=3_600_000)
    times: int | None = Field(None, ge=1)
    # What a rate-limit fault tells clients to wait (retry-after, and retry-after-ms,
    # which the anthropic and openai SDKs prefer): small values keep retry tests fast.
    retry_after_ms: int = Field(1000, ge=0, le=3_600_000)


@dataclass
class ProviderState:
    """The current fault of one provider and its request counters."""

    fault: FaultSpec | None = None
    remaining: int | None = None  # requests left before the fault clears itself
    requests: int = 0  # fault-eligible requests received (generation and embeddings)
    served: int = 0  # answered normally (including after injected latency)
    faults_injected: int = 0  # requests a fault was applied to
    hanging: int = 0  # requests currently held by a `hang` fault

    def set_fault(self, fault: FaultSpec) -> None:
        self.fault = fault
        self.remaining = fault.times

    def clear_fault(self) -> bool:
        had = self.fault is not None
        self.fault, self.remaining = None, None
        return had

    def take_fault(self) -> FaultSpec | None:
        """The fault for the request being handled, consuming one of its `times`."""
        fault = self.fault
        if fault is None:
            return None
        self.faults_injected += 1
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:
                self.clear_fault()
        return fault

    def snapshot(self) -> dict[str, Any]:
        return {
            "fault": None if self.fault is None else self.fault.model_dump(),
            "remaining": self.remaining,
            "counters": {
                "requests": self.requests,
                "served": self.served,
                "faults_injected": self.faults_injected,
                "hanging": self.hanging,
            },
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
    closing: bool = False  # set on shutdown so held requests let go


SIM_STATE = web.AppKey("llm_sim_state", SimState)
