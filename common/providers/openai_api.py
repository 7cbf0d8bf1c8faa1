"""OpenAI, or any OpenAI-compatible server (vLLM, LM Studio, llama.cpp), through the
``openai`` SDK's Chat Completions; raw responses of the Responses API are read too (for
``call_llm``). llm-sim stands in when neither OPENAI_API_KEY nor OPENAI_BASE_URL is set."""

from __future__ import annotations

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
    field_of,
    openai_usage,
    register,
    status_reason,
)
from tron.common.providers.failures import reading_stream
from tron.common.providers.headers import openai_limits, retry_after
from tron.common.redaction import redact

_CODE_REASONS = {"rate_limit_exceeded": "rate_limit_error",
                 "insufficient_quota": "usage_limit",  # the account's quota or credit, not a per-minute rate
                 "invalid_api_key": "authentication_error"}
_FINISH_REASONS: dict[str, StopReason] = {"stop": "end", "length": "max_tokens", "tool_calls": "tool_use",
                                          "function_call": "tool_use", "content_filter": "refusal"}
# The Responses API: why an answer is `incomplete`.
_INCOMPLETE_REASONS: dict[str, StopReason] = {"max_output_tokens": "max_tokens", "content_filter": "refusal"}


class OpenAI(ProviderKind):
    name = "openai"
    sdk = "openai"
    preload = ("openai.resources",)  # the client's first .chat imports these: 0.6 s
    default_model = "gpt-4o-mini"
    model_setting: str | None = "openai_model"
    sim_surface = "openai"

    def endpoint(self, settings: ProviderSettings, env: Mapping[str, str]) -> tuple[str | None, str | None]:
        if key := env.get("OPENAI_API_KEY"):
            return env.get("OPENAI_BASE_URL") or None, key
        if base := env.get("OPENAI_BASE_URL"):
            return base, "none"  # local servers take any key
        if settings.sim_url:
            return settings.sim_url.rstrip("/") + "/v1", SIM_API_KEY
        raise ProviderFailure(self.name, "not_configured", retryable=False,
                              message="no OPENAI_API_KEY or OPENAI_BASE_URL, and no sim_url")

    def build_client(self, base_url: str | None, api_key: str | None, timeout_s: float) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)

    def read_limits(self, headers: Mapping[str, str], now: float) -> dict[str, float]:
        return openai_limits(headers, now)

    def classify_status(self, exc: BaseException, provider: str, now: float) -> ProviderFailure | None:
        if sys.modules.get("openai") is None:  # never imported, so exc is none of its errors
            return None
        import openai

        if not isinstance(exc, openai.APIStatusError):
            return None
        status = exc.status_code
        body = exc.body if isinstance(exc.body, dict) else {}
        inner = body.get("error")
        error = inner if isinstance(inner, dict) else body
        code = error.get("code") or error.get("type")
        message = redact(exc.message or str(exc))
        headers = exc.response.headers
        limits = self.read_limits(headers, now)
        if status < 400:  # an error event inside a 200 stream
            return ProviderFailure(provider, "stream_error", status=status, message=message, midstream=True,
                                   limits=limits)
        reason = _CODE_REASONS.get(str(code), status_reason(status))
        if status == 503:
            reason = "overloaded_error"
        return ProviderFailure(provider, reason, status=status, message=message,
                               retry_after=retry_after(headers, now), limits=limits)

    async def complete(self, client: Any, system: str, prompt: str, settings: ProviderSettings,
                       stream: bool) -> LLMReply:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        kwargs: dict[str, Any] = {"model": self.model(settings), "messages": messages,
                                  "max_tokens": settings.max_tokens}
        if not stream:
            raw = await client.chat.completions.with_raw_response.create(**kwargs)
            reply = self.reply_of(raw.parse())
            return reply.model_copy(update={"limits": self.read_limits(raw.headers, time.time())})

        parts: list[str] = []
        model, usage, finish, refused = self.model(settings), None, None, False
        chunks = await client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
        limits = self.read_limits(chunks.response.headers, time.time())
        async with chunks:  # closes the HTTP stream even when cancelled
            with reading_stream(self.name, limits):
                async for chunk in chunks:
                    model = chunk.model or model
                    if chunk.choices:
                        choice = chunk.choices[0]
                        if choice.delta.content:
                            parts.append(choice.delta.content)
                        refused = refused or bool(choice.delta.refusal)
                        finish = choice.finish_reason or finish
                    usage = chunk.usage or usage
        stop: StopReason | None = "refusal" if refused else _FINISH_REASONS.get(finish or "")
        return LLMReply(provider=self.name, model=model, text="".join(parts), streamed=True, **openai_usage(usage),
                        stop_reason=stop, refusal=stop == "refusal", limits=limits)

    def warm_up_call(self, url: str) -> Any:
        import openai

        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=1)
        return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "warm up"}])

    def reply_of(self, response: Any) -> LLMReply:
        if field_of(response, "choices") is None and field_of(response, "output") is not None:
            return self._responses_reply(response)
        choices = field_of(response, "choices") or []
        choice = choices[0] if choices else None
        message = field_of(choice, "message") if choice is not None else None
        refused = bool(field_of(message, "refusal")) if message is not None else False
        finish = field_of(choice, "finish_reason") if choice is not None else None
        stop: StopReason | None = "refusal" if refused else _FINISH_REASONS.get(finish or "")
        usage = field_of(response, "usage")
        return LLMReply(provider=self.name, model=field_of(response, "model") or "", streamed=False,
                        text=(field_of(message, "content") if message is not None else None) or "",
                        **openai_usage(usage), stop_reason=stop, refusal=stop == "refusal")

    def _responses_reply(self, response: Any) -> LLMReply:
        texts, refused, called = [], False, False
        for item in field_of(response, "output") or []:
            if field_of(item, "type") == "function_call":
                called = True
            for part in (field_of(item, "content") or []) if field_of(item, "type") == "message" else []:
                if field_of(part, "type") == "output_text":
                    texts.append(field_of(part, "text") or "")
                elif field_of(part, "type") == "refusal":
                    refused = True
        incomplete = field_of(field_of(response, "incomplete_details"), "reason")
        stop: StopReason | None
        if refused:
            stop = "refusal"
        elif field_of(response, "status") == "incomplete":
            stop = _INCOMPLETE_REASONS.get(incomplete or "")
        elif called:
            stop = "tool_use"
        else:
            stop = "end" if field_of(response, "status") == "completed" else None
        usage = field_of(response, "usage")
        return LLMReply(provider=self.name, model=field_of(response, "model") or "", text="".join(texts),
                        streamed=False, **openai_usage(usage), stop_reason=stop, refusal=stop == "refusal")

    def tool_calls(self, response: Any) -> list[ToolCall]:
        if field_of(response, "choices") is None:  # the Responses API
            return [ToolCall(field_of(item, "name", ""), field_of(item, "arguments"))
                    for item in field_of(response, "output") or [] if field_of(item, "type") == "function_call"]
        choices = field_of(response, "choices") or []
        message = field_of(choices[0], "message") if choices else None
        return [ToolCall(field_of(field_of(c, "function"), "name", ""), field_of(field_of(c, "function"), "arguments"))
                for c in (field_of(message, "tool_calls") if message is not None else None) or []
                if field_of(c, "type", "function") == "function"]

    def tool_schemas(self, tools: Any) -> ToolSchemas:
        out: ToolSchemas = {}
        for tool in tools or []:
            # Chat Completions nests the function ({"type": "function", "function": {...}});
            # the Responses API does not ({"type": "function", "name", "parameters"}).
            function = field_of(tool, "function") or tool
            if (name := field_of(function, "name")) is not None:
                out[name] = field_of(function, "parameters")
        return out


register(OpenAI())
