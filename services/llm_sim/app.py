"""llm_sim: a local stand-in for the Anthropic Messages API and the Ollama API.

It speaks enough of both wire formats for the real `anthropic.AsyncAnthropic` and
`ollama.AsyncClient` to work unchanged, answers deterministically, and lets tests and
operators inject provider faults at run time through `/sim/faults`.

Fault control contract (all JSON):

    PUT    /sim/faults/{provider}   {"kind": K, "latency_ms": 0, "times": null}
    DELETE /sim/faults/{provider}   clear one provider's fault
    DELETE /sim/faults              clear every fault
    GET    /sim/faults              current faults and per-provider counters (no token)

PUT and DELETE need `X-Tron-Token: <token>` when the app was made with a token. A fault
applies to the generation endpoints only (/v1/messages, /api/chat, /api/generate), so
/api/tags, /api/version and / stay usable as liveness probes. `latency_ms` delays every
kind (except `hang`) before it takes effect; `times` makes the fault clear itself after
that many requests.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("llm_sim")

PROVIDERS = ("anthropic", "ollama")
FaultKind = Literal["latency", "hang", "overloaded", "rate-limit", "error", "auth", "midstream"]
MAX_BODY = 1024 * 1024  # bodies strictly larger than 1 MiB get a 413
HOLD_POLL_S = 0.05  # how often a held (hung or delayed) request checks for its client
OLLAMA_SERVER_VERSION = "0.12.0-llm-sim"
TOKEN_HEADER = "X-Tron-Token"


# --------------------------------------------------------------------------- state


class FaultSpec(BaseModel):
    """Body of PUT /sim/faults/{provider}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    latency_ms: int = Field(0, ge=0, le=3_600_000)
    times: int | None = Field(None, ge=1)


@dataclass
class ProviderState:
    """The current fault of one provider and its request counters."""

    fault: FaultSpec | None = None
    remaining: int | None = None  # requests left before the fault clears itself
    requests: int = 0  # generation requests received
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
class SimState:
    token: str | None
    providers: dict[str, ProviderState] = field(
        default_factory=lambda: {p: ProviderState() for p in PROVIDERS}
    )
    closing: bool = False  # set on shutdown so held requests let go


SIM_STATE = web.AppKey("llm_sim_state", SimState)


# --------------------------------------------------------------------------- errors


class SimError(Exception):
    """An error answer; each endpoint renders it in its provider's wire format."""

    def __init__(self, status: int, etype: str, message: str) -> None:
        super().__init__(message)
        self.status, self.etype, self.message = status, etype, message


# Error answers for each fault kind: (HTTP status, anthropic error type, message).
# Ollama has no error types on the wire, only {"error": message}.
_FAULT_ERRORS: dict[str, dict[str, tuple[int, str, str]]] = {
    "anthropic": {
        "overloaded": (529, "overloaded_error", "Overloaded"),
        "rate-limit": (429, "rate_limit_error", "Number of requests has exceeded your rate limit"),
        "error": (500, "api_error", "Internal server error"),
        "auth": (401, "authentication_error", "invalid x-api-key"),
        "midstream": (500, "api_error", "Internal server error"),
    },
    "ollama": {
        "overloaded": (503, "overloaded_error", "server overloaded"),
        "rate-limit": (429, "rate_limit_error", "too many requests"),
        "error": (500, "api_error", "internal server error"),
        "auth": (401, "authentication_error", "unauthorized"),
        "midstream": (500, "api_error", "model runner has unexpectedly stopped"),
    },
}
# What a request still held when its client left or the server stops gets (the client
# never sees it when it has gone; aiohttp drops the write).
_GONE = (503, "api_error", "request abandoned: client gone or server shutting down")


def _request_id() -> str:
    return "req_sim_" + secrets.token_hex(12)


