"""llm_sim on a real loopback port, driven by the real anthropic and ollama clients."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import ollama
import pytest
from aiohttp import web

from tron.common import providers
from tron.common.providers import ProviderFailure, ProviderSettings, complete
from tron.services.llm_sim.app import MAX_BODY, SIM_STATE, make_app

pytestmark = [
    pytest.mark.integration,
    # anthropic 2.11 warns that the default model (claude-sonnet-4-5) is deprecated; the
    # sim does not care which model is named.
    pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning"),
]

TOKEN = "sim-test-token-42"
AUTH = {"X-Tron-Token": TOKEN}
ANTHROPIC_HEADERS = {"x-api-key": "sk-ant-test-secret-0001", "anthropic-version": "2023-06-01"}


@dataclass
class Sim:
    url: str
    app: web.Application
    http: aiohttp.ClientSession

    def settings(self, **overrides: Any) -> ProviderSettings:
        return ProviderSettings(sim_url=self.url, timeout_s=overrides.pop("timeout_s", 5.0), **overrides)

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, **kwargs) as resp:
            text = await resp.text()
            is_json = resp.content_type == "application/json"
            return resp.status, json.loads(text) if is_json else text

    async def put_fault(self, provider: str, headers: dict | None = AUTH, **body: Any) -> tuple[int, Any]:
        return await self.request("PUT", f"/sim/faults/{provider}", json=body, headers=headers)

    async def state(self, provider: str) -> dict[str, Any]:
        status, body = await self.request("GET", "/sim/faults")
        assert status == 200
        return body["providers"][provider]


def _stray_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]


@asynccontextmanager
async def running_sim(token: str | None = TOKEN) -> AsyncIterator[Sim]:
    runner = web.AppRunner(make_app(token=token))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as http:
            yield Sim(f"http://{host}:{port}", runner.app, http)
    finally:
        await providers.aclose_clients()
        await runner.cleanup()


@pytest.fixture
async def sim(monkeypatch) -> AsyncIterator[Sim]:
    # A developer's real provider settings must not redirect the tests.
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "OLLAMA_HOST"):
        monkeypatch.delenv(var, raising=False)
    async with running_sim() as s:
        yield s
    assert _stray_tasks() == []


async def eventually(predicate: Callable[[], Any], timeout: float = 3.0) -> None:
    """Wait until an async predicate holds (the server reacts asynchronously)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("provider", ["anthropic", "ollama"])
@pytest.mark.parametrize("stream", [False, True])
async def test_complete_with_real_clients(sim: Sim, provider: str, stream: bool):
    reply = await complete(provider, system="Be brief.", prompt="write a hello world in C",
                           settings=sim.settings(), stream=stream)
    assert reply.provider == provider and reply.streamed is stream
    assert reply.text.startswith(f"[sim:{provider}:")
    assert "Plan for: write a hello world in C" in reply.text
    assert reply.input_tokens == 8 and reply.output_tokens == len(reply.text.split())
    expected_model = "claude-sonnet-4-5" if provider == "anthropic" else "llama3.1"
    assert reply.model == expected_model


@pytest.mark.parametrize("provider", ["anthropic", "ollama"])
async def test_answers_are_deterministic(sim: Sim, provider: str):
    settings = sim.settings()

    async def ask(system: str, prompt: str, stream: bool = False) -> str:
        reply = await complete(provider, system=system, prompt=prompt, settings=settings, stream=stream)
        return reply.text

    first = await ask("sys", "plan the release")
    assert await ask("sys", "plan the release") == first
    assert await ask("sys", "plan the release", stream=True) == first
    assert await ask("sys", "plan the rollback") != first
    assert await ask("other system", "plan the release") != first


async def test_same_input_same_digest_across_providers(sim: Sim):
    a = await complete("anthropic", system="s", prompt="p", settings=sim.settings())
    o = await complete("ollama", system="s", prompt="p", settings=sim.settings())
    assert a.text.replace("[sim:anthropic:", "") == o.text.replace("[sim:ollama:", "")


async def test_prompt_topic_is_truncated(sim: Sim):
    reply = await complete("anthropic", system="", prompt="word " * 100, settings=sim.settings())
    topic = reply.text.split("Plan for: ", 1)[1].split("\n", 1)[0]
    assert len(topic) <= 80


