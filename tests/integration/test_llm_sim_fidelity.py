"""llm_sim beyond plain chat, driven by the real clients on a real loopback port: the
anthropic SDK (tools, structured outputs, stop sequences, max_tokens, count_tokens,
models, 429 retry-after), the ollama client (tools, format, num_predict, show, ps,
embeddings, unknown models), the openai SDK (chat, streaming, tools, response_format,
models, embeddings, faults) and LiteLLM as a third-party client on top of all three."""

from __future__ import annotations

import asyncio

import json
import math
import os
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import anthropic
import ollama
import pydantic
import pytest
from aiohttp import web

from tron.services.llm_sim.app import make_app
from tron.services.llm_sim.schema_fake import fake_instance
from tests.integration.test_llm_sim import Sim, _stray_tasks, eventually, running_sim

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning"),
    # LiteLLM's own TypedDicts, seen by pydantic when LiteLLM builds its schemas.
    pytest.mark.filterwarnings("ignore:Items? .* using the `ReadOnly` qualifier:UserWarning"),
]

CLAUDE = "claude-sonnet-4-5"
KEY = "sk-test-fidelity-0001"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the weather for a specific location",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}},
}
# A schema with the features tool inputs use: nesting, enums, bounds, arrays, refs.
BOOKING_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 3, "maxLength": 12},
        "nights": {"type": "integer", "minimum": 1, "maximum": 14},
        "budget": {"type": "number", "exclusiveMinimum": 0, "maximum": 500},
        "tier": {"enum": ["basic", "plus", "suite"]},
        "guests": {"type": "array", "minItems": 1, "maxItems": 3,
                   "items": {"$ref": "#/$defs/guest"}},
        "contact": {"type": "object", "required": ["email"],
                    "properties": {"email": {"type": "string", "format": "email"},
                                   "phone": {"type": ["string", "null"]}}},
        "flexible": {"type": "boolean"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string"}]},
    },
    "required": ["city", "nights", "tier", "guests", "contact"],
    "$defs": {"guest": {"type": "object", "required": ["name", "age"],
                        "properties": {"name": {"type": "string"},
                                       "age": {"type": "integer", "minimum": 0, "maximum": 120}}}},
}
BOOK_TOOL = {"name": "book_hotel", "description": "Reserve a hotel room", "input_schema": BOOKING_SCHEMA}


class Guest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str
    age: int = pydantic.Field(ge=0, le=120)


class Booking(pydantic.BaseModel):
    """BOOKING_SCHEMA as a pydantic model: what a client validates tool input with."""

    city: str = pydantic.Field(min_length=3, max_length=12)
    nights: int = pydantic.Field(ge=1, le=14)
    budget: float = pydantic.Field(gt=0, le=500)
    tier: Literal["basic", "plus", "suite"]
    guests: list[Guest] = pydantic.Field(min_length=1, max_length=3)
    contact: dict[str, Any]
    flexible: bool
    note: str | None


class Order(pydantic.BaseModel):  # the Anthropic SDK's examples/structured_outputs.py
    product_name: str
    price: float
    quantity: int


class BoundedOrder(Order):
    quantity: int = pydantic.Field(ge=2, le=5)  # sent to the API as a description hint


@pytest.fixture
async def sim(monkeypatch) -> AsyncIterator[Sim]:
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "OLLAMA_HOST",
                "OPENAI_API_KEY", "OPENAI_BASE_URL", "TRON_SIM_OLLAMA_MODELS"):
        monkeypatch.delenv(var, raising=False)
    async with running_sim() as s:
        yield s
    # LiteLLM closes its streams from tasks of its own: give them a moment, then none may be left.
    for _ in range(100):
        if not _stray_tasks():
            break
        await asyncio.sleep(0.02)
    assert _stray_tasks() == []


def claude(sim: Sim, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=sim.url, api_key=KEY, max_retries=kw.pop("max_retries", 0),
                                    timeout=kw.pop("timeout", 5.0), **kw)


