"""Answers that are 200 OK but broken: check_reply, check_tool_calls on the SDKs' own
response objects, RepeatGuard, and reply_of (raw SDK responses read as an LLMReply)."""

from __future__ import annotations

import json

import ollama
import pytest
from anthropic.types import Message
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from pydantic import ValidationError

from tron.common.providers import (
    LLMReply,
    OutputChecks,
    RepeatGuard,
    check_reply,
    check_tool_calls,
    failure_class,
    reply_of,
)

DEFAULT = OutputChecks()


def _reply(text="an answer", stop="end", refusal=False, **kw) -> LLMReply:
    return LLMReply(provider="anthropic", model="m", text=text, input_tokens=3, output_tokens=5, streamed=False,
                    stop_reason=stop, refusal=refusal, **kw)


# (reply, checks, complete, reason or None)
REPLY_CASES = [
    (_reply(), DEFAULT, False, None),
    (_reply(""), DEFAULT, False, "empty_answer"),
    (_reply(" \n\t"), DEFAULT, False, "empty_answer"),
    (_reply("", stop=None), DEFAULT, False, "empty_answer"),
    (_reply("", stop="tool_use"), DEFAULT, False, None),  # the answer is the tool call
    (_reply(""), OutputChecks(empty=False), False, None),
    (_reply("I can't help with that", stop="refusal"), DEFAULT, False, "refusal"),
    (_reply("", stop="end", refusal=True), DEFAULT, False, "refusal"),  # OpenAI's message.refusal
    (_reply("", stop="refusal"), DEFAULT, False, "refusal"),  # the refusal, not "empty", is the cause
    (_reply("no", stop="refusal"), OutputChecks(refusal=False), False, None),
    (_reply("half an ans", stop="max_tokens"), DEFAULT, False, None),  # off by default
    (_reply("half an ans", stop="max_tokens"), DEFAULT, True, "max_tokens"),  # the step needs it whole
    (_reply("half an ans", stop="max_tokens"), OutputChecks(max_tokens=True), False, "max_tokens"),
    (_reply("", stop="max_tokens"), DEFAULT, False, "empty_answer"),
    (_reply("", stop="max_tokens"), DEFAULT, True, "max_tokens"),
    (_reply("fine", stop="stop_sequence"), OutputChecks(max_tokens=True), True, None),
]


@pytest.mark.parametrize("reply,checks,complete,reason", REPLY_CASES)
def test_check_reply(reply, checks, complete, reason):
    failure = check_reply(reply, checks, complete=complete)
    if reason is None:
        assert failure is None
        return
    assert (failure.provider, failure.reason, failure.retryable) == ("anthropic", reason, True)
    assert failure_class(failure.reason) == "provider" and failure.message


def test_a_broken_reply_keeps_the_limits_of_its_call():
    failure = check_reply(_reply("", limits={"requests_remaining": 2.0}), DEFAULT)
    assert failure.limits == {"requests_remaining": 2.0}


def test_output_checks_are_frozen_and_strict():
    with pytest.raises(ValidationError, match="bogus"):
        OutputChecks(bogus=True)
    with pytest.raises(ValidationError, match="repeat_limit"):
        OutputChecks(repeat_limit=-1)
    with pytest.raises(ValidationError, match="frozen"):
        DEFAULT.empty = False  # type: ignore[misc]


# --------------------------------------------------------------------------- tool calls

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                  "required": ["city"], "additionalProperties": False}
ANTHROPIC_TOOLS = [{"name": "weather", "description": "the weather", "input_schema": WEATHER_SCHEMA},
                   {"type": "web_search_20250305", "name": "web_search"}]
OPENAI_TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER_SCHEMA}}]
RESPONSES_TOOLS = [{"type": "function", "name": "weather", "parameters": WEATHER_SCHEMA, "strict": False}]
OLLAMA_TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER_SCHEMA}}]


def _anthropic_msg(*calls, stop="tool_use", text="") -> Message:
    content = ([{"type": "text", "text": text}] if text else []) + [
        {"type": "tool_use", "id": f"toolu_{i}", "name": name, "input": args} for i, (name, args) in enumerate(calls)]
    return Message.model_validate({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                                   "content": content, "stop_reason": stop, "stop_sequence": None,
                                   "usage": {"input_tokens": 10, "output_tokens": 20}})


def _chat_completion(*calls, content=None, finish="tool_calls", refusal=None) -> ChatCompletion:
    tool_calls = [{"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
                  for i, (name, args) in enumerate(calls)] or None
    return ChatCompletion.model_validate({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-x",
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": content, "tool_calls": tool_calls,
                                 "refusal": refusal}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}})


