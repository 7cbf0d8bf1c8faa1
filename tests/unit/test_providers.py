"""Unit tests of tron.common.providers: classify() on real SDK exceptions, endpoints, redaction.
(Headers, retry_after and limits: test_provider_failures.py and test_provider_headers.py.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import anthropic
import httpx
import httpx2  # the HTTP library anthropic 2.x is built on (not httpx)
import ollama
import pytest
from pydantic import ValidationError

from tron.common.providers import (
    ProviderFailure,
    ProviderSettings,
    classify,
    endpoint_for,
    redact,
)

_REQ2 = httpx2.Request("POST", "https://api.anthropic.com/v1/messages")
_REQ = httpx.Request("POST", "http://127.0.0.1:11434/api/chat")


def _anthropic_body(etype: str, message: str = "boom") -> dict:
    return {"type": "error", "error": {"type": etype, "message": message}}


def _anthropic_status(cls: type, status: int, etype: str | None, message: str = "boom"):
    """A real anthropic status error, the way the SDK builds it from a response."""
    body = _anthropic_body(etype, message) if etype else None
    response = httpx2.Response(status, request=_REQ2, json=body, headers={"request-id": "req_1"})
    return cls(f"Error code: {status} - {body}", response=response, body=body)


# (exception, provider, reason, retryable, status, midstream)
CASES = [
    (_anthropic_status(anthropic.OverloadedError, 529, "overloaded_error"), "anthropic",
     "overloaded_error", True, 529, False),
    # The status decides when the body has no type.
    (_anthropic_status(anthropic.OverloadedError, 529, None), "anthropic",
     "overloaded_error", True, 529, False),
    (_anthropic_status(anthropic.RateLimitError, 429, "rate_limit_error"), "anthropic",
     "rate_limit_error", True, 429, False),
    (_anthropic_status(anthropic.InternalServerError, 500, "api_error"), "anthropic",
     "api_error", True, 500, False),
    (_anthropic_status(anthropic.InternalServerError, 502, None), "anthropic",
     "api_error", True, 502, False),
    (_anthropic_status(anthropic.AuthenticationError, 401, "authentication_error"), "anthropic",
     "authentication_error", False, 401, False),
    (_anthropic_status(anthropic.PermissionDeniedError, 403, "permission_error"), "anthropic",
     "permission_error", False, 403, False),
    (_anthropic_status(anthropic.BadRequestError, 400, "invalid_request_error"), "anthropic",
     "invalid_request_error", False, 400, False),
    (_anthropic_status(anthropic.UnprocessableEntityError, 422, None), "anthropic",
     "invalid_request_error", False, 422, False),
    (_anthropic_status(anthropic.NotFoundError, 404, "not_found_error"), "anthropic",
     "not_found_error", False, 404, False),
    (_anthropic_status(anthropic.ContentTooLargeError, 413, "request_too_large"), "anthropic",
     "request_too_large", False, 413, False),
    # `event: error` inside a 200 stream: a plain APIStatusError, typed by its body.
    (_anthropic_status(anthropic.APIStatusError, 200, "overloaded_error"), "anthropic",
     "overloaded_error", True, 200, True),
    (_anthropic_status(anthropic.APIStatusError, 200, None), "anthropic",
     "stream_error", True, 200, True),
    (anthropic.APITimeoutError(request=_REQ2), "anthropic", "timeout", True, None, False),
    (anthropic.APIConnectionError(request=_REQ2), "anthropic", "connection_error", True, None, False),
    (httpx2.ReadTimeout("read timed out", request=_REQ2), "anthropic", "timeout", True, None, False),
    (httpx2.RemoteProtocolError("peer closed", request=_REQ2), "anthropic",
     "connection_error", True, None, False),
    # A body that stopped part-way: the answer had started, so the stream was cut.
    (httpx2.RemoteProtocolError("peer closed connection without sending complete message body "
                                "(incomplete chunked read)", request=_REQ2), "anthropic",
     "stream_cut", True, None, True),
    (httpx.RemoteProtocolError("peer closed connection without sending complete message body "
                               "(incomplete chunked read)", request=_REQ), "ollama",
     "stream_cut", True, None, True),
    (ollama.ResponseError('{"error": "server overloaded"}', 503), "ollama",
     "overloaded_error", True, 503, False),
    (ollama.ResponseError("too many requests", 429), "ollama", "rate_limit_error", True, 429, False),
    (ollama.ResponseError("internal server error", 500), "ollama", "api_error", True, 500, False),
    (ollama.ResponseError("unauthorized", 401), "ollama", "authentication_error", False, 401, False),
    (ollama.ResponseError("forbidden", 403), "ollama", "permission_error", False, 403, False),
    (ollama.ResponseError("model 'x' not found", 404), "ollama", "not_found_error", False, 404, False),
    (ollama.ResponseError("bad", 400), "ollama", "invalid_request_error", False, 400, False),
    (ollama.ResponseError("too big", 413), "ollama", "request_too_large", False, 413, False),
    # An {"error": ...} line mid-stream: ResponseError with the default status -1.
    (ollama.ResponseError("model runner has unexpectedly stopped"), "ollama",
     "stream_error", True, None, True),
    (httpx.ReadTimeout("", request=_REQ), "ollama", "timeout", True, None, False),
    (httpx.ConnectTimeout("", request=_REQ), "ollama", "timeout", True, None, False),
    (ConnectionError("Failed to connect to Ollama."), "ollama", "connection_error", True, None, False),
    (ConnectionRefusedError(111, "refused"), "ollama", "connection_error", True, None, False),
    (httpx.ReadError("reset", request=_REQ), "ollama", "connection_error", True, None, False),
    (asyncio.TimeoutError(), "anthropic", "timeout", True, None, False),
    (ValueError("odd"), "ollama", "unexpected_error:ValueError", True, None, False),
]


@pytest.mark.parametrize(
    "exc,provider,reason,retryable,status,midstream",
    CASES,
    ids=[f"{c[1]}-{type(c[0]).__name__}-{c[2]}-{c[4]}" for c in CASES],
)
def test_classify(exc, provider, reason, retryable, status, midstream):
    failure = classify(exc, provider)
    assert isinstance(failure, ProviderFailure)
    assert (failure.provider, failure.reason, failure.retryable) == (provider, reason, retryable)
    assert (failure.status, failure.midstream) == (status, midstream)
    assert failure.message and "Unknown error" not in failure.message
    assert failure.to_dict() == {
        "provider": provider, "reason": reason, "retryable": retryable,
        "failure_class": "provider" if retryable else "request",
        "status": status, "message": failure.message, "midstream": midstream,
        "retry_after": None, "limits": {},
    }


def test_classify_uses_error_body_message():
    exc = _anthropic_status(anthropic.RateLimitError, 429, "rate_limit_error", "slow down")
    assert classify(exc, "anthropic").message == "slow down"
    assert classify(ollama.ResponseError('{"error": "server overloaded"}', 503), "ollama").message == (
        "server overloaded"
    )


def test_classify_unexpected_keeps_message_and_passes_failures_through():
    assert classify(RuntimeError("weird thing"), "anthropic").message == "weird thing"
    failure = ProviderFailure("ollama", "timeout")
    assert classify(failure, "ollama") is failure


def test_classify_redacts_keys_in_messages():
    failure = classify(RuntimeError("bad key sk-ant-api03-abcdefghijk"), "anthropic")
    assert "sk-ant" not in failure.message and "[REDACTED]" in failure.message


def test_provider_failure_defaults_retryable_from_reason():
    assert ProviderFailure("anthropic", "overloaded_error").retryable is True
    assert ProviderFailure("anthropic", "authentication_error").retryable is False
    assert "overloaded_error" in str(ProviderFailure("anthropic", "overloaded_error", message="m"))


SIM = ProviderSettings(sim_url="http://127.0.0.1:6190")


@pytest.mark.parametrize(
    "provider,settings,env,expected",
    [
        ("anthropic", SIM, {}, ("http://127.0.0.1:6190", "sim-key")),
        ("anthropic", SIM, {"ANTHROPIC_API_KEY": "sk-ant-real"}, (None, "sk-ant-real")),
        ("anthropic", SIM, {"ANTHROPIC_API_KEY": "sk-ant-real", "ANTHROPIC_BASE_URL": "https://gw"},
         ("https://gw", "sk-ant-real")),
        ("anthropic", SIM, {"ANTHROPIC_API_KEY": ""}, ("http://127.0.0.1:6190", "sim-key")),
        ("ollama", SIM, {}, ("http://127.0.0.1:6190", None)),
        ("ollama", SIM, {"OLLAMA_HOST": "http://gpu:11434"}, ("http://gpu:11434", None)),
        ("ollama", ProviderSettings(sim_url=None), {}, ("http://127.0.0.1:11434", None)),
    ],
)
def test_endpoint_for(provider, settings, env, expected):
    assert endpoint_for(provider, settings, env=env) == expected


def test_endpoint_for_anthropic_unconfigured():
    with pytest.raises(ProviderFailure) as info:
        endpoint_for("anthropic", ProviderSettings(sim_url=None), env={})
    assert (info.value.reason, info.value.retryable) == ("not_configured", False)


def test_settings_are_frozen_and_strict():
    with pytest.raises(ValidationError, match="bogus"):
        ProviderSettings(sim_url=None, bogus=1)
    with pytest.raises(ValidationError, match="frozen"):
        SIM.timeout_s = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "text,env,expected",
    [
        ("key sk-ant-api03-AbC_d-123 end", {}, "key [REDACTED] end"),
        ("openai sk-proj1234567890abc", {}, "openai [REDACTED]"),
        ("Authorization: Bearer abc.def-ghi", {}, "Authorization: Bearer [REDACTED]"),
        ("x-api-key: s3cr3tvalue, next", {}, "x-api-key: [REDACTED], next"),
        ('{"api_key": "zzzzzz"}', {}, '{"api_key": "[REDACTED]"}'),
        ("token is hunter2hunter2", {"TRON_TOKEN": "hunter2hunter2"}, "token is [REDACTED]"),
        ("t=tok-987654", {"TRON_MESH_SECRET_KEY": "tok-987654"}, "t=[REDACTED]"),
        ("k=plainkeyvalue", {"ANTHROPIC_API_KEY": "plainkeyvalue"}, "k=[REDACTED]"),
        ("vllm said local-key-42", {"OPENAI_API_KEY": "local-key-42"}, "vllm said [REDACTED]"),
        ("ANTHROPIC_API_KEY=foo123bar", {}, "ANTHROPIC_API_KEY=[REDACTED]"),
        ("auth_token=abcdef x", {}, "auth_token=[REDACTED] x"),
        ("X-Tron-Token: t0k3n", {}, "X-Tron-Token: [REDACTED]"),
        ("nothing secret here, skip sk-", {"TRON_TOKEN": "abc"}, "nothing secret here, skip sk-"),
        ("the bearer of bad news; input_tokens: 5", {}, "the bearer of bad news; input_tokens: 5"),
        # upper case: the quick check before the patterns must not pass these over
        ("AUTHORIZATION: BEARER abcdefgh1", {}, "AUTHORIZATION: BEARER [REDACTED]"),
        ("MY_TOKEN=zzzzzz", {}, "MY_TOKEN=[REDACTED]"),
        ("X-API-KEY: s3cr3tvalue", {}, "X-API-KEY: [REDACTED]"),
        ("Authorization: bEaReR abcdefgh1", {}, "Authorization: bEaReR [REDACTED]"),
        ("Session_ToKeN=zzzzzz", {}, "Session_ToKeN=[REDACTED]"),
    ],
)
def test_redact(text, env, expected):
    assert redact(text, env=env) == expected


def test_import_does_not_load_sdks():
    # The SDKs cost ~2 s to import; agents must only pay when they call a provider.
    code = "import sys, tron.common.providers; print('anthropic' in sys.modules, 'ollama' in sys.modules)"
    repo_root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=repo_root)
    assert out.stdout.split() == ["False", "False"]


def test_warm_up_loads_only_the_sdks_of_the_mesh():
    # The fork server preloads the SDKs of the provider chain only (TRON_SDKS): openai alone
    # is 1.6 s of every mesh start when no provider of the mesh uses it.
    code = ("import os, sys; from tron.services.daemon.forkserver import server_sdks; "
            "from tron.common.providers import warm_up; warm_up(server_sdks()); "
            "print(sorted(m for m in ('anthropic', 'ollama', 'openai') if m in sys.modules))")
    repo_root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root,
                         env={**os.environ, "TRON_SDKS": "ollama"}, timeout=60)
    assert out.stdout.strip() == "['ollama']"


def test_a_fork_server_warms_the_sdks_its_environment_names_and_none_when_it_names_none():
    from tron.common.providers import SDKS
    from tron.services.daemon.forkserver import server_sdks

    assert server_sdks({"TRON_SDKS": "ollama,nosuch"}) == {"ollama"}
    assert server_sdks({"TRON_SDKS": ""}) == set()  # a mesh without agents: no heir is started for it
    assert server_sdks({}) == set(SDKS)  # not said: every one


def test_the_mesh_names_the_sdks_its_providers_use():
    from tron.common.config import MeshConfig

    config = MeshConfig.model_validate({"services": {"a": {"role": "programmer", "port": 7001, "provider": "openai"}}})
    assert config.sdks == {"anthropic", "ollama", "openai"}
    config = MeshConfig.model_validate({"services": {"a": {"role": "programmer", "port": 7001}},
                                        "providers": {"chain": ["ollama"], "default": "ollama"}})
    assert config.sdks == {"ollama"}
    config = MeshConfig.model_validate({"services": {"a": {"role": "programmer", "port": 7001}},
                                        "providers": {"chain": ["anthropic", "openai_compatible"]}})
    assert config.sdks == {"anthropic", "openai"}  # a provider's SDK, not its name
    config = MeshConfig.model_validate({"services": {"web": {"command": ["true"], "port": 7002}}})
    assert config.sdks == set()  # a mesh of programs alone: no agent calls an LLM
