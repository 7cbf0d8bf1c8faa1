"""Anthropic (the Messages API) through the ``anthropic`` SDK; llm-sim stands in for it
when ANTHROPIC_API_KEY is not set."""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Mapping
from typing import Any

from tron.common.providers.base import (
    SIM_API_KEY,
    LLMReply,
    ProviderFailure,
    ProviderKind,
    ProviderSettings,
    StopReason,
    ToolCall,
    ToolSchemas,
    Usage,
    anthropic_usage,
    field_of,
    register,
    says_usage_limit,
    status_reason,
)
from tron.common.providers.failures import reading_stream
from tron.common.providers.headers import anthropic_limits, retry_after
from tron.common.redaction import redact

# Anthropic's `error.type` values, which name the category more reliably than the status.
_TYPE_REASONS = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "billing_error": "usage_limit",  # out of credit: another provider may still answer
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "request_too_large": "request_too_large",
    "rate_limit_error": "rate_limit_error",
    "api_error": "api_error",
    "overloaded_error": "overloaded_error",
    "timeout_error": "timeout",
}
_STOP_REASONS: dict[str, StopReason] = {"end_turn": "end", "max_tokens": "max_tokens", "stop_sequence": "stop_sequence",
                 "tool_use": "tool_use", "refusal": "refusal",
                 # the context window ended the answer: as truncated as max_tokens
                 "model_context_window_exceeded": "max_tokens"}


def stop_reason(raw: str | None) -> StopReason | None:
    return _STOP_REASONS.get(raw or "")


class Anthropic(ProviderKind):
    name = "anthropic"
    sdk = "anthropic"
    default_model = "claude-sonnet-4-5"
    model_setting = "anthropic_model"
    sim_surface = "anthropic"

    def endpoint(self, settings: ProviderSettings, env: Mapping[str, str]) -> tuple[str | None, str | None]:
        if key := env.get("ANTHROPIC_API_KEY"):
            return env.get("ANTHROPIC_BASE_URL") or None, key
        if settings.sim_url:
            return settings.sim_url, SIM_API_KEY
        raise ProviderFailure(self.name, "not_configured", retryable=False,
                              message="no ANTHROPIC_API_KEY and no sim_url")

    def build_client(self, base_url: str | None, api_key: str | None, timeout_s: float) -> Any:
        import anthropic

        # The SDK's own OpenTelemetry spans off (from 2.17): Tron writes each call's span itself,
        # redacted (common/telemetry.py); the SDK's would double it and cost ~0.1 ms a call.
        if _has_otel_option():
            return anthropic.AsyncAnthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s,
                                            open_telemetry=False)
        return anthropic.AsyncAnthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)

    def read_limits(self, headers: Mapping[str, str], now: float) -> dict[str, float]:
        return anthropic_limits(headers, now)

    def classify_status(self, exc: BaseException, provider: str, now: float) -> ProviderFailure | None:
        if sys.modules.get("anthropic") is None:  # never imported, so exc is none of its errors (importing costs 1.7 s)
            return None
        import anthropic

        if not isinstance(exc, anthropic.APIStatusError):
            return None
        status = exc.status_code
        message = redact(exc.api_message or exc.message or "")
        type_reason = _TYPE_REASONS.get(exc.type or "")
        headers = exc.response.headers
        if status < 400:
            # An `event: error` inside a 200 stream: the HTTP status says nothing.
            return ProviderFailure(provider, type_reason or "stream_error", status=status, message=message,
                                   midstream=True, limits=self.read_limits(headers, now))
        reason = type_reason or status_reason(status)
        if status == 429 and says_usage_limit(message):
            reason = "usage_limit"
        return ProviderFailure(provider, reason, status=status, message=message,
                               retry_after=retry_after(headers, now), limits=self.read_limits(headers, now))

    async def complete(self, client: Any, system: str, prompt: str, settings: ProviderSettings,
                       stream: bool) -> LLMReply:
        kwargs: dict[str, Any] = {"model": self.model(settings), "max_tokens": settings.max_tokens,
                                  "messages": [{"role": "user", "content": prompt}]}
        if system:  # the API rejects an empty system prompt
            kwargs["system"] = system
        if not stream:
            raw = await client.messages.with_raw_response.create(**kwargs)
            reply = self.reply_of(await raw.parse())
            return reply.model_copy(update={"limits": self.read_limits(raw.headers, time.time())})

        parts: list[str] = []
        model, stop, usage = self.model(settings), None, anthropic_usage(None)
        events = await client.messages.create(**kwargs, stream=True)
        limits = self.read_limits(events.response.headers, time.time())
        async with events:
            with reading_stream(self.name, limits):
                async for event in events:
                    if event.type == "message_start":
                        model, usage = event.message.model, anthropic_usage(event.message.usage)
                    elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                        parts.append(event.delta.text)
                    elif event.type == "message_delta":
                        # The final counts (cumulative); input counts here when the API sends them.
                        final = anthropic_usage(event.usage)
                        usage = Usage(input_tokens=final["input_tokens"] or usage["input_tokens"],
                                      output_tokens=final["output_tokens"],
                                      cache_read_tokens=final["cache_read_tokens"] or usage["cache_read_tokens"],
                                      cache_write_tokens=final["cache_write_tokens"] or usage["cache_write_tokens"])
                        stop = event.delta.stop_reason or stop
        return LLMReply(provider=self.name, model=model, text="".join(parts), streamed=True, **usage,
                        stop_reason=stop_reason(stop), refusal=stop == "refusal", limits=limits)

    def warm_up_call(self, url: str) -> Any:
        import anthropic

        client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0, timeout=1)
        return client.messages.create(model="m", max_tokens=1, messages=[{"role": "user", "content": "warm up"}])

    def reply_of(self, response: Any) -> LLMReply:
        text = "".join(field_of(b, "text", "") for b in field_of(response, "content", []) or []
                       if field_of(b, "type") == "text")
        raw_stop = field_of(response, "stop_reason")
        usage = field_of(response, "usage")
        return LLMReply(provider=self.name, model=field_of(response, "model", "") or "", text=text, streamed=False,
                        **anthropic_usage(usage), stop_reason=stop_reason(raw_stop), refusal=raw_stop == "refusal")

    def tool_calls(self, response: Any) -> list[ToolCall]:
        return [ToolCall(field_of(b, "name", ""), field_of(b, "input"))
                for b in field_of(response, "content", []) or [] if field_of(b, "type") == "tool_use"]

    def tool_schemas(self, tools: Any) -> ToolSchemas:
        # Server and built-in client tools (web_search, bash...) carry no input_schema.
        return {field_of(t, "name"): field_of(t, "input_schema") for t in tools or []}


register(Anthropic())


@functools.cache
def _has_otel_option() -> bool:
    """Whether this anthropic SDK takes ``open_telemetry`` (added in 2.17; the pin allows 2.11)."""
    import anthropic

    return "open_telemetry" in inspect.signature(anthropic.AsyncAnthropic.__init__).parameters
