"""One contract, every ``Provider`` backend: the real anthropic, ollama and openai SDKs
(against llm-sim on a loopback port; openai_compatible is the openai SDK at its own base
URL, on llm-sim's OpenAI API) and the stub answer the same way and fail the same way: a
reply with text, token counts and why it stopped, the same reply for the same prompt, and
every failure a ``ProviderFailure`` with a classified reason, its retryable flag, and what
the provider said about when to come back (retry_after, limits). A stream cut part-way (a
server that drops the connection) is ``stream_cut``, not a failure to connect."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from tron.common.providers import (
    LIMIT_KEYS,
    OutputChecks,
    ProviderFailure,
    ProviderSettings,
    SdkProvider,
    StubProvider,
    aclose_clients,
    check_reply,
    client_for,
    get,
)
from tests.integration.test_llm_sim import running_sim

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")]


class Backend:
    def __init__(self, kind: str, sim=None) -> None:
        self.kind, self.sim = kind, sim
        self.provider = StubProvider() if kind == "stub" else SdkProvider(kind)

    def settings(self):
        return self.sim.settings() if self.sim else ProviderSettings()

    async def fail_next(self, reason: str) -> None:
        """Make the next call fail the way a real service does for ``reason``."""
        if self.kind == "stub":
            self.provider.fail_with(reason, retry_after=1.5 if reason == "rate_limit_error" else None)
            return
        kind = {"overloaded_error": "overloaded", "authentication_error": "auth",
                "rate_limit_error": "rate-limit"}[reason]
        extra = {"retry_after_ms": 1500} if kind == "rate-limit" else {}
        code, _ = await self.sim.put_fault(self.kind, kind=kind, times=1, **extra)
        assert code == 200


# The real services' keys and URLs (OPENAI_COMPATIBLE_BASE_URL too) are not the tests' to use.
_ENDPOINT_VARS = [v for v in os.environ if v.startswith(("ANTHROPIC_", "OLLAMA_", "OPENAI_"))]
# Every registered provider kind, and the stub. A new kind is one entry here.
KINDS = ["anthropic", "ollama", "openai", "openai_compatible"]


def wire(kind: str) -> str:
    """The API a kind speaks (its llm-sim surface): what its headers and stream look like."""
    return "stub" if kind == "stub" else get(kind).sim_surface


@asynccontextmanager
async def started(kind: str, monkeypatch):
    for var in _ENDPOINT_VARS:
        monkeypatch.delenv(var, raising=False)
    if kind == "stub":
        yield Backend("stub")
        return
    async with running_sim() as sim:
        yield Backend(kind, sim)


# Each test takes the backends its contract applies to, so no combination is generated only
# to be skipped: the stub has no HTTP (its faults are fail_with/answer_with,
# test_provider_registry.py), and Ollama sends no rate-limit headers.
@pytest.fixture(params=[*KINDS, "stub"])
async def backend(request, monkeypatch):
    async with started(request.param, monkeypatch) as b:
        yield b


@pytest.fixture(params=KINDS)
async def sim_backend(request, monkeypatch):
    """A real SDK against llm-sim, whose faults are put over HTTP."""
    async with started(request.param, monkeypatch) as b:
        yield b


@pytest.fixture(params=[k for k in KINDS if k != "ollama"])
async def headers_backend(request, monkeypatch):
    """An SDK whose API sends rate-limit headers."""
    async with started(request.param, monkeypatch) as b:
        yield b


@pytest.mark.parametrize("stream", [False, True])
async def test_a_reply_has_text_and_counts_and_is_deterministic(backend, stream):
    first = await backend.provider.complete(system="be brief", prompt="say hello", settings=backend.settings(),
                                            stream=stream)
    again = await backend.provider.complete(system="be brief", prompt="say hello", settings=backend.settings(),
                                            stream=stream)
    assert first.text and first.text == again.text
    assert first.output_tokens > 0 and first.streamed is stream


@pytest.mark.parametrize("reason,retryable", [("overloaded_error", True), ("authentication_error", False)])
async def test_a_failure_is_classified_with_its_retryable_flag(backend, reason, retryable):
    await backend.fail_next(reason)
    with pytest.raises(ProviderFailure) as err:
        await backend.provider.complete(system="", prompt="hello", settings=backend.settings())
    assert (err.value.reason, err.value.retryable) == (reason, retryable)
    assert err.value.provider == backend.provider.name
    ok = await backend.provider.complete(system="", prompt="hello", settings=backend.settings())
    assert ok.text  # the fault was for one call only


# --------------------------------------------------------------------------- what providers say


async def test_a_reply_says_why_it_stopped_and_what_is_left(backend):
    reply = await backend.provider.complete(system="", prompt="say hello", settings=backend.settings())
    assert reply.stop_reason == "end" and reply.refusal is False
    # llm-sim may or may not send rate-limit headers on a success: whatever came is read right.
    assert set(reply.limits) <= set(LIMIT_KEYS)
    assert all(isinstance(v, float) and v >= 0 for v in reply.limits.values())


@pytest.mark.parametrize("stream", [False, True])
async def test_limits_on_a_reply_are_the_headers_it_came_with(headers_backend, stream):
    backend = headers_backend
    settings = backend.settings()
    client = client_for(backend.kind, settings)
    ask = [{"role": "user", "content": "say hello"}]
    model = get(backend.kind).model(settings)
    if wire(backend.kind) == "anthropic":
        raw = await client.messages.with_raw_response.create(model=model, max_tokens=64, messages=ask)
    else:
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=ask)
    prefix = {"anthropic": "anthropic-ratelimit-", "openai": "x-ratelimit-"}[wire(backend.kind)]
    assert any(name.lower().startswith(prefix) for name in raw.headers), f"llm-sim sent no {prefix}* headers"
    reply = await backend.provider.complete(system="", prompt="say hello", settings=settings, stream=stream)
    expected = get(backend.kind).read_limits(raw.headers, time.time())
    assert reply.limits and set(reply.limits) == set(expected)  # values move between two calls


async def test_a_rate_limit_says_when_to_come_back(backend):
    await backend.fail_next("rate_limit_error")
    with pytest.raises(ProviderFailure) as err:
        await backend.provider.complete(system="", prompt="hello", settings=backend.settings())
    failure = err.value
    assert (failure.reason, failure.retryable, failure.failure_class) == ("rate_limit_error", True, "provider")
    # llm-sim sends retry-after: 2 and retry-after-ms: 1500; the precise one wins. Ollama's
    # ResponseError carries no headers, so Ollama never says.
    assert failure.retry_after == (None if backend.kind == "ollama" else 1.5)
    assert failure.to_dict()["retry_after"] == failure.retry_after
    assert set(failure.limits) <= set(LIMIT_KEYS)
    headers = getattr(getattr(failure.__cause__, "response", None), "headers", {})
    prefix = {"anthropic": "anthropic-ratelimit-", "openai": "x-ratelimit-"}.get(wire(backend.kind))
    if prefix and any(name.lower().startswith(prefix) for name in headers):
        expected = get(backend.kind).read_limits(headers, time.time())
        assert failure.limits == pytest.approx(expected, abs=0.5) and expected  # resets tick on
        assert failure.limits.get("requests_remaining", 0) == 0 or failure.limits.get("tokens_remaining") == 0


# --------------------------------------------------------------------------- a stream cut part-way

# The first bytes of a streamed answer, as each API sends them.
_FIRST_BYTES = {
    "anthropic": ("/v1/messages", "text/event-stream",
                  b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
                  b'"role":"assistant","model":"m","content":[],"stop_reason":null,"stop_sequence":null,'
                  b'"usage":{"input_tokens":1,"output_tokens":0}}}\n\n'),
    "openai": ("/v1/chat/completions", "text/event-stream",
               b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
               b'"choices":[{"index":0,"delta":{"content":"hel"},"finish_reason":null}]}\n\n'),
    "ollama": ("/api/chat", "application/x-ndjson",
               b'{"model":"m","created_at":"2025-01-01T00:00:00Z","message":{"role":"assistant","content":"hel"},'
               b'"done":false}\n'),
}
_CUT_HEADERS = {"anthropic-ratelimit-requests-remaining": "41", "x-ratelimit-remaining-requests": "41"}


@asynccontextmanager
async def cutting_server(provider: str):
    """A server that starts a streamed answer, then drops the connection."""
    path, content_type, first = _FIRST_BYTES[wire(provider)]

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": content_type, **_CUT_HEADERS})
        await response.prepare(request)
        await response.write(first)
        await asyncio.sleep(0.05)  # the client has the first bytes
        request.transport.close()
        return response

    app = web.Application()
    app.router.add_post(path, answer)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await aclose_clients()
        await runner.cleanup()


@pytest.mark.parametrize("provider", KINDS)
async def test_a_stream_cut_part_way_is_not_a_failure_to_connect(provider, monkeypatch):
    for var in _ENDPOINT_VARS:
        monkeypatch.delenv(var, raising=False)
    async with cutting_server(provider) as url:
        settings = ProviderSettings(sim_url=url, timeout_s=5.0)
        with pytest.raises(ProviderFailure) as err:
            await SdkProvider(provider).complete(system="", prompt="hello", settings=settings, stream=True)
    failure = err.value
    assert (failure.reason, failure.midstream, failure.retryable, failure.failure_class) == (
        "stream_cut", True, True, "provider")
    # The answer had started: its headers were read, and stay on the failure.
    assert failure.limits == ({} if provider == "ollama" else {"requests_remaining": 41.0})

    with socket.socket() as closed:  # bound, never listening: nothing is ever sent back
        closed.bind(("127.0.0.1", 0))
        settings = ProviderSettings(sim_url=f"http://127.0.0.1:{closed.getsockname()[1]}", timeout_s=5.0)
        with pytest.raises(ProviderFailure) as err:
            await SdkProvider(provider).complete(system="", prompt="hello", settings=settings, stream=True)
        await aclose_clients()
    assert (err.value.reason, err.value.midstream) == ("connection_error", False)


# --------------------------------------------------------------------------- llm-sim's other bad days
# Fault kinds put on llm-sim over HTTP (usage-limit, cut, and the broken 200s): the stub's own
# faults are tested in test_provider_registry.py.


async def _sim_fault(backend, kind: str, **body) -> None:
    code, answer = await backend.sim.put_fault(backend.kind, kind=kind, times=1, **body)
    assert code == 200, answer


async def test_a_usage_limit_is_told_from_a_rate_limit(sim_backend):
    backend = sim_backend
    await _sim_fault(backend, "usage-limit", retry_after_ms=7_200_000)
    with pytest.raises(ProviderFailure) as err:
        await backend.provider.complete(system="", prompt="hello", settings=backend.settings())
    assert (err.value.reason, err.value.retryable, err.value.failure_class) == ("usage_limit", True, "provider")
    if backend.kind != "ollama":
        assert err.value.retry_after == 7200.0  # two hours, kept as given


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_cut_part_way_by_llm_sim(sim_backend, stream):
    backend = sim_backend
    await _sim_fault(backend, "cut")
    with pytest.raises(ProviderFailure) as err:
        await backend.provider.complete(system="", prompt="say hello", settings=backend.settings(), stream=stream)
    assert (err.value.reason, err.value.midstream, err.value.failure_class) == ("stream_cut", True, "provider")


@pytest.mark.parametrize("kind,reason", [("empty", "empty_answer"), ("max-tokens", "max_tokens"),
                                         ("refusal", "refusal")])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_broken_200_fails_its_check(sim_backend, kind, reason, stream):
    backend = sim_backend
    await _sim_fault(backend, kind)
    reply = await backend.provider.complete(system="", prompt="say hello", settings=backend.settings(),
                                            stream=stream)
    if backend.kind == "ollama" and kind == "refusal":
        assert check_reply(reply, OutputChecks(), complete=True) is None  # Ollama has no refusal signal
        return
    failure = check_reply(reply, OutputChecks(), complete=True)
    assert failure is not None and (failure.reason, failure.provider) == (reason, backend.kind)


def test_every_registered_kind_is_under_contract():
    from tron.common.providers import names

    assert KINDS == list(names())
