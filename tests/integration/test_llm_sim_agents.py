"""llm_sim under agent loops: the OpenAI Responses API through the real openai SDK,
forced tool choice that still lets an agent finish, JSON mode with the schema only in
the prompt, and two third-party agent frameworks that failed against the sim before:
pydantic-ai (OpenAI-compatible and Anthropic endpoints) and the OpenAI Agents SDK (its
default Responses model)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pydantic
import pytest

from tron.services.llm_sim.answers import REFUSAL_TEXT
from tests.integration.test_llm_sim import Sim, _stray_tasks, running_sim

pytestmark = [pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")]

CLAUDE = "claude-sonnet-4-5"
KEY = "sk-test-agents-0001"
WEATHER_PARAMS = {"type": "object", "required": ["city"], "additionalProperties": False,
                  "properties": {"city": {"type": "string"}}}
WEATHER_FN = {"type": "function", "name": "get_weather", "description": "Get the weather for a city",
              "parameters": WEATHER_PARAMS, "strict": True}


class Forecast(pydantic.BaseModel):
    city: str
    summary: str
    high_c: int = pydantic.Field(ge=-40, le=50)


@pytest.fixture
async def sim(monkeypatch) -> AsyncIterator[Sim]:
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    async with running_sim() as s:
        yield s
    # The SDKs' stream generators are closed by the loop's finaliser tasks: let them run.
    deadline = time.monotonic() + 2
    while _stray_tasks() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert _stray_tasks() == []


@pytest.fixture
async def gpt(sim: Sim) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key=KEY, max_retries=0, timeout=5.0) as client:
        yield client


@pytest.fixture
async def claude(sim: Sim) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key=KEY, max_retries=0, timeout=5.0) as client:
        yield client


# --------------------------------------------------------------------------- responses API


async def test_responses_create_and_stream(gpt):
    ask = dict(model="gpt-4o", instructions="Be brief.", input="plan the release")
    done = await gpt.responses.create(**ask)
    assert done.object == "response" and done.status == "completed" and done.id.startswith("resp_")
    [message] = done.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert done.output_text.startswith("[sim:openai:") and "Plan for: plan the release" in done.output_text
    usage = done.usage
    assert usage.output_tokens == len(done.output_text.split()) and usage.input_tokens == 5
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0

    events = [e async for e in await gpt.responses.create(**ask, stream=True)]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == done.output_text
    assert events[-1].response.usage.output_tokens == usage.output_tokens

    async with gpt.responses.stream(**ask) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.output_text == done.output_text


async def test_responses_tools_round_trip(gpt):
    first = await gpt.responses.create(model="gpt-4o", input="What is the weather in Paris?", tools=[WEATHER_FN])
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert set(json.loads(call.arguments)) == {"city"}

    async with gpt.responses.stream(model="gpt-4o", input="What is the weather in Paris?",
                                    tools=[WEATHER_FN]) as stream:
        kinds = [e.type async for e in stream]
        streamed = await stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert streamed.output[0].arguments == call.arguments

    items = [{"role": "user", "content": "What is the weather in Paris?"},
             {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}]
    final = await gpt.responses.create(model="gpt-4o", input=items, tools=[WEATHER_FN], tool_choice="required")
    assert final.output[0].type == "message" and "get_weather said sunny, 21C" in final.output_text

    # previous_response_id: the server holds the conversation, the client sends only what is new.
    chained = await gpt.responses.create(model="gpt-4o", previous_response_id=first.id, tools=[WEATHER_FN],
                                         input=[items[2]])
    assert "get_weather said sunny, 21C" in chained.output_text


async def test_responses_structured_output(gpt):
    parsed = await gpt.responses.parse(model="gpt-4o", input="forecast for Oslo", text_format=Forecast)
    assert isinstance(parsed.output_parsed, Forecast)
    async with gpt.responses.stream(model="gpt-4o", input="forecast for Oslo", text_format=Forecast) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.output_parsed == parsed.output_parsed


async def test_responses_limits_and_faults(sim: Sim, gpt):
    short = await gpt.responses.create(model="gpt-4o", input="plan the release", max_output_tokens=16)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 16 == len(short.output_text.split())
    await sim.put_fault("openai", kind="max-tokens", times=1)
    cut = await gpt.responses.create(model="gpt-4o", input="plan the release")
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    await sim.put_fault("openai", kind="refusal", times=1)
    refused = await gpt.responses.create(model="gpt-4o", input="plan the release")
    assert refused.output[0].content[0].type == "refusal" and refused.output[0].content[0].refusal == REFUSAL_TEXT
    await sim.put_fault("openai", kind="rate-limit", times=1, retry_after_ms=300)
    with pytest.raises(openai.RateLimitError) as info:
        await gpt.responses.create(model="gpt-4o", input="plan the release")
    assert info.value.response.headers["x-ratelimit-reset-requests"] == "300ms"
    await sim.put_fault("openai", kind="midstream", times=1)
    events = [e async for e in await gpt.responses.create(model="gpt-4o", input="plan the release", stream=True)]
    assert events[-1].type == "error" and "response.completed" not in [e.type for e in events]
    with pytest.raises(openai.BadRequestError) as bad:
        await gpt.responses.create(model="gpt-4o", input="answer", text={"format": {"type": "json_object"}})
    assert "json" in bad.value.message


# --------------------------------------------------------------------------- forced tool choice


async def test_anthropic_forced_tool_choice_finishes(claude):
    """tool_choice any (and tool): after the tool result the model moves on to a tool not
    called yet, and answers once every tool has been called."""
    tools = [{"name": "get_weather", "description": "Weather for a city", "input_schema": WEATHER_PARAMS},
             {"name": "get_time", "description": "Local time in a city", "input_schema": WEATHER_PARAMS}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "weather in Paris"}]
    called = []
    for _ in range(4):
        msg = await claude.messages.create(model=CLAUDE, max_tokens=256, tools=tools, tool_choice={"type": "any"},
                                           messages=messages)
        if msg.stop_reason != "tool_use":
            break
        [use] = [b for b in msg.content if b.type == "tool_use"]
        called.append(use.name)
        messages += [{"role": "assistant", "content": msg.content},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "ok"}]}]
    assert called == ["get_weather", "get_time"] and msg.stop_reason == "end_turn"
    named = await claude.messages.create(model=CLAUDE, max_tokens=256, tools=tools, messages=messages[:3],
                                         tool_choice={"type": "tool", "name": "get_weather"})
    assert named.stop_reason == "end_turn"  # its tool already answered


async def test_openai_required_tool_choice_finishes(gpt):
    fn = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": WEATHER_PARAMS}}
    messages: list[dict[str, Any]] = [{"role": "user", "content": "weather in Paris"}]
    first = await gpt.chat.completions.create(model="gpt-4o", messages=messages, tools=[fn], tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    final = await gpt.chat.completions.create(model="gpt-4o", messages=messages, tools=[fn], tool_choice="required")
    assert final.choices[0].finish_reason == "stop" and "get_weather said sunny" in final.choices[0].message.content


# --------------------------------------------------------------------------- JSON mode, schema in the prompt

PROMPT_SCHEMA = {"type": "object", "required": ["verdict", "score"],
                 "properties": {"verdict": {"enum": ["ship", "hold"]},
                                "score": {"type": "integer", "minimum": 1, "maximum": 5}}}


async def test_json_mode_follows_the_schema_in_the_prompt(sim: Sim, gpt):
    import jsonschema  # a runtime dependency: missing is a failure, never a skip
    fenced = f"Review the release. Answer in JSON matching:\n```json\n{json.dumps(PROMPT_SCHEMA, indent=2)}\n```"
    done = await gpt.chat.completions.create(model="gpt-4o", response_format={"type": "json_object"},
                                             messages=[{"role": "user", "content": fenced}])
    jsonschema.validate(json.loads(done.choices[0].message.content), PROMPT_SCHEMA)
    inline = f"Reply with JSON only, following this schema: {json.dumps(PROMPT_SCHEMA)}"
    import ollama

    async with ollama.AsyncClient(host=sim.url, timeout=5) as client:
        reply = await client.chat(model="llama3.1", format="json", stream=False,
                                  messages=[{"role": "system", "content": inline},
                                            {"role": "user", "content": "review the release"}])
    jsonschema.validate(json.loads(reply.message.content), PROMPT_SCHEMA)
    loose = await gpt.chat.completions.create(model="gpt-4o", response_format={"type": "json_object"},
                                              messages=[{"role": "user", "content": "answer in JSON"}])
    assert isinstance(json.loads(loose.choices[0].message.content), dict)


# --------------------------------------------------------------------------- pydantic-ai


@pytest.fixture(scope="module")
def pydantic_ai():
    import pydantic_ai  # a dev dependency (pyproject), imported here because it is slow

    return pydantic_ai


@pytest.mark.parametrize("endpoint", ["openai-chat", "anthropic"])
async def test_pydantic_ai_agent_with_tool_and_output_type(gpt, claude, pydantic_ai, endpoint: str):
    if endpoint == "anthropic":
        from pydantic_ai.models.anthropic import AnthropicModel
        from pydantic_ai.providers.anthropic import AnthropicProvider

        model = AnthropicModel(CLAUDE, provider=AnthropicProvider(anthropic_client=claude))
    else:
        from pydantic_ai.models.openai import OpenAIChatModel
        from pydantic_ai.providers.openai import OpenAIProvider

        model = OpenAIChatModel("gpt-4o", provider=OpenAIProvider(openai_client=gpt))
    agent = pydantic_ai.Agent(model, output_type=Forecast, instructions="You forecast the weather.")
    cities: list[str] = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Get the weather for a city."""
        cities.append(city)
        return f"sunny in {city}"

    result = await agent.run("What is the weather in Paris?")
    assert isinstance(result.output, Forecast) and len(cities) == 1
    usage = result.usage() if callable(result.usage) else result.usage
    assert usage.requests == 2 and usage.output_tokens > 0