def _anthropic_error(status: int, etype: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": etype, "message": message}}
    return web.json_response(body, status=status, headers={"request-id": _request_id()})


def _ollama_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _error_response(provider: str, err: SimError) -> web.Response:
    if provider == "anthropic":
        return _anthropic_error(err.status, err.etype, err.message)
    return _ollama_error(err.status, err.message)


def _describe(exc: ValidationError) -> str:
    """Pydantic errors as 'field: problem (got value)', the way the real APIs word them."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        got = "" if err["type"] == "missing" else f" (got {err.get('input')!r:.60})"
        parts.append(f"{loc}: {err['msg']}{got}")
    return "; ".join(parts)


async def _read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or SimError 413/400."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise SimError(413, "request_too_large", f"request body exceeds {MAX_BODY} bytes") from None
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        raise SimError(400, "invalid_request_error", f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise SimError(400, "invalid_request_error", "request body must be a JSON object")
    return body


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


@dataclass(frozen=True)
class Conversation:
    system: str
    turns: tuple[Turn, ...]

    def digest(self) -> str:
        blob = json.dumps([self.system, [(t.role, t.text) for t in self.turns]])
        return hashlib.sha256(blob.encode()).hexdigest()[:6]

    def word_count(self) -> int:
        return len(self.system.split()) + sum(len(t.text.split()) for t in self.turns)


@dataclass(frozen=True)
class Answer:
    text: str
    input_tokens: int
    output_tokens: int

    def chunks(self, words_per_chunk: int = 3) -> list[str]:
        """The text in small pieces whose concatenation is exactly the text."""
        words = re.findall(r"\s*\S+\s*", self.text) or [self.text]
        return ["".join(words[i : i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)]


_STEPS = (
    "restate the goal and its constraints",
    "sketch the smallest change that could work",
    "check it against one concrete example",
    "list the risks and how to roll back",
    "write down what was done for the next agent",
    "ask for a review before widening the change",
)


_CHOICE = re.compile(r"exactly one\s+word[^.]*?,\s*([A-Z]{3,})\s+or\s+([A-Z]{3,})", re.S)


def compose_answer(provider: str, convo: Conversation) -> Answer:
    """A short, plausible, deterministic answer for a conversation.

    It embeds the provider, a digest of (system, messages) and the start of the last user
    message, so callers can see who answered and what it was asked.
    """
    digest = convo.digest()
    last_user = next((t.text for t in reversed(convo.turns) if t.role == "user"), "")
    choice = _CHOICE.search(convo.system or "")
    if choice:
        # A prompt that asks for one of two words (the supervisor's advisor): answer
        # deterministically with one of them, so the caller's parsing is exercised.
        options = choice.group(1), choice.group(2)
        word = options[int(digest, 16) % 2] if "[pick-any]" in last_user else options[0]
        text = f"{word}\n[sim:{provider}:{digest}] deterministic advice for: {' '.join(last_user.split())[:60]}"
        return Answer(text, max(1, convo.word_count()), len(text.split()))
    topic = " ".join(last_user.split())[:80]
    first = int(digest, 16) % len(_STEPS)
    steps = [_STEPS[(first + i) % len(_STEPS)] for i in range(3)]
    text = f"[sim:{provider}:{digest}] Plan for: {topic}\n" + "\n".join(
        f"{n}. {step.capitalize()}." for n, step in enumerate(steps, 1)
    )
    return Answer(text, max(1, convo.word_count()), len(text.split()))


# --------------------------------------------------------------------------- faults


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _hold(request: web.Request, seconds: float | None) -> bool:
    """Wait `seconds` (forever when None) without blocking the loop.

    Returns True when the time ran out normally, False as soon as the client has
    disconnected or the app is shutting down. aiohttp does not cancel handlers on client
    disconnect by default, so polling the transport is what keeps a held request from
    outliving its client.
    """
    sim = request.app[SIM_STATE]
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    while True:
        if _client_gone(request) or sim.closing:
            return False
        left = HOLD_POLL_S if deadline is None else deadline - loop.time()
        if left <= 0:
            return True
        await asyncio.sleep(min(HOLD_POLL_S, left))


async def _apply_fault(request: web.Request, provider: str, fault: FaultSpec, stream: bool) -> None:
    """Act out a fault before the answer; raise SimError unless the answer should follow.

    `midstream` on a streaming request returns normally: the renderer fails part-way.
    """
    if fault.kind == "hang":
        pstate = request.app[SIM_STATE].providers[provider]
        pstate.hanging += 1
        try:
            await _hold(request, None)
        finally:
            pstate.hanging -= 1
        raise SimError(*_GONE)
    if fault.latency_ms and not await _hold(request, fault.latency_ms / 1000):
        raise SimError(*_GONE)
    if fault.kind == "latency" or (fault.kind == "midstream" and stream):
        return
    raise SimError(*_FAULT_ERRORS[provider][fault.kind])


Renderer = Callable[[web.Request, Answer, bool], Awaitable[tuple[web.StreamResponse, bool]]]


async def _serve(
    request: web.Request, provider: str, convo: Conversation, stream: bool, render: Renderer
) -> web.StreamResponse:
    """Shared tail of every generation endpoint: fault, then answer, then counters."""
    pstate = request.app[SIM_STATE].providers[provider]
    fault = pstate.take_fault()
    if fault is not None:
        log.info("%s: injecting fault %s", provider, fault.kind)
        await _apply_fault(request, provider, fault, stream)
    fail_midstream = fault is not None and fault.kind == "midstream"
    response, completed = await render(request, compose_answer(provider, convo), fail_midstream)
    if completed:
        pstate.served += 1
    return response


async def _write_stream(request: web.Request, response: web.StreamResponse, pieces: list[bytes]) -> bool:
    """Send a streamed body piece by piece; False if the client went away."""
    try:
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
        await response.write_eof()
    except ConnectionError:  # aiohttp's ClientConnectionResetError is one
        log.info("%s: client disconnected mid-stream", request.path)
        return False
    return True


def _provider_endpoint(provider: str):
    """Count the request and render SimError in the provider's wire format."""

    def wrap(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        @functools.wraps(handler)
        async def endpoint(request: web.Request) -> web.StreamResponse:
            request.app[SIM_STATE].providers[provider].requests += 1
            try:
                return await handler(request)
            except SimError as err:
                return _error_response(provider, err)

        return endpoint

    return wrap


# --------------------------------------------------------------------------- anthropic


class _Lenient(BaseModel):
    # Real clients send fields the sim does not use (temperature, metadata, ...).
    model_config = ConfigDict(extra="allow")


class AnthropicBlock(_Lenient):
    type: str
    text: str | None = None


def _blocks_text(content: str | list[AnthropicBlock] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(b.text for b in content if b.type == "text" and b.text)


class AnthropicMessage(_Lenient):
    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock]


class AnthropicRequest(_Lenient):
    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[AnthropicBlock] | None = None
    stream: bool = False

    def conversation(self) -> Conversation:
        turns = tuple(Turn(m.role, _blocks_text(m.content)) for m in self.messages)
        return Conversation(_blocks_text(self.system), turns)


def _anthropic_key(request: web.Request) -> str:
    key = request.headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _sse(event: str, data: dict[str, Any]) -> bytes:
    # The SDK ignores data without an `event:` line, so every event names itself.
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _anthropic_message(msg_id: str, model: str, answer: Answer) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": answer.text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": answer.input_tokens, "output_tokens": answer.output_tokens},
    }


