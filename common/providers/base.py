"""The vocabulary of the provider layer, and the registry of provider kinds.

- A **provider kind** (``ProviderKind``) is everything Tron knows about one LLM provider:
  its SDK, where it is (``endpoint``), how to build a client, one completion, how its
  errors and rate-limit headers read, and how its raw responses read (text, stop
  reason, tool calls). One module per kind (``anthropic_api``, ``ollama_api``,
  ``openai_api``) defines one and registers it; everything else (``PROVIDERS``,
  ``SDKS``, classification, warm-up) is derived from the registry.
- A **ProviderFailure** is any failed call reduced to data: a stable ``reason`` code,
  ``retryable``, and what the provider said about when to come back (``retry_after``,
  ``limits``).
- A **failure class** says who is at fault: ``provider`` (overloaded, rate limited, 5xx,
  timeout, a cut stream, a 200 that is broken) or ``request`` (this request fails the
  same way on every retry and every provider).

Nothing here imports an SDK: ``import anthropic`` alone takes 1.7 s, which would
dominate an agent's cold start. Kinds import their SDK inside their methods.
"""

from __future__ import annotations

import abc
import contextlib
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Awaitable, Literal, NamedTuple, TypedDict

from pydantic import BaseModel, ConfigDict, Field

SIM_API_KEY = "sim-key"
SIM_SURFACES = ("anthropic", "ollama", "openai")  # the APIs llm-sim speaks (services/llm_sim)

# Reason codes. Those in NON_RETRYABLE will fail the same way on any retry.
NON_RETRYABLE = frozenset({
    "authentication_error",
    "permission_error",
    "invalid_request_error",
    "not_found_error",
    "request_too_large",
    "not_configured",
})
FAILURE_CLASSES = ("provider", "request")
FailureClass = Literal["provider", "request"]

# What every provider's stop reason is normalised to.
StopReason = Literal["end", "max_tokens", "stop_sequence", "tool_use", "refusal"]


def failure_class(reason: str) -> FailureClass:
    """``request`` when the request itself is at fault (it fails the same way on every retry
    and every provider: NON_RETRYABLE), ``provider`` for everything else a call can fail
    with (overloaded, rate or usage limited, 5xx, timeout, cut stream, broken answer)."""
    return "request" if reason in NON_RETRYABLE else "provider"


# --------------------------------------------------------------------------- data


class ProviderSettings(BaseModel):
    """What a call needs besides the prompt. Each kind reads its model from ``models`` by its
    name, else from the field its ``model_setting`` names (the built-in kinds' own fields,
    which every mesh.toml already spells), else its ``default_model``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sim_url: str | None = None  # base URL of llm_sim, e.g. "http://127.0.0.1:6190"
    models: dict[str, str] = Field(default_factory=dict)  # {provider name: model}, config's `{name}_model`
    anthropic_model: str = "claude-sonnet-4-5"
    ollama_model: str = "llama3.1"
    openai_model: str = "gpt-4o-mini"
    timeout_s: float = 30.0
    max_tokens: int = 512


class LLMReply(BaseModel):
    """One answer. ``stop_reason`` is normalised across providers (None when the provider
    did not say, or said something outside StopReason, such as Anthropic's pause_turn);
    ``limits`` are the provider's rate-limit headers on this answer (see headers.py)."""

    provider: str
    model: str
    text: str
    input_tokens: int  # billed at the input rate: cached input is counted apart, below
    output_tokens: int
    streamed: bool
    cache_read_tokens: int = 0  # input read from the provider's prompt cache
    cache_write_tokens: int = 0  # input written to it (Anthropic's cache_creation_input_tokens)
    stop_reason: StopReason | None = None
    refusal: bool = False
    limits: dict[str, float] = Field(default_factory=dict)


class Usage(TypedDict):
    """An answer's tokens, as LLMReply counts them (its keyword arguments of the same names)."""

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int


# A tool's JSON schema of its arguments as the caller gave it to the SDK: a dict, an SDK
# model of one (check_tool_calls dumps it), or None (a tool whose arguments are not checked).
ToolSchemas = dict[str, object]


def openai_usage(usage: Any) -> Usage:
    """OpenAI's usage (chat: prompt/completion tokens; Responses: input/output tokens), with
    its cached input taken out of the input: the tokens as LLMReply counts them."""
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0}
    prompt = field_of(usage, "prompt_tokens", None)
    details = field_of(usage, "prompt_tokens_details" if prompt is not None else "input_tokens_details", None)
    cached = (field_of(details, "cached_tokens", 0) or 0) if details is not None else 0
    total_in = (prompt if prompt is not None else field_of(usage, "input_tokens", 0)) or 0
    out = field_of(usage, "completion_tokens" if prompt is not None else "output_tokens", 0) or 0
    return {"input_tokens": max(0, total_in - cached), "output_tokens": out, "cache_read_tokens": cached,
            "cache_write_tokens": 0}  # OpenAI bills no cache writes


