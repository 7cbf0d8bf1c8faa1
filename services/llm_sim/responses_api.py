"""The OpenAI Responses API surface: POST /v1/responses (what the OpenAI Agents SDK and
`client.responses.create / parse / stream` use): input as a string or a list of items
(messages, function_call, function_call_output), instructions, function tools,
tool_choice, text.format (json_schema, json_object), max_output_tokens,
previous_response_id, and SSE streaming with named events.

Answers are decided by answers.respond like every other surface; this module only
translates. Faults are the openai provider's: one fault setting covers
/v1/chat/completions and /v1/responses alike.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

from aiohttp import web
from pydantic import Field

from tron.services.llm_sim.answers import Ask, Conversation, Reply, StopReason, ToolMode, ToolSpec, Turn, respond
from tron.services.llm_sim.openai_api import require_key, require_model
from tron.services.llm_sim.state import SIM_STATE
from tron.services.llm_sim.wire import (
    FAULT_ERRORS,
    Delivery,
    Lenient,
    SimError,
    parse_body,
    request_id,
    serve,
    sse,
    surface_endpoint,
)

ARGUMENT_DELTA_CHARS = 16  # size of the function_call_arguments.delta pieces
JSON_WORD_ERROR = ("Response input messages must contain the word 'json' in some form to use 'text.format' of "
                   "type 'json_object'.")
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def _parts_text(content: Any) -> str:
    """The text of a message's content or a function_call_output's output: a string,
    or a list of parts (input_text, output_text, refusal; images and files carry none)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(str(p.get("text") or p.get("refusal") or "") for p in content
                     if isinstance(p, dict) and p.get("type") in _TEXT_PARTS)


class TextFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(Lenient):
    format: TextFormat | None = None


class ResponsesRequest(Lenient):
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=16)  # the real API's floor
    stream: bool | None = False
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = None

    def items(self) -> list[dict[str, Any]]:
        """The input as a list of items (a string is one user message)."""
        return [{"type": "message", "role": "user", "content": self.input}] if isinstance(self.input, str) \
            else list(self.input)

    def function_tools(self) -> tuple[ToolSpec, ...]:
        # Hosted tools (web_search, file_search, ...) run inside OpenAI; the sim never picks one.
        return tuple(ToolSpec(t.get("name") or "", t.get("description") or "", t.get("parameters") or {"type": "object"})
                     for t in self.tools or () if t.get("type") == "function" and t.get("name"))

    def ask(self, history: list[dict[str, Any]]) -> Ask:
        """The neutral request over `history` (earlier items) plus this input; SimError
        400 for what the real API refuses the same way."""
        tools = self.function_tools()
        mode, name = self._tool_mode(tools)
        fmt = self.text.format if self.text and self.text.format else TextFormat()
        convo = conversation(self.instructions or "", [*history, *self.items()])
        if fmt.type == "json_object" and "json" not in json.dumps(self.input).lower() + (
                self.instructions or "").lower():
            raise SimError(400, "invalid_request_error", JSON_WORD_ERROR, param="text.format")
        schema = fmt.json_schema if fmt.type == "json_schema" else None
        return Ask("openai", convo, tools, mode, name, output_schema=schema, json_mode=fmt.type == "json_object",
                   max_tokens=self.max_output_tokens)

    def _tool_mode(self, tools: tuple[ToolSpec, ...]) -> tuple[ToolMode, str | None]:
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function":
                return ToolMode.AUTO, None  # allowed_tools, hosted tools: let the sim pick
            if all(t.name != choice.get("name") for t in tools):
                raise SimError(400, "invalid_request_error",
                               f"Tool choice '{choice.get('name')}' not found in 'tools' parameter.",
                               param="tool_choice")
            return ToolMode.NAMED, choice.get("name")
        return {"none": ToolMode.NONE, "required": ToolMode.ANY}.get(choice or "auto", ToolMode.AUTO), None


def conversation(instructions: str, items: list[dict[str, Any]]) -> Conversation:
    """Items as the neutral conversation: system and developer messages join the
    instructions; function_call items are assistant turns that call a tool, and
    function_call_output items the results, labelled through their call_id."""
    system = [instructions] if instructions else []
    names: dict[str, str] = {}  # call_id -> function name
    turns: list[Turn] = []
    for item in items:
        kind = item.get("type") or ("message" if "role" in item else "")
        if kind == "message":
            role = item.get("role", "user")
            text = _parts_text(item.get("content"))
            if role in ("system", "developer"):
                system.append(text)
            else:
                turns.append(Turn("assistant" if role == "assistant" else "user", text))
        elif kind == "function_call":
            names[item.get("call_id", "")] = item.get("name", "")
            turns.append(Turn("assistant", "", (item.get("name", ""),)))
        elif kind == "function_call_output":
            turns.append(Turn("tool", _parts_text(item.get("output")), tool_name=names.get(item.get("call_id", ""), "")))
    return Conversation("\n".join(system), tuple(turns))


# --------------------------------------------------------------------------- rendering


def _usage(reply: Reply) -> dict[str, Any]:
    return {"input_tokens": reply.input_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": reply.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": reply.input_tokens + reply.output_tokens}


