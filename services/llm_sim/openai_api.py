"""The OpenAI-compatible surface (OpenAI itself, and what vLLM, LM Studio, llama.cpp's
server and Ollama serve under /v1): POST /v1/chat/completions (text, tools,
response_format, max_tokens / max_completion_tokens, stop, SSE streaming), POST
/v1/embeddings, GET /v1/models[/{id}]. Errors use OpenAI's
{"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import base64
import secrets
import struct
import time
from typing import Any, Literal

from aiohttp import web
from pydantic import Field

from tron.services.llm_sim.answers import (
    Ask,
    Conversation,
    Reply,
    StopReason,
    ToolMode,
    ToolSpec,
    Turn,
    count_tokens,
    embedding,
    respond,
)
from tron.services.llm_sim.catalog import OPENAI_PREFIXES
from tron.services.llm_sim.state import SIM_STATE
from tron.services.llm_sim.wire import (
    FAULT_ERRORS,
    Lenient,
    SimError,
    openai_error_body,
    parse_body,
    request_id,
    serve,
    Delivery,
    sse,
    surface_endpoint,
)

MODEL_CREATED = 1_715_367_049  # a fixed Unix time for /v1/models
JSON_WORD_ERROR = ("'messages' must contain the word 'json' in some form, to use 'response_format' "
                   "of type 'json_object'.")
_FINISH = {
    StopReason.END_TURN: "stop",
    StopReason.STOP_SEQUENCE: "stop",
    StopReason.MAX_TOKENS: "length",
    StopReason.TOOL_USE: "tool_calls",
    StopReason.REFUSAL: "stop",  # the refusal itself is in message.refusal
}


class OpenAIFunctionCall(Lenient):
    name: str = ""
    arguments: str = ""


class OpenAIToolCall(Lenient):
    id: str = ""
    type: str = "function"
    function: OpenAIFunctionCall


class OpenAIMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[OpenAIToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class OpenAIFunction(Lenient):
    name: str = Field(min_length=1)
    description: str | None = ""
    parameters: dict[str, Any] | None = None


class OpenAITool(Lenient):
    type: Literal["function"] = "function"
    function: OpenAIFunction


class _ChosenFunction(Lenient):
    name: str


class OpenAINamedToolChoice(Lenient):
    type: Literal["function"] = "function"
    function: _ChosenFunction


class JsonSchemaFormat(Lenient):
    name: str = "response"
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Lenient):
    include_usage: bool | None = False


class ChatRequest(Lenient):
    model: str = Field(min_length=1)
    messages: list[OpenAIMessage] = Field(min_length=1)
    tools: list[OpenAITool] | None = None
    tool_choice: Literal["none", "auto", "required"] | OpenAINamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def conversation(self) -> Conversation:
        system = "\n".join(m.text() for m in self.messages if m.role in ("system", "developer"))
        names: dict[str, str] = {}  # tool_call id -> function name, to label results
        turns: list[Turn] = []
        for msg in self.messages:
            if msg.role in ("system", "developer"):
                continue
            if msg.role in ("tool", "function"):
                name = msg.name or names.get(msg.tool_call_id or "", "")
                turns.append(Turn("tool", msg.text(), tool_name=name))
                continue
            calls = msg.tool_calls or []
            names |= {c.id: c.function.name for c in calls}
            turns.append(Turn(msg.role, msg.text(), tuple(c.function.name for c in calls)))
        return Conversation(system, tuple(turns))

    def _tool_mode(self, tools: tuple[ToolSpec, ...]) -> tuple[ToolMode, str | None]:
        choice = self.tool_choice
        if isinstance(choice, OpenAINamedToolChoice):
            if all(t.name != choice.function.name for t in tools):
                raise SimError(400, "invalid_request_error",
                               f"Invalid value for 'tool_choice': function '{choice.function.name}' "
                               "is not one of the provided tools.", param="tool_choice")
            return ToolMode.NAMED, choice.function.name
        if choice is not None and not tools:
            raise SimError(400, "invalid_request_error",
                           "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
                           "are specified.", param="tool_choice")
        return {"none": ToolMode.NONE, "required": ToolMode.ANY}.get(choice or "auto", ToolMode.AUTO), None

    def ask(self) -> Ask:
        """The neutral request; SimError 400 for what OpenAI refuses the same way."""
        tools = tuple(ToolSpec(t.function.name, t.function.description or "",
                               t.function.parameters or {"type": "object"}) for t in self.tools or ())
        mode, name = self._tool_mode(tools)
        fmt = self.response_format
        schema = fmt.json_schema.json_schema if fmt and fmt.type == "json_schema" and fmt.json_schema else None
        json_mode = bool(fmt) and fmt.type != "text" and schema is None
        convo = self.conversation()
        if fmt and fmt.type == "json_object" and not any(
                "json" in m.text().lower() for m in self.messages):
            raise SimError(400, "invalid_request_error", JSON_WORD_ERROR, param="messages")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Ask("openai", convo, tools, mode, name, output_schema=schema, json_mode=json_mode,
                   max_tokens=self.max_completion_tokens or self.max_tokens, stop=stop)


class EmbeddingsRequest(Lenient):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    def texts(self) -> list[tuple[str, int]]:
        """(text to embed, its token count) per input; token arrays embed as their ids."""
        items = [self.input] if isinstance(self.input, str) else self.input
        if items and all(isinstance(i, int) for i in items):
            items = [items]
        out = []
        for item in items:
            if isinstance(item, str):
                out.append((item, count_tokens(item)))
            else:
                out.append((" ".join(map(str, item)), len(item)))
        if not out or any(not text for text, _ in out):
            raise SimError(400, "invalid_request_error", "'$.input' is invalid. Please check the API reference: "
                           "https://platform.openai.com/docs/api-reference.", param="input")
        return out


# --------------------------------------------------------------------------- checks


def require_key(request: web.Request) -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise SimError(401, "invalid_request_error",
                       "You didn't provide an API key. You need to provide your API key in an Authorization "
                       "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")


def require_model(request: web.Request, model: str) -> None:
    if not request.app[SIM_STATE].catalog.openai_knows(model):
        raise SimError(404, "invalid_request_error",
                       f"The model `{model}` does not exist or you do not have access to it.",
                       code="model_not_found")


# --------------------------------------------------------------------------- chat


def _finish_reason(ask: Ask, reply: Reply) -> str:
    # OpenAI quirk, kept because clients must cope with it: a call forced by naming the
    # function in tool_choice ends with "stop", not "tool_calls".
    if reply.tool_calls and ask.tool_mode is ToolMode.NAMED:
        return "stop"
    return _FINISH[reply.stop_reason]


def _usage(reply: Reply) -> dict[str, Any]:
    return {"prompt_tokens": reply.input_tokens, "completion_tokens": reply.output_tokens,
            "total_tokens": reply.input_tokens + reply.output_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def _tool_calls(reply: Reply) -> list[dict[str, Any]]:
    return [{"id": "call_" + c.key, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments_json()}} for c in reply.tool_calls]


def _completion(cid: str, model: str, ask: Ask, reply: Reply) -> dict[str, Any]:
    refused = reply.stop_reason is StopReason.REFUSAL
    message: dict[str, Any] = {"role": "assistant", "content": None if reply.tool_calls or refused else reply.text,
                               "refusal": reply.text if refused else None, "annotations": []}
    if reply.tool_calls:
        message["tool_calls"] = _tool_calls(reply)
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(ask, reply)}],
        "usage": _usage(reply), "service_tier": "default", "system_fingerprint": "fp_llm_sim",
    }


def _deltas(reply: Reply) -> list[dict[str, Any]]:
    """The delta of each chunk after the role chunk: text pieces, or each tool call's
    head (id, name) followed by its arguments in pieces."""
    if not reply.tool_calls:
        field = "refusal" if reply.stop_reason is StopReason.REFUSAL else "content"
        return [{field: piece} for piece in reply.chunks()]
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(_tool_calls(reply)):
        args = call["function"]["arguments"]
        head = call | {"index": index, "function": {"name": call["function"]["name"], "arguments": ""}}
        deltas.append({"tool_calls": [head]})
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": args[i : i + 16]}}]}
                   for i in range(0, len(args), 16)]
    return deltas


def _chunks(cid: str, model: str, ask: Ask, reply: Reply, include_usage: bool, fail_midstream: bool) -> list[bytes]:
    created = int(time.time())

    def chunk(delta: dict[str, Any] | None, finish: str | None = None) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fp_llm_sim", "choices": choices}
        if include_usage:
            body["usage"] = _usage(reply) if delta is None else None
        return sse(None, body)

    pieces = [chunk({"role": "assistant", "content": "", "refusal": None})]
    pieces += [chunk(delta) for delta in _deltas(reply)]
    if fail_midstream:
        fault = FAULT_ERRORS["openai"]["midstream"]
        error = SimError(fault.status, fault.etype, fault.message, code=fault.code)
        return pieces[:2] + [sse(None, openai_error_body(error))]
    pieces.append(chunk({}, _finish_reason(ask, reply)))
    if include_usage:
        pieces.append(chunk(None))
    return pieces + [sse(None, "[DONE]")]


@surface_endpoint("openai")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    require_key(request)
    req: ChatRequest = await parse_body(request, ChatRequest)
    require_model(request, req.model)
    ask = req.ask()
    stream = bool(req.stream)

    async def render(request: web.Request, delivery: Delivery):
        reply = respond(ask, delivery.shape)
        delivery.bill(req.model, reply.input_tokens, reply.output_tokens)
        cid = "chatcmpl-sim" + secrets.token_hex(12)
        headers = {"x-request-id": request_id()}
        if not stream:
            return await delivery.json(request, _completion(cid, req.model, ask, reply), headers, len(reply.chunks()))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        pieces = _chunks(cid, req.model, ask, reply, include_usage, delivery.midstream)
        response, completed = await delivery.stream(request, "text/event-stream; charset=utf-8", pieces, headers)
        return response, completed and not delivery.midstream

    return await serve(request, "openai", stream, render)


# --------------------------------------------------------------------------- embeddings


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@surface_endpoint("openai")
async def embeddings(request: web.Request) -> web.StreamResponse:
    """POST /v1/embeddings (the SDK asks for base64 unless told otherwise)."""
    require_key(request)
    req: EmbeddingsRequest = await parse_body(request, EmbeddingsRequest)
    require_model(request, req.model)
    texts = req.texts()
    dims = request.app[SIM_STATE].catalog.openai_dims(req.model)
    dims = min(dims, req.dimensions or dims)

    async def render(request: web.Request, delivery: Delivery):
        data = [{"object": "embedding", "index": i,
                 "embedding": _encode(embedding(req.model, text, dims), req.encoding_format)}
                for i, (text, _) in enumerate(texts)]
        tokens = sum(n for _, n in texts)
        body = {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.json_response(body, headers={"x-request-id": request_id()}), True

    return await serve(request, "openai", False, render)


# --------------------------------------------------------------------------- models


def _model(request: web.Request, model: str) -> dict[str, Any]:
    catalog = request.app[SIM_STATE].catalog
    owner = "openai" if model in catalog.openai or model.startswith(OPENAI_PREFIXES) else "library"
    return {"id": model, "object": "model", "created": MODEL_CREATED, "owned_by": owner}


@surface_endpoint("openai", counted=False)
async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models for OpenAI-style clients."""
    require_key(request)
    models = request.app[SIM_STATE].catalog.openai_models()
    return web.json_response({"object": "list", "data": [_model(request, m) for m in models]})


@surface_endpoint("openai", counted=False)
async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model_id} for OpenAI-style clients."""
    require_key(request)
    model = request.match_info["model_id"]
    require_model(request, model)
    return web.json_response(_model(request, model))