@pytest.fixture
async def client(sim: Sim) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with claude(sim) as anthropic_client:
        yield anthropic_client


def local(sim: Sim) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=sim.url, timeout=5)


@pytest.fixture(scope="module")
def openai_sdk():
    import openai  # a runtime dependency

    return openai


@pytest.fixture
async def gpt(sim: Sim, openai_sdk) -> AsyncIterator[Any]:
    async with openai_sdk.AsyncOpenAI(base_url=sim.url + "/v1", api_key=KEY, max_retries=0, timeout=5.0) as client:
        yield client


@pytest.fixture(scope="module")
def litellm_module():
    # Without this LiteLLM fetches its model price list from the internet at import.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm as module  # a dev dependency (pyproject), imported here because it is slow

    module.telemetry = False
    module.suppress_debug_info = True
    return module


@pytest.fixture
async def litellm(sim: Sim, litellm_module) -> AsyncIterator[Any]:
    """LiteLLM, with its background logging task and cached clients closed afterwards
    (before `sim` checks that the test left no task behind)."""
    yield litellm_module
    from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

    await GLOBAL_LOGGING_WORKER.stop()
    await litellm_module.close_litellm_async_clients()


def unit_length(vector: list[float]) -> bool:
    return math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-6)


# --------------------------------------------------------------------------- schema faker


@pytest.mark.parametrize("seed", ["a", "b", "c", "d"])
def test_fake_instances_satisfy_their_schema(seed: str):
    import jsonschema  # a runtime dependency: missing is a failure, never a skip
    value = fake_instance(BOOKING_SCHEMA, seed)
    jsonschema.validate(value, BOOKING_SCHEMA)
    Booking.model_validate(value)
    assert fake_instance(BOOKING_SCHEMA, seed) == value  # deterministic


