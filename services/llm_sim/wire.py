"""Plumbing every API surface shares: errors in each provider's wire format, body
parsing, fault injection around a handler, and streamed bodies."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from tron.services.llm_sim.answers import Shape
from tron.services.llm_sim.state import RATE_LIMIT_KINDS, REFUSING_KINDS, SHAPING_KINDS, SIM_STATE, FaultSpec, ProviderState

log = logging.getLogger("llm_sim")

MAX_BODY = 1024 * 1024  # bodies strictly larger than 1 MiB get a 413
HOLD_POLL_S = 0.05  # how often a held (hung or delayed) request checks for its client


class Lenient(BaseModel):
    """Base of request bodies: real clients send fields the sim does not use
    (temperature, metadata, ...), and the real APIs accept them."""

    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------- errors


class SimError(Exception):
    """An error answer; each surface renders it in its provider's wire format.

    `etype` is Anthropic's error.type or OpenAI's error.type; `code` and `param` are
    OpenAI's fields; Ollama shows only the message.
    """

    def __init__(self, status: int, etype: str, message: str, *, code: str | None = None,
                 param: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.etype, self.message = status, etype, message
        self.code, self.param, self.headers = code, param, dict(headers or {})


def request_id() -> str:
    return "req_sim_" + secrets.token_hex(12)


def anthropic_error_body(etype: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": etype, "message": message}}


def openai_error_body(err: SimError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.etype, "param": err.param, "code": err.code}}


def _render_error(provider: str, err: SimError) -> web.Response:
    if provider == "anthropic":
        headers = {"request-id": request_id(), **err.headers}
        return web.json_response(anthropic_error_body(err.etype, err.message), status=err.status, headers=headers)
    if provider == "openai":
        headers = {"x-request-id": request_id(), **err.headers}
        return web.json_response(openai_error_body(err), status=err.status, headers=headers)
    return web.json_response({"error": err.message}, status=err.status, headers=err.headers)


@dataclass(frozen=True)
class FaultError:
    status: int
    etype: str
    message: str  # may name {reset}: when the limit lifts
    code: str | None = None


_OPENAI_500 = "The server had an error while processing your request. Sorry about that!"
_OPENAI_QUOTA = ("You exceeded your current quota, please check your plan and billing details. For more "
                 "information on this error, read the docs: "
                 "https://platform.openai.com/docs/guides/error-codes/api-errors.")
# The answer each refusing fault kind gets, per provider (and the in-stream error of `midstream`).
FAULT_ERRORS: dict[str, dict[str, FaultError]] = {
    "anthropic": {
        "overloaded": FaultError(529, "overloaded_error", "Overloaded"),
        "rate-limit": FaultError(429, "rate_limit_error", "Number of requests has exceeded your rate limit"),
        "usage-limit": FaultError(429, "rate_limit_error", "You have reached your specified API usage limits. "
                                                           "You will regain access on {reset}."),
        "error": FaultError(500, "api_error", "Internal server error"),
        "auth": FaultError(401, "authentication_error", "invalid x-api-key"),
        "midstream": FaultError(500, "api_error", "Internal server error"),
    },
    "ollama": {
        "overloaded": FaultError(503, "overloaded_error", "server overloaded"),
        "rate-limit": FaultError(429, "rate_limit_error", "too many requests"),
        "usage-limit": FaultError(429, "rate_limit_error", "you have reached your usage limit, it resets at {reset}"),
        "error": FaultError(500, "api_error", "internal server error"),
        "auth": FaultError(401, "authentication_error", "unauthorized"),
        "midstream": FaultError(500, "api_error", "model runner has unexpectedly stopped"),
    },
    "openai": {
        "overloaded": FaultError(503, "server_error", "The server is overloaded or not ready yet."),
        "rate-limit": FaultError(429, "requests", "Rate limit reached for requests. Please try again in {wait}.",
                                 "rate_limit_exceeded"),
        "usage-limit": FaultError(429, "insufficient_quota", _OPENAI_QUOTA, "insufficient_quota"),
        "error": FaultError(500, "server_error", _OPENAI_500),
        "auth": FaultError(401, "invalid_request_error", "Incorrect API key provided.", "invalid_api_key"),
        "midstream": FaultError(500, "server_error", _OPENAI_500),
    },
}
# What the rate-limit headers say the limits are (any plausible tier will do).
ANTHROPIC_LIMITS = {"requests": 50, "tokens": 90_000, "input-tokens": 30_000, "output-tokens": 8_000}
OPENAI_LIMITS = {"requests": 500, "tokens": 30_000}
# What a success says the limits are: a high tier, so a busy test mesh never runs out (a
# rate-limit fault is how a test meets a limit).
SUCCESS_LIMITS = {"anthropic": {"requests": 4_000, "tokens": 2_000_000, "input-tokens": 2_000_000,
                                "output-tokens": 400_000},
                  "openai": {"requests": 10_000, "tokens": 2_000_000}}


def go_duration(ms: int) -> str:
    """A wait the way OpenAI's x-ratelimit-reset-* headers (Go's time.Duration) write
    it: 250 -> "250ms", 1500 -> "1.5s", 90000 -> "1m30s", 3600000 -> "1h0m0s"."""
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = str(rest // 1000) if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def rfc3339(wall: float) -> str:
    """A wall-clock time as Anthropic's anthropic-ratelimit-*-reset headers write it,
    rounded up to the second so it is never before the wait it announces."""
    return datetime.fromtimestamp(math.ceil(wall), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def rate_limit_headers(provider: str, retry_after_ms: int, wall_now: float) -> dict[str, str]:
    """The headers of a 429: retry-after (whole seconds, rounded up) everywhere;
    retry-after-ms (which the anthropic and openai SDKs prefer) and each API's own
    rate-limit headers, all exhausted, on anthropic and openai."""
    headers = {"retry-after": str(math.ceil(retry_after_ms / 1000))}
    if provider == "ollama":
        return headers
    headers["retry-after-ms"] = str(retry_after_ms)
    if provider == "anthropic":
        reset = rfc3339(wall_now + retry_after_ms / 1000)
        for what, limit in ANTHROPIC_LIMITS.items():
            headers |= {f"anthropic-ratelimit-{what}-limit": str(limit),
                        f"anthropic-ratelimit-{what}-remaining": "0",
                        f"anthropic-ratelimit-{what}-reset": reset}
    else:
        for what, limit in OPENAI_LIMITS.items():
            headers |= {f"x-ratelimit-limit-{what}": str(limit), f"x-ratelimit-remaining-{what}": "0",
                        f"x-ratelimit-reset-{what}": go_duration(retry_after_ms)}
    return headers


def limit_headers(provider: str, pstate: ProviderState, wall_now: float) -> dict[str, str]:
    """The rate-limit headers of a success: the limits of SUCCESS_LIMITS per minute, what is
    left of them in the current minute (this provider's requests and the tokens its answers
    reported), and when the minute ends."""
    if provider not in ("anthropic", "openai"):
        return {}
    minute = int(wall_now // 60)
    if pstate.minute != minute:
        pstate.minute, pstate.minute_requests, pstate.minute_tokens = minute, 0, 0
    pstate.minute_requests += 1
    left_s = (minute + 1) * 60 - wall_now
    used = {"requests": pstate.minute_requests, "tokens": pstate.minute_tokens,
            "input-tokens": pstate.minute_tokens, "output-tokens": 0}
    if provider == "anthropic":
        reset = rfc3339(wall_now + left_s)
        headers = {}
        for what, limit in SUCCESS_LIMITS["anthropic"].items():
            headers |= {f"anthropic-ratelimit-{what}-limit": str(limit),
                        f"anthropic-ratelimit-{what}-remaining": str(max(0, limit - used.get(what, 0))),
                        f"anthropic-ratelimit-{what}-reset": reset}
        return headers
    headers = {}
    for what, limit in SUCCESS_LIMITS["openai"].items():
        headers |= {f"x-ratelimit-limit-{what}": str(limit),
                    f"x-ratelimit-remaining-{what}": str(max(0, limit - used.get(what, 0))),
                    f"x-ratelimit-reset-{what}": go_duration(int(left_s * 1000))}
    return headers


def fault_error(provider: str, fault: FaultSpec, wall_now: float) -> SimError:
    """The SimError a refusing fault answers with; 429s carry the rate-limit headers."""
    spec = FAULT_ERRORS[provider][fault.kind]
    headers = rate_limit_headers(provider, fault.retry_after_ms, wall_now) if spec.status == 429 else {}
    message = spec.message.format(reset=rfc3339(wall_now + fault.retry_after_ms / 1000),
                                  wait=go_duration(fault.retry_after_ms))
    return SimError(spec.status, spec.etype, message, code=spec.code, headers=headers)


def _gone() -> SimError:
    """What a request still held when its client left or the server stops gets (the
    client never sees it when it has gone; aiohttp drops the write)."""
    return SimError(503, "api_error", "request abandoned: client gone or server shutting down")


def describe(exc: ValidationError) -> str:
    """Pydantic errors as 'field: problem (got value)', the way the real APIs word them."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        got = "" if err["type"] == "missing" else f" (got {err.get('input')!r:.60})"
        parts.append(f"{loc}: {err['msg']}{got}")
    return "; ".join(parts)


