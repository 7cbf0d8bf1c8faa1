"""The calls of the anthropic and ollama SDKs' own example scripts (their repositories'
examples/), made through the real clients against the sim: model management (pull,
create, copy, delete), thinking, logprobs, the legacy Text Completions API and the
Message Batches API. Each test names the examples it stands for."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import ollama
import pytest

from tests.integration.test_llm_sim import Sim, _stray_tasks, running_sim
from tests.integration.test_llm_sim_fidelity import CLAUDE, KEY, claude, local

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning"),
]

HELLO = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture
async def sim(monkeypatch) -> AsyncIterator[Sim]:
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "OLLAMA_HOST",
                "TRON_SIM_OLLAMA_MODELS"):
        monkeypatch.delenv(var, raising=False)
    async with running_sim() as s:
        yield s
    assert _stray_tasks() == []


# --------------------------------------------------------------------------- ollama


async def test_pull_streams_progress_and_lists_the_model(sim: Sim):
    """pull.py, ps.py: progress as Ollama streams it, then the model is there."""
    async with local(sim) as client:
        assert "gemma3:latest" not in [m.model for m in (await client.list()).models]
        parts = [p async for p in await client.pull("gemma3", stream=True)]
        statuses = [p.status for p in parts]
        assert statuses[0] == "pulling manifest" and statuses[-3:] == [
            "verifying sha256 digest", "writing manifest", "success"]
        blobs = [p for p in parts if p.digest]
        assert blobs and all(p.status == f"pulling {p.digest[7:19]}" and p.total for p in blobs)
        assert any(p.completed == p.total for p in blobs)
        assert "gemma3:latest" in [m.model for m in (await client.list()).models]
        assert "vision" in (await client.show("gemma3")).capabilities
        reply = await client.chat("gemma3", messages=HELLO)
        assert reply.message.content and reply.done
        assert [m.model for m in (await client.ps()).models] == ["gemma3:latest"]
        assert (await client.pull("gemma3")).status == "success"  # stream=False: one object
        with pytest.raises(ollama.ResponseError) as err:
            await client.pull("Not A Name!")
        assert err.value.status_code == 400 and err.value.error == "invalid model name"


async def test_create_copy_delete(sim: Sim):
    """create.py, and the client's copy/delete: the created model keeps its SYSTEM prompt."""
    async with local(sim) as client:
        done = await client.create(model="my-assistant", from_="llama3.1", system="You are mario.", stream=False)
        assert done.status == "success"
        statuses = [p.status async for p in await client.create(model="other", from_="llama3.1", stream=True)]
        assert statuses[-2:] == ["writing manifest", "success"]
        assert any(s.startswith("using existing layer sha256:") for s in statuses)
        shown = await client.show("my-assistant")
        assert shown.details.parent_model == "llama3.1:latest" and "You are mario." in shown.modelfile
        names = [m.model for m in (await client.list()).models]
        assert "my-assistant:latest" in names and "llama3.1:latest" in names
        plain = await client.chat("llama3.1", messages=HELLO)
        mario = await client.chat("my-assistant", messages=HELLO)
        assert mario.message.content != plain.message.content  # its system prompt took part

        assert (await client.copy("my-assistant", "mario-backup")).status == "success"
        listed = {m.model: m.digest for m in (await client.list()).models}
        assert listed["mario-backup:latest"] == listed["my-assistant:latest"]
        assert (await client.delete("mario-backup")).status == "success"
        assert "mario-backup:latest" not in [m.model for m in (await client.list()).models]
        for call in (client.delete("mario-backup"), client.copy("nowhere", "x"),
                     client.chat("mario-backup", messages=HELLO)):
            with pytest.raises(ollama.ResponseError) as err:
                await call
            assert err.value.status_code == 404
        with pytest.raises(ollama.ResponseError) as err:
            await client.create(model="nothing-from")
        assert err.value.status_code == 400


async def test_thinking_chat_and_generate(sim: Sim):
    """thinking.py, thinking-generate.py, thinking-levels.py, multi-tool.py."""
    async with local(sim) as client:
        await client.pull("deepseek-r1")
        await client.pull("gpt-oss:20b")
        chat = await client.chat("deepseek-r1", messages=HELLO, think=True)
        assert chat.message.thinking and chat.message.content
        assert (await client.chat("deepseek-r1", messages=HELLO)).message.thinking  # thinks unless told not to
        assert (await client.chat("deepseek-r1", messages=HELLO, think=False)).message.thinking is None
        gen = await client.generate("deepseek-r1", "why is the sky blue", think=True)
        assert gen.thinking and gen.response
        for level in ("low", "medium", "high"):
            assert (await client.chat("gpt-oss:20b", messages=HELLO, think=level)).message.thinking
        parts = [p async for p in await client.chat("deepseek-r1", messages=HELLO, think=True, stream=True)]
        thinking = "".join(p.message.thinking or "" for p in parts)
        assert thinking == chat.message.thinking
        first_content = next(i for i, p in enumerate(parts) if p.message.content)
        assert all(not p.message.thinking for p in parts[first_content:])  # thinking comes first
        with pytest.raises(ollama.ResponseError) as err:
            await client.chat("llama3.1", messages=HELLO, think=True)
        assert err.value.status_code == 400 and err.value.error == '"llama3.1" does not support thinking'