def test_fake_instance_follows_recursive_refs_and_hints():
    tree = {"$ref": "#/$defs/node", "$defs": {"node": {
        "type": "object", "required": ["kids"],
        "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}}
    depth, node = 0, fake_instance(tree, "x")
    while node["kids"]:
        node, depth = node["kids"][0], depth + 1
    assert 0 < depth <= 8
    hinted = {"type": "integer", "description": "How many\n\n{minimum: 40, maximum: 42}"}
    assert all(40 <= fake_instance(hinted, s) <= 42 for s in "abcdef")


# --------------------------------------------------------------------------- anthropic


async def test_anthropic_sdk_tools_example(client):
    """examples/tools.py of anthropic-sdk-python, pointed at the sim."""
    user_message = {"role": "user", "content": "What is the weather in SF?"}
    tools = [WEATHER_TOOL]
    message = await client.messages.create(model=CLAUDE, max_tokens=1024, messages=[user_message], tools=tools)
    assert message.stop_reason == "tool_use"
    tool = next(c for c in message.content if c.type == "tool_use")
    assert tool.name == "get_weather" and isinstance(tool.input["location"], str)
    response = await client.messages.create(
        model=CLAUDE,
        max_tokens=1024,
        messages=[
            user_message,
            {"role": message.role, "content": message.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id,
                                          "content": [{"type": "text", "text": "The weather is 73f"}]}]},
        ],
        tools=tools,
    )
    assert response.stop_reason == "end_turn" and response.content[0].type == "text"
    assert "get_weather said The weather is 73f" in response.content[0].text


async def test_anthropic_sdk_tool_runner_example(client):
    """examples/tools_runner.py of anthropic-sdk-python: the SDK runs the tool and, by
    default, sends later turns on a server-held thread (only the new messages)."""
    ran: list[tuple[str, str]] = []

    @anthropic.beta_async_tool
    async def get_weather(location: str, units: Literal["c", "f"]) -> str:
        """Lookup the weather for a given city in either celsius or fahrenheit

        Args:
            location: The city and state, e.g. San Francisco, CA
            units: Unit for the output, either 'c' for celsius or 'f' for fahrenheit
        """
        ran.append((location, units))
        return json.dumps({"location": location, "temperature": "20°C" if units == "c" else "68°F"})

    runner = client.beta.messages.tool_runner(max_tokens=1024, model=CLAUDE, tools=[get_weather],
                                              messages=[{"role": "user", "content": "What is the weather in SF?"}])
    replies = [message async for message in runner]
    assert [m.stop_reason for m in replies] == ["tool_use", "end_turn"]
    [(location, units)] = ran
    assert units in ("c", "f") and f"get_weather said {{\"location\": \"{location}\"" in replies[-1].content[0].text


@pytest.mark.parametrize(
    "tool_choice,prompt,expected",
    [
        ({"type": "tool", "name": "book_hotel"}, "say hello", "book_hotel"),
        ({"type": "any"}, "say hello", "get_weather"),  # nothing relevant: the first tool
        ({"type": "any"}, "reserve a hotel in Rome", "book_hotel"),
        ({"type": "auto"}, "reserve a hotel in Rome", "book_hotel"),
        ({"type": "auto"}, "say hello", None),  # nothing relevant: text
        ({"type": "none"}, "what is the weather in Rome", None),
    ],
)
async def test_anthropic_tool_choice(client, tool_choice: dict, prompt: str, expected: str | None):
    msg = await client.messages.create(model=CLAUDE, max_tokens=512, tools=[WEATHER_TOOL, BOOK_TOOL],
                                       tool_choice=tool_choice, messages=[{"role": "user", "content": prompt}])
    calls = [b for b in msg.content if b.type == "tool_use"]
    if expected is None:
        assert msg.stop_reason == "end_turn" and not calls and msg.content[0].text.startswith("[sim:anthropic:")
    else:
        assert msg.stop_reason == "tool_use" and [c.name for c in calls] == [expected]
        assert msg.usage.output_tokens == len(json.dumps(calls[0].input).split())
        if expected == "book_hotel":
            Booking.model_validate(calls[0].input)
    again = await client.messages.create(model=CLAUDE, max_tokens=512, tools=[WEATHER_TOOL, BOOK_TOOL],
                                         tool_choice=tool_choice, messages=[{"role": "user", "content": prompt}])
    assert again.content == msg.content  # deterministic, ids included


async def test_anthropic_tool_choice_errors(client):
    with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
        await client.messages.create(model=CLAUDE, max_tokens=64, tools=[WEATHER_TOOL],
                                     tool_choice={"type": "tool", "name": "nope"},
                                     messages=[{"role": "user", "content": "x"}])


async def test_anthropic_streams_tool_use_as_input_json_deltas(client):
    kwargs = dict(model=CLAUDE, max_tokens=512, tools=[BOOK_TOOL], tool_choice={"type": "tool", "name": "book_hotel"},
                  messages=[{"role": "user", "content": "book it"}])
    plain = await client.messages.create(**kwargs)
    kinds = []
    async with client.messages.stream(**kwargs) as stream:
        async for event in stream:
            if event.type == "content_block_delta":
                kinds.append(event.delta.type)
        final = await stream.get_final_message()
    assert len(kinds) > 2 and set(kinds) == {"input_json_delta"}
    assert final.stop_reason == "tool_use" and final.content == plain.content
    assert final.usage.output_tokens == plain.usage.output_tokens


async def test_anthropic_sdk_structured_outputs_example(client):
    """examples/structured_outputs.py of anthropic-sdk-python, pointed at the sim."""
    prompt = """
Extract the product name, price, and quantity from this customer message:
"Hi, I'd like to order 2 packs of Green Tea for 5.50 dollars each."
"""
    parsed_message = await client.messages.parse(
        model=CLAUDE, messages=[{"role": "user", "content": prompt}], max_tokens=1024, output_format=Order)
    assert isinstance(parsed_message.parsed_output, Order)
    # Constraints the API does not take travel as description hints; they are honoured.
    bounded = await client.messages.parse(
        model=CLAUDE, messages=[{"role": "user", "content": prompt}], max_tokens=1024, output_format=BoundedOrder)
    assert 2 <= bounded.parsed_output.quantity <= 5
    async with client.messages.stream(model=CLAUDE, messages=[{"role": "user", "content": prompt}],
                                      max_tokens=1024, output_format=Order) as stream:
        streamed = await stream.get_final_message()
    assert streamed.parsed_output == parsed_message.parsed_output


async def test_anthropic_stop_sequences_and_max_tokens(client):
    ask = dict(model=CLAUDE, messages=[{"role": "user", "content": "plan the release"}])
    full = await client.messages.create(max_tokens=1024, **ask)
    assert full.stop_reason == "end_turn" and "\n2. " in full.content[0].text

    stopped = await client.messages.create(max_tokens=1024, stop_sequences=["2."], **ask)
    text = stopped.content[0].text
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "2.")
    assert "2." not in text and full.content[0].text.startswith(text)
    assert stopped.usage.output_tokens == len(text.split())

    short = await client.messages.create(max_tokens=3, **ask)
    assert short.stop_reason == "max_tokens" and short.stop_sequence is None
    assert short.usage.output_tokens == 3 == len(short.content[0].text.split())
    async with client.messages.stream(max_tokens=3, **ask) as stream:
        streamed = await stream.get_final_message()
    assert streamed.stop_reason == "max_tokens" and streamed.content[0].text == short.content[0].text
    assert streamed.usage.output_tokens == 3


