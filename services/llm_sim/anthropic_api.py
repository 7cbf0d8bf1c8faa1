"""The Anthropic Messages API surface: POST /v1/messages (text, tools, structured output,
streaming), POST /v1/messages/count_tokens, GET /v1/models[/{id}]."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any, Literal, Self

from aiohttp import web
from pydantic import Field, ValidationError

from tron.services.llm_sim.answers import Ask, Conversation, Reply, ToolMode, ToolSpec, Turn, respond
from tron.services.llm_sim.catalog import Catalog
from tron.services.llm_sim.state import SIM_STATE, HeldThreads, SimState
from tron.services.llm_sim.wire import (
    Lenient,
    SimError,
    anthropic_error_body,
    describe,
    parse_body,
    request_id,
    serve,
    Delivery,
    sse,
    surface_endpoint,
)

JSON_DELTA_CHARS = 16  # size of the input_json_delta pieces of a streamed tool call
MIN_THINKING_BUDGET = 1024  # the Messages API's floor for thinking.budget_tokens
MODEL_CREATED_AT = "2025-09-29T00:00:00Z"


class AnthropicBlock(Lenient):
    type: str
    text: str | None = None
    id: str | None = None  # tool_use
    name: str | None = None  # tool_use
    tool_use_id: str | None = None  # tool_result
    content: str | list[AnthropicBlock] | None = None  # tool_result


def _blocks_text(content: str | list[AnthropicBlock] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(b.text for b in content if b.type == "text" and b.text)


class AnthropicMessage(Lenient):
    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock]


class AnthropicTool(Lenient):
    name: str = Field(min_length=1)
    description: str = ""
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # absent or "custom": a client tool; else a server tool


class AnthropicToolChoice(Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class JsonOutputFormat(Lenient):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(Lenient):
    format: JsonOutputFormat | None = None


class ThinkingParam(Lenient):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class ThreadParam(Lenient):
    type: Literal["create", "continue"]
    previous_message_id: str | None = None


class AnthropicCountRequest(Lenient):
    """Body of /v1/messages/count_tokens, and everything /v1/messages shares with it."""

    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[AnthropicBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    output_config: OutputConfig | None = None  # what messages.parse(output_format=T) sends
    output_format: JsonOutputFormat | None = None  # the structured-outputs beta's spelling
    thread: ThreadParam | None = None  # beta: the server holds the conversation
    thinking: ThinkingParam | None = None  # extended thinking: thinking blocks come first

    def resumed(self, threads: HeldThreads) -> Self:
        """This request with the conversation held under thread.previous_message_id
        before its own messages; SimError 404 when nothing is held under that id."""
        if self.thread is None or self.thread.type != "continue":
            return self
        held = threads.get(self.thread.previous_message_id or "")
        if held is None:
            raise SimError(404, "not_found_error",
                           f"thread.previous_message_id: no conversation held for {self.thread.previous_message_id!r}")
        return self.model_copy(update={"messages": [*held, *self.messages]})

    def conversation(self) -> Conversation:
        tool_names: dict[str, str] = {}  # tool_use id -> tool name, to label results
        turns: list[Turn] = []
        for msg in self.messages:
            if isinstance(msg.content, str):
                turns.append(Turn(msg.role, msg.content))
                continue
            calls = []
            for block in msg.content:
                if block.type == "tool_use":
                    tool_names[block.id or ""] = block.name or ""
                    calls.append(block.name or "")
                elif block.type == "tool_result":
                    turns.append(Turn("tool", _blocks_text(block.content),
                                      tool_name=tool_names.get(block.tool_use_id or "", "")))
            text = _blocks_text(msg.content)
            if text or calls or not any(b.type == "tool_result" for b in msg.content):
                turns.append(Turn(msg.role, text, tuple(calls)))
        return Conversation(_blocks_text(self.system), tuple(turns))

    def ask(self, max_tokens: int | None = None, stop: tuple[str, ...] = ()) -> Ask:
        """The neutral request; SimError 400 for a tool_choice the tools cannot meet."""
        # Server tools (web search, code execution...) run inside Anthropic; the sim
        # cannot run them, so it never picks one.
        tools = tuple(ToolSpec(t.name, t.description, t.input_schema or {"type": "object"})
                      for t in self.tools or () if t.type in (None, "custom"))
        choice = self.tool_choice or AnthropicToolChoice(type="auto")
        if self.tool_choice is not None and not self.tools and choice.type != "none":
            raise SimError(400, "invalid_request_error", "tool_choice may only be specified while providing tools.")
        if choice.type == "tool" and all(t.name != choice.name for t in tools):
            raise SimError(400, "invalid_request_error",
                           f"tool_choice.name: tool {choice.name!r} is not one of the provided tools")
        fmt = (self.output_config.format if self.output_config else None) or self.output_format
        think = self.thinking is not None and self.thinking.type != "disabled"
        if think and choice.type in ("any", "tool"):
            raise SimError(400, "invalid_request_error", "Thinking may not be enabled when tool_choice forces tool use.")
        return Ask("anthropic", self.conversation(), tools, ToolMode(choice.type), choice.name,
                   output_schema=fmt.json_schema if fmt else None, max_tokens=max_tokens, stop=stop, think=think)


class AnthropicRequest(AnthropicCountRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False

    def check_thinking(self) -> None:
        """The Messages API's 400s for a thinking budget it cannot use."""
        if self.thinking is None or self.thinking.type != "enabled":
            return
        budget = self.thinking.budget_tokens
        if budget is None:
            raise SimError(400, "invalid_request_error", "thinking.enabled.budget_tokens: Field required")
        if budget < MIN_THINKING_BUDGET:
            raise SimError(400, "invalid_request_error",
                           f"thinking.enabled.budget_tokens: Input should be greater than or equal to {MIN_THINKING_BUDGET}")
        if self.max_tokens <= budget:
            raise SimError(400, "invalid_request_error",
                           "`max_tokens` must be greater than `thinking.budget_tokens`.")