async def test_ollama_generate_tags_version_root(sim: Sim):
    async with ollama.AsyncClient(host=sim.url, timeout=5) as client:
        gen = await client.generate(model="llama3.1", prompt="say hi", stream=False)
        assert gen.done and gen.done_reason == "stop" and gen.response.startswith("[sim:ollama:")
        parts = [p async for p in await client.generate(model="llama3.1", prompt="say hi", stream=True)]
        assert len(parts) > 2 and parts[-1].done and not parts[0].done
        assert "".join(p.response for p in parts) == gen.response
        assert parts[-1].eval_count == gen.eval_count and parts[-1].total_duration > 0
        tags = await client.list()
        assert tags.models and tags.models[0].model == "llama3.1:latest"
        assert tags.models[0].details.family == "llama"
    status, body = await sim.request("GET", "/api/version")
    assert status == 200 and body["version"]
    status, body = await sim.request("GET", "/")
    assert (status, body) == (200, "Ollama is running")


async def test_anthropic_wire_format(sim: Sim):
    # The sim knows claude-* models only (unknown ones get the real API's 404), and
    # max_tokens leaves room for the whole answer so it ends with end_turn.
    payload = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [{"role": "user", "content": "hi"}]}
    async with sim.http.post(sim.url + "/v1/messages", json=payload, headers=ANTHROPIC_HEADERS) as resp:
        body = await resp.json()
        assert resp.status == 200 and resp.headers["request-id"]
    assert body["type"] == "message" and body["role"] == "assistant" and body["model"] == "claude-sonnet-4-5"
    assert body["id"].startswith("msg_") and body["stop_reason"] == "end_turn"
    assert body["stop_sequence"] is None and body["content"][0]["type"] == "text"
    assert set(body["usage"]) == {"input_tokens", "output_tokens", "cache_creation_input_tokens",
                                  "cache_read_input_tokens", "service_tier"}

    bearer = {"Authorization": "Bearer whatever"}
    async with sim.http.post(sim.url + "/v1/messages", json=payload | {"stream": True},
                             headers=bearer) as resp:
        assert resp.content_type == "text/event-stream"
        raw = await resp.text()
    events = [line.split(": ", 1)[1] for line in raw.splitlines() if line.startswith("event:")]
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[3:-3] and set(events[3:-3]) == {"content_block_delta"}
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_ollama_chat_streams_by_default(sim: Sim):
    payload = {"model": "llama3.1", "messages": [{"role": "user", "content": "hi"}]}
    async with sim.http.post(sim.url + "/api/chat", json=payload) as resp:
        assert resp.status == 200 and resp.content_type == "application/x-ndjson"
        raw = await resp.text()
    lines = raw.split("\n")
    assert lines[-1] == "" and all(lines[:-1])  # newline-terminated, no blank lines
    parts = [json.loads(line) for line in lines[:-1]]
    assert [p["done"] for p in parts] == [False] * (len(parts) - 1) + [True]
    last = parts[-1]
    assert last["done_reason"] == "stop" and last["eval_count"] > 0 and last["prompt_eval_count"] == 1
    assert {"total_duration", "load_duration", "eval_duration", "created_at", "model"} <= set(last)


# --------------------------------------------------------------------------- wire errors


@pytest.mark.parametrize(
    "payload,missing",
    [
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": "m", "max_tokens": 5}, "messages"),
    ],
)
async def test_anthropic_validation_errors(sim: Sim, payload: dict, missing: str):
    status, body = await sim.request("POST", "/v1/messages", json=payload, headers=ANTHROPIC_HEADERS)
    assert status == 400
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(f"{missing}: Field required")


async def test_anthropic_requires_a_key(sim: Sim):
    payload = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    async with sim.http.post(sim.url + "/v1/messages", json=payload) as resp:
        body = await resp.json()
        assert resp.status == 401 and resp.headers["request-id"]
    assert body["error"]["type"] == "authentication_error"


async def test_ollama_validation_error(sim: Sim):
    status, body = await sim.request("POST", "/api/chat", json={"messages": []})
    assert status == 400 and "model" in body["error"]
    status, body = await sim.request("POST", "/api/generate", data=b"{not json")
    assert status == 400 and "invalid JSON" in body["error"]


@pytest.mark.parametrize("path,headers", [("/v1/messages", ANTHROPIC_HEADERS), ("/api/chat", {})])
async def test_body_over_one_mib_is_413(sim: Sim, path: str, headers: dict):
    big = json.dumps({"model": "m", "prompt": "x" * MAX_BODY}).encode()
    status, body = await sim.request("POST", path, data=io.BytesIO(big), headers=headers)
    assert status == 413
    error = body["error"]
    assert (error["type"] == "request_too_large") if path == "/v1/messages" else "exceeds" in error


