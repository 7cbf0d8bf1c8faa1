"""The registry of provider kinds: everything else is derived from it, a new provider is one
module, and the Provider interface's stub and factory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tron.common.providers as providers
from tron.common.providers import (
    PROVIDERS,
    SDKS,
    LLMReply,
    ProviderFailure,
    ProviderKind,
    ProviderSettings,
    SdkProvider,
    StubProvider,
    ToolCall,
    classify,
    complete,
    endpoint_for,
    get,
    names,
    preload_modules,
    provider_factory,
    provider_for,
    register,
    sdk_of,
)
from tron.common.providers.base import registered

REPO = Path(__file__).resolve().parents[2]


def test_providers_and_sdks_come_from_the_registry():
    assert PROVIDERS == names() == ("anthropic", "ollama", "openai", "openai_compatible")
    assert SDKS == ("anthropic", "ollama", "openai")  # openai_compatible is the openai SDK
    assert [get(n).name for n in PROVIDERS] == list(PROVIDERS)


def test_every_kind_has_a_model_and_config_names_it_the_same_way():
    from tron.common.config import ProvidersConfig

    for name in PROVIDERS:
        kind = get(name)
        assert kind.model(ProviderSettings()) == kind.default_model == ProvidersConfig().model_of(name)
        assert kind.model(ProviderSettings(models={name: "m-1"})) == "m-1"
        assert ProvidersConfig.model_validate({f"{name}_model": "m-2"}).model_of(name) == "m-2"


def test_config_and_request_bodies_take_the_registered_providers():
    # tron.common.models.Provider is what config validates `providers.chain` against: the registry.
    from pydantic import TypeAdapter, ValidationError

    from tron.common.models import Provider

    check = TypeAdapter(Provider)
    assert [check.validate_python(name) for name in PROVIDERS] == list(PROVIDERS)
    with pytest.raises(ValidationError, match="unknown provider 'vllm'; expected one of anthropic, ollama, openai"):
        check.validate_python("vllm")


def test_a_new_kind_is_known_to_config_and_the_cli_without_another_edit():
    from pydantic import TypeAdapter

    from tron.common.config import ProvidersConfig
    from tron.common.models import Provider
    from tron.scripts.cli_args import PROVIDERS
    from tron.scripts.tron import build_parser

    assert "anthropic" in PROVIDERS and "echo" not in PROVIDERS  # read before, as another test or command may
    with registered(Echo()):
        assert "echo" in PROVIDERS
        assert TypeAdapter(Provider).validate_python("echo") == "echo"
        config = ProvidersConfig.model_validate({"chain": ["anthropic", "echo"], "echo_model": "loud"})
        assert config.model_of("echo") == "loud"
        args = build_parser().parse_args(["sim", "fault", "echo", "overloaded"])
        assert args.provider == "echo" and args.after == 0
        assert build_parser().parse_args(["sim", "fault", "echo", "hang", "--after", "1"]).after == 1
    with pytest.raises(ValueError, match="unknown provider 'echo'"):
        ProvidersConfig.model_validate({"chain": ["anthropic", "echo"]})


def test_unknown_provider_is_refused_everywhere():
    for call in (lambda: get("bogus"), lambda: SdkProvider("bogus"),
                 lambda: endpoint_for("bogus", ProviderSettings(sim_url="http://x"), env={})):
        with pytest.raises(ValueError, match="unknown provider 'bogus'; expected one of"):
            call()


def test_sdks_and_preloads():
    assert sdk_of(["openai", "ollama"]) == {"openai", "ollama"}
    assert preload_modules(["openai"]) == ["openai", "openai.resources"]
    assert preload_modules(["ollama", "anthropic"]) == ["anthropic", "ollama"]
    assert preload_modules([]) == []


def test_importing_the_package_loads_no_sdk():
    # The SDKs cost ~2 s to import (jsonschema too is only for callers that check tools).
    heavy = ("anthropic", "ollama", "openai", "httpx", "httpx2", "jsonschema")
    code = ("import sys, tron.common.providers, tron.common.providers.checks, tron.common.providers.headers; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- a new kind

class EchoError(Exception):
    def __init__(self, status: int, retry: str | None = None) -> None:
        super().__init__(f"echo failed with {status}")
        self.status, self.headers = status, {"retry-after": retry} if retry else {}


class EchoClient:
    def __init__(self, base_url: str | None) -> None:
        self.base_url, self.fail = base_url, None

    async def close(self) -> None:
        pass


class Echo(ProviderKind):
    """A provider in one class: what a new module defines."""

    name = "echo"
    sdk = "json"  # any importable module: a real kind names its SDK
    default_model = "llama3.1"
    sim_surface = "ollama"

    def endpoint(self, settings, env):
        return env.get("ECHO_URL") or settings.sim_url, None

    def build_client(self, base_url, api_key, timeout_s):
        return EchoClient(base_url)

    async def complete(self, client, system, prompt, settings, stream):
        if client.fail:
            raise client.fail
        return LLMReply(provider=self.name, model=self.model(settings), text=prompt.upper(), input_tokens=1,
                        output_tokens=1, streamed=stream, stop_reason="end")

    def classify_status(self, exc, provider, now):
        if not isinstance(exc, EchoError):
            return None
        from tron.common.providers.headers import retry_after
        from tron.common.providers.base import status_reason

        return ProviderFailure(provider, status_reason(exc.status), status=exc.status,
                               retry_after=retry_after(exc.headers, now))

    async def _fail(self):
        raise ConnectionRefusedError

    def warm_up_call(self, url):
        return self._fail()

    def reply_of(self, response: Any) -> LLMReply:
        return LLMReply(provider=self.name, model="m", text=str(response), input_tokens=0, output_tokens=0,
                        streamed=False)

    def tool_calls(self, response):
        return [ToolCall("shout", {"text": 1})]

    def tool_schemas(self, tools):
        return {"shout": {"type": "object", "properties": {"text": {"type": "string"}}}}


async def test_a_new_kind_is_one_class_and_a_register_call():
    settings = ProviderSettings(sim_url="http://127.0.0.1:9")
    with registered(Echo()):
        assert "echo" in names()
        reply = await SdkProvider("echo").complete(system="", prompt="hi", settings=settings)
        assert (reply.text, reply.model) == ("HI", "llama3.1")
        failure = classify(EchoError(429, retry="4"), "echo")
        assert (failure.reason, failure.retry_after) == ("rate_limit_error", 4.0)
        from tron.common.providers.client import client_for

        client_for("echo", settings).fail = EchoError(503)
        with pytest.raises(ProviderFailure) as err:
            await complete("echo", system="", prompt="hi", settings=settings)
        assert (err.value.reason, err.value.status) == ("api_error", 503)
        assert providers.check_tool_calls("echo", None, None).reason == "invalid_tool_arguments"
        await providers.aclose_clients()
    assert "echo" not in names()


def test_a_kind_is_checked_when_registered():
    with pytest.raises(ValueError, match="registered twice"):
        register(get("anthropic"))

    class NoModel(Echo):
        name = "nomodel"
        model_setting = "nomodel_model"

    with pytest.raises(ValueError, match="ProviderSettings has no field 'nomodel_model'"):
        register(NoModel())

    class BadName(Echo):
        name = "Echo-2"

    with pytest.raises(ValueError, match="lower-case letters, digits and _ only"):
        register(BadName())

    class NoSim(Echo):
        name, sim_surface = "nosim", "grpc"

    with pytest.raises(ValueError, match="sim_surface 'grpc' is not one of"):
        register(NoSim())

    class Half(ProviderKind):
        name, sdk, default_model, sim_surface = "half", "json", "m", "ollama"

    with pytest.raises(TypeError, match="abstract"):
        Half()


# --------------------------------------------------------------------------- stub and factory


async def test_provider_factory_swaps_what_provider_for_builds():
    stub = StubProvider("anthropic")
    assert isinstance(provider_for("anthropic"), SdkProvider)
    with provider_factory(lambda name: stub):
        assert provider_for("anthropic") is stub and provider_for("ollama") is stub
    assert isinstance(provider_for("anthropic"), SdkProvider)


async def test_stub_fails_with_what_the_provider_said_then_answers():
    stub = StubProvider("anthropic")
    stub.fail_with("rate_limit_error", retry_after=1.5, limits={"requests_remaining": 0.0})
    with pytest.raises(ProviderFailure) as err:
        await stub.complete(system="", prompt="go on", settings=ProviderSettings())
    assert (err.value.reason, err.value.retry_after, err.value.limits) == (
        "rate_limit_error", 1.5, {"requests_remaining": 0.0})
    reply = await stub.complete(system="", prompt="go on", settings=ProviderSettings())
    assert reply.text == "[stub:anthropic] go on" and reply.stop_reason == "end"
    assert stub.calls == ["go on", "go on"]


async def test_stub_answers_broken_on_demand():
    stub = StubProvider()
    stub.answer_with(text="", times=2)
    stub.answer_with(stop_reason="max_tokens")
    got = [await stub.complete(system="", prompt="p", settings=ProviderSettings()) for _ in range(4)]
    assert [(r.text, r.stop_reason) for r in got] == [
        ("", "end"), ("", "end"), ("[stub:stub] p", "max_tokens"), ("[stub:stub] p", "end")]
    with pytest.raises(TypeError, match="bogus"):
        stub.answer_with(bogus=1)
