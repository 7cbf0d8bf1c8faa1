"""One contract, every ``Provider`` backend: the real anthropic and ollama SDKs (against
llm-sim on a loopback port) and the stub answer the same way and fail the same way: a
reply with text and token counts, the same reply for the same prompt, and every failure
a ``ProviderFailure`` with a classified reason and its retryable flag."""

from __future__ import annotations

import pytest

from common.providers import ProviderFailure, SdkProvider, StubProvider
from tests.integration.test_llm_sim import running_sim

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")]


class Backend:
    def __init__(self, kind: str, sim=None) -> None:
        self.kind, self.sim = kind, sim
        self.provider = StubProvider() if kind == "stub" else SdkProvider(kind)

    def settings(self):
        from common.providers import ProviderSettings

        return self.sim.settings() if self.sim else ProviderSettings()

    async def fail_next(self, reason: str) -> None:
        """Make the next call fail the way a real service does for ``reason``."""
        if self.kind == "stub":
            self.provider.fail_with(reason)
            return
        kind = {"overloaded_error": "overloaded", "authentication_error": "auth"}[reason]
        code, _ = await self.sim.put_fault(self.kind, kind=kind, times=1)
        assert code == 200


@pytest.fixture(params=["anthropic", "ollama", "openai", "stub"])
async def backend(request, monkeypatch):
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OLLAMA_HOST", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    if request.param == "stub":
        yield Backend("stub")
        return
    async with running_sim() as sim:
        yield Backend(request.param, sim)


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