def _responses(*output, status="completed", incomplete=None) -> Response:
    return Response.model_validate({
        "id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-x", "output": list(output),
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "status": status,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "usage": {"input_tokens": 4, "output_tokens": 6, "total_tokens": 10,
                  "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}}})


def _function_call(name, arguments):
    return {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": name, "arguments": arguments}


def _message(*parts):
    return {"type": "message", "id": "m1", "role": "assistant", "status": "completed", "content": list(parts)}


def _ollama(*calls, content="", done_reason="stop") -> ollama.ChatResponse:
    return ollama.ChatResponse(model="llama", done=True, done_reason=done_reason, prompt_eval_count=3, eval_count=4,
                               message=ollama.Message(role="assistant", content=content, tool_calls=[
                                   ollama.Message.ToolCall(function=ollama.Message.ToolCall.Function(
                                       name=name, arguments=args)) for name, args in calls] or None))


# (provider, response, tools, reason or None, words the message must contain)
TOOL_CASES = [
    ("anthropic", _anthropic_msg(("weather", {"city": "Oslo", "days": 2})), ANTHROPIC_TOOLS, None, ""),
    ("anthropic", _anthropic_msg(("weather", {"days": 2})), ANTHROPIC_TOOLS, "invalid_tool_arguments", "city"),
    ("anthropic", _anthropic_msg(("weather", {"city": "Oslo", "days": "two"})), ANTHROPIC_TOOLS,
     "invalid_tool_arguments", "$.days"),
    ("anthropic", _anthropic_msg(("weather", {"city": "Oslo", "x": 1})), ANTHROPIC_TOOLS,
     "invalid_tool_arguments", "'x'"),
    ("anthropic", _anthropic_msg(("forecast", {"city": "Oslo"})), ANTHROPIC_TOOLS, "invalid_tool_arguments",
     "not one of the tools"),
    # a tool given without a schema: the name is checked, the arguments are not
    ("anthropic", _anthropic_msg(("web_search", {"anything": 1})), ANTHROPIC_TOOLS, None, ""),
    # the second call is the broken one
    ("anthropic", _anthropic_msg(("weather", {"city": "A"}), ("weather", {})), ANTHROPIC_TOOLS,
     "invalid_tool_arguments", "city"),
    ("anthropic", _anthropic_msg(stop="end_turn", text="no tools needed"), ANTHROPIC_TOOLS, None, ""),
    ("openai", _chat_completion(("weather", json.dumps({"city": "Oslo"}))), OPENAI_TOOLS, None, ""),
    ("openai", _chat_completion(("weather", '{"city": "Oslo"')), OPENAI_TOOLS, "invalid_tool_arguments",
     "not JSON"),
    ("openai", _chat_completion(("weather", "[1, 2]")), OPENAI_TOOLS, "invalid_tool_arguments", "not an object"),
    ("openai", _chat_completion(("weather", json.dumps({"city": 5}))), OPENAI_TOOLS, "invalid_tool_arguments",
     "$.city"),
    ("openai", _chat_completion(("nope", "{}")), OPENAI_TOOLS, "invalid_tool_arguments", "not one of the tools"),
    ("openai", _responses(_function_call("weather", '{"city": "Oslo"}')), RESPONSES_TOOLS, None, ""),
    ("openai", _responses(_function_call("weather", '{"days": 1}')), RESPONSES_TOOLS, "invalid_tool_arguments",
     "city"),
    ("openai", _responses(_function_call("weather", "{")), RESPONSES_TOOLS, "invalid_tool_arguments", "not JSON"),
    ("ollama", _ollama(("weather", {"city": "Oslo"})), OLLAMA_TOOLS, None, ""),
    ("ollama", _ollama(("weather", {"city": ["Oslo"]})), OLLAMA_TOOLS, "invalid_tool_arguments", "$.city"),
    ("ollama", _ollama(("weather", {"city": "Oslo"})), [ollama.Tool.model_validate(OLLAMA_TOOLS[0])], None, ""),
    ("ollama", _ollama(("weather", {})), [ollama.Tool.model_validate(OLLAMA_TOOLS[0])],
     "invalid_tool_arguments", "city"),
    ("ollama", _ollama(("other", {})), OLLAMA_TOOLS, "invalid_tool_arguments", "not one of the tools"),
]


@pytest.mark.parametrize("provider,response,tools,reason,words", TOOL_CASES,
                         ids=[f"{c[0]}-{type(c[1]).__name__}-{i}" for i, c in enumerate(TOOL_CASES)])
def test_check_tool_calls(provider, response, tools, reason, words):
    failure = check_tool_calls(provider, response, tools)
    if reason is None:
        assert failure is None
        return
    assert (failure.provider, failure.reason, failure.retryable, failure.failure_class) == (
        provider, reason, True, "provider")
    assert words in failure.message


def test_check_tool_calls_accepts_an_ollama_python_function_by_name():
    def weather(city: str) -> str:
        """The weather in a city."""
        return city

    assert check_tool_calls("ollama", _ollama(("weather", {"whatever": 1})), [weather]) is None
    assert check_tool_calls("ollama", _ollama(("rain", {})), [weather]).reason == "invalid_tool_arguments"


# --------------------------------------------------------------------------- reply_of

# (provider, response, text, stop_reason, refusal, (input, output) tokens)
REPLY_OF_CASES = [
    ("anthropic", _anthropic_msg(stop="end_turn", text="hi"), "hi", "end", False, (10, 20)),
    ("anthropic", _anthropic_msg(stop="max_tokens", text="hal"), "hal", "max_tokens", False, (10, 20)),
    ("anthropic", _anthropic_msg(stop="stop_sequence", text="x"), "x", "stop_sequence", False, (10, 20)),
    ("anthropic", _anthropic_msg(("weather", {"city": "A"})), "", "tool_use", False, (10, 20)),
    ("anthropic", _anthropic_msg(stop="refusal"), "", "refusal", True, (10, 20)),
    ("anthropic", _anthropic_msg(stop="pause_turn", text="..."), "...", None, False, (10, 20)),
    ("anthropic", _anthropic_msg(stop="model_context_window_exceeded", text="c"), "c", "max_tokens", False,
     (10, 20)),
    ("openai", _chat_completion(content="hello", finish="stop"), "hello", "end", False, (7, 9)),
    ("openai", _chat_completion(content="hel", finish="length"), "hel", "max_tokens", False, (7, 9)),
    ("openai", _chat_completion(("weather", "{}")), "", "tool_use", False, (7, 9)),
    ("openai", _chat_completion(content=None, finish="content_filter"), "", "refusal", True, (7, 9)),
    ("openai", _chat_completion(content=None, finish="stop", refusal="I can't help"), "", "refusal", True, (7, 9)),
    ("openai", _responses(_message({"type": "output_text", "text": "hi", "annotations": []})), "hi", "end",
     False, (4, 6)),
    ("openai", _responses(_message({"type": "output_text", "text": "h", "annotations": []}), status="incomplete",
                          incomplete="max_output_tokens"), "h", "max_tokens", False, (4, 6)),
    ("openai", _responses(_message({"type": "refusal", "refusal": "no"})), "", "refusal", True, (4, 6)),
    ("openai", _responses(_function_call("weather", "{}")), "", "tool_use", False, (4, 6)),
    ("ollama", _ollama(content="hey"), "hey", "end", False, (3, 4)),
    ("ollama", _ollama(content="he", done_reason="length"), "he", "max_tokens", False, (3, 4)),
    ("ollama", _ollama(("weather", {"city": "A"})), "", "tool_use", False, (3, 4)),
    ("ollama", ollama.GenerateResponse(model="llama", response="gen", done=True, done_reason="stop"), "gen", "end",
     False, (0, 0)),
]


@pytest.mark.parametrize("provider,response,text,stop,refusal,tokens", REPLY_OF_CASES,
                         ids=[f"{c[0]}-{type(c[1]).__name__}-{c[3]}" for c in REPLY_OF_CASES])
def test_reply_of(provider, response, text, stop, refusal, tokens):
    reply = reply_of(provider, response)
    assert (reply.provider, reply.text, reply.stop_reason, reply.refusal) == (provider, text, stop, refusal)
    assert (reply.input_tokens, reply.output_tokens) == tokens and not reply.streamed


def test_reply_of_feeds_check_reply():
    reply = reply_of("openai", _chat_completion(content=None, finish="stop", refusal="I can't help"))
    assert check_reply(reply, DEFAULT).reason == "refusal"


# --------------------------------------------------------------------------- repeats


def test_repeat_guard_counts_identical_outputs_after_whitespace():
    guard = RepeatGuard()
    assert [guard.seen(t) for t in ("a plan", "a  plan\n", "another", " a plan ")] == [1, 2, 1, 3]
    assert guard.seen("") == 0 and guard.seen("   ") == 0  # empty has its own check


@pytest.mark.parametrize("limit,outputs,fails_at", [
    (3, ["x", "x", "x"], 2),
    (3, ["x", "y", "x", "y", "x"], 4),
    (2, ["x", "x"], 1),
    (1, ["x"], 0),
    (0, ["x"] * 10, None),  # off
    (3, ["x", "y", "z", "w"], None),
])
def test_repeat_guard_check(limit, outputs, fails_at):
    guard = RepeatGuard()
    results = [guard.check(t, limit, provider="ollama") for t in outputs]
    failed = [i for i, r in enumerate(results) if r is not None]
    assert (failed[0] if failed else None) == fails_at
    if failed:
        assert (results[fails_at].reason, results[fails_at].provider, results[fails_at].retryable) == (
            "repeated_output", "ollama", True)


def test_each_service_gets_its_roles_checks_and_a_class_of_the_users_has_the_role_agent():
    from tron.common.config import parse_mesh

    config = parse_mesh({
        "checks": {"programmer": {"refusal": False}, "agent": {"repeat_limit": 0}, "default": {"max_tokens": True}},
        "services": {"programmer-1": {"role": "programmer", "port": 7001},
                     "mine": {"agent": "mine.summarise:Summarise", "port": 7002},
                     "architect": {"role": "architect", "port": 7003}}})
    assert config.output_checks("programmer-1") == OutputChecks(refusal=False)
    assert config.output_checks("mine") == OutputChecks(repeat_limit=0)
    assert config.output_checks("architect") == OutputChecks(max_tokens=True)