def _anthropic_events(msg_id: str, model: str, answer: Answer, fail_midstream: bool) -> list[bytes]:
    start = _anthropic_message(msg_id, model, answer) | {"content": [], "stop_reason": None}
    start["usage"] = {"input_tokens": answer.input_tokens, "output_tokens": 1}
    head = [
        _sse("message_start", {"type": "message_start", "message": start}),
        _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
        _sse("ping", {"type": "ping"}),
    ]
    deltas = [
        _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": chunk}})
        for chunk in answer.chunks()
    ]
    if fail_midstream:
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        return head + deltas[:1] + [_sse("error", error)]
    tail = [
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": answer.output_tokens}}),
        _sse("message_stop", {"type": "message_stop"}),
    ]
    return head + deltas + tail


@_provider_endpoint("anthropic")
async def anthropic_messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages."""
    if not _anthropic_key(request):
        raise SimError(401, "authentication_error", "x-api-key header is required")
    try:
        req = AnthropicRequest.model_validate(await _read_json(request))
    except ValidationError as exc:
        raise SimError(400, "invalid_request_error", _describe(exc)) from None

    async def render(request: web.Request, answer: Answer, fail_midstream: bool):
        msg_id = "msg_sim_" + secrets.token_hex(12)
        if not req.stream:
            if fail_midstream:
                raise SimError(*_FAULT_ERRORS["anthropic"]["midstream"])
            body = _anthropic_message(msg_id, req.model, answer)
            return web.json_response(body, headers={"request-id": _request_id()}), True
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "request-id": _request_id(),
        })
        events = _anthropic_events(msg_id, req.model, answer, fail_midstream)
        completed = await _write_stream(request, response, events)
        return response, completed and not fail_midstream

    return await _serve(request, "anthropic", req.conversation(), req.stream, render)


# --------------------------------------------------------------------------- ollama


class OllamaMessage(_Lenient):
    role: str
    content: str = ""


class OllamaChatRequest(_Lenient):
    model: str = Field(min_length=1)
    messages: list[OllamaMessage] = Field(default_factory=list)
    stream: bool | None = None  # Ollama streams unless told otherwise
    options: dict[str, Any] | None = None

    def conversation(self) -> Conversation:
        system = "\n".join(m.content for m in self.messages if m.role == "system")
        turns = tuple(Turn(m.role, m.content) for m in self.messages if m.role != "system")
        return Conversation(system, turns)


class OllamaGenerateRequest(_Lenient):
    model: str = Field(min_length=1)
    prompt: str = ""
    system: str = ""
    stream: bool | None = None

    def conversation(self) -> Conversation:
        return Conversation(self.system, (Turn("user", self.prompt),))


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ollama_final_stats(answer: Answer, started: float) -> dict[str, Any]:
    total_ns = max(1, int((time.monotonic() - started) * 1e9))
    return {
        "done": True,
        "done_reason": "stop",
        "total_duration": total_ns,
        "load_duration": 0,
        "prompt_eval_count": answer.input_tokens,
        "prompt_eval_duration": total_ns // 4,
        "eval_count": answer.output_tokens,
        "eval_duration": total_ns // 2,
    }


def _ndjson(obj: dict[str, Any]) -> bytes:
    # The client json.loads() every line, so no blank lines ever.
    return (json.dumps(obj) + "\n").encode()


def _ollama_renderer(model: str, stream: bool, payload: Callable[[str], dict[str, Any]]) -> Renderer:
    """Render /api/chat and /api/generate alike; `payload(text)` is the endpoint's part."""
    started = time.monotonic()

    async def render(request: web.Request, answer: Answer, fail_midstream: bool):
        def part(text: str) -> dict[str, Any]:
            return {"model": model, "created_at": _now_rfc3339(), **payload(text)}

        if not stream:
            if fail_midstream:
                raise SimError(*_FAULT_ERRORS["ollama"]["midstream"])
            return web.json_response(part(answer.text) | _ollama_final_stats(answer, started)), True
        lines = [_ndjson(part(chunk) | {"done": False}) for chunk in answer.chunks()]
        if fail_midstream:
            lines = lines[:2] + [_ndjson({"error": _FAULT_ERRORS["ollama"]["midstream"][2]})]
        else:
            lines.append(_ndjson(part("") | _ollama_final_stats(answer, started)))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        completed = await _write_stream(request, response, lines)
        return response, completed and not fail_midstream

    return render


