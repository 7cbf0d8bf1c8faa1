"""Any server that speaks OpenAI's Chat Completions at a base URL the user gives: vLLM,
LM Studio, llama.cpp's server, OpenRouter. Its own provider next to ``openai``, so a chain
can hold both (``chain = ["anthropic", "openai_compatible"]``) and each has its own health,
model and key.

    OPENAI_COMPATIBLE_BASE_URL  the server, e.g. http://127.0.0.1:8000/v1 (vLLM's default)
    OPENAI_COMPATIBLE_API_KEY   optional: local servers take any key, OpenRouter needs one
    providers.openai_compatible_model in mesh.toml: the model the server serves

llm-sim's OpenAI surface stands in when no base URL is set. Everything but where it is (the
request, the errors, the rate-limit headers, the raw responses) is the ``openai`` kind's.

This module is the proof of issue 26's "a new provider is one module": nothing else names it.
"""

from __future__ import annotations

from collections.abc import Mapping

from tron.common.providers.base import SIM_API_KEY, ProviderFailure, ProviderSettings, register
from tron.common.providers.openai_api import OpenAI

BASE_URL_ENV = "OPENAI_COMPATIBLE_BASE_URL"
API_KEY_ENV = "OPENAI_COMPATIBLE_API_KEY"


class OpenAICompatible(OpenAI):
    name = "openai_compatible"
    default_model = "llama3.1"  # a local model's name; the server's own list says what it serves
    model_setting = None  # configured as providers.openai_compatible_model (ProviderSettings.models)
    sim_surface = "openai"

    def endpoint(self, settings: ProviderSettings, env: Mapping[str, str]) -> tuple[str | None, str | None]:
        key = env.get(API_KEY_ENV) or "none"  # the SDK refuses an empty key; local servers ignore it
        if base := env.get(BASE_URL_ENV):
            return base, key
        if settings.sim_url:
            return settings.sim_url.rstrip("/") + "/v1", SIM_API_KEY
        raise ProviderFailure(self.name, "not_configured", retryable=False,
                              message=f"no {BASE_URL_ENV}, and no sim_url")


register(OpenAICompatible())
