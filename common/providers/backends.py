"""The ``Provider`` interface agents call, with its real backend (``SdkProvider``) and its
stub (``StubProvider``); ``provider_for`` builds one, through a factory a test can swap
(``provider_factory``) so that switching provider is swapping one object."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from tron.common.providers.base import LLMReply, ProviderFailure, ProviderSettings, get
from tron.common.providers.client import complete


class Provider(Protocol):
    """One LLM backend. ``complete`` answers, or raises ``ProviderFailure`` classified by
    status and error type (retryable or not)."""

    name: str

    async def complete(self, *, system: str, prompt: str, settings: ProviderSettings,
                       stream: bool = False) -> LLMReply: ...


class SdkProvider:
    """A real provider through its own SDK (its registered kind): llm-sim stands in for the
    service when no key or host is configured."""

    def __init__(self, name: str) -> None:
        get(name)  # an unknown name fails here, not on the first call
        self.name = name

    async def complete(self, *, system: str, prompt: str, settings: ProviderSettings,
                       stream: bool = False) -> LLMReply:
        return await complete(self.name, system=system, prompt=prompt, settings=settings, stream=stream)


class StubProvider:
    """The stub backend: deterministic answers, failures on demand, no network.

    ``fail_with(reason, times=n)`` makes the next n calls fail with that reason (and the
    retry_after and limits given); ``answer_with(times=n, **fields)`` makes the next n
    answers carry those LLMReply fields (an empty text, a stop_reason of "max_tokens", a
    refusal...): the broken 200s the output checks catch. Faults come before answers."""

    def __init__(self, name: str = "stub") -> None:
        self.name = name
        self.calls: list[str] = []
        self._faults: list[ProviderFailure] = []
        self._answers: list[dict[str, Any]] = []

    def fail_with(self, reason: str, *, times: int = 1, retry_after: float | None = None,
                  limits: Mapping[str, float] | None = None) -> None:
        self._faults += [ProviderFailure(self.name, reason, message="stub fault", retry_after=retry_after,
                                         limits=limits) for _ in range(times)]

    def answer_with(self, *, times: int = 1, **fields: Any) -> None:
        unknown = set(fields) - set(LLMReply.model_fields)
        if unknown:
            raise TypeError(f"LLMReply has no field {sorted(unknown)}")
        self._answers += [fields] * times

    async def complete(self, *, system: str, prompt: str, settings: ProviderSettings,
                       stream: bool = False) -> LLMReply:
        self.calls.append(prompt)
        await asyncio.sleep(0)
        if self._faults:
            raise self._faults.pop(0)
        words = prompt.split()
        text = f"[stub:{self.name}] " + " ".join(words[: max(1, min(len(words), settings.max_tokens))])
        reply = LLMReply(provider=self.name, model="stub", text=text, streamed=stream, stop_reason="end",
                         input_tokens=len((system + " " + prompt).split()), output_tokens=len(text.split()))
        if self._answers:
            reply = reply.model_copy(update=self._answers.pop(0))
        return reply


ProviderFactory = Callable[[str], Provider]
_factory: ProviderFactory = SdkProvider


def provider_for(name: str) -> Provider:
    """The provider called ``name``: the real one through its SDK, unless a test swapped the
    factory (``provider_factory``)."""
    return _factory(name)


@contextlib.contextmanager
def provider_factory(factory: ProviderFactory) -> Iterator[None]:
    """``provider_for`` builds with ``factory`` inside the with block (a test hands every
    caller a StubProvider: ``with provider_factory(lambda name: stub): ...``)."""
    global _factory
    previous, _factory = _factory, factory
    try:
        yield
    finally:
        _factory = previous
