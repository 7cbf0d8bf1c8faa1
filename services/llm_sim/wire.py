"""Plumbing every API surface shares: errors in each provider's wire format, body
parsing, fault injection around a handler, and streamed bodies."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from services.llm_sim.state import SIM_STATE, FaultSpec

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
    message: str
    code: str | None = None


_OPENAI_500 = "The server had an error while processing your request. Sorry about that!"
# The answer each fault kind gets, per provider.
FAULT_ERRORS: dict[str, dict[str, FaultError]] = {
    "anthropic": {
        "overloaded": FaultError(529, "overloaded_error", "Overloaded"),
        "rate-limit": FaultError(429, "rate_limit_error", "Number of requests has exceeded your rate limit"),
        "error": FaultError(500, "api_error", "Internal server error"),
        "auth": FaultError(401, "authentication_error", "invalid x-api-key"),
        "midstream": FaultError(500, "api_error", "Internal server error"),
    },
    "ollama": {
        "overloaded": FaultError(503, "overloaded_error", "server overloaded"),
        "rate-limit": FaultError(429, "rate_limit_error", "too many requests"),
        "error": FaultError(500, "api_error", "internal server error"),
        "auth": FaultError(401, "authentication_error", "unauthorized"),
        "midstream": FaultError(500, "api_error", "model runner has unexpectedly stopped"),
    },
    "openai": {
        "overloaded": FaultError(503, "server_error", "The server is overloaded or not ready yet."),
        "rate-limit": FaultError(429, "requests", "Rate limit reached for requests", "rate_limit_exceeded"),
        "error": FaultError(500, "server_error", _OPENAI_500),
        "auth": FaultError(401, "invalid_request_error", "Incorrect API key provided.", "invalid_api_key"),
        "midstream": FaultError(500, "server_error", _OPENAI_500),
    },
}

def fault_error(provider: str, fault: FaultSpec) -> SimError:
    """The SimError for a fault; 429s carry retry-after like the real APIs."""
    spec = FAULT_ERRORS[provider][fault.kind]
    headers = {}
    if spec.status == 429 and provider != "ollama":
        ms = fault.retry_after_ms
        headers = {"retry-after": str(math.ceil(ms / 1000)), "retry-after-ms": str(ms)}
    return SimError(spec.status, spec.etype, spec.message, code=spec.code, headers=headers)


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
        raise _gone()
    if fault.latency_ms and not await _hold(request, fault.latency_ms / 1000):
        raise _gone()
    if fault.kind == "latency" or (fault.kind == "midstream" and stream):
        return
    raise fault_error(provider, fault)


# render(request, fail_midstream) -> (response, completed normally)
Renderer = Callable[[web.Request, bool], Awaitable[tuple[web.StreamResponse, bool]]]


async def serve(request: web.Request, provider: str, stream: bool, render: Renderer) -> web.StreamResponse:
    """Shared tail of every fault-eligible endpoint: fault, then answer, then counters.

    A non-streaming request under a `midstream` fault already got the provider's 500
    from _apply_fault, so renderers only deal with failing a stream part-way.
    """
    pstate = request.app[SIM_STATE].providers[provider]
    fault = pstate.take_fault()
    if fault is not None:
        log.info("%s: injecting fault %s", provider, fault.kind)
        await _apply_fault(request, provider, fault, stream)
    fail_midstream = fault is not None and fault.kind == "midstream"
    response, completed = await render(request, fail_midstream)
    if completed:
        pstate.served += 1
    return response


async def write_stream(request: web.Request, response: web.StreamResponse, pieces: list[bytes]) -> bool:
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


async def stream_response(request: web.Request, content_type: str, pieces: list[bytes],
                          headers: Mapping[str, str] | None = None) -> tuple[web.StreamResponse, bool]:
    response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache",
                                           **(headers or {})})
    return response, await write_stream(request, response, pieces)


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
                request.app[SIM_STATE].providers[provider].requests += 1
            try:
                return await handler(request)
            except SimError as err:
                return _render_error(provider, err)

        return endpoint

    return wrap