async def read_json(request: web.Request) -> dict[str, Any]:
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


async def parse_body(request: web.Request, model: type[BaseModel]) -> Any:
    """The body validated as `model`, or SimError 400 naming the first bad field."""
    body = await read_json(request)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        param = str(first[0]) if first else None
        raise SimError(400, "invalid_request_error", describe(exc), param=param) from None


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


async def _hold_counted(request: web.Request, pstate: ProviderState, seconds: float | None) -> bool:
    """_hold, counted in the `hanging` gauge while it lasts."""
    pstate.hanging += 1
    try:
        return await _hold(request, seconds)
    finally:
        pstate.hanging -= 1


async def _apply_fault(request: web.Request, provider: str, fault: FaultSpec, stream: bool) -> None:
    """Act out the part of a fault that comes before the answer; raise SimError when the
    request gets no answer (a refusing kind, or a held request whose client left).

    Returns normally when the answer should follow; Delivery acts out the rest (shaped
    content, pacing, a stream that fails part-way).
    """
    sim = request.app[SIM_STATE]
    pstate = sim.providers[provider]
    if fault.kind == "hang" or (fault.kind == "stall" and not stream):
        # A stall without a stream to stall is a hang, for latency_ms when one is set.
        if not await _hold_counted(request, pstate, fault.latency_ms / 1000 if fault.kind == "stall"
                                   and fault.latency_ms else None):
            raise _gone()
        return
    if fault.kind in ("stall", "trickle"):
        return  # latency_ms paces the answer itself
    if fault.latency_ms and not await _hold(request, fault.latency_ms / 1000):
        raise _gone()
    if fault.kind in REFUSING_KINDS or (fault.kind == "midstream" and not stream):
        if fault.kind in RATE_LIMIT_KINDS:
            pstate.counters.rate_limited += 1
        raise fault_error(provider, fault, time.time())