def anthropic_usage(usage: Any) -> Usage:
    """Anthropic's usage: its input_tokens already leave the cache out."""
    return {"input_tokens": field_of(usage, "input_tokens", 0) or 0,
            "output_tokens": field_of(usage, "output_tokens", 0) or 0,
            "cache_read_tokens": field_of(usage, "cache_read_input_tokens", 0) or 0,
            "cache_write_tokens": field_of(usage, "cache_creation_input_tokens", 0) or 0}


class ToolCall(NamedTuple):
    """One tool call of a response: ``arguments`` as the SDK gives them (a dict, or the
    JSON text OpenAI sends, which may not even be JSON)."""

    name: str
    arguments: Any


class ProviderFailure(Exception):
    """A provider call that failed, reduced to what retry, fallback and provider health need.

    retry_after: seconds the provider asked us to wait (``retry-after-ms``/``retry-after``),
      None when it did not say.
    limits: its rate-limit headers on the failing response (headers.py), {} when none.
    midstream: the failure came after the answer had started (a 200 stream).
    """

    def __init__(
        self,
        provider: str,
        reason: str,
        *,
        retryable: bool | None = None,
        status: int | None = None,
        message: str = "",
        midstream: bool = False,
        retry_after: float | None = None,
        limits: Mapping[str, float] | None = None,
    ) -> None:
        self.provider = provider
        self.reason = reason
        self.retryable = reason not in NON_RETRYABLE if retryable is None else retryable
        self.status = status
        self.message = message
        self.midstream = midstream
        self.retry_after = retry_after
        self.limits = dict(limits or {})
        super().__init__(str(self))

    @property
    def failure_class(self) -> FailureClass:
        return failure_class(self.reason)

    def __str__(self) -> str:
        status = f" [{self.status}]" if self.status is not None else ""
        where = " mid-stream" if self.midstream else ""
        return f"{self.provider}: {self.reason}{status}{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "reason": self.reason,
            "retryable": self.retryable,
            "failure_class": self.failure_class,
            "status": self.status,
            "message": self.message,
            "midstream": self.midstream,
            "retry_after": self.retry_after,
            "limits": dict(self.limits),
        }


# --------------------------------------------------------------------------- helpers kinds share


def instance_of(exc: BaseException, module: str, name: str) -> bool:
    """isinstance against a class of a module, without importing the module.

    An exception cannot be an instance of a class whose module was never imported, so
    looking in sys.modules keeps classification from paying for `import anthropic`.
    """
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(exc, cls)


_STATUS_REASONS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def status_reason(status: int) -> str:
    """The reason an HTTP status means when the body names nothing better."""
    if status in _STATUS_REASONS:
        return _STATUS_REASONS[status]
    return "api_error" if status >= 500 else "invalid_request_error"


# A 429 for the account's spend or usage limit rather than a per-minute rate: it lasts
# (hours, a month), so it is told apart by its message where no code says it.
_USAGE_LIMIT = re.compile(r"usage limit|quota|spend limit|credit balance", re.IGNORECASE)