async def test_anthropic_count_tokens_matches_usage(client):
    ask = dict(model=CLAUDE, system="Be brief.", tools=[WEATHER_TOOL],
               messages=[{"role": "user", "content": "What is the weather in SF?"}])
    counted = await client.messages.count_tokens(**ask)
    used = await client.messages.create(max_tokens=256, **ask)
    plain = await client.messages.count_tokens(model=CLAUDE, system="Be brief.",
                                               messages=[{"role": "user", "content": "What is the weather in SF?"}])
    assert counted.input_tokens == used.usage.input_tokens > plain.input_tokens == 8


async def test_anthropic_models_and_unknown_model(client):
    ids = [m.id async for m in client.models.list()]
    assert CLAUDE in ids and all(i.startswith("claude-") for i in ids)
    paged = [m.id async for m in client.models.list(limit=1)]  # follows after_id cursors
    assert paged == ids
    page = await client.models.list(limit=1)
    assert page.has_more is True and page.first_id == page.last_id == ids[0]
    info = await client.models.retrieve(CLAUDE)
    assert (info.id, info.type, info.display_name) == (CLAUDE, "model", "Claude Sonnet 4.5")
    await client.models.retrieve("claude-my-finetune-1")  # every claude-* name is served
    with pytest.raises(anthropic.NotFoundError) as info_404:
        await client.messages.create(model="gpt-4o", max_tokens=16, messages=[{"role": "user", "content": "x"}])
    assert info_404.value.body["error"] == {"type": "not_found_error", "message": "model: gpt-4o"}
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("llama3.1")


async def test_anthropic_rate_limit_carries_retry_after(sim: Sim, client):
    await sim.put_fault("anthropic", kind="rate-limit", times=1, retry_after_ms=50)
    ask = dict(model=CLAUDE, max_tokens=64, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(**ask)
    headers = info.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "50")

    await sim.put_fault("anthropic", kind="rate-limit", times=1, retry_after_ms=50)
    started = time.monotonic()
    async with claude(sim, max_retries=1) as retrying:
        reply = await retrying.messages.create(**ask)  # the SDK waits retry-after-ms, then retries
    assert time.monotonic() - started >= 0.05 and reply.stop_reason == "end_turn"
    counters = (await sim.state("anthropic"))["counters"]
    assert counters["faults_injected"] == 2 and counters["served"] == 1


# --------------------------------------------------------------------------- ollama


