"""A provider's bad days in llm_sim, seen through the real anthropic, openai and ollama
clients: rate and usage limits with each API's headers, stalls, trickles, cut
connections, and 200s that are empty, truncated, refused or carry bad tool arguments;
plus the fault lifetime (times, duration_ms) and the counters downstream tests read.

The pure parts (header formats, the fault lifetime on a fake clock, bad arguments) are
tested first, without a server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from tron.services.llm_sim.answers import REFUSAL_TEXT, invalid_arguments
from tron.services.llm_sim.schema_fake import fake_instance
from tron.services.llm_sim.state import FAULT_KINDS, FaultSpec, ProviderState
from tron.services.llm_sim.wire import go_duration, rate_limit_headers, rfc3339
from tests.integration.test_llm_sim import AUTH, Sim, _stray_tasks, eventually, running_sim

pytestmark = [pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")]

CLAUDE = "claude-sonnet-4-5"
KEY = "sk-test-faults-0001"
WEATHER = {"type": "object", "required": ["city", "days"],
           "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("ms,text", [(0, "0s"), (20, "20ms"), (250, "250ms"), (1000, "1s"), (1500, "1.5s"),
                                     (2000, "2s"), (59_999, "59.999s"), (90_000, "1m30s"), (360_000, "6m0s"),
                                     (3_600_000, "1h0m0s"), (3_723_000, "1h2m3s")])
def test_go_duration(ms: int, text: str):
    assert go_duration(ms) == text


def test_rate_limit_headers_per_api():
    wall = 1_700_000_000.2
    anth = rate_limit_headers("anthropic", 2500, wall)
    assert (anth["retry-after"], anth["retry-after-ms"]) == ("3", "2500")
    for what in ("requests", "tokens", "input-tokens", "output-tokens"):
        assert anth[f"anthropic-ratelimit-{what}-remaining"] == "0"
        assert int(anth[f"anthropic-ratelimit-{what}-limit"]) > 0
        assert anth[f"anthropic-ratelimit-{what}-reset"] == rfc3339(wall + 2.5) == "2023-11-14T22:13:23Z"
    oai = rate_limit_headers("openai", 2500, wall)
    assert (oai["retry-after"], oai["retry-after-ms"]) == ("3", "2500")
    assert oai["x-ratelimit-remaining-requests"] == oai["x-ratelimit-remaining-tokens"] == "0"
    assert oai["x-ratelimit-reset-requests"] == oai["x-ratelimit-reset-tokens"] == "2.5s"
    assert rate_limit_headers("ollama", 2500, wall) == {"retry-after": "3"}


def test_retry_after_defaults_by_kind():
    assert FaultSpec(kind="rate-limit").retry_after_ms == 1000
    assert FaultSpec(kind="usage-limit").retry_after_ms == 3_600_000
    assert FaultSpec(kind="usage-limit", retry_after_ms=40).retry_after_ms == 40


# (times, duration_ms, requests at these seconds after set) -> which of them drew the fault
LIFETIME_CASES = [
    (None, None, [0, 1, 100], [True, True, True]),
    (2, None, [0, 0, 0], [True, True, False]),
    (None, 6000, [0, 5.9, 6.0, 7], [True, True, False, False]),
    (3, 6000, [0, 1, 2, 3], [True, True, True, False]),  # times runs out first
    (9, 1000, [0, 0.5, 1.5], [True, True, False]),  # duration runs out first
]


@pytest.mark.parametrize("times,duration_ms,at,drawn", LIFETIME_CASES)
def test_fault_lifetime(times, duration_ms, at, drawn):
    pstate, start = ProviderState(), 1000.0
    pstate.set_fault(FaultSpec(kind="rate-limit", times=times, duration_ms=duration_ms), start)
    got = [pstate.take_fault(start + t) is not None for t in at]
    assert got == drawn
    assert pstate.counters.faults_injected == sum(drawn) == pstate.counters.by_kind.get("rate-limit", 0)


# (after, times, requests) -> which of them drew the fault: `after` lets requests through
# untouched first, and they use none of `times`
AFTER_CASES = [
    (0, None, 3, [True, True, True]),
    (1, None, 3, [False, True, True]),
    (2, 1, 4, [False, False, True, False]),
    (5, None, 2, [False, False]),
]


@pytest.mark.parametrize("after,times,requests,drawn", AFTER_CASES)
def test_fault_after_lets_requests_through_first(after, times, requests, drawn):
    pstate = ProviderState()
    pstate.set_fault(FaultSpec(kind="hang", after=after, times=times), 0.0)
    got = [pstate.take_fault(0.0) is not None for _ in range(requests)]
    assert got == drawn
    assert pstate.counters.faults_injected == sum(drawn)
    assert pstate.snapshot(0.0)["passing"] == max(0, after - requests)
    pstate.clear_fault()
    assert pstate.passing == 0


def test_snapshot_clears_an_expired_fault():
    pstate = ProviderState()
    pstate.set_fault(FaultSpec(kind="error", duration_ms=500), 10.0)
    assert pstate.snapshot(10.2)["expires_in_ms"] == 300
    assert pstate.snapshot(10.5)["fault"] is None and pstate.fault is None


@pytest.mark.parametrize("schema,broken", [
    (WEATHER, lambda v: "city" not in v),  # a required property dropped
    ({"type": "object", "properties": {"n": {"type": "string"}}}, lambda v: v["n"] == 12345),
    ({"type": "object", "properties": {"n": {"type": "integer"}}}, lambda v: v["n"] == "sim-wrong-type"),
])
def test_invalid_arguments_fail_their_schema(schema, broken):
    import jsonschema  # a runtime dependency: missing is a failure, never a skip
    valid = fake_instance(schema, "seed")
    jsonschema.validate(valid, schema)
    bad = invalid_arguments(schema, valid)
    assert broken(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def sim(monkeypatch) -> AsyncIterator[Sim]:
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "OLLAMA_HOST",
                "OPENAI_API_KEY", "OPENAI_BASE_URL", "TRON_SIM_OLLAMA_MODELS"):
        monkeypatch.delenv(var, raising=False)
    async with running_sim() as s:
        yield s
    # The SDKs' stream generators are closed by the loop's finaliser tasks: let them run.
    deadline = time.monotonic() + 2
    while _stray_tasks() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert _stray_tasks() == []


def claude(sim: Sim, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=sim.url, api_key=KEY, max_retries=kw.pop("max_retries", 0),
                                    timeout=kw.pop("timeout", 5.0), **kw)


def gpt(sim: Sim, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key=KEY, max_retries=kw.pop("max_retries", 0),
                              timeout=kw.pop("timeout", 5.0), **kw)


def local(sim: Sim, timeout: float = 5.0) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=sim.url, timeout=timeout)


async def counters(sim: Sim, provider: str) -> dict[str, Any]:
    return (await sim.state(provider))["counters"]


async def no_held_requests(sim: Sim, provider: str) -> None:
    async def released() -> bool:
        return (await counters(sim, provider))["hanging"] == 0

    await eventually(released)


ASK = [{"role": "user", "content": "plan the release"}]


# --------------------------------------------------------------------------- rate and usage limits


async def test_anthropic_rate_limit_headers_and_body(sim: Sim):
    await sim.put_fault("anthropic", kind="rate-limit", times=1, retry_after_ms=2500)
    async with claude(sim) as client:
        with pytest.raises(anthropic.RateLimitError) as info:
            await client.messages.create(model=CLAUDE, max_tokens=64, messages=ASK)
    err = info.value
    headers = err.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("3", "2500")
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "0"
    reset = datetime.strptime(headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ")
    wait = reset.replace(tzinfo=timezone.utc).timestamp() - time.time()
    assert 1.5 < wait <= 4.0
    assert err.body["error"]["type"] == "rate_limit_error" and headers["request-id"]


async def test_openai_rate_limit_headers_and_body(sim: Sim):
    await sim.put_fault("openai", kind="rate-limit", times=1, retry_after_ms=90_000)
    async with gpt(sim) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="gpt-4o", messages=ASK)
    headers = info.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("90", "90000")
    assert headers["x-ratelimit-limit-requests"] == "500" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == headers["x-ratelimit-reset-tokens"] == "1m30s"
    assert info.value.code == "rate_limit_exceeded" and "1m30s" in info.value.message


async def test_ollama_rate_limit_has_retry_after(sim: Sim):
    await sim.put_fault("ollama", kind="rate-limit", times=1, retry_after_ms=1200)
    async with sim.http.post(sim.url + "/api/chat", json={"model": "llama3.1", "messages": ASK,
                                                           "stream": False}) as resp:
        assert resp.status == 429 and resp.headers["retry-after"] == "2"
    async with local(sim) as client:
        reply = await client.chat(model="llama3.1", messages=ASK, stream=False)
    assert reply.message.content.startswith("[sim:ollama:")


async def test_usage_limit_per_api(sim: Sim):
    for provider in ("anthropic", "openai", "ollama"):
        await sim.put_fault(provider, kind="usage-limit", times=1)
    async with claude(sim) as client:
        with pytest.raises(anthropic.RateLimitError) as info:
            await client.messages.create(model=CLAUDE, max_tokens=64, messages=ASK)
    assert info.value.response.headers["retry-after"] == "3600"
    assert info.value.body["error"]["type"] == "rate_limit_error" and "usage limits" in info.value.message
    async with gpt(sim) as client:
        with pytest.raises(openai.RateLimitError) as oinfo:
            await client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert oinfo.value.code == "insufficient_quota" and oinfo.value.type == "insufficient_quota"
    async with local(sim) as client:
        with pytest.raises(ollama.ResponseError) as linfo:
            await client.chat(model="llama3.1", messages=ASK, stream=False)
    assert linfo.value.status_code == 429 and "usage limit" in linfo.value.error
    for provider in ("anthropic", "openai", "ollama"):
        assert (await counters(sim, provider))["rate_limited"] == 1


async def test_rate_limit_for_a_duration_counts_every_request(sim: Sim):
    """ "429 with retry-after 3 s for 6 s", shortened: a client that keeps asking is
    refused until the fault clears itself, and the counters say exactly how often. The client
    asks once before the fault: the SDK loads its resources at the first call, which on a
    loaded machine took longer than the fault lasts (CI: refused 0 times)."""
    async with claude(sim) as client:
        await client.messages.create(model=CLAUDE, max_tokens=64, messages=ASK)
        before = await counters(sim, "anthropic")
        status, body = await sim.put_fault("anthropic", kind="rate-limit", retry_after_ms=50, duration_ms=400)
        assert status == 200 and 0 < body["expires_in_ms"] <= 400
        refused, deadline = 0, time.monotonic() + 15
        while True:
            assert time.monotonic() < deadline, "the fault never cleared itself"
            try:
                await client.messages.create(model=CLAUDE, max_tokens=64, messages=ASK)
                break
            except anthropic.RateLimitError:
                refused += 1
    got = {k: v - before[k] for k, v in (await counters(sim, "anthropic")).items() if isinstance(v, int)}
    assert refused >= 1 and got["requests"] == refused + 1 and got["served"] == 1, (refused, got)
    assert got["rate_limited"] == got["faults_injected"] == refused, (refused, got)
    assert (await sim.state("anthropic"))["fault"] is None


async def test_after_holds_the_second_call_and_not_the_first(sim: Sim):
    """How a test holds the second step of a run (test_netns_cluster.py): the first call
    is answered, the one after it draws the fault."""
    status, body = await sim.put_fault("anthropic", kind="error", after=1, times=1)
    assert status == 200 and body["passing"] == 1
    async with claude(sim) as client:
        first = await client.messages.create(model=CLAUDE, max_tokens=64, messages=ASK)
        assert first.content[0].text
        with pytest.raises(anthropic.InternalServerError):
            await client.messages.create(model=CLAUDE, max_tokens=64, messages=ASK)
        await client.messages.create(model=CLAUDE, max_tokens=64, messages=ASK)  # times=1: cleared
    got = await counters(sim, "anthropic")
    assert got["requests"] == 3 and got["served"] == 2 and got["faults_injected"] == 1
    status, body = await sim.put_fault("anthropic", kind="error", after=-1)
    assert status == 400 and "after" in json.dumps(body)


async def test_times_counts_one_per_request_with_sdk_retries(sim: Sim):
    # The SDK retries a 429 itself; each retry is one request and uses one of `times`.
    await sim.put_fault("openai", kind="rate-limit", times=2, retry_after_ms=10)
    async with gpt(sim, max_retries=3) as client:
        reply = await client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert reply.choices[0].message.content.startswith("[sim:openai:")
    assert (await counters(sim, "openai")) | {"by_kind": None, "tokens": None} == {
        "requests": 3, "served": 1, "faults_injected": 2, "rate_limited": 2, "by_kind": None, "hanging": 0,
        "tokens": None}


async def test_counters_reset(sim: Sim):
    await sim.put_fault("ollama", kind="error", times=1)
    async with local(sim) as client:
        with pytest.raises(ollama.ResponseError):
            await client.chat(model="llama3.1", messages=ASK, stream=False)
    status, body = await sim.request("POST", "/sim/counters/reset", headers=AUTH)
    assert status == 200 and body["reset"]["ollama"]["requests"] == 1
    assert await counters(sim, "ollama") == {"requests": 0, "served": 0, "faults_injected": 0, "rate_limited": 0,
                                             "by_kind": {}, "hanging": 0, "tokens": {}}
    status, _ = await sim.request("DELETE", "/sim/counters")
    assert status == 401  # needs the token, like every state-changing control endpoint
    status, _ = await sim.request("DELETE", "/sim/counters", headers=AUTH)
    assert status == 200


# --------------------------------------------------------------------------- stall and trickle


async def test_stall_sends_the_first_event_then_nothing(sim: Sim):
    await sim.put_fault("anthropic", kind="stall", times=1)
    events: list[str] = []
    async with claude(sim, timeout=anthropic.Timeout(5.0, read=0.4)) as client:
        with pytest.raises(anthropic.APITimeoutError):
            async with client.messages.stream(model=CLAUDE, max_tokens=256, messages=ASK) as stream:
                async for event in stream:
                    events.append(event.type)
    assert events == ["message_start"]
    await no_held_requests(sim, "anthropic")


@pytest.mark.parametrize("provider", ["openai", "ollama"])
async def test_stall_for_a_while_then_finishes(sim: Sim, provider: str):
    await sim.put_fault(provider, kind="stall", latency_ms=300, times=1)
    started = time.monotonic()
    if provider == "openai":
        async with gpt(sim) as client:
            async with await client.chat.completions.create(model="gpt-4o", messages=ASK, stream=True) as stream:
                text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    else:
        async with local(sim) as client:
            text = "".join([p.message.content async for p in await client.chat(model="llama3.1", messages=ASK,
                                                                                stream=True)])
    assert time.monotonic() - started >= 0.3 and text.startswith(f"[sim:{provider}:")
    assert (await counters(sim, provider))["served"] == 1


async def test_stall_without_a_stream_is_a_hang(sim: Sim):
    await sim.put_fault("openai", kind="stall", times=1)
    async with gpt(sim, timeout=0.4) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="gpt-4o", messages=ASK)
    await no_held_requests(sim, "openai")


@pytest.mark.parametrize("stream", [False, True])
async def test_trickle_paces_every_delta(sim: Sim, stream: bool):
    async with claude(sim) as client:
        plain = await client.messages.create(model=CLAUDE, max_tokens=256, messages=ASK)
        await sim.put_fault("anthropic", kind="trickle", latency_ms=40, times=1)
        started = time.monotonic()
        if stream:
            stamps = []
            async with client.messages.stream(model=CLAUDE, max_tokens=256, messages=ASK) as s:
                async for event in s:
                    if event.type == "content_block_delta":
                        stamps.append(time.monotonic())
                final = await s.get_final_message()
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            assert len(gaps) >= 3 and min(gaps) >= 0.03
        else:
            final = await client.messages.create(model=CLAUDE, max_tokens=256, messages=ASK)
    deltas = len(plain.content[0].text.split()) // 3
    assert time.monotonic() - started >= 0.04 * deltas
    assert final.content[0].text == plain.content[0].text


# --------------------------------------------------------------------------- cut connections


@pytest.mark.parametrize("stream", [True, False])
async def test_cut_anthropic(sim: Sim, stream: bool):
    await sim.put_fault("anthropic", kind="cut", times=1)
    async with claude(sim) as client:
        with pytest.raises(anthropic.APIConnectionError):
            if stream:
                async with client.messages.stream(model=CLAUDE, max_tokens=256, messages=ASK) as s:
                    await s.get_final_message()
            else:
                await client.messages.create(model=CLAUDE, max_tokens=256, messages=ASK)
        reply = await client.messages.create(model=CLAUDE, max_tokens=256, messages=ASK)
    assert reply.stop_reason == "end_turn"
    got = await counters(sim, "anthropic")
    assert (got["requests"], got["served"], got["by_kind"]) == (2, 1, {"cut": 1})


@pytest.mark.parametrize("stream", [True, False])
async def test_cut_openai(sim: Sim, stream: bool):
    await sim.put_fault("openai", kind="cut", times=1)
    async with gpt(sim) as client:
        # Once a stream has begun, the SDK lets httpx's error through unwrapped.
        with pytest.raises((openai.APIConnectionError, httpx.RemoteProtocolError)):
            reply = await client.chat.completions.create(model="gpt-4o", messages=ASK, stream=stream)
            if stream:
                async for _ in reply:
                    pass


async def test_cut_is_mid_event_on_the_wire(sim: Sim):
    await sim.put_fault("openai", kind="cut", times=1)
    received = b""
    payload = {"model": "gpt-4o", "messages": ASK, "stream": True}
    async with sim.http.post(sim.url + "/v1/chat/completions", json=payload,
                             headers={"Authorization": f"Bearer {KEY}"}) as resp:
        with pytest.raises(Exception) as info:  # aiohttp names it ClientPayloadError
            async for chunk in resp.content.iter_any():
                received += chunk
    assert "Payload" in type(info.value).__name__ or "Connection" in type(info.value).__name__
    assert received.startswith(b"data: ") and not received.endswith(b"\n\n") and b"[DONE]" not in received


@pytest.mark.parametrize("stream", [True, False])
async def test_cut_ollama(sim: Sim, stream: bool):
    await sim.put_fault("ollama", kind="cut", times=1)
    async with local(sim) as client:
        # ollama's client lets httpx's own error through for a broken body.
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, json.JSONDecodeError)):
            if stream:
                async for _ in await client.chat(model="llama3.1", messages=ASK, stream=True):
                    pass
            else:
                await client.chat(model="llama3.1", messages=ASK, stream=False)


# --------------------------------------------------------------------------- shaped 200s


@pytest.mark.parametrize("stream", [False, True])
async def test_empty_answers(sim: Sim, stream: bool):
    for provider in ("anthropic", "openai", "ollama"):
        await sim.put_fault(provider, kind="empty", times=1)
    async with claude(sim) as client:
        if stream:
            async with client.messages.stream(model=CLAUDE, max_tokens=256, messages=ASK) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(model=CLAUDE, max_tokens=256, messages=ASK)
    assert (msg.content, msg.stop_reason, msg.usage.output_tokens) == ([], "end_turn", 0)
    assert msg.usage.input_tokens > 0
    async with gpt(sim) as client:
        if stream:
            chunks = [c async for c in await client.chat.completions.create(
                model="gpt-4o", messages=ASK, stream=True, stream_options={"include_usage": True})]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            usage = chunks[-1].usage
        else:
            done = await client.chat.completions.create(model="gpt-4o", messages=ASK)
            text, finish, usage = done.choices[0].message.content, done.choices[0].finish_reason, done.usage
    assert (text, finish, usage.completion_tokens) == ("", "stop", 0)
    async with local(sim) as client:
        if stream:
            parts = [p async for p in await client.chat(model="llama3.1", messages=ASK, stream=True)]
            text, last = "".join(p.message.content for p in parts), parts[-1]
        else:
            last = await client.chat(model="llama3.1", messages=ASK, stream=False)
            text = last.message.content
    assert (text, last.done_reason, last.eval_count) == ("", "stop", 0)


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_answers(sim: Sim, stream: bool):
    async with claude(sim) as client:
        full = (await client.messages.create(model=CLAUDE, max_tokens=1024, messages=ASK)).content[0].text
        await sim.put_fault("anthropic", kind="max-tokens", times=1)
        if stream:
            async with client.messages.stream(model=CLAUDE, max_tokens=1024, messages=ASK) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(model=CLAUDE, max_tokens=1024, messages=ASK)
    text = msg.content[0].text
    assert msg.stop_reason == "max_tokens" and full.startswith(text) and len(text) < len(full)
    assert msg.usage.output_tokens == len(text.split())
    await sim.put_fault("openai", kind="max-tokens", times=1)
    async with gpt(sim) as client:
        if stream:
            chunks = [c async for c in await client.chat.completions.create(model="gpt-4o", messages=ASK,
                                                                           stream=True)]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            finish = (await client.chat.completions.create(model="gpt-4o", messages=ASK)).choices[0].finish_reason
    assert finish == "length"
    await sim.put_fault("ollama", kind="max-tokens", times=1)
    async with local(sim) as client:
        if stream:
            last = [p async for p in await client.chat(model="llama3.1", messages=ASK, stream=True)][-1]
        else:
            last = await client.chat(model="llama3.1", messages=ASK, stream=False)
    assert last.done_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
async def test_refusals(sim: Sim, stream: bool):
    for provider in ("anthropic", "openai", "ollama"):
        await sim.put_fault(provider, kind="refusal", times=1)
    async with claude(sim) as client:
        if stream:
            async with client.messages.stream(model=CLAUDE, max_tokens=256, messages=ASK) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(model=CLAUDE, max_tokens=256, messages=ASK)
    assert msg.stop_reason == "refusal" and msg.content[0].text == REFUSAL_TEXT
    async with gpt(sim) as client:
        if stream:
            chunks = [c async for c in await client.chat.completions.create(model="gpt-4o", messages=ASK,
                                                                           stream=True)]
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            refusal = "".join(d.refusal or "" for d in deltas)
            content = "".join(d.content or "" for d in deltas)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            choice = (await client.chat.completions.create(model="gpt-4o", messages=ASK)).choices[0]
            refusal, content, finish = choice.message.refusal, choice.message.content, choice.finish_reason
            assert content is None
    assert (refusal, content or "", finish) == (REFUSAL_TEXT, "", "stop")
    async with local(sim) as client:
        if stream:
            parts = [p async for p in await client.chat(model="llama3.1", messages=ASK, stream=True)]
            text = "".join(p.message.content for p in parts)
        else:
            text = (await client.chat(model="llama3.1", messages=ASK, stream=False)).message.content
    assert text == REFUSAL_TEXT


async def test_refusal_through_openai_parse(sim: Sim):
    import pydantic

    class Pet(pydantic.BaseModel):
        name: str

    await sim.put_fault("openai", kind="refusal", times=1)
    async with gpt(sim) as client:
        done = await client.chat.completions.parse(model="gpt-4o", messages=ASK, response_format=Pet)
    assert done.choices[0].message.refusal == REFUSAL_TEXT and done.choices[0].message.parsed is None


@pytest.mark.parametrize("stream", [False, True])
async def test_bad_tool_args(sim: Sim, stream: bool):
    import jsonschema  # a runtime dependency: missing is a failure, never a skip
    tool = {"name": "get_weather", "description": "Weather for a city", "input_schema": WEATHER}
    for provider in ("anthropic", "openai", "ollama"):
        await sim.put_fault(provider, kind="bad-tool-args", times=1)
    async with claude(sim) as client:
        ask = dict(model=CLAUDE, max_tokens=256, messages=ASK, tools=[tool])
        if stream:
            async with client.messages.stream(**ask) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(**ask)
    [call] = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and call.name == "get_weather"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(call.input, WEATHER)
    fn = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}}
    async with gpt(sim) as client:
        if stream:
            args = "".join([d.function.arguments or "" async for c in await client.chat.completions.create(
                model="gpt-4o", messages=ASK, tools=[fn], stream=True) for d in c.choices[0].delta.tool_calls or ()])
        else:
            done = await client.chat.completions.create(model="gpt-4o", messages=ASK, tools=[fn])
            args = done.choices[0].message.tool_calls[0].function.arguments
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(args), WEATHER)
    async with local(sim) as client:
        reply = await client.chat(model="llama3.1", messages=ASK, tools=[fn], stream=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(reply.message.tool_calls[0].function.arguments), WEATHER)


async def test_bad_tool_args_without_tools_is_a_normal_answer(sim: Sim):
    await sim.put_fault("anthropic", kind="bad-tool-args", times=1)
    async with claude(sim) as client:
        msg = await client.messages.create(model=CLAUDE, max_tokens=256, messages=ASK)
    assert msg.stop_reason == "end_turn" and msg.content[0].text.startswith("[sim:anthropic:")


# --------------------------------------------------------------------------- usage everywhere


async def test_usage_on_every_answer(sim: Sim):
    async with claude(sim) as client:
        plain = await client.messages.create(model=CLAUDE, max_tokens=256, messages=ASK)
        starts, deltas = [], []
        async with client.messages.stream(model=CLAUDE, max_tokens=256, messages=ASK) as s:
            async for event in s:
                if event.type == "message_start":
                    starts.append(event.message.usage)
                elif event.type == "message_delta":
                    deltas.append(event.usage)
            final = await s.get_final_message()
    assert starts[0].input_tokens == plain.usage.input_tokens > 0
    assert deltas[0].output_tokens == plain.usage.output_tokens == final.usage.output_tokens > 0
    assert final.usage.input_tokens == plain.usage.input_tokens
    async with local(sim) as client:
        last = [p async for p in await client.chat(model="llama3.1", messages=ASK, stream=True)][-1]
    assert last.prompt_eval_count == 3 and last.eval_count > 0


def test_every_kind_is_tested_here():
    source = open(__file__).read()
    missing = [k for k in FAULT_KINDS if f'kind="{k}"' not in source and k not in ("latency", "hang", "overloaded",
                                                                                    "error", "auth", "midstream")]
    assert missing == []  # the older kinds are covered by test_llm_sim.py and test_llm_sim_fidelity.py


def test_fault_kinds_agree_everywhere():
    from typing import get_args

    from tron.scripts.tron import build_parser
    from tron.services.llm_sim.state import FaultKind

    assert set(get_args(FaultKind)) == set(FAULT_KINDS) and len(FAULT_KINDS) == len(set(FAULT_KINDS))
    sim = next(a for a in build_parser()._subparsers._group_actions[0].choices["sim"]._actions
               if a.dest == "sim_cmd")
    kind = next(a for a in sim.choices["fault"]._actions if a.dest == "kind")
    assert set(kind.choices) == set(FAULT_KINDS)