def _validate(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise SimError(400, "invalid_request_error", _describe(exc)) from None


@_provider_endpoint("ollama")
async def ollama_chat(request: web.Request) -> web.StreamResponse:
    """POST /api/chat."""
    req: OllamaChatRequest = _validate(OllamaChatRequest, await _read_json(request))
    stream = req.stream is not False
    render = _ollama_renderer(req.model, stream, lambda t: {"message": {"role": "assistant", "content": t}})
    return await _serve(request, "ollama", req.conversation(), stream, render)


@_provider_endpoint("ollama")
async def ollama_generate(request: web.Request) -> web.StreamResponse:
    """POST /api/generate."""
    req: OllamaGenerateRequest = _validate(OllamaGenerateRequest, await _read_json(request))
    stream = req.stream is not False
    render = _ollama_renderer(req.model, stream, lambda t: {"response": t})
    return await _serve(request, "ollama", req.conversation(), stream, render)


_OLLAMA_MODELS = (
    ("llama3.1:latest", "llama", "8.0B", 4_920_753_328),
    ("qwen2.5:7b", "qwen2", "7.6B", 4_683_087_332),
)


async def ollama_tags(request: web.Request) -> web.Response:
    """GET /api/tags: the models the sim pretends to have (it answers for any name)."""
    models = [
        {
            "name": name,
            "model": name,
            "modified_at": "2025-01-01T00:00:00Z",
            "size": size,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": {"parent_model": "", "format": "gguf", "family": family,
                        "families": [family], "parameter_size": params,
                        "quantization_level": "Q4_K_M"},
        }
        for name, family, params, size in _OLLAMA_MODELS
    ]
    return web.json_response({"models": models})