def says_usage_limit(message: str) -> bool:
    return bool(_USAGE_LIMIT.search(message))


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    """``obj.name`` for SDK objects, ``obj[name]`` for the plain dicts callers may pass."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


# --------------------------------------------------------------------------- the kind


class ProviderKind(abc.ABC):
    """One LLM provider. Subclass, fill in every abstract method, and ``register(Kind())``
    in its own module (imported by ``common/providers/__init__.py``).

    name: the provider's name in config (``providers.chain``) and in every failure.
    sdk: the module its SDK is (imported lazily, only inside methods).
    preload: modules beyond ``sdk`` a process that uses it imports ahead (warm_up).
    default_model: its model when config names none (``providers.{name}_model``).
    model_setting: a ProviderSettings field naming its model (the built-in kinds only; a new
      kind leaves it None and is configured through ``ProviderSettings.models``).
    sim_surface: the API of llm-sim that stands in for it ("anthropic", "ollama", "openai"),
      and so which of llm-sim's fault slots ``tron sim fault NAME`` sets.
    """

    name: str
    sdk: str
    preload: tuple[str, ...] = ()
    default_model: str
    model_setting: str | None = None
    sim_surface: str

    def model(self, settings: ProviderSettings) -> str:
        if self.name in settings.models:
            return settings.models[self.name]
        if self.model_setting is None:
            return self.default_model
        model = getattr(settings, self.model_setting)
        if not isinstance(model, str):  # register() checked the field exists, not that it names a model
            raise TypeError(f"{self.name}: ProviderSettings.{self.model_setting} is not a model name")
        return model

    @abc.abstractmethod
    def endpoint(self, settings: ProviderSettings, env: Mapping[str, str]) -> tuple[str | None, str | None]:
        """(base_url, api_key): the real service when the environment names it, else llm-sim.
        Raises ProviderFailure(reason="not_configured") when there is neither."""

    @abc.abstractmethod
    def build_client(self, base_url: str | None, api_key: str | None, timeout_s: float) -> Any:
        """The SDK's async client: an explicit timeout, and the SDK's own retries off (the
        ladder is the one retry authority)."""

    @abc.abstractmethod
    async def complete(self, client: Any, system: str, prompt: str, settings: ProviderSettings,
                       stream: bool) -> LLMReply:
        """One completion through ``client``, with the rate-limit headers of its response in
        ``limits``. A failure after the stream started raises ProviderFailure (midstream)."""

    @abc.abstractmethod
    def classify_status(self, exc: BaseException, provider: str, now: float) -> ProviderFailure | None:
        """This SDK's own status error as a ProviderFailure (reason, retry_after, limits), or
        None when ``exc`` is not one of this SDK's status errors. ``now``: wall-clock seconds,
        for reset times the provider gives as dates."""

    def read_limits(self, headers: Mapping[str, str], now: float) -> dict[str, float]:
        """The provider's rate-limit headers as headers.LIMIT_KEYS (only those present)."""
        return {}

    @abc.abstractmethod
    def warm_up_call(self, url: str) -> Awaitable[Any]:
        """One request through the SDK to ``url`` (where nothing listens): what the SDK imports
        on its first request gets imported by it."""

    @abc.abstractmethod
    def reply_of(self, response: Any) -> LLMReply:
        """A non-streamed raw SDK response (as ``call_llm`` gets it) read as an LLMReply."""

    @abc.abstractmethod
    def tool_calls(self, response: Any) -> list[ToolCall]:
        """The tool calls of a raw SDK response, in order."""

    @abc.abstractmethod
    def tool_schemas(self, tools: Any) -> ToolSchemas:
        """{tool name: JSON schema of its arguments} of ``tools`` as the caller passed them to
        the SDK (None: a tool whose schema is not given, whose arguments are not checked)."""


# --------------------------------------------------------------------------- the registry

_KINDS: dict[str, ProviderKind] = {}


def register(kind: ProviderKind) -> ProviderKind:
    """Add a kind; a second kind of the same name is a programming error."""
    for attr in ("name", "sdk", "default_model", "sim_surface"):
        if not isinstance(getattr(kind, attr, None), str):
            raise TypeError(f"{type(kind).__name__}.{attr} must be a string")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", kind.name):  # it is also a config key, `{name}_model`
        raise ValueError(f"provider name {kind.name!r}: lower-case letters, digits and _ only")
    if kind.name in _KINDS:
        raise ValueError(f"provider {kind.name!r} is registered twice "
                         f"({type(_KINDS[kind.name]).__name__}, {type(kind).__name__})")
    if kind.sim_surface not in SIM_SURFACES:
        raise ValueError(f"provider {kind.name!r}: sim_surface {kind.sim_surface!r} is not one of {SIM_SURFACES}")
    if kind.model_setting is not None and kind.model_setting not in ProviderSettings.model_fields:
        raise ValueError(f"provider {kind.name!r}: ProviderSettings has no field {kind.model_setting!r}")
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> ProviderKind:
    """The kind called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; expected one of {names()}") from None


def names() -> tuple[str, ...]:
    """Every registered provider, in registration order."""
    return tuple(_KINDS)


def kinds() -> tuple[ProviderKind, ...]:
    return tuple(_KINDS.values())


@contextlib.contextmanager
def registered(kind: ProviderKind) -> Iterator[ProviderKind]:
    """``kind`` registered for the duration of a with block (tests of the registry)."""
    register(kind)
    try:
        yield kind
    finally:
        del _KINDS[kind.name]