def _anthropic_key(request: web.Request) -> str:
    key = request.headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def require_key(request: web.Request) -> None:
    if not _anthropic_key(request):
        raise SimError(401, "authentication_error", "x-api-key header is required")


def require_model(catalog: Catalog, model: str) -> None:
    if not catalog.anthropic_knows(model):
        raise SimError(404, "not_found_error", f"model: {model}")


# --------------------------------------------------------------------------- messages


def thinking_signature(thinking: str) -> str:
    """The opaque signature a thinking block carries (clients send it back unchanged)."""
    return base64.b64encode(hashlib.sha256(b"sim-thinking\0" + thinking.encode()).digest() * 2).decode()


def _content(reply: Reply) -> list[dict[str, Any]]:
    # An empty answer has no block at all, as when the model ends its turn at once.
    blocks = [{"type": "thinking", "thinking": reply.thinking, "signature": thinking_signature(reply.thinking)}
              ] if reply.thinking else []
    blocks += [{"type": "text", "text": reply.text}] if reply.text else []
    return blocks + [{"type": "tool_use", "id": "toolu_sim_" + c.key, "name": c.name, "input": c.arguments}
                     for c in reply.tool_calls]


def _message(msg_id: str, model: str, reply: Reply) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _content(reply),
        "stop_reason": str(reply.stop_reason),
        "stop_sequence": reply.stop_sequence,
        "usage": _usage(reply.input_tokens, reply.output_tokens),
    }


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": output_tokens, "service_tier": "standard"}


def _block_events(index: int, block: dict[str, Any], reply: Reply) -> tuple[bytes, list[bytes], bytes]:
    """(content_block_start, its deltas, content_block_stop) for one content block."""
    if block["type"] == "text":
        start = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": chunk} for chunk in reply.chunks()]
    elif block["type"] == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": chunk} for chunk in reply.thinking_chunks()]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    else:
        start = block | {"input": {}}
        raw = json.dumps(block["input"])
        deltas = [{"type": "input_json_delta", "partial_json": raw[i : i + JSON_DELTA_CHARS]}
                  for i in range(0, len(raw), JSON_DELTA_CHARS)]
    return (
        sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}),
        [sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas],
        sse("content_block_stop", {"type": "content_block_stop", "index": index}),
    )