async def ollama_version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_SERVER_VERSION})


async def ollama_root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


# --------------------------------------------------------------------------- control


def _control_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _authorized(request: web.Request) -> bool:
    token = request.app[SIM_STATE].token
    if token is None:
        return True
    given = request.headers.get(TOKEN_HEADER, "")
    return hmac.compare_digest(given.encode(), token.encode())


def _control(handler: Callable[[web.Request], Awaitable[web.Response]]):
    """Token check for state-changing control endpoints; nothing changes on 401."""

    @functools.wraps(handler)
    async def endpoint(request: web.Request) -> web.Response:
        if not _authorized(request):
            return _control_error(401, f"missing or invalid {TOKEN_HEADER} header")
        return await handler(request)

    return endpoint


def _path_provider(request: web.Request) -> str:
    provider = request.match_info["provider"]
    if provider not in PROVIDERS:
        raise web.HTTPNotFound(
            text=json.dumps({"error": f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}"}),
            content_type="application/json",
        )
    return provider


@_control
async def put_fault(request: web.Request) -> web.Response:
    provider = _path_provider(request)
    try:
        body = await _read_json(request)
        fault = FaultSpec.model_validate(body)
    except SimError as err:
        return _control_error(err.status, err.message)
    except ValidationError as exc:
        return _control_error(400, f"invalid fault: {_describe(exc)}")
    pstate = request.app[SIM_STATE].providers[provider]
    pstate.set_fault(fault)
    log.info("fault set: %s %s latency_ms=%d times=%s", provider, fault.kind, fault.latency_ms, fault.times)
    return web.json_response({"provider": provider, **pstate.snapshot()})


@_control
async def delete_fault(request: web.Request) -> web.Response:
    provider = _path_provider(request)
    cleared = request.app[SIM_STATE].providers[provider].clear_fault()
    log.info("fault cleared: %s", provider)
    return web.json_response({"provider": provider, "cleared": cleared})


@_control
async def delete_all_faults(request: web.Request) -> web.Response:
    providers = request.app[SIM_STATE].providers
    cleared = [name for name, pstate in providers.items() if pstate.clear_fault()]
    log.info("all faults cleared")
    return web.json_response({"cleared": cleared})


async def get_faults(request: web.Request) -> web.Response:
    providers = request.app[SIM_STATE].providers
    return web.json_response({"providers": {name: p.snapshot() for name, p in providers.items()}})


# --------------------------------------------------------------------------- app


@web.middleware
async def _log_requests(request: web.Request, handler):
    # Method, path and status only: headers (API keys, tokens) are never logged.
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        elapsed_ms = (time.monotonic() - started) * 1000
        log.info("%s %s -> %d (%.1f ms)", request.method, request.path, status, elapsed_ms)


async def _on_shutdown(app: web.Application) -> None:
    app[SIM_STATE].closing = True  # held requests see this within HOLD_POLL_S


def make_app(*, token: str | None = None) -> web.Application:
    """The simulator app; `token` guards PUT/DELETE /sim/faults when not None."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_log_requests])
    app[SIM_STATE] = SimState(token=token)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_post("/v1/messages", anthropic_messages)
    app.router.add_post("/api/chat", ollama_chat)
    app.router.add_post("/api/generate", ollama_generate)
    app.router.add_get("/api/tags", ollama_tags)
    app.router.add_get("/api/version", ollama_version)
    app.router.add_get("/", ollama_root)
    app.router.add_get("/sim/faults", get_faults)
    app.router.add_delete("/sim/faults", delete_all_faults)
    app.router.add_put("/sim/faults/{provider}", put_fault)
    app.router.add_delete("/sim/faults/{provider}", delete_fault)
    return app