# --------------------------------------------------------------------------- OpenAI Agents SDK


@pytest.fixture
def agents_sdk(gpt):
    import agents as sdk  # a dev dependency (pyproject), imported here because it is slow

    sdk.set_tracing_disabled(True)
    sdk.set_default_openai_client(gpt, use_for_tracing=False)
    yield sdk
    sdk.set_default_openai_client(openai.AsyncOpenAI(api_key="unset", base_url="http://127.0.0.1:9/v1"),
                                  use_for_tracing=False)


async def test_openai_agents_runner_with_function_tool(sim: Sim, agents_sdk):
    cities: list[str] = []

    @agents_sdk.function_tool
    def get_weather(city: str) -> str:
        """Get the weather for a city."""
        cities.append(city)
        return f"sunny in {city}"

    agent = agents_sdk.Agent(name="forecaster", instructions="You forecast the weather.", tools=[get_weather],
                             model="gpt-4o")
    result = await agents_sdk.Runner.run(agent, "What is the weather in Paris?")
    assert len(cities) == 1 and f"get_weather said sunny in {cities[0]}" in result.final_output

    typed = agents_sdk.Agent(name="forecaster", instructions="You forecast the weather.", tools=[get_weather],
                             model="gpt-4o", output_type=Forecast)
    streamed = agents_sdk.Runner.run_streamed(typed, "What is the weather in Paris?")
    async for _ in streamed.stream_events():
        pass
    assert isinstance(streamed.final_output, Forecast) and len(cities) == 2
    got = (await sim.state("openai"))["counters"]
    assert got["requests"] == got["served"] == 4