@dataclass
class Delivery:
    """How an answer goes out under the fault its request drew (None: plainly).

    Renderers build the reply with `shape` and the provider's in-stream error when
    `midstream`; `json` and `stream` act out the pacing and cutting kinds the same way
    for every API.
    """

    fault: FaultSpec | None
    pstate: ProviderState
    billed: tuple[str, int, int] | None = None  # (model, input, output tokens) the answer reports
    provider: str = ""

    def _with_limits(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        """A success carries the API's rate-limit headers too, as the real ones do."""
        return {**limit_headers(self.provider, self.pstate, time.time()), **(headers or {})}

    def bill(self, model: str, input_tokens: int, output_tokens: int) -> None:
        """The usage this answer reports: counted (per model) once it went out whole."""
        self.billed = (model, input_tokens, output_tokens)

    @property
    def kind(self) -> str | None:
        return None if self.fault is None else self.fault.kind

    @property
    def shape(self) -> Shape | None:
        return Shape(self.kind) if self.kind in SHAPING_KINDS else None

    @property
    def midstream(self) -> bool:
        return self.kind == "midstream"

    async def json(self, request: web.Request, body: dict[str, Any], headers: Mapping[str, str] | None = None,
                   deltas: int = 1) -> tuple[web.StreamResponse, bool]:
        """A JSON answer; `trickle` delays it as long as its `deltas` would have taken
        streamed, `cut` sends half of it and drops the connection."""
        if self.fault is not None and self.kind == "trickle":
            if not await _hold(request, deltas * self.fault.trickle_s()):
                raise _gone()
        headers = self._with_limits(headers)
        if self.kind != "cut":
            return web.json_response(body, headers=headers), True
        raw = json.dumps(body).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json", **(headers or {})})
        response.content_length = len(raw)
        await response.prepare(request)
        await response.write(raw[: len(raw) // 2])
        _drop(request)
        return response, False

    async def stream(self, request: web.Request, content_type: str, pieces: list[bytes],
                     headers: Mapping[str, str] | None = None) -> tuple[web.StreamResponse, bool]:
        """A streamed answer, piece by piece; (response, sent completely)."""
        response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache",
                                               **self._with_limits(headers)})
        fault = self.fault
        try:
            await response.prepare(request)
            if self.kind == "cut":
                # Half-way through the stream, half-way through one event or line.
                middle = len(pieces) // 2
                for piece in pieces[:middle]:
                    await response.write(piece)
                await response.write(pieces[middle][: max(1, len(pieces[middle]) // 2)])
                _drop(request)
                return response, False
            for index, piece in enumerate(pieces):
                if index and fault is not None and fault.kind == "trickle":
                    if not await _hold(request, fault.trickle_s()):
                        return response, False
                await response.write(piece)
                if index == 0 and fault is not None and fault.kind == "stall":
                    if not await _hold_counted(request, self.pstate, fault.latency_ms / 1000 or None):
                        return response, False
            await response.write_eof()
        except ConnectionError:  # aiohttp's ClientConnectionResetError is one
            log.info("%s: client disconnected mid-stream", request.path)
            return response, False
        return response, True


def _drop(request: web.Request) -> None:
    """Close the connection at once, mid-body, as a crashed proxy or provider would."""
    log.info("%s: cutting the connection mid-body", request.path)
    if request.transport is not None:
        request.transport.abort()


# render(request, delivery) -> (response, completed normally)
Renderer = Callable[[web.Request, Delivery], Awaitable[tuple[web.StreamResponse, bool]]]


async def serve(request: web.Request, provider: str, stream: bool, render: Renderer) -> web.StreamResponse:
    """Shared tail of every fault-eligible endpoint: fault, then answer, then counters.

    A non-streaming request under a `midstream` fault already got the provider's 500
    from _apply_fault, so renderers only deal with failing a stream part-way.
    """
    sim = request.app[SIM_STATE]
    pstate = sim.providers[provider]
    fault = pstate.take_fault(sim.clock())
    if fault is not None:
        log.info("%s: injecting fault %s", provider, fault.kind)
        await _apply_fault(request, provider, fault, stream)
    delivery = Delivery(fault, pstate, provider=provider)
    response, completed = await render(request, delivery)
    if completed:
        pstate.counters.served += 1
        if delivery.billed is not None:
            pstate.counters.bill(*delivery.billed)
            pstate.minute_tokens += delivery.billed[1] + delivery.billed[2]
    return response


def sse(event: str | None, data: dict[str, Any] | str) -> bytes:
    """One server-sent event; Anthropic names every event, OpenAI sends data only."""
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def surface_endpoint(provider: str, *, counted: bool = True):
    """Render SimError in `provider`'s wire format; count fault-eligible requests."""

    def wrap(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        @functools.wraps(handler)
        async def endpoint(request: web.Request) -> web.StreamResponse:
            if counted:
                request.app[SIM_STATE].providers[provider].counters.requests += 1
            try:
                return await handler(request)
            except SimError as err:
                return _render_error(provider, err)

        return endpoint

    return wrap