def _events(msg_id: str, model: str, reply: Reply, fail_midstream: bool) -> list[bytes]:
    """The SSE events of a streamed reply; with fail_midstream, an error event follows
    the first delta (an `event: error` in a stream is how Anthropic reports overload).
    Usage comes twice, as from the real API: message_start counts the input (and one
    output token), message_delta the final totals."""
    start = _message(msg_id, model, reply) | {"content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = _usage(reply.input_tokens, 1)
    events = [sse("message_start", {"type": "message_start", "message": start})]
    blocks = _content(reply)
    if not blocks:
        events.append(sse("ping", {"type": "ping"}))
    for index, block in enumerate(blocks):
        block_start, deltas, block_stop = _block_events(index, block, reply)
        events.append(block_start)
        if index == 0:
            events.append(sse("ping", {"type": "ping"}))
        if fail_midstream:
            return events + deltas[:1] + [sse("error", anthropic_error_body("overloaded_error", "Overloaded"))]
        events += deltas + [block_stop]
    return events + [
        sse("message_delta", {"type": "message_delta",
                              "delta": {"stop_reason": str(reply.stop_reason), "stop_sequence": reply.stop_sequence},
                              "usage": {"input_tokens": reply.input_tokens, "cache_creation_input_tokens": 0,
                                        "cache_read_input_tokens": 0, "output_tokens": reply.output_tokens}}),
        sse("message_stop", {"type": "message_stop"}),
    ]


@surface_endpoint("anthropic")
async def messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages."""
    require_key(request)
    state = request.app[SIM_STATE]
    req: AnthropicRequest = await parse_body(request, AnthropicRequest)
    require_model(state.catalog, req.model)
    req.check_thinking()
    req = req.resumed(state.threads)
    ask = req.ask(req.max_tokens, tuple(req.stop_sequences or ()))

    async def render(request: web.Request, delivery: Delivery):
        reply = respond(ask, delivery.shape)
        delivery.bill(req.model, reply.input_tokens, reply.output_tokens)
        msg_id = "msg_sim_" + secrets.token_hex(12)
        if req.thread is not None:
            answer = AnthropicMessage.model_validate({"role": "assistant", "content": _content(reply)})
            state.threads.hold(msg_id, [*req.messages, answer])
        headers = {"request-id": request_id()}
        if not req.stream:
            return await delivery.json(request, _message(msg_id, req.model, reply), headers, len(reply.chunks()))
        events = _events(msg_id, req.model, reply, delivery.midstream)
        response, completed = await delivery.stream(request, "text/event-stream; charset=utf-8", events, headers)
        return response, completed and not delivery.midstream

    return await serve(request, "anthropic", req.stream, render)


def answer(state: SimState, req: AnthropicRequest) -> dict[str, Any]:
    """The message /v1/messages would answer `req` with, unstreamed and without faults
    (what a Message Batch's succeeded result holds); SimError where it would refuse."""
    require_model(state.catalog, req.model)
    req.check_thinking()
    reply = respond(req.ask(req.max_tokens, tuple(req.stop_sequences or ())))
    return _message("msg_sim_" + secrets.token_hex(12), req.model, reply)


@surface_endpoint("anthropic", counted=False)
async def count_tokens(request: web.Request) -> web.Response:
    """POST /v1/messages/count_tokens: the input_tokens /v1/messages would report."""
    require_key(request)
    state = request.app[SIM_STATE]
    req: AnthropicCountRequest = await parse_body(request, AnthropicCountRequest)
    require_model(state.catalog, req.model)
    req = req.resumed(state.threads)
    return web.json_response({"input_tokens": req.ask().input_tokens()}, headers={"request-id": request_id()})


# --------------------------------------------------------------------------- models


def _display_name(model: str) -> str:
    """"claude-sonnet-4-5" -> "Claude Sonnet 4.5" (date suffixes dropped)."""
    parts = model.split("-")
    words = [p.capitalize() for p in parts if not p.isdigit()]
    version = ".".join(p for p in parts if p.isdigit() and len(p) < 8)
    return " ".join(words + ([version] if version else []))


def model_info(model: str) -> dict[str, Any]:
    return {"type": "model", "id": model, "display_name": _display_name(model), "created_at": MODEL_CREATED_AT,
            "lifecycle": "active", "max_input_tokens": 200_000, "max_tokens": 64_000}


class ListQuery(Lenient):
    limit: int = Field(20, ge=1, le=1000)
    after_id: str | None = None
    before_id: str | None = None


def page(ids: list[str], query: ListQuery) -> tuple[list[str], bool]:
    """One page of `ids` in Anthropic's cursor style (after_id / before_id / limit)."""
    if query.after_id in ids:
        start = ids.index(query.after_id) + 1
        return ids[start : start + query.limit], start + query.limit < len(ids)
    if query.before_id in ids:
        end = ids.index(query.before_id)
        return ids[max(0, end - query.limit) : end], end - query.limit > 0
    return ids[: query.limit], len(ids) > query.limit


def paged(request: web.Request, ids: list[str]) -> tuple[list[str], dict[str, Any]]:
    """A list endpoint's page of ``ids`` (the query's limit, after_id, before_id; a bad one is
    a 400) and the envelope's fields besides ``data``."""
    try:
        query = ListQuery.model_validate(dict(request.query))
    except ValidationError as exc:
        raise SimError(400, "invalid_request_error", describe(exc)) from None
    shown, has_more = page(ids, query)
    return shown, {"has_more": has_more, "first_id": shown[0] if shown else None,
                   "last_id": shown[-1] if shown else None}


@surface_endpoint("anthropic", counted=False)
async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models for the Anthropic SDK (it sends anthropic-version)."""
    require_key(request)
    ids, envelope = paged(request, list(request.app[SIM_STATE].catalog.anthropic))
    return web.json_response({"data": [model_info(i) for i in ids], **envelope}, headers={"request-id": request_id()})


@surface_endpoint("anthropic", counted=False)
async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model_id} for the Anthropic SDK."""
    require_key(request)
    model = request.match_info["model_id"]
    require_model(request.app[SIM_STATE].catalog, model)
    return web.json_response(model_info(model), headers={"request-id": request_id()})
