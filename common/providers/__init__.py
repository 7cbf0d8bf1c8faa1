"""The LLM provider layer agents use: one ``complete()`` over every registered provider.

One module per provider (``anthropic_api``, ``ollama_api``, ``openai_api``, ...): each
defines a ``ProviderKind`` (base.py) and registers it. Every ``*_api`` module here is imported
below, and PROVIDERS, SDKS, config's provider names and models, the CLI's choices, llm-sim's
fault slots and the warm-up are read from the registry, so a new provider is one new module
here plus its contract-suite entry.

    base.py      ProviderFailure, LLMReply, ProviderSettings, ProviderKind, the registry
    headers.py   retry-after and rate-limit headers, pure
    failures.py  classify(): any exception to a ProviderFailure
    client.py    endpoints, the client cache, complete(), warm_up()
    backends.py  the Provider interface: SdkProvider, StubProvider, provider_for
    checks.py    answers that are 200 OK but broken, pure

The SDKs are imported lazily inside the kinds' methods: ``import anthropic`` alone takes
about 1.7 s, which would dominate an agent's cold start (and the supervisor's restart
time). Every failure leaves ``complete()`` as a ``ProviderFailure`` with a stable reason
code, so callers decide on retry and fallback from data, not from SDK exception classes.
"""

from __future__ import annotations

import importlib
import pkgutil

from tron.common.redaction import REDACTED, redact  # one implementation, re-exported
from tron.common.providers.base import (
    FAILURE_CLASSES,
    NON_RETRYABLE,
    SIM_API_KEY,
    FailureClass,
    LLMReply,
    ProviderFailure,
    ProviderKind,
    ProviderSettings,
    StopReason,
    ToolCall,
    failure_class,
    get,
    names,
    register,
)

# The built-in kinds register themselves on import, in this order (the order of PROVIDERS),
# then every other *_api module of this package, by name: a new provider is found, not listed.
from tron.common.providers import anthropic_api, ollama_api, openai_api  # noqa: E402,F401  isort: skip

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.endswith("_api")):
    importlib.import_module(f"{__name__}.{_module}")

from tron.common.providers.backends import (  # noqa: E402
    Provider,
    ProviderFactory,
    SdkProvider,
    StubProvider,
    provider_factory,
    provider_for,
)
from tron.common.providers.checks import (  # noqa: E402
    OutputChecks,
    RepeatGuard,
    check_reply,
    check_tool_calls,
    reply_of,
)
from tron.common.providers.client import (  # noqa: E402
    aclose_clients,
    client_for,
    complete,
    defer_sdks,
    endpoint_for,
    preload_modules,
    sdk_of,
    sdk_ready,
    sdk_warm,
    sdks_deferred,
    warm_up,
)
from tron.common.providers.failures import classify  # noqa: E402
from tron.common.providers.headers import LIMIT_KEYS, retry_after  # noqa: E402
from tron.common.providers.ollama_api import OLLAMA_DEFAULT_HOST  # noqa: E402

PROVIDERS: tuple[str, ...] = names()
SDKS: tuple[str, ...] = tuple(dict.fromkeys(get(name).sdk for name in PROVIDERS))

__all__ = [
    "FAILURE_CLASSES", "LIMIT_KEYS", "NON_RETRYABLE", "OLLAMA_DEFAULT_HOST", "PROVIDERS", "REDACTED", "SDKS",
    "SIM_API_KEY", "FailureClass", "LLMReply", "OutputChecks", "Provider", "ProviderFactory", "ProviderFailure",
    "ProviderKind", "ProviderSettings", "RepeatGuard", "SdkProvider", "StopReason", "StubProvider", "ToolCall",
    "aclose_clients", "check_reply", "check_tool_calls", "classify", "client_for", "complete", "defer_sdks",
    "endpoint_for", "failure_class", "get", "names", "preload_modules", "provider_factory", "provider_for", "redact",
    "register", "reply_of", "retry_after", "sdk_of", "sdk_ready", "sdk_warm", "sdks_deferred", "warm_up",
]
