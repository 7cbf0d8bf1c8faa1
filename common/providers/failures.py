"""classify(): any exception from a provider call, reduced to a ProviderFailure.

By HTTP status and the provider's error type rather than exception class alone (an
Anthropic stream error is a plain APIStatusError with status 200). Each registered kind
reads its own SDK's status errors (reason, ``retry_after``, ``limits`` from the failing
response's headers); what is left (timeouts, connection errors, a cut stream) reads the
same for every SDK.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping

from tron.common.providers.base import ProviderFailure, instance_of, kinds
from tron.common.redaction import redact

# What httpx (and its anthropic fork httpx2) say when a chunked body stops part-way:
# the answer had started, so this is a cut stream, not a failure to connect.
_CUT_MARKERS = ("incomplete chunked read", "without sending complete message body")


def _is_timeout(exc: BaseException) -> bool:
    # asyncio.TimeoutError is TimeoutError on 3.11. anthropic and openai wrap their HTTP
    # library's timeouts in APITimeoutError; ollama lets httpx's own through; a stream
    # read can raise either HTTP library's timeout unwrapped.
    return (
        isinstance(exc, TimeoutError)
        or instance_of(exc, "anthropic", "APITimeoutError")
        or instance_of(exc, "openai", "APITimeoutError")
        or instance_of(exc, "httpx", "TimeoutException")
        or instance_of(exc, "httpx2", "TimeoutException")
    )


def _is_connection_error(exc: BaseException) -> bool:
    # ollama turns httpx.ConnectError into the builtin ConnectionError; resets and
    # protocol errors come through as the HTTP library's TransportError.
    return (
        isinstance(exc, ConnectionError)
        or instance_of(exc, "anthropic", "APIConnectionError")
        or instance_of(exc, "openai", "APIConnectionError")
        or instance_of(exc, "httpx", "TransportError")
        or instance_of(exc, "httpx2", "TransportError")
    )


def _is_cut(exc: BaseException) -> bool:
    """A body that stopped part-way, anywhere in the chain (anthropic wraps the HTTP
    library's RemoteProtocolError in APIConnectionError)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if any(marker in str(cur) for marker in _CUT_MARKERS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _message(exc: BaseException) -> str:
    # httpx timeouts often have an empty str(); the class name still says what happened.
    return redact(str(exc)) or type(exc).__name__


def classify(exc: BaseException, provider: str, *, midstream: bool = False,
             limits: Mapping[str, float] | None = None, now: float | None = None) -> ProviderFailure:
    """Reduce any exception from a provider call to a ProviderFailure.

    midstream: the exception came while reading an answer that had started; a dropped
      connection is then ``stream_cut``, not ``connection_error``.
    limits: the rate-limit headers already read from the answer (a stream's), kept on the
      failure when the exception brings none of its own.
    now: wall-clock seconds (default: the wall clock), for reset times given as dates.

    Unknown exceptions become ``unexpected_error:<ClassName>``, retryable.
    """
    if isinstance(exc, ProviderFailure):
        return exc
    now = time.time() if now is None else now
    failure = _classify(exc, provider, midstream, now)
    if limits and not failure.limits:
        failure.limits = dict(limits)
    return failure


def _classify(exc: BaseException, provider: str, midstream: bool, now: float) -> ProviderFailure:
    if _is_timeout(exc):
        return ProviderFailure(provider, "timeout", message=_message(exc), midstream=midstream)
    for kind in kinds():
        if (failure := kind.classify_status(exc, provider, now)) is not None:
            return failure
    if _is_connection_error(exc):
        if midstream or _is_cut(exc):
            return ProviderFailure(provider, "stream_cut", message=_message(exc), midstream=True)
        return ProviderFailure(provider, "connection_error", message=_message(exc))
    return ProviderFailure(provider, f"unexpected_error:{type(exc).__name__}", retryable=True,
                           message=_message(exc), midstream=midstream)


class StreamReading:
    """What ``reading_stream`` knows: whether the answer has started (a byte arrived)."""

    def __init__(self, started: bool) -> None:
        self.started = started


@contextlib.contextmanager
def reading_stream(provider: str, limits: Mapping[str, float] | None = None, *,
                   started: bool = True) -> Iterator[StreamReading]:
    """Around the iteration of a stream: once the answer has started, what escapes is
    classified as mid-stream (a dropped connection is ``stream_cut``) and keeps the
    stream's ``limits``. started: False for an SDK that connects on the first iteration
    (ollama); it sets ``.started`` on the yielded object when the first chunk arrives.
    CancelledError is a BaseException and passes through."""
    reading = StreamReading(started)
    try:
        yield reading
    except ProviderFailure:
        raise
    except Exception as exc:
        raise classify(exc, provider, midstream=reading.started, limits=limits) from exc