def get_current_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather for a city.

    Args:
      city: The name of the city
      unit: celsius or fahrenheit
    """
    return f"22 {unit} in {city}"


async def test_ollama_tools(sim: Sim):
    async with local(sim) as client:
        messages = [{"role": "user", "content": "What is the weather in Toronto?"}]
        first = await client.chat(model="llama3.1", messages=messages, tools=[get_current_weather], stream=False)
        [call] = first.message.tool_calls
        assert call.function.name == "get_current_weather" and first.done_reason == "stop"
        assert isinstance(call.function.arguments["city"], str)
        streamed = [p async for p in await client.chat(model="llama3.1", messages=messages,
                                                       tools=[get_current_weather], stream=True)]
        assert [c for p in streamed for c in p.message.tool_calls or ()] == [call]
        messages += [first.message, {"role": "tool", "content": get_current_weather(**call.function.arguments),
                                     "tool_name": call.function.name}]
        final = await client.chat(model="llama3.1", messages=messages, tools=[get_current_weather], stream=False)
        assert not final.message.tool_calls
        assert f"get_current_weather said {get_current_weather(**call.function.arguments)}" in final.message.content


class Pet(pydantic.BaseModel):
    name: str
    species: Literal["cat", "dog"]
    age: int = pydantic.Field(ge=0, le=30)


async def test_ollama_format_json_and_schema(sim: Sim):
    async with local(sim) as client:
        messages = [{"role": "user", "content": "describe a pet"}]
        loose = await client.chat(model="llama3.1", messages=messages, format="json", stream=False)
        assert isinstance(json.loads(loose.message.content), dict)
        strict = await client.chat(model="llama3.1", messages=messages, format=Pet.model_json_schema(), stream=False)
        pet = Pet.model_validate_json(strict.message.content)
        parts = [p async for p in await client.chat(model="llama3.1", messages=messages,
                                                    format=Pet.model_json_schema(), stream=True)]
        assert Pet.model_validate_json("".join(p.message.content for p in parts)) == pet
        gen = await client.generate(model="llama3.1", prompt="a pet", format=Pet.model_json_schema(), stream=False)
        Pet.model_validate_json(gen.response)


async def test_ollama_num_predict_and_stop(sim: Sim):
    async with local(sim) as client:
        messages = [{"role": "user", "content": "plan the release"}]
        full = await client.chat(model="llama3.1", messages=messages, stream=False)
        short = await client.chat(model="llama3.1", messages=messages, options={"num_predict": 3}, stream=False)
        assert short.done_reason == "length" and short.eval_count == 3 == len(short.message.content.split())
        assert full.message.content.startswith(short.message.content)
        parts = [p async for p in await client.chat(model="llama3.1", messages=messages,
                                                    options={"num_predict": 3}, stream=True)]
        assert "".join(p.message.content for p in parts) == short.message.content
        assert parts[-1].done_reason == "length" and parts[-1].eval_count == 3
        stopped = await client.generate(model="llama3.1", prompt="plan the release", options={"stop": ["2."]},
                                        stream=False)
        assert stopped.done_reason == "stop" and "2." not in stopped.response and "1." in stopped.response


async def test_ollama_show_ps_embed(sim: Sim):
    async with local(sim) as client:
        shown = await client.show("llama3.1")
        assert "completion" in shown.capabilities and shown.details.family == "llama"
        assert shown.modelinfo["llama.embedding_length"] == 4096
        assert (await client.ps()).models == []
        await client.chat(model="llama3.1", messages=[{"role": "user", "content": "hi"}], stream=False)
        await client.embed(model="nomic-embed-text", input="warm up")
        loaded = (await client.ps()).models  # longest-lived first: the last one used
        assert [m.model for m in loaded] == ["nomic-embed-text:latest", "llama3.1:latest"]
        assert loaded[0].expires_at > loaded[1].expires_at and loaded[1].size_vram > 0
        unload = await client.chat(model="llama3.1", messages=[], keep_alive=0)
        assert unload.done_reason == "unload"
        assert [m.model for m in (await client.ps()).models] == ["nomic-embed-text:latest"]

        both = await client.embed(model="nomic-embed-text", input=["alpha", "beta"])
        a, b = both.embeddings
        assert len(a) == 768 and unit_length(a) and unit_length(b) and a != b
        assert (await client.embed(model="nomic-embed-text", input="alpha")).embeddings[0] == a
        short = (await client.embed(model="nomic-embed-text", input="alpha", dimensions=64)).embeddings[0]
        assert len(short) == 64 and unit_length(short)
        assert all(math.isclose(s / short[0], x / a[0], rel_tol=1e-6) for s, x in zip(short, a[:64], strict=True))
        legacy = await client.embeddings(model="nomic-embed-text", prompt="alpha")
        assert list(legacy.embedding) == a


async def test_ollama_unknown_and_unfit_models(sim: Sim):
    async with local(sim) as client:
        for call, message in [
            (client.chat(model="mistral:7b", messages=[{"role": "user", "content": "x"}], stream=False),
             "model 'mistral:7b' not found"),
            (client.generate(model="mistral:7b", prompt="x", stream=False), "model 'mistral:7b' not found"),
            (client.show("mistral:7b"), "model 'mistral:7b' not found"),
            (client.embed(model="mistral:7b", input="x"), 'model "mistral:7b" not found, try pulling it first'),
        ]:
            with pytest.raises(ollama.ResponseError) as info:
                await call
            assert (info.value.status_code, info.value.error) == (404, message)
        with pytest.raises(ollama.ResponseError) as info:
            await client.chat(model="nomic-embed-text", messages=[{"role": "user", "content": "x"}], stream=False)
        assert info.value.status_code == 400 and "does not support chat" in info.value.error
    assert (await sim.state("ollama"))["counters"]["served"] == 0


async def test_extra_models_from_make_app_and_env(monkeypatch):
    monkeypatch.setenv("TRON_SIM_OLLAMA_MODELS", "phi3:mini, mxbai-embed-large")
    runner = web.AppRunner(make_app(models={"ollama": ["mistral:7b"], "openai": ["my-vllm-model"]}))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with ollama.AsyncClient(host=f"http://{host}:{port}", timeout=5) as client:
            names = [m.model for m in (await client.list()).models]
            assert {"mistral:7b", "phi3:mini", "mxbai-embed-large:latest"} <= set(names)
            reply = await client.chat(model="mistral:7b", messages=[{"role": "user", "content": "x"}], stream=False)
            assert reply.message.content.startswith("[sim:ollama:")
            assert "embedding" in (await client.show("mxbai-embed-large")).capabilities
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- openai


async def test_openai_chat_and_stream(gpt):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "write a hello world in C"}]
    done = await gpt.chat.completions.create(model="gpt-4o-mini", messages=messages)
    choice = done.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content.startswith("[sim:openai:")
    assert done.usage.prompt_tokens == 8 and done.usage.completion_tokens == len(choice.message.content.split())
    stream = await gpt.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True,
                                               stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage
    local_model = await gpt.chat.completions.create(model="llama3.1", messages=messages)  # like Ollama's /v1
    assert local_model.model == "llama3.1"


async def test_openai_tools(gpt):
    tools = [{"type": "function", "function": {"name": "book_hotel", "description": "Reserve a hotel room",
                                               "parameters": BOOKING_SCHEMA}},
             {"type": "function", "function": {"name": "get_weather", "description": "Weather for a place",
                                               "parameters": WEATHER_TOOL["input_schema"]}}]
    messages = [{"role": "user", "content": "Reserve a hotel in Rome"}]
    first = await gpt.chat.completions.create(model="gpt-4o", messages=messages, tools=tools)
    choice = first.choices[0]
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert call.function.name == "book_hotel" and call.id.startswith("call_")
    Booking.model_validate_json(call.function.arguments)

    stream = await gpt.chat.completions.create(model="gpt-4o", messages=messages, tools=tools, stream=True)
    args, names = "", []
    async for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or ():
            names += [delta.function.name] if delta.function.name else []
            args += delta.function.arguments or ""
    assert names == ["book_hotel"] and args == call.function.arguments

    forced = await gpt.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                               tools=tools,
                                               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert forced.choices[0].finish_reason == "stop"  # OpenAI's own quirk for a named tool_choice
    required = await gpt.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                 tools=tools, tool_choice="required")
    assert required.choices[0].finish_reason == "tool_calls"

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "booked, ref 42"}]
    final = await gpt.chat.completions.create(model="gpt-4o", messages=messages, tools=tools)
    assert final.choices[0].finish_reason == "stop"
    assert "book_hotel said booked, ref 42" in final.choices[0].message.content


async def test_openai_response_format(gpt, openai_sdk):
    parsed = await gpt.chat.completions.parse(model="gpt-4o", response_format=Pet,
                                              messages=[{"role": "user", "content": "describe a pet"}])
    assert isinstance(parsed.choices[0].message.parsed, Pet)
    loose = await gpt.chat.completions.create(model="gpt-4o", response_format={"type": "json_object"},
                                              messages=[{"role": "user", "content": "answer in JSON"}])
    assert isinstance(json.loads(loose.choices[0].message.content), dict)
    with pytest.raises(openai_sdk.BadRequestError) as info:
        await gpt.chat.completions.create(model="gpt-4o", response_format={"type": "json_object"},
                                          messages=[{"role": "user", "content": "answer"}])
    assert info.value.param == "messages" and "json" in info.value.message


async def test_openai_max_tokens_and_stop(gpt):
    messages = [{"role": "user", "content": "plan the release"}]
    short = await gpt.chat.completions.create(model="gpt-4o", messages=messages, max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert len(short.choices[0].message.content.split()) == 3
    legacy = await gpt.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=3)
    assert legacy.choices[0].message.content == short.choices[0].message.content
    stopped = await gpt.chat.completions.create(model="gpt-4o", messages=messages, stop=["2."])
    assert stopped.choices[0].finish_reason == "stop" and "2." not in stopped.choices[0].message.content


async def test_openai_models_and_embeddings(sim: Sim, gpt):
    ids = [m.id async for m in gpt.models.list()]
    assert {"gpt-4o-mini", "text-embedding-3-small", "llama3.1:latest"} <= set(ids)
    assert (await gpt.models.retrieve("gpt-4o")).owned_by == "openai"
    # The same path answers the Anthropic SDK in its own shape.
    status, body = await sim.request("GET", "/v1/models", headers={"anthropic-version": "2023-06-01",
                                                                   "x-api-key": KEY})
    assert status == 200 and {"data", "has_more", "first_id", "last_id"} == set(body)
    status, body = await sim.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and body["object"] == "list"

    packed = await gpt.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])  # base64
    plain = await gpt.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"],
                                        encoding_format="float")
    a, b = (d.embedding for d in plain.data)
    assert len(a) == 1536 and unit_length(a) and a != b and plain.usage.prompt_tokens == 2
    assert all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7) for x, y in zip(packed.data[0].embedding, a, strict=True))
    small = await gpt.embeddings.create(model="text-embedding-3-small", input="alpha", dimensions=256,
                                        encoding_format="float")
    assert len(small.data[0].embedding) == 256 and unit_length(small.data[0].embedding)


# (kind, stream, exception class name, status)
OPENAI_FAULTS = [
    ("overloaded", False, "InternalServerError", 503),
    ("rate-limit", False, "RateLimitError", 429),
    ("error", False, "InternalServerError", 500),
    ("auth", False, "AuthenticationError", 401),
    ("midstream", False, "InternalServerError", 500),
    ("midstream", True, "APIError", None),
    ("hang", False, "APITimeoutError", None),
]


@pytest.mark.parametrize("kind,stream,exc_name,status", OPENAI_FAULTS,
                         ids=[f"{c[0]}-{'stream' if c[1] else 'plain'}" for c in OPENAI_FAULTS])
async def test_openai_faults(sim: Sim, openai_sdk, kind: str, stream: bool, exc_name: str, status: int | None):
    assert (await sim.put_fault("openai", kind=kind, times=1, retry_after_ms=200))[0] == 200
    ask = dict(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=stream)
    async with openai_sdk.AsyncOpenAI(base_url=sim.url + "/v1", api_key=KEY, max_retries=0,
                                      timeout=0.5 if kind == "hang" else 5.0) as client:
        with pytest.raises(getattr(openai_sdk, exc_name)) as info:
            reply = await client.chat.completions.create(**ask)
            if stream:
                async for _ in reply:
                    pass
        assert getattr(info.value, "status_code", None) == status
        if kind == "rate-limit":
            assert info.value.response.headers["retry-after-ms"] == "200"
            assert info.value.code == "rate_limit_exceeded"
        reply = await client.chat.completions.create(**(ask | {"stream": False}))
        assert reply.choices[0].message.content.startswith("[sim:openai:")

    async def no_hung_handler() -> bool:
        return (await sim.state("openai"))["counters"]["hanging"] == 0

    await eventually(no_hung_handler)


async def test_openai_errors(sim: Sim, gpt, openai_sdk):
    with pytest.raises(openai_sdk.NotFoundError) as info:
        await gpt.chat.completions.create(model="mistral-large", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found" and info.value.type == "invalid_request_error"
    status, body = await sim.request("POST", "/v1/chat/completions", json={"model": "gpt-4o", "messages": []})
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai_sdk.BadRequestError) as info:
        await gpt.chat.completions.create(model="gpt-4o", messages=[])
    assert info.value.param == "messages"


# --------------------------------------------------------------------------- litellm


@pytest.mark.parametrize(
    "model,path,tag",
    [
        ("anthropic/claude-sonnet-4-5", "", "[sim:anthropic:"),
        ("ollama/llama3.1", "", "[sim:ollama:"),
        ("ollama_chat/llama3.1", "", "[sim:ollama:"),
        ("openai/gpt-4o-mini", "/v1", "[sim:openai:"),
    ],
)
async def test_litellm_acompletion(sim: Sim, litellm, model: str, path: str, tag: str):
    ask = dict(model=model, api_base=sim.url + path, api_key=KEY, timeout=5, num_retries=0,
               messages=[{"role": "user", "content": "plan the release"}])
    reply = await litellm.acompletion(**ask)
    assert reply.choices[0].message.content.startswith(tag)
    stream = await litellm.acompletion(**ask, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == reply.choices[0].message.content


@pytest.mark.parametrize("model,path", [("anthropic/claude-sonnet-4-5", ""), ("ollama_chat/llama3.1", ""),
                                        ("openai/gpt-4o", "/v1")])
async def test_litellm_tool_calls(sim: Sim, litellm, model: str, path: str):
    # LiteLLM 1.106 imports its MCP gateway (and so the `mcp` package) for any call with tools.
    import mcp  # noqa: F401  (a dev dependency: missing is a failure, never a skip)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a place",
                                               "parameters": {"type": "object", "required": ["location"],
                                                              "properties": {"location": {"type": "string"}}}}}]
    reply = await litellm.acompletion(model=model, api_base=sim.url + path, api_key=KEY, timeout=5, num_retries=0,
                                      tools=tools, messages=[{"role": "user", "content": "weather in Paris?"}])
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["location"], str)
    assert reply.choices[0].finish_reason == "tool_calls"


async def test_litellm_router_falls_back_from_overloaded_anthropic(sim: Sim, litellm):
    await sim.put_fault("anthropic", kind="overloaded")
    router = litellm.Router(
        model_list=[
            {"model_name": "primary", "litellm_params": {"model": f"anthropic/{CLAUDE}", "api_base": sim.url,
                                                         "api_key": KEY}},
            {"model_name": "backup", "litellm_params": {"model": "ollama_chat/llama3.1", "api_base": sim.url}},
        ],
        fallbacks=[{"primary": ["backup"]}],
        num_retries=0,
        timeout=5,
    )
    reply = await router.acompletion(model="primary", messages=[{"role": "user", "content": "plan the release"}])
    assert reply.choices[0].message.content.startswith("[sim:ollama:")
    assert (await sim.state("anthropic"))["counters"]["faults_injected"] >= 1
    assert (await sim.state("ollama"))["counters"]["served"] == 1