async def test_logprobs(sim: Sim):
    """chat-logprobs.py, generate-logprobs.py."""
    async with local(sim) as client:
        chat = await client.chat("llama3.1", messages=HELLO, logprobs=True, top_logprobs=3)
        assert "".join(e.token for e in chat.logprobs) == chat.message.content
        assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in chat.logprobs)
        gen = await client.generate("llama3.1", "hi! be concise.", logprobs=True)
        assert "".join(e.token for e in gen.logprobs) == gen.response and gen.logprobs[0].logprob <= 0
        assert (await client.chat("llama3.1", messages=HELLO)).logprobs is None
        with pytest.raises(ollama.ResponseError) as err:
            await client.chat("llama3.1", messages=HELLO, logprobs=True, top_logprobs=21)
        assert err.value.status_code == 400 and "top_logprobs" in err.value.error


# --------------------------------------------------------------------------- anthropic


async def test_extended_thinking(sim: Sim):
    """thinking.py, thinking_stream.py."""
    async with claude(sim) as client:
        thinking = {"type": "enabled", "budget_tokens": 1600}
        msg = await client.messages.create(model=CLAUDE, max_tokens=3200, thinking=thinking,
                                           messages=[{"role": "user", "content": "Create a haiku."}])
        assert [b.type for b in msg.content] == ["thinking", "text"]
        assert msg.content[0].thinking and msg.content[0].signature
        async with client.messages.stream(model=CLAUDE, max_tokens=3200, thinking=thinking,
                                          messages=[{"role": "user", "content": "Create a haiku."}]) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_message()
        assert "thinking" in kinds and "signature" in kinds and kinds.index("thinking") < kinds.index("text")
        assert final.content[0].thinking == msg.content[0].thinking
        assert final.content[0].signature == msg.content[0].signature
        # The thinking block goes back unchanged in the next turn.
        again = await client.messages.create(model=CLAUDE, max_tokens=3200, thinking=thinking, messages=[
            {"role": "user", "content": "Create a haiku."}, {"role": "assistant", "content": msg.content},
            {"role": "user", "content": "Another."}])
        assert again.content[-1].type == "text"
        for bad in ({"type": "enabled", "budget_tokens": 100}, {"type": "enabled", "budget_tokens": 4000}):
            with pytest.raises(anthropic.BadRequestError) as err:
                await client.messages.create(model=CLAUDE, max_tokens=3200, thinking=bad, messages=HELLO)
            assert err.value.body["error"]["type"] == "invalid_request_error"


async def test_text_completions(sim: Sim):
    """text_completions_demo_*.py, text_completions_streaming.py (client.completions, which
    SDK 0.x has): POST /v1/complete, raw here since anthropic 2 has no completions."""
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    prompt = "\n\nHuman: how does a court case get to the Supreme Court?\n\nAssistant:"
    status, body = await sim.request("POST", "/v1/complete", headers=headers, json={
        "model": "claude-2.1", "prompt": prompt, "max_tokens_to_sample": 300})
    assert status == 200 and body["type"] == "completion" and body["completion"].startswith(" ")
    assert body["stop_reason"] == "stop_sequence" and body["stop"] == "\n\nHuman:"
    status, body = await sim.request("POST", "/v1/complete", headers=headers, json={
        "model": "claude-2.1", "prompt": prompt, "max_tokens_to_sample": 3})
    assert body["stop_reason"] == "max_tokens" and len(body["completion"].split()) == 3
    async with sim.http.post(sim.url + "/v1/complete", headers=headers, json={
            "model": "claude-2.1", "prompt": prompt, "max_tokens_to_sample": 300, "stream": True}) as resp:
        raw = (await resp.read()).decode()
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    completions = [e for e in events if e["type"] == "completion"]
    assert completions[-1]["stop_reason"] == "stop_sequence"
    assert all(e["stop_reason"] is None for e in completions[:-1]) and "event: ping" in raw
    status, body = await sim.request("POST", "/v1/complete", headers=headers, json={
        "model": "claude-2.1", "prompt": "no turns", "max_tokens_to_sample": 10})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


async def test_message_batches(sim: Sim):
    """batch_results.py: create, retrieve, list, results (JSONL), delete."""
    params = {"model": CLAUDE, "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]}
    async with claude(sim) as client:
        batch = await client.messages.batches.create(requests=[
            {"custom_id": "ok", "params": params},
            {"custom_id": "bad-model", "params": params | {"model": "not-a-model"}}])
        assert batch.processing_status == "in_progress" and batch.request_counts.processing == 2
        assert batch.results_url is None
        got = await client.messages.batches.retrieve(batch.id)
        assert got.processing_status == "ended" and got.ended_at is not None
        assert (got.request_counts.succeeded, got.request_counts.errored) == (1, 1)
        assert got.results_url.startswith(sim.url)
        results = {r.custom_id: r.result async for r in await client.messages.batches.results(batch.id)}
        assert results["ok"].type == "succeeded" and results["ok"].message.content[0].text
        assert results["bad-model"].type == "errored"
        assert results["bad-model"].error.error.type == "not_found_error"
        assert [b.id async for b in client.messages.batches.list()] == [batch.id]

        second = await client.messages.batches.create(requests=[{"custom_id": "c", "params": params}])
        assert (await client.messages.batches.cancel(second.id)).processing_status == "canceling"
        assert [r.result.type async for r in await client.messages.batches.results(second.id)] == ["canceled"]

        assert (await client.messages.batches.delete(batch.id)).type == "message_batch_deleted"
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.batches.retrieve(batch.id)
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.batches.create(requests=[{"custom_id": "same", "params": params},
                                                           {"custom_id": "same", "params": params}])
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.batches.create(requests=[{"custom_id": "x", "params": {"model": CLAUDE}}])
