"""The LLM provider layer agents use: one `complete()` over Anthropic and Ollama.

The SDKs are imported lazily inside functions: `import anthropic` alone takes about
1.7 s, which would dominate an agent's cold start (and the supervisor's restart time).
Every failure leaves `complete()` as a `ProviderFailure` with a stable reason code, so
callers decide on retry and fallback from data, not from SDK exception classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any, Iterable, Protocol

from pydantic import BaseModel, ConfigDict

from common.redaction import REDACTED, redact  # noqa: F401 - one implementation, re-exported

PROVIDERS = ("anthropic", "ollama", "openai")
SIM_API_KEY = "sim-key"
OLLAMA_DEFAULT_HOST = "http://127.0.0.1:11434"

# Reason codes. Those in NON_RETRYABLE will fail the same way on any retry.
NON_RETRYABLE = frozenset({
    "authentication_error",
    "permission_error",
    "invalid_request_error",
    "not_found_error",
    "request_too_large",
    "not_configured",
})
_STATUS_REASONS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}
# Anthropic's `error.type` values, which name the category more reliably than the status.
_ANTHROPIC_TYPE_REASONS = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "request_too_large": "request_too_large",
    "rate_limit_error": "rate_limit_error",
    "api_error": "api_error",
    "overloaded_error": "overloaded_error",
    "timeout_error": "timeout",
}


def _check_provider(provider: str) -> None:
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


# --------------------------------------------------------------------------- settings


class ProviderSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sim_url: str | None = None  # base URL of llm_sim, e.g. "http://127.0.0.1:6190"
    anthropic_model: str = "claude-sonnet-4-5"
    ollama_model: str = "llama3.1"
    openai_model: str = "gpt-4o-mini"
    timeout_s: float = 30.0
    max_tokens: int = 512


def endpoint_for(
    provider: str, settings: ProviderSettings, env: Mapping[str, str] | None = None
) -> tuple[str | None, str | None]:
    """(base_url, api_key) for a provider.

    anthropic: the real API when ANTHROPIC_API_KEY is set (base URL from
    ANTHROPIC_BASE_URL, else None = the SDK default), otherwise the simulator with a
    dummy key. ollama: OLLAMA_HOST when set, otherwise the simulator, otherwise
    Ollama's own default host; ollama takes no key.
    Raises ProviderFailure(reason="not_configured") when anthropic has neither.
    """
    _check_provider(provider)
    env = os.environ if env is None else env
    if provider == "anthropic":
        if key := env.get("ANTHROPIC_API_KEY"):
            return env.get("ANTHROPIC_BASE_URL") or None, key
        if settings.sim_url:
            return settings.sim_url, SIM_API_KEY
        raise ProviderFailure(
            provider, "not_configured", retryable=False,
            message="no ANTHROPIC_API_KEY and no sim_url",
        )
    if provider == "openai":  # any OpenAI-compatible server: OpenAI itself, vLLM, LM Studio, llama.cpp
        if key := env.get("OPENAI_API_KEY"):
            return env.get("OPENAI_BASE_URL") or None, key
        if base := env.get("OPENAI_BASE_URL"):
            return base, "none"  # local servers take any key
        if settings.sim_url:
            return settings.sim_url.rstrip("/") + "/v1", SIM_API_KEY
        raise ProviderFailure(provider, "not_configured", retryable=False,
                              message="no OPENAI_API_KEY or OPENAI_BASE_URL, and no sim_url")
    host = env.get("OLLAMA_HOST") or settings.sim_url or OLLAMA_DEFAULT_HOST
    return host, None


class LLMReply(BaseModel):
    provider: str
    model: str
    text: str
    input_tokens: int
    output_tokens: int
    streamed: bool


# --------------------------------------------------------------------------- failures


class ProviderFailure(Exception):
    """A provider call that failed, reduced to what retry and fallback logic needs."""

    def __init__(
        self,
        provider: str,
        reason: str,
        *,
        retryable: bool | None = None,
        status: int | None = None,
        message: str = "",
        midstream: bool = False,
    ) -> None:
        self.provider = provider
        self.reason = reason
        self.retryable = reason not in NON_RETRYABLE if retryable is None else retryable
        self.status = status
        self.message = message
        self.midstream = midstream
        super().__init__(str(self))

    def __str__(self) -> str:
        status = f" [{self.status}]" if self.status is not None else ""
        where = " mid-stream" if self.midstream else ""
        return f"{self.provider}: {self.reason}{status}{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "reason": self.reason,
            "retryable": self.retryable,
            "status": self.status,
            "message": self.message,
            "midstream": self.midstream,
        }


def _instance_of(exc: BaseException, module: str, name: str) -> bool:
    """isinstance against a class of a module, without importing the module.

    An exception cannot be an instance of a class whose module was never imported, so
    looking in sys.modules keeps classify() from paying for `import anthropic`.
    """
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(exc, cls)


def _status_reason(status: int, provider: str) -> str:
    if provider == "ollama" and status == 503:
        return "overloaded_error"  # what Ollama answers when its queue is full
    if status in _STATUS_REASONS:
        return _STATUS_REASONS[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def _classify_anthropic_status(exc: Any, provider: str) -> ProviderFailure:
    status = exc.status_code
    message = redact(exc.api_message or exc.message or "")
    type_reason = _ANTHROPIC_TYPE_REASONS.get(exc.type or "")
    if status < 400:
        # An `event: error` inside a 200 stream: the HTTP status says nothing.
        return ProviderFailure(provider, type_reason or "stream_error", status=status,
                               message=message, midstream=True)
    return ProviderFailure(provider, type_reason or _status_reason(status, provider),
                           status=status, message=message)


def _classify_ollama_status(exc: Any, provider: str) -> ProviderFailure:
    status = exc.status_code
    message = redact(str(exc.error))
    if status == -1:
        # An {"error": ...} line in the middle of a stream.
        return ProviderFailure(provider, "stream_error", status=None, message=message, midstream=True)
    return ProviderFailure(provider, _status_reason(status, provider), status=status, message=message)


def _classify_openai_status(exc: Any, provider: str) -> ProviderFailure:
    status = exc.status_code
    body = exc.body if isinstance(getattr(exc, "body", None), dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    etype = error.get("code") or error.get("type")
    message = redact(getattr(exc, "message", "") or str(exc))
    if status < 400:  # an error event inside a 200 stream
        return ProviderFailure(provider, "stream_error", status=status, message=message, midstream=True)
    reason = {"rate_limit_exceeded": "rate_limit_error", "insufficient_quota": "rate_limit_error",
              "invalid_api_key": "authentication_error"}.get(str(etype), _status_reason(status, provider))
    if status == 503:
        reason = "overloaded_error"
    return ProviderFailure(provider, reason, status=status, message=message)


def _is_timeout(exc: BaseException) -> bool:
    # asyncio.TimeoutError is TimeoutError on 3.11. anthropic wraps httpx2 timeouts in
    # APITimeoutError; ollama lets httpx's own timeouts through; a stream read can
    # raise either HTTP library's timeout unwrapped.
    return (
        isinstance(exc, TimeoutError)
        or _instance_of(exc, "anthropic", "APITimeoutError")
        or _instance_of(exc, "openai", "APITimeoutError")
        or _instance_of(exc, "httpx", "TimeoutException")
        or _instance_of(exc, "httpx2", "TimeoutException")
    )


def _is_connection_error(exc: BaseException) -> bool:
    # ollama turns httpx.ConnectError into the builtin ConnectionError; resets and
    # protocol errors come through as the HTTP library's TransportError.
    return (
        isinstance(exc, ConnectionError)
        or _instance_of(exc, "anthropic", "APIConnectionError")
        or _instance_of(exc, "openai", "APIConnectionError")
        or _instance_of(exc, "httpx", "TransportError")
        or _instance_of(exc, "httpx2", "TransportError")
    )


def classify(exc: BaseException, provider: str) -> ProviderFailure:
    """Reduce any exception from a provider call to a ProviderFailure.

    Classifies by HTTP status and the provider's error type rather than by exception
    class alone (an Anthropic stream error is a plain APIStatusError with status 200).
    Unknown exceptions become `unexpected_error:<ClassName>`, retryable.
    """
    if isinstance(exc, ProviderFailure):
        return exc
    if _is_timeout(exc):
        return ProviderFailure(provider, "timeout", message=_message(exc))
    if _instance_of(exc, "anthropic", "APIStatusError"):
        return _classify_anthropic_status(exc, provider)
    if _instance_of(exc, "ollama", "ResponseError"):
        return _classify_ollama_status(exc, provider)
    if _instance_of(exc, "openai", "APIStatusError"):
        return _classify_openai_status(exc, provider)
    if _is_connection_error(exc):
        return ProviderFailure(provider, "connection_error", message=_message(exc))
    return ProviderFailure(
        provider, f"unexpected_error:{type(exc).__name__}", retryable=True, message=_message(exc)
    )


def _message(exc: BaseException) -> str:
    # httpx timeouts often have an empty str(); the class name still says what happened.
    return redact(str(exc)) or type(exc).__name__


# --------------------------------------------------------------------------- clients

# Clients hold connection pools bound to the loop that first used them, so the cache is
# per event loop. Entries of closed loops are dropped on the next lookup (a plain dict,
# not a WeakKeyDictionary, because not every loop implementation supports weakrefs).
_clients: dict[asyncio.AbstractEventLoop, dict[tuple, Any]] = {}


def _client_for(provider: str, base_url: str | None, api_key: str | None, timeout_s: float) -> Any:
    for stale in [loop for loop in _clients if loop.is_closed()]:
        del _clients[stale]
    # The timeout is part of the key: ollama takes it only at construction.
    key = (provider, base_url, api_key, timeout_s)
    cache = _clients.setdefault(asyncio.get_running_loop(), {})
    if key not in cache:
        cache[key] = _build_client(provider, base_url, api_key, timeout_s)
    return cache[key]


def _build_client(provider: str, base_url: str | None, api_key: str | None, timeout_s: float) -> Any:
    if provider == "anthropic":
        import anthropic

        # max_retries=0: retry and fallback are the caller's decisions, not the SDK's.
        return anthropic.AsyncAnthropic(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s
        )
    if provider == "openai":
        import openai

        return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
    import ollama

    # Always an explicit host and timeout: ollama has no timeout by default and its
    # module-level functions read OLLAMA_HOST once, at import.
    return ollama.AsyncClient(host=base_url, timeout=timeout_s)


def client_for(provider: str, settings: ProviderSettings) -> Any:
    """The cached SDK client for ``provider`` under ``settings`` (on the running loop)."""
    _check_provider(provider)
    base_url, api_key = endpoint_for(provider, settings)
    return _client_for(provider, base_url, api_key, settings.timeout_s)


async def aclose_clients() -> None:
    """Close the cached clients of the running loop (they are rebuilt on next use)."""
    cache = _clients.pop(asyncio.get_running_loop(), {})
    for client in cache.values():
        with contextlib.suppress(Exception):
            await client.close()


_warm = False


SDKS = ("anthropic", "ollama", "openai")


def warm_up(sdks: Iterable[str] = SDKS) -> None:
    """One failing call through each SDK named, to a loopback port nobody listens on: what
    the SDKs import on their first request (the HTTP transport, the TLS trust store,
    tracing: 56 modules, 0.25 s here) is imported now, not on an agent's event loop while
    TRON counts its beats. Run where no event loop runs (the fork server, a thread); once
    per process (a forked child inherits it done)."""
    global _warm
    if _warm:
        return
    _warm = True
    sdks = set(sdks)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        ask = [{"role": "user", "content": "warm up"}]

        def anthropic_call():
            import anthropic

            return anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0, timeout=1) \
                .messages.create(model="m", max_tokens=1, messages=ask)

        def openai_call():
            import openai

            return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=1) \
                .chat.completions.create(model="m", messages=ask)

        def ollama_call():
            import ollama

            return ollama.AsyncClient(host=url, timeout=1).chat(model="m", messages=ask)

        calls_by_sdk = {"anthropic": anthropic_call, "openai": openai_call, "ollama": ollama_call}

        async def calls() -> None:
            for name in SDKS:
                if name in sdks:
                    with contextlib.suppress(Exception):
                        await calls_by_sdk[name]()

        asyncio.run(calls())


# --------------------------------------------------------------------------- complete


async def _anthropic_complete(
    client: Any, system: str, prompt: str, settings: ProviderSettings, stream: bool
) -> LLMReply:
    kwargs: dict[str, Any] = {
        "model": settings.anthropic_model,
        "max_tokens": settings.max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    }
    if system:  # the API rejects an empty system prompt
        kwargs["system"] = system
    if not stream:
        msg = await client.messages.create(**kwargs)
        text = "".join(block.text for block in msg.content if block.type == "text")
        return LLMReply(provider="anthropic", model=msg.model, text=text, streamed=False,
                        input_tokens=msg.usage.input_tokens, output_tokens=msg.usage.output_tokens)

    parts: list[str] = []
    model, input_tokens, output_tokens = settings.anthropic_model, 0, 0
    async with await client.messages.create(**kwargs, stream=True) as events:
        async for event in events:
            if event.type == "message_start":
                model, input_tokens = event.message.model, event.message.usage.input_tokens
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                parts.append(event.delta.text)
            elif event.type == "message_delta":
                output_tokens = event.usage.output_tokens
    return LLMReply(provider="anthropic", model=model, text="".join(parts), streamed=True,
                    input_tokens=input_tokens, output_tokens=output_tokens)


async def _ollama_complete(
    client: Any, system: str, prompt: str, settings: ProviderSettings, stream: bool
) -> LLMReply:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    kwargs: dict[str, Any] = {
        "model": settings.ollama_model,
        "messages": messages,
        "options": {"num_predict": settings.max_tokens},
    }
    if not stream:
        resp = await client.chat(**kwargs, stream=False)
        return LLMReply(provider="ollama", model=resp.model or settings.ollama_model,
                        text=resp.message.content or "", streamed=False,
                        input_tokens=resp.prompt_eval_count or 0, output_tokens=resp.eval_count or 0)

    parts: list[str] = []
    final: Any = None
    # aclosing: release the HTTP stream even when we are cancelled mid-iteration.
    async with contextlib.aclosing(await client.chat(**kwargs, stream=True)) as chunks:
        async for chunk in chunks:
            parts.append(chunk.message.content or "")
            if chunk.done:
                final = chunk
    return LLMReply(provider="ollama", model=(final and final.model) or settings.ollama_model,
                    text="".join(parts), streamed=True,
                    input_tokens=(final and final.prompt_eval_count) or 0,
                    output_tokens=(final and final.eval_count) or 0)


async def _openai_complete(
    client: Any, system: str, prompt: str, settings: ProviderSettings, stream: bool
) -> LLMReply:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    kwargs: dict[str, Any] = {"model": settings.openai_model, "messages": messages,
                              "max_tokens": settings.max_tokens}
    if not stream:
        resp = await client.chat.completions.create(**kwargs)
        usage = resp.usage
        return LLMReply(provider="openai", model=resp.model, text=resp.choices[0].message.content or "",
                        streamed=False, input_tokens=usage.prompt_tokens if usage else 0,
                        output_tokens=usage.completion_tokens if usage else 0)
    parts: list[str] = []
    model, usage = settings.openai_model, None
    stream_resp = await client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    async with stream_resp as chunks:  # closes the HTTP stream even when we are cancelled
        async for chunk in chunks:
            model = chunk.model or model
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
    return LLMReply(provider="openai", model=model, text="".join(parts), streamed=True,
                    input_tokens=usage.prompt_tokens if usage else 0,
                    output_tokens=usage.completion_tokens if usage else 0)


_CALLS = {"anthropic": _anthropic_complete, "ollama": _ollama_complete, "openai": _openai_complete}


async def complete(
    provider: str, *, system: str, prompt: str, settings: ProviderSettings, stream: bool = False
) -> LLMReply:
    """One completion from `provider` through its real SDK.

    Raises ProviderFailure for every failure (the SDK exception is its __cause__).
    The SDK timeout is settings.timeout_s; asyncio.wait_for at timeout_s + 1 is a belt
    in case some phase of a call escapes the HTTP library's timeouts.
    """
    _check_provider(provider)
    base_url, api_key = endpoint_for(provider, settings)
    call = _CALLS[provider]
    try:
        client = _client_for(provider, base_url, api_key, settings.timeout_s)
        return await asyncio.wait_for(
            call(client, system, prompt, settings, stream), settings.timeout_s + 1
        )
    except ProviderFailure:
        raise
    except Exception as exc:  # CancelledError is a BaseException and passes through
        raise classify(exc, provider) from exc


# --------------------------------------------------------------------------- redaction



# --------------------------------------------------------------------------- the interface


class Provider(Protocol):
    """One LLM backend. ``complete`` answers, or raises ``ProviderFailure`` classified by
    status and error type (retryable or not)."""

    name: str

    async def complete(self, *, system: str, prompt: str, settings: ProviderSettings,
                       stream: bool = False) -> LLMReply: ...


class SdkProvider:
    """A real provider through its own SDK (anthropic, ollama): llm-sim stands in for the
    service when no key or host is configured."""

    def __init__(self, name: str) -> None:
        _check_provider(name)
        self.name = name

    async def complete(self, *, system: str, prompt: str, settings: ProviderSettings,
                       stream: bool = False) -> LLMReply:
        return await complete(self.name, system=system, prompt=prompt, settings=settings, stream=stream)


class StubProvider:
    """The stub backend: deterministic answers, failures on demand, no network.
    ``fail_with(reason, times=n)`` makes the next n calls fail with that reason."""

    def __init__(self, name: str = "stub") -> None:
        self.name = name
        self.calls: list[str] = []
        self._faults: list[str] = []

    def fail_with(self, reason: str, *, times: int = 1) -> None:
        self._faults += [reason] * times

    async def complete(self, *, system: str, prompt: str, settings: ProviderSettings,
                       stream: bool = False) -> LLMReply:
        self.calls.append(prompt)
        await asyncio.sleep(0)
        if self._faults:
            raise ProviderFailure(self.name, self._faults.pop(0), message="stub fault")
        words = prompt.split()
        text = f"[stub:{self.name}] " + " ".join(words[: max(1, min(len(words), settings.max_tokens))])
        return LLMReply(provider=self.name, model="stub", text=text, streamed=stream,
                        input_tokens=len((system + " " + prompt).split()), output_tokens=len(text.split()))


def provider_for(name: str) -> Provider:
    return SdkProvider(name)