# --------------------------------------------------------------------------- faults

# (provider, kind, stream, reason, retryable, status, midstream)
FAULT_CASES = [
    ("anthropic", "overloaded", False, "overloaded_error", True, 529, False),
    ("anthropic", "overloaded", True, "overloaded_error", True, 529, False),
    ("anthropic", "rate-limit", False, "rate_limit_error", True, 429, False),
    ("anthropic", "error", False, "api_error", True, 500, False),
    ("anthropic", "auth", False, "authentication_error", False, 401, False),
    ("anthropic", "midstream", True, "overloaded_error", True, 200, True),
    ("anthropic", "midstream", False, "api_error", True, 500, False),
    ("anthropic", "hang", False, "timeout", True, None, False),
    ("anthropic", "hang", True, "timeout", True, None, False),
    ("ollama", "overloaded", False, "overloaded_error", True, 503, False),
    ("ollama", "overloaded", True, "overloaded_error", True, 503, False),
    ("ollama", "rate-limit", False, "rate_limit_error", True, 429, False),
    ("ollama", "error", False, "api_error", True, 500, False),
    ("ollama", "auth", False, "authentication_error", False, 401, False),
    ("ollama", "midstream", True, "stream_error", True, None, True),
    ("ollama", "midstream", False, "api_error", True, 500, False),
    ("ollama", "hang", False, "timeout", True, None, False),
    ("ollama", "hang", True, "timeout", True, None, False),
]


@pytest.mark.parametrize(
    "provider,kind,stream,reason,retryable,status,midstream",
    FAULT_CASES,
    ids=[f"{c[0]}-{c[1]}-{'stream' if c[2] else 'plain'}" for c in FAULT_CASES],
)
async def test_fault_is_classified(sim: Sim, provider, kind, stream, reason, retryable, status, midstream):
    assert (await sim.put_fault(provider, kind=kind, times=1))[0] == 200
    settings = sim.settings(timeout_s=0.5 if kind == "hang" else 5.0)

    with pytest.raises(ProviderFailure) as info:
        await complete(provider, system="s", prompt="p", settings=settings, stream=stream)
    failure = info.value
    assert (failure.provider, failure.reason, failure.retryable) == (provider, reason, retryable)
    assert (failure.status, failure.midstream) == (status, midstream)
    assert failure.__cause__ is not None

    # times=1: the fault has cleared itself and the next call is answered.
    reply = await complete(provider, system="s", prompt="p", settings=settings, stream=stream)
    assert reply.text.startswith(f"[sim:{provider}:")
    state = await sim.state(provider)
    assert state["fault"] is None
    assert state["counters"]["faults_injected"] == 1 and state["counters"]["served"] == 1

    async def no_hung_handler() -> bool:  # the hang ends when its client gives up
        return (await sim.state(provider))["counters"]["hanging"] == 0

    await eventually(no_hung_handler)


@pytest.mark.parametrize("provider", ["anthropic", "ollama"])
async def test_latency_fault_delays_then_answers(sim: Sim, provider: str):
    await sim.put_fault(provider, kind="latency", latency_ms=300)
    started = time.monotonic()
    reply = await complete(provider, system="", prompt="p", settings=sim.settings())
    assert time.monotonic() - started >= 0.3
    assert reply.text.startswith(f"[sim:{provider}:")
    assert (await sim.state(provider))["fault"]["kind"] == "latency"  # no `times`: stays


async def test_times_counts_down_then_clears(sim: Sim):
    status, body = await sim.put_fault("anthropic", kind="rate-limit", times=2)
    assert status == 200 and body["remaining"] == 2
    settings = sim.settings()
    for remaining in (1, None):
        with pytest.raises(ProviderFailure, match="rate_limit_error"):
            await complete("anthropic", system="", prompt="p", settings=settings)
        assert (await sim.state("anthropic"))["remaining"] == remaining
    await complete("anthropic", system="", prompt="p", settings=settings)
    counters = (await sim.state("anthropic"))["counters"]
    assert counters == {"requests": 3, "served": 1, "faults_injected": 2, "rate_limited": 2,
                        "by_kind": {"rate-limit": 2}, "hanging": 0,
                        "tokens": {"claude-sonnet-4-5": {"calls": 1, "input_tokens": 1, "output_tokens": 30}}}
    assert (await sim.state("ollama"))["counters"]["requests"] == 0


