"""Ollama through the ``ollama`` client: OLLAMA_HOST when set, else llm-sim, else Ollama's
own default host. Ollama sends no rate-limit headers, and its ResponseError carries none:
its failures have no retry_after and no limits."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from typing import Any

from tron.common.providers.base import (
    LLMReply,
    ProviderFailure,
    ProviderKind,
    ProviderSettings,
    StopReason,
    ToolCall,
    ToolSchemas,
    field_of,
    register,
    says_usage_limit,
    status_reason,
)
from tron.common.providers.failures import reading_stream
from tron.common.redaction import redact

OLLAMA_DEFAULT_HOST = "http://127.0.0.1:11434"
_STOP_REASONS: dict[str, StopReason] = {"stop": "end", "length": "max_tokens"}


class Ollama(ProviderKind):
    name = "ollama"
    sdk = "ollama"
    default_model = "llama3.1"
    model_setting = "ollama_model"
    sim_surface = "ollama"

    def endpoint(self, settings: ProviderSettings, env: Mapping[str, str]) -> tuple[str | None, str | None]:
        return env.get("OLLAMA_HOST") or settings.sim_url or OLLAMA_DEFAULT_HOST, None  # ollama takes no key

    def build_client(self, base_url: str | None, api_key: str | None, timeout_s: float) -> Any:
        import ollama

        # Always an explicit host and timeout: ollama has no timeout by default and its
        # module-level functions read OLLAMA_HOST once, at import.
        return ollama.AsyncClient(host=base_url, timeout=timeout_s)

    def classify_status(self, exc: BaseException, provider: str, now: float) -> ProviderFailure | None:
        if sys.modules.get("ollama") is None:  # never imported, so exc is none of its errors
            return None
        import ollama

        if not isinstance(exc, ollama.ResponseError):
            return None
        status = exc.status_code
        message = redact(str(exc.error))
        if status == -1:
            # An {"error": ...} line in the middle of a stream.
            return ProviderFailure(provider, "stream_error", status=None, message=message, midstream=True)
        # 503 is what Ollama answers when its queue is full.
        reason = "overloaded_error" if status == 503 else status_reason(status)
        if status == 429 and says_usage_limit(message):  # Ollama's cloud models have usage limits
            reason = "usage_limit"
        return ProviderFailure(provider, reason, status=status, message=message)

    async def complete(self, client: Any, system: str, prompt: str, settings: ProviderSettings,
                       stream: bool) -> LLMReply:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        kwargs: dict[str, Any] = {"model": self.model(settings), "messages": messages,
                                  "options": {"num_predict": settings.max_tokens}}
        if not stream:
            reply = self.reply_of(await client.chat(**kwargs, stream=False))
            return reply.model_copy(update={"model": reply.model or self.model(settings)})

        parts: list[str] = []
        final: Any = None
        chunks = await client.chat(**kwargs, stream=True)
        # aclosing: release the HTTP stream even when we are cancelled mid-iteration.
        async with contextlib.aclosing(chunks):
            # The client connects on the first iteration: a failure before the first chunk
            # is a failure to connect, one after it a cut stream.
            with reading_stream(self.name, started=False) as reading:
                async for chunk in chunks:
                    reading.started = True
                    parts.append(chunk.message.content or "")
                    if chunk.done:
                        final = chunk
        done = self.reply_of(final) if final is not None else None
        return LLMReply(provider=self.name, model=(done and done.model) or self.model(settings),
                        text="".join(parts), streamed=True,
                        input_tokens=done.input_tokens if done else 0,
                        output_tokens=done.output_tokens if done else 0,
                        stop_reason=done.stop_reason if done else None)

    def warm_up_call(self, url: str) -> Any:
        import ollama

        return ollama.AsyncClient(host=url, timeout=1).chat(model="m", messages=[{"role": "user", "content": "warm up"}])

    def reply_of(self, response: Any) -> LLMReply:
        message = field_of(response, "message")
        # /api/chat answers in message.content, /api/generate in response.
        text = field_of(message, "content") if message is not None else field_of(response, "response")
        stop = _STOP_REASONS.get(field_of(response, "done_reason") or "")
        if message is not None and field_of(message, "tool_calls"):
            stop = "tool_use"  # Ollama says "stop" for an answer that is tool calls
        return LLMReply(provider=self.name, model=field_of(response, "model") or "", text=text or "",
                        streamed=False, input_tokens=field_of(response, "prompt_eval_count") or 0,
                        output_tokens=field_of(response, "eval_count") or 0, stop_reason=stop)

    def tool_calls(self, response: Any) -> list[ToolCall]:
        message = field_of(response, "message")
        calls = (field_of(message, "tool_calls") if message is not None else None) or []
        return [ToolCall(field_of(field_of(c, "function"), "name", ""), field_of(field_of(c, "function"), "arguments"))
                for c in calls]

    def tool_schemas(self, tools: Any) -> ToolSchemas:
        out: ToolSchemas = {}
        for tool in tools or []:
            if callable(tool) and not isinstance(tool, Mapping):
                # ollama builds a schema from a function's signature and docstring with a
                # private helper; the name is checked, the arguments are not.
                out[tool.__name__] = None
                continue
            if hasattr(tool, "model_dump"):
                tool = tool.model_dump(exclude_none=True)
            function = field_of(tool, "function") or {}
            out[field_of(function, "name")] = field_of(function, "parameters")
        return out


register(Ollama())