def _output(reply: Reply, msg_id: str) -> list[dict[str, Any]]:
    """The output items of a reply, each as it is once complete."""
    if reply.tool_calls:
        return [{"type": "function_call", "id": "fc_sim_" + c.key, "call_id": "call_" + c.key, "name": c.name,
                 "arguments": c.arguments_json(), "status": "completed"} for c in reply.tool_calls]
    if reply.stop_reason is StopReason.REFUSAL:
        part: dict[str, Any] = {"type": "refusal", "refusal": reply.text}
    else:
        part = {"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}
    status = "incomplete" if reply.stop_reason is StopReason.MAX_TOKENS else "completed"
    return [{"type": "message", "id": msg_id, "status": status, "role": "assistant", "content": [part]}]


def _response(resp_id: str, req: ResponsesRequest, reply: Reply | None, output: list[dict[str, Any]]) -> dict[str, Any]:
    """The response object; `reply` None gives the in-progress one a stream starts with."""
    truncated = reply is not None and reply.stop_reason is StopReason.MAX_TOKENS
    status = "in_progress" if reply is None else "incomplete" if truncated else "completed"
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else {
        "type": "text"}
    tools = [{"type": "function", "description": None, "strict": True} | t if t.get("type") == "function" else t
             for t in req.tools or ()]
    return {
        "id": resp_id, "object": "response", "created_at": int(time.time()), "status": status,
        "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "max_tool_calls": None,
        "model": req.model, "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id, "reasoning": {"effort": None, "summary": None},
        "service_tier": "default", "store": req.store is not False, "temperature": 1.0,
        "text": {"format": fmt, "verbosity": "medium"}, "tool_choice": req.tool_choice or "auto",
        "tools": tools, "top_logprobs": 0, "top_p": 1.0, "truncation": "disabled",
        "usage": None if reply is None else _usage(reply), "user": None, "metadata": {},
    }


def _item_events(index: int, item: dict[str, Any], reply: Reply) -> list[dict[str, Any]]:
    """The events that stream one output item, from output_item.added to .done."""
    if item["type"] == "function_call":
        args = item["arguments"]
        head = item | {"arguments": "", "status": "in_progress"}
        ref = {"item_id": item["id"], "output_index": index}
        return [
            {"type": "response.output_item.added", "output_index": index, "item": head},
            *({"type": "response.function_call_arguments.delta", **ref, "delta": args[i : i + ARGUMENT_DELTA_CHARS]}
              for i in range(0, len(args), ARGUMENT_DELTA_CHARS)),
            {"type": "response.function_call_arguments.done", **ref, "name": item["name"], "arguments": args},
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]
    part = item["content"][0]
    refusal = part["type"] == "refusal"
    empty_part = {"type": "refusal", "refusal": ""} if refusal else part | {"text": ""}
    ref = {"item_id": item["id"], "output_index": index, "content_index": 0}
    kind = "refusal" if refusal else "output_text"
    deltas = [{"type": f"response.{kind}.delta", **ref, "delta": piece} | ({} if refusal else {"logprobs": []})
              for piece in reply.chunks() if piece]
    done = {"type": f"response.{kind}.done", **ref} | (
        {"refusal": part["refusal"]} if refusal else {"text": part["text"], "logprobs": []})
    return [
        {"type": "response.output_item.added", "output_index": index, "item": item | {"status": "in_progress",
                                                                                    "content": []}},
        {"type": "response.content_part.added", **ref, "part": empty_part},
        *deltas,
        done,
        {"type": "response.content_part.done", **ref, "part": part},
        {"type": "response.output_item.done", "output_index": index, "item": item},
    ]


def _events(resp_id: str, req: ResponsesRequest, reply: Reply, output: list[dict[str, Any]],
            fail_midstream: bool) -> list[bytes]:
    """The SSE events of a streamed response, numbered by sequence_number; with
    fail_midstream an `error` event follows the first delta and the stream ends."""
    start = _response(resp_id, req, None, [])
    events: list[dict[str, Any]] = [{"type": "response.created", "response": start},
                                    {"type": "response.in_progress", "response": start}]
    for index, item in enumerate(output):
        events += _item_events(index, item, reply)
    if fail_midstream:
        fault = FAULT_ERRORS["openai"]["midstream"]
        first_delta = next((i for i, e in enumerate(events) if e["type"].endswith(".delta")), len(events) - 1)
        events = events[: first_delta + 1] + [{"type": "error", "code": "server_error", "message": fault.message,
                                               "param": None}]
    else:
        final = _response(resp_id, req, reply, output)
        events.append({"type": "response.incomplete" if final["status"] == "incomplete" else "response.completed",
                       "response": final})
    return [sse(e["type"], e | {"sequence_number": n}) for n, e in enumerate(events)]


@surface_endpoint("openai")
async def create_response(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses."""
    require_key(request)
    state = request.app[SIM_STATE]
    req: ResponsesRequest = await parse_body(request, ResponsesRequest)
    require_model(request, req.model)
    history: list[dict[str, Any]] = []
    if req.previous_response_id:
        held = state.threads.get(req.previous_response_id)
        if held is None:
            raise SimError(400, "invalid_request_error",
                           f"Previous response with id '{req.previous_response_id}' not found.",
                           param="previous_response_id")
        history = list(held)
    ask = req.ask(history)
    stream = bool(req.stream)

    async def render(request: web.Request, delivery: Delivery):
        reply = respond(ask, delivery.shape)
        delivery.bill(req.model, reply.input_tokens, reply.output_tokens)
        resp_id = "resp_sim_" + secrets.token_hex(12)
        output = _output(reply, "msg_sim_" + secrets.token_hex(12))
        if req.store is not False:
            state.threads.hold(resp_id, [*history, *req.items(), *output])
        headers = {"x-request-id": request_id()}
        if not stream:
            return await delivery.json(request, _response(resp_id, req, reply, output), headers, len(reply.chunks()))
        events = _events(resp_id, req, reply, output, delivery.midstream)
        response, completed = await delivery.stream(request, "text/event-stream; charset=utf-8", events, headers)
        return response, completed and not delivery.midstream

    return await serve(request, "openai", stream, render)