async def test_faults_are_per_provider(sim: Sim):
    await sim.put_fault("anthropic", kind="error")
    reply = await complete("ollama", system="", prompt="p", settings=sim.settings())
    assert reply.provider == "ollama"


@pytest.mark.parametrize("headers", [None, {"X-Tron-Token": "wrong"}])
async def test_fault_control_needs_token(sim: Sim, headers):
    status, body = await sim.put_fault("anthropic", headers=headers, kind="overloaded")
    assert status == 401 and "X-Tron-Token" in body["error"]
    assert (await sim.state("anthropic"))["fault"] is None

    await sim.put_fault("anthropic", kind="overloaded")
    for path in ("/sim/faults/anthropic", "/sim/faults"):
        status, _ = await sim.request("DELETE", path, headers=headers)
        assert status == 401
        assert (await sim.state("anthropic"))["fault"]["kind"] == "overloaded"


@pytest.mark.parametrize(
    "provider,body,status,needle",
    [
        ("anthropic", {"kind": "explode"}, 400, "'explode'"),
        ("gemini", {"kind": "hang"}, 404, "'gemini'"),
        ("ollama", {"kind": "hang", "colour": "red"}, 400, "colour"),
        ("ollama", {"kind": "hang", "times": 0}, 400, "times"),
        ("ollama", {"latency_ms": 5}, 400, "kind"),
    ],
)
async def test_bad_fault_requests(sim: Sim, provider: str, body: dict, status: int, needle: str):
    got_status, got = await sim.put_fault(provider, **body)
    assert got_status == status and needle in got["error"]
    for name in ("anthropic", "ollama"):
        assert (await sim.state(name))["fault"] is None


async def test_delete_faults(sim: Sim):
    await sim.put_fault("anthropic", kind="hang")
    await sim.put_fault("ollama", kind="hang")
    status, body = await sim.request("DELETE", "/sim/faults/ollama", headers=AUTH)
    assert status == 200 and body == {"provider": "ollama", "cleared": True}
    assert (await sim.state("ollama"))["fault"] is None
    assert (await sim.state("anthropic"))["fault"]["kind"] == "hang"
    status, body = await sim.request("DELETE", "/sim/faults", headers=AUTH)
    assert status == 200 and body == {"cleared": ["anthropic"]}
    assert (await sim.state("anthropic"))["fault"] is None


async def test_no_token_configured_means_open_control():
    async with running_sim(token=None) as open_sim:
        status, _ = await open_sim.put_fault("ollama", headers=None, kind="error")
        assert status == 200


async def test_two_apps_are_independent(sim: Sim):
    async with running_sim() as other:
        await sim.put_fault("anthropic", kind="overloaded")
        assert (await other.state("anthropic"))["fault"] is None
        await complete("anthropic", system="", prompt="p", settings=other.settings())
        assert (await sim.state("anthropic"))["counters"]["requests"] == 0
    assert sim.app[SIM_STATE] is not other.app[SIM_STATE]


async def test_hung_request_is_released_on_shutdown():
    # Its own session: running_sim closes its session before stopping the server, and
    # the held request must still be connected when the server shuts down.
    async with aiohttp.ClientSession() as client:
        async with running_sim() as s:
            await s.put_fault("ollama", kind="hang")
            body = {"model": "llama3.1", "messages": [], "stream": False}
            pending = asyncio.create_task(client.post(s.url + "/api/chat", json=body))

            async def hanging() -> bool:
                return (await s.state("ollama"))["counters"]["hanging"] == 1

            await eventually(hanging)
        # Leaving running_sim shut the server down; the held request ended with it.
        async with await asyncio.wait_for(pending, 2) as resp:
            assert resp.status == 503 and "shutting down" in (await resp.json())["error"]
    assert _stray_tasks() == []


async def test_logs_never_contain_keys(sim: Sim, caplog):
    caplog.set_level(logging.INFO, logger="llm_sim")
    payload = {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    await sim.request("POST", "/v1/messages", json=payload, headers=ANTHROPIC_HEADERS)
    await sim.request("POST", "/v1/messages", json=payload, headers={"Authorization": "Bearer sk-zz-99999999"})
    await sim.put_fault("ollama", kind="error")
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "llm_sim")
    assert "POST /v1/messages -> 200" in logged and "fault set: ollama error" in logged
    assert "sk-ant-test-secret" not in logged and "sk-zz" not in logged and TOKEN not in logged
